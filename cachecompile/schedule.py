"""Cache schedules: declarative data, resolved to one :class:`StepPlan` per sampling step.

A :class:`Schedule` knows nothing about a particular model. It is a method name, its parameters
and (for masks) an explicit table; :meth:`Schedule.resolve` turns it into concrete per-region
actions once the model's regions are known. Methods are registered in ``_METHODS`` (the torchao
shape: data first, behaviour registered), so a new preset is a function, not a code path.

Example::

    >>> import cachecompile as cc
    >>> s = cc.Schedule.fora(num_steps=6, interval=3)
    >>> s.step_kinds()
    ['full', 'cached', 'cached', 'full', 'cached', 'cached']
    >>> cc.Schedule.loads(s.dumps()) == s
    True
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "Action",
    "Compute",
    "Reuse",
    "COMPUTE",
    "REUSE",
    "Layout",
    "StepPlan",
    "Schedule",
    "ScheduleError",
    "register_method",
    "register_rule_transform",
]

FORMAT = "cachecompile.schedule/1"


class ScheduleError(ValueError):
    """A schedule that cannot be built or does not fit the model."""


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """What a step does with one region. Subclasses are frozen, hashable data."""

    kind: str = "compute"

    def to_json(self) -> Any:
        return self.kind

    @property
    def reads_cache(self) -> bool:
        return self.kind != "compute"

    @property
    def computes(self) -> bool:
        """True when the region runs (fully or partly) and so refreshes its cache slot."""
        return self.kind in ("compute", "partial")


@dataclass(frozen=True)
class Compute(Action):
    kind: str = "compute"


@dataclass(frozen=True)
class Reuse(Action):
    kind: str = "reuse"


COMPUTE = Compute()
REUSE = Reuse()

_ACTION_PARSERS: dict[str, Callable[[Any], Action]] = {
    "compute": lambda _: COMPUTE,
    "reuse": lambda _: REUSE,
}


def register_action(kind: str, parser: Callable[[Any], Action]) -> None:
    """Register how an action kind is read back from a schedule file (for new actions)."""
    _ACTION_PARSERS[kind] = parser


def action_from_json(obj: Any) -> Action:
    kind = obj if isinstance(obj, str) else obj.get("kind")
    if kind not in _ACTION_PARSERS:
        _load_builtin_methods()
    if kind not in _ACTION_PARSERS:
        _load_builtin_kinds()
    if kind not in _ACTION_PARSERS:
        raise ScheduleError(f"unknown action {obj!r}; known kinds: {sorted(_ACTION_PARSERS)}")
    return _ACTION_PARSERS[kind](obj)


# Compensations (GOC, EOC, Taylor ...) are frozen dataclasses with ``kind``, ``to_json()`` and
# ``transform(rules, schedule, layout) -> rules``; they are read back from files by kind.
_COMPENSATIONS: dict[str, Callable[[Any], Any]] = {}


def register_compensation(kind: str, parser: Callable[[Any], Any]) -> None:
    """Register how a compensation kind is read back from a schedule file."""
    _COMPENSATIONS[kind] = parser


def _load_builtin_kinds() -> None:
    """The built-in compensations (GOC, EOC, Taylor) and their actions register on import, so a
    schedule file that uses them loads in a fresh process."""
    import cachecompile.compensation  # noqa: F401


def _load_builtin_methods() -> None:
    """The methods beyond the core presets (toca, duca) and their actions register on import, so
    a schedule file that uses them loads in a fresh process."""
    import cachecompile.methods.dual  # noqa: F401


def compensation_from_json(obj: Any) -> Any:
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    if kind not in _COMPENSATIONS:
        _load_builtin_kinds()
    if kind not in _COMPENSATIONS:
        raise ScheduleError(f"unknown compensation {obj!r}; known kinds: {sorted(_COMPENSATIONS)}")
    return _COMPENSATIONS[kind](obj)


# --------------------------------------------------------------------------- layout & plan


@dataclass(frozen=True)
class Layout:
    """The model facts a schedule needs: blocks and the branch regions inside each block.

    ``branches[i]`` lists the branch kinds of block i (``("attn", "mlp")`` for DiT).
    Region names are ``blocks.{i}.{kind}``, ``blocks.{i}`` and ``stack``.
    """

    branches: tuple[tuple[str, ...], ...]
    has_stack: bool = True

    @property
    def num_blocks(self) -> int:
        return len(self.branches)

    def region_names(self) -> list[str]:
        names = [f"blocks.{i}.{k}" for i, kinds in enumerate(self.branches) for k in kinds]
        names += [f"blocks.{i}" for i in range(self.num_blocks)]
        if self.has_stack:
            names.append("stack")
        return names

    def branch_regions(self, kinds: Iterable[str] | None = None) -> list[str]:
        wanted = None if kinds is None else set(kinds)
        return [
            f"blocks.{i}.{k}"
            for i, ks in enumerate(self.branches)
            for k in ks
            if wanted is None or k in wanted
        ]


@dataclass(frozen=True)
class StepPlan:
    """The resolved actions of one step: every region not listed is computed.

    ``writes`` are the regions whose freshly computed value this step stores for a later step.
    Equal plans share one step graph.
    """

    actions: tuple[tuple[str, Action], ...] = ()
    writes: frozenset[str] = frozenset()

    def action(self, region: str) -> Action:
        return dict(self.actions).get(region, COMPUTE)

    @property
    def reads(self) -> list[str]:
        return [r for r, a in self.actions if a.reads_cache]

    @property
    def is_full(self) -> bool:
        # A compute action may carry extra state to keep (methods.dual.Record): still full.
        return all(a.kind == "compute" for _, a in self.actions)

    def describe(self) -> str:
        if self.is_full:
            return "compute all"
        kinds: dict[str, int] = {}
        for _, a in self.actions:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        return ", ".join(f"{n}×{k}" for k, n in sorted(kinds.items()))


# --------------------------------------------------------------------------- methods

# A method maps (schedule, layout) to one {region: action} dict per step (compute omitted).
StepRule = Callable[["Schedule", Layout], list[dict[str, Action]]]
_METHODS: dict[str, StepRule] = {}


def register_method(name: str) -> Callable[[StepRule], StepRule]:
    """Register a schedule method: ``fn(schedule, layout) -> [ {region: Action} per step ]``."""

    def deco(fn: StepRule) -> StepRule:
        _METHODS[name] = fn
        return fn

    return deco


# Rule transforms run on every method's rules after shadowed actions are dropped and the
# compensation is applied, before writes are attached: fn(rules, schedule, layout) -> rules.
# methods.dual uses one to record, at compute steps, the state that later partial steps read.
_RULE_TRANSFORMS: list[Callable[[list[dict[str, Action]], "Schedule", Layout], list[dict[str, Action]]]] = []


def register_rule_transform(fn: Callable[[list[dict[str, Action]], "Schedule", Layout], list[dict[str, Action]]]) -> None:
    """Register a transform applied to the resolved rules of every schedule (see ``_RULE_TRANSFORMS``)."""
    if fn not in _RULE_TRANSFORMS:
        _RULE_TRANSFORMS.append(fn)


@register_method("fora")
def _fora_rule(s: "Schedule", layout: Layout) -> list[dict[str, Action]]:
    interval = s.params["interval"]
    cached = {r: REUSE for r in layout.branch_regions()}
    return [{} if step % interval == 0 else dict(cached) for step in range(s.num_steps)]


@register_method("mask")
def _mask_rule(s: "Schedule", layout: Layout) -> list[dict[str, Action]]:
    mask = s.mask
    assert mask is not None
    if len(mask[0]) != layout.num_blocks:
        raise ScheduleError(
            f"the mask has {len(mask[0])} blocks per step but the model has {layout.num_blocks}; "
            f"build the mask with shape [num_steps={s.num_steps}][{layout.num_blocks}][2]"
        )
    kinds = s.params.get("branches", ["attn", "mlp"])
    steps = []
    for row in mask:
        acts: dict[str, Action] = {}
        for b, flags in enumerate(row):
            for kind, flag in zip(kinds, flags):
                region = f"blocks.{b}.{kind}"
                if not flag:
                    acts[region] = REUSE
        steps.append(acts)
    return steps


@register_method("explicit")
def _explicit_rule(s: "Schedule", layout: Layout) -> list[dict[str, Action]]:
    return [dict(step) for step in s.steps]


# --------------------------------------------------------------------------- schedule


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScheduleError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """A declarative cache schedule. Build one with a preset, never by hand.

    Presets: :meth:`fora`, :meth:`from_mask`, :meth:`explicit`. Save with :meth:`save`,
    read back with :meth:`load`; ``print(schedule)`` shows the step × block table.
    """

    num_steps: int
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    mask: tuple[tuple[tuple[bool, ...], ...], ...] | None = None
    steps: tuple[tuple[tuple[str, Action], ...], ...] | None = None
    compensation: Any = None  # a registered compensation (GOC, EOC, Taylor ...): see register_compensation

    def __post_init__(self) -> None:
        _check_positive_int("num_steps", self.num_steps)
        if self.method not in _METHODS:
            _load_builtin_methods()
        if self.method not in _METHODS:
            raise ScheduleError(f"unknown schedule method {self.method!r}; known: {sorted(_METHODS)}")
        # Freeze params so the schedule is hashable and equal after a save/load round trip.
        object.__setattr__(self, "params", _FrozenDict(self.params))

    def __hash__(self) -> int:
        return hash((self.num_steps, self.method, hash(self.params), self.mask, self.steps, self.compensation))

    # ----------------------------------------------------------------- presets
    def with_compensation(self, compensation: Any) -> "Schedule":
        """The same schedule with its ``reuse`` actions compensated (``cc.GOC(...)`` ...)."""
        return dataclasses.replace(self, compensation=compensation)

    @classmethod
    def fora(cls, num_steps: int, interval: int, *, compensation: Any = None) -> "Schedule":
        """FORA: step ``s`` computes everything when ``s % interval == 0``; other steps reuse
        every block's attention and MLP output (taken before the adaLN gate).

        >>> Schedule.fora(4, 2).step_kinds()
        ['full', 'cached', 'full', 'cached']
        """
        _check_positive_int("interval", interval)
        return cls(num_steps=num_steps, method="fora", params={"interval": interval}, compensation=compensation)

    @classmethod
    def from_mask(cls, mask: Any, branches: Sequence[str] = ("attn", "mlp"), *, compensation: Any = None) -> "Schedule":
        """A Learning-to-Cache style mask: ``mask[step][block][branch]`` is 1 to compute, 0 to
        reuse. ``mask`` may be nested lists, a numpy array, a torch tensor, or a path to a
        ``.json`` (nested lists) / ``.npy`` / ``.pt`` file.

        >>> Schedule.from_mask([[[1, 1]], [[0, 1]]]).num_steps
        2
        """
        mask = _load_mask(mask)
        if not mask or not mask[0]:
            raise ScheduleError("the mask is empty; expected shape [num_steps][num_blocks][2]")
        nb = len(mask[0])
        for s, row in enumerate(mask):
            if len(row) != nb or any(len(f) != len(branches) for f in row):
                raise ScheduleError(
                    f"the mask is ragged or of the wrong shape at step {s}: expected "
                    f"[num_steps][{nb}][{len(branches)}] of 0/1 (branches {list(branches)})"
                )
        frozen = tuple(tuple(tuple(bool(v) for v in flags) for flags in row) for row in mask)
        return cls(
            num_steps=len(frozen), method="mask", params={"branches": list(branches)}, mask=frozen, compensation=compensation
        )

    @classmethod
    def explicit(cls, steps: Sequence[Mapping[str, str | Action]], *, compensation: Any = None) -> "Schedule":
        """One dict per step mapping region names (``blocks.3.mlp``, ``stack`` ...) to actions
        (``"reuse"``, ``"compute"`` or an :class:`Action`); regions not named are computed.

        >>> Schedule.explicit([{}, {"blocks.0.attn": "reuse"}]).num_steps
        2
        """
        frozen = tuple(
            tuple(sorted((r, a if isinstance(a, Action) else action_from_json(a)) for r, a in step.items()))
            for step in steps
        )
        return cls(num_steps=len(frozen), method="explicit", steps=frozen, compensation=compensation)

    @classmethod
    def toca(
        cls, num_steps: int, interval: int, fresh_ratio: Any, score: Any = "v_norm", *, seed: int = 0, compensation: Any = None
    ) -> "Schedule":
        """ToCa: full steps every ``interval``; other steps reuse attention and recompute each
        MLP for the ``round(fresh_ratio × tokens)`` top-scoring tokens. ``fresh_ratio``: a number,
        a per-block list or a [step][block] table; ``score``: ``v_norm``, ``attention``,
        ``random``, ``staleness`` or a weighted sum (``"v_norm+0.25*staleness"``).
        See :mod:`cachecompile.methods.dual`.

        >>> Schedule.toca(4, 2, 0.25).step_kinds()
        ['full', 'conservative', 'full', 'conservative']
        """
        from cachecompile.methods.dual import toca_schedule

        return toca_schedule(num_steps, interval, fresh_ratio, score, seed=seed, compensation=compensation)

    @classmethod
    def duca(
        cls,
        num_steps: int,
        interval: int,
        fresh_ratio: Any,
        score: Any = "v_norm",
        aggressive_reuse: str = "output",
        *,
        seed: int = 0,
        compensation: Any = None,
    ) -> "Schedule":
        """DuCa: ``s % interval == 0`` full; ``(s % interval)`` odd: conservative (a ToCa step);
        even: aggressive, the whole block stack reused (``aggressive_reuse="output"``: its cached
        output; ``"residual"``: this step's stack input + cached (output − input)).
        See :mod:`cachecompile.methods.dual`.

        >>> Schedule.duca(4, 4, 0.3).step_kinds()
        ['full', 'conservative', 'aggressive', 'conservative']
        """
        from cachecompile.methods.dual import duca_schedule

        return duca_schedule(
            num_steps, interval, fresh_ratio, score, aggressive_reuse, seed=seed, compensation=compensation
        )

    def flops_ratio(self, model: Any, class_labels: Any, **sample_kwargs: Any) -> float:
        """FLOPs of a whole uncached sampling run ÷ FLOPs of the same run under this schedule
        (``torch.utils.flop_counter``, :func:`cachecompile.sampling.ddim_sample`): the speedup
        limit of the schedule. See :func:`cachecompile.flops.flops_ratio`."""
        from cachecompile.flops import flops_ratio

        return flops_ratio(model, self, class_labels, **sample_kwargs)

    # ----------------------------------------------------------------- resolution
    def resolve(self, layout: Layout) -> list[StepPlan]:
        """Per-step plans for a model with this ``layout``. Raises :class:`ScheduleError` for
        unknown regions and for a reuse before the region was ever computed."""
        rules = _METHODS[self.method](self, layout)
        if len(rules) != self.num_steps:
            raise ScheduleError(f"method {self.method!r} produced {len(rules)} steps, expected {self.num_steps}")
        known = set(layout.region_names())
        for s, acts in enumerate(rules):
            unknown = sorted(set(acts) - known)
            if unknown:
                raise ScheduleError(
                    f"step {s} names region(s) {unknown} that the model does not have; "
                    f"regions are: {_summarise_names(sorted(known))}"
                )
        rules = [_drop_shadowed(acts) for acts in rules]
        if self.compensation is not None:
            # A compensation turns some reuse actions into forecast actions (and may add state).
            rules = self.compensation.transform(rules, self, layout)
        for transform in _RULE_TRANSFORMS:
            rules = transform(rules, self, layout)
        return _plans_with_writes(rules)

    def step_kinds(self) -> list[str]:
        """A short label per step: ``full`` or ``cached`` (methods may refine the labels)."""
        label = _STEP_LABELS.get(self.method)
        if label is not None:
            return [label(self, s) for s in range(self.num_steps)]
        if self.method == "mask":
            assert self.mask is not None
            return ["full" if all(all(f) for f in row) else "cached" for row in self.mask]
        assert self.steps is not None
        return ["full" if not step else "cached" for step in self.steps]

    # ----------------------------------------------------------------- io
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "num_steps": self.num_steps, "method": self.method}
        d["params"] = _jsonable(dict(self.params))
        if self.mask is not None:
            d["mask"] = [[[int(v) for v in f] for f in row] for row in self.mask]
        if self.steps is not None:
            d["steps"] = [{r: a.to_json() for r, a in step} for step in self.steps]
        if self.compensation is not None:
            d["compensation"] = self.compensation.to_json()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        if d.get("format") != FORMAT:
            raise ScheduleError(f"not a cachecompile schedule (format {d.get('format')!r}, expected {FORMAT!r})")
        params = _unjson(d.get("params", {}))
        mask = d.get("mask")
        steps = d.get("steps")
        comp = d.get("compensation")
        return cls(
            num_steps=d["num_steps"],
            method=d["method"],
            params=params,
            compensation=None if comp is None else compensation_from_json(comp),
            mask=None if mask is None else tuple(tuple(tuple(bool(v) for v in f) for f in row) for row in mask),
            steps=None
            if steps is None
            else tuple(tuple(sorted((r, action_from_json(a)) for r, a in st.items())) for st in steps),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> "Schedule":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the schedule as JSON (human-readable, diffable)."""
        Path(path).write_text(self.dumps() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        return cls.loads(Path(path).read_text())

    # ----------------------------------------------------------------- display
    def __str__(self) -> str:
        return format_table(self)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        comp = f", compensation={self.compensation!r}" if self.compensation is not None else ""
        return f"Schedule.{self.method}(num_steps={self.num_steps}{', ' if params else ''}{params}{comp})"


# Methods may register a per-step label (used by print and the bench's per-step timing).
_STEP_LABELS: dict[str, Callable[[Schedule, int], str]] = {
    "fora": lambda s, step: "full" if step % s.params["interval"] == 0 else "cached",
}


def register_step_label(method: str, fn: Callable[[Schedule, int], str]) -> None:
    _STEP_LABELS[method] = fn


# --------------------------------------------------------------------------- helpers


class _FrozenDict(dict):
    """A dict that refuses mutation, so a Schedule stays immutable and hashable."""

    def _refuse(self, *a: Any, **k: Any) -> None:
        raise TypeError("schedule parameters are immutable; build a new Schedule")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(_jsonable(dict(self)), sort_keys=True))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Action):
        return obj.to_json()
    if hasattr(obj, "to_json"):
        return obj.to_json()
    return obj


