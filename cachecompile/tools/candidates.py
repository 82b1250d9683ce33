"""Candidate schedules for the quality study and the tuner: calibration generations of the
uncached model, and the settings calibrated on them.

The specs are the one grammar of :mod:`cachecompile.tools.specs`; a :class:`Calibrator` is the
``calibrator`` it asks for where a spec leaves a setting open:

* ``mask:cal:F[:p]``: a per-branch mask reusing a fraction ``F`` of all branch-steps (a
  Learning-to-Cache style router, chosen by dynamic programming on the caching errors measured in
  the calibration generations, each step's error weighted by the solver's step in σ to the power
  ``p``, default 0);
* ``steps:cal:K[:p]``: FORA with ``K`` full steps placed by the same dynamic programming on the
  summed error of all branches (instead of evenly);
* ``+goc``: GOC's computed queue with its weight calibrated; ``+gocu[:w]``: the used-value queue
  (the paper's rule) with calibrated inflection steps, and weight and gradient window chosen
  among the settings the divergence guard accepts; ``+eoc[:theta]``: EOC with calibrated prior
  and judgment (theta calibrated unless given).

Every calibrated choice is made on the calibration generations (their own seeds, never the
evaluation's noise) by the fidelity of the final samples to the uncached ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import cachecompile as cc
from cachecompile.core.errors import ScheduleError
from cachecompile.tools.specs import parse_schedule, split_spec

__all__ = [
    "Calibrator", "SampleSetup", "build_schedule", "calibrated_mask", "calibrated_steps", "step_sensitivity",
    "GOC_WEIGHTS", "GOC_USED_WEIGHTS", "EOC_THETAS",
]

GOC_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
GOC_USED_WEIGHTS = (0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.2)
EOC_THETAS = (0.01, 0.03, 0.1, 0.3, 1.0)
# Gradient windows tried for the used-value queue, as fractions of the run ([start, end)); the
# paper's code applies the gradient on steps 3–9 of 20.
GOC_WINDOWS = ((0.0, 1.0), (0.15, 0.45), (0.0, 0.5), (0.5, 1.0))
# The tuner's shorter grids (the study searches the full ones).
QUICK = {"goc": (0.5, 0.75, 1.0), "gocu": (0.35, 0.5, 0.65, 0.8, 1.0), "windows": ((0.0, 1.0), (0.5, 1.0)), "eoc": (0.03, 0.3)}
MASK_WINDOW = 10  # longest reuse run of a calibrated mask (steps since the region's last compute)


# --------------------------------------------------------------------------- sampling setup


@dataclass(frozen=True)
class SampleSetup:
    """How one generation is sampled (everything but the labels' noise seed)."""

    steps: int = 50
    solver: str = "ddim"
    cfg: float = 2.0
    null_class: int = 10
    sample_size: int = 16
    in_channels: int = 1
    num_classes: int = 10

    def kwargs(self) -> dict[str, Any]:
        return dict(num_steps=self.steps, guidance_scale=self.cfg, null_class=self.null_class,
                    sample_size=self.sample_size, in_channels=self.in_channels, solver=self.solver)

    @classmethod
    def digits(cls, steps: int = 50, solver: str = "ddim", cfg: float = 2.0) -> "SampleSetup":
        from cachecompile.models import DIGITS_CONFIG as C

        return cls(steps, solver, cfg, C.null_class, C.sample_size, C.in_channels, C.num_classes)


def sample(model: Any, setup: SampleSetup, labels: torch.Tensor, seed: int) -> torch.Tensor:
    from cachecompile.sampling import ddim_sample

    with torch.no_grad():
        return ddim_sample(model, labels, seed=seed, **setup.kwargs())


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


# --------------------------------------------------------------------------- calibrator


@dataclass
class Calibrator:
    """Calibration generations of the uncached ``model`` (one per seed, ``labels`` each) and the
    fidelity of a candidate schedule on them: rel-L1 of its samples, clamped to the value range,
    to the uncached samples from the same noise (mean over the generations)."""

    model: Any
    setup: SampleSetup
    labels: torch.Tensor | None = None
    seeds: tuple[int, ...] = (1000, 1001)
    value_range: tuple[float, float] = (-1.0, 1.0)
    references: list[torch.Tensor] = field(default_factory=list, repr=False)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)
    log: Callable[[str], None] = lambda msg: None
    quick: bool = False  # shorter grids for calibrated settings (the tuner)

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = torch.arange(self.setup.num_classes)
        self.references = [self.clamp(sample(self.model, self.setup, self.labels, s)) for s in self.seeds]

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(*self.value_range)

    def sample_inputs(self) -> dict[str, Any]:
        """:func:`cachecompile.calibrate`'s ``sample_inputs``: generation ``i`` uses ``seeds[0] + i``."""
        return dict(class_labels=self.labels, seed=self.seeds[0], **{k: v for k, v in self.setup.kwargs().items() if k != "num_steps"})

    def fidelity(self, schedule: cc.Schedule) -> float:
        """Mean rel-L1 to the uncached calibration samples; ``inf`` for a schedule the GOC guard refuses."""
        key = schedule.dumps()
        if key in self.cache:
            return self.cache[key]
        try:
            cached = cc.optimize(self.model, schedule)
            errs = [rel_l1(self.clamp(sample(cached, self.setup, self.labels, s)), ref) for s, ref in zip(self.seeds, self.references)]
            value = sum(errs) / len(errs)
        except ScheduleError as e:
            if "diverges" not in str(e):
                raise
            value = math.inf
        self.cache[key] = value
        return value

    def best(self, candidates: list[tuple[Any, cc.Schedule]], what: str) -> tuple[Any, cc.Schedule, dict]:
        """The candidate with the best fidelity; returns (setting, schedule, {setting: fidelity})."""
        scores = {setting: self.fidelity(s) for setting, s in candidates}
        setting = min(scores, key=scores.get)
        if math.isinf(scores[setting]):
            raise ScheduleError(f"every {what} candidate was refused as divergent")
        self.log(f"  {what}: " + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()) + f" → {setting}")
        return setting, dict(candidates)[setting], scores


    # the calibrator of cachecompile.tools.specs
    def calibrated_mask(self, fraction: float, power: float = 0.0) -> cc.Schedule:
        return calibrated_mask(self, fraction, power)

    def calibrated_steps(self, computes: int, power: float = 0.0) -> cc.Schedule:
        return calibrated_steps(self, computes, power)

    def compensate(self, schedule: cc.Schedule, name: str, arg: float | None) -> cc.Schedule:
        """``schedule`` with the compensation ``name`` (``goc``, ``gocu``, ``eoc``) calibrated here."""
        if name == "goc":
            if arg is not None:
                return schedule.with_compensation(cc.GOC(arg, queue="computed"))
            inflected = cc.calibrate(self.model, schedule, self.sample_inputs(), len(self.seeds), compensation=cc.GOC(queue="computed"))
            weights = QUICK["goc"] if self.quick else GOC_WEIGHTS
            candidates = [(w, inflected.with_compensation(dataclasses.replace(inflected.compensation, weight=w))) for w in weights]
            return self.best(candidates, "GOC computed-queue weight")[1]
        if name == "gocu":
            return _goc_used(schedule, self, arg)
        if name == "eoc":
            calibrated = cc.calibrate(self.model, schedule, self.sample_inputs(), len(self.seeds), compensation=cc.EOC())
            if arg is not None:
                return calibrated.with_compensation(dataclasses.replace(calibrated.compensation, theta=arg))
            thetas = QUICK["eoc"] if self.quick else EOC_THETAS
            candidates = [(t, calibrated.with_compensation(dataclasses.replace(calibrated.compensation, theta=t))) for t in thetas]
            return self.best(candidates, "EOC theta")[1]
        raise ScheduleError(f"unknown calibrated compensation {name!r}: use goc, gocu or eoc")


