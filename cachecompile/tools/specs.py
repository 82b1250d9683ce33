"""The one schedule-spec grammar of the command line, the bench and the quality report.

::

    none                                   no caching
    fora:INTERVAL                          Schedule.fora
    uniform:K                              FORA at any cost: K full steps spread evenly (steps ⌊i·S/K⌋)
    toca:INTERVAL[:RATIO[:SCORE]]          Schedule.toca (defaults 3, 0.3, v_norm)
    duca:INTERVAL[:RATIO[:SCORE[:MODE]]]   Schedule.duca (MODE output|residual)
    mask:deep-half                         odd steps reuse both branches of the deeper half of the blocks
    mask:shallow-half                      the same with the shallower half
    mask:cal:F[:P]                         calibrated per-branch mask reusing a fraction F of the branch-steps
    steps:cal:K[:P]                        FORA with K full steps placed by calibration
    dbcache:THRESHOLD[:FN[:BN[:WARMUP]]]   Schedule.dbcache (defaults 1, 0, 0: First-Block Cache)
    fbc:THRESHOLD                          Schedule.dbcache(THRESHOLD), diffusers' First-Block Cache
    teacache:THRESHOLD                     Schedule.teacache, coefficients to calibrate (cc.calibrate)
    magcache:THRESHOLD[:MAX_SKIP]          Schedule.magcache (default 3), ratios to calibrate (cc.calibrate)
    BASE+taylor1 | +taylor2                Taylor forecast of order 1 / 2
    BASE+goc[:W]                           GOC, computed queue (stable); weight W (default 0.5, calibrated
                                           where the caller calibrates)
    BASE+gocu[:W]                          GOC, used-value queue (the paper's rule; refused where it diverges);
                                           weight, inflection steps and window calibrated where the caller does
    BASE+eoc[:THETA]                       EOC (calibrated prior and judgment; theta calibrated unless given)
    SPEC@DTYPE                             the cache stored in DTYPE: bf16, fp16, fp8 (e4m3fn), fp8e5m2,
                                           fp32, or a torch name (bfloat16, float8_e4m3fn ...)
    [LABEL=]FILE.json                      a saved schedule (shown as LABEL in a study)

The calibrated parts (``mask:cal``, ``steps:cal``, ``+eoc``, ``+gocu`` without a weight) need a
``calibrator``: an object with ``calibrated_mask(fraction, power)``,
``calibrated_steps(computes, power)`` and ``compensate(schedule, name, arg)`` that runs
calibration generations of the uncached model (:class:`cachecompile.tools.candidates.Calibrator`).

>>> parse_schedule("duca:4:0.25:v_norm+0.25*staleness:residual", 12).params["aggressive_reuse"]
'residual'
>>> parse_schedule("fora:4+taylor1", 12).compensation
Taylor(order=1)
>>> parse_schedule("dbcache:0.1:2:1:3", 12).params["compute_last"]
1
>>> parse_schedule("fora:3+taylor1@bf16", 12).cache_dtype
'bfloat16'
>>> uniform_steps(50, 17)[:4]
[0, 2, 5, 8]
>>> spec_label("tuned-3x=bench-out/tuned-3x.json"), spec_label("fora:3+goc")
('tuned-3x', 'fora:3+goc')
"""

from __future__ import annotations

from typing import Any, Callable

import cachecompile as cc

__all__ = ["parse_schedule", "COMPENSATIONS", "CALIBRATED_COMPENSATIONS", "CACHE_DTYPE_ALIASES", "SpecError", "spec_label",
           "split_spec", "uniform_steps"]


class SpecError(ValueError):
    """A schedule spec that the grammar does not read."""


# The compensations a spec names without calibration (their defaults).
COMPENSATIONS: dict[str, Callable[[], Any]] = {
    "goc": lambda: cc.GOC(weight=0.5, queue="computed"),
    "taylor1": lambda: cc.Taylor(order=1),
    "taylor2": lambda: cc.Taylor(order=2),
}
# The ones whose settings a calibrator can choose (see the module docstring).
CALIBRATED_COMPENSATIONS = ("goc", "gocu", "eoc")


# Short names of the cache storage dtypes (``SPEC@DTYPE``); torch's own names are read too.
CACHE_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn",
                       "fp8e4m3": "float8_e4m3fn", "fp8e5m2": "float8_e5m2"}


def spec_label(spec: str) -> str:
    """How a spec is shown: the label of a labelled schedule file, else the spec itself."""
    if spec.endswith(".json") and "=" in spec:
        return spec.partition("=")[0]
    return spec


def split_spec(spec: str) -> tuple[str, str]:
    """``(base, compensation)`` of a spec (``""`` when it has none); a schedule file has none."""
    if spec.endswith(".json"):
        return spec, ""
    base, _, comp = spec.partition("+")
    if comp and comp.split(":")[0] not in (*COMPENSATIONS, *CALIBRATED_COMPENSATIONS):
        return spec, ""  # a '+' inside a score sum: duca:3:0.3:v_norm+0.25*staleness
    return base, comp


