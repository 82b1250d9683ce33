"""An independent reference interpreter of cachecompile's schedule semantics, in plain eager code.

It runs a copy of a diffusers transformer whose block and branch modules have their ``forward``
replaced by wrappers that compute, reuse, partially recompute or forecast, step by step, as the
methods are defined (README, DESIGN.md, the docstrings of ``methods/``). It reads the schedule's
*data* (method, params, mask, explicit steps, compensation fields) and never calls
``Schedule.resolve``, a plan, a region map or a graph pass: which regions a step reuses, which
regions a compensation corrects, the token scores, top-k, and the GOC / Taylor / EOC formulas
are all written here again.

Semantics interpreted (step ``s`` counts calls from 0; a "region" is ``blocks.<i>.<kind>``,
``blocks.<i>`` or ``stack``):

* FORA: ``s % N == 0`` computes all, else every branch module returns its last output.
* mask: ``mask[s][b][k] == 0`` reuses branch ``k`` of block ``b``.
* ToCa: non-full steps reuse every branch but ``mlp``, which recomputes the top
  ``k = floor(ratio·tokens + ½)`` tokens per sample (ratio 0: plain reuse).
* DuCa: ``s % N`` odd is a ToCa step, even (≠ 0) reuses the whole stack: ``output`` returns the
  stack's last output, ``residual`` this step's stack input + (last output − last input).
* explicit: per step ``{region: compute | reuse | partial | residual}``.
* A region inside a reused block or stack does not run; a slot holds the region's most recently
  computed value (a partial step writes the merged tensor).
* Scores: ``v_norm`` = L2-normalise over tokens of (H − Σ_h ‖v_h‖) from the block's attention
  values at its last full compute; ``attention`` = L2-normalise of Σ_queries mean_heads
  softmax(q kᵀ · scale); ``random`` = the integer hash of (seed, step, token) in
  ``methods/dual/scores.py``'s docstring, the same row for every sample; ``staleness`` = step −
  the step each token was last recomputed.
* Compensation corrects the regions reused at least once and otherwise only computed, never
  inside a reused block or stack: GOC used-value queue ``u = u₁ + w(u₁ − u₂)`` (weight 0 until two
  values were used, at skip steps and outside ``steps``); GOC computed queue ``u = F₀ +
  w·n·(F₀ − F₁)/(c₀ − c₁)`` with ``n`` the applying steps after ``c₀``; Taylor: the Lagrange
  polynomial through the last ``order + 1`` computed values at step ``s``; EOC ``u = F₀ ⊙ (1 +
  θ·E[s])`` at judged steps of regions with a prior.

What a schedule cannot run (a read before any compute, a score whose state no earlier full step
recorded, a compensation with nothing to correct) raises :class:`Refused`; cachecompile must then
refuse the schedule too (``ScheduleError``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tests.fuzz.families import Family

_P = 2147483647


class Refused(Exception):
    """The schedule cannot be run as defined (cachecompile must refuse it as well)."""


# --------------------------------------------------------------------------- which action, when


def _ratio(fresh: Any, step: int, block: int) -> float:
    if isinstance(fresh, (int, float)):
        return float(fresh)
    if isinstance(fresh[0], (list, tuple)):
        return float(fresh[step][block])
    return float(fresh[block])


def _conservative(params: dict, fam: Family, step: int) -> dict:
    score = dict(params["score"])
    acts = {}
    for b in range(fam.num_blocks):
        for kind in fam.kinds(b):
            region = f"blocks.{b}.{kind}"
            if kind != "mlp":
                acts[region] = ("reuse",)
            else:
                r = _ratio(params["fresh_ratio"], step, b)
                acts[region] = ("partial", r, score, params["seed"]) if r > 0 else ("reuse",)
    return acts


def _explicit_action(a: Any) -> tuple:
    kind = a.to_json() if isinstance(a.to_json(), str) else a.to_json()["kind"]
    if kind == "partial":
        return ("partial", a.ratio, dict(a.score), a.seed)
    if kind in ("compute", "reuse", "residual"):
        return (kind,)
    raise ValueError(f"the reference does not interpret explicit action {kind!r}")


def step_actions(schedule: Any, fam: Family) -> list[dict[str, tuple]]:
    """One ``{region: action}`` per step from the schedule's data (regions not named compute)."""
    p, n = dict(schedule.params), schedule.num_steps
    m = schedule.method
    if m == "fora":
        return [{} if s % p["interval"] == 0 else {r: ("reuse",) for r in fam.branch_regions()} for s in range(n)]
    if m == "mask":
        out = []
        for row in schedule.mask:
            out.append({f"blocks.{b}.{k}": ("reuse",) for b, flags in enumerate(row) for k, f in zip(p["branches"], flags) if not f})
        return out
    if m == "explicit":
        return [{r: _explicit_action(a) for r, a in step} for step in schedule.steps]
    if m == "toca":
        return [{} if s % p["interval"] == 0 else _conservative(p, fam, s) for s in range(n)]
    if m == "duca":
        out = []
        for s in range(n):
            r = s % p["interval"]
            if r == 0:
                out.append({})
            elif r % 2:
                out.append(_conservative(p, fam, s))
            else:
                out.append({"stack": ("residual",) if p["aggressive_reuse"] == "residual" else ("reuse",)})
        return out
    raise ValueError(f"the reference does not interpret method {m!r}")