def build_schedule(spec: str, cal: Calibrator) -> cc.Schedule:
    """The schedule a spec names (:mod:`cachecompile.tools.specs`), calibrated on ``cal`` where
    the spec leaves a setting open."""
    key = "spec:" + spec
    if key in cal.cache:
        return cal.cache[key]
    if split_spec(spec)[1]:
        cal.log(f"calibrating {spec}")
    schedule = parse_schedule(spec, cal.setup.steps, len(cal.model.transformer_blocks), calibrator=cal)
    cal.cache[key] = schedule
    return schedule


def _goc_used(schedule: cc.Schedule, cal: Calibrator, weight: float | None) -> cc.Schedule:
    """The paper's rule: the used-value queue with calibrated inflection steps; weight and gradient
    window chosen on the calibration generations among the settings the guard accepts."""
    inflected = cc.calibrate(cal.model, schedule, cal.sample_inputs(), len(cal.seeds),
                             compensation=cc.GOC(queue="used", allow_divergence=True))
    skips = inflected.compensation.skip_steps
    n = schedule.num_steps
    candidates = []
    for w in (weight,) if weight is not None else (QUICK["gocu"] if cal.quick else GOC_USED_WEIGHTS):
        for lo, hi in QUICK["windows"] if cal.quick else GOC_WINDOWS:
            window = None if (lo, hi) == (0.0, 1.0) else tuple(range(int(lo * n), int(hi * n)))
            comp = cc.GOC(w, queue="used", skip_steps=dict(skips) if skips and isinstance(skips[0], tuple) else skips, steps=window)
            candidates.append(((w, lo, hi), schedule.with_compensation(comp)))
    return cal.best(candidates, "GOC used-queue weight and window")[1]



