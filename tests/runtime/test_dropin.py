"""The optimized model behaves like the model it stands for: any batch, captures keyed by what
the graphs depend on, weights / processors / mode changes honoured, threads and copies safe."""

import copy
import io
import pickle
import threading

import pytest
import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample
from tests.conftest import NULL_CLASS, dit_inputs, fora_reference, make_dit

SAMPLE = dict(guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4)


@pytest.fixture
def model():
    return make_dit(seed=3)


def test_every_batch_size_runs_on_one_capture_and_all_compute_is_the_model(model):
    cached = cc.optimize(model, cc.Schedule.fora(interval=1))
    for batch in (2, 1, 5, 2):
        kw = dit_inputs(batch=batch, seed=batch)
        with torch.no_grad():
            assert torch.equal(cached(**kw).sample, model(**kw).sample)
        cached.reset()
    assert cached.captures == 1 and cached.program.call.dynamic_batch


def test_a_fixed_batch_captures_once_per_batch_size(model):
    """``dynamic_batch=False``: every size in the step graphs is a number, and another batch
    captures again (each capture still exact)."""
    cached = cc.optimize(model, cc.Schedule.fora(interval=1), dynamic_batch=False)
    for batch in (2, 3):
        kw = dit_inputs(batch=batch, seed=batch)
        with torch.no_grad():
            assert torch.equal(cached(**kw).sample, model(**kw).sample)
        cached.reset()
        assert not cached.program.call.dynamic_batch
        for gm in cached.step_graphs.values():
            shapes = [n.meta["val"].shape for n in gm.graph.find_nodes(op="placeholder") if isinstance(n.meta.get("val"), torch.Tensor)]
            assert all(isinstance(d, int) for s in shapes for d in s) and shapes[0][0] == batch
    assert cached.captures == 2


def test_another_resolution_captures_again_up_to_the_limit(model):
    cached = cc.optimize(model, cc.Schedule.fora(interval=1), max_captures=2)
    sizes = [(8, 8), (16, 16), (8, 8)]
    for h, w in sizes:
        kw = dict(dit_inputs(batch=2), hidden_states=torch.randn(2, 4, h, w))
        with torch.no_grad():
            assert torch.equal(cached(**kw).sample, model(**kw).sample)
        cached.reset()
    assert cached.captures == 2
    kw = dict(dit_inputs(batch=2), hidden_states=torch.randn(2, 4, 12, 12))
    with pytest.raises(cc.InputMismatchError, match=r"max_captures=2.*larger max_captures"):
        cached(**kw)


def test_a_schedule_without_a_step_count_follows_each_generation(model):
    """Sampling loops of 6, 3 and 20 steps (longer than anything seen: the program grows) on one
    optimized model, each equal to the eager FORA reference."""
    cached = cc.optimize(model, cc.Schedule.fora(interval=3))
    labels = torch.tensor([1, 7])
    for steps in (6, 3, 20, 6):
        got = ddim_sample(cached, labels, num_steps=steps, **SAMPLE)
        want = ddim_sample(fora_reference(model, 3), labels, num_steps=steps, **SAMPLE)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len({id(r) for r in cached.program.runners}) == 2 and cached.captures == 1


def test_the_batch_cannot_change_within_a_generation(model):
    cached = cc.optimize(model, cc.Schedule.fora(4, 2))
    cached(**dit_inputs(batch=2))
    with pytest.raises(cc.InputMismatchError, match="batch changed from 2 to 4 within a generation"):
        cached(**dict(dit_inputs(batch=4), timestep=torch.full((4,), 400)))


def test_weights_loaded_after_capture_are_used(model):
    """``load_state_dict`` on the optimized model (the model's own names) changes the weights in
    place: the eager graphs read them; a backend with its own copy (ONNX Runtime) captures again."""
    other = make_dit(seed=11)
    kw = dit_inputs(batch=2)
    for backend in ("eager", "onnxruntime"):
        target = copy.deepcopy(model)
        cached = cc.optimize(target, cc.Schedule.fora(interval=1), backend=backend)
        with torch.no_grad():
            before = cached(**kw).sample
            cached.reset()
            cached.load_state_dict(other.state_dict())
            after = cached(**kw).sample
            expected = other(**kw).sample
        assert (before - expected).abs().max() > 1e-2
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_an_attention_processor_set_after_capture_is_used(model):
    from diffusers.models.attention_processor import AttnProcessor

    class Scaled(AttnProcessor):  # attention output halved: visibly different
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return 0.5 * super().__call__(attn, hidden_states, *args, **kwargs)

    cached = cc.optimize(model, cc.Schedule.fora(interval=1))
    kw = dit_inputs(batch=2)
    with torch.no_grad():
        plain = cached(**kw).sample
        cached.reset()
        model.transformer_blocks[0].attn1.set_processor(Scaled())
        got = cached(**kw).sample
        assert torch.equal(got, model(**kw).sample) and not torch.equal(got, plain)


