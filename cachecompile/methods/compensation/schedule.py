"""Error compensation for reused features: GOC, EOC and Taylor forecasts, as schedule data.

A compensation is a frozen dataclass attached to a schedule
(``cc.Schedule.fora(50, 4, compensation=cc.GOC(weight=0.5))``). When the schedule is resolved,
its ``transform`` turns the ``reuse`` actions of every compensable region into
:class:`Forecast` actions (a corrected reuse) and, where the forecast needs a history of
computed values, the compute steps of those regions into :class:`History` actions. The graph
pass :mod:`cachecompile.methods.compensation.graph` turns both into plain graph ops on explicit cache slots.

The state each forecast keeps is cache state like any other (graph inputs and outputs):

=========================  =====================================  ===============================
compensation               cache slots per region output ``r``    per-step inputs (scalars)
=========================  =====================================  ===============================
``GOC(queue="used")``      ``r``, ``r@h1``: the values *used* at  ``goc_w:r`` (the weight; 0 when
                           the two previous steps                 no gradient is applied)
``GOC(queue="computed")``  ``r``, ``r@h1``: the last two computed ``goc_c1:r``
``Taylor(order=k)``        ``r``, ``r@h1`` .. ``r@hk``            ``taylor_c1:r`` (``taylor_c2:r``)
``EOC``                    ``r`` + the prior table (an input)     ``eoc_scale:r``, ``eoc_row``
=========================  =====================================  ===============================

The newest value is always the plain slot ``r`` (written by :mod:`cachecompile.passes.cache_io` at compute
steps); at a compute step the older ones shift down (a :class:`History` action: a compute whose
``state`` holds ``history<k>``, the same vocabulary :mod:`cachecompile.methods.dual` uses for the
state it keeps, so both compose).

Per-step values (weights, step distances, which prior row, whether the queue is full) are graph
inputs computed here in Python, so the number of step graphs does not grow with the number of
steps: FORA + GOC/Taylor has three (the first compute step, which fills the history, other
compute steps, cached steps); FORA + EOC has two.

Which regions are compensated: every region that the schedule reuses at least once and that is
otherwise only computed (never partially recomputed, never inside a reused block or stack).
Other regions keep their plain actions. All reuse steps of a compensated region are forecasts;
steps where the correction must not apply get a zero weight (GOC's skip steps, EOC's unjudged
steps), which gives exactly the plain cached value (or, for GOC's used-value queue, the value
used at the previous step).

Example::

    >>> import cachecompile as cc
    >>> s = cc.Schedule.fora(6, 3, compensation=cc.GOC(weight=0.8, queue="computed"))
    >>> cc.Schedule.loads(s.dumps()) == s
    True
    >>> from cachecompile.core.schedule import Layout
    >>> [p.describe() for p in s.resolve(Layout(branches=(("attn", "mlp"),)))][:3]
    ['compute all', '2×forecast', '2×forecast']
"""

from __future__ import annotations

import base64
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.fx

from cachecompile.passes.cache_io import cache_io
from cachecompile.core.schedule import (
    COMPUTE,
    Action,
    Layout,
    Schedule,
    ScheduleError,
    StepPlan,
    check_int,
    json_fields,
    register_action,
    register_compensation,
    state_tokens,
)

__all__ = [
    "GOC",
    "EOC",
    "Taylor",
    "Forecast",
    "History",
    "PriorTable",
    "MemoryReport",
    "memory_report",
    "state_slots",
    "step_values",
    "check_used_queue_stable",
]

# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Forecast(Action):
    """A compensated reuse of a region: its output is predicted from cache state.

    ``method`` names the rule (``goc``, ``eoc``, ``taylor``); ``queue`` says what the history
    holds (``used``: the values used at the previous steps, GOC's paper rule; ``computed``: the
    last computed values); ``order`` is the number of differences in the extrapolation;
    ``prior_shapes`` (EOC) is the shape of the prior table of each region output. Per-step
    numbers are not part of the action, so equal steps share one graph.
    """

    kind: str = "forecast"
    method: str = "taylor"
    queue: str = "computed"
    order: int = 1
    prior_shapes: tuple[tuple[int, ...], ...] = ()

    def to_json(self) -> Any:
        return {
            "kind": self.kind, "method": self.method, "queue": self.queue, "order": self.order,
            "prior_shapes": [list(s) for s in self.prior_shapes],
        }


