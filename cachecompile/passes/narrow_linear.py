"""Compute only the used chunks of a chunked linear.

adaLN modulation computes all of a block's shift/scale/gate vectors in one linear and chunks
it: ``linear(emb, W[6D, E]).chunk(6, dim=-1)``. On a step where a block's attention and MLP
are read from the cache, only the two gates are still used, yet the whole linear would run:
with the small batch of a sampling step that linear is bound by reading ``W``, so two thirds of
the weight traffic of a cached step would be for values nobody reads. This pass replaces such
a linear by one linear per run of consecutive used chunks, over a row slice of ``W`` and ``b``
(views: no weight is copied). Each output element is the same dot product as before.

Runs after dead code removal, so that only the chunks a step graph really reads are kept.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from cachecompile.core.schedule import StepPlan
from cachecompile.passes import counters
from cachecompile.core.regions import RegionMap

log = logging.getLogger(__name__)

__all__ = ["narrow_chunked_linears"]

_LINEAR = torch.ops.aten.linear.default
_CHUNK = torch.ops.aten.chunk.default
_SLICE = torch.ops.aten.slice.Tensor


def _val(node: object) -> torch.Tensor | None:
    val = getattr(node, "meta", {}).get("val")
    return val if isinstance(val, torch.Tensor) else None


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """``[0, 1, 3]`` → ``[(0, 2), (3, 4)]`` (half-open runs of consecutive indices)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _candidate(lin: torch.fx.Node) -> tuple[torch.fx.Node, int, dict[int, list[torch.fx.Node]]] | None:
    """(chunk node, chunk size, used index → getitem nodes) when ``lin`` can be narrowed."""
    if len(lin.users) != 1:
        return None
    (chunk,) = lin.users
    if chunk.op != "call_function" or chunk.target is not _CHUNK:
        return None
    out = _val(lin)
    if out is None or chunk.args[0] is not lin:
        return None
    n = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    features = out.shape[-1]
    if not isinstance(n, int) or dim not in (-1, out.dim() - 1) or not isinstance(features, int) or features % n:
        return None
    used: dict[int, list[torch.fx.Node]] = {}
    for user in chunk.users:
        if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int):
            return None
        used.setdefault(user.args[1] % n, []).append(user)
    if not used or len(used) == n:
        return None
    return chunk, features // n, used


def narrow_chunked_linears(
    gm: torch.fx.GraphModule, regions: RegionMap | None = None, plan: StepPlan | None = None
) -> torch.fx.GraphModule:
    """Replace ``linear(x, W, b).chunk(n, -1)`` of which some chunks are unused by linears over
    the row slices of ``W``/``b`` that produce the used chunks only."""
    graph = gm.graph
    narrowed = 0
    for lin in list(graph.nodes):
        if lin.op != "call_function" or lin.target is not _LINEAR:
            continue
        found = _candidate(lin)
        if found is None:
            continue
        chunk, size, used = found
        x, weight = lin.args[0], lin.args[1]
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        with graph.inserting_before(chunk):
            for start, stop in _runs(sorted(used)):
                w = graph.call_function(_SLICE, (weight, 0, start * size, stop * size))
                b = graph.call_function(_SLICE, (bias, 0, start * size, stop * size)) if bias is not None else None
                new = graph.call_function(_LINEAR, (x, w, b))
                new.meta.update({k: v for k, v in lin.meta.items() if k != "val"})
                piece = _val(used[start][0])
                if piece is not None:
                    new.meta["val"] = piece.new_empty(piece.shape[:-1] + (size * (stop - start),))
                if stop - start == 1:
                    for g in used[start]:
                        g.replace_all_uses_with(new)
                    continue
                sub = graph.call_function(_CHUNK, (new, stop - start, -1))
                sub.meta.update({k: v for k, v in chunk.meta.items() if k != "val"})
                for i in range(start, stop):
                    for g in used.get(i, []):
                        with graph.inserting_after(sub):
                            item = graph.call_function(operator.getitem, (sub, i - start))
                        item.meta.update(g.meta)
                        g.replace_all_uses_with(item)
        for nodes in used.values():
            for g in nodes:
                graph.erase_node(g)
        graph.erase_node(chunk)
        graph.erase_node(lin)
        narrowed += 1
    counters["linears_narrowed"] += narrowed
    log.debug("narrowed %d chunked linears", narrowed)
    return gm
