"""The caching methods, one place each: a method's schedule checks and rules (registered with
:mod:`cachecompile.core.schedule`), the graph passes it adds, and the per-step values its step
graphs take as inputs.

* :mod:`~cachecompile.methods.reuse` — FORA, masks, explicit actions (plain cache reads/writes);
* :mod:`~cachecompile.methods.dual` — ToCa and DuCa (token-wise partial recompute, stack reuse);
* :mod:`~cachecompile.methods.compensation` — GOC, EOC and Taylor forecasts;
* :mod:`~cachecompile.methods.dynamic` — DBCache / First-Block Cache and TeaCache (decided in the
  graph), MagCache.

Importing this package registers them all (``import cachecompile`` does).
"""

from __future__ import annotations

from typing import Sequence

import torch

from cachecompile.core.errors import ScheduleError
from cachecompile.core.schedule import Schedule, StepPlan
from cachecompile.methods import compensation, dual, dynamic, reuse

__all__ = ["compensation", "dual", "dynamic", "reuse", "step_values"]


def step_values(
    schedule: Schedule, plans: Sequence[StepPlan], names: Sequence[str], device: torch.device
) -> dict[str, list[torch.Tensor]]:
    """Every per-step graph input among ``names``, one value per step, from the method that
    added it (the step index for token scores, compensation coefficients and priors)."""
    out = dual.step_values(list(plans), list(names), device)
    out.update(compensation.step_values(schedule, plans, names, device))
    missing = sorted(set(names) - set(out))
    if missing:
        raise ScheduleError(f"no method provides the per-step graph inputs {missing}")
    return out