@dataclass(frozen=True)
class History(Action):
    """A compute of a forecast region that also keeps its older values for the forecast.

    ``state`` holds ``history<k>`` (shift the ``k`` older values: ``r@hk ← … ← r@h1 ← r``) or
    ``history<k>-first`` (the region's first compute of the run: fill them with the computed
    value). Kind ``compute``: the step is a full compute for every other pass, and a rule
    transform that adds state of its own (``methods.dual.attach_state``) keeps these tokens.
    """

    kind: str = "compute"
    state: tuple[str, ...] = ()

    @property
    def reads_cache(self) -> bool:
        # shifting reads the older values; the first compute of a run only writes
        hist = history_of(self)
        return hist is not None and not hist[1]

    def to_json(self) -> Any:
        return {"kind": "history", "state": list(self.state)}


def history_token(depth: int, first: bool) -> str:
    return f"history{depth}" + ("-first" if first else "")


def _parse_history(token: str) -> tuple[int, bool] | None:
    """``history2`` → (2, False); ``history1-first`` → (1, True); other state → None."""
    if not token.startswith("history"):
        return None
    body, _, flag = token[len("history"):].partition("-")
    return (int(body), flag == "first") if body.isdigit() else None


def history_of(action: Action) -> tuple[int, bool] | None:
    """The (depth, first) history a compute action keeps, if any (any action with ``state``)."""
    if action.kind != "compute":
        return None
    for token in getattr(action, "state", ()):
        parsed = _parse_history(token)
        if parsed is not None:
            return parsed
    return None


_FORECAST_METHODS = ("goc", "eoc", "taylor")


def _forecast_from_json(obj: Any) -> Forecast:
    o = json_fields(obj, "a forecast action", required=("method",), optional=("queue", "order", "prior_shapes"))
    if o["method"] not in _FORECAST_METHODS:
        raise ScheduleError(f"a forecast action's method is one of {list(_FORECAST_METHODS)}, got {o['method']!r:.40}")
    queue = o.get("queue", "computed")
    if queue not in ("used", "computed"):
        raise ScheduleError(f"a forecast action's queue is 'used' or 'computed', got {queue!r:.40}")
    shapes = o.get("prior_shapes", ())
    if not isinstance(shapes, (list, tuple)) or not all(isinstance(sh, (list, tuple)) for sh in shapes):
        raise ScheduleError(f"a forecast action's prior_shapes is a list of shapes, got {shapes!r:.80}")
    return Forecast(
        method=o["method"], queue=queue, order=check_int("a forecast action's order", o.get("order", 1), minimum=0),
        prior_shapes=tuple(tuple(check_int("a prior shape's size", d, minimum=0) for d in sh) for sh in shapes),
    )


def _history_from_json(obj: Any) -> History:
    o = json_fields(obj, "a history action", optional=("state",))
    return History(state=state_tokens(o.get("state", ()), "a history action's state"))


register_action("forecast", _forecast_from_json)
register_action("history", _history_from_json)


def state_slots(action: Action, slot: str) -> list[str]:
    """The cache slots a forecast keeps for region output ``slot``, newest first.

    >>> state_slots(Forecast(method="goc", queue="used"), "blocks.0.attn")
    ['blocks.0.attn', 'blocks.0.attn@h1']
    >>> state_slots(Forecast(method="taylor", order=2), "blocks.0.mlp")
    ['blocks.0.mlp', 'blocks.0.mlp@h1', 'blocks.0.mlp@h2']
    """
    depth = 0 if getattr(action, "method", None) == "eoc" else getattr(action, "order", 0)
    return history_slots(slot, depth)


def history_slots(slot: str, depth: int) -> list[str]:
    """``slot`` (the newest value) and its ``depth`` older values ``slot@h1`` .. ``slot@h<depth>``."""
    return [slot] + [f"{slot}@h{i}" for i in range(1, depth + 1)]


# --------------------------------------------------------------------------- helpers


def _steps_tuple(name: str, steps: Iterable[Any]) -> tuple[int, ...]:
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
        raise ScheduleError(f"{name} must be a list of step indices, got {steps!r:.80}")
    out = []
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) and not (hasattr(s, "__index__")):
            raise ScheduleError(f"{name} must hold step indices (integers), got {s!r}")
        s = int(s)
        if s < 0:
            raise ScheduleError(f"{name} holds step {s}; steps count sampling calls from 0")
        out.append(s)
    return tuple(sorted(set(out)))


