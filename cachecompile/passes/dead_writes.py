"""Cache writes that no step reads are dropped from the step graphs.

A plan says what a step writes; whether anyone reads it depends on the steps after it. DuCa at
interval 3 is the case in point: its conservative step (1, 4, 7 …) updates every block's MLP
cache, but the step after it is aggressive (it reads only the stack's cached residual) and the
one after that is full (it writes the MLP caches anew without reading them); so those updates
are never read, and neither is the full step's stack write, which the conservative step
overwrites. At interval 4 the second conservative step reads the first one's MLP caches, and
the writes stay.

This pass runs once per schedule, over all step graphs together (a graph serves several
steps): a slot's write is dead at step ``s`` when the first later step that touches the slot
writes it without reading it, or when no later step touches it (a new generation starts from an
empty cache). A graph drops a write only where it is dead at every step it serves. The
dropped outputs' producers then go with dead code removal, and a cache input that fed only
them goes too, which can make more writes dead: the pass repeats until nothing changes.
Results are unchanged by construction (a value no step reads cannot change an output); what
changes is the memory the store keeps and what the graphs materialise. The runtime itself reads
:data:`~cachecompile.core.program.DECISION_SLOT` (a dynamic step's decision), so that write is
never dead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.fx

from cachecompile.passes import counters
from cachecompile.passes.cache_io import cache_io
from cachecompile.core.program import DECISION_SLOT, StepIO
from cachecompile.passes.dce import tidy

log = logging.getLogger(__name__)

__all__ = ["dead_cache_writes", "drop_dead_cache_writes"]


def dead_cache_writes(ios: Sequence[StepIO], graph_of_step: Sequence[int]) -> list[set[str]]:
    """Per graph (``ios[i]`` is graph ``i``'s :func:`~cachecompile.passes.cache_io.cache_io`), the slots it
    writes that are dead at every step it serves. ``graph_of_step[s]`` is step ``s``'s graph."""
    reads = [set(io.cache_inputs) for io in ios]
    writes = [set(io.cache_outputs) for io in ios]
    live: list[set[str]] = [set() for _ in ios]
    n = len(graph_of_step)
    for s, g in enumerate(graph_of_step):
        for slot in writes[g] - live[g]:
            for later in graph_of_step[s + 1 : n]:
                if slot in reads[later]:
                    live[g].add(slot)
                    break
                if slot in writes[later]:
                    break
    return [w - l - {DECISION_SLOT} for w, l in zip(writes, live)]


def _drop(gm: torch.fx.GraphModule, slots: set[str]) -> None:
    io = cache_io(gm)
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = list(out.args[0])
    n = io.num_user_outputs
    kept = [(s, v) for s, v in zip(io.cache_outputs, values[n:]) if s not in slots]
    out.args = (tuple(values[:n] + [v for _, v in kept]),)
    io.cache_outputs = [s for s, _ in kept]
    tidy(gm)


def drop_dead_cache_writes(graphs: Sequence[torch.fx.GraphModule], graph_of_step: Sequence[int]) -> int:
    """Remove every dead cache write from ``graphs`` (in place); returns how many were removed."""
    removed = 0
    while True:
        dead = dead_cache_writes([cache_io(gm) for gm in graphs], graph_of_step)
        if not any(dead):
            break
        for gm, slots in zip(graphs, dead):
            if slots:
                _drop(gm, slots)
                removed += len(slots)
                log.debug("dropped dead cache writes %s", sorted(slots))
    counters["dead_cache_writes"] += removed
    return removed
