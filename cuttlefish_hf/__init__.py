"""Cuttlefish low-rank training for the Hugging Face ecosystem.

Example:
    >>> from cuttlefish_hf import CuttlefishConfig, factorize_, stable_rank
"""

from ._version import __version__ as __version__
from .config import CuttlefishConfig
from .controller import Cuttlefish, SwitchResult
from .hub.registration import install as _install_hub
from .layers import FactorizedConv2d, FactorizedLinear
from .rank_rules import decide_ranks
from .stable_rank import StableRankMeter, stable_rank, stable_ranks
from .surgery import FactorizationReport, factorize_, factorized_plan, merge_
from .targeting import describe_targets, find_targets
from .tracker import StableRankTracker

# The "cuttlefish" loader is registered with transformers now, or when transformers loads its quantizer registry,
# and factorize_ / merge_ record the plan of transformers models; neither imports transformers here.
# `cuttlefish_hf.hub.<name>` loads its module on first use.
_install_hub()


def __getattr__(name: str):
    # The Trainer integration imports transformers; load it only when asked for.
    if name in ("CuttlefishCallback", "CuttlefishTrainer"):
        from .integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'cuttlefish_hf' has no attribute {name!r}")


__all__ = [
    "Cuttlefish",
    "CuttlefishCallback",
    "CuttlefishConfig",
    "CuttlefishTrainer",
    "FactorizationReport",
    "FactorizedConv2d",
    "FactorizedLinear",
    "StableRankMeter",
    "StableRankTracker",
    "SwitchResult",
    "decide_ranks",
    "describe_targets",
    "factorize_",
    "factorized_plan",
    "find_targets",
    "merge_",
    "stable_rank",
    "stable_ranks",
]
