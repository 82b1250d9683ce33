"""Pick the schedule for the user: ``cc.tune(model, target_speedup)``.

A few calibration generations of the uncached model (their own seeds), then a search over
presets (FORA, ToCa, DuCa), FORA with its full steps placed by calibration, per-branch
calibrated masks and compensation (Taylor, GOC with either queue, EOC), keeping only schedules
whose exact FLOPs ratio (``torch.utils.flop_counter`` over a sampling run) is at least the
target. The winner has the best fidelity to the uncached samples (rel-L1, clamped to the value
range) on the calibration generations; it is returned (and saved) with the table of every
candidate measured.

Two stages keep it short: every base schedule plain and with Taylor-1; then, for the three best
bases, the other compensations with their calibrated settings.

Example::

    >>> import cachecompile as cc
    >>> from cachecompile.models import digits_dit
    >>> result = cc.tune(digits_dit(), 3.0, out="tuned-3x.json")  # doctest: +SKIP
    >>> print(result.table())                                       # doctest: +SKIP

Command line: ``python -m cachecompile tune --speedup 3 --out tuned-3x.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import cachecompile as cc
from cachecompile.core.errors import ScheduleError
from cachecompile.tools.candidates import Calibrator, SampleSetup, build_schedule
from cachecompile.tools.flops import flops_ratio
from cachecompile.sampling import SOLVERS
from cachecompile.tools.specs import parse_schedule

__all__ = ["tune", "TuneResult", "Candidate", "add_tune_arguments", "tune_main"]

STAGE2_COMPENSATIONS = ("taylor2", "goc", "gocu", "eoc")


@dataclass
class Candidate:
    spec: str
    flops_ratio: float
    fidelity: float  # rel-L1 to the uncached calibration samples (mean over generations)
    seconds: float
    schedule: cc.Schedule | None = field(default=None, repr=False)
    note: str = ""


@dataclass
class TuneResult:
    """The chosen schedule and everything measured on the way."""

    schedule: cc.Schedule
    best: Candidate
    candidates: list[Candidate]
    target: float
    setup: SampleSetup
    generations: int
    path: Path | None = None

    def table(self) -> str:
        """The candidates measured, best first (Markdown)."""
        lines = [
            f"target FLOPs ratio ≥ {self.target:g}×; fidelity: rel-L1 to the uncached samples of {self.generations} "
            f"calibration generations ({self.setup.steps} {self.setup.solver} steps, CFG {self.setup.cfg:g})\n",
            "| schedule | FLOPs ratio | rel-L1 ↓ | note |", "|---|---:|---:|---|",
        ]
        for c in sorted(self.candidates, key=lambda c: (math.isnan(c.fidelity), c.fidelity)):
            mark = " **← chosen**" if c is self.best else ""
            fid = "refused" if math.isinf(c.fidelity) else ("–" if math.isnan(c.fidelity) else f"{c.fidelity:.4f}")
            lines.append(f"| {c.spec}{mark} | {c.flops_ratio:.2f}× | {fid} | {c.note} |")
        return "\n".join(lines)


def _ratio_cache(model: Any, setup: SampleSetup) -> Callable[[cc.Schedule], float]:
    cache: dict[str, float] = {}
    kw = setup.kwargs()

    def ratio(schedule: cc.Schedule) -> float:
        base = schedule.with_compensation(None).dumps()  # compensation adds elementwise ops only
        if base not in cache:
            cache[base] = flops_ratio(model, schedule.with_compensation(None), torch.arange(2), **kw)
        return cache[base]

    return ratio


def _base_specs(model: Any, setup: SampleSetup, target: float, ratio: Callable[[cc.Schedule], float],
                cal: Calibrator, log: Callable[[str], None]) -> list[tuple[str, float]]:
    """Base schedules whose FLOPs ratio is at least ``target``: (spec, ratio)."""
    n, nb = setup.steps, len(model.transformer_blocks)
    out: list[tuple[str, float]] = []

    def add(spec: str) -> float:
        r = ratio(parse_schedule(spec, n, nb, calibrator=cal))
        if r >= target:
            out.append((spec, r))
        return r

    # FORA at the largest number of full steps that reaches the target, evenly and calibrated
    k = max(1, int(n / target))
    while k > 1 and ratio(parse_schedule(f"uniform:{k}", n, nb)) < target:
        k -= 1
    for spec in (f"uniform:{k}", f"steps:cal:{k}", f"steps:cal:{k}:-0.5"):
        add(spec)
    interval = math.ceil(target)
    add(f"fora:{interval}")
    # per-branch calibrated masks at about the same cost
    for fraction in (1 - k / n, 1 - k / n + 0.03):
        if add(f"mask:cal:{fraction:.3f}") >= target:
            break
    # token-wise methods: the cheapest-to-compute settings that still reach the target
    for method in ("toca", "duca"):
        found = 0
        for interval in range(max(2, math.ceil(target)), max(2, math.ceil(target)) + 4):
            for fresh in (0.3, 0.2, 0.1):
                if add(f"{method}:{interval}:{fresh}") >= target:
                    found += 1
                    break
            if found >= 2:
                break
    log("bases at ≥ {:g}×: {}".format(target, ", ".join(f"{s} ({r:.2f}×)" for s, r in out)))
    return out


def tune(
    model: Any,
    target_speedup: float,
    *,
    steps: int = 50,
    solver: str = "ddim",
    cfg: float = 2.0,
    generations: int = 2,
    labels: torch.Tensor | None = None,
    setup: SampleSetup | None = None,
    out: str | Path | None = None,
    bases: list[str] | None = None,
    compensations: tuple[str, ...] = ("taylor1",) + STAGE2_COMPENSATIONS,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """The schedule with the best fidelity among those whose exact FLOPs ratio is at least
    ``target_speedup``, measured on ``generations`` calibration generations of ``labels``.

    Args:
        model: a class-conditional DiT (a diffusers ``DiTTransformer2DModel``); the shipped digits
            DiT by default on the command line.
        target_speedup: the FLOPs ratio to reach (uncached FLOPs ÷ cached FLOPs of a sampling run).
        steps, solver, cfg: the sampling setting the schedule is tuned for (``solver`` ``"ddim"``
            or ``"dpm++2m"``; the model's own scheduler config).
        setup: the sampling setting in full (:class:`~cachecompile.tools.candidates.SampleSetup`),
            for models other than the digits DiT; overrides steps, solver and cfg.
        out: where to save the chosen schedule (``.json``).
        bases: base specs to search instead of the built-in list (``uniform:16``, ``steps:cal:16``,
            ``fora:3``, ``duca:4:0.2`` ...; see :mod:`cachecompile.tools.specs`); those below
            the target are dropped.
        compensations: the compensations tried (``taylor1`` on every base, the others on the
            three best bases).

    Returns a :class:`TuneResult`: ``.schedule``, ``.best``, ``.table()``.
    """
    if not isinstance(target_speedup, (int, float)) or target_speedup < 1:
        raise ValueError(f"target_speedup must be a FLOPs ratio >= 1, got {target_speedup!r}")
    log = log or (lambda msg: None)
    setup = setup or SampleSetup.digits(steps, solver, cfg)
    cal = Calibrator(model, setup, labels=labels, seeds=tuple(1000 + i for i in range(generations)), log=log, quick=True)
    ratio = _ratio_cache(model, setup)
    measured: dict[str, Candidate] = {}

    def measure(spec: str, r: float) -> Candidate:
        if spec in measured:
            return measured[spec]
        t0 = time.perf_counter()
        note = ""
        try:
            schedule = build_schedule(spec, cal)
            fidelity = cal.fidelity(schedule)
            comp = schedule.compensation
            if comp is not None:
                note = _describe(comp)
        except ScheduleError as e:  # a compensation that has nothing to do, or a refused setting
            schedule, fidelity, note = None, math.nan, str(e).split(";")[0][:80]
        measured[spec] = Candidate(spec, r, fidelity, time.perf_counter() - t0, schedule, note)
        log(f"  {spec}: {fidelity:.4f} ({measured[spec].seconds:.0f} s)")
        return measured[spec]

    if bases is None:
        found = _base_specs(model, setup, target_speedup, ratio, cal, log)
    else:
        nb = len(model.transformer_blocks)
        found = [(b, ratio(parse_schedule(b, setup.steps, nb, calibrator=cal))) for b in bases]
        found = [(b, r) for b, r in found if r >= target_speedup]
    bases = found
    if not bases:
        raise ScheduleError(f"no candidate schedule reaches a FLOPs ratio of {target_speedup:g}× at {setup.steps} steps")
    for spec, r in bases:
        measure(spec, r)
        if "taylor1" in compensations and not spec.startswith(("toca", "duca")):  # Taylor needs whole-region reuse
            measure(spec + "+taylor1", r)
    ranked = sorted(bases, key=lambda b: min(_fid(measured.get(b[0])), _fid(measured.get(b[0] + "+taylor1"))))
    for spec, r in ranked[:3]:
        if spec.startswith(("toca", "duca")):
            continue
        for comp in compensations:
            if comp != "taylor1":
                measure(f"{spec}+{comp}", r)
    valid = [c for c in measured.values() if c.schedule is not None and math.isfinite(c.fidelity)]
    best = min(valid, key=lambda c: c.fidelity)
    result = TuneResult(best.schedule, best, list(measured.values()), float(target_speedup), setup, generations)
    if out is not None:
        result.path = Path(out)
        result.path.parent.mkdir(parents=True, exist_ok=True)
        best.schedule.save(result.path)
    return result


def _fid(c: Candidate | None) -> float:
    return math.inf if c is None or math.isnan(c.fidelity) else c.fidelity


def _describe(comp: Any) -> str:
    kind = getattr(comp, "kind", type(comp).__name__)
    if kind == "goc":
        window = "" if comp.steps is None else f", steps {comp.steps[0]}–{comp.steps[-1]}"
        return f"GOC {comp.queue} queue, w {comp.weight:g}{window}"
    if kind == "eoc":
        return f"EOC θ {comp.theta:g}"
    if kind == "taylor":
        return f"Taylor order {comp.order}"
    return str(kind)


# --------------------------------------------------------------------------- command line


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speedup", type=float, required=True, help="target FLOPs ratio, e.g. 3")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--solver", default="ddim", choices=list(SOLVERS))
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--generations", type=int, default=2, help="calibration generations (10 labels each)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="where to save the chosen schedule (.json); the table goes beside it (.md)")


def tune_main(args: argparse.Namespace) -> int:
    from cachecompile.models import digits_dit

    if args.threads:
        torch.set_num_threads(args.threads)
    result = tune(digits_dit(), args.speedup, steps=args.steps, solver=args.solver, cfg=args.cfg,
                  generations=args.generations, out=args.out, log=lambda m: print(m, flush=True))
    table = result.table()
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nchosen: {result.best.spec} ({result.best.flops_ratio:.2f}×, rel-L1 {result.best.fidelity:.4f}); wrote {args.out}")
    return 0