# --------------------------------------------------------------------------- calibrated masks


def _branch_modules(model: Any) -> list[tuple[int, int, torch.nn.Module]]:
    """(block, branch 0 = attn / 1 = mlp, module) of a diffusers DiT-like model; outputs before the gate."""
    out = []
    for b, block in enumerate(model.transformer_blocks):
        out.append((b, 0, block.attn1))
        out.append((b, 1, block.ff))
    return out


def reuse_errors(cal: Calibrator, window: int = MASK_WINDOW) -> torch.Tensor:
    """``E[b, k, s, g]``: rel-L1 between branch ``k`` of block ``b`` at step ``s`` and at step
    ``s − g`` (``g = 1..window``; index ``g − 1``) in the uncached calibration generations — what
    reusing the value computed ``g`` steps earlier costs there. nan where ``s − g < 0``."""
    key = f"reuse_errors:{window}"
    if key in cal.cache:
        return cal.cache[key]
    mods = _branch_modules(cal.model)
    nb, n = len(cal.model.transformer_blocks), cal.setup.steps
    errs = torch.zeros(nb, 2, n, window, dtype=torch.float64)
    history: dict[tuple[int, int], list[torch.Tensor]] = {}
    calls = {"n": 0}

    def hook(b: int, k: int):
        def fn(module: Any, args: Any, output: Any) -> None:
            f = (output[0] if isinstance(output, tuple) else output).detach().double()
            step = calls["n"] // (2 * nb)
            hist = history.setdefault((b, k), [])
            for g, prev in enumerate(reversed(hist[-window:]), start=1):
                errs[b, k, step, g - 1] += ((f - prev).abs().mean() / f.abs().mean().clamp_min(1e-30)).item()
            hist.append(f)
            del hist[:-window]
            calls["n"] += 1
        return fn

    handles = [m.register_forward_hook(hook(b, k)) for b, k, m in mods]
    try:
        for seed in cal.seeds:
            history.clear()
            calls["n"] = 0
            sample(cal.model, cal.setup, cal.labels, seed)
    finally:
        for h in handles:
            h.remove()
    errs /= len(cal.seeds)
    for s in range(n):
        errs[:, :, s, s:] = float("nan")
    cal.cache[key] = errs
    return errs


def branch_costs(model: Any) -> tuple[float, float]:
    """Relative compute cost of one attention and one MLP branch per token (multiply-adds):
    projections 4·d² + attention 2·T·d against the MLP's 2·d·(4d)."""
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    return 4 * d * d + 2 * tokens * d, 8 * d * d


def _run_costs(err: torch.Tensor, window: int) -> list[list[float]]:
    """``cost[c][g]``: summed reuse error of the steps ``c+1 .. c+g−1`` reusing the value of step ``c``."""
    e = err.tolist()
    n = len(e)
    out = []
    for c in range(n):
        row, acc = [0.0], 0.0
        for g in range(1, window + 1):
            row.append(acc)
            t = c + g
            if t < n:
                acc += e[t][g - 1]
        out.append(row)
    return out


