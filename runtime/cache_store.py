"""The cache store: preallocated tensors, one per (call within step, cache slot).

Written in place (``copy_``) so their addresses never change across steps: CUDA graphs
(``mode="reduce-overhead"``) and TensorRT bindings can capture them.
"""

from __future__ import annotations

import torch

__all__ = ["CacheStore"]


class CacheStore:
    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self._written: set[tuple[int, str]] = set()  # slots written in this generation

    def read(self, call: int, slot: str) -> torch.Tensor:
        if (call, slot) not in self._written:
            raise RuntimeError(
                f"cache slot {slot!r} read before any step of this generation wrote it; this is a bug "
                f"in the schedule resolution (please report it with the schedule)"
            )
        return self._buffers[(call, slot)]

    def write(self, call: int, slot: str, value: torch.Tensor) -> None:
        buf = self._buffers.get((call, slot))
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
            self._buffers[(call, slot)] = value.detach().clone()
        else:
            buf.copy_(value)
        self._written.add((call, slot))

    def new_generation(self) -> None:
        """Forget what was written (values of the last generation must never be read) but keep
        the buffers, so their addresses stay stable across generations."""
        self._written.clear()

    def clear(self) -> None:
        self._buffers.clear()
        self._written.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def __len__(self) -> int:
        return len(self._buffers)
