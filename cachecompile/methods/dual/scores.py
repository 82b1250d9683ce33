"""Token scores for partial recompute, computed inside the step graph.

A partial action (``methods.dual.Partial``) recomputes the top-k tokens of a region by a score
of shape ``[batch, tokens]`` (higher = recomputed). Scores:

* ``v_norm`` (DuCa's V-caching): from the value vectors of the block's attention at the most
  recent step that computed that attention. At such steps this pass writes the per-token
  ``Σ_heads ‖v_h‖₂`` (the L2 norm of each head's value vector, summed over heads) to the cache
  slot ``blocks.<i>.attn@v_norm``; the attention itself stays one fused
  ``scaled_dot_product_attention``. The score is ``normalize(Σ_h (1 − ‖v_h‖))`` over tokens,
  so **tokens with the smallest value norms are recomputed**. Why this direction and reduction:
  it is what DuCa's public code does (``DuCa-DiT/cache_functions/scores.py: kv_norm_score``:
  ``v_norm = torch.norm(v, dim=-1)`` per head, ``score = normalize((1 − v_norm).sum(heads))``,
  then the highest scores are recomputed); the paper's text (arXiv 2412.18911) only says V-caching
  scores tokens from the value matrix and keeps flash attention, and its v2 goes further and
  finds that "important" tokens are often no better than random ones. Use ``"-1*v_norm"`` for
  the opposite direction.
* ``attention`` (ToCa's s1): the attention each token *receives*, ``Σ_queries mean_heads
  softmax(q kᵀ · scale)``, L2-normalised over tokens (as ToCa's ``attn_score``), written to
  ``blocks.<i>.attn@attention`` at steps that compute the attention. **Cost**: an explicit
  softmax path next to the fused attention of that block, at every step that computes it:
  ``2·B·H·N²·d`` FLOPs for ``q kᵀ`` plus a softmax over ``B·H·N²`` elements, and a ``B·H·N²``
  temporary (the fused kernel never materialises it). The attention output itself still comes
  from the fused kernel, so numerics do not change.
* ``random``: a reproducible pseudo-random number in [0, 1) per token from an integer hash of
  (seed, step index, token index) inside the graph; the step index is a per-step graph input
  (``step``), so the number of step graphs does not grow. The same for every sample of a batch
  (as DuCa keeps the same random tokens for the conditional and unconditional CFG halves), so
  it also agrees between batched CFG and two calls per step.
* ``staleness`` (ToCa's cache-frequency term s3): steps since each token was last recomputed.
  The slot ``blocks.<i>.mlp@staleness`` holds, per token, the step index at which it was last
  recomputed (stamped by full computes, re-stamped for the picked tokens by partial steps), and
  the score is ``step − stamp`` — so steps where the region did not run at all (DuCa's
  aggressive steps) count too, without those step graphs touching the slot.
* A weighted sum of these (``"v_norm+0.25*staleness"``). ToCa's ``λ₃ · cache_index / N`` with
  λ₃ = 0.25 and interval N is ``0.25/N * staleness`` here.

Scores are per sample: with classifier-free guidance as one batched call, every row of the CFG
batch picks its own top-k tokens (a batch-wise gather), except ``random``, see above.

The math is written as plain eager functions (:func:`v_norm_state`, :func:`v_norm_score` ...)
and inlined into the graph with ``make_fx``: what the unit tests check is what the graph runs.
"""

from __future__ import annotations

import functools
import logging
import math
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from cachecompile.core.schedule import StepPlan
from cachecompile.passes import attr_value, counters
from cachecompile.methods.dual.schedule import STEP_INPUT
from cachecompile.passes.cache_io import add_cache_input, add_cache_output, add_step_input, cache_io
from cachecompile.core.errors import RegionError
from cachecompile.core.regions import Region, RegionMap

log = logging.getLogger(__name__)

__all__ = [
    "TokenScoreError",
    "record_token_state",
    "score_node",
    "update_staleness",
    "state_slot",
    "insert_function",
    "refresh_vals",
    "v_norm_state",
    "attention_state",
    "v_norm_score",
    "attention_score",
    "random_score",
    "staleness_score",
    "weighted_sum",
    "STEP_INPUT",
]

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_ATTENTION_STATE = ("attention", "v_norm")
_P = 2147483647  # 2^31 − 1 (prime): the random hash stays in int64 without overflow