def _unjson(obj: Any) -> Any:
    return obj


def _load_mask(mask: Any) -> list:
    if isinstance(mask, (str, Path)):
        p = Path(mask)
        if p.suffix == ".json":
            mask = json.loads(p.read_text())
        elif p.suffix == ".npy":
            import numpy as np

            mask = np.load(p)
        elif p.suffix in (".pt", ".pth"):
            import torch

            mask = torch.load(p, weights_only=True)
        else:
            raise ScheduleError(f"cannot read a mask from {p}: use .json, .npy or .pt")
    if hasattr(mask, "tolist"):
        mask = mask.tolist()
    if not isinstance(mask, (list, tuple)):
        raise ScheduleError(f"a mask must be nested lists [step][block][branch], got {type(mask).__name__}")
    return [list(row) for row in mask]


def _drop_shadowed(acts: dict[str, Action]) -> dict[str, Action]:
    """A region inside a reused stack or block never runs: its own action is meaningless."""
    out = dict(acts)
    outer = [r for r, a in acts.items() if not a.computes and (r == "stack" or r.count(".") == 1)]
    for region in list(out):
        for o in outer:
            inside = o == "stack" and region.startswith("blocks.") or region.startswith(o + ".")
            if region != o and inside:
                del out[region]
    return out


def _plans_with_writes(rules: list[dict[str, Action]]) -> list[StepPlan]:
    """Attach cache writes and check every read has a value computed earlier in the run.

    A region is written at every step that computes it, if any step reads it: one rule for all
    steps keeps full steps identical, so they share one graph.
    """
    read_anywhere = {r for acts in rules for r, a in acts.items() if a.reads_cache}
    computed: set[str] = set()
    plans = []
    for s, acts in enumerate(rules):
        for region, a in acts.items():
            if a.reads_cache and region not in computed:
                raise ScheduleError(
                    f"step {s} reuses region {region!r} before any step computed it; "
                    f"the first step of a schedule must compute every region it later reuses"
                )
        skipped = _skipped_regions(acts, read_anywhere)
        writes = frozenset(r for r in read_anywhere if r not in skipped and _runs(r, acts))
        computed |= writes
        plans.append(StepPlan(actions=tuple(sorted(acts.items())), writes=writes))
    return plans


