"""cachecompile: feature caching for Diffusion Transformers, as a compiler pass.

>>> import cachecompile as cc
>>> print(cc.Schedule.fora(num_steps=3, interval=3))  # doctest: +NORMALIZE_WHITESPACE
Schedule.fora(num_steps=3, interval=3)
step  kind          all blocks
   0  full          AM
   1  cached        ··
   2  cached        ··
"""

from __future__ import annotations

import importlib
from typing import Any

from cachecompile.schedule import COMPUTE, REUSE, Action, Layout, Schedule, ScheduleError, StepPlan

__version__ = "0.1.0"

# The passes and the runtime import cachecompile.schedule; importing them lazily keeps
# `import passes` (or `import runtime`) first from running into a half-initialised package.
_LAZY = {
    "optimize": "cachecompile.api",
    "CachedTransformer": "cachecompile.runtime.cached",
    "InputMismatchError": "cachecompile.runtime.cached",
    "StepMismatchError": "cachecompile.runtime.steps",
    "RegionPatterns": "cachecompile.passes.regions",
    "RegionError": "cachecompile.passes.regions",
    "CaptureError": "cachecompile.passes.capture",
    "GOC": "cachecompile.compensation",
    "EOC": "cachecompile.compensation",
    "Taylor": "cachecompile.compensation",
    "calibrate": "cachecompile.calibration",
    "load": "cachecompile.runtime.artifact",
    "ArtifactError": "cachecompile.backends",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachecompile' has no attribute {name!r}")


__all__ = [
    "optimize",
    "Schedule",
    "StepPlan",
    "Action",
    "COMPUTE",
    "REUSE",
    "Layout",
    "RegionPatterns",
    "CachedTransformer",
    "ScheduleError",
    "RegionError",
    "CaptureError",
    "InputMismatchError",
    "StepMismatchError",
    "GOC",
    "EOC",
    "Taylor",
    "calibrate",
    "load",
    "ArtifactError",
]
