"""A DDIM sampling loop with CFG that imports neither diffusers nor cachecompile.

The artifact tests drive the eager cached model (in the test process) and the loaded artifact
(in a fresh interpreter that must never import diffusers) through this same loop, so the two
runs see the same calls: ``hidden_states=[x, x]``, ``timestep`` expanded, ``class_labels=[y, null]``,
``return_dict=False``, as :func:`cachecompile.sampling.ddim_sample` calls the transformer.
"""

from __future__ import annotations

from typing import Any

import torch


def ddim_steps(num_steps: int, train_steps: int = 1000) -> list[tuple[int, float, float]]:
    """``(timestep, alpha_bar_t, alpha_bar_prev)`` per step, linear betas 1e-4..0.02, η = 0."""
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, train_steps, dtype=torch.float64), 0)
    stride = train_steps // num_steps
    ts = [train_steps - 1 - i * stride for i in range(num_steps)]
    return [(t, float(alpha_bar[t]), float(alpha_bar[t - stride]) if t - stride >= 0 else 1.0) for t in ts]


def sample(model: Any, labels: torch.Tensor, *, num_steps: int, null_class: int, in_channels: int,
           sample_size: int, seed: int, guidance_scale: float = 2.0) -> torch.Tensor:
    b = labels.shape[0]
    x = torch.randn(b, in_channels, sample_size, sample_size, generator=torch.Generator().manual_seed(seed))
    both = torch.cat([labels, torch.full_like(labels, null_class)])
    with torch.no_grad():
        for t, a, a_prev in ddim_steps(num_steps):
            out = model(hidden_states=torch.cat([x, x]), timestep=torch.full((2 * b,), t, dtype=torch.int64),
                        class_labels=both, return_dict=False)[0][:, :in_channels]
            cond, uncond = out.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
            x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x
