"""The public calls: :func:`optimize` (the one call a user makes) and :func:`load`. They wire
the compiler (:mod:`cachecompile.compile`) into the runtime (:mod:`cachecompile.runtime`), which
never import each other."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from cachecompile.compile.driver import DEFAULT_MAX_CAPTURES, Compiler
from cachecompile.core.errors import ScheduleError
from cachecompile.core.regions import RegionPatterns
from cachecompile.core.schedule import Schedule
from cachecompile.pipelines import attach_to_pipeline
from cachecompile.runtime.cached import CachedTransformer
from cachecompile.runtime.steps import check_calls_per_step

__all__ = ["optimize", "load", "cache_bytes"]


def optimize(
    model: Any,
    schedule: Schedule,
    backend: str = "eager",
    *,
    regions: RegionPatterns | None = None,
    calls_per_step: int | str = 1,
    example_args: tuple | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    max_captures: int = DEFAULT_MAX_CAPTURES,
    **backend_options: Any,
) -> Any:
    """Make ``model`` follow ``schedule``: returns a :class:`CachedTransformer` (or, for a diffusers
    pipeline, the pipeline with its ``transformer`` swapped).

    The model is captured on its first call (or now, given ``example_args``/``example_kwargs``);
    the original model object is never modified. ``.to()`` on the result (or ``pipe.to()``) moves
    the model it holds; when that changes a device or dtype, the next call captures and compiles
    again, as a ``torch.compile``'d module recompiles.

    Example::

        import cachecompile as cc
        schedule = cc.Schedule.fora(num_steps=50, interval=3)
        pipe.transformer = cc.optimize(pipe.transformer, schedule)
        image = pipe(class_labels=[207], num_inference_steps=50).images[0]

    Args:
        model: a diffusers transformer (any ``nn.Module`` that ``torch.export`` captures), or a
            pipeline with a ``transformer`` attribute.
        schedule: a :class:`Schedule`.
        backend: ``"eager"``, ``"inductor"``, ``"aoti"``, ``"onnxruntime"`` or ``"tensorrt"``.
        regions: patterns for models without a registered family default.
        calls_per_step: transformer calls per sampling step (2 when a pipeline runs the
            conditional and unconditional branches of classifier-free guidance as two calls), or
            ``"auto"`` to detect it in step 0 from the ``timestep`` argument (see
            :mod:`cachecompile.runtime.steps`; calls that do not fit the schedule raise ``StepMismatchError``).
        dynamic_batch: one set of step graphs for every batch size (the batch dimension is
            symbolic in the capture and in every backend); ``False`` captures per batch size.
        max_captures: how many input signatures (resolution, dtype, device, constant arguments;
            the batch too without ``dynamic_batch``) are captured before a new one is an error,
            as ``torch._dynamo``'s cache size limit.
        backend_options: passed to the backend (``mode="max-autotune"`` for Inductor ...); checked
            here, so a misspelled option fails now, not at the first call.

    For a pipeline, the denoising loop's length is also checked against ``schedule.num_steps``
    before the first step (the pipeline's ``progress_bar`` calls
    :meth:`CachedTransformer.begin_generation`); undo with ``pipe.transformer = pipe.transformer.model``.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a cachecompile.Schedule, got {type(schedule).__name__}; build one with cc.Schedule.fora(...)")
    check_calls_per_step(calls_per_step)
    transformer = getattr(model, "transformer", None)
    if not isinstance(model, torch.nn.Module) and isinstance(transformer, torch.nn.Module):
        cached = optimize(
            transformer, schedule, backend, regions=regions, calls_per_step=calls_per_step,
            example_args=example_args, example_kwargs=example_kwargs, dynamic_batch=dynamic_batch,
            max_captures=max_captures, **backend_options,
        )
        attach_to_pipeline(model)
        model.transformer = cached
        return model
    if not isinstance(model, torch.nn.Module):
        if hasattr(model, "transformer") and transformer is None:
            raise TypeError(f"this {type(model).__name__} has no transformer (pipe.transformer is None): there is nothing to optimize")
        raise TypeError(f"optimize() takes a torch.nn.Module or a pipeline with .transformer, got {type(model).__name__}")
    if isinstance(model, CachedTransformer):
        raise TypeError("this model is already optimized; pass cached.model to optimize it again with another schedule")
    builder = Compiler(
        schedule, backend, regions=regions, backend_options=backend_options, dynamic_batch=dynamic_batch,
        max_captures=max_captures,
    )
    cached = CachedTransformer(model, schedule, builder=builder, calls_per_step=calls_per_step)
    if example_args is not None or example_kwargs is not None:
        cached.prepare(*(example_args or ()), **dict(example_kwargs or {}))
    return cached


