"""The ordered pass list that builds one step graph per distinct plan."""

from __future__ import annotations

import copy
from typing import Callable

import torch.fx

from cachecompile.schedule import StepPlan
from cachecompile.passes.cache_io import cache_io, insert_cache_reads, insert_cache_writes, order_placeholders
from cachecompile.passes.compensation import compensate
from cachecompile.passes.cse import merge_common_subexpressions
from cachecompile.passes.dce import remove_dead_code
from cachecompile.passes.dead_writes import drop_dead_cache_writes
from cachecompile.passes.narrow_linear import narrow_chunked_linears
from cachecompile.passes.noop_squeeze import remove_noop_squeezes
from cachecompile.passes.partial_tokens import partial_tokens, sink_token_scatters
from cachecompile.passes.stack_reuse import stack_reuse
from cachecompile.passes.token_scores import record_token_state
from cachecompile.passes.regions import RegionMap

__all__ = ["STEP_PASSES", "build_step_graph", "copy_graph_module", "finish_step_graphs"]

Pass = Callable[[torch.fx.GraphModule, RegionMap, StepPlan], torch.fx.GraphModule]

# Order matters: writes must name region outputs before reads cut them off; compensation and
# partial recompute passes slot in between (they read both), dead code removal runs last
# (followed only by passes that work on what is left: linear narrowing, merging repeats).
STEP_PASSES: list[Pass] = [
    insert_cache_writes,
    insert_cache_reads,
    compensate,
    record_token_state,  # before partial_tokens: a partial step may score by state recorded this step
    partial_tokens,
    stack_reuse,
    remove_noop_squeezes,  # torch.onnx exports them as Squeezes that ONNX Runtime rejects
    lambda gm, regions, plan: remove_dead_code(gm),
    narrow_chunked_linears,  # after dead code removal: only the chunks still read are computed
    merge_common_subexpressions,  # repeated timestep embeddings, embedders copied into every block
    lambda gm, regions, plan: order_placeholders(gm),
]


def register_step_pass(fn: Pass, before: Pass | None = None) -> None:
    """Insert a pass into :data:`STEP_PASSES` (before ``before``, default: before dead code removal)."""
    idx = STEP_PASSES.index(before) if before is not None else len(STEP_PASSES) - 4
    STEP_PASSES.insert(idx, fn)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph that shares its parameters (no weight copy)."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    value_map: dict = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    new = torch.fx.GraphModule(gm, graph)
    new.meta = {}
    return new


def build_step_graph(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Run :data:`STEP_PASSES` on a copy of the captured graph ``gm`` for ``plan``.

    The result is called as ``step(*user_inputs, *cache_inputs, *step_inputs)`` and returns
    ``(*user_outputs, *cache_writes)``; ``step.meta["cachecompile"]`` names the cache slots.
    """
    step = copy_graph_module(gm)
    cache_io(step)
    for p in STEP_PASSES:
        step = p(step, regions, plan)
    step.graph.lint()
    step.recompile()
    return step


def finish_step_graphs(graphs: list[torch.fx.GraphModule], graph_of_step: list[int]) -> None:
    """The passes that need the whole schedule, run once all step graphs are built (in place):
    cache writes no later step reads are dropped (:mod:`cachecompile.passes.dead_writes`), and a partial
    recompute's scatter whose result is then no longer a cache write moves below the
    elementwise ops that consume it (:func:`cachecompile.passes.partial_tokens.sink_token_scatters`)."""
    drop_dead_cache_writes(graphs, graph_of_step)
    for gm in graphs:
        if sink_token_scatters(gm):
            remove_dead_code(gm)
            gm.graph.lint()
            gm.recompile()
