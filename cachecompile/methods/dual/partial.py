"""Partial-token recompute: run a token-wise region on its k top-scoring tokens only.

For each ``partial`` action of the plan (``methods.dual.Partial``) the pass

1. checks from the graph that the region is token-wise — every op acts on each token on its
   own (linear layers, activations, elementwise ops with per-channel parameters, norms and
   splits over the last dimension) and keeps the token dimension — and refuses any other
   region (attention mixes tokens) with :class:`PartialTokensError`;
2. computes the score (:mod:`cachecompile.methods.dual.scores`) and picks ``k = round(ratio × tokens)``
   tokens per sample with ``topk`` (k is a constant of the step graph: shapes stay static, as
   TensorRT and CUDA graphs need);
3. gathers those rows of the region's input(s) (``gather``), runs copies of the region's nodes
   on them, and scatters the k result rows into the cached output (``scatter``) — TopK,
   GatherElements and ScatterElements in ONNX;
4. uses the merged tensor downstream and writes it back to the region's cache slot (a slot always
   holds the most recently computed value). ``k == 0`` is a plain cache read.

The original full-token nodes lose their users and are removed by dead code removal.

Example (``dit`` a diffusers DiT)::

    import cachecompile as cc
    from cachecompile.passes import counters
    cached = cc.optimize(dit, cc.Schedule.toca(50, 3, fresh_ratio=0.25))
    cached(**inputs)                     # first call: capture, rewrite, run
    counters["partial_tokens"]           # one per block of each partial step plan
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any

import torch
import torch.fx

from cachecompile.methods.dual.schedule import tokens_to_recompute
from cachecompile.core.schedule import StepPlan
from cachecompile.passes import attr_value, counters
from cachecompile.passes.cache_io import add_cache_input, add_cache_output
from cachecompile.core.errors import RegionError
from cachecompile.core.regions import Region, RegionMap
from cachecompile.methods.dual.scores import insert_function, refresh_vals, same_size, score_node, update_staleness

log = logging.getLogger(__name__)

__all__ = [
    "PartialTokensError",
    "partial_tokens",
    "sink_token_scatters",
    "check_tokenwise",
    "top_tokens",
    "gather_tokens",
    "scatter_tokens",
]

aten = torch.ops.aten


class PartialTokensError(RegionError):
    """A partial action on a region that is not token-wise."""


# Ops that act on each token separately, as long as their tensor operands are token tensors or
# per-channel parameters (checked below). Keyed by overload packet: any overload qualifies.
_ELEMENTWISE = {
    aten.gelu, aten.relu, aten.silu, aten.sigmoid, aten.tanh, aten.erf, aten.exp, aten.neg, aten.abs,
    aten.sqrt, aten.rsqrt, aten.square, aten.clone, aten.contiguous, aten.alias, aten.detach,
    aten.dropout, aten._to_copy, aten.to, aten.hardswish, aten.hardsigmoid, aten.leaky_relu,
    aten.elu, aten.mish, aten.softplus, aten.clamp, aten.clamp_min, aten.clamp_max, aten.pow,
    aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.where,
}
_LAST_DIM_NORMS = {aten.layer_norm, aten.rms_norm}
_LAST_DIM_SPLITS = {aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split}
# Reductions and softmax over the channel dimension only (a hand-written RMSNorm, a gate).
_LAST_DIM_REDUCTIONS = {
    aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.linalg_vector_norm,
    aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax,
}


def _is_assert(node: torch.fx.Node) -> bool:
    return getattr(node.target, "__name__", "").startswith("_assert")


def _refuse(region: Region, node: torch.fx.Node, why: str, what: str = "node") -> PartialTokensError:
    op = f" ({node.target})" if what == "node" else ""
    return PartialTokensError(
        f"region {region.name} ({region.path}) is not token-wise, so its tokens cannot be recomputed "
        f"separately: {what} {node.name!r}{op} {why}. Partial recompute applies to "
        f"token-wise regions such as the MLP branch (blocks.<i>.mlp); reuse or compute this region instead"
    )


def _token_shaped(val: object, lead: tuple[Any, int]) -> bool:
    if isinstance(val, (tuple, list)):
        return all(_token_shaped(v, lead) for v in val)
    return (
        isinstance(val, torch.Tensor) and val.dim() >= 2
        and same_size(val.shape[0], lead[0]) and same_size(val.shape[1], lead[1])
    )


def check_tokenwise(gm: torch.fx.GraphModule, region: Region) -> tuple[Any, int]:
    """Return ``(batch, tokens)`` if every node of ``region`` acts per token; else raise
    :class:`PartialTokensError` naming the first node that mixes or reshapes tokens."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inputs = [nodes[i] for i in region.inputs]
    if not inputs:
        raise PartialTokensError(f"region {region.name} has no tensor input to gather tokens from")
    first = inputs[0].meta.get("val")
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        raise _refuse(region, inputs[0], "is not a [batch, tokens, ...] tensor", what="input")
    if not isinstance(first.shape[1], int):
        raise _refuse(region, inputs[0], "has a symbolic token dimension; partial recompute needs a static token count", what="input")
    lead = (first.shape[0], int(first.shape[1]))  # the batch may be symbolic
    tokenwise = set()
    for inp in inputs:
        if not _token_shaped(inp.meta.get("val"), lead):
            raise _refuse(region, inp, f"has shape {_shape(inp)}, not [{lead[0]}, {lead[1]}, ...] like {inputs[0].name!r}", what="input")
        tokenwise.add(inp)
    for node in gm.graph.nodes:
        if node.name not in region.nodes or _is_assert(node):
            continue
        _check_node(gm, region, node, tokenwise, lead)
        tokenwise.add(node)
    for out in region.outputs:
        if not _token_shaped(nodes[out].meta.get("val"), lead):
            raise _refuse(region, nodes[out], "produces an output that is not per token")
    return lead