class TokenScoreError(RegionError):
    """A token score cannot be computed for this model or region."""


def state_slot(region: str, state: str) -> str:
    """Cache slot of a region's extra state: ``blocks.0.attn@v_norm``."""
    return f"{region}@{state}"


# --------------------------------------------------------------------------- the math


def v_norm_state(v: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d]`` attention values → ``[B, N]``: per-head L2 norms summed over heads."""
    return torch.linalg.vector_norm(v, dim=-1).sum(dim=1)


def attention_state(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, H, N, d]`` queries and keys → ``[B, N]``: the attention each token receives,
    averaged over heads and summed over queries (ToCa's self-attention score before normalising)."""
    probs = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
    return probs.mean(dim=1).sum(dim=1)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # F.normalize(x, p=2, dim=1), spelled out so the graph holds plain ops.
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def v_norm_score(state: torch.Tensor, heads: int) -> torch.Tensor:
    """DuCa's V-caching score from :func:`v_norm_state`: ``normalize(Σ_h (1 − ‖v_h‖))``;
    the smallest value norms score highest."""
    return _l2_normalize(heads - state)


def attention_score(state: torch.Tensor) -> torch.Tensor:
    """ToCa's attention score from :func:`attention_state`: the most attended tokens score highest."""
    return _l2_normalize(state)


def random_score(step: torch.Tensor, like: torch.Tensor, seed: int) -> torch.Tensor:
    """Pseudo-random ``[batch, tokens]`` in [0, 1) from (seed, step, token), shaped like the
    first two dimensions of ``like``; the same row for every sample. Integer-only (int64
    multiply / add / remainder, all below 2⁶²), so every backend computes the same bits."""
    batch, tokens = like.shape[0], like.shape[1]
    tok = torch.arange(tokens, dtype=torch.int64, device=step.device)
    key = (step.to(torch.int64) * 7919 + (seed * 1000003 + 12345) % _P) % _P
    h = ((tok + 1) * 48271 + key) % _P
    h = (h * h + 1013904223) % _P  # squaring mixes: an affine map alone keeps tokens in order
    h = (h * 16807 + key) % _P
    h = (h * h + 12345) % _P
    u = (h % 16777216).to(torch.float32) / 16777216.0  # 24 bits: exact in float32
    return u.unsqueeze(0).expand(batch, tokens)


def staleness_score(stamp: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Steps since each token was last recomputed, from the per-token step stamps."""
    return step.to(stamp.dtype) - stamp


def stamp_all(step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The staleness slot after a full compute: every token (the first two dimensions of
    ``like``, a ``[batch, tokens, ...]`` value) stamped with this step."""
    return torch.zeros(like.shape[:2], dtype=torch.float32, device=step.device) + step.to(torch.float32)


def restamp(stamp: torch.Tensor, idx: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The staleness slot after a partial step: the recomputed tokens ``idx`` stamped with this step."""
    return stamp.scatter(1, idx, step.to(stamp.dtype).expand(idx.shape))


def weighted_sum(*terms: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    out = terms[0] * weights[0]
    for t, w in zip(terms[1:], weights[1:]):
        out = out + t * w
    return out


# --------------------------------------------------------------------------- graph helpers


def _fake_mode(gm: torch.fx.GraphModule) -> Any:
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


def _fake_like(gm: torch.fx.GraphModule, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with _fake_mode(gm):
        return torch.empty(tuple(shape), dtype=dtype, device=device)


def refresh_vals(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node]) -> None:
    """Recompute ``meta["val"]`` of ``nodes`` (in order) with the graph's fake tensor mode."""
    from torch._subclasses.fake_tensor import FakeTensor

    mode = _fake_mode(gm)
    params: dict[str, torch.Tensor] = {}

    def val(a: torch.fx.Node) -> Any:
        if a.op == "get_attr":
            if a.target not in params:
                params[a.target] = mode.from_tensor(attr_value(gm, a))
            return params[a.target]
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
            v = mode.from_tensor(v)
        return v

    for n in nodes:
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), val)
        with mode:
            n.meta["val"] = n.target(*args, **kwargs)


def _example(node: torch.fx.Node) -> torch.Tensor:
    # Same strides as the graph value: make_fx turns reshapes of contiguous examples into views,
    # which would fail on the transposed q / k that attention gets. A symbolic size (the batch)
    # takes its example value; the symbolic trace keeps it a size.
    v = node.meta["val"]
    hint = lambda dims: tuple(optimization_hint(d) for d in dims)  # noqa: E731
    return torch.empty_strided(hint(v.shape), hint(v.stride()), dtype=v.dtype, device=v.device).zero_()


