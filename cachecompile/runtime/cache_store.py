"""The cache store: one tensor per (call within step, cache slot).

A value is kept only while a later step will read it: the runtime releases a slot after its
last read (and before a step that rewrites it without reading it), and a new generation starts
with an empty store, so between generations (a pipeline's VAE decode, another model) the cache
holds nothing. ``peak_nbytes`` is the most it held at once.

Two ways to keep a written value:

- by reference (default): the step graph's output tensor itself is kept. Step graphs return
  fresh tensors, so this costs nothing; copying would add a full pass over every cached
  activation to each computing step (36 MiB per full step on the DiT-S/2 shape).
- in place (``in_place=True``): values are copied (``copy_``) into buffers preallocated on
  the first write, so their addresses never change across steps. Needed when a runner reuses
  its output memory on the next call (CUDA graphs: ``mode="reduce-overhead"``), and for
  anything that captures the cache's addresses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["CacheStore"]


class CacheStore:
    def __init__(self, in_place: bool = False) -> None:
        self.in_place = in_place
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self._written: set[tuple[int, str]] = set()  # slots written in this generation
        self._peak = 0  # the most bytes held at once in this generation
        self._last_peak = 0  # ... in the last generation that wrote anything

    def read(self, call: int, slot: str) -> torch.Tensor:
        if (call, slot) not in self._written:
            raise RuntimeError(
                f"cache slot {slot!r} read before any step of this generation wrote it; this is a bug "
                f"in the schedule resolution (please report it with the schedule)"
            )
        return self._buffers[(call, slot)]

    def write(self, call: int, slot: str, value: torch.Tensor) -> None:
        """Keep ``value`` for ``slot``; by reference the caller must not mutate it afterwards."""
        buf = self._buffers.get((call, slot))
        if not self.in_place:
            self._buffers[(call, slot)] = value.detach()
        elif buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
            self._buffers[(call, slot)] = value.detach().clone()
        else:
            buf.copy_(value)
        self._written.add((call, slot))

    def release(self, call: int, slots: Iterable[str]) -> None:
        """Drop the store's reference to the values of ``slots``: after their last read, or
        before a step that writes them anew without reading them, so that the old values are
        freed before the step computes the new ones (else a full step holds the whole cache twice
        at its peak). In place, the buffers are kept (their addresses must stay); the slots must
        be written before they are read again."""
        if self.in_place:
            return
        for slot in slots:
            self._buffers.pop((call, slot), None)
            self._written.discard((call, slot))

    def write_all(self, call: int, items: Iterable[tuple[str, torch.Tensor]], caller: Iterable[Any] = ()) -> None:
        """Write one step's values. A value that shares storage with what it must not alias is
        cloned first: by reference, the ``caller``'s tensors (the step's inputs and the outputs
        handed back), which the caller may change in place; in place, the store's own buffers (a
        step graph passing a cache input through to another slot), which the copies made
        before it would change."""
        avoid = {_storage(t) for t in (self._buffers.values() if self.in_place else caller)} - {None}
        items = [(s, v.clone() if _storage(v) in avoid else v) for s, v in items]
        for slot, value in items:
            self.write(call, slot, value)
        self._peak = max(self._peak, self.nbytes)

    def new_generation(self) -> None:
        """Forget what was written (values of the last generation must never be read): by
        reference the values are dropped; in place the buffers are kept, so their addresses
        stay stable across generations."""
        self._written.clear()
        if not self.in_place:
            self._buffers.clear()
        if self._peak:
            self._last_peak, self._peak = self._peak, 0

    def clear(self) -> None:
        self._buffers.clear()
        self._written.clear()
        self._peak = self._last_peak = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    @property
    def peak_nbytes(self) -> int:
        """The most bytes held at once in the running generation, or between generations in the
        last one that wrote anything."""
        return self._peak or self._last_peak

    def __len__(self) -> int:
        return len(self._buffers)


def _storage(t: Any) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