def _per_region(name: str, value: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """A ``{region: steps}`` mapping (or its pairs) as sorted, hashable pairs."""
    if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise ScheduleError(f"{name} must map region names to lists of steps, got {value!r:.80}")
    return tuple(sorted((str(r), _steps_tuple(f"{name}[{r!r}]", v)) for r, v in value.items()))


def _check_regions(name: str, keys: Iterable[str], layout: Layout) -> None:
    known = set(layout.region_names())
    unknown = sorted({k.split("#", 1)[0] for k in keys} - known)
    if unknown:
        raise ScheduleError(
            f"{name} names region(s) {unknown} that the model does not have; regions are: "
            f"{', '.join(sorted(known))}. Calibrate the schedule for this model (cc.calibrate)"
        )


def _check_steps(name: str, steps: Iterable[int], num_steps: int) -> None:
    bad = [s for s in steps if s >= num_steps]
    if bad:
        raise ScheduleError(f"{name} holds step(s) {bad} but the schedule has {num_steps} steps (0..{num_steps - 1})")


def _shadowed(region: str, acts: Mapping[str, Action]) -> bool:
    """True when an enclosing block or the stack does not run at this step."""
    if not region.startswith("blocks."):
        return False
    outer = ["stack"] + ([".".join(region.split(".")[:2])] if region.count(".") >= 2 else [])
    return any(o != region and not acts.get(o, COMPUTE).computes for o in outer)


def compensable_regions(rules: Sequence[Mapping[str, Action]], who: str | None = None) -> list[str]:
    """Regions reused at least once and otherwise only computed, never inside a reused block/stack.

    With ``who`` (the compensation's name), finding none is an error: a compensation that
    changes nothing is a mistake in the schedule, not a setting.
    """
    reused = sorted({r for acts in rules for r, a in acts.items() if a.kind == "reuse"})
    out = []
    for r in reused:
        ok = all(acts.get(r, COMPUTE).kind in ("compute", "reuse") and not _shadowed(r, acts) for acts in rules)
        if ok:
            out.append(r)
    if who and not out:
        raise ScheduleError(
            f"{who} has nothing to compensate: it corrects regions that the schedule reuses (action 'reuse') and "
            f"otherwise computes; this schedule reuses {'none' if not reused else 'only regions that are also partially recomputed or inside a reused block/stack'}. "
            f"Use a schedule with cached steps (e.g. Schedule.fora(num_steps, interval >= 2)) or drop the compensation"
        )
    return out


def _rewrite(
    rules: list[dict[str, Action]], regions: Iterable[str], forecast: Forecast | Mapping[str, Forecast], depth: int
) -> list[dict[str, Action]]:
    """Reuse → ``forecast``; compute → :class:`History` of ``depth`` older values (none if 0)."""
    out = [dict(acts) for acts in rules]
    for r in regions:
        fc = forecast[r] if isinstance(forecast, Mapping) else forecast
        seen = False
        for acts in out:
            a = acts.get(r, COMPUTE)
            if a.kind == "reuse":
                acts[r] = fc
            elif depth:
                # keep state another method attached to this compute (methods.dual.Record)
                state = set(getattr(a, "state", ())) | {history_token(depth, first=not seen)}
                acts[r] = History(state=tuple(sorted(state)))
                seen = True
    return out


def _history(plans: Sequence[StepPlan], region: str) -> list[tuple[int, list[int], int]]:
    """For each forecast step of ``region``: (step, compute steps before it, used values before it)."""
    computed: list[int] = []
    used = 0
    out = []
    for s, plan in enumerate(plans):
        a = plan.action(region)
        if a.kind == "forecast":
            out.append((s, list(computed), used))
            used += 1
        elif a.computes:
            computed.append(s)
            used += 1
    return out


def _regions_with(plans: Sequence[StepPlan], method: str) -> list[str]:
    return sorted({r for p in plans for r, a in p.actions if a.kind == "forecast" and getattr(a, "method", "") == method})


# --------------------------------------------------------------------------- GOC


@dataclass(frozen=True)
class GOC:
    """Gradient-Optimized Cache: extrapolate a reused feature along its recent gradient.

    ``queue="used"`` (the paper's rule): per region a 2-slot queue of the values *used* at the
    two previous steps (computed or compensated); at a cached step
    ``u_s = u_{s-1} + weight·(u_{s-1} − u_{s-2})`` once both slots hold values of this run,
    else ``u_{s-1}``. This recursion feeds its own errors back and is unstable when applied at
    every cached step (error factor −w at interval 2, −(w + w²) at interval 3).

    ``queue="computed"`` (ours, stable): the gradient is the difference of the last two
    *computed* values divided by their step distance, applied per elapsed step from the last
    computed value: ``u_s = F_c0 + weight·n_s·(F_c0 − F_c1)/(c0 − c1)``, ``n_s`` counting the
    steps after ``c0`` up to ``s`` at which the gradient applies. No compensated value is fed back.

    ``skip_steps``: steps at which no gradient is applied (the inflection points, found by
    :func:`cachecompile.calibrate`); a tuple of steps for every region or ``{region: steps}``.
    ``steps``: if given, the gradient applies only at these steps (a window); elsewhere the
    region is reused without gradient. With ``queue="used"``, a step without gradient uses the
    value of the previous step — our reading of "no gradient"; the paper's code is not public.

    ``allow_divergence``: with ``queue="used"``, a schedule whose error recursion can grow is
    refused when it is resolved (:func:`check_used_queue_stable`: the gain per compute cycle,
    ``−(w + w² + …)`` over the cycle's gradient steps, multiplied over consecutive cycles,
    exceeds 1). ``allow_divergence=True`` runs it anyway: the caching error can then grow
    without bound along the run.

    >>> GOC(weight=1.0, skip_steps=(7,)).to_json()["skip_steps"]
    [7]
    """

    weight: float = 1.2
    skip_steps: tuple[int, ...] | tuple[tuple[str, tuple[int, ...]], ...] = ()
    queue: str = "used"
    steps: tuple[int, ...] | None = None
    allow_divergence: bool = False
    kind: ClassVar[str] = "goc"

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight):
            raise ScheduleError(f"GOC weight must be a finite number (about 0.8–1.2 in the paper), got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if not isinstance(self.queue, str) or self.queue not in ("used", "computed"):
            raise ScheduleError(f"GOC queue must be 'used' (the paper's rule) or 'computed' (stable), got {self.queue!r}")
        skip = self.skip_steps
        if isinstance(skip, Mapping) or (isinstance(skip, (tuple, list)) and skip and isinstance(skip[0], (tuple, list))):
            skip = _per_region("GOC skip_steps", skip)
        else:
            skip = _steps_tuple("GOC skip_steps", skip)
        object.__setattr__(self, "skip_steps", skip)
        if self.steps is not None:
            object.__setattr__(self, "steps", _steps_tuple("GOC steps", self.steps))
        if not isinstance(self.allow_divergence, bool):
            raise ScheduleError(f"GOC allow_divergence must be true or false, got {self.allow_divergence!r}")

    @property
    def per_region(self) -> bool:
        return bool(self.skip_steps) and isinstance(self.skip_steps[0], tuple)

    def skips(self, region: str) -> tuple[int, ...]:
        if self.per_region:
            return dict(self.skip_steps).get(region, ())  # type: ignore[arg-type]
        return self.skip_steps  # type: ignore[return-value]

    def applies(self, region: str, step: int) -> bool:
        """Whether the gradient is applied to ``region`` at ``step`` (not skipped, inside the window)."""
        return step not in self.skips(region) and (self.steps is None or step in self.steps)

    def to_json(self) -> dict[str, Any]:
        skip: Any = {r: list(s) for r, s in self.skip_steps} if self.per_region else list(self.skip_steps)
        out = {
            "kind": self.kind, "weight": self.weight, "queue": self.queue, "skip_steps": skip,
            "steps": None if self.steps is None else list(self.steps),
        }
        if self.allow_divergence:  # only then: the files of stable schedules stay as they were
            out["allow_divergence"] = True
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "GOC":
        o = json_fields(obj, "a GOC compensation", optional=("weight", "queue", "skip_steps", "steps", "allow_divergence"))
        skip = o.get("skip_steps", ())
        if not isinstance(skip, (list, tuple, Mapping)):
            raise ScheduleError(f"GOC skip_steps must be a list of steps or {{region: steps}}, got {skip!r:.80}")
        steps = o.get("steps")
        if steps is not None and not isinstance(steps, (list, tuple)):
            raise ScheduleError(f"GOC steps must be a list of steps or null, got {steps!r:.80}")
        return cls(
            weight=o.get("weight", 1.2), queue=o.get("queue", "used"),
            skip_steps=dict(skip) if isinstance(skip, Mapping) else tuple(skip),
            steps=None if steps is None else tuple(steps),
            allow_divergence=o.get("allow_divergence", False),
        )

    @property
    def order(self) -> int:
        return 1

    def transform(self, rules: list[dict[str, Action]], schedule: Schedule, layout: Layout) -> list[dict[str, Action]]:
        if self.per_region:
            _check_regions("GOC skip_steps", (r for r, _ in self.skip_steps), layout)  # type: ignore[misc]
            for r, steps in self.skip_steps:  # type: ignore[misc]
                _check_steps(f"GOC skip_steps[{r!r}]", steps, schedule.num_steps)
        else:
            _check_steps("GOC skip_steps", self.skip_steps, schedule.num_steps)  # type: ignore[arg-type]
        _check_steps("GOC steps", self.steps or (), schedule.num_steps)
        regions = compensable_regions(rules, "GOC")
        rules = _rewrite(rules, regions, Forecast(method="goc", queue=self.queue, order=1), 1)
        if self.queue == "used" and not self.allow_divergence:
            check_used_queue_stable(self, rules, regions)
        return rules

    def step_values(self, plans: Sequence[StepPlan]) -> dict[str, list[float]]:
        """``{"goc_w:<region>" or "goc_c1:<region>": one value per step}`` (0 at non-forecast steps)."""
        out: dict[str, list[float]] = {}
        for region in _regions_with(plans, "goc"):
            vals = [0.0] * len(plans)
            for s, computed, used in _history(plans, region):
                if self.queue == "used":
                    # the queue is full once two values of this run were used
                    vals[s] = self.weight if used >= 2 and self.applies(region, s) else 0.0
                elif len(computed) >= 2:
                    c0, c1 = computed[-1], computed[-2]
                    n = sum(self.applies(region, t) for t in range(c0 + 1, s + 1))
                    vals[s] = self.weight * n / (c0 - c1)
            out[("goc_w:" if self.queue == "used" else "goc_c1:") + region] = vals
        return out

    def extra_slots(self) -> int:
        """Cache slots per compensated region output beyond plain caching (GOC doubles them)."""
        return 1


register_compensation("goc", GOC.from_json)


def check_used_queue_stable(goc: GOC, rules: Sequence[Mapping[str, Action]], regions: Iterable[str]) -> None:
    """Refuse a used-value GOC queue whose error recursion can grow along the run.

    After a compute step ``c`` the used values are ``u_{c+j} = F_c + (Π w + …)·δ`` with
    ``δ = F_c − u_{c−1}`` (the jump at the compute step, which carries the previous cycle's
    error); at the next compute step the jump is ``(F_{c'} − F_c) − g·δ`` with the cycle's gain
    ``g = Σ_{j≥1} Π_{i≤j} w_{c+i}`` (``w`` the weight applied at each cached step of the cycle,
    0 where no gradient applies). FORA at interval 2: ``g = w``; interval 3: ``g = w + w²``. The
    product of ``|g|`` over consecutive cycles with a gain is how much an error fed back grows;
    above 1 the schedule is refused with a :class:`ScheduleError` (``allow_divergence=True``
    names the risk and runs it).

    >>> layout = Layout(branches=(("attn", "mlp"),))
    >>> len(Schedule.fora(12, 2, compensation=GOC(weight=0.8)).resolve(layout))  # g = 0.8: stable
    12
    >>> Schedule.fora(12, 3, compensation=GOC(weight=0.8)).resolve(layout)  # g = 1.44 # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cachecompile.core.errors.ScheduleError: GOC's used-value queue diverges on this schedule: ...
    """
    worst = (0.0, "", -1)
    for region in regions:
        used, weights, run, run_start, cycle_start = 0, [], 1.0, -1, -1
        for s, acts in enumerate(list(rules) + [{region: COMPUTE}]):  # a final compute closes the last cycle
            a = acts.get(region, COMPUTE)
            if isinstance(a, Forecast):
                weights.append(goc.weight if used >= 2 and goc.applies(region, s) else 0.0)
                used += 1
            elif a.computes:
                if weights:
                    prod, gain = 1.0, 0.0
                    for w in weights:
                        prod *= w
                        gain += prod
                    if gain:  # consecutive cycles that feed errors back multiply their gains
                        run, run_start = (run * abs(gain), run_start) if run_start >= 0 else (abs(gain), cycle_start)
                    else:
                        run, run_start = 1.0, -1
                    if run_start >= 0 and run > worst[0]:
                        worst = (run, region, run_start)
                weights, cycle_start = [], s
                used += 1
    if worst[0] > 1.0:
        gain, region, start = worst
        raise ScheduleError(
            f"GOC's used-value queue diverges on this schedule: an error fed back through the queue grows ×{gain:.3g} "
            f"over the compute cycles from step {start} in {region} (per cycle the factor is −(w + w² + …) over the "
            f"cached steps with a gradient; weight {goc.weight:g}). Use queue='computed' (stable), a smaller weight "
            f"(interval 2: w < 1; interval 3: w < 0.618), a shorter window (steps=...), or pass allow_divergence=True "
            f"to accept that the caching error may grow without bound"
        )


# --------------------------------------------------------------------------- Taylor


@dataclass(frozen=True)
class Taylor:
    """Taylor forecast (beyond the seeds): finite-difference extrapolation of a reused feature
    from its last ``order + 1`` computed values, divided by their true step distances (Newton's
    divided differences, so uneven compute steps are handled exactly). With fewer computed
    values than needed the order drops (one value: plain reuse). GOC with ``queue="computed"``
    and weight 1 is the first order.

    >>> Taylor(order=2).to_json()
    {'kind': 'taylor', 'order': 2}
    """

    order: int = 1
    kind: ClassVar[str] = "taylor"

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, numbers.Integral) or self.order not in (1, 2):
            raise ScheduleError(f"Taylor order must be 1 or 2, got {self.order!r}")
        object.__setattr__(self, "order", int(self.order))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "order": self.order}

    @classmethod
    def from_json(cls, obj: Any) -> "Taylor":
        return cls(order=json_fields(obj, "a Taylor compensation", optional=("order",)).get("order", 1))

    def transform(self, rules: list[dict[str, Action]], schedule: Schedule, layout: Layout) -> list[dict[str, Action]]:
        regions = compensable_regions(rules, "Taylor")
        return _rewrite(rules, regions, Forecast(method="taylor", queue="computed", order=self.order), self.order)

    def step_values(self, plans: Sequence[StepPlan]) -> dict[str, list[float]]:
        """Newton coefficients: ``u = F0 + c1·(F0 − F1) + c2·(F1 − F2)`` with F0 the last computed."""
        out: dict[str, list[float]] = {}
        for region in _regions_with(plans, "taylor"):
            c1s, c2s = [0.0] * len(plans), [0.0] * len(plans)
            for s, computed, _ in _history(plans, region):
                c1s[s], c2s[s] = taylor_coefficients(s, computed[::-1][: self.order + 1])
            out["taylor_c1:" + region] = c1s
            if self.order >= 2:
                out["taylor_c2:" + region] = c2s
        return out

    def extra_slots(self) -> int:
        return self.order


