"""The drop-in runtime over whole sampling loops, against eager references."""

import copy

import pytest
import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample
from tests.conftest import dit_inputs, fora_reference


def test_all_compute_schedule_reproduces_the_model(dit, labels, sample_kwargs, uncached_samples):
    cached = cc.optimize(dit, cc.Schedule.fora(12, 1))
    out = ddim_sample(cached, labels, **sample_kwargs)
    assert (out - uncached_samples).abs().max().item() <= 1e-5
    assert len(cached.step_graphs) == 1


@pytest.mark.parametrize("interval", [2, 3])
def test_fora_matches_eager_reference_across_generations(dit, labels, sample_kwargs, uncached_samples, interval):
    cached = cc.optimize(dit, cc.Schedule.fora(12, interval))
    ref = fora_reference(dit, interval)
    for generation in range(2):
        ref.counter.calls = 0
        expected = ddim_sample(ref, labels, **sample_kwargs)
        got = ddim_sample(cached, labels, **sample_kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert cached.step == 0, "a finished generation leaves the next call at step 0"
    # and caching really changed the result
    assert (got - uncached_samples).abs().max() > 1e-3


def test_fora_interval_3_has_two_step_graphs(dit, labels, sample_kwargs):
    cached = cc.optimize(dit, cc.Schedule.fora(12, 3))
    ddim_sample(cached, labels, **sample_kwargs)
    assert len(cached.step_graphs) == 2
    kinds = sorted(p.is_full for p in cached.step_graphs)
    assert kinds == [False, True]


def test_two_optimized_models_do_not_share_state(dit, labels, sample_kwargs):
    a = cc.optimize(dit, cc.Schedule.fora(12, 3))
    b = cc.optimize(dit, cc.Schedule.fora(12, 3))
    expected = ddim_sample(a, labels, **sample_kwargs)
    # interleave b's first half-generation with a fresh run of a: a must be unaffected
    kw = dit_inputs()
    for _ in range(5):
        b(**kw, return_dict=False)
    torch.testing.assert_close(ddim_sample(a, labels, **sample_kwargs), expected, rtol=0, atol=0)


def test_reset_restarts_the_generation(dit, labels, sample_kwargs):
    cached = cc.optimize(dit, cc.Schedule.fora(12, 3))
    expected = ddim_sample(cached, labels, **sample_kwargs)
    kw = dit_inputs(batch=4)  # the CFG batch of the sampling loop
    for _ in range(4):
        cached(**kw, return_dict=False)
    assert cached.step == 4
    cached.reset()
    assert cached.step == 0
    torch.testing.assert_close(ddim_sample(cached, labels, **sample_kwargs), expected, rtol=0, atol=0)


def test_output_types_match_the_model(dit):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    kw = dit_inputs()
    cached = cc.optimize(dit, cc.Schedule.fora(3, 1))
    out = cached(**kw)
    assert isinstance(out, Transformer2DModelOutput)
    torch.testing.assert_close(out.sample, dit(**kw).sample, rtol=0, atol=0)
    tup = cc.optimize(dit, cc.Schedule.fora(3, 1))
    res = tup(kw["hidden_states"], timestep=kw["timestep"], class_labels=kw["class_labels"], return_dict=False)
    assert isinstance(res, tuple) and len(res) == 1
    torch.testing.assert_close(res[0], out.sample, rtol=0, atol=0)


def test_optimize_leaves_the_model_unchanged(dit, labels, sample_kwargs, uncached_samples):
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    cached = cc.optimize(dit, cc.Schedule.fora(12, 3))
    ddim_sample(cached, labels, **sample_kwargs)
    assert all(torch.equal(state[k], v) for k, v in dit.state_dict().items())
    assert torch.equal(ddim_sample(dit, labels, **sample_kwargs), uncached_samples)
    assert not isinstance(dit.transformer_blocks[0].attn1, cc.CachedTransformer)


def test_pipeline_attributes_pass_through(dit):
    cached = cc.optimize(dit, cc.Schedule.fora(3, 1))
    assert cached.config.sample_size == 8
    assert cached.dtype == torch.float32
    assert cached.model is dit
    # the weights answer under the model's own names (a plain checkpoint loads into the wrapper)
    assert list(cached.state_dict()) == list(dit.state_dict())
    assert all(a is b for a, b in zip(cached.parameters(), dit.parameters()))


def test_to_moves_the_held_model_and_captures_again(dit):
    model = copy.deepcopy(dit)  # dit is shared by the session
    cached = cc.optimize(model, cc.Schedule.fora(12, 3))
    calls = [dit_inputs(batch=4, seed=i) for i in range(4)]  # steps 0 (full), 1, 2 (cached), 3 (full)
    cached(**calls[0], return_dict=False)
    graphs = list(cached.step_graphs.values())
    assert cached.to(torch.float32) is cached and list(cached.step_graphs.values()) == graphs, "no change, no recapture"
    assert cached.step == 1

    cached.double()
    assert {p.dtype for p in model.parameters()} == {torch.float64} and cached.dtype == torch.float64
    assert not cached.is_captured and cached.step == 0
    calls = [{k: v.double() if v.is_floating_point() else v for k, v in kw.items()} for kw in calls]
    fresh = cc.optimize(copy.deepcopy(dit).double(), cc.Schedule.fora(12, 3))
    uncached = copy.deepcopy(dit).double()
    for step, kw in enumerate(calls):
        got = cached(**kw, return_dict=False)[0]
        torch.testing.assert_close(got, fresh(**kw, return_dict=False)[0], rtol=0, atol=0)
        assert got.dtype == torch.float64
        if step == 1:
            assert (got - uncached(**kw, return_dict=False)[0]).abs().max() > 1e-3, "step 1 reads the cache"
    assert len(cached.step_graphs) == 2


def test_shape_change_is_a_clear_error(dit):
    cached = cc.optimize(dit, cc.Schedule.fora(4, 2))
    cached(**dit_inputs(batch=2))
    with pytest.raises(cc.InputMismatchError, match=r"batch changed from 2 to 4 within a generation.*reset\(\)"):
        cached(**dit_inputs(batch=4))
    assert cached.step == 1, "a refused call does not advance the schedule"


def test_changed_constant_or_structure_is_a_clear_error(dit):
    kw = dit_inputs()
    cached = cc.optimize(dit, cc.Schedule.fora(4, 2))
    cached(**kw, return_dict=True)
    with pytest.raises(cc.InputMismatchError, match="return_dict"):
        cached(**kw, return_dict=False)
    with pytest.raises(cc.InputMismatchError, match="structure"):
        cached(kw["hidden_states"], timestep=kw["timestep"], class_labels=kw["class_labels"], return_dict=True)


def test_example_inputs_capture_eagerly_and_errors_leave_nothing_half_applied(dit):
    kw = dit_inputs()
    cached = cc.optimize(dit, cc.Schedule.fora(4, 2), example_kwargs=kw)
    assert cached.is_captured and len(cached.step_graphs) == 2
    with pytest.raises(cc.ScheduleError, match="2 blocks per step but the model has 3"):
        cc.optimize(dit, cc.Schedule.from_mask([[[1, 1]] * 2]), example_kwargs=kw)
    bad = cc.optimize(dit, cc.Schedule.from_mask([[[1, 1]] * 2]))
    with pytest.raises(cc.ScheduleError):
        bad(**kw)
    assert not bad.is_captured and bad.step_graphs == {}


def test_unknown_region_pattern_fails_on_capture(dit):
    cached = cc.optimize(dit, cc.Schedule.fora(4, 2), regions=cc.RegionPatterns(blocks=("blocks.*",)))
    with pytest.raises(cc.RegionError, match="no transformer block found"):
        cached(**dit_inputs())


def test_calls_per_step_keeps_one_cache_per_call(dit):
    """CFG as two calls per step: each call has its own cache."""
    kw_c, kw_u = dit_inputs(seed=1), dit_inputs(seed=2)
    sched = cc.Schedule.fora(4, 2)
    two = cc.optimize(dit, sched, calls_per_step=2)
    one_c, one_u = cc.optimize(dit, sched), cc.optimize(dit, sched)
    for _ in range(4):
        torch.testing.assert_close(two(**kw_c).sample, one_c(**kw_c).sample, rtol=0, atol=0)
        torch.testing.assert_close(two(**kw_u).sample, one_u(**kw_u).sample, rtol=0, atol=0)
    assert two.step == 0


def test_bad_arguments_to_optimize(dit):
    with pytest.raises(TypeError, match="Schedule"):
        cc.optimize(dit, "fora")
    with pytest.raises(ValueError, match="calls_per_step"):
        cc.optimize(dit, cc.Schedule.fora(4, 2), calls_per_step=0)
    with pytest.raises(TypeError, match="already optimized"):
        cc.optimize(cc.optimize(dit, cc.Schedule.fora(4, 2)), cc.Schedule.fora(4, 2))


def test_cache_store_keeps_references_or_copies_in_place():
    from cachecompile.runtime.cache_store import CacheStore

    value = torch.randn(2, 3)
    by_ref = CacheStore()
    by_ref.write(0, "s", value)
    assert by_ref.read(0, "s").data_ptr() == value.data_ptr()  # no copy of the step graph's output
    in_place = CacheStore(in_place=True)
    in_place.write(0, "s", value)
    buf = in_place.read(0, "s")
    assert buf is not value and torch.equal(buf, value)
    in_place.write(0, "s", value * 2)
    assert in_place.read(0, "s") is buf and torch.equal(buf, value * 2)  # same address, new value
    # a step that passes slot s through to slot t while writing a new s (a history queue)
    in_place.write_all(0, [("s", value * 3), ("t", buf)])
    assert torch.equal(in_place.read(0, "t"), value * 2) and torch.equal(in_place.read(0, "s"), value * 3)


def test_cache_writes_never_alias_what_the_caller_holds(dit):
    """A step graph may hand back a cache value that is also a user output (or input); kept by
    reference it would change when the caller mutates that tensor in place."""
    from tests.conftest import dit_inputs

    cached = cc.optimize(dit, cc.Schedule.fora(4, 2))
    inputs = dit_inputs()
    cached.prepare(**inputs)
    program = cached.program
    assert program.call.num_outputs == 1
    full = program.graph_of_step[0]
    runner, slot = program.runners[full], program.io[full].cache_outputs[0]
    handed_out = []

    def aliasing_runner(*args):  # returns its first cache write as the user output too
        outs = runner(*args)
        handed_out.append(outs[1])
        return (outs[1], *outs[1:])

    program.runners[full] = aliasing_runner
    cached(**inputs)
    kept = cached._store.read(0, slot)
    assert kept.data_ptr() != handed_out[0].data_ptr() and torch.equal(kept, handed_out[0])


def test_a_full_step_frees_the_old_cache_before_it_computes(dit, labels, sample_kwargs):
    """FORA's full steps rewrite every slot without reading one: the values of the last full step
    are freed before the next one runs, so the cache is never held twice (by reference; CUDA-graph
    buffers stay in place)."""
    import weakref

    expected = ddim_sample(cc.optimize(dit, cc.Schedule.fora(12, 3)), labels, **sample_kwargs)
    cached = cc.optimize(dit, cc.Schedule.fora(12, 3))
    ddim_sample(cached, labels, **sample_kwargs)  # builds the program
    program, store = cached.program, cached._store
    full = program.graph_of_step[0]
    runner, write_all = program.runners[full], store.write_all
    written: list = []  # weak references to the values of the last step that wrote the cache
    seen = []  # per full step, as it starts: the store's bytes, and whether those values are gone

    def watching(*args):
        seen.append((store.nbytes, len(written), all(r() is None for r in written)))
        return runner(*args)

    def recording(call, items, caller=()):
        items = list(items)
        if items:
            written[:] = [weakref.ref(v) for _, v in items]
        return write_all(call, items, caller)

    program.runners[full], store.write_all = watching, recording
    try:
        out = ddim_sample(cached, labels, **sample_kwargs)
    finally:
        program.runners[full], store.write_all = runner, write_all
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert [s for s, _, _ in seen] == [0, 0, 0, 0]  # steps 0, 3, 6, 9 start from an empty store
    assert [n for _, n, _ in seen] == [0, 6, 6, 6] and all(gone for _, _, gone in seen)
