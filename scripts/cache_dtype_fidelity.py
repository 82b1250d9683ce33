#!/usr/bin/env python3
"""Fidelity cost of low-precision cache storage on the shipped digits model.

    python scripts/cache_dtype_fidelity.py [--samples 32] [--steps 50] [--interval 3] [--threads 1]

Samples the digits DiT with FORA (``--interval``) once per cache dtype, from the same noise and
labels (0–9 in turn, seed 0, CFG 2.0, DDIM), and compares each sample with the same schedule's
sample in float32 storage and with the uncached model's: relative L1 (mean |a − b| ÷ mean |b|)
per sample, the mean over samples, and a 95 % bootstrap interval of that mean (2,000 resamples
of the samples, seed 0); and, paired per sample, how much the distance to the uncached sample
grows over float32 storage's (negative: closer). Prints a Markdown table; the numbers are deterministic given the
arguments (the bootstrap included). Times nothing.
"""

from __future__ import annotations

import argparse

import torch

import cachecompile as cc
from cachecompile.models import DIGITS_CONFIG, digits_dit
from cachecompile.sampling import ddim_sample

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


def per_sample_rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(1) / b.abs().flatten(1).mean(1)


def bootstrap_mean(values: torch.Tensor, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``values`` and a 95 % percentile bootstrap interval of it."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (reps, len(values)), generator=gen)
    means = values.double()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return values.double().mean().item(), lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = digits_dit()
    labels = torch.arange(args.samples) % 10
    kw = dict(num_steps=args.steps, guidance_scale=2.0, null_class=DIGITS_CONFIG.null_class,
              sample_size=DIGITS_CONFIG.sample_size, in_channels=DIGITS_CONFIG.in_channels, seed=0)
    uncached = ddim_sample(model, labels, **kw)
    runs = {}
    for dtype in DTYPES:
        cached = cc.optimize(model, cc.Schedule.fora(interval=args.interval, cache_dtype=dtype))
        runs[dtype] = (ddim_sample(cached, labels, **kw), cached.cache_bytes)
    base = runs[torch.float32][0]
    print(f"digits DiT, FORA:{args.interval}, {args.samples} samples, {args.steps} DDIM steps, CFG 2.0, seed 0, "
          f"eager, torch {torch.__version__}")
    print()
    print("| cache dtype | cache bytes (CFG batch) | rel-L1 vs float32 storage [95 % CI] | rel-L1 vs uncached [95 % CI] "
          "| Δ rel-L1 vs uncached, paired [95 % CI] |")
    print("|---|---:|---|---|---|")
    base_gap = per_sample_rel_l1(base, uncached)
    for dtype, (out, nbytes) in runs.items():
        m, lo, hi = bootstrap_mean(per_sample_rel_l1(out, base))
        gap = per_sample_rel_l1(out, uncached)
        u, ulo, uhi = bootstrap_mean(gap)
        d, dlo, dhi = bootstrap_mean(gap - base_gap)
        name = str(dtype).removeprefix("torch.")
        print(f"| {name} | {nbytes:,} | {m:.2e} [{lo:.2e}, {hi:.2e}] | {u:.4f} [{ulo:.4f}, {uhi:.4f}] "
              f"| {d:+.4f} [{dlo:+.4f}, {dhi:+.4f}] |")


if __name__ == "__main__":
    main()
