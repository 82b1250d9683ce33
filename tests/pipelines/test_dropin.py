"""Drop-in use in a pipeline, as a diffusers user would: one ``cc.optimize(pipe, schedule)`` for any
step count and batch size, a pipeline that saves, loads, copies and runs to the end like the
plain one, and a generation boundary at the end of every pipeline call."""

import copy

import pytest
import torch

import cachecompile as cc
from tests.pipelines._components import dit_components, images, reference_transformer

pytest.importorskip("transformers")
PATHS = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")]


@pytest.fixture(scope="module")
def components():
    return dit_components()


def pipeline(components):
    from diffusers import DiTPipeline

    pipe = DiTPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(labels, steps, seed=0):
    return dict(class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np")


def reference_images(components, labels, steps, interval):
    """FORA by the eager reference (modules that return their last output on cached steps)."""
    pipe = pipeline(components)
    pipe.transformer = reference_transformer(pipe.transformer, PATHS, lambda s: s % interval == 0)
    return images(pipe, inputs(labels, steps))


def test_one_schedule_serves_every_step_count_and_batch_size(components):
    """``Schedule.fora(interval=2)`` binds to each generation's length; CFG batch 4, 2 and 6 run
    through one capture; step graphs are shared across lengths."""
    pipe = cc.optimize(pipeline(components), cc.Schedule.fora(interval=2))
    runs = [([1, 3], 4), ([5], 6), ([1, 2, 3], 3), ([1, 3], 4)]
    runners = set()
    for labels, steps in runs:
        got = images(pipe, inputs(labels, steps))
        torch.testing.assert_close(got, reference_images(components, labels, steps, 2), rtol=0, atol=1e-5)
        runners |= {id(r) for r in pipe.transformer.program.runners}
        assert pipe.transformer.program.num_steps == steps  # the pipeline announced the length
    assert pipe.transformer.captures == 1
    assert len(runners) == 2, "full and cached graphs, shared by every length and batch"


def test_a_schedule_with_a_step_count_refuses_another_before_the_first_step(components):
    pipe = cc.optimize(pipeline(components), cc.Schedule.fora(4, 2))
    with pytest.raises(cc.StepMismatchError, match=r"runs 6 denoising steps but the schedule has 4.*interval="):
        images(pipe, inputs([1], 6))
    assert not pipe.transformer.is_captured


def test_transformer_swapped_alone_learns_the_length_and_ends_with_the_pipeline(components):
    """Only ``pipe.transformer`` swapped: no length is announced, the generation is open-ended, and
    the pipeline's end-of-call hook (``_reset_stateful_cache``) closes it, so a generation that
    starts at a lower timestep (another step count) never reads the last one's cache."""
    pipe = pipeline(components)
    pipe.transformer = cc.optimize(pipe.transformer, cc.Schedule.fora(interval=2))
    for labels, steps in [([1, 3], 6), ([2], 3), ([1, 3], 8)]:
        got = images(pipe, inputs(labels, steps))
        torch.testing.assert_close(got, reference_images(components, labels, steps, 2), rtol=0, atol=1e-5)
    assert pipe.transformer.step == 0 and pipe.transformer.captures == 1


def test_an_abandoned_generation_does_not_leak_into_the_next(components):
    """A hand-written loop stops after 2 of 5 steps; the pipeline's next call starts a new
    generation (its first timestep is higher than the last one seen) and never reads the
    abandoned generation's cache."""
    pipe = pipeline(components)
    pipe.transformer = cc.optimize(pipe.transformer, cc.Schedule.fora(interval=3))
    pipe.scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in pipe.scheduler.timesteps[:2]:
        pipe.transformer(x, timestep=t.expand(2), class_labels=torch.tensor([4, 1000]), return_dict=False)
    assert pipe.transformer.step == 2
    got = images(pipe, inputs([1, 3], 5))
    torch.testing.assert_close(got, reference_images(components, [1, 3], 5, 3), rtol=0, atol=1e-5)


def test_save_pretrained_writes_the_plain_model_and_from_pretrained_loads_it(components, tmp_path):
    from diffusers import DiTPipeline

    pipe = cc.optimize(pipeline(components), cc.Schedule.fora(interval=2))
    before = images(pipe, inputs([1, 3], 4))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / "config.json").is_file()
    loaded = DiTPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer).__name__ == "DiTTransformer2DModel"
    for a, b in zip(loaded.transformer.parameters(), pipe.transformer.model.parameters()):
        assert torch.equal(a, b)
    loaded = cc.optimize(loaded, cc.Schedule.fora(interval=2))
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images(loaded, inputs([1, 3], 4)), before, rtol=0, atol=0)


def test_copies_of_an_optimized_pipeline_run_alone(components):
    pipe = cc.optimize(pipeline(components), cc.Schedule.fora(interval=2))
    first = images(pipe, inputs([1, 3], 4))
    twin = copy.deepcopy(pipe)
    assert twin.transformer.model is not pipe.transformer.model
    torch.testing.assert_close(images(twin, inputs([1, 3], 4)), first, rtol=0, atol=0)
    torch.testing.assert_close(images(pipe, inputs([1, 3], 4)), first, rtol=0, atol=0)
