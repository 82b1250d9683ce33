"""``CachedTransformer``: the drop-in module that replays a cache schedule.

It captures the model on its first real call (or on the example inputs given to
:func:`cachecompile.optimize`), builds one step graph per distinct plan, lowers each through the
chosen backend, and on every call picks the step graph of the current step, feeds it the cache
tensors, stores the tensors it writes, and rebuilds the model's own output type.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from cachecompile.schedule import Schedule, StepPlan
from cachecompile.passes import build_step_graph, finish_step_graphs
from cachecompile.passes.cache_io import cache_io
from cachecompile.passes.capture import Captured, capture
from cachecompile.passes.regions import RegionMap, RegionPatterns, find_regions
from cachecompile.runtime.cache_store import CacheStore
from cachecompile.runtime.steps import StepClock, timestep_value

log = logging.getLogger(__name__)

__all__ = ["CachedTransformer", "InputMismatchError"]

Runner = Callable[..., Sequence[torch.Tensor]]


class InputMismatchError(ValueError):
    """A call whose inputs do not match the captured ones (shape, dtype, structure, constants)."""


# Per-step graph inputs (see cachecompile.passes.cache_io.add_step_input): name prefix (before the first ":")
# → fn(cached, step, name) -> Tensor. Keeps per-step scalars out of the graphs, so the number of
# step graphs does not grow with the number of steps.
STEP_INPUTS: dict[str, Callable[["CachedTransformer", int, str], torch.Tensor]] = {}


def register_step_input(prefix: str, fn: Callable[["CachedTransformer", int, str], torch.Tensor]) -> None:
    STEP_INPUTS[prefix] = fn


def step_input_value(cached: "CachedTransformer", step: int, name: str) -> torch.Tensor:
    prefix = name.split(":", 1)[0]
    if prefix not in STEP_INPUTS:
        raise RuntimeError(f"no provider registered for step input {name!r} (prefix {prefix!r})")
    return STEP_INPUTS[prefix](cached, step, name)


def _lower(backend: str, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor], options: Mapping[str, Any]) -> Runner:
    if backend == "eager":
        return gm
    from cachecompile.backends import get_backend

    return get_backend(backend).compile(gm, example_inputs, **options)


def check_backend(backend: str) -> None:
    """Fail early (before any capture) on an unknown backend or a missing optional dependency."""
    if backend == "eager":
        return
    from cachecompile.backends import get_backend

    get_backend(backend)


class HoldsModel(torch.nn.Module):
    """A stand-in for a model in a pipeline: holds the original model without registering it
    (``state_dict()`` and ``parameters()`` stay ours; the model object is never modified, except
    that ``.to()`` and its kin move it) and answers the attributes it lacks (``config``,
    ``dtype``, ``device`` ...) from that model."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)

    @property
    def model(self) -> torch.nn.Module:
        """The original model (unchanged)."""
        return self._model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def _apply(self, fn: Any, recurse: bool = True) -> "HoldsModel":
        """``.to()``, ``.half()``, ``.cuda()`` ... (and a pipeline's ``pipe.to()``) move the held
        model too, as they would move the model in the stand-in's place."""
        super()._apply(fn, recurse)
        model = self.__dict__.get("_model")
        if model is not None:
            before = _placement(model)
            model._apply(fn, recurse)
            if _placement(model) != before:
                self._model_moved()
        return self

    def _model_moved(self) -> None:
        """Called after ``.to()`` changed the held model's devices or dtypes."""


def _placement(model: torch.nn.Module) -> set[tuple[torch.device, torch.dtype]]:
    return {(t.device, t.dtype) for t in itertools.chain(model.parameters(), model.buffers())}


