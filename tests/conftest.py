"""Shared fixtures: tiny diffusers DiTs and an independent eager reference of FORA-style reuse."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from cachecompile.sampling import ddim_sample

TINY_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
    norm_type="ada_norm_zero",
)
NULL_CLASS = 10


def make_dit(seed: int = 0, **overrides) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**TINY_DIT, **overrides}).eval()
    # diffusers zero-initialises the adaLN-zero gates and the output head; random ones make
    # caching errors visible in the output.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="session")
def dit() -> torch.nn.Module:
    return make_dit()


@pytest.fixture(scope="session")
def sample_kwargs() -> dict:
    return dict(num_steps=12, guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4, seed=0)


@pytest.fixture(scope="session")
def labels() -> torch.Tensor:
    return torch.tensor([1, 7])


@pytest.fixture(scope="session")
def uncached_samples(dit, labels, sample_kwargs) -> torch.Tensor:
    return ddim_sample(dit, labels, **sample_kwargs)


def dit_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.int64),
        class_labels=torch.arange(batch) % 11,
    )


class StepCounter:
    """Counts transformer calls so reference wrappers know the current step."""

    def __init__(self, calls_per_step: int = 1) -> None:
        self.calls = 0
        self.calls_per_step = calls_per_step

    @property
    def step(self) -> int:
        return self.calls // self.calls_per_step


class ReuseOnSteps(torch.nn.Module):
    """Eager reference: runs ``inner`` when ``compute(step)`` is true, else returns its last output."""

    def __init__(self, inner: torch.nn.Module, counter: StepCounter, compute) -> None:
        super().__init__()
        self.inner, self.counter, self.compute, self.cached = inner, counter, compute, None

    def forward(self, *args, **kwargs):
        if self.compute(self.counter.step) or self.cached is None:
            self.cached = self.inner(*args, **kwargs)
        return self.cached


class CountingModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, counter: StepCounter) -> None:
        super().__init__()
        self.model, self.counter = model, counter

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.counter.calls += 1
        return out


def fora_reference(model: torch.nn.Module, interval: int) -> CountingModel:
    """A copy of ``model`` whose blocks' attn1/ff reuse their outputs on FORA's cached steps."""
    ref = copy.deepcopy(model)
    counter = StepCounter()
    full = lambda s: s % interval == 0  # noqa: E731
    for block in ref.transformer_blocks:
        block.attn1 = ReuseOnSteps(block.attn1, counter, full)
        block.ff = ReuseOnSteps(block.ff, counter, full)
    return CountingModel(ref, counter)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def subprocess_env(repo_root: Path) -> dict[str, str]:
    """Environment for a fresh interpreter that imports cachecompile from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH", "")]))
    return env