def _skipped_regions(acts: dict[str, Action], regions: set[str]) -> set[str]:
    """Regions that do not run this step because they or an enclosing region are reused."""
    reused = {r for r, a in acts.items() if not a.computes}
    out = set()
    for r in regions:
        if r in reused:
            out.add(r)
        elif "stack" in reused and r.startswith("blocks."):
            out.add(r)
        elif any(r.startswith(o + ".") for o in reused if o.count(".") == 1):
            out.add(r)
    return out


def _runs(region: str, acts: dict[str, Action]) -> bool:
    return acts.get(region, COMPUTE).computes


def _summarise_names(names: list[str], limit: int = 12) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... ({len(names)} in all)"


def format_table(s: Schedule, layout: Layout | None = None) -> str:
    """The step × block picture: one row per step; per block ``A``/``M`` when attention/MLP is
    computed, ``·`` when reused, ``p`` when partially recomputed, ``~`` when forecast,
    ``S`` when the whole stack is reused."""
    if layout is None:
        nb = len(s.mask[0]) if s.mask is not None else None
        layout = Layout(branches=(("attn", "mlp"),) * nb) if nb else None
    kinds = s.step_kinds()
    lines = [repr(s)]
    if layout is None:
        # Model not known yet: one column stands for every block.
        lines.append("step  kind          all blocks")
        generic = Layout(branches=(("attn", "mlp"),))
        rules = _METHODS[s.method](s, generic)
        for step, acts in enumerate(rules):
            lines.append(f"{step:>4}  {kinds[step]:<12}  {_cell(acts, 0, generic)}")
        return "\n".join(lines)
    rules = _METHODS[s.method](s, layout)
    header = " ".join(f"{b:>2}" for b in range(layout.num_blocks))
    lines.append(f"step  kind          blocks {header}")
    for step, acts in enumerate(rules):
        cells = " ".join(f"{_cell(acts, b, layout):>2}" for b in range(layout.num_blocks))
        lines.append(f"{step:>4}  {kinds[step]:<12}         {cells}")
    return "\n".join(lines)


_LETTERS = {"attn": "A", "mlp": "M"}
_MARKS = {"reuse": "·", "partial": "p", "forecast": "~"}


def _cell(acts: Mapping[str, Action], block: int, layout: Layout) -> str:
    if not acts.get("stack", COMPUTE).computes or not acts.get(f"blocks.{block}", COMPUTE).computes:
        return "S" * len(layout.branches[block][:2])
    out = ""
    for kind in layout.branches[block][:2]:
        a = acts.get(f"blocks.{block}.{kind}", COMPUTE)
        out += _LETTERS.get(kind, kind[0].upper()) if a.kind == "compute" else _MARKS.get(a.kind, "?")
    return out
