"""A plain DDIM sampling loop with classifier-free guidance, for class-conditional DiTs.

Used by the bench, the quality harness and the tests, so that every method is run through the
same loop as the uncached model.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ddim_sample", "first_call_kwargs"]


def ddim_sample(
    transformer: Any,
    class_labels: torch.Tensor,
    *,
    num_steps: int = 50,
    guidance_scale: float = 2.0,
    null_class: int,
    sample_size: int,
    in_channels: int,
    seed: int = 0,
    scheduler: Any = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate images for ``class_labels`` with DDIM and CFG run as one batched call per step.

    The transformer gets ``hidden_states`` = [x, x], ``class_labels`` = [y, null] and the timestep
    expanded to the batch; ``eps = uncond + guidance_scale * (cond - uncond)``. Returns images in
    the model's value range, shape ``[B, C, H, W]``. Same ``seed`` → same initial noise.

    >>> import torch  # doctest: +SKIP
    >>> imgs = ddim_sample(model, torch.tensor([3]), num_steps=10, null_class=10, sample_size=16, in_channels=1)
    """
    from diffusers import DDIMScheduler

    scheduler = scheduler or DDIMScheduler()
    scheduler.set_timesteps(num_steps)
    b = class_labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    device = next(iter(_parameters(transformer)), torch.empty(0)).device
    x = torch.randn(b, in_channels, sample_size, sample_size, generator=gen).to(device)
    labels = torch.cat([class_labels, torch.full_like(class_labels, null_class)]).to(device)
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    with torch.no_grad():
        for t in steps:
            inp = torch.cat([x, x])
            tt = t.reshape(1).expand(2 * b).to(device=device, dtype=torch.int64)
            out = transformer(hidden_states=inp, timestep=tt, class_labels=labels, return_dict=False)[0]
            out = out[:, :in_channels]  # learned-sigma models return [eps, variance]
            cond, uncond = out.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
    return x


class _FirstCall(Exception):
    pass


class _Recorder:
    """Stands in for the transformer: records the first call's keywords, then stops the loop."""

    def __init__(self, model: Any) -> None:
        self.model, self.kwargs = model, {}

    def parameters(self):  # ddim_sample takes the device from here
        return _parameters(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("ddim_sample calls the transformer with keywords only")
        self.kwargs.update(kwargs)
        raise _FirstCall


def first_call_kwargs(transformer: Any, class_labels: torch.Tensor, **sample_kwargs: Any) -> dict[str, Any]:
    """The keyword arguments :func:`ddim_sample` passes to ``transformer`` at its first call
    (same shapes, dtypes, strides and device), without running it: what a cached transformer
    must be prepared (captured, compiled) with before the first real run."""
    recorder = _Recorder(transformer)
    try:
        ddim_sample(recorder, class_labels, **sample_kwargs)
    except _FirstCall:
        pass
    return recorder.kwargs


def _parameters(m: Any):
    params = getattr(m, "parameters", None)
    if params is None:
        return iter(())
    inner = getattr(m, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner.parameters()
    return params()
