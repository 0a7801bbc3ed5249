"""``torch.compile`` around the switch: counting the graphs it compiles, and re-tracing when hooks come and go.

A compiled model is guarded on its modules' types and parameters, so the switch (new module types) makes
``torch.compile`` re-trace the factorized model by itself. Module hooks are not guarded
(``torch._dynamo.config.skip_nnmodule_hook_guards``): graphs traced without the input-statistics hooks would
never call hooks added later, and graphs traced with them keep the graph breaks where the hooks were after the
hooks are gone (measured on a tiny BERT: 11 graphs per step after the switch instead of 1). So whoever adds or
removes hooks on a model that may be compiled calls :func:`retrace_compiled`.
"""

from __future__ import annotations

import torch

__all__ = ["graphs_compiled", "retrace_compiled"]


def graphs_compiled() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far (0 when it compiled nothing)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def retrace_compiled() -> bool:
    """Drop ``torch.compile``'s cached graphs, if it compiled any, so each compiled model re-traces on its next
    call with the hooks it has now (one recompile). Returns whether there was anything to drop."""
    if graphs_compiled() == 0:
        return False
    torch.compiler.reset()
    return True