def taylor_coefficients(s: int, history: Sequence[int]) -> tuple[float, float]:
    """Coefficients (c1, c2) of ``F0 + c1·(F0 − F1) + c2·(F1 − F2)``, the polynomial through
    ``(history[i], F_i)`` (most recent first) evaluated at step ``s``.

    >>> taylor_coefficients(5, [4, 2])   # first order: (5 − 4) / (4 − 2)
    (0.5, 0.0)
    >>> taylor_coefficients(3, [2, 1, 0])  # second order, unit spacing: 3·ΔF0 − ... (see tests)
    (2.0, -1.0)
    """
    if len(history) < 2:
        return 0.0, 0.0
    c0, c1 = history[0], history[1]
    a = (s - c0) / (c0 - c1)
    if len(history) < 3:
        return a, 0.0
    c2 = history[2]
    q = (s - c0) * (s - c1)
    return a + q / ((c0 - c1) * (c0 - c2)), -q / ((c1 - c2) * (c0 - c2))


register_compensation("taylor", Taylor.from_json)


# --------------------------------------------------------------------------- EOC


@dataclass(frozen=True)
class PriorTable:
    """An immutable float32 table (shape + raw bytes): hashable, exact through JSON (base64)."""

    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, value: Any) -> "PriorTable":
        if isinstance(value, PriorTable):
            return value
        if isinstance(value, Mapping):  # the JSON form
            o = json_fields(value, "an EOC prior table", required=("shape", "data"), optional=("dtype",))
            if o.get("dtype", "float32") != "float32":
                raise ScheduleError(f"EOC prior tables are float32, got {o.get('dtype')!r:.40}")
            shape = o["shape"]
            if not isinstance(shape, (list, tuple)):
                raise ScheduleError(f"an EOC prior table's shape is a list of sizes, got {shape!r:.80}")
            shape = tuple(check_int("an EOC prior table's size", d, minimum=0) for d in shape)
            try:
                raw = base64.b64decode(o["data"], validate=True)
            except (TypeError, ValueError) as e:
                raise ScheduleError(f"an EOC prior table's data is not base64 ({e}); calibrate again (cc.calibrate)") from None
            if len(raw) != 4 * math.prod(shape):
                raise ScheduleError(
                    f"an EOC prior table of shape {list(shape)} needs {4 * math.prod(shape)} bytes of float32, its data "
                    f"has {len(raw)}; calibrate again (cc.calibrate)"
                )
            return cls(shape, raw)
        t = torch.as_tensor(value).detach().to("cpu", torch.float32).contiguous()
        return cls(tuple(t.shape), t.numpy().tobytes())

    def tensor(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.data), dtype=torch.float32).reshape(self.shape).clone()

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": "float32", "data": base64.b64encode(self.data).decode("ascii")}

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class EOC:
    """Error-Optimized Cache: ``u_s = u_cached ⊙ (1 + theta·E[r, s])`` at the judged cached steps.

    ``prior``: ``{region output slot: E}`` with ``E[s]`` the calibrated trend of the region's
    feature at step ``s`` (``P[s] − P[s−1]`` of the mean trajectory ``P``, ``E[0] = 0``). By
    default one vector per step over the feature's last (channel) dimension, shape
    ``[num_steps, C]`` — our reduction, so the prior is small and independent of batch and
    resolution; the full form ``[num_steps, *feature_shape]`` is accepted too.
    ``judged``: ``{region: steps}`` — the cached steps whose calibrated caching error is above
    ``threshold`` (the paper's judgment); ``None`` optimises every cached step. Other cached
    steps of a region with a prior are plain reuse. Regions without a prior are not compensated.
    ``threshold`` records the threshold calibration used (relative L1 caching error).

    Build one with :func:`cachecompile.calibrate`, or by hand::

        >>> import torch
        >>> e = EOC(theta=0.01, prior={"blocks.0.attn": torch.zeros(4, 16)})
        >>> e.prior_tensor("blocks.0.attn").shape
        torch.Size([4, 16])
    """

    theta: float = 0.01
    prior: Any = field(default=None, repr=False)
    threshold: float | None = None
    judged: Any = None
    kind: ClassVar[str] = "eoc"

    def __post_init__(self) -> None:
        if isinstance(self.theta, bool) or not isinstance(self.theta, numbers.Real) or not math.isfinite(self.theta):
            raise ScheduleError(f"EOC theta must be a finite number (about 0.01 in the paper), got {self.theta!r}")
        object.__setattr__(self, "theta", float(self.theta))
        if self.prior is not None:
            if not isinstance(self.prior, (Mapping, list, tuple)):
                raise ScheduleError(f"EOC prior must map region output slots to tables, got {type(self.prior).__name__}")
            items = self.prior.items() if isinstance(self.prior, Mapping) else self.prior
            tables = tuple(sorted((str(k), PriorTable.of(v)) for k, v in items))
            for k, t in tables:
                if len(t.shape) < 2:
                    raise ScheduleError(
                        f"EOC prior for {k!r} has shape {list(t.shape)}; expected [num_steps, channels] "
                        f"(or [num_steps, *feature_shape])"
                    )
            object.__setattr__(self, "prior", tables)
        if self.judged is not None:
            object.__setattr__(self, "judged", _per_region("EOC judged", self.judged))
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) or not math.isfinite(self.threshold):
                raise ScheduleError(f"EOC threshold must be a finite number or None, got {self.threshold!r}")
            object.__setattr__(self, "threshold", float(self.threshold))

    def __repr__(self) -> str:
        prior = "None" if not self.prior else f"<{len(self.prior)} tables, {self.prior[0][1].shape[0]} steps>"
        judged = "None" if self.judged is None else f"<{sum(len(s) for _, s in self.judged)} steps>"
        return f"EOC(theta={self.theta}, prior={prior}, threshold={self.threshold}, judged={judged})"

    @property
    def priors(self) -> dict[str, PriorTable]:
        return dict(self.prior or ())

    def prior_tensor(self, slot: str) -> torch.Tensor:
        """The trend table ``E`` of ``slot`` as a float32 tensor ``[num_steps, ...]``."""
        return self.priors[slot].tensor()

    def is_judged(self, region: str, step: int) -> bool:
        return self.judged is None or step in dict(self.judged).get(region, ())

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "theta": self.theta, "threshold": self.threshold,
            "judged": None if self.judged is None else {r: list(s) for r, s in self.judged},
            "prior": {k: t.to_json() for k, t in self.prior or ()},
        }

    @classmethod
    def from_json(cls, obj: Any) -> "EOC":
        o = json_fields(obj, "an EOC compensation", optional=("theta", "prior", "threshold", "judged"))
        prior = o.get("prior") or None
        if prior is not None and not isinstance(prior, Mapping):
            raise ScheduleError(f"EOC prior must map region output slots to tables, got {prior!r:.80}")
        return cls(theta=o.get("theta", 0.01), prior=prior, threshold=o.get("threshold"), judged=o.get("judged"))

    def transform(self, rules: list[dict[str, Action]], schedule: Schedule, layout: Layout) -> list[dict[str, Action]]:
        if not self.prior:
            raise ScheduleError(
                "EOC needs a prior (the calibrated feature trend per region and step): build the schedule "
                "with cc.calibrate(model, schedule, ..., compensation='eoc') or pass prior={region: tensor}"
            )
        priors = self.priors
        _check_regions("EOC prior", priors, layout)
        if self.judged is not None:
            _check_regions("EOC judged", (r for r, _ in self.judged), layout)
        for slot, t in priors.items():
            if t.shape[0] != schedule.num_steps:
                raise ScheduleError(
                    f"EOC prior for {slot!r} has {t.shape[0]} rows but the schedule has {schedule.num_steps} steps; "
                    f"calibrate again for {schedule.num_steps} steps"
                )
        forecasts = {}
        for r in compensable_regions(rules, "EOC"):
            slots = sorted(k for k in priors if k == r or k.startswith(r + "#"))
            if slots:
                shapes = tuple(priors[k].shape for k in sorted(slots, key=_slot_index))
                forecasts[r] = Forecast(method="eoc", queue="computed", order=0, prior_shapes=shapes)
        if not forecasts:
            raise ScheduleError(
                f"EOC has priors for {sorted(priors)} but the schedule compensates none of them (they are not "
                f"reused, or only partially); calibrate the prior with this schedule (cc.calibrate)"
            )
        return _rewrite(rules, forecasts, forecasts, 0)

    def step_values(self, plans: Sequence[StepPlan]) -> dict[str, list[float]]:
        """``{"eoc_scale:<region>": theta at judged forecast steps, else 0}``."""
        out: dict[str, list[float]] = {}
        for region in _regions_with(plans, "eoc"):
            vals = [0.0] * len(plans)
            for s, _, _ in _history(plans, region):
                vals[s] = self.theta if self.is_judged(region, s) else 0.0
            out["eoc_scale:" + region] = vals
        return out

    def extra_slots(self) -> int:
        return 0


