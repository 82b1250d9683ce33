"""``StableDiffusion3Pipeline``: two CLIP encoders and T5, MM-DiT joint attention,
flow-matching Euler, classifier-free guidance as one batched call per step."""

import pytest
import torch

import cachecompile as cc
from tests.pipelines._components import images, reference_transformer, sd3_components

pytest.importorskip("transformers")
STEPS = 3


@pytest.fixture(scope="module")
def components():
    return sd3_components()


@pytest.fixture
def pipe(components):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(steps=STEPS):
    return dict(
        prompt="a painting of a squirrel", num_inference_steps=steps, guidance_scale=5.0, height=8, width=8,
        max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt",
    )


@pytest.fixture(scope="module")
def uncached(components):
    from diffusers import StableDiffusion3Pipeline

    return images(StableDiffusion3Pipeline(**components), inputs())


def test_all_compute_gives_the_same_image_twice(pipe, uncached):
    pipe.transformer = cc.optimize(pipe.transformer, cc.Schedule.fora(STEPS, 1))
    for _ in range(2):
        assert (images(pipe, inputs()) - uncached).abs().max() <= 1e-5


def test_fora_matches_eager_reference_and_differs(pipe, uncached):
    paths = ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
             "transformer_blocks.1.attn", "transformer_blocks.1.ff"]
    reference = reference_transformer(pipe.transformer, paths, lambda s: s % 2 == 0)
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2))
    got = images(pipe, inputs())
    pipe.transformer = reference
    torch.testing.assert_close(got, images(pipe, inputs()), rtol=0, atol=1e-5)
    assert (got - uncached).abs().max() > 1e-4


def test_calls_and_steps_that_do_not_fit_are_clear_errors(pipe):
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2), calls_per_step=2)
    with pytest.raises(cc.StepMismatchError, match=r"calls_per_step=2.*timestep changed"):
        images(pipe, inputs())
    with pytest.raises(cc.StepMismatchError, match=rf"runs {STEPS - 1} denoising steps but the schedule has {STEPS}"):
        images(pipe, inputs(steps=STEPS - 1))
