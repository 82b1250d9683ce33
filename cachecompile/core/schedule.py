"""Cache schedules: declarative data, resolved to one :class:`StepPlan` per sampling step.

A :class:`Schedule` knows nothing about a particular model. It is a method name, its parameters
and (for masks) an explicit table; :meth:`Schedule.resolve` turns it into concrete per-region
actions once the model's regions are known. This module is data only: each method's behaviour
(how its parameters are checked, its per-step rules, its step labels) is a :class:`Method`
registered by its own module under :mod:`cachecompile.methods` (the torchao shape: data first,
behaviour registered), which ``import cachecompile`` loads. See ``docs/design.md``.

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
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from cachecompile.core.errors import ScheduleError, StepMismatchError

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
    "Method",
    "register_method",
    "register_action",
    "register_compensation",
    "register_rule_transform",
    "json_fields",
    "state_tokens",
    "CACHE_DTYPES",
    "register_cache_sizer",
    "cache_dtype_name",
]

FORMAT = "cachecompile.core.schedule/1"


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


def _plain(action: Action) -> Callable[[Any], Action]:
    """The parser of an action without parameters: ``"reuse"`` or ``{"kind": "reuse"}``."""

    def parse(obj: Any) -> Action:
        if not isinstance(obj, str):
            json_fields(obj, f"a {action.kind} action")
        return action

    return parse


_ACTION_PARSERS: dict[str, Callable[[Any], Action]] = {"compute": _plain(COMPUTE), "reuse": _plain(REUSE)}


def register_action(kind: str, parser: Callable[[Any], Action]) -> None:
    """Register how an action kind is read back from a schedule file (for new actions)."""
    _ACTION_PARSERS[kind] = parser


def json_fields(obj: Any, what: str, required: Sequence[str] = (), optional: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object ``obj`` of a schedule file (an action, a compensation) as a dict with every
    ``required`` key and no key outside ``required``, ``optional`` and ``kind``; a
    :class:`ScheduleError` names a misspelled, stray or missing key, so nothing is silently dropped.

    >>> json_fields({"kind": "goc", "weight": 1.0}, "GOC", optional=("weight", "queue"))
    {'kind': 'goc', 'weight': 1.0}
    """
    if not isinstance(obj, Mapping):
        raise ScheduleError(f"{what} must be a JSON object, got {obj!r:.80}")
    allowed = {"kind", *required, *optional}
    stray = sorted(str(k) for k in obj if k not in allowed)
    if stray:
        raise ScheduleError(f"{what} has unknown key(s) {stray}; its keys are {sorted(allowed)} (misspelled?)")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ScheduleError(f"{what} lacks {missing}; its keys are {sorted(allowed)}")
    return dict(obj)


