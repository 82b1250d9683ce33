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

from cachecompile.core.errors import (
    ArtifactError,
    CaptureError,
    ConcurrentUseError,
    InputMismatchError,
    RegionError,
    ScheduleError,
    StepMismatchError,
)
from cachecompile.core.regions import RegionPatterns
from cachecompile.core.schedule import COMPUTE, REUSE, Action, Layout, Schedule, StepPlan, register_cache_sizer
from cachecompile.core.version import __version__  # noqa: F401
from cachecompile.methods.compensation import EOC, GOC, Taylor  # importing methods registers every method


# The compiler, the runtime and the tools load on first use: `import cachecompile` stays light
# for a process that only reads schedules.
_LAZY = {
    "optimize": "cachecompile.api",
    "load": "cachecompile.api",
    "CachedTransformer": "cachecompile.runtime.cached",
    "calibrate": "cachecompile.calibration",
    "tune": "cachecompile.tools.tune",
    "flops_ratio": "cachecompile.tools.flops",
    "cache_bytes": "cachecompile.api",
}


def _cache_bytes(*args: Any, **kwargs: Any) -> int:
    return importlib.import_module("cachecompile.api").cache_bytes(*args, **kwargs)


register_cache_sizer(_cache_bytes)  # Schedule.cache_bytes, answered by the compiler


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
    "ConcurrentUseError",
    "GOC",
    "EOC",
    "Taylor",
    "calibrate",
    "tune",
    "flops_ratio",
    "cache_bytes",
    "load",
    "ArtifactError",
]
