"""``FluxPipeline``: CLIP + T5, packed latents with ``img_ids``/``txt_ids``, double- and
single-stream blocks. With ``true_cfg_scale`` the pipeline runs classifier-free guidance as two
calls per step, under ``transformer.cache_context("cond")`` and ``("uncond")``."""

import pytest
import torch

import cachecompile as cc
from tests.pipelines._components import flux_components, images, reference_transformer

pytest.importorskip("transformers")
STEPS = 4
PATHS = ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
         "single_transformer_blocks.0.proj_out"]


@pytest.fixture(scope="module")
def components():
    return flux_components()


@pytest.fixture
def pipe(components):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(steps=STEPS, true_cfg=False):
    extra = dict(negative_prompt="bad quality", true_cfg_scale=2.0) if true_cfg else {}
    return dict(
        prompt="a painting of a squirrel", num_inference_steps=steps, guidance_scale=5.0, height=8, width=8,
        max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt", **extra,
    )


def test_all_compute_gives_the_same_image_twice(pipe):
    uncached = images(pipe, inputs())
    pipe.transformer = cc.optimize(pipe.transformer, cc.Schedule.fora(STEPS, 1))
    for _ in range(2):
        assert (images(pipe, inputs()) - uncached).abs().max() <= 1e-5


def test_fora_matches_eager_reference_and_differs(pipe):
    uncached = images(pipe, inputs())
    reference = reference_transformer(pipe.transformer, PATHS, lambda s: s % 2 == 0)
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2))
    got = images(pipe, inputs())
    pipe.transformer = reference
    torch.testing.assert_close(got, images(pipe, inputs()), rtol=0, atol=1e-5)
    assert (got - uncached).abs().max() > 1e-4


def test_guidance_as_two_calls_per_step(pipe):
    original = pipe.transformer
    uncached = images(pipe, inputs(true_cfg=True))
    reference = reference_transformer(original, PATHS, lambda s: s % 2 == 0, calls_per_step=2)
    pipe.transformer = reference
    expected = images(pipe, inputs(true_cfg=True))
    assert reference.counter["calls"] == 2 * STEPS
    for calls_per_step in (2, "auto"):  # declared, or detected from the cache contexts and timesteps
        pipe.transformer = original
        cc.optimize(pipe, cc.Schedule.fora(STEPS, 2), calls_per_step=calls_per_step)
        assert pipe.transformer.model is original
        for _ in range(2):
            torch.testing.assert_close(images(pipe, inputs(true_cfg=True)), expected, rtol=0, atol=1e-5)
        assert pipe.transformer.calls_per_step == 2
    assert (expected - uncached).abs().max() > 1e-4


def test_calls_and_steps_that_do_not_fit_are_clear_errors(pipe):
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2))  # calls_per_step=1, but true CFG makes two calls
    with pytest.raises(cc.StepMismatchError, match=r"context 'cond'.*runs under 'uncond'.*calls_per_step='auto'"):
        images(pipe, inputs(true_cfg=True))
    with pytest.raises(cc.StepMismatchError, match=rf"runs 2 denoising steps but the schedule has {STEPS}"):
        images(pipe, inputs(steps=2))