def state_tokens(value: Any, what: str) -> tuple[str, ...]:
    """The ``state`` of an action read from a file: a list of names (``["v_norm", "history1"]``)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ScheduleError(f"{what} must be a list of names like ['v_norm'], got {value!r:.80}")
    return tuple(value)


def _parse(parser: Callable[[Any], Any], obj: Any, what: str) -> Any:
    """Run a registered parser; a wrong type or value in the object becomes a :class:`ScheduleError`."""
    try:
        return parser(obj)
    except ScheduleError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as e:  # RuntimeError: torch.tensor(None)
        raise ScheduleError(f"cannot read {what} {obj!r:.120} ({type(e).__name__}: {e})") from None


def action_from_json(obj: Any) -> Action:
    kind = obj if isinstance(obj, str) else obj.get("kind") if isinstance(obj, Mapping) else None
    if not isinstance(kind, str) or kind not in _ACTION_PARSERS:
        raise ScheduleError(f"unknown action {obj!r:.80}; known kinds: {sorted(_ACTION_PARSERS)}")
    return _parse(_ACTION_PARSERS[kind], obj, "action")


# Compensations (GOC, EOC, Taylor ...) are frozen dataclasses with ``kind``, ``to_json()`` and
# ``transform(rules, schedule, layout) -> rules``; they are read back from files by kind.
_COMPENSATIONS: dict[str, Callable[[Any], Any]] = {}


def register_compensation(kind: str, parser: Callable[[Any], Any]) -> None:
    """Register how a compensation kind is read back from a schedule file."""
    _COMPENSATIONS[kind] = parser


def compensation_from_json(obj: Any) -> Any:
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    if not isinstance(kind, str) or kind not in _COMPENSATIONS:
        raise ScheduleError(f"unknown compensation {obj!r:.80}; known kinds: {sorted(_COMPENSATIONS)}")
    return _parse(_COMPENSATIONS[kind], obj, "compensation")


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

# A method's rules map (schedule, layout) to one {region: action} dict per step (compute omitted).
StepRule = Callable[["Schedule", Layout], list[dict[str, Action]]]


@dataclass(frozen=True)
class Method:
    """A schedule method's behaviour, registered by its module in :mod:`cachecompile.methods`.

    ``rules(schedule, layout)``: one ``{region: action}`` dict per step (compute omitted).
    ``check(schedule)``: the schedule's parameters, validated and normalised; runs for every
    schedule built, by a preset or read from a file, and raises :class:`ScheduleError`.
    ``label(schedule, step)``: the kind of a step (``full``, ``cached``, ``conservative`` ...);
    by default ``full`` when the step's rules compute everything, else ``cached``.
    ``num_blocks(schedule)``: the number of blocks the schedule's data is written for (a mask's
    width, a per-block fresh ratio), or None when it fits any model; printing uses it.
    """

    name: str
    rules: StepRule
    check: Callable[["Schedule"], Mapping[str, Any]] | None = None
    label: Callable[["Schedule", int], str] | None = None
    num_blocks: Callable[["Schedule"], int | None] | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register a schedule method (see :class:`Method`)."""
    _METHODS[method.name] = method
    return method


# Rule transforms run on every method's rules after shadowed actions are dropped and the
# compensation is applied, before writes are attached: fn(rules, schedule, layout) -> rules.
# methods.dual uses one to record, at compute steps, the state that later partial steps read.
_RULE_TRANSFORMS: list[Callable[[list[dict[str, Action]], "Schedule", Layout], list[dict[str, Action]]]] = []


def register_rule_transform(fn: Callable[[list[dict[str, Action]], "Schedule", Layout], list[dict[str, Action]]]) -> None:
    """Register a transform applied to the resolved rules of every schedule (see ``_RULE_TRANSFORMS``)."""
    if fn not in _RULE_TRANSFORMS:
        _RULE_TRANSFORMS.append(fn)


# How big a schedule's cache is for a model: measured on the step graphs, which the schedule core
# cannot build; cachecompile's package registers cachecompile.api.cache_bytes here.
_CACHE_SIZER: list[Callable[..., int]] = []


def register_cache_sizer(fn: Callable[..., int]) -> None:
    """Register ``fn(model, schedule, example_inputs, **options) -> bytes`` (see :meth:`Schedule.cache_bytes`)."""
    _CACHE_SIZER[:] = [fn]


# --------------------------------------------------------------------------- schedule


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (any integer type, numpy's included; not a bool), or a
    :class:`ScheduleError` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ScheduleError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


_FIELDS = ("format", "num_steps", "method", "params", "mask", "steps", "compensation", "cache_dtype")

# Dtypes the cache may be stored in (``cache_dtype``), by their torch names. The float8 ones
# need a torch that has them (2.1 and later) and a backend that casts to them.
CACHE_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")


def cache_dtype_name(value: Any) -> str | None:
    """``value`` (a ``torch.dtype`` or its name, ``"bfloat16"`` or ``"torch.bfloat16"``) as the
    name a schedule keeps, or ``None``; a :class:`ScheduleError` for any other dtype. The
    schedule core does not import torch: a dtype is read by its name.

    >>> cache_dtype_name("torch.float16")
    'float16'
    """
    if value is None:
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, str) or type(value).__name__ == "dtype" else None
    if name not in CACHE_DTYPES:
        raise ScheduleError(
            f"cache_dtype must be one of {', '.join('torch.' + n for n in CACHE_DTYPES)} (or None: the model's "
            f"dtype), got {value!r}"
        )
    return name


