"""Tests of the import graph: `import cuttlefish_hf` stays light, and no module imports the package's __init__."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "cuttlefish_hf"
# Heavy modules that only the code using them may import (transformers' model code pulls in its quantizers,
# huggingface_hub and safetensors; `import transformers` alone imports huggingface_hub).
HEAVY = ("transformers.modeling_utils", "transformers.quantizers", "huggingface_hub", "safetensors", "timm",
         "matplotlib", "cuttlefish_hf.hub.transformers_loader")


def imported_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON value, which is returned."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


HEAVY_LOADED = f"[name for name in {HEAVY!r} if name in sys.modules]"


@pytest.mark.parametrize("statement", [
    "import cuttlefish_hf",
    "from cuttlefish_hf.cli.main import build_parser; build_parser()",  # what `cuttlefish-hf --help` runs
    "from cuttlefish_hf import hub",
])
def test_light_imports_load_no_heavy_module(statement):
    loaded = imported_after(f"""
        import json, sys
        {statement}
        print(json.dumps({HEAVY_LOADED}))
    """)
    assert loaded == [], f"`{statement}` imported {loaded}; import them inside the functions that use them"


def test_timm_side_of_the_hub_does_not_import_transformers_model_code():
    loaded = imported_after("""
        import json, sys
        from cuttlefish_hf.hub import load_timm, save_timm
        print(json.dumps([name for name in ("transformers.modeling_utils",) if name in sys.modules]))
    """)
    assert loaded == []


@pytest.mark.parametrize("order", ["cuttlefish_hf first", "transformers first"])
def test_loader_and_plan_recorder_work_whichever_is_imported_first(order):
    """The lazy registration: the quantizer is registered and factorize_ records the plan in either order."""
    imports = ["import cuttlefish_hf", "import transformers; transformers.BertConfig; transformers.BertModel"]
    out = imported_after(f"""
        import json
        {imports[0] if order == "cuttlefish_hf first" else imports[1]}
        {imports[1] if order == "cuttlefish_hf first" else imports[0]}
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        from cuttlefish_hf import factorize_
        config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32)
        model = transformers.BertModel(config)
        factorize_(model, {{"encoder.layer.0.intermediate.dense": 4}})
        print(json.dumps(["cuttlefish" in AUTO_QUANTIZER_MAPPING, model.config.quantization_config.plan]))
    """)
    assert out == [True, {"encoder.layer.0.intermediate.dense": 4}]


def test_every_name_of_the_hub_resolves():
    from cuttlefish_hf import hub

    assert sorted(hub.__all__) == sorted([*hub._EXPORTS, *hub._REEXPORTS])  # the lazy table and __all__ agree
    missing = [name for name in hub.__all__ if getattr(hub, name, None) is None]
    assert missing == []
    with pytest.raises(AttributeError):
        hub.no_such_name  # noqa: B018


def _init_names() -> set[str]:
    """The names ``cuttlefish_hf/__init__.py`` binds at its top level."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).partition(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def upward_imports(module: str, source: str) -> list[tuple[int, str]]:
    """``(line, statement)`` for each import in ``source`` (module ``module``, e.g. ``cuttlefish_hf.hub.record``, or
    ``cuttlefish_hf.hub`` for a package's __init__) that reads a name from ``cuttlefish_hf/__init__.py``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            parts = module.split(".")
            target = ".".join(parts[: len(parts) - node.level]) if node.level else ""
            target = f"{target}.{node.module}".strip(".") if node.module else target
            if target == "cuttlefish_hf":
                # `from .. import layers` imports a submodule, unless __init__ binds the same name (`stable_rank`
                # is the function there); any other name comes from the package's __init__
                found += [(node.lineno, f"from cuttlefish_hf import {alias.name}") for alias in node.names
                          if alias.name in _init_names() or not ((PACKAGE / f"{alias.name}.py").is_file()
                                                                 or (PACKAGE / alias.name).is_dir())]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {alias.name}") for alias in node.names if alias.name == "cuttlefish_hf"]
    return found


def test_no_module_of_the_package_imports_its_init():
    """The floors only point down: a module reads names from the module that defines them, never from
    ``cuttlefish_hf/__init__.py`` (which imports almost everything, so such an import is a cycle)."""
    upward = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)  # `.` of x/__init__ is x
        if found := upward_imports(module, path.read_text(encoding="utf-8")):
            upward[str(path.relative_to(REPO_ROOT))] = found
    assert upward == {}


def test_the_import_graph_check_sees_upward_imports():
    source = "from .. import __version__\nfrom .. import layers\nimport cuttlefish_hf\nfrom . import card\n"
    assert upward_imports("cuttlefish_hf.hub.record", source) == [
        (1, "from cuttlefish_hf import __version__"), (3, "import cuttlefish_hf")]
    assert upward_imports("cuttlefish_hf.surgery", "from . import __version__, tracker, stable_rank\n") == [
        (1, "from cuttlefish_hf import __version__"), (1, "from cuttlefish_hf import stable_rank")]


# The floors of ../shared/ARCHITECTURE.md: a module imports only from its own floor or below (a package's
# modules sit on the package's floor). Leaves may use leaves; what matters is that nothing points up.
FLOORS = {
    "_version": 1, "logging_utils": 1, "config": 1, "stable_rank": 1, "tracker": 1, "layers": 1, "targeting": 1,
    "optim": 1, "whitening": 1, "plotting": 1, "tables": 1, "compilation": 1,
    "rank_rules": 2, "inits": 2, "statistics": 2, "surgery": 2, "profiling": 2, "serialization": 2, "timings": 2,
    "planning": 3, "hub": 3,
    "controller": 4,
    "integrations": 5, "cli": 5,
}


def package_imports() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, anywhere in its source (imports inside functions too),
    modules named by their first part below ``cuttlefish_hf`` (``hub.card`` -> ``hub``)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        package = parts[:-1] if parts[-1] == "__init__" else parts[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - (node.level - 1)])
                names = [*base, *(node.module.split(".") if node.module else [])]
                targets.update(names[:1] or [alias.name for alias in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cuttlefish_hf."):
                targets.add(node.module.split(".")[1])
        graph[parts[0]] = graph.get(parts[0], set()) | (targets - {parts[0]})
    return graph


def test_no_module_imports_from_a_floor_above_it():
    graph = package_imports()
    assert set(graph) == set(FLOORS), "a module was added or removed: give it a floor here and in ARCHITECTURE.md"
    upward = {(module, target) for module, targets in graph.items() for target in targets
              if FLOORS[target] > FLOORS[module]}
    assert upward == set()
