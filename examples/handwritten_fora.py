"""FORA written by hand, in eager PyTorch: the baseline the bench compares cachecompile against.

This is how FORA is usually implemented (the research forks patch block forwards the same way):
each block's attention (``attn1``) and MLP (``ff``) module is wrapped in a module that runs it
on full steps and returns its last output on cached steps. The outputs are taken before the
adaLN gate, as in cachecompile, so both compute the same numbers. It is kept lean for
inference — one integer comparison per wrapped call, no hooks, no dictionaries — so that
"no slower than hand-written" is a fair target. What it cannot skip is the work the block does
around the wrapped modules on cached steps (``norm1``/``norm2`` and their modulation), which a
graph rewrite removes as dead code.

Run it as a script to compare it with the uncached model::

    python examples/handwritten_fora.py --steps 20 --interval 3

Use it from Python::

    >>> from examples.handwritten_fora import handwritten_fora  # doctest: +SKIP
    >>> fora = handwritten_fora(model, num_steps=20, interval=3)   # a copy; model is untouched
    >>> images = ddim_sample(fora, labels, num_steps=20, ...)      # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

__all__ = ["FORAClock", "SkipOnCachedSteps", "HandwrittenFORA", "handwritten_fora"]


class FORAClock:
    """The step counter all wrappers of one model share: step ``s`` is full when ``s % interval == 0``."""

    def __init__(self, num_steps: int, interval: int) -> None:
        if num_steps < 1 or interval < 1:
            raise ValueError(f"num_steps and interval must be >= 1, got {num_steps} and {interval}")
        self.num_steps = num_steps
        self.interval = interval
        self.step = 0
        self.full = True

    def advance(self) -> None:
        # Wrap at num_steps so that the next sampling run starts on a full step.
        self.step = (self.step + 1) % self.num_steps
        self.full = self.step % self.interval == 0

    def reset(self) -> None:
        self.step = 0
        self.full = True


class SkipOnCachedSteps(torch.nn.Module):
    """Runs ``inner`` on full steps; on cached steps returns the output of the last full step."""

    def __init__(self, inner: torch.nn.Module, clock: FORAClock) -> None:
        super().__init__()
        self.inner = inner
        self.clock = clock
        self.out: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.clock.full:
            self.out = self.inner(*args, **kwargs)
        return self.out


class HandwrittenFORA(torch.nn.Module):
    """A DiT whose blocks' ``attn1``/``ff`` skip on FORA's cached steps; one call = one step."""

    def __init__(self, model: torch.nn.Module, num_steps: int, interval: int) -> None:
        super().__init__()
        blocks = getattr(model, "transformer_blocks", None)
        if blocks is None:
            raise TypeError(f"{type(model).__name__} has no transformer_blocks: this example wraps diffusers DiT-style blocks")
        self.clock = FORAClock(num_steps, interval)
        self.model = model
        for block in blocks:
            block.attn1 = SkipOnCachedSteps(block.attn1, self.clock)
            block.ff = SkipOnCachedSteps(block.ff, self.clock)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        self.clock.advance()
        return out

    def reset(self) -> None:
        """Start a new generation at step 0."""
        self.clock.reset()

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the cached outputs (after a full step)."""
        total = 0
        for m in self.modules():
            if isinstance(m, SkipOnCachedSteps) and isinstance(m.out, torch.Tensor):
                total += m.out.numel() * m.out.element_size()
        return total


def handwritten_fora(model: torch.nn.Module, num_steps: int, interval: int) -> HandwrittenFORA:
    """A hand-written eager FORA of ``model`` (a deep copy: the model itself is not modified)."""
    return HandwrittenFORA(copy.deepcopy(model), num_steps, interval)


def main() -> None:
    from cachecompile.tools.zoo import load_bench_model
    from cachecompile.sampling import ddim_sample

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    bm = load_bench_model(args.model)
    labels = torch.arange(args.batch) % bm.num_classes
    kw = dict(num_steps=args.steps, null_class=bm.null_class, sample_size=bm.sample_size, in_channels=bm.in_channels)
    fora = handwritten_fora(bm.model, args.steps, args.interval)
    ref = None
    for name, m in (("uncached", bm.model), (f"hand-written FORA:{args.interval}", fora)):
        ddim_sample(m, labels, **kw)  # warm-up
        t0 = time.perf_counter()
        out = ddim_sample(m, labels, **kw)
        print(f"{name:>24}: {time.perf_counter() - t0:.3f} s")
        ref = out if ref is None else ref
    print(f"max abs diff to uncached: {(out - ref).abs().max().item():.3e}")


if __name__ == "__main__":
    main()