def _skipped(region: str, acts: dict) -> bool:
    """The region does not run at this step because its block or the stack is not computed."""
    if not region.startswith("blocks."):
        return False
    if acts.get("stack", ("compute",))[0] != "compute":
        return True
    block = ".".join(region.split(".")[:2])
    return region != block and acts.get(block, ("compute",))[0] != "compute"


def compensable(actions: list[dict]) -> list[str]:
    """Regions reused at least once (where they are not skipped) and otherwise only computed,
    never inside a reused block or stack."""
    regions = {r for acts in actions for r in acts}
    out = []
    for r in sorted(regions):
        reused = any(acts.get(r, ("compute",))[0] == "reuse" and not _skipped(r, acts) for acts in actions)
        clean = all(acts.get(r, ("compute",))[0] in ("compute", "reuse") and not _skipped(r, acts) for acts in actions)
        if reused and clean:
            out.append(r)
    return out


# --------------------------------------------------------------------------- scores


def random_row(step: int, tokens: int, seed: int) -> torch.Tensor:
    """The ``random`` score of one sample, [tokens] in [0, 1), from the documented integer hash."""
    tok = torch.arange(tokens, dtype=torch.int64)
    key = (step * 7919 + (seed * 1000003 + 12345) % _P) % _P
    h = ((tok + 1) * 48271 + key) % _P
    h = (h * h + 1013904223) % _P
    h = (h * 16807 + key) % _P
    h = (h * h + 12345) % _P
    return (h % 16777216).to(torch.float32) / 16777216.0


