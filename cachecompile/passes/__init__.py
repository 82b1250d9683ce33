"""Small, pure graph passes over a captured ``GraphModule``: capture, regions, cache reads and
writes, dead code, common subexpressions, linear narrowing, squeezes, dead cache writes.

Each pass is a small function ``fn(gm, ...) -> gm`` in a file of its own; the passes of a
method (partial recompute, compensation ...) live with the method in :mod:`cachecompile.methods`,
and the one ordered list that turns a captured graph into a step graph is
:data:`cachecompile.compile.pipeline.STEP_PASSES`. ``counters`` records what the passes did
(``counters["cache_reads"]``), as Inductor's do.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import torch
import torch.fx

__all__ = ["attr_value", "copy_graph_module", "counters"]

counters: collections.Counter = collections.Counter()


def attr_value(gm: torch.nn.Module, node: Any) -> Any:
    """The object a ``get_attr`` node reads: ``gm.<target>`` along its dotted path."""
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph that shares its parameters (no weight copy)."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = torch.fx.GraphModule(gm, graph)
    new.meta = {}
    return new
