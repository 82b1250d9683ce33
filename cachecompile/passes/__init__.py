"""Graph passes of cachecompile: capture, regions, cache reads/writes, dead code removal.

Each pass is a small function ``fn(gm, ...) -> gm``; :data:`STEP_PASSES` is the one ordered list
that turns a captured graph into the step graph of one :class:`~cachecompile.schedule.StepPlan`.
``counters`` records what the passes did (``counters["cache_reads"]``), as Inductor's do.
"""

from __future__ import annotations

import collections
from typing import Any

import torch.fx

counters: collections.Counter = collections.Counter()


def attr_value(gm: torch.nn.Module, node: torch.fx.Node) -> Any:
    """The object a ``get_attr`` node reads: ``gm.<target>`` along its dotted path."""
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


from cachecompile.passes.pipeline import STEP_PASSES, build_step_graph, copy_graph_module, finish_step_graphs  # noqa: E402
import cachecompile.passes.families  # noqa: E402,F401  (registers the region defaults of every DiT family)

__all__ = ["attr_value", "counters", "STEP_PASSES", "build_step_graph", "copy_graph_module", "finish_step_graphs"]
