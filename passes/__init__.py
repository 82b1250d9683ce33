"""Graph passes of cachecompile: capture, regions, cache reads/writes, dead code removal.

Each pass is a small function ``fn(gm, ...) -> gm``; :data:`STEP_PASSES` is the one ordered list
that turns a captured graph into the step graph of one :class:`~cachecompile.schedule.StepPlan`.
``counters`` records what the passes did (``counters["cache_reads"]``), as Inductor's do.
"""

from __future__ import annotations

import collections

counters: collections.Counter = collections.Counter()

from passes.pipeline import STEP_PASSES, build_step_graph, copy_graph_module  # noqa: E402
import passes.families  # noqa: E402,F401  (registers the region defaults of every DiT family)

__all__ = ["counters", "STEP_PASSES", "build_step_graph", "copy_graph_module"]
