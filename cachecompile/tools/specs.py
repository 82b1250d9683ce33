"""The one schedule-spec grammar of the command line, the bench and the quality report.

::

    none                                   no caching
    fora:INTERVAL                          Schedule.fora
    toca:INTERVAL[:RATIO[:SCORE]]          Schedule.toca (defaults 3, 0.3, v_norm)
    duca:INTERVAL[:RATIO[:SCORE[:MODE]]]   Schedule.duca (MODE output|residual)
    mask:deep-half                         odd steps reuse both branches of the deeper half of the blocks
    dbcache:THRESHOLD[:FN[:BN[:WARMUP]]]   Schedule.dbcache (defaults 1, 0, 0: First-Block Cache)
    fbc:THRESHOLD                          Schedule.dbcache(THRESHOLD), diffusers' First-Block Cache
    teacache:THRESHOLD                     Schedule.teacache, coefficients to calibrate (cc.calibrate)
    magcache:THRESHOLD[:MAX_SKIP]          Schedule.magcache (default 3), ratios to calibrate (cc.calibrate)
    BASE+goc | +taylor1 | +taylor2         with a compensation (GOC: computed queue, weight 0.5)
    SPEC@DTYPE                             the cache stored in DTYPE: bf16, fp16, fp8 (e4m3fn), fp8e5m2,
                                           fp32, or a torch name (bfloat16, float8_e4m3fn ...)
    FILE.json                              a saved schedule

>>> parse_schedule("duca:4:0.25:v_norm+0.25*staleness:residual", 12).params["aggressive_reuse"]
'residual'
>>> parse_schedule("fora:4+taylor1", 12).compensation
Taylor(order=1)
>>> parse_schedule("dbcache:0.1:2:1:3", 12).params["compute_last"]
1
>>> parse_schedule("fora:3+taylor1@bf16", 12).cache_dtype
'bfloat16'
"""

from __future__ import annotations

from typing import Any, Callable

import cachecompile as cc

__all__ = ["parse_schedule", "COMPENSATIONS", "CACHE_DTYPE_ALIASES", "SpecError"]


class SpecError(ValueError):
    """A schedule spec that the grammar does not read."""


COMPENSATIONS: dict[str, Callable[[], Any]] = {
    "goc": lambda: cc.GOC(weight=0.5, queue="computed"),
    "taylor1": lambda: cc.Taylor(order=1),
    "taylor2": lambda: cc.Taylor(order=2),
}


# Short names of the cache storage dtypes (``SPEC@DTYPE``); torch's own names are read too.
CACHE_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn",
                       "fp8e4m3": "float8_e4m3fn", "fp8e5m2": "float8_e5m2"}


def parse_schedule(spec: str, num_steps: int, num_blocks: int | None = None) -> cc.Schedule:
    """The schedule a spec names (see the module docstring) for ``num_steps`` sampling steps;
    ``mask:deep-half`` needs ``num_blocks``. A :class:`SpecError` (or the schedule's own
    :class:`~cachecompile.ScheduleError`) says what is wrong."""
    base, at, dtype = spec.rpartition("@")
    if at and not spec.endswith(".json"):
        if not base or not dtype:
            raise SpecError(f"{spec}: write the cache dtype after the schedule, e.g. fora:3@bf16")
        return parse_schedule(base, num_steps, num_blocks).with_cache_dtype(CACHE_DTYPE_ALIASES.get(dtype, dtype))
    if spec.endswith(".json"):
        s = cc.Schedule.load(spec)
        if s.num_steps != num_steps:
            raise SpecError(f"schedule {spec} has {s.num_steps} steps, not {num_steps}")
        return s
    base, _, comp = spec.partition("+")
    if comp and comp.split(":")[0] not in COMPENSATIONS:
        return _base(spec, num_steps, num_blocks)  # a '+' inside a score sum: duca:3:0.3:v_norm+0.25*staleness
    schedule = _base(base, num_steps, num_blocks)
    if comp:
        schedule = schedule.with_compensation(COMPENSATIONS[comp]())
    return schedule


def _base(spec: str, num_steps: int, num_blocks: int | None) -> cc.Schedule:
    name, _, arg = spec.partition(":")
    if name == "fora":
        return cc.Schedule.fora(num_steps, _int(spec, arg or "3"))
    if name in ("toca", "duca"):
        parts = arg.split(":") if arg else []
        limit = 4 if name == "duca" else 3
        if len(parts) > limit:
            raise SpecError(f"{spec} has too many fields; use {name}:interval:fresh_ratio:score" + (":output|residual" if name == "duca" else ""))
        interval = _int(spec, parts[0]) if parts and parts[0] else 3
        ratio = _float(spec, parts[1]) if len(parts) > 1 and parts[1] else 0.3
        score = parts[2] if len(parts) > 2 and parts[2] else "v_norm"
        if name == "toca":
            return cc.Schedule.toca(num_steps, interval, ratio, score)
        return cc.Schedule.duca(num_steps, interval, ratio, score, parts[3] if len(parts) > 3 and parts[3] else "output")
    if name in ("dbcache", "fbc", "teacache", "magcache"):
        parts = arg.split(":") if arg else []
        limit = {"dbcache": 4, "fbc": 1, "teacache": 1, "magcache": 2}[name]
        if not parts or not parts[0] or len(parts) > limit:
            raise SpecError(f"{spec}: write {name}:threshold" + {"dbcache": "[:Fn[:Bn[:warmup]]]", "magcache": "[:max_skip]"}.get(name, ""))
        threshold = _float(spec, parts[0])
        if name == "teacache":
            return cc.Schedule.teacache(threshold, None, num_steps=num_steps)
        if name == "magcache":
            return cc.Schedule.magcache(threshold, _int(spec, parts[1]) if len(parts) > 1 else 3, None, num_steps=num_steps)
        ints = [_int(spec, p) for p in parts[1:]]
        return cc.Schedule.dbcache(threshold, *ints, num_steps=num_steps)
    if spec == "mask:deep-half":
        if num_blocks is None:
            raise SpecError("mask:deep-half needs the model's number of blocks")
        return cc.Schedule.from_mask(
            [[[0, 0] if s % 2 and b >= num_blocks // 2 else [1, 1] for b in range(num_blocks)] for s in range(num_steps)]
        )
    raise SpecError(f"unknown schedule {spec!r}: use none, fora:N, toca:N[:ratio[:score]], duca:N[:ratio[:score[:mode]]], "
                    f"mask:deep-half, dbcache:T[:Fn[:Bn[:warmup]]], fbc:T, teacache:T, magcache:T[:max_skip], a +{'|+'.join(COMPENSATIONS)} suffix, or a .json schedule file")


def _int(spec: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SpecError(f"cannot read {spec!r}: {text!r} is not an integer") from None


def _float(spec: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpecError(f"cannot read {spec!r}: {text!r} is not a number") from None