def test_train_and_eval_reach_the_model_and_capture_again():
    """Dropout captured in train mode must not stay on after ``eval()`` (and the reverse)."""
    model = make_dit(seed=3, dropout=0.5)
    cached = cc.optimize(model, cc.Schedule.fora(interval=1))
    kw = dit_inputs(batch=2)
    with torch.no_grad():
        evaluated = cached(**kw).sample
        assert torch.equal(evaluated, model(**kw).sample)
        cached.reset()
        cached.train()
        assert model.training and all(m.training for m in model.modules())
        torch.manual_seed(0)
        trained = cached(**kw).sample
        torch.manual_seed(0)
        assert torch.equal(trained, model(**kw).sample) and not torch.equal(trained, evaluated)
        cached.reset()
        cached.eval()
        assert not model.training
        assert torch.equal(cached(**kw).sample, evaluated)


def test_fused_qkv_projections_capture_again(model):
    """What a pipeline's ``fuse_qkv_projections()`` does to each attention: one to_qkv linear and
    a fused processor."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    kw = dit_inputs(batch=2)
    cached = cc.optimize(model, cc.Schedule.fora(interval=1))
    with torch.no_grad():
        cached(**kw)
        cached.reset()
        for m in model.modules():
            if isinstance(m, Attention):
                m.fuse_projections()
                m.set_processor(FusedAttnProcessor2_0())
        assert torch.equal(cached(**kw).sample, model(**kw).sample)
    assert any(".to_qkv." in str(n.target) for gm in cached.step_graphs.values() for n in gm.graph.nodes if n.op == "get_attr")


def test_two_threads_on_one_model_get_a_clear_error_and_one_model_each_works(model):
    steps = (999, 750, 500, 250)
    reference = cc.optimize(model, cc.Schedule.fora(4, 2))
    for t in steps:
        expected = reference(**dict(dit_inputs(batch=2), timestep=torch.full((2,), t))).sample
    cached = cc.optimize(model, cc.Schedule.fora(4, 2))
    cached(**dit_inputs(batch=2))  # capture first, so both threads race on generations, not on capture
    cached.reset()
    errors, results = [], {}
    barrier = threading.Barrier(2, timeout=120)

    def run(name, m):
        failed = False
        for t in steps:
            if not failed:
                try:
                    results[name] = m(**dict(dit_inputs(batch=2), timestep=torch.full((2,), t))).sample
                except Exception as e:  # noqa: BLE001 - collected and checked below
                    errors.append(e)
                    failed = True
            barrier.wait()  # both threads make call i before either makes call i + 1

    def race(models):
        errors.clear()
        results.clear()
        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(models)]
        [t.start() for t in threads]
        [t.join() for t in threads]

    race([cached, cached])
    # the generations overlap: the second thread is refused, the first finishes its own correctly
    assert len(errors) == 1 and isinstance(errors[0], cc.ConcurrentUseError), errors
    assert "another thread" in str(errors[0]) or "one generation at a time" in str(errors[0])
    assert len(results) == 1 and torch.allclose(next(iter(results.values())), expected, rtol=1e-5, atol=1e-5)
    race([cc.optimize(model, cc.Schedule.fora(4, 2)) for _ in range(2)])  # one model each: both work
    assert not errors and all(torch.allclose(results[i], expected, rtol=1e-5, atol=1e-5) for i in (0, 1))


def test_copies_pickles_and_torch_save_of_a_captured_model(model):
    cached = cc.optimize(model, cc.Schedule.fora(4, 2))
    kw = dit_inputs(batch=2)
    first = cached(**kw).sample
    cached.reset()
    twin = copy.deepcopy(cached)
    assert twin.model is not model and not twin.is_captured
    assert torch.equal(twin(**kw).sample, first)
    buffer = io.BytesIO()
    torch.save(cached, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(**kw).sample, first)
    assert torch.equal(pickle.loads(pickle.dumps(cached))(**kw).sample, first)


def test_class_labels_out_of_range_fail_alike_on_every_backend(model):
    kw = dict(dit_inputs(batch=2), class_labels=torch.tensor([1, -1]))
    with pytest.raises(IndexError):
        model(**kw)
    for backend in ("eager", "onnxruntime"):
        cached = cc.optimize(model, cc.Schedule.fora(interval=1), backend=backend, example_kwargs=dit_inputs(batch=2))
        with pytest.raises(IndexError, match=r"class_labels holds -1, outside \[0, 10\]"):
            cached(**kw)
        with pytest.raises(IndexError, match=r"holds 11"):
            cached(**dict(kw, class_labels=torch.tensor([1, 11])))


def test_layerwise_casting_is_refused_by_name(model):
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(cc.CaptureError, match=r"layerwise casting \(enable_layerwise_casting\)"):
        cc.optimize(model, cc.Schedule.fora(interval=2), example_kwargs=dit_inputs(batch=2))