def _cheapest_computes(costs: list[list[float]], penalty: float, window: int) -> list[int]:
    """Compute steps of one branch minimising (summed reuse error) + penalty × (computes); step 0
    always computes and no branch reuses a value more than ``window − 1`` steps in a row."""
    n = len(costs)
    best = [math.inf] * (n + 1)
    back = [-1] * (n + 1)
    best[0] = penalty
    for s in range(1, n + 1):  # s = n: the end of the run (no compute there)
        for c in range(max(0, s - window), s):
            cost = best[c] + costs[c][s - c] + (penalty if s < n else 0.0)
            if cost < best[s]:
                best[s], back[s] = cost, c
    steps, s = [], back[n]
    while s >= 0:
        steps.append(s)
        s = back[s]
    return sorted(steps)


def step_sensitivity(cal: Calibrator) -> torch.Tensor:
    """How much an error in the model output at each step moves the final sample, to first order:
    the solver's step in σ = sqrt((1 − ᾱ)/ᾱ) (DDIM is Euler's method in σ for x/sqrt(ᾱ))."""
    from cachecompile.sampling import model_scheduler

    sched = model_scheduler(cal.model, cal.setup.solver)
    sched.set_timesteps(cal.setup.steps)
    abar = sched.alphas_cumprod.double()
    ts = [int(t) for t in sched.timesteps]
    sig = [math.sqrt((1 - abar[t]) / abar[t]) for t in ts] + [0.0]
    return torch.tensor([sig[i] - sig[i + 1] for i in range(len(ts))], dtype=torch.float64)


def calibrated_mask(cal: Calibrator, reuse_fraction: float, power: float = 0.0, window: int = MASK_WINDOW) -> cc.Schedule:
    """A per-branch mask that reuses about ``reuse_fraction`` of all branch-steps (cost-weighted),
    choosing for every branch the compute steps that minimise its summed reuse error (measured in
    the calibration generations, each step's error weighted by its :func:`step_sensitivity` to the
    power ``power``) for a shared price per computed step, found by bisection."""
    if not 0.0 < reuse_fraction < 1.0:
        raise ScheduleError(f"mask:cal:F needs 0 < F < 1, got {reuse_fraction}")
    errs = reuse_errors(cal, window).clone()
    nb, _, n, _ = errs.shape
    if power:
        weight = step_sensitivity(cal) ** power
        errs *= (weight / weight.mean()).reshape(1, 1, n, 1)
    cost = branch_costs(cal.model)
    total = n * nb * sum(cost)
    target = (1.0 - reuse_fraction) * total

    runs = [[_run_costs(errs[b, k], window) for k in range(2)] for b in range(nb)]

    def solve(price: float) -> tuple[list[list[list[int]]], float]:
        sets = [[_cheapest_computes(runs[b][k], price * cost[k] / max(cost), window) for k in range(2)] for b in range(nb)]
        spent = sum(len(sets[b][k]) * cost[k] for b in range(nb) for k in range(2))
        return sets, spent

    lo, hi = 0.0, 1.0
    while solve(hi)[1] > target and hi < 1e6:
        hi *= 4
    for _ in range(30):
        mid = (lo + hi) / 2
        if solve(mid)[1] > target:
            lo = mid
        else:
            hi = mid
    sets, _ = solve(hi)
    rows = [[[int(s in sets[b][0]), int(s in sets[b][1])] for b in range(nb)] for s in range(n)]
    return cc.Schedule.from_mask(rows)


def calibrated_steps(cal: Calibrator, computes: int, power: float = 0.0, window: int = MASK_WINDOW) -> cc.Schedule:
    """FORA with ``computes`` full steps placed where the summed reuse error of all branches
    (weighted as in :func:`calibrated_mask`) is least, instead of evenly."""
    errs = reuse_errors(cal, window).clone()
    nb, _, n, _ = errs.shape
    if power:
        weight = step_sensitivity(cal) ** power
        errs *= (weight / weight.mean()).reshape(1, 1, n, 1)
    total = errs.nan_to_num(0.0).sum(dim=(0, 1))
    total[torch.isnan(errs[0, 0])] = float("nan")
    runs = _run_costs(total, window)
    lo, hi = 0.0, 1.0
    while len(_cheapest_computes(runs, hi, window)) > computes and hi < 1e9:
        hi *= 4
    for _ in range(40):
        mid = (lo + hi) / 2
        if len(_cheapest_computes(runs, mid, window)) > computes:
            lo = mid
        else:
            hi = mid
    full = set(_cheapest_computes(runs, hi, window))
    return cc.Schedule.from_mask([[[1, 1] if st in full else [0, 0]] * nb for st in range(n)])


def save_schedule(schedule: cc.Schedule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    schedule.save(path)
