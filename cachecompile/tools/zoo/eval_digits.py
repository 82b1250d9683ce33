"""Measure the uncached quality of the digits DiT: class accuracy and FID analogue.

Usage::

    python -m cachecompile.tools.zoo.eval_digits --n 200 --steps 50 --cfg 2.0 --seed 0 [--weights DIR]

Labels are ``arange(n) % 10``; all n samples are drawn in one ``ddim_sample`` call (its noise
comes from one generator seeded with ``--seed``), so the result depends on n and the seed only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cachecompile.tools import quality as Q
from cachecompile.models import DIGITS_CONFIG, digits_classifier, digits_dit
from cachecompile.sampling import ddim_sample


def generate(dit: torch.nn.Module, n: int, steps: int, cfg: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples with labels ``arange(n) % 10`` from one seeded DDIM run."""
    c = DIGITS_CONFIG
    labels = torch.arange(n) % c.num_classes
    images = ddim_sample(dit, labels, num_steps=steps, guidance_scale=cfg, null_class=c.null_class,
                         sample_size=c.sample_size, in_channels=c.in_channels, seed=seed)
    return images, labels


def evaluate(weights: Path | None, n: int, steps: int, cfg: float, seed: int) -> dict:
    dit = digits_dit(weights)
    clf = digits_classifier(weights)
    t0 = time.time()
    images, labels = generate(dit, n, steps, cfg, seed)
    pred = Q.classifier_logits(images, clf).argmax(1)
    per_class = [round((pred[labels == k] == k).float().mean().item(), 3) for k in range(10)]
    return dict(n=n, steps=steps, cfg=cfg, seed=seed, accuracy=round((pred == labels).float().mean().item(), 4),
                fid=round(Q.fid_digits(images, clf if weights else None), 3), per_class_accuracy=per_class,
                min=round(images.min().item(), 3), max=round(images.max().item(), 3),
                seconds=round(time.time() - t0, 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights dir (default: shipped)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(evaluate(a.weights, a.n, a.steps, a.cfg, a.seed)))


if __name__ == "__main__":
    main()
