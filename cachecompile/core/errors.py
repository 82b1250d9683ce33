"""The errors cachecompile raises. Each message says what to do."""

from __future__ import annotations

__all__ = [
    "ScheduleError",
    "StepMismatchError",
    "InputMismatchError",
    "CaptureError",
    "RegionError",
    "ArtifactError",
    "BackendCompileError",
    "ConcurrentUseError",
]


class ScheduleError(ValueError):
    """A schedule that cannot be built or does not fit the model."""


class StepMismatchError(ScheduleError):
    """The transformer calls of a generation do not fit the schedule (steps or calls per step)."""


class InputMismatchError(ValueError):
    """A call whose inputs do not match the captured ones (shape, dtype, structure, constants)."""


class CaptureError(RuntimeError):
    """The model could not be captured as one graph."""


class RegionError(ValueError):
    """No usable region was found, or a pattern matched something that cannot be cached."""


class ArtifactError(RuntimeError):
    """An exported artifact cannot be loaded: missing, corrupt or built for something else."""


class BackendCompileError(RuntimeError):
    """A backend failed to lower a step graph. Never swallowed: there is no eager fallback."""


class ConcurrentUseError(RuntimeError):
    """One cached transformer was called from two threads at once (one generation at a time:
    give each thread its own ``cc.optimize``'d model)."""
