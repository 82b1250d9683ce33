"""Remove squeezes that change nothing.

``x.squeeze(1)`` on a tensor whose dim 1 is not of size 1 returns ``x`` unchanged in PyTorch,
but ``torch.onnx`` exports it as an ONNX ``Squeeze`` that ONNX Runtime refuses to load
(PixArt's output head calls ``hidden_states.squeeze(1)`` on ``[B, tokens, C]``). Such a node is
replaced by its input in every step graph; the values are identical.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from cachecompile.core.schedule import StepPlan
from cachecompile.passes import counters
from cachecompile.core.regions import RegionMap

log = logging.getLogger(__name__)

__all__ = ["remove_noop_squeezes"]

_SQUEEZES = ("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")


def _shape(node: object) -> tuple[object, ...] | None:
    """The node's shape, a symbolic size (the batch) by its symbol, so that equal shapes compare
    equal without a guard."""
    val = getattr(node, "meta", {}).get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in val.shape)


def remove_noop_squeezes(gm: torch.fx.GraphModule, regions: RegionMap | None = None, plan: StepPlan | None = None) -> torch.fx.GraphModule:
    """Replace every squeeze whose output has its input's shape by that input."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or str(node.target) not in _SQUEEZES:
            continue
        src = node.args[0]
        a, b = _shape(node), _shape(src)
        if a is not None and a == b:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            n += 1
    counters["noop_squeezes_removed"] += n
    log.debug("removed %d no-op squeezes", n)
    return gm
