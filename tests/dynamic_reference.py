"""Independent eager references of the dynamic policies for the tests, written from the methods'
definitions (cache-dit's DBCache, TeaCache's published forward), not from cachecompile's pass: a
copy of a diffusers DiT whose block loop is replaced by one that decides in Python per call.

``DynamicReference(model, "dbcache", threshold=..., first=1, last=0, warmup=0)`` or
``DynamicReference(model, "teacache", threshold=..., coefficients=[...], num_steps=N)``; call it
like the transformer; ``decisions`` lists ``"full"``/``"cached"`` per call of the last
generation (``restart()`` starts a new one).
"""

from __future__ import annotations

import copy

import numpy as np
import torch


class _Blocks(torch.nn.Module):
    """Stands in for ``transformer_blocks``: iterating it yields one callable per block that the
    DiT forward calls in order; the policy lives in the owner."""

    def __init__(self, blocks: torch.nn.ModuleList, owner: "DynamicReference") -> None:
        super().__init__()
        self.blocks = blocks
        object.__setattr__(self, "owner", owner)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        return self.blocks[i]

    def __iter__(self):
        return iter([lambda h, _i=i, **kw: self.owner.block(_i, h, **kw) for i in range(len(self.blocks))])


class DynamicReference(torch.nn.Module):
    def __init__(self, model, policy: str, *, threshold: float, first: int = 1, last: int = 0, warmup: int = 0,
                 max_cached: int = -1, max_run: int = -1, coefficients=None, num_steps: int | None = None) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.blocks = self.model.transformer_blocks
        self.model.transformer_blocks = _Blocks(self.blocks, self)
        self.policy, self.threshold = policy, threshold
        self.first, self.last, self.warmup = (first, last, warmup) if policy == "dbcache" else (0, 0, max(1, warmup))
        self.max_cached, self.max_run = max_cached, max_run
        self.coefficients, self.num_steps = coefficients, num_steps
        self.restart()

    def restart(self) -> None:
        self.step = 0
        self.decisions: list[str] = []
        self.prev = self.residual = None
        self.cached_total = self.cached_run = 0
        self.acc = 0.0

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.step += 1
        if self.num_steps is not None and self.step == self.num_steps:
            self.step = 0  # the next call starts a new generation (decisions kept for reading)
            self.prev = self.residual = None
        return out

    # ------------------------------------------------------------------ the block loop
    def block(self, i: int, h, **kw):
        n = len(self.blocks)
        if i == 0:
            self.h0 = h
            if self.policy == "teacache":
                self.reuse = self._teacache_decision(h, kw)
        if self.policy == "dbcache":
            if i < self.first:
                out = self.blocks[i](h, **kw)
                if i == self.first - 1:
                    self.seg_in = out
                    self.reuse = self._dbcache_decision(out - self.h0)
                return out
            if i >= n - self.last:
                return self.blocks[i](h, **kw)
        else:
            self.seg_in = self.h0
        # a block of the segment that may be skipped
        if self.reuse:
            return self.residual + self.seg_in if i == n - self.last - 1 else h
        out = self.blocks[i](h, **kw)
        if i == n - self.last - 1:
            self.residual = out - self.seg_in
        return out

    def _dbcache_decision(self, r) -> bool:
        reuse = False
        if self.step >= self.warmup and self.prev is not None:
            diff = ((self.prev - r).abs().mean() / self.prev.abs().mean()).item()
            reuse = diff < self.threshold or self.threshold >= 1.0
            if self.max_cached >= 0 and self.cached_total >= self.max_cached:
                reuse = False
            if self.max_run >= 0 and self.cached_run >= self.max_run:
                reuse = False
        if reuse:
            self.cached_total += 1
            self.cached_run += 1
        else:
            self.cached_run = 0
            self.prev = r
        self.decisions.append("cached" if reuse else "full")
        return reuse

    def _teacache_decision(self, h, kw) -> bool:
        # TeaCache reads block 0's modulated input, computed as the block computes it (adaLN-Zero).
        norm1 = self.blocks[0].norm1
        m = norm1(h, kw["timestep"], kw["class_labels"], hidden_dtype=h.dtype)[0]
        last = self.num_steps is not None and self.step == self.num_steps - 1
        if self.step < self.warmup or last:
            reuse, self.acc = False, 0.0
        else:
            rel = ((m - self.prev).abs().mean() / self.prev.abs().mean()).item()
            self.acc += float(np.poly1d(self.coefficients)(rel))
            reuse = self.acc < self.threshold
            if not reuse:
                self.acc = 0.0
        self.prev = m
        self.decisions.append("cached" if reuse else "full")
        return reuse
