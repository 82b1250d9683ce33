"""Calibration: run the uncached model on a few generated samples (no data set) and derive what
the compensations need, once per model; the result goes into the schedule file.

For every region output that the schedule reuses, the recorder runs the captured graph (so
the features are exactly what the cache would hold, bit-identical to the eager model) and
records per step:

* the cosine of successive feature differences, ``cos(F_s − F_{s−1}, F_{s−1} − F_{s−2})``,
  per batch element, averaged; step ``s`` is an **inflection step** when it is below
  ``cos_threshold`` (default 0: the trajectory turned by more than 90°). GOC applies no
  gradient at those steps (its ``skip_steps``, per region);
* EOC's **prior**: the mean trajectory ``P[s]`` over samples and, by default, over every
  dimension but the last (channels) — our reduction, so the prior is ``[num_steps, C]``,
  independent of batch and resolution (``prior="full"`` keeps ``[num_steps, *feature]``); the
  trend ``E[s] = P[s] − P[s−1]`` (``E[0] = 0``) is what EOC multiplies by;
* EOC's **judgment**: at each cached step, the caching error ``mean|F_s − F_c| / mean|F_s|``
  of reusing the value of the last compute step ``c`` (both from the uncached run, so errors
  do not compound); a cached step is optimised when it is above ``error_threshold``.

Example::

    >>> import cachecompile as cc, torch
    >>> sched = cc.calibrate(model, cc.Schedule.fora(50, 4), dict(class_labels=torch.arange(4),
    ...     null_class=10, sample_size=16, in_channels=1), num_samples=4, compensation="goc")  # doctest: +SKIP
    >>> sched.save("fora4-goc.json")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from cachecompile.api import optimize
from cachecompile.core.schedule import Schedule, ScheduleError
from cachecompile.methods.compensation import EOC, GOC, Taylor
from cachecompile.methods.dynamic.calibrate import CALIBRATED as CALIBRATED_DYNAMIC, calibrate_dynamic
from cachecompile.passes import copy_graph_module
from cachecompile.passes.cache_io import add_cache_output
from cachecompile.passes.capture import capture
from cachecompile.passes.regions import find_regions
from cachecompile.runtime.cached import CachedTransformer, HoldsModel

__all__ = [
    "calibrate", "measure", "Calibration", "find_inflections", "DEFAULT_ERROR_THRESHOLD", "DEFAULT_GOC_WEIGHTS",
    "as_compensation",
]

# Relative L1 caching error above which EOC optimises a cached step (see Calibration.judged).
DEFAULT_ERROR_THRESHOLD = 0.05
# compensation="goc" calibrates the stable computed queue and searches its weight over these.
DEFAULT_GOC_WEIGHTS = (0.25, 0.5, 0.75, 1.0)

SampleFn = Callable[[Any, int], Any]


# --------------------------------------------------------------------------- results


@dataclass
class Calibration:
    """What calibration measured. Per region output slot and step: ``cosine`` (nan before
    step 2 or when a difference is zero), ``error`` (nan at steps that are not cached), the
    prior ``trend``; ``reused`` lists each region's cached steps; ``search`` holds the GOC
    weight search (weight → rel-L1 of the final samples against the uncached ones)."""

    num_steps: int
    num_trajectories: int
    reused: dict[str, tuple[int, ...]]
    cosine: dict[str, list[float]]
    error: dict[str, list[float]]
    trend: dict[str, torch.Tensor]
    finals: list[Any] = field(default_factory=list, repr=False)
    search: dict[float, float] = field(default_factory=dict)

    def inflections(self, cos_threshold: float = 0.0) -> dict[str, tuple[int, ...]]:
        """``{region: steps}`` where the cosine of successive differences is below the threshold."""
        return _by_region({s: find_inflections(c, cos_threshold) for s, c in self.cosine.items()})

    def judged(self, error_threshold: float = DEFAULT_ERROR_THRESHOLD) -> dict[str, tuple[int, ...]]:
        """``{region: cached steps}`` whose caching error is above the threshold (EOC's judgment)."""
        return _by_region(
            {s: tuple(i for i, e in enumerate(errs) if not math.isnan(e) and e > error_threshold) for s, errs in self.error.items()}
        )

    def apply(
        self,
        schedule: Schedule,
        compensation: Any,
        *,
        cos_threshold: float = 0.0,
        error_threshold: float = DEFAULT_ERROR_THRESHOLD,
    ) -> Schedule:
        """``schedule`` with ``compensation`` filled in from these measurements."""
        if isinstance(compensation, GOC):
            skips = {r: steps for r, steps in self.inflections(cos_threshold).items() if steps}
            comp: Any = dataclasses.replace(compensation, skip_steps=skips)
        elif isinstance(compensation, EOC):
            comp = EOC(
                theta=compensation.theta, prior=dict(self.trend), threshold=error_threshold,
                judged=self.judged(error_threshold),
            )
        elif isinstance(compensation, Taylor):
            comp = compensation  # nothing to calibrate
        else:
            raise TypeError(f"cannot calibrate compensation {compensation!r}: use cc.GOC, cc.EOC or cc.Taylor")
        return schedule.with_compensation(comp)

    def summary(self, cos_threshold: float = 0.0, error_threshold: float = DEFAULT_ERROR_THRESHOLD) -> str:
        infl = self.inflections(cos_threshold)
        judged = self.judged(error_threshold)
        errs = [e for v in self.error.values() for e in v if not math.isnan(e)]
        cached = sum(len(v) for v in self.reused.values())
        lines = [
            f"{len(self.cosine)} region outputs, {self.num_steps} steps, {self.num_trajectories} trajectories",
            f"inflection steps (cos < {cos_threshold}): " + _compact(infl),
            f"caching error at cached steps: mean {sum(errs) / max(len(errs), 1):.4f}, max {max(errs, default=0):.4f}; "
            f"EOC judges {sum(len(v) for v in judged.values())} of {cached} region×step pairs above {error_threshold}",
        ]
        if self.search:
            lines.append("GOC weight search (rel-L1 vs uncached): " + ", ".join(f"{w:g}: {e:.4f}" for w, e in self.search.items()))
        return "\n".join(lines)


def find_inflections(cosine: Sequence[float], cos_threshold: float = 0.0) -> tuple[int, ...]:
    """Steps whose successive-difference cosine is below ``cos_threshold`` (nan never counts).

    >>> find_inflections([float("nan"), float("nan"), 0.9, -0.8, 0.7])
    (3,)
    """
    return tuple(i for i, c in enumerate(cosine) if not math.isnan(c) and c < cos_threshold)


def _by_region(per_slot: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    out: dict[str, set[int]] = {}
    for slot, steps in per_slot.items():
        out.setdefault(slot.partition("#")[0], set()).update(steps)
    return {r: tuple(sorted(s)) for r, s in sorted(out.items())}


def _compact(per_region: Mapping[str, tuple[int, ...]]) -> str:
    groups: dict[tuple[int, ...], list[str]] = {}
    for r, steps in per_region.items():
        groups.setdefault(steps, []).append(r)
    return "; ".join(f"{list(steps)} in {', '.join(rs)}" for steps, rs in groups.items()) or "none"


# --------------------------------------------------------------------------- recording


class _Recorder(HoldsModel):
    """Stands in for the model in a sampling loop: runs the captured graph with every reused
    region output exposed, and folds the features into running statistics."""

    def __init__(self, model: torch.nn.Module, schedule: Schedule, patterns: Any, calls_per_step: int, prior: str) -> None:
        super().__init__(model)
        self.schedule, self.patterns, self.calls_per_step, self.prior = schedule, patterns, calls_per_step, prior
        self.gm: Any = None
        self.calls = 0
        self.trajectories = 0
        self._state: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        cap = capture(self._model, args, kwargs)
        rm = find_regions(cap.gm, self.patterns, cap.call.model_class)
        plans = dataclasses.replace(self.schedule, compensation=None).resolve(rm.layout)
        reused = {
            r: tuple(s for s, p in enumerate(plans) if p.action(r).kind == "reuse")
            for r in sorted({r for p in plans for r, a in p.actions if a.kind == "reuse"})
        }
        if not reused:
            raise ScheduleError(f"{self.schedule!r} reuses no region: there is nothing to calibrate")
        gm = copy_graph_module(cap.gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        slots = []
        for r in reused:
            for i, out in enumerate(rm[r].outputs):
                add_cache_output(gm, rm[r].slot(i), nodes[out])
                slots.append(rm[r].slot(i))
        gm.recompile()
        self.call, self.gm, self.slots, self.reused = cap.call, gm, slots, reused
        self.ran = {r: {s for s, p in enumerate(plans) if r in p.writes} for r in reused}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.gm is None:
            self._prepare(args, kwargs)
        cap = self.call
        tensors = cap.tensors(args, kwargs)  # InputMismatchError when the loop calls otherwise than at first
        with torch.no_grad():
            outs = self.gm(*tensors)
        step, call = divmod(self.calls, self.calls_per_step)
        for slot, feat in zip(self.slots, outs[cap.num_outputs :]):
            self._observe(step, call, slot, feat.detach())
        self.calls += 1
        if self.calls == self.schedule.num_steps * self.calls_per_step:
            self.calls = 0
            self.trajectories += self.calls_per_step
        return pytree.tree_unflatten(list(outs[: cap.num_outputs]), cap.out_spec)

    def _observe(self, step: int, call: int, slot: str, feat: torch.Tensor) -> None:
        n = self.schedule.num_steps
        region = slot.partition("#")[0]
        f = feat.double()
        st = self._state.setdefault((call, slot), {})
        if step == 0:
            st.clear()
        acc = self.stats.get(slot)
        if acc is None:
            shape = tuple(f.shape) if self.prior == "full" else tuple(f.shape[-1:])
            acc = self.stats[slot] = {
                "mean": torch.zeros((n, *shape), dtype=torch.float64), "cos": torch.zeros(n, dtype=torch.float64),
                "cos_n": torch.zeros(n, dtype=torch.float64), "err": torch.zeros(n, dtype=torch.float64),
                "err_n": torch.zeros(n, dtype=torch.float64), "n": torch.zeros(n, dtype=torch.float64),
            }
        acc["mean"][step] += f if self.prior == "full" else f.reshape(-1, f.shape[-1]).mean(0)
        acc["n"][step] += 1
        if "prev" in st:
            diff = f - st["prev"]
            if "dprev" in st:
                cos = _rowwise_cosine(diff, st["dprev"])
                if cos.numel():
                    acc["cos"][step] += cos.mean()
                    acc["cos_n"][step] += 1
            st["dprev"] = diff
        if step in self.reused[region] and "computed" in st:
            acc["err"][step] += (f - st["computed"]).abs().mean() / f.abs().mean().clamp_min(1e-30)
            acc["err_n"][step] += 1
        if step in self.ran[region]:
            st["computed"] = f
        st["prev"] = f

    def result(self, finals: list[Any]) -> Calibration:
        if self.gm is None:
            raise RuntimeError("the sampling callable never called the model")
        nan = float("nan")
        cosine, error, trend = {}, {}, {}
        for slot, acc in self.stats.items():
            cosine[slot] = [(c / k).item() if k else nan for c, k in zip(acc["cos"], acc["cos_n"])]
            error[slot] = [(e / k).item() if k else nan for e, k in zip(acc["err"], acc["err_n"])]
            shape = (-1,) + (1,) * (acc["mean"].dim() - 1)
            mean = acc["mean"] / acc["n"].clamp_min(1).reshape(shape)
            e = torch.zeros_like(mean)
            e[1:] = mean[1:] - mean[:-1]
            trend[slot] = e.float()
        return Calibration(self.schedule.num_steps, self.trajectories, dict(self.reused), cosine, error, trend, finals)


def _rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per batch element (first dimension), skipping elements where a difference is zero."""
    a2 = a.reshape(a.shape[0], -1) if a.dim() >= 2 else a.reshape(1, -1)
    b2 = b.reshape(a2.shape)
    na, nb = a2.norm(dim=1), b2.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    return ((a2 * b2).sum(1)[ok] / (na[ok] * nb[ok])).clamp(-1, 1)


# --------------------------------------------------------------------------- API


def _sampler(sample_inputs: Any, num_steps: int) -> SampleFn:
    if callable(sample_inputs):
        return sample_inputs
    if isinstance(sample_inputs, Mapping):
        from cachecompile.sampling import ddim_sample

        kw = dict(sample_inputs)
        if "class_labels" not in kw:
            raise TypeError("sample_inputs must hold ddim_sample's class_labels (and null_class, sample_size, in_channels)")
        if kw.get("num_steps", num_steps) != num_steps:
            raise ScheduleError(f"sample_inputs asks for {kw['num_steps']} steps but the schedule has {num_steps}")
        labels, seed = kw.pop("class_labels"), kw.pop("seed", 0)
        kw["num_steps"] = num_steps
        return lambda model, i: ddim_sample(model, labels, seed=seed + i, **kw)
    raise TypeError(
        "sample_inputs must be a callable fn(model, sample_index) that runs one generation, or a dict of "
        f"cachecompile.sampling.ddim_sample keyword arguments; got {type(sample_inputs).__name__}"
    )


def measure(
    model: torch.nn.Module,
    schedule: Schedule,
    sample_inputs: Any,
    num_samples: int = 4,
    *,
    calls_per_step: int = 1,
    regions: Any = None,
    prior: str = "channel",
) -> Calibration:
    """Run ``num_samples`` uncached generations and return the raw :class:`Calibration`."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"calibrate takes the transformer (a torch.nn.Module), got {type(model).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a cachecompile.Schedule, got {type(schedule).__name__}")
    if prior not in ("channel", "full"):
        raise ValueError(f"prior must be 'channel' (per-channel vectors, the default) or 'full', got {prior!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(model, CachedTransformer):
        model = model.model  # calibrate the original, uncached model
    run = _sampler(sample_inputs, schedule.num_steps)
    rec = _Recorder(model, schedule, regions, calls_per_step, prior)
    finals = []
    for i in range(num_samples):
        finals.append(run(rec, i))
        if rec.calls != 0:
            raise ValueError(
                f"the sampling run made a number of model calls that is not {schedule.num_steps} steps × "
                f"{calls_per_step} calls per step; sample with num_steps={schedule.num_steps} (and pass "
                f"calls_per_step=2 if the pipeline runs CFG as two calls)"
            )
    return rec.result(finals)


def as_compensation(compensation: Any, schedule: Schedule) -> Any:
    if compensation is None:
        compensation = schedule.compensation
    if compensation is None:
        raise ValueError("say which compensation to calibrate: compensation='goc', 'eoc', 'taylor' or an instance (cc.GOC(...))")
    if isinstance(compensation, str):
        known = {"goc": lambda: GOC(queue="computed"), "eoc": EOC, "taylor": Taylor}
        if compensation not in known:
            raise ValueError(f"unknown compensation {compensation!r}; use one of {sorted(known)}")
        return known[compensation]()
    return compensation


def calibrate(
    model: torch.nn.Module,
    schedule: Schedule,
    sample_inputs: Any,
    num_samples: int = 4,
    *,
    compensation: Any = None,
    cos_threshold: float = 0.0,
    error_threshold: float = DEFAULT_ERROR_THRESHOLD,
    prior: str = "channel",
    weights: Sequence[float] | None = None,
    calls_per_step: int = 1,
    regions: Any = None,
    report: bool = False,
) -> Any:
    """Calibrate ``compensation`` for ``model`` under ``schedule``; returns the schedule with the
    calibrated compensation inside (save it: calibration runs once per model). For a TeaCache or
    MagCache schedule, fits its rescaling coefficients or measures its magnitude ratios instead
    (:mod:`cachecompile.methods.dynamic.calibrate`); ``report=True`` then returns what was measured.

    Args:
        sample_inputs: a callable ``fn(model, i)`` that runs generation ``i`` with ``model`` as the
            transformer (and returns its samples), or a dict of
            :func:`~cachecompile.sampling.ddim_sample` keyword arguments (seed ``i`` is added).
        compensation: ``"goc"``, ``"eoc"``, ``"taylor"`` or an instance whose other settings are
            kept (default: the schedule's own compensation). ``"goc"`` is GOC's stable
            computed queue with its weight searched over ``DEFAULT_GOC_WEIGHTS``.
        cos_threshold: GOC's inflection test (cosine of successive feature differences).
        error_threshold: EOC's judgment (relative L1 caching error of a cached step).
        prior: ``"channel"`` (default, ``[num_steps, C]`` per region) or ``"full"``.
        weights: GOC only: candidate weights; each is run on the same samples and the one whose
            final samples are closest (rel-L1) to the uncached ones is kept. A weight whose
            used-value queue would diverge on this schedule is refused (``inf`` in the search).
        report: also return the :class:`Calibration` (``(schedule, calibration)``).

    >>> import cachecompile as cc, torch
    >>> s = cc.calibrate(model, cc.Schedule.fora(20, 4), dict(class_labels=torch.arange(2), null_class=10,
    ...     sample_size=16, in_channels=1), num_samples=2, compensation="eoc")  # doctest: +SKIP
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a cachecompile.Schedule, got {type(schedule).__name__}")
    if not schedule.is_bound:
        raise ScheduleError(
            "calibration measures per-step values for one number of steps: give the schedule num_steps= "
            "(the pipeline's num_inference_steps), e.g. schedule.bind(50)"
        )
    if schedule.method in CALIBRATED_DYNAMIC:  # TeaCache coefficients, MagCache ratios
        if compensation is not None:
            raise ValueError(f"a {schedule.method} schedule takes no compensation; drop compensation=")
        if isinstance(model, CachedTransformer):
            model = model.model
        fitted, measured = calibrate_dynamic(
            model, schedule, _sampler(sample_inputs, schedule.num_steps), num_samples,
            calls_per_step=calls_per_step, regions=regions,
        )
        return (fitted, measured) if report else fitted
    comp = as_compensation(compensation, schedule)
    if weights is None and compensation == "goc":
        weights = DEFAULT_GOC_WEIGHTS
    cal = measure(model, schedule, sample_inputs, num_samples, calls_per_step=calls_per_step, regions=regions, prior=prior)
    out = cal.apply(schedule, comp, cos_threshold=cos_threshold, error_threshold=error_threshold)
    if weights:
        if not isinstance(comp, GOC):
            raise ValueError("weights= searches GOC's weight; the compensation is not GOC")
        out = _search_weight(model, out, sample_inputs, num_samples, weights, cal, calls_per_step, regions)
    return (out, cal) if report else out


def _search_weight(
    model: torch.nn.Module, schedule: Schedule, sample_inputs: Any, num_samples: int, weights: Sequence[float],
    cal: Calibration, calls_per_step: int, regions: Any,
) -> Schedule:
    if not all(isinstance(f, torch.Tensor) for f in cal.finals):
        raise ValueError("weights= needs a sampling callable that returns the generated samples (a tensor)")
    run = _sampler(sample_inputs, schedule.num_steps)
    best = None
    for w in weights:
        candidate = schedule.with_compensation(dataclasses.replace(schedule.compensation, weight=float(w)))
        errs = []
        try:
            cached = optimize(model, candidate, regions=regions, calls_per_step=calls_per_step)
            for i, ref in enumerate(cal.finals):
                out = run(cached, i)
                errs.append(((out - ref).abs().mean() / ref.abs().mean()).item())
        except ScheduleError as e:
            if "diverges" not in str(e):
                raise
            errs = [math.inf]  # refused: its used-value queue would diverge on this schedule
        cal.search[float(w)] = sum(errs) / len(errs)
        if best is None or cal.search[float(w)] < cal.search[best[0]]:
            best = (float(w), candidate)
    assert best is not None
    if math.isinf(cal.search[best[0]]):
        raise ScheduleError(
            f"every candidate weight {list(weights)} makes GOC's used-value queue diverge on this schedule; "
            "try smaller weights or queue='computed'"
        )
    return best[1]
