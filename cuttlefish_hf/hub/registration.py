"""Connect the hub to transformers lazily: register the loader when transformers loads its quantizer registry,
and record the plan of transformers models after every ``factorize_`` / ``merge_``.

``import cuttlefish_hf`` calls :func:`install`. Importing transformers' quantizer registry costs more than a
second (every quantizer module, and ``modeling_utils`` follows), so it is not imported for the registration:
if the registry is loaded already, the loader registers at once; otherwise a finder on ``sys.meta_path`` waits
for ``transformers.quantizers.auto`` to be imported (``from_pretrained`` always imports it first) and registers
right after that module runs, then removes itself. A failure there is logged, never raised into transformers'
own import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

from ..logging_utils import get_logger
from ..surgery import register_plan_recorder
from .record import is_transformers_model

__all__ = ["install", "record_if_transformers"]

logger = get_logger(__name__)

REGISTRY_MODULE = "transformers.quantizers.auto"
LOADER_MODULE = f"{__package__}.transformers_loader"  # registers "cuttlefish" when imported


def record_if_transformers(model: Any) -> None:
    """The plan recorder of ``surgery``: :func:`record_plan_` for transformers models, nothing for others."""
    if is_transformers_model(model):
        from .transformers_loader import record_plan_

        record_plan_(model)


def install() -> None:
    """Register the plan recorder, and the loader now or when transformers' quantizer registry is imported."""
    register_plan_recorder(record_if_transformers)
    if REGISTRY_MODULE in sys.modules:
        importlib.import_module(LOADER_MODULE)
    elif not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


def _register_loader() -> None:
    # While the loader module itself is being imported (it imports the registry), this returns the half-built
    # module at once; its last line registers.
    try:
        importlib.import_module(LOADER_MODULE)
    except Exception as error:  # noqa: BLE001  (never break transformers' own import for our loader)
        logger.warning("Could not register the Cuttlefish loader with transformers (%s: %s); factorized "
                       "checkpoints will not load through AutoModel*.from_pretrained.", type(error).__name__, error)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` with the other finders and runs the registration after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfter(spec.loader, self)
        return spec


class _RegisterAfter(importlib.abc.Loader):
    """A module loader that runs the registration once the module has run; anything else goes to ``loader``."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegistryFinder) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _register_loader()

    def __getattr__(self, name: str):  # get_source, get_filename, is_package, ...: the wrapped loader's
        if name == "loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
