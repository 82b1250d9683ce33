"""Compute each value once: merge nodes that apply the same op to the same inputs.

Two sources of repeats in a DiT step graph:

- every block computes the same sinusoidal timestep embedding from the same ``timestep``;
- converted DiT checkpoints (diffusers' conversion of the original DiT) copy the one timestep and
  label embedder into every block, so every block runs the same MLP on the same weights. On a
  cached step these per-block embedder MLPs, run at the sampling batch, are bound by reading
  their weights, and are most of what is left to compute.

Parameters are compared by value (same shape, dtype, device and elements), so weights that are
equal copies count as one. Merged nodes compute exactly what they computed before: the
results are bit-identical. Nothing frozen by :mod:`cachecompile.passes.effects` is merged: ops with side
effects (random, in place), values that some op mutates, and reads of such values.

Runs last, after dead code removal and linear narrowing, on what the step graph really computes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

from cachecompile.core.schedule import StepPlan
from cachecompile.passes import attr_value, counters
from cachecompile.passes.effects import frozen_nodes
from cachecompile.core.regions import RegionMap

log = logging.getLogger(__name__)

__all__ = ["merge_common_subexpressions"]


def _equal_parameters(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node]:
    """get_attr node → the first get_attr node whose tensor is equal to it (itself if none)."""
    rep: dict[torch.fx.Node, torch.fx.Node] = {}
    groups: dict[tuple, list[tuple[torch.fx.Node, torch.Tensor]]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        t = attr_value(gm, node)
        if not isinstance(t, torch.Tensor):
            rep[node] = node
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]  # equal tensors have equal samples
        raw = sample.contiguous().view(torch.uint8).cpu().numpy().tobytes()  # any dtype (bf16, fp8)
        key = (tuple(t.shape), t.dtype, t.device, raw)
        for other, u in groups.get(key, []):
            if u is t or torch.equal(u, t):
                rep[node] = other
                break
        else:
            groups.setdefault(key, []).append((node, t))
            rep[node] = node
    return rep


def _key(value: Any, rep: dict) -> Any:
    if isinstance(value, torch.fx.Node):
        return ("node", rep.get(value, value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v, rep) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v, rep)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    hash(value)  # raises TypeError for values we cannot compare; the caller skips the node
    return ("const", type(value).__name__, value)


def merge_common_subexpressions(
    gm: torch.fx.GraphModule, regions: RegionMap | None = None, plan: StepPlan | None = None
) -> torch.fx.GraphModule:
    """Replace every node that repeats an earlier node's op on the same inputs by that node."""
    rep: dict[torch.fx.Node, torch.fx.Node] = _equal_parameters(gm)
    seen: dict[Any, torch.fx.Node] = {}
    frozen = frozen_nodes(gm.graph)
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in frozen:
            continue
        try:
            key = (node.target, _key(node.args, rep), _key(node.kwargs, rep))
        except TypeError:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
    for node, first in rep.items():  # parameters equal to an earlier one are no longer read
        if first is not node and not node.users:
            gm.graph.erase_node(node)
    counters["nodes_merged"] += merged
    log.debug("merged %d repeated nodes", merged)
    return gm