def cache_bytes(
    model: Any,
    schedule: Schedule,
    example_inputs: Any,
    *,
    num_steps: int | None = None,
    calls_per_step: int = 1,
    regions: RegionPatterns | None = None,
    dynamic_batch: bool = True,
) -> int:
    """The bytes the cache store of ``cc.optimize(model, schedule)`` will hold once a generation
    has run on calls like ``example_inputs`` (``cached.cache_bytes`` afterwards), known before
    anything runs: every cache slot the schedule's step graphs write, at the inputs' batch size,
    in the dtype it is stored in (the schedule's ``cache_dtype``), once per call of a step. Any
    backend holds the same. The step graphs are built as ``optimize`` builds them, on a capture
    (``torch.export`` traces with fake tensors): the model is neither run nor changed.

    >>> schedule = cc.Schedule.fora(interval=3)                                # doctest: +SKIP
    >>> cc.cache_bytes(model, schedule, dict(hidden_states=x, timestep=t, class_labels=y), num_steps=50)  # doctest: +SKIP

    Args:
        model: the transformer (or a pipeline with a ``transformer``).
        schedule: a :class:`Schedule`; one without a step count needs ``num_steps`` (which slots
            are written can depend on the length).
        example_inputs: the transformer's call: a dict of keyword arguments, a tuple of positional
            arguments, or one tensor.
        calls_per_step: transformer calls per step (each call keeps its own cache).
        regions, dynamic_batch: as for :func:`optimize`.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a cachecompile.Schedule, got {type(schedule).__name__}")
    transformer = getattr(model, "transformer", None)
    if not isinstance(model, torch.nn.Module) and isinstance(transformer, torch.nn.Module):
        model = transformer
    if isinstance(model, CachedTransformer):
        model = model.model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"cache_bytes() takes a torch.nn.Module or a pipeline with .transformer, got {type(model).__name__}")
    if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise ValueError(f"calls_per_step must be an integer >= 1, got {calls_per_step!r}")
    if num_steps is None and schedule.num_steps is None:
        raise ScheduleError(
            f"{schedule!r} binds to each generation's length, and which cache slots it writes can depend on it: "
            f"pass num_steps= (the generation's number of steps), or bind it (schedule.bind(n))"
        )
    length = schedule.bind(num_steps).num_steps if num_steps is not None else schedule.num_steps
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    compiler = Compiler(schedule, "eager", regions=regions, dynamic_batch=dynamic_batch)
    slots = compiler.cache_slots(model, args, kwargs, length)
    per_call = sum(math.prod(shape) * _itemsize(dtype) for shape, dtype in slots.values())
    return per_call * calls_per_step


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def load(path: Any, **options: Any) -> CachedTransformer:
    """Load an artifact directory written by ``cached.export`` as a drop-in
    :class:`~cachecompile.CachedTransformer` (see
    :meth:`~cachecompile.runtime.cached.CachedTransformer.from_artifact` for the options and checks).

    >>> import cachecompile as cc                 # doctest: +SKIP
    >>> deployed = cc.load("dit-fora3")           # doctest: +SKIP
    """
    return CachedTransformer.from_artifact(path, **options)