def _check_node(gm: torch.fx.GraphModule, region: Region, node: torch.fx.Node, tokenwise: set, lead: tuple[int, int]) -> None:
    if node.op != "call_function":
        raise _refuse(region, node, f"is a {node.op}, not an op")
    if not _token_shaped(node.meta.get("val"), lead):
        raise _refuse(region, node, f"changes the token dimension (output {_shape(node)}, tokens are dim 1 of {list(lead)})")
    packet = getattr(node.target, "overloadpacket", node.target)
    operands = [a for a in node.all_input_nodes]
    if node.target is operator.getitem:
        if node.args[0] not in tokenwise:
            raise _refuse(region, node, "indexes a value that is not per token")
        return
    if packet is aten.linear:
        x, *params = node.args
        if x not in tokenwise or any(isinstance(p, torch.fx.Node) and p.op != "get_attr" for p in params):
            raise _refuse(region, node, "is a linear layer whose weights are not parameters")
        return
    if packet in _LAST_DIM_NORMS:
        if len(node.args[1]) != 1 or node.args[0] not in tokenwise:
            raise _refuse(region, node, "normalises over more than the last dimension")
    elif packet in _LAST_DIM_SPLITS:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim not in (-1, node.args[0].meta["val"].dim() - 1):
            raise _refuse(region, node, f"splits along dim {dim}, not the channel dimension")
    elif packet in _LAST_DIM_REDUCTIONS:
        last = node.args[0].meta["val"].dim() - 1
        dim = node.args[2] if packet is aten.linalg_vector_norm and len(node.args) > 2 else (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        dims = [dim] if isinstance(dim, int) else list(dim or [])
        if not dims or any(d not in (-1, last) for d in dims):
            raise _refuse(region, node, f"reduces over dim {dim}, not only the channel dimension")
    elif packet not in _ELEMENTWISE:
        raise _refuse(region, node, "is not a per-token op")
    for a in operands:
        if a in tokenwise:
            continue
        val = a.meta.get("val") if a.op != "get_attr" else attr_value(gm, a)
        if a.op == "get_attr" and isinstance(val, torch.Tensor) and val.dim() <= 1:
            continue  # per-channel parameter, broadcast over tokens
        raise _refuse(region, node, f"combines tokens with {a.name!r}, which is not per token or per channel")


def _shape(node: torch.fx.Node) -> object:
    v = node.meta.get("val")
    return list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


# --------------------------------------------------------------------------- the math


def top_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the k highest scores of each sample."""
    return torch.topk(score, k, dim=1).indices


def _expand_index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = (idx.shape[0], idx.shape[1]) + tuple(like.shape[2:])
    return idx.reshape(idx.shape + (1,) * (like.dim() - 2)).expand(shape)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ([B, k]) of ``x`` ([B, N, ...]) → [B, k, ...]."""
    return torch.gather(x, 1, _expand_index(idx, x))


def scatter_tokens(cache: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``cache`` ([B, N, ...]) with rows ``idx`` replaced by ``rows`` ([B, k, ...])."""
    return torch.scatter(cache, 1, _expand_index(idx, rows), rows)


# --------------------------------------------------------------------------- the pass


def _first_outside_user(gm: torch.fx.GraphModule, region: Region, outs: list[torch.fx.Node]) -> torch.fx.Node:
    users = {u for o in outs for u in o.users if u.name not in region.nodes}
    return next(n for n in gm.graph.nodes if n in users)


def _copy_region(gm: torch.fx.GraphModule, region: Region, env: dict, before: torch.fx.Node) -> dict:
    copies = []
    with gm.graph.inserting_before(before):
        for node in list(gm.graph.nodes):
            if node.name in region.nodes and not _is_assert(node) and node not in env:
                env[node] = gm.graph.node_copy(node, lambda a: env.get(a, a))
                copies.append(env[node])
    refresh_vals(gm, copies)
    return env


def partial_tokens(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Rewrite every ``partial`` action of ``plan`` into gather → region on k tokens → scatter."""
    for name, action in plan.actions:
        if action.kind != "partial":
            continue
        region = regions[name]
        batch, tokens = check_tokenwise(gm, region)
        nodes = {n.name: n for n in gm.graph.nodes}
        outs = [nodes[o] for o in region.outputs]
        device = outs[0].meta["val"].device
        before = _first_outside_user(gm, region, outs)
        cached = [add_cache_input(gm, region.slot(i), out) for i, out in enumerate(outs)]
        k = tokens_to_recompute(action.ratio, tokens)
        if k == 0:
            merged = cached
        else:
            score = score_node(gm, regions, name, action, batch, tokens, device, before, nodes[region.inputs[0]])
            idx = insert_function(gm, functools.partial(top_tokens, k=k), [score], before)
            env = {nodes[i]: insert_function(gm, gather_tokens, [nodes[i], idx], before) for i in region.inputs}
            env = _copy_region(gm, region, env, before)
            merged = [insert_function(gm, scatter_tokens, [c, idx, env[o]], before) for c, o in zip(cached, outs)]
            update_staleness(gm, name, action, idx, batch, tokens, device, before)
        for i, (out, m) in enumerate(zip(outs, merged)):
            out.replace_all_uses_with(m, delete_user_cb=lambda u: u.name not in region.nodes)
            if k > 0:
                add_cache_output(gm, region.slot(i), m)
        counters["partial_tokens"] += 1
        log.debug("partial %s: %d of %d tokens per sample", name, k, tokens)
    return gm


# --------------------------------------------------------------------------- after dead writes

_SCATTER = torch.ops.aten.scatter.src
_GATHER = torch.ops.aten.gather.default
_SINK_THROUGH = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.div.Tensor)


def _sinkable(scatter: torch.fx.Node) -> torch.fx.Node | None:
    """The one elementwise user of a token scatter that is not a graph output, if every other
    operand either broadcasts over tokens or has the scatter's shape (then it is gathered)."""
    if scatter.target != _SCATTER or scatter.args[1] != 1 or len(scatter.users) != 1:
        return None
    if scatter.args[2].meta["val"].shape != scatter.args[3].meta["val"].shape:
        return None  # rows beyond the index's extent are not scattered: no element-wise pairing
    (user,) = scatter.users
    shape = scatter.meta["val"].shape
    if user.target not in _SINK_THROUGH or user.kwargs or user.meta["val"].shape != shape:
        return None
    if user.meta["val"].dtype != scatter.meta["val"].dtype:
        return None
    for a in user.args:
        if a is scatter or not isinstance(a, torch.fx.Node):
            continue
        v = a.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.dim() > len(shape):
            return None
        token_axis = 1 - (len(shape) - v.dim())  # broadcasting aligns from the right
        if v.shape != shape and token_axis >= 0 and v.shape[token_axis] != 1:
            return None  # neither the scatter's shape nor broadcast over tokens
    return user


def sink_token_scatters(gm: torch.fx.GraphModule) -> int:
    """Move a partial recompute's scatter below the elementwise ops that consume it.

    ``h = gate * scatter(cache, idx, rows) + x`` becomes ``scatter(gate * cache + x, idx,
    gate * rows + gather(x, idx))``: the same arithmetic per element, but the all-token pass
    reads the cache once and writes ``h`` once, instead of first copying the cache into an
    updated one that is then read again. Only where the updated cache is not itself a graph
    output (a cache write no step reads is dropped first: :mod:`cachecompile.passes.dead_writes`).
    Returns how many elementwise ops the scatters moved below.
    """
    moved = 0
    work = [n for n in gm.graph.nodes if n.target == _SCATTER]
    while work:
        scatter = work.pop()
        user = _sinkable(scatter)
        if user is None:
            continue
        base, _, index, rows = scatter.args
        shape = scatter.meta["val"].shape
        new: list[torch.fx.Node] = []
        with gm.graph.inserting_before(user):
            row_args = []
            for a in user.args:
                if a is scatter:
                    row_args.append(rows)
                elif isinstance(a, torch.fx.Node) and a.meta["val"].shape == shape:
                    new.append(gm.graph.call_function(_GATHER, (a, 1, index)))
                    row_args.append(new[-1])
                else:
                    row_args.append(a)
            new.append(gm.graph.call_function(user.target, tuple(base if a is scatter else a for a in user.args)))
            all_tokens = new[-1]
            new.append(gm.graph.call_function(user.target, tuple(row_args)))
            new_rows = new[-1]
            new.append(gm.graph.call_function(_SCATTER, (all_tokens, 1, index, new_rows)))
        moved_scatter = new[-1]
        for n in new:
            n.meta["nn_module_stack"] = user.meta.get("nn_module_stack", {})
        refresh_vals(gm, new)
        user.replace_all_uses_with(moved_scatter)
        gm.graph.erase_node(user)
        gm.graph.erase_node(scatter)
        work.append(moved_scatter)
        moved += 1
    counters["scatters_sunk"] += moved
    return moved