def insert_function(
    gm: torch.fx.GraphModule, fn: Callable[..., Any], args: Sequence[torch.fx.Node], before: torch.fx.Node
) -> Any:
    """Trace the eager function ``fn(*tensors)`` to ATen ops (``make_fx``, fake tensors) and
    insert its nodes before ``before``, fed by the graph nodes ``args``. Returns the node (or
    tuple of nodes) standing for ``fn``'s result. Bind non-tensor arguments with
    ``functools.partial``; they become constants of the graph (static per step plan). Sizes are
    traced symbolically: a shape ``fn`` takes from its inputs (the batch) stays the input's."""
    with torch.no_grad():
        sub = make_fx(fn, tracing_mode="symbolic")(*[_example(a) for a in args])
    env: dict[torch.fx.Node, Any] = {}
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env.update(zip(phs, args))
    new: list[torch.fx.Node] = []
    result: Any = None
    with gm.graph.inserting_before(before):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = torch.fx.node.map_arg(n.args[0], env.__getitem__)
                continue
            if n.op == "get_attr":
                raise TypeError(f"{getattr(fn, '__name__', fn)} creates a tensor constant; build it from an input instead")
            c = gm.graph.node_copy(n, env.__getitem__)
            c.meta.pop("val", None)
            env[n] = c
            new.append(c)
    refresh_vals(gm, new)
    return result