def _slot_index(slot: str) -> int:
    return int(slot.partition("#")[2] or 0)


register_compensation("eoc", EOC.from_json)


# --------------------------------------------------------------------------- per-step inputs

# Prefixes of the per-step graph inputs the forecasts read (see the module docstring).
STEP_INPUT_PREFIXES = ("goc_w", "goc_c1", "taylor_c1", "taylor_c2", "eoc_scale", "eoc_prior", "eoc_row")


def step_values(
    schedule: Schedule, plans: Sequence[StepPlan], names: Sequence[str], device: torch.device
) -> dict[str, list[torch.Tensor]]:
    """The values of the compensation's per-step graph inputs among ``names``, one per step:
    computed once, up front, from the resolved plans (they depend only on the step)."""
    mine = [n for n in names if n.partition(":")[0] in STEP_INPUT_PREFIXES]
    if not mine:
        return {}
    comp = schedule.compensation
    if comp is None:
        raise ScheduleError(f"the step graphs take compensation inputs {mine} but the schedule has no compensation")
    scalars = comp.step_values(plans)
    n = len(plans)
    out: dict[str, list[torch.Tensor]] = {}
    for name in mine:
        prefix, _, slot = name.partition(":")
        if prefix == "eoc_row":
            out[name] = [torch.tensor([s], dtype=torch.int64, device=device) for s in range(n)]
        elif prefix == "eoc_prior":
            out[name] = [comp.prior_tensor(slot).to(device)] * n
        else:
            key = f"{prefix}:{slot.partition('#')[0]}"
            if key not in scalars:
                raise ScheduleError(f"the schedule's compensation has no per-step values for step input {name!r}")
            out[name] = [torch.tensor(v, dtype=torch.float32, device=device) for v in scalars[key]]
    return out


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryReport:
    """Cache bytes of a prepared model (per call within a step): every slot except the
    compensation's older values (``plain_bytes``: what the schedule holds without compensation),
    all slots (``cache_bytes``), and EOC's prior tables. ``extra_bytes`` is what the
    compensation costs."""

    plain_bytes: int
    cache_bytes: int
    prior_bytes: int

    @property
    def extra_bytes(self) -> int:
        return self.cache_bytes - self.plain_bytes + self.prior_bytes