class _SdpaRecorder(TorchFunctionMode):
    """Records the query, key, value and scale of every scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
            bound = {**dict(zip(names, args)), **kwargs}
            q = bound["query"]
            self.calls.append((q, bound["key"], bound["value"], bound.get("scale") or 1.0 / math.sqrt(q.shape[-1])))
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- the interpreter


def _map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, v) for v in value)
    return value


def _zip_map(fn, *values):
    first = values[0]
    if isinstance(first, torch.Tensor):
        return fn(*values)
    if isinstance(first, (tuple, list)):
        return type(first)(_zip_map(fn, *vs) for vs in zip(*values))
    return first


class Reference:
    """A copy of ``model`` that follows a schedule's semantics. ``start(schedule)`` begins a
    generation (all state cleared); each call is one step. Without a schedule it is the model."""

    def __init__(self, model: torch.nn.Module, fam: Family) -> None:
        self.model = copy.deepcopy(model)
        self.fam = fam
        self.actions: list[dict] | None = None
        self.stats = {"reuse": 0, "partial": 0, "forecast": 0, "stack": 0}
        blocks = [self.model.get_submodule(p) for p in fam.blocks]
        for i, block in enumerate(blocks):
            for kind, sub in fam.branches[i]:
                module = block.get_submodule(sub)
                module.forward = self._wrap_branch(f"blocks.{i}.{kind}", kind, module.forward)
            block.forward = self._wrap_block(i, block.forward)

    # ----------------------------------------------------------------- generation
    def start(self, schedule: Any) -> None:
        self.schedule = schedule
        self.actions = step_actions(schedule, self.fam)
        self.step = 0
        self.cache: dict[str, Any] = {}
        self.attn_state: dict[str, dict[str, torch.Tensor]] = {}
        self.stamps: dict[str, torch.Tensor] = {}
        self.used: dict[str, list] = {}
        self.computed: dict[str, list] = {}
        self.stack_in = self.stack_delta = self.stack_in_now = None
        self.comp = schedule.compensation
        self.ambiguous = False
        self.stats = dict.fromkeys(self.stats, 0)
        self.forecast: set[str] = set()
        if self.comp is not None:
            regions = compensable(self.actions)
            if self.comp.kind == "eoc":
                priors = dict(self.comp.prior or ())
                regions = [r for r in regions if any(k == r or k.startswith(r + "#") for k in priors)]
            if not regions:
                raise Refused(f"{self.comp.kind} has nothing to compensate")
            self.forecast = set(regions)

    @property
    def cached_anything(self) -> bool:
        """Whether this generation reused, partially recomputed or forecast anything."""
        return any(self.stats.values())

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if self.actions is not None:
            self.step += 1
        return out

    def _action(self, region: str) -> tuple:
        if self.actions is None:
            return ("compute",)
        a = self.actions[self.step].get(region, ("compute",))
        if a[0] == "reuse" and region in self.forecast:
            return ("forecast",)
        return a

    # ----------------------------------------------------------------- compensation
    def _applies(self, region: str, step: int) -> bool:
        c = self.comp
        skips = dict(c.skip_steps).get(region, ()) if c.per_region else c.skip_steps
        return step not in skips and (c.steps is None or step in c.steps)

    def _remember(self, region: str, value: Any) -> None:
        """A computed value of a compensated region (its history)."""
        if region in self.forecast:
            self.computed.setdefault(region, []).append((self.step, value))
            self.used.setdefault(region, []).append(value)

    def _forecast(self, region: str) -> Any:
        c, s = self.comp, self.step
        self.stats["forecast"] += 1
        computed = self.computed.get(region)
        if not computed:
            raise Refused(f"{region} forecast before any compute")
        c0, f0 = computed[-1]
        if c.kind == "goc" and c.queue == "used":
            used = self.used[region]
            u1 = used[-1]
            if len(used) >= 2 and self._applies(region, s):
                u2, w = used[-2], c.weight
                value = _zip_map(lambda a, b: a + w * (a - b), u1, u2)
            else:
                value = u1
            used.append(value)
            return value
        if c.kind == "goc":
            if len(computed) < 2:
                return f0
            c1, f1 = computed[-2]
            n = sum(self._applies(region, t) for t in range(c0 + 1, s + 1))
            coef = c.weight * n / (c0 - c1)
            return _zip_map(lambda a, b: a + coef * (a - b), f0, f1)
        if c.kind == "taylor":
            points = computed[-(c.order + 1):]
            weights = []
            for i, (ci, _) in enumerate(points):
                w = 1.0
                for j, (cj, _) in enumerate(points):
                    if j != i:
                        w *= (s - cj) / (ci - cj)
                weights.append(w)
            return _zip_map(lambda *fs: sum(w * f for w, f in zip(weights, fs)), *[f for _, f in points])
        if c.kind == "eoc":
            judged = None if c.judged is None else dict(c.judged).get(region, ())
            if judged is not None and s not in judged:
                return f0
            priors = dict(c.prior)
            table = priors.get(region)
            if table is None:
                table = next(t for k, t in sorted(priors.items()) if k.startswith(region + "#"))
            trend = table.tensor()[s]
            return _map(lambda f: f * (1 + c.theta * trend.to(f.dtype)), f0)
        raise ValueError(c.kind)

    # ----------------------------------------------------------------- branches
    def _wrap_branch(self, region: str, kind: str, forward):
        def run(*args, **kwargs):
            a = self._action(region)
            if a[0] == "compute":
                if kind == "attn" and self.actions is not None:
                    with _SdpaRecorder() as rec:
                        out = forward(*args, **kwargs)
                    self._record_attention(region, rec)
                else:
                    out = forward(*args, **kwargs)
                if self.actions is not None:
                    self.cache[region] = out
                    self._stamp_all(region, out)
                    self._remember(region, out)
                return out
            if region not in self.cache:
                raise Refused(f"step {self.step} reads {region} before any step computed it")
            if a[0] == "reuse":
                self.stats["reuse"] += 1
                return self.cache[region]
            if a[0] == "forecast":
                return self._forecast(region)
            if a[0] == "partial":
                return self._partial(region, forward, args, kwargs, *a[1:])
            raise ValueError(f"action {a} on branch {region}")

        return run

    def _record_attention(self, region: str, rec: _SdpaRecorder) -> None:
        if len(rec.calls) != 1:
            self.attn_state.pop(region, None)  # no state this family's scores can use
            return
        q, k, v, scale = rec.calls[0]
        heads = v.shape[1]
        state = {"v_norm": heads - v.norm(dim=-1).sum(dim=1)}
        probs = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
        state["attention"] = probs.mean(dim=1).sum(dim=1)
        self.attn_state[region] = state

    def _stamp_all(self, region: str, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() >= 2:
            self.stamps[region] = torch.full(out.shape[:2], float(self.step))

    def _score(self, region: str, score: dict, seed: int, batch: int, tokens: int) -> torch.Tensor:
        total = torch.zeros(batch, tokens)
        attn = ".".join(region.split(".")[:2]) + ".attn"
        for name, w in sorted(score.items()):
            if name in ("v_norm", "attention"):
                state = self.attn_state.get(attn)
                if state is None:
                    raise Refused(f"score {name} for {region}: {attn} never computed fully")
                term = F.normalize(state[name], p=2, dim=1)
            elif name == "random":
                term = random_row(self.step, tokens, seed).expand(batch, tokens)
            elif name == "staleness":
                if region not in self.stamps:
                    raise Refused(f"staleness of {region}: never computed fully")
                term = float(self.step) - self.stamps[region]
            else:
                raise ValueError(name)
            total = total + w * term
        return total

    def _partial(self, region: str, forward, args, kwargs, ratio: float, score: dict, seed: int):
        cache = self.cache[region]
        batch, tokens = cache.shape[:2]
        k = max(0, min(tokens, int(math.floor(ratio * tokens + 0.5))))
        if k == 0:
            self.stats["reuse"] += 1
            return cache
        self.stats["partial"] += 1
        values = self._score(region, score, seed, batch, tokens)
        top = torch.topk(values, k, dim=1)
        self._check_margin(values, top.values, k)
        idx = top.indices  # [B, k]

        def gather(x):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == (batch, tokens):
                return torch.stack([x[b, idx[b]] for b in range(batch)])
            return x

        rows = forward(*[gather(a) for a in args], **{n: gather(v) for n, v in kwargs.items()})
        merged = cache.clone()
        stamps = self.stamps.get(region)
        for b in range(batch):
            merged[b, idx[b]] = rows[b]
            if stamps is not None:
                stamps[b, idx[b]] = float(self.step)
        self.cache[region] = merged
        return merged

    def _check_margin(self, values: torch.Tensor, top: torch.Tensor, k: int) -> None:
        """Top-k of scores that are not exactly tied must not hinge on float rounding: note any
        k-th/(k+1)-th gap below 1e-5 of the score's scale, which makes the example ambiguous."""
        if k >= values.shape[1]:
            return
        kth = top[:, -1]
        below = values.masked_fill(values >= kth[:, None], -float("inf")).amax(dim=1)
        gap = (kth - below)[torch.isfinite(below)]
        scale = values.abs().amax().clamp_min(1e-12)
        if gap.numel() and bool(((gap > 0) & (gap < 1e-5 * scale)).any()):
            self.ambiguous = True

    # ----------------------------------------------------------------- blocks and stack
    def _wrap_block(self, index: int, forward):
        region = f"blocks.{index}"
        last = index == self.fam.num_blocks - 1
        tuple_blocks = self.fam.tuple_blocks

        def stream_in(args, kwargs):
            return args[0] if args else kwargs["hidden_states"]

        def passthrough(args, kwargs, stream=None):
            hidden = stream_in(args, kwargs) if stream is None else stream
            if not tuple_blocks:
                return hidden
            enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            return (enc, hidden)

        def stream_of(out):
            return out[1] if tuple_blocks else out

        def run(*args, **kwargs):
            if self.actions is None:
                return forward(*args, **kwargs)
            stack = self._action("stack")
            if index == 0:
                self.stack_in_now = stream_in(args, kwargs)
            if stack[0] != "compute":
                if not last:
                    return passthrough(args, kwargs)
                if "stack" not in self.cache:
                    raise Refused(f"step {self.step} reuses the stack before any step computed it")
                self.stats["stack"] += 1
                if stack[0] == "reuse":
                    value = self.cache["stack"]
                elif stack[0] == "residual":
                    value = self.stack_in_now + self.stack_delta
                elif stack[0] == "forecast":
                    value = self._forecast("stack")
                else:
                    raise ValueError(stack)
                return passthrough(args, kwargs, value)
            a = self._action(region)
            if a[0] == "compute":
                out = forward(*args, **kwargs)
                self.cache[region] = out
                self._remember(region, out)
            elif region not in self.cache:
                raise Refused(f"step {self.step} reads {region} before any step computed it")
            elif a[0] == "reuse":
                self.stats["reuse"] += 1
                out = self.cache[region]
            elif a[0] == "forecast":
                out = self._forecast(region)
            else:
                raise ValueError(f"action {a} on block {region}")
            if last:
                value = stream_of(out)
                self.cache["stack"] = value
                self.stack_delta = value - self.stack_in_now
                self._remember("stack", value)
            return out

        return run
