"""FORA on the bundled digits DiT: uncached vs cached samples from the same noise.

    python examples/quickstart.py
"""

import time

import torch

import cachecompile as cc
from cachecompile.models import DIGITS_CONFIG, digits_dit
from cachecompile.sampling import ddim_sample


def main() -> None:
    model = digits_dit()
    labels = torch.arange(10)
    kw = dict(
        num_steps=50, guidance_scale=2.0, null_class=DIGITS_CONFIG.null_class,
        sample_size=DIGITS_CONFIG.sample_size, in_channels=DIGITS_CONFIG.in_channels, seed=0,
    )
    schedule = cc.Schedule.fora(num_steps=50, interval=3)
    print(schedule)
    cached = cc.optimize(model, schedule)

    t0 = time.perf_counter()
    reference = ddim_sample(model, labels, **kw)
    t1 = time.perf_counter()
    images = ddim_sample(cached, labels, **kw)  # first call captures and rewrites
    t2 = time.perf_counter()
    images = ddim_sample(cached, labels, **kw)
    t3 = time.perf_counter()

    print(cached.region_map.summary())
    print(f"{len(cached.step_graphs)} step graphs for {schedule.num_steps} steps")
    print(f"uncached {t1 - t0:.2f}s, cached {t3 - t2:.2f}s (first run with capture {t2 - t1:.2f}s)")
    rel = (images - reference).abs().mean() / reference.abs().mean()
    print(f"rel-L1 to the uncached samples: {rel:.4f}")


if __name__ == "__main__":
    main()
