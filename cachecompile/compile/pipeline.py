"""The ordered pass list that builds one step graph per distinct plan: the generic passes of
:mod:`cachecompile.passes` and the methods' own passes, in one place."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from cachecompile.core.errors import ScheduleError
from cachecompile.core.regions import RegionMap
from cachecompile.core.schedule import StepPlan
from cachecompile.methods.compensation.graph import compensate
from cachecompile.methods.dual import partial_tokens, record_token_state, sink_token_scatters, stack_reuse
from cachecompile.methods.dynamic import RESIDUAL_SLOT, dynamic_reuse
from cachecompile.passes import copy_graph_module
from cachecompile.passes.cache_dtype import store_cache_in
from cachecompile.passes.cache_io import cache_io, insert_cache_reads, insert_cache_writes, order_placeholders
from cachecompile.passes.cse import merge_common_subexpressions
from cachecompile.passes.dce import remove_dead_code, tidy
from cachecompile.passes.dead_writes import drop_dead_cache_writes
from cachecompile.passes.narrow_linear import narrow_chunked_linears
from cachecompile.passes.noop_squeeze import remove_noop_squeezes

__all__ = ["STEP_PASSES", "build_step_graph", "example_inputs", "feature_slot", "finish_step_graphs", "storage_dtype"]

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
    dynamic_reuse,  # before dead code removal and CSE: the skipped blocks move into a torch.cond branch
    remove_noop_squeezes,  # torch.onnx exports them as Squeezes that ONNX Runtime rejects
    lambda gm, regions, plan: remove_dead_code(gm),
    narrow_chunked_linears,  # after dead code removal: only the chunks still read are computed
    merge_common_subexpressions,  # repeated timestep embeddings, embedders copied into every block
    lambda gm, regions, plan: order_placeholders(gm),
]


def build_step_graph(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Run :data:`STEP_PASSES` on a copy of the captured graph ``gm`` for ``plan``.

    The result is called as ``step(*user_inputs, *cache_inputs, *step_inputs)`` and returns
    ``(*user_outputs, *cache_writes)``; :func:`~cachecompile.passes.cache_io.cache_io` names its
    cache slots and per-step inputs.
    """
    step = copy_graph_module(gm)
    cache_io(step)
    for p in STEP_PASSES:
        step = p(step, regions, plan)
    step.graph.lint()
    step.recompile()
    return step


def finish_step_graphs(
    graphs: list[torch.fx.GraphModule], graph_of_step: list[int], regions: RegionMap | None = None,
    cache_dtype: str | None = None,
) -> None:
    """The passes that need the whole schedule, run once all step graphs are built (in place):
    cache writes no later step reads are dropped (:mod:`cachecompile.passes.dead_writes`), a partial
    recompute's scatter whose result is then no longer a cache write moves below the
    elementwise ops that consume it (:func:`cachecompile.methods.dual.partial.sink_token_scatters`),
    and with a ``cache_dtype`` the cached features are stored in it
    (:mod:`cachecompile.passes.cache_dtype`, slots chosen by :func:`feature_slot`)."""
    drop_dead_cache_writes(graphs, graph_of_step)
    for gm in graphs:
        if sink_token_scatters(gm):
            tidy(gm)
    if cache_dtype is not None:
        dtype = storage_dtype(cache_dtype)
        is_feature = feature_slot(regions)
        for gm in graphs:
            store_cache_in(gm, dtype, is_feature)


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a schedule's ``cache_dtype`` name."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ScheduleError(f"cache_dtype {name!r} is not a dtype of this torch ({torch.__version__}); choose another")
    return dtype


def feature_slot(regions: RegionMap | None) -> Callable[[str], bool]:
    """Which cache slots hold features (stored in a schedule's ``cache_dtype``): the regions'
    outputs, their compensation history (``<slot>@h1`` ...) and a dynamic schedule's cached
    residual. Token scores (``<slot>@v_norm``, ``@staleness``), a dynamic probe, counters and
    decisions only steer what is computed and keep their dtype."""
    names = {s for r in regions.regions.values() for s in r.slots} if regions is not None else set()

    def is_feature(slot: str) -> bool:
        if slot == RESIDUAL_SLOT:
            return True
        base, _, state = slot.partition("@")
        return base in names and (not state or (state[:1] == "h" and state[1:].isdigit()))

    return is_feature


def example_inputs(gm: torch.fx.GraphModule, call_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs to run or lower step graph ``gm``: the captured call's tensors, then zeros shaped
    like each cache input and per-step input."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    rest = placeholders[len(call_inputs):]
    device = call_inputs[0].device if call_inputs else None
    zeros = [torch.zeros(concrete_shape(p.meta["val"]), dtype=p.meta["val"].dtype, device=device) for p in rest]
    return list(call_inputs) + zeros


def concrete_shape(val: torch.Tensor) -> tuple[int, ...]:
    """A (fake) tensor's shape with each symbolic size at its example value (the captured batch)."""
    return tuple(optimization_hint(d) for d in val.shape)
