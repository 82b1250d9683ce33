"""A plain sampling loop (DDIM by default) with classifier-free guidance, for class-conditional DiTs.

Used by the bench, the quality harness, calibration and the tests, so that every method is run
through the same loop as the uncached model.

The sampler travels with the model: a model that carries a ``scheduler_config`` (a diffusers
scheduler config, as :func:`cachecompile.models.digits_dit` attaches the one shipped beside its
weights) is sampled with the scheduler built from it; other models get DDIM on diffusers' default
DDPM betas **without** x0 clipping. (diffusers' ``DDIMScheduler()`` clips the predicted x0 but
keeps the unclipped epsilon; the mismatch grows with the step count, so a model sampled that way
gets worse from 25 to 50 to 100 steps.)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SOLVERS", "ddim_sample", "first_call_kwargs", "make_scheduler", "model_scheduler"]

# The solvers a sampling loop can run (see make_scheduler).
SOLVERS = ("ddim", "dpm++2m")
# What a scheduler config says about the noise schedule the model was trained on: a solver other
# than the config's own takes these and keeps its own defaults for everything else.
_TRAINING_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def make_scheduler(config: Any = None, solver: str = "ddim") -> Any:
    """A fresh diffusers scheduler for ``solver`` from a scheduler ``config`` (a dict).

    ``"ddim"``: ``DDIMScheduler`` from the config (``None``: diffusers' default betas, no x0
    clipping). ``"dpm++2m"``: ``DPMSolverMultistepScheduler`` (DPM-Solver++, second order,
    multistep: one model call per step) on the config's training noise schedule.

    >>> make_scheduler(None).config.clip_sample
    False
    >>> make_scheduler(None, "dpm++2m").config.algorithm_type
    'dpmsolver++'
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = {k: v for k, v in dict(config or {"clip_sample": False}).items() if not k.startswith("_")}
    if solver == "ddim":
        return DDIMScheduler.from_config(config)
    if solver == "dpm++2m":
        train = {k: config[k] for k in _TRAINING_KEYS if k in config}
        return DPMSolverMultistepScheduler(**train, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")


def model_scheduler(transformer: Any, solver: str = "ddim") -> Any:
    """The scheduler that travels with ``transformer`` (its ``scheduler_config``, looked up
    through wrappers that hold the model as ``.model``), built for ``solver``."""
    config = getattr(transformer, "scheduler_config", None)
    inner = getattr(transformer, "model", None)
    if config is None and inner is not None and inner is not transformer:
        config = getattr(inner, "scheduler_config", None)
    return make_scheduler(config, solver)


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
    solver: str = "ddim",
    progress: bool = False,
) -> torch.Tensor:
    """Generate images for ``class_labels`` with DDIM (or ``solver``) and CFG run as one batched
    call per step.

    The transformer gets ``hidden_states`` = [x, x], ``class_labels`` = [y, null] and the timestep
    expanded to the batch; ``eps = uncond + guidance_scale * (cond - uncond)``. Returns images in
    the model's value range, shape ``[B, C, H, W]``, as the solver leaves them (not clamped: a
    pipeline's postprocessing clamps). Same ``seed`` → same initial noise.

    ``scheduler``: a diffusers scheduler to use as is; by default the model's own
    (:func:`model_scheduler`) for ``solver`` (``"ddim"`` or ``"dpm++2m"``).

    >>> import torch  # doctest: +SKIP
    >>> imgs = ddim_sample(model, torch.tensor([3]), num_steps=10, null_class=10, sample_size=16, in_channels=1)  # doctest: +SKIP
    """
    scheduler = scheduler or model_scheduler(transformer, solver)
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
