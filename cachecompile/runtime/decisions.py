"""The decisions of a generation: which steps computed and which reused.

A dynamic step graph (DBCache, TeaCache) writes its decision as the cache output
:data:`~cachecompile.core.program.DECISION_SLOT`, a 0-d boolean on the model's device. The log
keeps that tensor per call, as it is: nothing is read back while the generation runs (no
device-to-host copy per step). :meth:`DecisionLog.labels` reads them all at once, when asked.
Calls whose graph has no decision output take the schedule's own label for their step.

>>> import torch
>>> log = DecisionLog()
>>> log.record(0, 0, [], [])
>>> log.record(1, 0, ["dynamic.decision"], [torch.tensor(True)])
>>> log.end_generation()
>>> log.labels(lambda step: "full")
['full', 'cached']
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cachecompile.core.program import DECISION_SLOT

__all__ = ["DecisionLog"]


class DecisionLog:
    def __init__(self) -> None:
        self._current: list[tuple[int, int, torch.Tensor | None]] = []
        self._last: list[tuple[int, int, torch.Tensor | None]] = []

    def record(self, step: int, call: int, slots: Sequence[str], values: Sequence[torch.Tensor], copy: bool = False) -> None:
        """Keep call ``call`` of step ``step``'s decision, if its graph wrote one (``copy`` when
        the runner overwrites its outputs on the next call, as CUDA graphs do)."""
        flag = None
        if DECISION_SLOT in slots:
            flag = values[list(slots).index(DECISION_SLOT)].detach()
            flag = flag.clone() if copy else flag
        self._current.append((step, call, flag))

    def end_generation(self) -> None:
        """The generation in progress is finished (or abandoned): it becomes the last one."""
        if self._current:
            self._last, self._current = self._current, []

    def clear(self) -> None:
        """Forget the generation in progress (``reset()``); the last finished one is kept."""
        self._current = []

    def labels(self, static: Callable[[int], str]) -> list[str]:
        """Per step of the generation in progress (or else the last one): ``"cached"`` where the
        graph decided to reuse, ``"full"`` where it computed, ``static(step)`` where the schedule
        fixed the step. A step whose calls decided differently (CFG as two calls) joins the
        labels with ``+``. One device-to-host copy for the whole generation."""
        calls = self._current or self._last
        flags = [f.reshape(()) for _, _, f in calls if f is not None]
        read = iter(torch.stack(flags).cpu().tolist() if flags else [])
        by_step: dict[int, list[str]] = {}
        for step, _, f in calls:
            label = static(step) if f is None else ("cached" if next(read) else "full")
            by_step.setdefault(step, []).append(label)
        return ["+".join(dict.fromkeys(by_step[s])) for s in sorted(by_step)]
