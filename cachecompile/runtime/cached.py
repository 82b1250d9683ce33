"""``CachedTransformer``: the drop-in module that replays a cache schedule.

It executes a :class:`~cachecompile.core.program.StepProgram`: on every call it picks the step
graph of the current step, feeds it the cache tensors and the step's inputs, stores the tensors
it writes, and rebuilds the model's own output type. The program comes from the compiler that
:func:`cachecompile.optimize` hands it (built on the first real call, or on the example inputs),
or from an artifact (:mod:`cachecompile.runtime.artifact`); the runtime never imports the
compiler, and both kinds of program run through the same code.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree

from cachecompile.core.errors import InputMismatchError
from cachecompile.core.program import ProgramBuilder, StepProgram
from cachecompile.core.regions import RegionMap
from cachecompile.core.schedule import Schedule, StepPlan
from cachecompile.runtime.artifact import load_program
from cachecompile.runtime.cache_store import CacheStore
from cachecompile.runtime.decisions import DecisionLog
from cachecompile.runtime.steps import StepClock, timestep_value

log = logging.getLogger(__name__)

__all__ = ["CachedTransformer", "HoldsModel", "InputMismatchError"]


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
    """A transformer whose calls follow a cache schedule. Build it with :func:`cachecompile.optimize`
    (or load one with :func:`cachecompile.load`).

    Attributes:
        schedule: the :class:`~cachecompile.Schedule`.
        plans: one :class:`~cachecompile.core.schedule.StepPlan` per step (after the first call).
        step_graphs: each distinct plan → its rewritten ``GraphModule``.
        region_map: the regions found in the captured graph.
        program: the :class:`~cachecompile.core.program.StepProgram` being executed.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        schedule: Schedule,
        *,
        builder: ProgramBuilder | None = None,
        program: StepProgram | None = None,
        calls_per_step: int | str = 1,
    ) -> None:
        super().__init__(model)  # the step graphs share the model's parameter tensors
        if builder is None and program is None:
            raise ValueError("a CachedTransformer runs a program: give it a builder (cc.optimize) or a program (cc.load)")
        self.schedule = schedule
        self._builder = builder
        # Counts calls into (step, call within step) and checks they fit the schedule (runtime.steps).
        self._clock = StepClock(schedule.num_steps, calls_per_step)
        self._context: Any = None  # the pipeline's cache_context name for the current call
        self._store = CacheStore()
        self._decisions = DecisionLog()  # dynamic steps' decision flags, kept on device (runtime.decisions)
        self._program: StepProgram | None = None
        if program is not None:
            self._run(program)

    def _run(self, program: StepProgram) -> None:
        """Execute ``program`` from now on, starting with a new generation."""
        self._program = program
        self._store.in_place = program.reuses_outputs
        self.reset()

    # ------------------------------------------------------------------ properties
    @property
    def program(self) -> StepProgram | None:
        """The step program being executed (``None`` before the first call)."""
        return self._program

    @property
    def backend(self) -> str:
        return self._builder.backend if self._builder is not None else self._program.backend  # type: ignore[union-attr]

    @property
    def is_captured(self) -> bool:
        return self._program is not None

    @property
    def plans(self) -> list[StepPlan] | None:
        return self._program.plans if self._program is not None else None

    @property
    def step_graphs(self) -> dict[StepPlan, torch.fx.GraphModule]:
        return self._program.step_graphs() if self._program is not None else {}

    @property
    def region_map(self) -> RegionMap | None:
        return self._program.region_map if self._program is not None else None

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
    def decisions(self) -> list[str]:
        """What each step of the generation in progress, or else of the last generation, did:
        ``"full"`` or ``"cached"`` as decided in the graph by a dynamic schedule (DBCache,
        TeaCache), the schedule's own label for steps it fixes (warm-up, FORA ...). The flags stay
        on the device during the generation and are read here, once.

        >>> cached.decisions        # doctest: +SKIP
        ['full', 'full', 'cached', 'cached', 'full', ...]
        """
        kinds = self.schedule.step_kinds()
        return self._decisions.labels(lambda step: kinds[step])

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
        if self._builder is None:
            raise RuntimeError("this model was loaded from an artifact: its step graphs are built already")
        self._run(self._builder.build(self._model, args, kwargs))
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> "CachedTransformer":
        program = self._program
        if self._builder is None and program is not None and program.device is not None:
            # Loaded from an artifact: its engines were built for one device and dtype.
            device, dtype = program.device, program.dtype or torch.float32
            probe = fn(torch.empty(0, device=device, dtype=dtype))
            if (probe.device, probe.dtype) != (device, dtype):
                raise RuntimeError(
                    f"{program.source or 'this artifact'} runs on {device} in "
                    f"{str(dtype).removeprefix('torch.')}, as exported; it cannot move to {probe.device} in "
                    f"{str(probe.dtype).removeprefix('torch.')}: export it again from a model on that device and dtype"
                )
        return super()._apply(fn, recurse)

    def _model_moved(self) -> None:
        # The step graphs were captured and compiled for the old devices/dtypes: like a
        # torch.compile'd module, capture and compile again on the next call.
        if self._program is None:
            return
        log.info("cachecompile: the model moved to %s; its step graphs are rebuilt on the next call",
                 sorted({f"{d}/{str(t).removeprefix('torch.')}" for d, t in _placement(self._model)}))
        self._program = None
        self.reset()

    def reset(self) -> None:
        """Start a new generation: the next call is step 0 and the cache is emptied."""
        self._clock.reset()
        self._store.clear()
        self._decisions.clear()

    def begin_generation(self, num_steps: int | None = None) -> None:
        """Pipeline hook: a generation of ``num_steps`` denoising steps starts now.

        Raises :class:`~cachecompile.StepMismatchError` (before any step runs) when
        ``num_steps`` differs from the schedule's, then makes the next call step 0; the cache
        buffers are kept. ``cc.optimize(pipe, schedule)`` makes the pipeline call it at the start
        of every denoising loop; a hand-written loop may call it too::

            cached.begin_generation(len(scheduler.timesteps))
        """
        self._clock.begin_generation(num_steps)
        self._store.new_generation()
        self._decisions.end_generation()

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
    def _tensor_inputs(self, program: StepProgram, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        call = program.call
        if set(kwargs) == set(call.kwarg_order):  # keyword order is free in Python, not in a pytree spec
            kwargs = {k: kwargs[k] for k in call.kwarg_order}
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != call.in_spec:
            raise InputMismatchError(
                f"this call's arguments {_describe_spec(args, kwargs)} differ from the captured call's "
                f"structure; call the cached transformer with the same arguments (same keywords, same "
                f"None/non-None) as its first call, or optimize the model again for this call"
            )
        tensors = []
        for leaf, value in zip(call.leaves, leaves):
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
        if self._program is None:
            self.prepare(*args, **kwargs)
        program = self._program
        assert program is not None
        tensors = self._tensor_inputs(program, args, kwargs)
        t = self._timestep_of(program, args, kwargs)
        pos = self._clock.locate(t, self._context)  # raises before anything runs when calls do not fit
        step, call = pos.step, pos.call
        idx = program.graph_of_step[step]
        io = program.io[idx]
        cache_in = [self._store.read(call, slot) for slot in io.cache_inputs]
        step_in = [program.step_values[name][step] for name in io.step_inputs]
        outs = program.runners[idx](*tensors, *cache_in, *step_in)
        n = program.call.num_outputs
        self._store.write_all(call, zip(io.cache_outputs, outs[n:]), caller=(*tensors, *outs[:n]))
        self._decisions.record(step, call, io.cache_outputs, outs[n:], copy=program.reuses_outputs)
        if self._clock.advance(pos, t, self._context):
            self._store.new_generation()  # the next call starts a new generation
            self._decisions.end_generation()
        return pytree.tree_unflatten(list(outs[:n]), program.call.out_spec)

    @staticmethod
    def _timestep_of(program: StepProgram, args: tuple, kwargs: dict) -> float | None:
        """The call's timestep (first element), read to check the calls against the schedule."""
        if "timestep" in kwargs:
            return timestep_value(kwargs["timestep"])
        idx = program.call.timestep_arg
        return timestep_value(args[idx]) if idx is not None and idx < len(args) else None

    # ------------------------------------------------------------------ artifacts
    def export(self, path: Any, format: str = "aoti", **options: Any) -> Any:
        """Write the step graphs as a deployable directory (see :mod:`cachecompile.core.artifact`):
        ``format`` is ``"aoti"``, ``"onnx"`` or ``"tensorrt"``; load it with ``cachecompile.load``.
        The model must have been called once (or optimized with example inputs) first.

        >>> cached.export("dit-fora3", format="onnx")   # doctest: +SKIP
        """
        if self._program is None:
            raise RuntimeError(
                "this model has not been captured yet, so there is nothing to export: call it once with the "
                "inputs it will serve (e.g. one sampling step), or pass them to cachecompile.optimize(model, "
                "schedule, example_kwargs=...), then export"
            )
        if self._builder is None:
            raise RuntimeError(
                "this model was loaded from an artifact and has no step graphs to export again; copy the "
                "artifact directory instead"
            )
        return self._builder.export(self._program, self._model, path, format, calls_per_step=self._clock.declared, **options)

    @classmethod
    def from_artifact(
        cls,
        path: Any,
        *,
        calls_per_step: int | str | None = None,
        verify: bool = True,
        import_output_type: bool = True,
        **backend_options: Any,
    ) -> "CachedTransformer":
        """Load a directory written by :meth:`export` (= ``cachecompile.load(path)``).

        Everything is checked before any step runs: the manifest's format version, every file and
        its sha256 (``verify=False`` skips the hashing), the torch version for AOTInductor packages,
        that each graph's inputs are the captured call's and that every cache slot a step reads is
        written by an earlier step. Failures raise :class:`~cachecompile.ArtifactError` saying what
        to do.

        ``calls_per_step`` overrides the exported value (``"auto"``, or 2 when a pipeline calls the
        transformer twice per step). ``backend_options`` go to the backend's ``load``
        (``providers=[...]`` for ONNX Runtime ...).

        Outputs: when the model returned its own type (diffusers' ``Transformer2DModelOutput``), its
        module is imported to rebuild it (``import_output_type=False`` never imports it). If it
        cannot be imported, the loaded model returns a namedtuple with the same field names
        (``out.sample`` and ``out[0]`` both work).

        >>> import cachecompile as cc                 # doctest: +SKIP
        >>> deployed = cc.load("dit-fora3")           # doctest: +SKIP
        """
        loaded = load_program(
            path, calls_per_step=calls_per_step, verify=verify, import_output_type=import_output_type, **backend_options
        )
        cached = cls(None, loaded.program.schedule, program=loaded.program, calls_per_step=loaded.calls_per_step)
        if loaded.config is not None:
            cached.config = loaded.config
        return cached

    def extra_repr(self) -> str:
        state = f"{len(self._program.runners)} step graphs" if self._program is not None else "not captured yet"
        return f"schedule={self.schedule!r}, backend={self.backend!r}, {state}"


def _describe_spec(args: tuple, kwargs: dict) -> str:
    return f"({len(args)} positional, keywords {sorted(kwargs)})"