def is_history_slot(slot: str) -> bool:
    """True for an older value ``<slot>@h<k>`` kept by a forecast (see :func:`history_slots`)."""
    base, sep, k = slot.rpartition("@h")
    return bool(sep and base and k.isdigit())


def memory_report(cached: Any) -> MemoryReport:
    """Measure the cache slots of a prepared :class:`~cachecompile.CachedTransformer` (per call
    within a step) from its step graphs: GOC and Taylor-1 double the slots of the regions they
    compensate (one ``@h1`` slot each), Taylor-2 triples them, EOC adds its prior tables.

    >>> rep = memory_report(cached)          # doctest: +SKIP
    >>> rep.extra_bytes == rep.plain_bytes   # GOC on every cached region   # doctest: +SKIP
    True
    """
    if not getattr(cached, "is_captured", False):
        raise RuntimeError("memory_report needs a prepared model: call it after the first call (or cached.prepare(...))")
    slots: dict[str, int] = {}
    priors: dict[str, int] = {}
    for gm in cached.step_graphs.values():
        io = cache_io(gm)
        outs = gm.graph.output_node().args[0][io.num_user_outputs:]
        for slot, node in zip(io.cache_outputs, outs):
            slots[slot] = _nbytes(node.meta["val"])
        nodes = {n.name: n for n in gm.graph.nodes}
        for name in io.step_inputs:
            if name.startswith("eoc_prior:"):
                priors[name] = _nbytes(nodes[io.placeholders[name]].meta["val"])
    history = sum(b for s, b in slots.items() if is_history_slot(s))
    return MemoryReport(sum(slots.values()) - history, sum(slots.values()), sum(priors.values()))


def _nbytes(val: Any) -> int:
    return int(math.prod(val.shape)) * val.element_size() if hasattr(val, "element_size") else 0