def _step_node(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.Node:
    io = cache_io(gm)
    if STEP_INPUT in io.step_inputs:
        return {n.name: n for n in gm.graph.nodes}[io.placeholders[STEP_INPUT]]
    return add_step_input(gm, STEP_INPUT, _fake_like(gm, (), torch.int64, device))


def _state_node(gm: torch.fx.GraphModule, slot: str, batch: int, tokens: int, device: torch.device) -> torch.fx.Node:
    """This step's freshly recorded state for ``slot`` if there is one, else a cache read."""
    io = cache_io(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    fresh = gm.meta.get("token_state", {}).get(slot)  # noted by record_token_state
    if fresh is not None:
        return nodes[fresh]
    if slot in io.cache_inputs:
        return nodes[io.placeholders[slot]]
    like = SimpleNamespace(meta={"val": _fake_like(gm, (batch, tokens), torch.float32, device)})
    return add_cache_input(gm, slot, like)  # type: ignore[arg-type]


def _sdpa(gm: torch.fx.GraphModule, region: Region, score: str) -> tuple[torch.fx.Node, dict[str, Any]]:
    found = [n for n in gm.graph.nodes if n.name in region.nodes and n.target == SDPA]
    if len(found) != 1:
        raise TokenScoreError(
            f"score {score!r} needs exactly one scaled_dot_product_attention in {region.name} "
            f"({region.path}), found {len(found)}; use score='random' or 'staleness' for this model"
        )
    node = found[0]
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return node, bound


# --------------------------------------------------------------------------- the pass


def _attention_state_node(gm: torch.fx.GraphModule, region: Region, state: str) -> torch.fx.Node:
    node, a = _sdpa(gm, region, state)
    if state == "v_norm":
        return insert_function(gm, v_norm_state, [a["value"]], node.next)
    if a.get("attn_mask") is not None or a.get("is_causal") or a.get("enable_gqa"):
        raise TokenScoreError(
            f"score 'attention' supports plain self-attention; {region.name} uses a mask, causal "
            f"attention or grouped-query attention. Use score='v_norm' or 'random'"
        )
    q, k = a["query"], a["key"]
    scale = a.get("scale") or 1.0 / math.sqrt(q.meta["val"].shape[-1])
    return insert_function(gm, functools.partial(attention_state, scale=scale), [q, k], node.next)


def record_token_state(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Write the state that later partial steps score tokens by: at every region the plan
    computes with a ``Record`` action, ``v_norm`` / ``attention`` (attention regions) and
    ``staleness`` stamps (partial regions) become cache writes ``<region>@<state>``."""
    n = 0
    for name, action in plan.actions:
        if action.kind != "compute":
            continue
        for state in getattr(action, "state", ()):
            region = regions[name]
            if state in _ATTENTION_STATE:
                node = _attention_state_node(gm, region, state)
            elif state == "staleness":
                nodes = {x.name: x for x in gm.graph.nodes}
                out = nodes[region.outputs[0]]
                step = _step_node(gm, out.meta["val"].device)
                node = insert_function(gm, stamp_all, [step, out], out.next)
            else:
                continue  # e.g. the stack's "residual": cachecompile.methods.dual.stack
            slot = state_slot(name, state)
            add_cache_output(gm, slot, node)
            gm.meta.setdefault("token_state", {})[slot] = node.name
            n += 1
    counters["token_state_writes"] += n
    log.debug("recorded %d token states", n)
    return gm


def same_size(a: Any, b: Any) -> bool:
    """Two sizes are the same: equal integers, or the same symbol (the dynamic batch)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _check_state_shape(shape: tuple, slot: str, batch: Any, tokens: int) -> None:
    if len(shape) != 2 or not (same_size(shape[0], batch) and same_size(shape[1], tokens)):
        hint = lambda d: d if isinstance(d, int) else optimization_hint(d)  # noqa: E731  (the captured batch)
        raise TokenScoreError(
            f"{slot} has shape {tuple(map(hint, shape))} but the partial region has {hint(batch)} samples × "
            f"{hint(tokens)} tokens "
            f"(the attention attends over other tokens than the MLP sees, e.g. joint text+image "
            f"attention, or under context parallelism the whole sequence while the MLP sees this rank's "
            f"shard); use score='random' or 'staleness' for this model"
        )


def score_node(
    gm: torch.fx.GraphModule,
    regions: RegionMap,
    region_name: str,
    action: Any,
    batch: Any,
    tokens: int,
    device: torch.device,
    before: torch.fx.Node,
    like: torch.fx.Node,
) -> torch.fx.Node:
    """The ``[batch, tokens]`` score of ``action`` (a partial action) for region ``region_name``,
    inserted before ``before``; reads the recorded state it needs from the cache. ``like`` is a
    ``[batch, tokens, ...]`` value of the region (a score made from scratch takes its shape)."""
    block = ".".join(region_name.split(".")[:2])
    terms: list[torch.fx.Node] = []
    weights: list[float] = []
    for name, weight in action.score:
        if name in _ATTENTION_STATE:
            attn = f"{block}.attn"
            _, a = _sdpa(gm, regions[attn], name)
            # The recorded state has one entry per attended token: check it against the partial
            # region's tokens from the attention itself, since a cache read is typed from them.
            value = a["value"].meta["val"]  # [B, H, N, d]
            _check_state_shape((value.shape[0], value.shape[2]), state_slot(attn, name), batch, tokens)
            state = _state_node(gm, state_slot(attn, name), batch, tokens, device)
            _check_state_shape(tuple(state.meta["val"].shape), state_slot(attn, name), batch, tokens)
            if name == "v_norm":
                fn: Callable[..., Any] = functools.partial(v_norm_score, heads=int(value.shape[1]))
            else:
                fn = attention_score
            term = insert_function(gm, fn, [state], before)
        elif name == "random":
            step = _step_node(gm, device)
            fn = functools.partial(random_score, seed=action.seed)
            term = insert_function(gm, fn, [step, like], before)
        elif name == "staleness":
            stamp = _state_node(gm, state_slot(region_name, "staleness"), batch, tokens, device)
            term = insert_function(gm, staleness_score, [stamp, _step_node(gm, device)], before)
        else:
            raise TokenScoreError(f"unknown token score {name!r}")
        terms.append(term)
        weights.append(weight)
    if len(terms) == 1 and weights[0] == 1.0:
        return terms[0]
    return insert_function(gm, functools.partial(weighted_sum, weights=tuple(weights)), terms, before)


def update_staleness(
    gm: torch.fx.GraphModule, region_name: str, action: Any, idx: torch.fx.Node, batch: int, tokens: int, device: torch.device, before: torch.fx.Node
) -> None:
    """After a partial step picked ``idx``: re-stamp those tokens and write the slot (when the
    region's staleness is tracked: this step's score uses it, or another step's does)."""
    if not action.stamps:
        return
    slot = state_slot(region_name, "staleness")
    stamp = _state_node(gm, slot, batch, tokens, device)
    new = insert_function(gm, restamp, [stamp, idx, _step_node(gm, device)], before)
    add_cache_output(gm, slot, new)
    counters["token_state_writes"] += 1
