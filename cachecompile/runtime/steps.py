"""The step clock: which sampling step, and which call within it, each transformer call is.

A pipeline calls the transformer ``num_steps × calls_per_step`` times per generation: once per
step when classifier-free guidance runs as one batched call, twice when it runs the conditional
and unconditional branches as two calls (FLUX's ``true_cfg_scale``). The clock counts the calls
and, when they carry a ``timestep``, checks that they fit the schedule, so a mismatch is a clear
error instead of a silently wrong image:

* within a step every call has the same timestep (else ``calls_per_step`` is too large);
* a generation's length is the schedule's (when it was built with ``num_steps``), the one a
  pipeline announces (:meth:`StepClock.begin_generation`), or — neither known — open: the
  generation runs until the timestep goes up again, which starts the next one;
* with a known length, a step never has a larger timestep than the step before it: a jump up
  means a new generation began before the last step (the pipeline runs fewer steps); and after
  the last step, a call whose timestep keeps going down belongs to the same generation (the
  pipeline runs more steps, or more calls per step, than the generation has);
* under named cache contexts (``with transformer.cache_context("cond")``, as diffusers pipelines
  do), every step repeats step 0's sequence of contexts.

``calls_per_step="auto"`` learns the number in step 0 of each generation: step 0 ends at the
first call whose timestep differs from the first call's, or whose context repeats.

Reading a timestep's value costs a device sync per call on GPU (one scalar).

>>> clock = StepClock(num_steps=2, calls_per_step="auto")
>>> [clock.tick(t) for t in (999.0, 999.0, 500.0, 500.0)]
[(0, 0, False), (0, 1, False), (1, 0, False), (1, 1, True)]
>>> clock.detected
2
>>> open_ended = StepClock(num_steps=None)
>>> [open_ended.tick(t)[:2] for t in (999.0, 500.0, 1.0, 999.0)]   # the rise starts a new generation
[(0, 0), (1, 0), (2, 0), (0, 0)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cachecompile.core.errors import StepMismatchError

__all__ = ["StepClock", "StepMismatchError", "check_calls_per_step", "timestep_value", "AUTO"]

AUTO = "auto"


def check_calls_per_step(calls_per_step: Any) -> int | str:
    """``calls_per_step`` must be an integer >= 1 or ``"auto"``; returns it."""
    if calls_per_step == AUTO:
        return AUTO
    if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise ValueError(f"calls_per_step must be an integer >= 1 or 'auto', got {calls_per_step!r}")
    return calls_per_step


def timestep_value(t: Any) -> float | None:
    """The first element of a timestep argument (tensor or number) as a float, else None."""
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return None


@dataclass(frozen=True)
class _Pos:
    step: int
    call: int
    detected: int | None = None  # calls_per_step learnt by this call (auto mode)

    @property
    def starts(self) -> bool:
        """This call begins a generation."""
        return self.step == 0 and self.call == 0


_FIX = (
    "Build the schedule without num_steps (Schedule.fora(interval=...)) to follow the pipeline's "
    "num_inference_steps, pass calls_per_step=2 (or 'auto') when the pipeline calls the transformer "
    "twice per step (classifier-free guidance as two calls), and call transformer.reset() when you "
    "abandon a generation on purpose."
)


class StepClock:
    """Maps each call of a generation to ``(step, call within step)``; see the module docstring.

    ``num_steps`` is the schedule's fixed length, or ``None`` for a schedule that binds to each
    generation's: then :meth:`begin_generation` may announce the length, else the generation is
    open-ended (:attr:`length` is ``None``).
    """

    def __init__(self, num_steps: int | None, calls_per_step: int | str = 1) -> None:
        self.num_steps = num_steps
        self.declared = check_calls_per_step(calls_per_step)
        if self.declared == AUTO and num_steps is not None and num_steps < 2:
            raise ValueError("calls_per_step='auto' needs a schedule of at least 2 steps; declare calls_per_step")
        self._prev: tuple[float | None, float | None] | None = None  # (first, last) timestep of the last finished generation
        self._prev_length: int | None = None
        self._prev_steps: list[float | None] = []  # the timestep of each step of the last finished generation
        self.detected: int | None = None  # calls per step learnt in auto mode (the latest generation's)
        self.length: int | None = num_steps  # this generation's number of steps, when known
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start a new generation (forgets the last one, so no check spans the two)."""
        self._prev = None
        self.length = self.num_steps
        self._begin()

    def _begin(self) -> None:
        self.calls_per_step: int | None = None if self.declared == AUTO else int(self.declared)
        self.step, self.call, self.calls = 0, 0, 0
        self._first_t: float | None = None
        self._step_t: float | None = None
        self._last_t: float | None = None
        self._steps_t: list[float | None] = []  # the timestep of each step of this generation
        self._contexts: list[Any] = []  # context of each call of step 0

    @property
    def next_step(self) -> int:
        """The step the next call belongs to (0 in auto mode until step 1 begins)."""
        if self.calls == 0 or self.calls_per_step is None:
            return 0
        return self.step + (self.call + 1 >= self.calls_per_step)

    @property
    def in_generation(self) -> bool:
        """A generation has begun and not ended (an open-ended one ends when the next begins)."""
        return self.calls > 0

    def begin_generation(self, num_steps: int | None = None) -> None:
        """A pipeline starts a generation of ``num_steps`` steps (checked against a schedule that
        has a fixed number of steps)."""
        if num_steps is not None and self.num_steps is not None and num_steps != self.num_steps:
            raise StepMismatchError(
                f"the pipeline runs {num_steps} denoising steps but the schedule has {self.num_steps}. "
                f"Build the schedule without num_steps (e.g. cc.Schedule.fora(interval=...)) to follow every "
                f"generation's length, or call the pipeline with num_inference_steps={self.num_steps}."
            )
        self.reset()
        if num_steps is not None:
            self.length = int(num_steps)
            if self.declared == AUTO and self.length < 2:
                raise StepMismatchError("calls_per_step='auto' needs generations of at least 2 steps; declare calls_per_step")

    # ------------------------------------------------------------------ calls
    def locate(self, t: float | None, context: Any = None) -> _Pos:
        """Where the next call (timestep ``t``, cache context ``context``) falls; raises
        :class:`StepMismatchError` when it cannot fit the generation. Changes nothing."""
        if self.calls == 0:
            self._check_new_generation(t)
            return _Pos(0, 0)
        if self.calls_per_step is None:  # auto: still in step 0
            if t is None and context is None:
                raise StepMismatchError(
                    "calls_per_step='auto' needs calls with a `timestep` argument (or under "
                    "transformer.cache_context(...)) to tell the steps apart; declare calls_per_step=N"
                )
            repeats = context is not None and context in self._contexts
            if t == self._step_t and not repeats:
                return _Pos(0, self.call + 1)
            if self._rises(t):
                return _Pos(0, 0)  # an open-ended generation of one step ended
            self._check_next_step(t, context)
            return _Pos(1, 0, detected=self.call + 1)
        cps = self.calls_per_step
        if self.call + 1 < cps:  # another call of the same step
            if self._rises(t):
                return _Pos(0, 0)  # the open-ended generation was left mid-step; this call starts the next
            if t is not None and self._step_t is not None and t != self._step_t:
                raise StepMismatchError(
                    f"calls_per_step={cps}, but the timestep changed from {self._step_t:g} to {t:g} after "
                    f"{self.call + 1} call(s) in step {self.step}: the pipeline calls the transformer "
                    f"{self.call + 1} time(s) per step. Use calls_per_step={self.call + 1} or 'auto'."
                )
            self._check_context(context, self.call + 1)
            return _Pos(self.step, self.call + 1)
        if self._rises(t):
            return _Pos(0, 0)  # the open-ended generation ended; this call starts the next
        self._check_next_step(t, context)
        return _Pos(self.step + 1, 0)

    def _rises(self, t: float | None) -> bool:
        """In an open-ended generation, a timestep above the last one starts the next generation."""
        return self.length is None and t is not None and self._last_t is not None and t > self._last_t

    def advance(self, pos: _Pos, t: float | None, context: Any = None) -> bool:
        """Record the call at ``pos``; returns True when it finished the generation."""
        if pos.starts and self.calls:
            self._begin()  # an open-ended generation ended where this one starts
        if pos.detected is not None:
            self.calls_per_step = self.detected = pos.detected
        if pos.call == 0:
            self._step_t = t
            self._steps_t.append(t)
        if pos.step == 0:
            self._contexts.append(context)
            if pos.call == 0:
                self._first_t = t
        self.step, self.call, self._last_t = pos.step, pos.call, t
        self.calls += 1
        if (
            self.length is not None and self.calls_per_step is not None
            and pos.step == self.length - 1 and pos.call == self.calls_per_step - 1
        ):
            self._prev = (self._first_t, t)
            self._prev_length = self.length
            self._prev_steps = self._steps_t
            self._begin()
            self.length = self.num_steps  # the next generation's length is announced again, or open
            return True
        return False

    def tick(self, t: float | None, context: Any = None) -> tuple[int, int, bool]:
        """``locate`` then ``advance``: ``(step, call, finished)``."""
        pos = self.locate(t, context)
        return pos.step, pos.call, self.advance(pos, t, context)

    # ------------------------------------------------------------------ checks
    def _check_new_generation(self, t: float | None) -> None:
        if self._prev is None or t is None:
            return
        first, last = self._prev
        # A generation whose timesteps went down starts the next one higher up; a call that
        # keeps going down (or repeats the last timestep) is a step the generation does not have.
        if first is not None and last is not None and first > last and t <= last:
            raise StepMismatchError(
                f"the generation's {self._prev_length} steps × {self.calls_per_step or self.detected} call(s) are done, "
                f"but the pipeline called the transformer again at timestep {t:g} (the last was {last:g}): it runs "
                f"more steps than the generation has, or more calls per step than calls_per_step. {_FIX}"
            )

    def _check_next_step(self, t: float | None, context: Any) -> None:
        if self.length is not None and self.step + 1 >= self.length:
            raise AssertionError("the clock should have finished the generation")  # pragma: no cover
        k = self.step + 1
        prev = self._prev_steps
        if (
            t is not None and self.length is not None and len(prev) == self.length and k >= 2
            and self._steps_t == prev[:k] and t != prev[k]
        ):
            # Same length, same timesteps so far, then another one: a generation of this length
            # follows one trajectory, so this is most likely a new generation that began (at a
            # lower timestep) before this one ended.
            raise StepMismatchError(
                f"steps 0–{k - 1} of this generation had the last generation's timesteps, but step {k} has "
                f"{t:g} instead of {prev[k]:g}: a new generation seems to have begun after {k} of {self.length} "
                f"steps. Call transformer.reset() when you abandon a generation (cc.optimize(pipe, ...) does it "
                f"for a pipeline), so the new one does not read the old one's cache."
            )
        if t is not None and self._last_t is not None and t > self._last_t:
            raise StepMismatchError(
                f"the timestep went up from {self._last_t:g} to {t:g} after {self.step + 1} of the generation's "
                f"{self.length} steps: a new generation began before the last one finished (the pipeline "
                f"runs fewer steps than the schedule, or a generation was interrupted). {_FIX}"
            )
        self._check_context(context, 0)

    def _check_context(self, context: Any, call: int) -> None:
        if context is None or call >= len(self._contexts) or self._contexts[call] is None:
            return
        if context != self._contexts[call]:
            raise StepMismatchError(
                f"call {call} of step 0 ran under cache context {self._contexts[call]!r}, but this call, "
                f"taken as call {call} of step {self.step + (call == 0)}, runs under {context!r}: the pipeline "
                f"makes a different number of calls per step than calls_per_step={self.calls_per_step}. "
                f"Use calls_per_step='auto' or the pipeline's number of calls per step."
            )