class CachedTransformer(HoldsModel):
    """A transformer whose calls follow a cache schedule. Build it with :func:`cachecompile.optimize`.

    Attributes:
        schedule: the :class:`~cachecompile.Schedule`.
        plans: one :class:`~cachecompile.schedule.StepPlan` per step (after the first call).
        step_graphs: each distinct plan → its rewritten ``GraphModule``.
        region_map: the regions found in the captured graph.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: Schedule,
        *,
        backend: str = "eager",
        regions: RegionPatterns | None = None,
        calls_per_step: int | str = 1,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model)  # the step graphs share the model's parameter tensors
        self.schedule = schedule
        self.backend = backend
        # Counts calls into (step, call within step) and checks they fit the schedule (cachecompile.runtime.steps).
        self._clock = StepClock(schedule.num_steps, calls_per_step)
        self._context: Any = None  # the pipeline's cache_context name for the current call
        self._patterns = regions
        self._backend_options = dict(backend_options or {})
        self._store = CacheStore()
        self._forget_capture()

    def _forget_capture(self) -> None:
        """The state before the first call (and after a move): nothing captured or compiled."""
        self._captured: Captured | None = None
        self.region_map: RegionMap | None = None
        self.plans: list[StepPlan] | None = None
        self.step_graphs: dict[StepPlan, torch.fx.GraphModule] = {}
        self._graph_of_step: list[int] = []
        self._graphs: list[torch.fx.GraphModule] = []
        self._runners: list[Runner] = []
        # Per graph: its cache_io (slot names in/out, step inputs). A model loaded from an artifact
        # (cachecompile.runtime.artifact) has these and the runners but no GraphModules, and carries its
        # per-step input values in _step_values instead of asking the providers.
        self._io: list[dict] = []
        self._step_values: dict[str, list[torch.Tensor | None]] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def is_captured(self) -> bool:
        return self._captured is not None

    @property
    def step(self) -> int:
        """The step the next call belongs to."""
        return self._clock.next_step

    @property
    def calls_per_step(self) -> int | str:
        """Transformer calls per sampling step: declared, or detected (``"auto"`` before step 1)."""
        clock = self._clock
        return clock.calls_per_step or clock.detected or clock.declared

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cache store now (after a generation: the steady-state size)."""
        return self._store.nbytes

    # ------------------------------------------------------------------ building
    def prepare(self, *args: Any, **kwargs: Any) -> "CachedTransformer":
        """Capture, find regions, resolve the schedule, rewrite and lower, for these inputs.

        Called by the first ``forward``; call it yourself to pay the cost up front. All or
        nothing: on error the module stays uncaptured.
        """
        captured = capture(self._model, args, kwargs)
        region_map = find_regions(captured.gm, self._patterns, captured.meta["model_class"])
        plans = self.schedule.resolve(region_map.layout)
        distinct: dict[StepPlan, int] = {}
        graph_of_step = [distinct.setdefault(p, len(distinct)) for p in plans]
        graphs = [build_step_graph(captured.gm, region_map, p) for p in distinct]
        finish_step_graphs(graphs, graph_of_step)  # schedule-wide: dead cache writes, then what they free
        runners = [
            _lower(self.backend, gm, self._example_inputs(captured, gm), self._backend_options) for gm in graphs
        ]
        self._captured, self.region_map, self.plans = captured, region_map, plans
        self._graph_of_step, self._graphs, self._runners = graph_of_step, graphs, runners
        self._io = [cache_io(gm) for gm in graphs]
        # CUDA-graph runners overwrite their outputs on the next call: copy cache writes then.
        self._store.in_place = any(getattr(r, "reuses_outputs", False) for r in runners)
        self.step_graphs = dict(zip(distinct, graphs))
        self.reset()
        log.info("cachecompile: %d steps → %d step graphs (%s)", len(plans), len(graphs), self.backend)
        return self

    @staticmethod
    def _example_inputs(captured: Captured, gm: torch.fx.GraphModule) -> list[torch.Tensor]:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        cache = placeholders[len(captured.example_inputs) :]
        device = captured.example_inputs[0].device if captured.example_inputs else None
        zeros = [torch.zeros(p.meta["val"].shape, dtype=p.meta["val"].dtype, device=device) for p in cache]
        return list(captured.example_inputs) + zeros

    def _apply(self, fn: Any, recurse: bool = True) -> "CachedTransformer":
        cap = self._captured
        if self._model is None and cap is not None and "device" in cap.meta:
            # Loaded from an artifact: its engines were built for one device and dtype.
            device = torch.device(cap.meta["device"])
            floats = [leaf.dtype for leaf in cap.leaves if leaf.dtype is not None and leaf.dtype.is_floating_point]
            dtype = floats[0] if floats else torch.float32
            probe = fn(torch.empty(0, device=device, dtype=dtype))
            if (probe.device, probe.dtype) != (device, dtype):
                raise RuntimeError(
                    f"{cap.meta.get('artifact', 'this artifact')} runs on {device} in "
                    f"{str(dtype).removeprefix('torch.')}, as exported; it cannot move to {probe.device} in "
                    f"{str(probe.dtype).removeprefix('torch.')}: export it again from a model on that device and dtype"
                )
        return super()._apply(fn, recurse)

    def _model_moved(self) -> None:
        # The step graphs were captured and compiled for the old devices/dtypes: like a
        # torch.compile'd module, capture and compile again on the next call.
        if self._captured is None:
            return
        log.info("cachecompile: the model moved to %s; its step graphs are rebuilt on the next call",
                 sorted({f"{d}/{str(t).removeprefix('torch.')}" for d, t in _placement(self._model)}))
        self._forget_capture()
        self.reset()

    def reset(self) -> None:
        """Start a new generation: the next call is step 0 and the cache is emptied."""
        self._clock.reset()
        self._store.clear()

    def begin_generation(self, num_steps: int | None = None) -> None:
        """Pipeline hook: a generation of ``num_steps`` denoising steps starts now.

        Raises :class:`~cachecompile.runtime.steps.StepMismatchError` (before any step runs) when
        ``num_steps`` differs from the schedule's, then makes the next call step 0; the cache
        buffers are kept. ``cc.optimize(pipe, schedule)`` makes the pipeline call it at the start
        of every denoising loop; a hand-written loop may call it too::

            cached.begin_generation(len(scheduler.timesteps))
        """
        self._clock.begin_generation(num_steps)
        self._store.new_generation()

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """diffusers' ``CacheMixin.cache_context``: a pipeline names each call of a step
        (``"cond"``, ``"uncond"``). The names check the calls per step (and detect them with
        ``calls_per_step="auto"``); the original model is not touched."""
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    # ------------------------------------------------------------------ calling
    def _tensor_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        cap = self._captured
        assert cap is not None
        if set(kwargs) == set(cap.kwarg_order):  # keyword order is free in Python, not in a pytree spec
            kwargs = {k: kwargs[k] for k in cap.kwarg_order}
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != cap.in_spec:
            raise InputMismatchError(
                f"this call's arguments {_describe_spec(args, kwargs)} differ from the captured call's "
                f"structure; call the cached transformer with the same arguments (same keywords, same "
                f"None/non-None) as its first call, or optimize the model again for this call"
            )
        tensors = []
        for leaf, value in zip(cap.leaves, leaves):
            if leaf.tensor_index is None:
                if value != leaf.value:
                    raise InputMismatchError(
                        f"argument {leaf.name!r} is {value!r} but the graph was captured with {leaf.value!r}; "
                        f"non-tensor arguments are fixed in the captured graph: optimize the model again for {value!r}"
                    )
                continue
            if tuple(value.shape) != leaf.shape or value.dtype != leaf.dtype:
                raise InputMismatchError(
                    f"input {leaf.name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, but the "
                    f"step graphs were captured for shape {leaf.shape} and dtype {leaf.dtype}. Step graphs "
                    f"have static shapes: call cachecompile.optimize(model, schedule) again for the new "
                    f"shape (batch size, resolution or classifier-free-guidance batching changed)"
                )
            tensors.append(value)
        return tensors

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._captured is None:
            self.prepare(*args, **kwargs)
        cap = self._captured
        assert cap is not None
        tensors = self._tensor_inputs(args, kwargs)
        t = self._timestep_of(args, kwargs)
        pos = self._clock.locate(t, self._context)  # raises before anything runs when calls do not fit
        step, call = pos.step, pos.call
        idx = self._graph_of_step[step]
        io = self._io[idx]
        cache_in = [self._store.read(call, slot) for slot in io["cache_inputs"]]
        values = self._step_values
        step_in = [step_input_value(self, step, name) if values is None else values[name][step] for name in io["step_inputs"]]
        outs = self._runners[idx](*tensors, *cache_in, *step_in)
        n = cap.num_outputs
        self._store.write_all(call, zip(io["cache_outputs"], outs[n:]), caller=(*tensors, *outs[:n]))
        if self._clock.advance(pos, t, self._context):
            self._store.new_generation()  # the next call starts a new generation
        return pytree.tree_unflatten(list(outs[:n]), cap.out_spec)

    def _timestep_of(self, args: tuple, kwargs: dict) -> float | None:
        """The call's timestep (first element), read to check the calls against the schedule."""
        if "timestep" in kwargs:
            return timestep_value(kwargs["timestep"])
        meta = self._captured.meta if self._captured is not None else {}
        idx = meta["timestep_arg"] if "timestep_arg" in meta else _positional_index(type(self._model), "timestep")
        return timestep_value(args[idx]) if idx is not None and idx < len(args) else None

    # ------------------------------------------------------------------ artifacts
    def export(self, path: Any, format: str = "aoti", **options: Any) -> Any:
        """Write the step graphs as a deployable directory (see :mod:`cachecompile.runtime.artifact`):
        ``format`` is ``"aoti"``, ``"onnx"`` or ``"tensorrt"``; load it with ``cachecompile.load``.
        The model must have been called once (or optimized with example inputs) first.

        >>> cached.export("dit-fora3", format="onnx")   # doctest: +SKIP
        """
        from cachecompile.runtime.artifact import export_cached

        return export_cached(self, path, format, **options)

    @classmethod
    def from_artifact(cls, path: Any, **options: Any) -> "CachedTransformer":
        """Load a directory written by :meth:`export` (= ``cachecompile.load(path)``)."""
        from cachecompile.runtime.artifact import load_artifact

        return load_artifact(path, **options)

    def extra_repr(self) -> str:
        state = f"{len(self._runners)} step graphs" if self._captured is not None else "not captured yet"
        return f"schedule={self.schedule!r}, backend={self.backend!r}, {state}"


@functools.lru_cache(maxsize=None)
def _positional_index(cls: type, name: str) -> int | None:
    forward = getattr(cls, "forward", None)  # None for a model loaded from an artifact
    try:
        params = list(inspect.signature(forward).parameters)[1:]  # drop self
    except (TypeError, ValueError):
        return None
    return params.index(name) if name in params else None


def _describe_spec(args: tuple, kwargs: dict) -> str:
    return f"({len(args)} positional, keywords {sorted(kwargs)})"