@dataclass(frozen=True)
class Schedule:
    """A declarative cache schedule. Build one with a preset, never by hand.

    Presets: :meth:`fora`, :meth:`toca`, :meth:`duca`, :meth:`from_mask`, :meth:`explicit`, and the
    dynamic policies :meth:`dbcache`, :meth:`teacache`, :meth:`magcache`.
    Save with :meth:`save`, read back with :meth:`load`; ``print(schedule)`` shows the
    step × block table. Every schedule, built by a preset or read from a file, is checked by
    its method (:class:`Method`), so a file cannot hold what a preset would refuse.
    """

    num_steps: int | None
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    mask: tuple[tuple[tuple[bool, ...], ...], ...] | None = None
    steps: tuple[tuple[tuple[str, Action], ...], ...] | None = None
    compensation: Any = None  # a registered compensation (GOC, EOC, Taylor ...): see register_compensation
    cache_dtype: str | None = None  # what cached features are stored in (a name of CACHE_DTYPES); None: as computed

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dtype", cache_dtype_name(self.cache_dtype))
        if self.num_steps is not None:
            object.__setattr__(self, "num_steps", check_int("num_steps", self.num_steps))
        if not isinstance(self.method, str) or self.method not in _METHODS:
            raise ScheduleError(f"unknown schedule method {self.method!r}; known: {sorted(_METHODS)}")
        if not isinstance(self.params, Mapping):
            raise ScheduleError(f"schedule params must be a mapping of names to values, got {type(self.params).__name__}")
        if self.compensation is not None and getattr(self.compensation, "kind", None) not in _COMPENSATIONS:
            raise ScheduleError(
                f"compensation must be one of {sorted(_COMPENSATIONS)} (cc.GOC(...), cc.EOC(...), cc.Taylor(...)), "
                f"got {self.compensation!r}"
            )
        check = _METHODS[self.method].check
        params = check(self) if check is not None else self.params
        # Freeze params so the schedule is hashable and equal after a save/load round trip.
        object.__setattr__(self, "params", _FrozenDict(params))

    def __hash__(self) -> int:
        return hash((self.num_steps, self.method, hash(self.params), self.mask, self.steps, self.compensation, self.cache_dtype))

    # ----------------------------------------------------------------- presets
    def with_compensation(self, compensation: Any) -> "Schedule":
        """The same schedule with its ``reuse`` actions compensated (``cc.GOC(...)`` ...)."""
        return dataclasses.replace(self, compensation=compensation)

    def with_cache_dtype(self, cache_dtype: Any) -> "Schedule":
        """The same schedule with its cached features stored in ``cache_dtype``
        (``torch.bfloat16``, ``torch.float16``, ``torch.float8_e4m3fn`` ...; ``None``: the dtype
        they are computed in). The step graphs cast each cached feature to it where they write
        the cache and back to the model's dtype where they read it; everything else is computed
        as before. Token scores, dynamic probes, counters and decisions keep their dtype.

        >>> Schedule.fora(interval=3).with_cache_dtype("bfloat16").cache_dtype
        'bfloat16'
        """
        return dataclasses.replace(self, cache_dtype=cache_dtype)

    @classmethod
    def fora(
        cls, num_steps: int | None = None, interval: int | None = None, *, compensation: Any = None, cache_dtype: Any = None,
    ) -> "Schedule":
        """FORA: step ``s`` computes everything when ``s % interval == 0``; other steps reuse
        every block's attention and MLP output (taken before the adaLN gate). Without
        ``num_steps`` the schedule binds to each generation's length when it starts.
        See :mod:`cachecompile.methods.reuse`.

        >>> Schedule.fora(interval=2).step_kinds(4)
        ['full', 'cached', 'full', 'cached']
        """
        return cls(num_steps=num_steps, method="fora", params=_given(interval=interval), compensation=compensation,
                   cache_dtype=cache_dtype)

    @classmethod
    def from_mask(
        cls, mask: Any, branches: Sequence[str] = ("attn", "mlp"), *, compensation: Any = None, cache_dtype: Any = None,
    ) -> "Schedule":
        """A Learning-to-Cache style mask: ``mask[step][block][branch]`` is 1 to compute, 0 to
        reuse. ``mask`` may be nested lists, a numpy array, a torch tensor, or a path to a
        ``.json`` (nested lists) / ``.npy`` / ``.pt`` file.

        >>> Schedule.from_mask([[[1, 1]], [[0, 1]]]).num_steps
        2
        """
        frozen = freeze_mask(_load_mask(mask), len(branches))
        return cls(
            num_steps=len(frozen), method="mask", params={"branches": list(branches)}, mask=frozen, compensation=compensation,
            cache_dtype=cache_dtype,
        )

    @classmethod
    def explicit(
        cls, steps: Sequence[Mapping[str, str | Action]], *, compensation: Any = None, cache_dtype: Any = None,
    ) -> "Schedule":
        """One dict per step mapping region names (``blocks.3.mlp``, ``stack`` ...) to actions
        (``"reuse"``, ``"compute"`` or an :class:`Action`); regions not named are computed.

        >>> Schedule.explicit([{}, {"blocks.0.attn": "reuse"}]).num_steps
        2
        """
        return cls(num_steps=_count(steps, "steps"), method="explicit", steps=_freeze_steps(steps), compensation=compensation,
                   cache_dtype=cache_dtype)

    @classmethod
    def toca(
        cls,
        num_steps: int | None = None,
        interval: int | None = None,
        fresh_ratio: Any = None,
        score: Any = "v_norm",
        *,
        seed: int = 0,
        compensation: Any = None,
        cache_dtype: Any = None,
    ) -> "Schedule":
        """ToCa: full steps every ``interval``; other steps reuse attention and recompute each
        MLP for the ``round(fresh_ratio × tokens)`` top-scoring tokens. ``fresh_ratio``: a number,
        a per-block list or a [step][block] table; ``score``: ``v_norm``, ``attention``,
        ``random``, ``staleness`` or a weighted sum (``"v_norm+0.25*staleness"``).
        See :mod:`cachecompile.methods.dual`.

        >>> Schedule.toca(interval=2, fresh_ratio=0.25).step_kinds(4)
        ['full', 'conservative', 'full', 'conservative']
        """
        params = {**_given(interval=interval, fresh_ratio=fresh_ratio), "score": score, "seed": seed}
        return cls(num_steps=num_steps, method="toca", params=params, compensation=compensation, cache_dtype=cache_dtype)

    @classmethod
    def duca(
        cls,
        num_steps: int | None = None,
        interval: int | None = None,
        fresh_ratio: Any = None,
        score: Any = "v_norm",
        aggressive_reuse: str = "output",
        *,
        seed: int = 0,
        compensation: Any = None,
        cache_dtype: Any = None,
    ) -> "Schedule":
        """DuCa: ``s % interval == 0`` full; ``(s % interval)`` odd: conservative (a ToCa step);
        even: aggressive, the whole block stack reused (``aggressive_reuse="output"``: its cached
        output; ``"residual"``: this step's stack input + cached (output − input)).
        See :mod:`cachecompile.methods.dual`.

        >>> Schedule.duca(interval=4, fresh_ratio=0.3).step_kinds(4)
        ['full', 'conservative', 'aggressive', 'conservative']
        """
        params = {
            **_given(interval=interval, fresh_ratio=fresh_ratio), "score": score, "seed": seed,
            "aggressive_reuse": aggressive_reuse,
        }
        return cls(num_steps=num_steps, method="duca", params=params, compensation=compensation, cache_dtype=cache_dtype)

    # ----------------------------------------------------------------- length
    @property
    def is_bound(self) -> bool:
        """Whether the schedule has its number of steps (else it binds to each generation's)."""
        return self.num_steps is not None

    def bind(self, num_steps: int) -> "Schedule":
        """This schedule for a generation of ``num_steps`` steps: itself when it already has that
        many, a copy with ``num_steps`` set (checked again, compensation included) when it has
        none; a :class:`StepMismatchError` when it was built for another number of steps.

        >>> Schedule.fora(interval=3).bind(6) == Schedule.fora(6, 3)
        True
        """
        num_steps = check_int("num_steps", num_steps)
        if self.num_steps == num_steps:
            return self
        if self.num_steps is not None:
            raise StepMismatchError(
                f"the generation has {num_steps} denoising steps but the schedule was built for {self.num_steps}. "
                f"{_rebuild_hint(self, num_steps)}"
            )
        return dataclasses.replace(self, num_steps=num_steps)

    def _bound(self, num_steps: int | None, what: str) -> "Schedule":
        if num_steps is not None:
            return self.bind(num_steps)
        if self.num_steps is None:
            raise ScheduleError(f"{what} needs a number of steps: this schedule binds to each generation's; pass num_steps")
        return self

    @classmethod
    def dbcache(
        cls,
        threshold: float,
        compute_first: int = 1,
        compute_last: int = 0,
        warmup_steps: int = 0,
        max_cached_steps: int | None = None,
        max_continuous_cached_steps: int | None = None,
        *,
        num_steps: int | None = None,
        cache_dtype: Any = None,
    ) -> "Schedule":
        """DBCache (cache-dit's ``DBCacheConfig``), decided in the step graph: the first
        ``compute_first`` blocks always run; when the relative L1 change of their residual against
        the last computed step's is below ``threshold``, the middle blocks are reused as their
        cached residual; the last ``compute_last`` blocks always run. ``compute_first=1,
        compute_last=0`` is diffusers' First-Block Cache. See :mod:`cachecompile.methods.dynamic`.

        >>> Schedule.dbcache(0.1, warmup_steps=2, num_steps=4).step_kinds()
        ['full', 'full', 'dynamic', 'dynamic']
        """
        params = {
            "threshold": threshold, "compute_first": compute_first, "compute_last": compute_last,
            "warmup_steps": warmup_steps, "max_cached_steps": max_cached_steps,
            "max_continuous_cached_steps": max_continuous_cached_steps,
        }
        return cls(num_steps=num_steps, method="dbcache", params=params, cache_dtype=cache_dtype)

    @classmethod
    def teacache(
        cls, threshold: float, coefficients: Any, *, warmup_steps: int = 1, compute_last_step: bool = True,
        num_steps: int | None = None, cache_dtype: Any = None,
    ) -> "Schedule":
        """TeaCache, decided in the step graph: the rescaled relative L1 change of block 0's
        timestep-modulated input is accumulated; below ``threshold`` the whole block stack is
        reused as its cached residual. ``coefficients``: the rescaling polynomial (highest degree
        first) or a model class with published ones (``"FluxTransformer2DModel"``); fit your own
        with ``cc.calibrate``. See :mod:`cachecompile.methods.dynamic`.

        >>> Schedule.teacache(0.3, [1.0, 0.0], num_steps=4).step_kinds()
        ['full', 'dynamic', 'dynamic', 'full']
        """
        params = {"threshold": threshold, "coefficients": coefficients, "warmup_steps": warmup_steps,
                  "compute_last_step": compute_last_step}
        return cls(num_steps=num_steps, method="teacache", params=params, cache_dtype=cache_dtype)

    @classmethod
    def magcache(
        cls, threshold: float, max_skip_steps: int, ratios: Any, *, retention_ratio: float = 0.2,
        num_steps: int | None = None, cache_dtype: Any = None,
    ) -> "Schedule":
        """MagCache (diffusers' ``MagCacheConfig`` rule) from calibrated per-step magnitude
        ``ratios`` (``cc.calibrate``): reuse the stack's residual while the accumulated error
        stays at most ``threshold`` and at most ``max_skip_steps`` steps are skipped in a row.
        The rule reads no value of the step, so it is resolved with the schedule's length.
        See :mod:`cachecompile.methods.dynamic`.

        >>> Schedule.magcache(0.05, 2, [1.0, 1.0, 0.99, 0.98], retention_ratio=0.0, num_steps=4).step_kinds()
        ['full', 'cached', 'cached', 'full']
        """
        params = {"threshold": threshold, "max_skip_steps": max_skip_steps, "ratios": ratios,
                  "retention_ratio": retention_ratio}
        return cls(num_steps=num_steps, method="magcache", params=params, cache_dtype=cache_dtype)

    # ----------------------------------------------------------------- resolution
    def rules(self, layout: Layout) -> list[dict[str, Action]]:
        """The method's raw ``{region: action}`` per step, before compensation and writes."""
        return _METHODS[self.method].rules(self._bound(None, "resolving the schedule"), layout)

    def resolve(self, layout: Layout) -> list[StepPlan]:
        """Per-step plans for a model with this ``layout`` (a bound schedule: see :meth:`bind`).
        Raises :class:`ScheduleError` for unknown regions and for a reuse before the region was
        ever computed."""
        rules = self.rules(layout)
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

    def step_kinds(self, num_steps: int | None = None) -> list[str]:
        """A short label per step: ``full`` or ``cached`` (methods may refine the labels); a
        schedule without a step count needs ``num_steps``."""
        s = self._bound(num_steps, "step_kinds()")
        label = _METHODS[s.method].label
        if label is not None:
            return [label(s, step) for step in range(s.num_steps)]
        return ["full" if not acts else "cached" for acts in s.rules(_GENERIC)]

    # ----------------------------------------------------------------- footprint
    def cache_bytes(self, model: Any, example_inputs: Any, **options: Any) -> int:
        """The bytes the cache store will hold for ``model`` under this schedule, called with
        ``example_inputs`` (a dict of keyword arguments, a tuple of positional ones, or one tensor):
        every slot its step graphs write, at that call's batch size and in its storage dtype
        (``cache_dtype``), per call of a step. Nothing runs and the model is not changed (the
        step graphs are built on a capture, as :func:`cachecompile.optimize` would). Options:
        ``num_steps`` (required when the schedule has no step count), ``calls_per_step``,
        ``regions``, ``dynamic_batch`` (see :func:`cachecompile.cache_bytes`).

        >>> Schedule.fora(interval=3).cache_bytes(model, inputs, num_steps=50)  # doctest: +SKIP
        9437184
        """
        if not _CACHE_SIZER:  # pragma: no cover - import cachecompile registers it
            raise RuntimeError("Schedule.cache_bytes needs the compiler: import cachecompile first")
        return _CACHE_SIZER[0](model, self, example_inputs, **options)

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
        if self.cache_dtype is not None:
            d["cache_dtype"] = self.cache_dtype
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Schedule":
        """A schedule from its :meth:`to_dict` form, checked like a preset's (unknown keys,
        missing fields and out-of-range parameters are a :class:`ScheduleError`)."""
        if not isinstance(d, Mapping):
            raise ScheduleError(f"a schedule file holds a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ScheduleError(f"not a cachecompile schedule (format {d.get('format')!r}, expected {FORMAT!r})")
        stray = sorted(set(d) - set(_FIELDS))
        if stray:
            raise ScheduleError(f"unknown schedule field(s) {stray}; a schedule has {list(_FIELDS)}")
        missing = [k for k in ("num_steps", "method") if k not in d]  # num_steps may be null: unbound
        if missing:
            raise ScheduleError(f"the schedule lacks {missing}; save schedules with Schedule.save")
        mask, steps, comp = d.get("mask"), d.get("steps"), d.get("compensation")
        return cls(
            num_steps=d["num_steps"],
            method=d["method"],
            params=d.get("params", {}),
            compensation=None if comp is None else compensation_from_json(comp),
            mask=None if mask is None else freeze_mask(mask, None),
            steps=None if steps is None else _freeze_steps(steps),
            cache_dtype=d.get("cache_dtype"),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> "Schedule":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"not a schedule: invalid JSON ({e})") from None
        return cls.from_dict(obj)

    def save(self, path: str | Path) -> None:
        """Write the schedule as JSON (human-readable, diffable)."""
        Path(path).write_text(self.dumps() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        """Read a file written by :meth:`save`; a :class:`ScheduleError` naming the file when it
        is not a valid schedule."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ScheduleError(f"cannot read schedule file {path}: {e}") from None
        try:
            return cls.loads(text)
        except ScheduleError as e:
            raise ScheduleError(f"{path}: {e}") from None

    # ----------------------------------------------------------------- display
    def __str__(self) -> str:
        return format_table(self)

    def __repr__(self) -> str:
        parts = [] if self.num_steps is None else [f"num_steps={self.num_steps}"]
        parts += [f"{k}={v!r}" for k, v in sorted(self.params.items())]
        if self.compensation is not None:
            parts.append(f"compensation={self.compensation!r}")
        if self.cache_dtype is not None:
            parts.append(f"cache_dtype=torch.{self.cache_dtype}")
        return f"Schedule.{self.method}({', '.join(parts)})"


# One column standing for every block, when the model is not known yet.
_GENERIC = Layout(branches=(("attn", "mlp"),))


def _given(**params: Any) -> dict[str, Any]:
    """The preset parameters the caller gave (a missing required one is the method's error)."""
    return {k: v for k, v in params.items() if v is not None}


def _rebuild_hint(s: Schedule, num_steps: int) -> str:
    if s.method in ("mask", "explicit") or s.compensation is not None and s.compensation.kind == "eoc":
        return (f"Masks, explicit and calibrated schedules fix their step count: build or calibrate one for "
                f"{num_steps} steps, or run {s.num_steps} steps.")
    return (f"Build it without num_steps (e.g. Schedule.{s.method}(interval=...)) to follow every generation's "
            f"length, or run {s.num_steps} steps.")


# --------------------------------------------------------------------------- helpers


class _FrozenDict(dict):
    """A dict that refuses mutation, so a Schedule stays immutable and hashable."""

    def _refuse(self, *a: Any, **k: Any) -> None:
        raise TypeError("schedule parameters are immutable; build a new Schedule")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore
    __ior__ = _refuse  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(_jsonable(dict(self)), sort_keys=True))

    # copy and pickle rebuild the dict in one call instead of item by item
    def __reduce__(self) -> tuple:
        return (_FrozenDict, (dict(self),))

    def __deepcopy__(self, memo: dict) -> "_FrozenDict":
        return self  # immutable


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


def _load_mask(mask: Any) -> Any:
    """A mask given as a file path → its nested lists (or array); anything else as given."""
    if isinstance(mask, (str, Path)):
        p = Path(mask)
        if not p.is_file():
            raise ScheduleError(f"mask file {p} does not exist")
        if p.suffix == ".json":
            try:
                mask = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ScheduleError(f"mask file {p} is not valid JSON ({e})") from None
        elif p.suffix == ".npy":
            import numpy as np

            mask = np.load(p)
        elif p.suffix in (".pt", ".pth"):
            import torch

            mask = torch.load(p, weights_only=True)
        else:
            raise ScheduleError(f"cannot read a mask from {p}: use .json, .npy or .pt")
    return mask


def _flag(value: Any, where: str) -> bool:
    """A mask entry: 0/1, False/True (ints, floats equal to 0 or 1, numpy scalars); nothing else."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()
    if isinstance(value, (list, tuple)):
        raise ScheduleError(
            f"the mask has more than 3 dimensions: entry {where} is {value!r:.40}; a mask is "
            f"[num_steps][num_blocks][branches] of 0 (reuse) or 1 (compute)"
        )
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise ScheduleError(f"mask entry {where} is {value!r}; a mask holds 0 (reuse) or 1 (compute)")


def freeze_mask(mask: Any, branches: int | None) -> tuple[tuple[tuple[bool, ...], ...], ...]:
    """A mask ``[step][block][branch]`` of 0/1 as nested tuples of bools, or a
    :class:`ScheduleError` naming what is wrong (shape, ragged rows, entries other than 0/1)."""
    if hasattr(mask, "tolist"):
        mask = mask.tolist()
    want = f"[num_steps][num_blocks][{branches if branches is not None else 'branches'}] of 0/1"
    if not isinstance(mask, (list, tuple)) or not mask:
        raise ScheduleError(f"a mask must be non-empty nested lists {want}, got {mask!r:.80}")
    rows = []
    for s, row in enumerate(mask):
        if not isinstance(row, (list, tuple)) or not row or not all(isinstance(f, (list, tuple)) for f in row):
            raise ScheduleError(f"the mask must have 3 dimensions {want}; step {s} is {row!r:.80}")
        rows.append(tuple(tuple(_flag(v, f"[{s}][{b}][{k}]") for k, v in enumerate(f)) for b, f in enumerate(row)))
    nb, nk = len(rows[0]), branches if branches is not None else len(rows[0][0])
    for s, row in enumerate(rows):
        if len(row) != nb or any(len(f) != nk for f in row):
            raise ScheduleError(f"the mask is ragged or of the wrong shape at step {s}: expected {want}")
    return tuple(rows)


def _count(seq: Any, name: str) -> int:
    if not isinstance(seq, Sequence) or isinstance(seq, (str, bytes)):
        raise ScheduleError(f"{name} must be a list with one entry per step, got {type(seq).__name__}")
    return len(seq)


def _freeze_steps(steps: Any) -> tuple[tuple[tuple[str, Action], ...], ...]:
    """Explicit steps (one ``{region: action}`` mapping per step) as sorted, hashable pairs."""
    _count(steps, "steps")
    out = []
    for s, step in enumerate(steps):
        if not isinstance(step, Mapping):
            raise ScheduleError(f"step {s} of an explicit schedule must map region names to actions, got {step!r:.80}")
        pairs = []
        for region, a in step.items():
            if not isinstance(region, str):
                raise ScheduleError(f"step {s}: region names are strings like 'blocks.3.mlp', got {region!r}")
            pairs.append((region, a if isinstance(a, Action) else action_from_json(a)))
        out.append(tuple(sorted(pairs)))
    return tuple(out)


def _drop_shadowed(acts: dict[str, Action]) -> dict[str, Action]:
    """A region inside a reused stack or block never runs: its own action is meaningless."""
    out = dict(acts)
    outer = [r for r, a in acts.items() if not a.computes and (r == "stack" or r.count(".") == 1)]
    for region in list(out):
        for o in outer:
            inside = o == "stack" and region.startswith("blocks.") or region.startswith(o + ".")
            if region != o and inside:
                out.pop(region, None)  # inside both a reused block and the reused stack
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
    ``S`` when the whole stack is reused. A schedule without a step count shows its first steps
    (two periods) and repeats them."""
    lines = [repr(s)]
    if s.num_steps is None:
        period = int(s.params.get("interval", 1))
        s = s.bind(max(2 * period, 4))
        lines.append(f"(binds to each generation's length; the first {s.num_steps} steps, then the same pattern)")
    if layout is None:
        blocks = _METHODS[s.method].num_blocks
        nb = len(s.mask[0]) if s.mask is not None else blocks(s) if blocks is not None else None
        layout = Layout(branches=(("attn", "mlp"),) * nb) if nb else None
    kinds = s.step_kinds()
    if layout is None:
        # Model not known yet: one column stands for every block.
        lines.append("step  kind          all blocks")
        for step, acts in enumerate(s.rules(_GENERIC)):
            lines.append(f"{step:>4}  {kinds[step]:<12}  {_cell(acts, 0, _GENERIC)}")
        return "\n".join(lines)
    rules = s.rules(layout)
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
