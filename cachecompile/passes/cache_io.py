"""Cache reads and writes as graph I/O.

``insert_cache_writes`` appends the outputs of the regions a plan writes to the graph's output
tuple; ``insert_cache_reads`` replaces the outputs of reused regions by new placeholders. Cache
state is explicit graph input/output, not buffer mutation: ONNX export silently drops buffer
writes, and explicit I/O is what TensorRT and CUDA graphs want. Dead code is removed by
:mod:`cachecompile.passes.dce` afterwards.
"""

from __future__ import annotations

import logging

import torch.fx

from cachecompile.core.program import StepIO
from cachecompile.core.schedule import StepPlan
from cachecompile.passes import counters
from cachecompile.core.regions import RegionMap

log = logging.getLogger(__name__)

__all__ = [
    "insert_cache_reads",
    "insert_cache_writes",
    "cache_io",
    "add_cache_input",
    "add_cache_output",
    "add_step_input",
    "order_placeholders",
]


def cache_io(gm: torch.fx.GraphModule) -> StepIO:
    """The calling convention of a step graph (:class:`~cachecompile.core.program.StepIO`), kept
    in ``gm.meta`` while the passes add cache inputs, cache outputs and per-step inputs."""
    return gm.meta.setdefault("cachecompile", StepIO())


def _output_node(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def add_cache_input(gm: torch.fx.GraphModule, slot: str, like: torch.fx.Node) -> torch.fx.Node:
    """A new placeholder ``cache_<slot>`` after the existing ones, with ``like``'s metadata."""
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        ph = graph.placeholder("cache_" + slot.replace(".", "_").replace("#", "_").replace("@", "_"))
    for key in ("val", "tensor_meta"):
        if key in like.meta:
            ph.meta[key] = like.meta[key]
    io = cache_io(gm)
    io.cache_inputs.append(slot)
    io.placeholders[slot] = ph.name
    return ph


def add_step_input(gm: torch.fx.GraphModule, name: str, val: torch.Tensor) -> torch.fx.Node:
    """A per-step input placeholder: its value depends only on the step, and the method that
    adds it computes one value per step up front (``step_values`` in :mod:`cachecompile.methods`).
    ``val`` is an example (fake or real) tensor for the metadata."""
    io = cache_io(gm)
    if name in io.step_inputs:
        return {n.name: n for n in gm.graph.nodes}[io.placeholders[name]]
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        ph = graph.placeholder("step_" + name.replace(".", "_").replace("#", "_").replace(":", "_"))
    ph.meta["val"] = val
    io.step_inputs.append(name)
    io.placeholders[name] = ph.name
    return ph


def order_placeholders(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Put the placeholders in calling-convention order: user inputs, cache inputs, step inputs."""
    io = cache_io(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    extra = [nodes[io.placeholders[s]] for s in io.cache_inputs + io.step_inputs]
    user = [n for n in graph.nodes if n.op == "placeholder" and n not in extra]
    anchor = user[-1] if user else None
    for ph in extra:
        if anchor is None:
            next(iter(graph.nodes)).prepend(ph)
        else:
            anchor.append(ph)
        anchor = ph
    return gm


def add_cache_output(gm: torch.fx.GraphModule, slot: str, value: torch.fx.Node) -> None:
    out = _output_node(gm.graph)
    io = cache_io(gm)
    if io.num_user_outputs is None:
        io.num_user_outputs = len(out.args[0])
    out.args = (tuple(out.args[0]) + (value,),)
    io.cache_outputs.append(slot)


def insert_cache_writes(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Expose the outputs of every region the plan writes (and fully computes) as graph outputs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    io = cache_io(gm)
    if io.num_user_outputs is None:
        io.num_user_outputs = len(_output_node(gm.graph).args[0])
    n = 0
    for name in sorted(plan.writes):
        if plan.action(name).kind != "compute":
            continue  # partial and other actions write their own merged value
        region = regions[name]
        for i, out in enumerate(region.outputs):
            add_cache_output(gm, region.slot(i), nodes[out])
            n += 1
    counters["cache_writes"] += n
    log.debug("inserted %d cache writes", n)
    return gm


def insert_cache_reads(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Replace the outputs of reused regions (uses outside the region) by cache placeholders."""
    nodes = {n.name: n for n in gm.graph.nodes}
    n = 0
    for name, action in plan.actions:
        if action.kind != "reuse":
            continue
        region = regions[name]
        for i, out_name in enumerate(region.outputs):
            out = nodes[out_name]
            ph = add_cache_input(gm, region.slot(i), out)
            out.replace_all_uses_with(ph, delete_user_cb=lambda u: u.name not in region.nodes)
            n += 1
    counters["cache_reads"] += n
    log.debug("inserted %d cache reads", n)
    return gm
