"""Drop-in use inside diffusers pipelines.

``pipe.transformer = cc.optimize(pipe.transformer, schedule)`` is all a pipeline needs: the
:class:`~cachecompile.runtime.cached.CachedTransformer` answers ``config``, ``dtype``, ``device`` ... from the
original model, takes the same call, returns the same output type, implements
``cache_context`` (so the original model's hook registry is never touched), and checks the
calls of each generation against the schedule from their timesteps (:mod:`cachecompile.runtime.steps`).

``cc.optimize(pipe, schedule)`` does the same swap and :func:`attach_to_pipeline`: every
denoising loop then starts a new generation, and a loop whose length differs from the
schedule's ``num_steps`` fails before its first step (diffusers pipelines announce the loop's
length to ``self.progress_bar(total=...)`` or ``self.progress_bar(timesteps)``).

Example::

    import cachecompile as cc
    pipe = cc.optimize(pipe, cc.Schedule.fora(num_steps=28, interval=2))
    image = pipe("a cat", num_inference_steps=28).images[0]
    pipe(..., num_inference_steps=20)  # StepMismatchError: the schedule has 28 steps
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from cachecompile.runtime.cached import CachedTransformer

__all__ = ["attach_to_pipeline", "loop_length"]


def loop_length(iterable: Any = None, total: int | None = None) -> int | None:
    """The number of iterations a ``progress_bar(iterable, total)`` call announces, if known."""
    if total is not None:
        return int(total)
    if iterable is not None and hasattr(iterable, "__len__"):
        return len(iterable)
    return None


def attach_to_pipeline(pipe: Any) -> None:
    """Make ``pipe`` call ``pipe.transformer.begin_generation(n)`` when a denoising loop of ``n``
    steps starts, whenever ``pipe.transformer`` is a ``CachedTransformer`` (so swapping the
    original model back in disables it). Idempotent; the pipeline keeps working as before."""
    current = getattr(pipe, "progress_bar", None)
    if current is None or getattr(current, "_cachecompile_hook", False):
        return
    # An instance-level progress_bar (someone else's wrapper) is kept and called; the class's
    # method is called through a weak reference, so the hook makes no reference cycle.
    own = vars(pipe).get("progress_bar")
    unbound = getattr(type(pipe), "progress_bar")
    ref = weakref.ref(pipe)

    @functools.wraps(unbound)
    def progress_bar(*args: Any, **kwargs: Any) -> Any:
        owner = ref()
        transformer = getattr(owner, "transformer", None)
        if isinstance(transformer, CachedTransformer):
            transformer.begin_generation(loop_length(*args, **kwargs))
        return own(*args, **kwargs) if own is not None else unbound(owner, *args, **kwargs)

    progress_bar._cachecompile_hook = True  # type: ignore[attr-defined]
    pipe.progress_bar = progress_bar
