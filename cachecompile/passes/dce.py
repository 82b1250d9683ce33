"""Dead code removal for step graphs.

Export leaves ``_assert_tensor_metadata`` nodes that count as side effects and would keep the
skipped blocks alive: they are removed first. Attention is marked nondeterministic-seeded (for
its dropout); with ``dropout_p == 0`` it is pure and a skipped attention goes. Every other op with
a side effect stays (:func:`cachecompile.passes.effects.has_side_effects`: in-place, random, effectful).
A collective whose result nothing reads goes with its waits (a reused attention's all-to-alls under
context parallelism): ``counters["collectives_removed"]`` counts them.
"""

from __future__ import annotations

import logging

import torch.fx

from cachecompile.passes import counters
from cachecompile.passes.cache_io import cache_io
from cachecompile.passes.effects import has_side_effects, is_collective, is_wait

log = logging.getLogger(__name__)

__all__ = ["remove_dead_code", "tidy"]


def _is_assert(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "").startswith("_assert")


def remove_dead_code(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove asserts, dead nodes and cache placeholders that nothing reads any more."""
    graph = gm.graph
    before = len(graph.nodes)
    for node in list(graph.nodes):
        if _is_assert(node):
            graph.erase_node(node)
    collectives = sum(is_collective(n) and not is_wait(n) for n in graph.nodes)
    graph.eliminate_dead_code(is_impure_node=has_side_effects)
    counters["collectives_removed"] += collectives - sum(is_collective(n) and not is_wait(n) for n in graph.nodes)
    io = cache_io(gm)
    keep = []
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for slot in io.cache_inputs:
        ph = placeholders[io.placeholders[slot]]
        if ph.users:
            keep.append(slot)
        else:
            graph.erase_node(ph)
    io.cache_inputs = keep
    used_steps = []
    for name in io.step_inputs:
        ph = placeholders[io.placeholders[name]]
        if ph.users:
            used_steps.append(name)
        else:
            graph.erase_node(ph)
    io.step_inputs = used_steps
    gm.delete_all_unused_submodules()
    removed = before - len(graph.nodes)
    counters["dead_nodes_removed"] += removed
    log.debug("removed %d dead nodes", removed)
    return gm


def tidy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove dead code, check the graph and regenerate its code: how a pass that cut values off
    an already built step graph ends."""
    remove_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
