"""Residual reuse of the block stack (DuCa's ``aggressive_reuse="residual"``).

At a step that reuses the stack with a ``residual`` action (``methods.dual.ReuseResidual``), the
stack's output is replaced by ``this step's stack input + cache["stack@residual"]``; at every step
that runs the stack with ``Record(state=("residual",))``, ``output − input`` is written to the slot
``stack@residual``. So that slot holds the stack's residual from the last step where the stack
ran, and the blocks drop out of the aggressive step graph by dead code removal. Plain ``reuse`` of
the stack — the paper's ``"output"`` mode — is an ordinary read of the ``stack`` slot, which keeps
the output, so one schedule may use both (a write no step reads is dropped by
:mod:`cachecompile.passes.dead_writes`).

The stack's input is its stream input: the one floating-point input with the output's shape
(the patch embedding's output for DiT); timestep and labels feed the blocks' adaLN but are not
the stream.

Example (``dit`` a diffusers DiT)::

    import cachecompile as cc
    cached = cc.optimize(dit, cc.Schedule.duca(50, 4, 0.3, aggressive_reuse="residual"))
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from cachecompile.core.schedule import StepPlan
from cachecompile.passes import counters
from cachecompile.passes.cache_io import add_cache_input, add_cache_output
from cachecompile.core.errors import RegionError
from cachecompile.core.regions import Region, RegionMap

log = logging.getLogger(__name__)

__all__ = ["stack_reuse", "stream_input"]

STACK = "stack"
RESIDUAL_SLOT = "stack@residual"  # the stack's output − input, beside the output kept in "stack"


def stream_input(gm: torch.fx.GraphModule, region: Region) -> tuple[torch.fx.Node, torch.fx.Node]:
    """``(input, output)`` nodes of the region's residual stream; raises :class:`RegionError`
    when the region has not exactly one output or not exactly one input shaped like it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if len(region.outputs) != 1:
        raise RegionError(f"residual reuse of {region.name} needs one output, it has {len(region.outputs)}; use aggressive_reuse='output'")
    out = nodes[region.outputs[0]]
    ov = out.meta["val"]
    cands = [
        nodes[i]
        for i in region.inputs
        if isinstance(nodes[i].meta.get("val"), torch.Tensor)
        and nodes[i].meta["val"].is_floating_point()
        and nodes[i].meta["val"].shape == ov.shape
    ]
    if len(cands) != 1:
        raise RegionError(
            f"residual reuse of {region.name} needs one stream input shaped like its output {list(ov.shape)}, "
            f"found {[c.name for c in cands]}; use aggressive_reuse='output'"
        )
    return cands[0], out


def stack_reuse(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Rewrite ``residual`` reuse of the stack and its ``residual`` records (see module doc)."""
    action = plan.action(STACK)
    if action.kind == "residual":
        region = regions[STACK]
        inp, out = stream_input(gm, region)
        delta = add_cache_input(gm, RESIDUAL_SLOT, out)
        user = next(n for n in gm.graph.nodes if n in out.users and n.name not in region.nodes)
        with gm.graph.inserting_before(user):
            new = gm.graph.call_function(torch.ops.aten.add.Tensor, (inp, delta))
        new.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(new, delete_user_cb=lambda u: u.name not in region.nodes and u is not new)
        counters["stack_residual_reads"] += 1
    elif action.kind == "compute" and "residual" in getattr(action, "state", ()):
        region = regions[STACK]
        inp, out = stream_input(gm, region)
        with gm.graph.inserting_after(out):
            delta = gm.graph.call_function(torch.ops.aten.sub.Tensor, (out, inp))
        delta.meta["val"] = out.meta["val"]
        add_cache_output(gm, RESIDUAL_SLOT, delta)
        counters["stack_residual_writes"] += 1
    return gm