def uniform_steps(num_steps: int, computes: int) -> list[int]:
    """``computes`` full steps spread evenly over ``num_steps`` (always step 0)."""
    if not 1 <= computes <= num_steps:
        raise SpecError(f"uniform:{computes} needs 1..{num_steps} full steps")
    return sorted({(i * num_steps) // computes for i in range(computes)})


def parse_schedule(spec: str, num_steps: int, num_blocks: int | None = None, calibrator: Any = None) -> cc.Schedule:
    """The schedule a spec names (see the module docstring) for ``num_steps`` sampling steps;
    ``uniform:K`` and the masks need ``num_blocks``, the calibrated parts a ``calibrator``. A
    :class:`SpecError` (or the schedule's own :class:`~cachecompile.ScheduleError`) says what is
    wrong."""
    base, at, dtype = spec.rpartition("@")
    if at and not spec.endswith(".json"):
        if not base or not dtype:
            raise SpecError(f"{spec}: write the cache dtype after the schedule, e.g. fora:3@bf16")
        return parse_schedule(base, num_steps, num_blocks, calibrator).with_cache_dtype(CACHE_DTYPE_ALIASES.get(dtype, dtype))
    if spec.endswith(".json"):
        s = cc.Schedule.load(spec.partition("=")[2] if "=" in spec else spec)
        if not s.is_bound:
            return s.bind(num_steps)
        if s.num_steps != num_steps:
            raise SpecError(f"schedule {spec} has {s.num_steps} steps, not {num_steps}")
        return s
    base, comp = split_spec(spec)
    schedule = _base(base, num_steps, num_blocks, calibrator)
    if comp:
        schedule = _compensate(spec, schedule, comp, calibrator)
    return schedule


def _compensate(spec: str, schedule: cc.Schedule, comp: str, calibrator: Any) -> cc.Schedule:
    name, _, arg = comp.partition(":")
    if name in ("taylor1", "taylor2"):
        if arg:
            raise SpecError(f"{spec}: +{name} takes no setting")
        return schedule.with_compensation(COMPENSATIONS[name]())
    if calibrator is not None and (name in ("eoc", "gocu") or (name == "goc" and not arg)):
        return calibrator.compensate(schedule, name, _float(spec, arg) if arg else None)
    if name == "goc":
        return schedule.with_compensation(cc.GOC(weight=_float(spec, arg), queue="computed") if arg else COMPENSATIONS["goc"]())
    if name == "gocu" and arg:
        return schedule.with_compensation(cc.GOC(weight=_float(spec, arg), queue="used"))
    raise SpecError(f"{spec}: +{comp} is calibrated: it needs calibration generations (cachecompile.tools.candidates)")


def _needs(spec: str, what: Any, text: str) -> Any:
    if what is None:
        raise SpecError(f"{spec} needs {text}")
    return what


def _base(spec: str, num_steps: int, num_blocks: int | None, calibrator: Any = None) -> cc.Schedule:
    name, _, arg = spec.partition(":")
    if name == "fora":
        return cc.Schedule.fora(num_steps, _int(spec, arg or "3"))
    if name == "uniform":
        full = set(uniform_steps(num_steps, _int(spec, arg)))
        blocks = _needs(spec, num_blocks, "the model's number of blocks")
        return cc.Schedule.from_mask([[[1, 1] if s in full else [0, 0]] * blocks for s in range(num_steps)])
    if name in ("mask", "steps") and arg.startswith("cal:"):
        parts = arg.split(":")[1:]
        if not 1 <= len(parts) <= 2:
            raise SpecError(f"{spec}: write {name}:cal:{'F' if name == 'mask' else 'K'}[:power]")
        cal = _needs(spec, calibrator, "calibration generations (cachecompile.tools.candidates)")
        power = _float(spec, parts[1]) if len(parts) > 1 else 0.0
        if name == "mask":
            return cal.calibrated_mask(_float(spec, parts[0]), power)
        return cal.calibrated_steps(_int(spec, parts[0]), power)
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
    if spec in ("mask:deep-half", "mask:shallow-half"):
        blocks = _needs(spec, num_blocks, "the model's number of blocks")
        deep = spec == "mask:deep-half"
        return cc.Schedule.from_mask(
            [[[0, 0] if s % 2 and (b >= blocks // 2) == deep else [1, 1] for b in range(blocks)] for s in range(num_steps)]
        )
    raise SpecError(f"unknown schedule {spec!r}: use none, fora:N, uniform:K, toca:N[:ratio[:score]], duca:N[:ratio[:score[:mode]]], "
                    f"mask:deep-half, mask:shallow-half, mask:cal:F, steps:cal:K, dbcache:T[:Fn[:Bn[:warmup]]], fbc:T, teacache:T, "
                    f"magcache:T[:max_skip], a +taylor1|+taylor2|+goc[:w]|+gocu[:w]|+eoc[:theta] suffix, or a [label=].json schedule file")


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
