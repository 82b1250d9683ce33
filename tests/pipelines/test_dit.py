"""``DiTPipeline``: class-conditional DiT, classifier-free guidance as one batched call per step.

Also the step-count checks, which work the same for every pipeline: with ``cc.optimize(pipe, ...)``
a wrong ``num_inference_steps`` fails before the first step; with only the transformer swapped
the calls' timesteps reveal it.
"""

import copy

import pytest
import torch

import cachecompile as cc
from tests.pipelines._components import dit_components, images, reference_transformer

pytest.importorskip("transformers")
STEPS = 4


@pytest.fixture(scope="module")
def components():
    return dit_components()


@pytest.fixture
def pipe(components):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(steps=STEPS):
    return dict(class_labels=[1, 3], num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")


@pytest.fixture(scope="module")
def uncached(components):
    from diffusers import DiTPipeline

    return images(DiTPipeline(**components), inputs())


def test_all_compute_gives_the_same_image_twice(pipe, uncached):
    original = pipe.transformer
    pipe.transformer = cc.optimize(pipe.transformer, cc.Schedule.fora(STEPS, 1))
    for _ in range(2):
        assert (images(pipe, inputs()) - uncached).abs().max() <= 1e-5
    assert pipe.transformer.model is original and pipe.transformer.step == 0


def test_fora_matches_eager_reference_and_differs(pipe, uncached):
    paths = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")]
    reference = reference_transformer(pipe.transformer, paths, lambda s: s % 2 == 0)
    assert cc.optimize(pipe, cc.Schedule.fora(STEPS, 2)) is pipe
    assert isinstance(pipe.transformer, cc.CachedTransformer)
    got = images(pipe, inputs())
    pipe.transformer = reference
    expected = images(pipe, inputs())
    assert reference.counter["calls"] == STEPS, "one batched call per step"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - uncached).abs().max() > 1e-3


def test_pipe_to_after_optimize_moves_the_transformer(components):
    from diffusers import DiTPipeline

    def pipeline():
        p = DiTPipeline(**copy.deepcopy(components))
        p.set_progress_bar_config(disable=True)
        return p

    moved_after = cc.optimize(pipeline(), cc.Schedule.fora(STEPS, 2))
    images(moved_after, inputs())
    moved_after.to(torch.float64)
    assert moved_after.transformer.dtype == torch.float64 and not moved_after.transformer.is_captured
    moved_first = cc.optimize(pipeline().to(torch.float64), cc.Schedule.fora(STEPS, 2))
    torch.testing.assert_close(images(moved_after, inputs()), images(moved_first, inputs()), rtol=0, atol=0)
    assert moved_after.transformer.is_captured


def test_calls_per_step_that_does_not_fit_is_a_clear_error(pipe, uncached):
    original = pipe.transformer
    pipe.transformer = cc.optimize(original, cc.Schedule.fora(STEPS, 1), calls_per_step=2)
    with pytest.raises(cc.StepMismatchError, match=r"calls_per_step=2.*timestep changed.*Use calls_per_step=1 or 'auto'"):
        images(pipe, inputs())
    pipe.transformer = cc.optimize(original, cc.Schedule.fora(STEPS, 1), calls_per_step="auto")
    assert (images(pipe, inputs()) - uncached).abs().max() <= 1e-5
    assert pipe.transformer.calls_per_step == 1


def test_step_count_is_checked_before_the_first_step(pipe, uncached):
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2))
    with pytest.raises(cc.StepMismatchError, match=rf"runs 3 denoising steps but the schedule has {STEPS}.*without num_steps.*num_inference_steps={STEPS}"):
        images(pipe, inputs(steps=3))
    assert not pipe.transformer.is_captured, "nothing ran"
    pipe.transformer = pipe.transformer.model  # undo: the hook left on the pipeline does nothing then
    assert (images(pipe, inputs()) - uncached).abs().max() == 0


def test_step_count_without_the_pipeline_hook(pipe):
    # fewer steps: the first generation ends early, the next one's first call goes back up in time
    pipe.transformer = cc.optimize(pipe.transformer, cc.Schedule.fora(STEPS, 2))
    images(pipe, inputs(steps=STEPS - 1))
    with pytest.raises(cc.StepMismatchError, match=rf"went up .* after {STEPS - 1} of the generation's {STEPS} steps.*without num_steps"):
        images(pipe, inputs(steps=STEPS - 1))
    pipe.transformer.reset()
    # more steps: the call after the schedule's last step keeps going down in time
    with pytest.raises(cc.StepMismatchError, match="runs more steps than the generation has.*without num_steps"):
        images(pipe, inputs(steps=STEPS + 2))


def test_bad_arguments_leave_the_pipeline_untouched(pipe):
    original = pipe.transformer
    with pytest.raises(TypeError, match="Schedule"):
        cc.optimize(pipe, "fora:2")
    with pytest.raises(ValueError, match="calls_per_step"):
        cc.optimize(pipe, cc.Schedule.fora(STEPS, 2), calls_per_step=0)
    with pytest.raises(ValueError, match="at least 2 steps"):
        cc.optimize(pipe, cc.Schedule.fora(1, 1), calls_per_step="auto")
    assert pipe.transformer is original and "progress_bar" not in vars(pipe)
    cc.optimize(pipe, cc.Schedule.fora(STEPS, 2))
    with pytest.raises(TypeError, match="already optimized"):
        cc.optimize(pipe, cc.Schedule.fora(STEPS, 1))
    assert pipe.transformer.schedule == cc.Schedule.fora(STEPS, 2)
