"""Dynamic caching in one place: DBCache / First-Block Cache and TeaCache decide per step inside
the step graph (``torch.cond`` on cache state), MagCache is resolved from its calibrated ratios.

* :mod:`.schedule` — the methods (``dbcache``, ``teacache``, ``magcache``), their checks, rules
  and actions (:class:`Decide`, :class:`Record`), the cache slots they use;
* :mod:`.graph` — the graph pass :func:`dynamic_reuse` (decision, branch, state writes);
* :mod:`.calibrate` — TeaCache's coefficients and MagCache's ratios from uncached runs
  (``cc.calibrate`` calls it).

They add no per-step inputs: what a step needs is in the cache (probe, residual, counters).
"""

from cachecompile.methods.dynamic.graph import dynamic_reuse, threshold_for
from cachecompile.methods.dynamic.schedule import (
    POLICIES,
    PROBE_SLOT,
    RESIDUAL_SLOT,
    STATE_SLOT,
    TEACACHE_COEFFICIENTS,
    Decide,
    Record,
    full_steps_at_start,
    magcache_steps,
    step_action,
    step_kind,
    teacache_coefficients,
)

__all__ = [
    "POLICIES", "PROBE_SLOT", "RESIDUAL_SLOT", "STATE_SLOT", "TEACACHE_COEFFICIENTS", "Decide", "Record",
    "dynamic_reuse", "full_steps_at_start", "magcache_steps", "step_action", "step_kind", "teacache_coefficients", "threshold_for",
]
