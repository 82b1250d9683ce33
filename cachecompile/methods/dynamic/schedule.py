"""Dynamic policies as schedule data: DBCache / First-Block Cache, TeaCache and MagCache.

A dynamic schedule does not say which steps compute: its step graph decides, from the cache
state, at every step (:mod:`cachecompile.methods.dynamic.graph`). What the schedule fixes is the
policy and its settings, the always-full steps at the start (warm-up) and, for TeaCache, at the
end. The plans are:

* a **record** step (:class:`Record`, a full compute) — the warm-up steps: runs every block and
  keeps what the dynamic steps compare against (the probe, the skipped segment's residual) and
  resets the counters;
* a **dynamic** step (:class:`Decide`) — computes the probe, compares it with the cached one
  and, inside the one step graph (``torch.cond``), either runs the segment of blocks or adds its
  cached residual. Every dynamic step has the same plan, so a dynamic schedule compiles to two
  step graphs (three with TeaCache's full last step), whatever its length.

Policies (the names are those of the reference implementations):

* ``dbcache`` — cache-dit's DBCache: the first ``compute_first`` blocks always run; the relative
  L1 change ``mean|R − R'| / mean|R'|`` of their residual ``R`` (output − input) against ``R'``,
  the residual at the last step that computed, decides: below ``threshold`` the middle blocks are
  reused as their cached residual; the last ``compute_last`` blocks always run. Limits:
  ``max_cached_steps`` per generation, ``max_continuous_cached_steps`` in a row.
  ``compute_first=1, compute_last=0`` is diffusers' First-Block Cache.
* ``teacache`` — TeaCache: the relative L1 change of block 0's timestep-modulated input (the input
  of its attention) from the previous step, rescaled by a polynomial (``coefficients``, highest
  degree first), is accumulated; below ``threshold`` the whole stack is reused as its cached
  residual, else it runs and the sum restarts. The first and the last step compute.
* ``magcache`` — MagCache (diffusers' rule): its decision reads no value of the current step, only
  calibrated per-step magnitude ratios, so it is resolved here, when the schedule knows its
  length: accumulated ratio ``∏ r``, error ``Σ |1 − ∏ r|`` and skipped steps; a step is reused
  (stack residual, :class:`~cachecompile.methods.dual.ReuseResidual`) while the error stays at most
  ``threshold`` and at most ``max_skip_steps`` steps are skipped in a row. No ``torch.cond``.

Example::

    >>> import cachecompile as cc
    >>> s = cc.Schedule.dbcache(0.08, compute_first=1, warmup_steps=2, num_steps=5)
    >>> s.step_kinds()
    ['full', 'full', 'dynamic', 'dynamic', 'dynamic']
    >>> cc.Schedule.loads(s.dumps()) == s
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cachecompile.core.schedule import (
    Action,
    Layout,
    Method,
    Schedule,
    ScheduleError,
    check_int,
    register_action,
    register_method,
)
from cachecompile.methods.dual.schedule import ReuseResidual
from cachecompile.methods.reuse import check_params

__all__ = [
    "Decide",
    "Record",
    "POLICIES",
    "PROBE_SLOT",
    "RESIDUAL_SLOT",
    "STATE_SLOT",
    "TEACACHE_COEFFICIENTS",
    "magcache_steps",
    "step_action",
    "step_kind",
    "teacache_coefficients",
]

POLICIES = ("dbcache", "teacache")

# Cache slots of a dynamic schedule (explicit graph I/O like every cache slot):
PROBE_SLOT = "dynamic.probe"  # what the next step compares against (DBCache: R'; TeaCache: the modulated input)
RESIDUAL_SLOT = "dynamic.residual"  # the skipped segment's output − input at the last step that ran it
STATE_SLOT = "dynamic.state"  # float32 counters: DBCache [cached steps, cached in a row]; TeaCache [accumulated distance]

# TeaCache's published rescaling polynomials (highest degree first), by diffusers model class.
# FLUX.1-dev: TeaCache4FLUX (ali-vilab/TeaCache). Other families: fit one with cc.calibrate.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "FluxTransformer2DModel": (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
}


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Decide(Action):
    """Decide in the step graph whether the segment of blocks ``[first, num_blocks − last)``
    runs or is reused as its cached residual (see the module docstring for ``policy``).

    It reads and writes only the slots of this module, never a region's own slot, so for the
    schedule core it reads no region cache (``reads_cache`` is False) and computes no region.
    """

    kind: str = "decide"
    policy: str = "dbcache"
    first: int = 1
    last: int = 0
    threshold: float = 0.08
    max_cached: int = -1  # -1: no limit
    max_run: int = -1
    coefficients: tuple[float, ...] = ()

    @property
    def reads_cache(self) -> bool:
        return False

    def to_json(self) -> Any:
        return {
            "kind": "decide", "policy": self.policy, "first": self.first, "last": self.last,
            "threshold": self.threshold, "max_cached": self.max_cached, "max_run": self.max_run,
            "coefficients": list(self.coefficients),
        }


@dataclass(frozen=True)
class Record(Action):
    """A full step that also keeps what the next :class:`Decide` step reads (the probe, the
    segment's residual) and resets the counters: kind ``compute``, so the step is full."""

    kind: str = "compute"
    policy: str = "dbcache"
    first: int = 1
    last: int = 0

    def to_json(self) -> Any:
        return {"kind": "dynamic-record", "policy": self.policy, "first": self.first, "last": self.last}


register_action(
    "decide",
    lambda o: Decide(
        policy=o["policy"], first=int(o["first"]), last=int(o["last"]), threshold=float(o["threshold"]),
        max_cached=int(o.get("max_cached", -1)), max_run=int(o.get("max_run", -1)),
        coefficients=tuple(float(c) for c in o.get("coefficients", ())),
    ),
)
register_action("dynamic-record", lambda o: Record(policy=o["policy"], first=int(o["first"]), last=int(o["last"])))


# --------------------------------------------------------------------------- checks


def _number(name: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ScheduleError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _limit(name: str, value: Any) -> int | None:
    """``None`` (no limit) or an integer >= 0."""
    return None if value is None else check_int(name, value, minimum=0)


def _no_compensation(s: Schedule) -> None:
    if s.compensation is not None:
        raise ScheduleError(
            f"a {s.method} schedule decides per step in the graph; compensation ({s.compensation.kind}) applies to "
            f"static schedules only: drop compensation="
        )


def teacache_coefficients(value: Any) -> tuple[float, ...]:
    """TeaCache's polynomial, highest degree first: numbers, or a model class with published ones
    (:data:`TEACACHE_COEFFICIENTS`, e.g. ``"FluxTransformer2DModel"``)."""
    if isinstance(value, str):
        if value not in TEACACHE_COEFFICIENTS:
            raise ScheduleError(
                f"no published TeaCache coefficients for {value!r} (known: {sorted(TEACACHE_COEFFICIENTS)}); "
                f"fit them with cc.calibrate(model, cc.Schedule.teacache(threshold, coefficients=None, ...), ...)"
            )
        return TEACACHE_COEFFICIENTS[value]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ScheduleError(
            f"TeaCache coefficients are a non-empty list of numbers (highest degree first) or a model class name, got {value!r}"
        )
    return tuple(_number(f"coefficients[{i}]", c, minimum=-math.inf) for i, c in enumerate(value))


def _dbcache_check(s: Schedule) -> dict[str, Any]:
    _no_compensation(s)
    p = check_params(
        s, threshold=..., compute_first=1, compute_last=0, warmup_steps=0, max_cached_steps=None,
        max_continuous_cached_steps=None,
    )
    p["threshold"] = _number("threshold", p["threshold"])
    p["compute_first"] = check_int("compute_first", p["compute_first"], minimum=1)
    p["compute_last"] = check_int("compute_last", p["compute_last"], minimum=0)
    p["warmup_steps"] = check_int("warmup_steps", p["warmup_steps"], minimum=0)
    p["max_cached_steps"] = _limit("max_cached_steps", p["max_cached_steps"])
    p["max_continuous_cached_steps"] = _limit("max_continuous_cached_steps", p["max_continuous_cached_steps"])
    return p


def _teacache_check(s: Schedule) -> dict[str, Any]:
    _no_compensation(s)
    p = check_params(s, threshold=..., coefficients=..., warmup_steps=1, compute_last_step=True)
    p["threshold"] = _number("threshold", p["threshold"])
    if p["coefficients"] is not None:  # None: to be fitted by cc.calibrate (refused when resolved)
        p["coefficients"] = list(teacache_coefficients(p["coefficients"]))
    p["warmup_steps"] = check_int("warmup_steps", p["warmup_steps"], minimum=1)
    if not isinstance(p["compute_last_step"], bool):
        raise ScheduleError(f"compute_last_step must be True or False, got {p['compute_last_step']!r}")
    return p


def _magcache_check(s: Schedule) -> dict[str, Any]:
    _no_compensation(s)
    p = check_params(s, threshold=..., ratios=..., max_skip_steps=3, retention_ratio=0.2)
    p["threshold"] = _number("threshold", p["threshold"])
    ratios = p["ratios"]
    if hasattr(ratios, "tolist"):
        ratios = ratios.tolist()
    if ratios is not None:  # None: to be measured by cc.calibrate (refused when resolved)
        if not isinstance(ratios, (list, tuple)) or not ratios:
            raise ScheduleError(
                f"MagCache needs its per-step magnitude ratios (a non-empty list, from cc.calibrate), got {ratios!r:.80}"
            )
        ratios = [_number(f"ratios[{i}]", r) for i, r in enumerate(ratios)]
    p["ratios"] = ratios
    p["max_skip_steps"] = check_int("max_skip_steps", p["max_skip_steps"], minimum=0)
    p["retention_ratio"] = _number("retention_ratio", p["retention_ratio"])
    if p["retention_ratio"] > 1:
        raise ScheduleError(f"retention_ratio is the fraction of steps that always compute, in [0, 1]; got {p['retention_ratio']}")
    return p


# --------------------------------------------------------------------------- rules


def full_steps_at_start(s: Schedule) -> int:
    """How many steps at the start always compute (and record)."""
    return max(1, s.params["warmup_steps"])


def _decide(s: Schedule) -> Decide:
    p = s.params
    if s.method == "dbcache":
        return Decide(
            policy="dbcache", first=p["compute_first"], last=p["compute_last"], threshold=p["threshold"],
            max_cached=-1 if p["max_cached_steps"] is None else p["max_cached_steps"],
            max_run=-1 if p["max_continuous_cached_steps"] is None else p["max_continuous_cached_steps"],
        )
    if p["coefficients"] is None:
        raise ScheduleError(
            "this TeaCache schedule has no rescaling coefficients yet: fit them for the model with "
            "cc.calibrate(model, schedule, sample_inputs), or give a model class with published ones "
            f"({sorted(TEACACHE_COEFFICIENTS)}) or a list of numbers"
        )
    return Decide(policy="teacache", first=0, last=0, threshold=p["threshold"], coefficients=tuple(p["coefficients"]))


def step_kind(s: Schedule, step: int, num_steps: int) -> str:
    """``record`` (full, keeps the state), ``full`` or ``dynamic`` for ``step`` of a generation of
    ``num_steps`` steps: a function of the step index (and, for TeaCache's full last step, of the
    length), so a schedule bound to any length resolves the same way."""
    if step < full_steps_at_start(s):
        return "record"
    if s.method == "teacache" and s.params["compute_last_step"] and step == num_steps - 1:
        return "full"
    return "dynamic"


def step_action(s: Schedule, step: int, num_steps: int) -> dict[str, Action]:
    """The ``{region: action}`` of ``step`` in a generation of ``num_steps`` steps."""
    kind = step_kind(s, step, num_steps)
    if kind == "full":
        return {}
    decide = _decide(s)
    if kind == "record":
        return {"stack": Record(policy=decide.policy, first=decide.first, last=decide.last)}
    return {"stack": decide}


def _dynamic_rules(s: Schedule, layout: Layout) -> list[dict[str, Action]]:
    return [step_action(s, step, s.num_steps) for step in range(s.num_steps)]


def _dynamic_label(s: Schedule, step: int) -> str:
    """``dynamic`` where the graph decides (its decision is in ``cached.decisions`` after a run)."""
    return "dynamic" if step_kind(s, step, s.num_steps) == "dynamic" else "full"


def magcache_steps(ratios: Sequence[float], num_steps: int, threshold: float, max_skip_steps: int, retention_ratio: float) -> list[bool]:
    """MagCache's decision per step (True = reuse), as diffusers' ``MagCacheConfig`` makes it:
    the ratios are resampled to ``num_steps`` by nearest index; from step
    ``int(retention_ratio × num_steps + 0.5)`` on, the accumulated ratio, error and skip count grow
    each step, and a step is reused while error ≤ threshold and skips ≤ ``max_skip_steps`` (else
    it computes and they restart). Step 0 always computes (there is no residual yet).

    >>> magcache_steps([1.0, 1.0, 0.99, 0.98], 4, 0.05, 2, 0.0)
    [False, True, True, False]
    """
    n = len(ratios)
    if num_steps == 1:
        table = [float(ratios[-1])]
    elif n == num_steps:
        table = [float(r) for r in ratios]
    else:
        # Nearest index on a float32 grid, halves to even (the resampling diffusers' MagCache does).
        scale = (n - 1) / (num_steps - 1)
        index = torch.round(torch.arange(num_steps, dtype=torch.float32) * scale).long().tolist()
        table = [float(ratios[i]) for i in index]
    retention = int(retention_ratio * num_steps + 0.5)
    ratio, err, skipped = 1.0, 0.0, 0
    out = []
    for step in range(num_steps):
        reuse = False
        if step >= retention:
            ratio *= table[step]
            skipped += 1
            err += abs(1.0 - ratio)
            if step > 0 and err <= threshold and skipped <= max_skip_steps:
                reuse = True
            else:
                ratio, err, skipped = 1.0, 0.0, 0
        out.append(reuse)
    return out


def _magcache_reused(s: Schedule) -> list[bool]:
    p = s.params
    if p["ratios"] is None:
        raise ScheduleError(
            "this MagCache schedule has no magnitude ratios yet: measure them for the model with "
            "cc.calibrate(model, schedule, sample_inputs)"
        )
    return magcache_steps(p["ratios"], s.num_steps, p["threshold"], p["max_skip_steps"], p["retention_ratio"])


def _magcache_rules(s: Schedule, layout: Layout) -> list[dict[str, Action]]:
    return [{"stack": ReuseResidual()} if reuse else {} for reuse in _magcache_reused(s)]


register_method(Method("dbcache", _dynamic_rules, _dbcache_check, _dynamic_label))
register_method(Method("teacache", _dynamic_rules, _teacache_check, _dynamic_label))
def _magcache_label(s: Schedule, step: int) -> str:
    if s.params["ratios"] is None:
        return "uncalibrated"
    return "cached" if _magcache_reused(s)[step] else "full"


register_method(Method("magcache", _magcache_rules, _magcache_check, _magcache_label))
