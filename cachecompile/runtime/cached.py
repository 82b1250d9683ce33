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
import threading
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree

from cachecompile.core.errors import ConcurrentUseError, InputMismatchError, StepMismatchError
from cachecompile.core.program import ProgramBuilder, StepProgram, timestep_index
from cachecompile.core.regions import RegionMap
from cachecompile.core.schedule import Schedule, StepPlan
from cachecompile.runtime.artifact import load_program
from cachecompile.runtime.cache_store import CacheStore
from cachecompile.runtime.decisions import DecisionLog
from cachecompile.runtime.steps import StepClock, timestep_value

log = logging.getLogger(__name__)

__all__ = ["CachedTransformer", "ConcurrentUseError", "HoldsModel", "InputMismatchError", "fingerprint"]


class HoldsModel(torch.nn.Module):
    """A stand-in for a model in a pipeline: holds the original model without registering it as
    a submodule (the model object is never modified, except that ``.to()`` and its kin move it)
    and answers for it: the attributes it lacks (``config``, ``dtype``, ``device`` ...), and its
    parameters, buffers, ``state_dict``/``load_state_dict`` and ``train``/``eval`` under the
    model's own names, so a checkpoint of the plain model loads into it and accelerate's offload
    finds the weights."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        if model is not None:
            self.__dict__["__module__"] = type(model).__module__  # see __class__

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

    # The held model's weights and mode, under its own names.
    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self._held().parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self._held().named_parameters(*args, **kwargs)

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        return self._held().buffers(recurse)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return self._held().named_buffers(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._held().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self._held().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> "HoldsModel":
        super().train(mode)
        model = self.__dict__.get("_model")
        if model is not None:
            model.train(mode)
        return self

    def _held(self) -> torch.nn.Module:
        model = self.__dict__.get("_model")
        return model if model is not None else _NO_MODEL

    # diffusers registers, saves and loads a pipeline's components by their class and module
    # (``save_pretrained`` calls the component's own ``save_pretrained`` when its class is a
    # ``ModelMixin``): the stand-in gives the held model's, so a pipeline saves the plain model's
    # weights and config and loads back the plain model. ``type(stand_in)`` stays the stand-in's.
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        model = self.__dict__.get("_model")
        return type(model) if model is not None else type(self)

    def _get_name(self) -> str:  # its repr names the stand-in
        return type(self).__name__


_NO_MODEL = torch.nn.Module()  # what a stand-in without a model (a loaded artifact) answers for


def _placement(model: torch.nn.Module) -> set[tuple[torch.device, torch.dtype]]:
    return {(t.device, t.dtype) for t in itertools.chain(model.parameters(), model.buffers())}


def fingerprint(model: torch.nn.Module, weights_by_value: bool) -> tuple:
    """What the step graphs depend on besides the call: the parameter and buffer objects (and,
    where a backend keeps its own copy of the weights, their in-place versions), each module's
    type, mode, attention processor, forward hooks and instance-level ``forward`` (diffusers'
    hook registry replaces it). A change means the model changed since it was captured."""
    tensors = tuple(
        (name, id(t), t._version if weights_by_value else 0)
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    )
    modules = tuple(
        (name, type(m), m.training, id(getattr(m, "processor", None)), id(m.__dict__.get("forward")),
         tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in model.named_modules()
    )
    return tensors, modules


class CachedTransformer(HoldsModel):
    """A transformer whose calls follow a cache schedule. Build it with :func:`cachecompile.optimize`
    (or load one with :func:`cachecompile.load`).

    Each generation runs the step program of its call and its length: the program is built on
    the first call of a generation whose input signature (the call but its batch size) or length
    is new, and reused afterwards. The model is checked at the start of every generation: new
    weights objects, an in-place weight update (where the backend keeps its own copy), another
    attention processor, ``train()``/``eval()``, added hooks — it is captured again, as a
    ``torch.compile``'d module recompiles.

    Attributes:
        schedule: the :class:`~cachecompile.Schedule`.
        plans: one :class:`~cachecompile.core.schedule.StepPlan` per step of the current program.
        step_graphs: each distinct plan → its rewritten ``GraphModule``.
        region_map: the regions found in the captured graph.
        program: the :class:`~cachecompile.core.program.StepProgram` being executed.
        captures: how many input signatures are captured.
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
        # Counts calls into (step, call within step) and checks they fit the generation (runtime.steps).
        self._clock = StepClock(schedule.num_steps if program is None else program.num_steps, calls_per_step)
        self._context: Any = None  # the pipeline's cache_context name for the current call
        self._store = CacheStore()
        self._lock = threading.Lock()
        self._program: StepProgram | None = program
        self._timestep_arg = program.call.timestep_arg if program is not None else timestep_index(type(model))
        self._fingerprint: tuple | None = None
        self._generation: tuple[int, int | None] | None = None  # (thread, batch) of the running generation
        self._last_length: int | None = None  # the length of the last open-ended generation
        self._steps_run = 0  # steps the running generation has run
        self._decisions = DecisionLog()  # dynamic steps' decision flags, kept on device (runtime.decisions)
        if program is not None:
            self._store.in_place = program.reuses_outputs

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
    def captures(self) -> int:
        """How many input signatures (the call but its batch size: resolution, dtype, device,
        constant arguments) are captured; each has its own step graphs."""
        return self._builder.captures if self._builder is not None else 1

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
        if self._program is None:  # nothing ran yet
            return []
        kinds = self._program.schedule.step_kinds()  # bound to the generation's length
        return self._decisions.labels(lambda step: kinds[step] if step < len(kinds) else "full")

    @property
    def cache_bytes(self) -> int:
        """The most bytes the cache store held at once in the running generation (between
        generations: in the last one). The store keeps a value only until its last read, and
        holds nothing between generations (see :mod:`cachecompile.runtime.cache_store`)."""
        return self._store.peak_nbytes

    # ------------------------------------------------------------------ building
    def prepare(self, *args: Any, num_steps: int | None = None, **kwargs: Any) -> "CachedTransformer":
        """Capture, find regions, resolve the schedule, rewrite and lower, for the call
        ``model(*args, **kwargs)`` and a generation of the schedule's number of steps (or
        ``num_steps`` for a schedule without one; else an open-ended generation).

        The first call of a generation does it; call it yourself to pay the cost up front. All
        or nothing: on error the module stays as it was.
        """
        if self._builder is None:
            raise RuntimeError("this model was loaded from an artifact: its step graphs are built already")
        length = self.schedule.num_steps or num_steps
        self._check_model()
        program = self._builder.build(
            self._model, args, kwargs, length or self._last_length or _DEFAULT_HORIZON, open_ended=length is None
        )
        self._run(program)
        return self

    def _run(self, program: StepProgram) -> None:
        if program is not self._program:
            self._program = program
            self._store.in_place = program.reuses_outputs

    def _check_model(self) -> None:
        """Forget the captures when the model changed since they were made."""
        if self._builder is None or self._model is None:
            return
        now = fingerprint(self._model, self._builder.bakes_weights)
        if self._fingerprint is not None and now != self._fingerprint and self._builder.captures:
            log.info("cachecompile: the model changed (weights, modules, mode or hooks); capturing again")
            self._builder.forget()
            self._program = None
        self._fingerprint = now

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
        if self._builder is None or not self._builder.captures:
            return
        log.info("cachecompile: the model moved to %s; its step graphs are rebuilt on the next call",
                 sorted({f"{d}/{str(t).removeprefix('torch.')}" for d, t in _placement(self._model)}))
        self._builder.forget()
        self._program = None
        self.reset()

    def reset(self) -> None:
        """Start a new generation: the next call is step 0 and the cache is emptied."""
        self._clock.reset()
        self._store.clear()
        self._decisions.clear()
        self._generation = None

    def _reset_stateful_cache(self) -> None:
        """diffusers pipelines call this at the end of every call (``maybe_free_model_hooks``): the
        generation is over, so the next call starts a new one even when only the transformer was
        swapped. A generation of a schedule with a fixed step count that stopped early stays
        open: its next call says the pipeline ran fewer steps than the schedule has."""
        if self._clock.num_steps is not None and self._clock.in_generation:
            return
        self._end_open_generation()
        self._clock.reset()
        self._store.new_generation()
        self._decisions.end_generation()
        self._generation = None

    def begin_generation(self, num_steps: int | None = None) -> None:
        """Pipeline hook: a generation of ``num_steps`` denoising steps starts now.

        A schedule without a step count binds to ``num_steps``; one built for another number of
        steps raises :class:`~cachecompile.StepMismatchError` (before any step runs). The next
        call is step 0; the cache starts empty (CUDA-graph buffers are kept).
        ``cc.optimize(pipe, schedule)`` makes the pipeline call it at the start of every
        denoising loop; a hand-written loop may call it too::

            cached.begin_generation(len(scheduler.timesteps))
        """
        if self._builder is None and num_steps is not None and self._program is not None and num_steps != self._program.num_steps:
            raise StepMismatchError(
                f"this artifact was exported for {self._program.num_steps} denoising steps, the pipeline runs "
                f"{num_steps}: export it again for {num_steps} steps"
            )
        self._clock.begin_generation(num_steps)
        self._store.new_generation()
        self._generation = None
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
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._lock.acquire(blocking=False):
            raise ConcurrentUseError(_CONCURRENT)
        try:
            return self._call(args, kwargs)
        finally:
            self._lock.release()

    def _call(self, args: tuple, kwargs: dict) -> Any:
        t = self._timestep_of(args, kwargs)
        pos = self._clock.locate(t, self._context)  # raises before anything runs when calls do not fit
        thread = threading.get_ident()
        if pos.starts:
            program = self._start(args, kwargs)
            tensors = program.call.tensors(args, kwargs)
            self._store.new_generation()
            self._generation = (thread, program.call.batch_of(tensors))
        else:
            if self._generation is not None and self._generation[0] != thread:
                raise ConcurrentUseError(_CONCURRENT)
            program = self._program
            assert program is not None
            tensors = self._same_generation(program, args, kwargs)
            if pos.step >= program.num_steps:  # an open-ended generation outgrew its program
                program = self._extend(args, kwargs, pos.step)
        step, call = pos.step, pos.call
        idx = program.graph_of_step[step]
        io = program.io[idx]
        cache_in = [self._store.read(call, slot) for slot in io.cache_inputs]
        step_in = [program.step_values[name][step] for name in io.step_inputs]
        # what this step rewrites without reading it is freed before the step computes anew
        self._store.release(call, [slot for slot in io.cache_outputs if slot not in io.cache_inputs])
        outs = program.runners[idx](*tensors, *cache_in, *step_in)
        n = program.call.num_outputs
        self._store.write_all(call, zip(io.cache_outputs, outs[n:]), caller=(*tensors, *outs[:n]))
        self._store.release(call, program.dead_after(step))  # what no later step reads
        self._decisions.record(step, call, io.cache_outputs, outs[n:], copy=program.reuses_outputs)
        self._steps_run = step + 1
        if self._clock.advance(pos, t, self._context):
            self._store.new_generation()  # the next call starts a new generation
            self._decisions.end_generation()
            self._generation = None
        return pytree.tree_unflatten(list(outs[:n]), program.call.out_spec)

    def _start(self, args: tuple, kwargs: dict) -> StepProgram:
        """The program of a generation that starts with this call."""
        self._decisions.end_generation()  # an open-ended one ends only when the next starts
        if self._builder is None:  # a loaded artifact: one program, for its call and length
            program = self._program
            assert program is not None
            return program
        self._end_open_generation()
        self._check_model()
        length = self._clock.length
        open_ended = length is None
        if open_ended:  # learnt from the last open-ended generation; a longer one grows it
            length = self._last_length or _DEFAULT_HORIZON
        program = self._builder.build(self._model, args, kwargs, length, open_ended=open_ended)
        self._run(program)
        return program

    def _end_open_generation(self) -> None:
        """Remember how long an open-ended generation that ends now ran."""
        if self._generation is not None and self._program is not None and self._steps_run:
            if self.schedule.num_steps is None:
                self._last_length = self._steps_run
        self._steps_run = 0

    def _extend(self, args: tuple, kwargs: dict, step: int) -> StepProgram:
        """A longer program for an open-ended generation that reached the end of its own."""
        assert self._builder is not None and self._program is not None
        length = max(2 * self._program.num_steps, step + 1)
        program = self._builder.build(self._model, args, kwargs, length, open_ended=True)
        self._run(program)
        return program

    def _same_generation(self, program: StepProgram, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph inputs of a call in a running generation, which must keep its batch."""
        tensors = program.call.tensors(args, kwargs)
        batch = program.call.batch_of(tensors)
        if self._generation is not None and batch != self._generation[1]:
            raise InputMismatchError(
                f"the batch changed from {self._generation[1]} to {batch} within a generation: the cache holds "
                f"values of the first batch; keep one batch per generation (call transformer.reset() to abandon it)"
            )
        return tensors

    def _timestep_of(self, args: tuple, kwargs: dict) -> float | None:
        """The call's timestep (first element), read to check the calls against the schedule."""
        if "timestep" in kwargs:
            return timestep_value(kwargs["timestep"])
        idx = self._timestep_arg
        return timestep_value(args[idx]) if idx is not None and idx < len(args) else None

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict:
        """Pickling (``torch.save``, ``copy.deepcopy``) keeps the model, the schedule and the
        options; the captures and the cache are rebuilt on the next call, as a
        ``torch.compile``'d module recompiles."""
        if self._builder is None:
            raise TypeError(
                "a model loaded from an artifact cannot be pickled or deep-copied: keep the artifact directory and "
                "load it again with cachecompile.load (or share the loaded model)"
            )
        state = dict(self.__dict__)
        state["_lock"] = None
        state["_program"] = None
        state["_store"] = CacheStore()
        state["_generation"] = None
        state["_builder"] = self._builder.copy_without_captures()
        state["_clock"] = StepClock(self.schedule.num_steps, self._clock.declared)
        state["_fingerprint"] = None
        state["_decisions"] = DecisionLog()
        return state

    def __setstate__(self, state: dict) -> None:
        state["_lock"] = threading.Lock()
        self.__dict__.update(state)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # by the stand-in's own type: ``__class__`` answers the held model's (see HoldsModel)
        return (_new, (type(self),), self.__getstate__())

    # ------------------------------------------------------------------ artifacts
    def export(self, path: Any, format: str = "aoti", **options: Any) -> Any:
        """Write the step graphs as a deployable directory (see :mod:`cachecompile.core.artifact`):
        ``format`` is ``"aoti"``, ``"onnx"`` or ``"tensorrt"``; load it with ``cachecompile.load``.
        The program of the last generation (its call, its length) is exported: call the model
        once first (or optimize it with example inputs). Its batch dimension stays dynamic where
        the capture made it so.

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


def _new(cls: type) -> Any:
    """Unpickling: an empty instance that ``__setstate__`` fills."""
    return cls.__new__(cls)


# The first program of an open-ended generation covers this many steps; longer ones grow it.
_DEFAULT_HORIZON = 64

_CONCURRENT = (
    "this cached transformer is running a generation in another thread: one CachedTransformer runs one "
    "generation at a time. Give each thread its own: cachecompile.optimize(model, schedule) again (they share "
    "the model's weights) or copy.deepcopy(cached)"
)
