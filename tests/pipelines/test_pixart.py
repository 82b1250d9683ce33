"""``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline``: T5 text conditioning with an attention
mask, classifier-free guidance as one batched call per step, learned sigma."""

import pytest
import torch

import cachecompile as cc
from tests.pipelines._components import images, pixart_components, reference_transformer

pytest.importorskip("transformers")
STEPS = 3


@pytest.fixture(scope="module")
def components():
    return pixart_components()


def make(components, alpha=False):
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    pipe = (PixArtAlphaPipeline if alpha else PixArtSigmaPipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(steps=STEPS):
    return dict(
        prompt="a painting of a squirrel", num_inference_steps=steps, guidance_scale=5.0, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0), use_resolution_binning=False, clean_caption=False, output_type="pt",
    )


@pytest.mark.parametrize("alpha", [True, False], ids=["alpha", "sigma"])
def test_all_compute_gives_the_same_image_twice(components, alpha):
    pipe = make(components, alpha)
    uncached = images(pipe, inputs())
    pipe.transformer = cc.optimize(pipe.transformer, cc.Schedule.fora(STEPS, 1))
    for _ in range(2):
        assert (images(pipe, inputs()) - uncached).abs().max() <= 1e-5


def test_fora_matches_eager_reference_and_differs(components):
    pipe = make(components)
    uncached = images(pipe, inputs())
    paths = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ff")]
    reference = reference_transformer(pipe.transformer, paths, lambda s: s % 2 == 0)
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2))
    got = images(pipe, inputs())
    pipe.transformer = reference
    torch.testing.assert_close(got, images(pipe, inputs()), rtol=0, atol=1e-5)
    assert (got - uncached).abs().max() > 1e-3


def test_calls_and_steps_that_do_not_fit_are_clear_errors(components):
    pipe = make(components)
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2), calls_per_step=2)
    with pytest.raises(cc.StepMismatchError, match=r"calls_per_step=2.*timestep changed"):
        images(pipe, inputs())
    with pytest.raises(cc.StepMismatchError, match=rf"runs {STEPS + 1} denoising steps but the schedule has {STEPS}"):
        images(pipe, inputs(steps=STEPS + 1))
