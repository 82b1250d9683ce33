"""Dynamic policies (DBCache / First-Block Cache, TeaCache, MagCache): schedule data, the step
graph's structure, and whole CFG + DDIM loops against the reference implementations installed
here (cache-dit, diffusers' hooks) and the independent eager reference in
tests/dynamic_reference.py, on a random tiny DiT and the bundled trained digits DiT. Eager only;
the compiled backends and artifacts are in test_dynamic_backends.py."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os

import pytest
import torch

import cachecompile as cc
from cachecompile.core.errors import RegionError, ScheduleError
from cachecompile.core.program import DECISION_SLOT
from cachecompile.methods.dynamic import PROBE_SLOT, RESIDUAL_SLOT, STATE_SLOT, magcache_steps, threshold_for
from cachecompile.models import DIGITS_CONFIG, digits_dit
from cachecompile.runtime.decisions import DecisionLog
from cachecompile.sampling import ddim_sample
from tests.conftest import NULL_CLASS
from tests.dynamic_reference import DynamicReference

STEPS = 12
LABELS = torch.tensor([1, 7])
HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


@pytest.fixture(scope="module")
def digits():
    return digits_dit()


def _sample_kwargs(model) -> dict:
    if model.config.sample_size == DIGITS_CONFIG.sample_size:  # the digits DiT
        return dict(num_steps=STEPS, guidance_scale=2.0, null_class=DIGITS_CONFIG.null_class,
                    sample_size=DIGITS_CONFIG.sample_size, in_channels=DIGITS_CONFIG.in_channels, seed=0)
    return dict(num_steps=STEPS, guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4, seed=0)


def _model(request, name):
    return request.getfixturevalue(name)


def _run(model, schedule, generations: int = 1):
    cached = cc.optimize(model, schedule)
    outs = [ddim_sample(cached, LABELS, **{**_sample_kwargs(model), "seed": g}) for g in range(generations)]
    return cached, outs


# --------------------------------------------------------------------------- schedule data


def test_presets_are_data_that_round_trip():
    schedules = [
        cc.Schedule.dbcache(0.12, compute_first=2, compute_last=1, warmup_steps=3, max_cached_steps=4,
                            max_continuous_cached_steps=2, num_steps=8),
        cc.Schedule.teacache(0.4, "FluxTransformer2DModel", num_steps=6),
        cc.Schedule.magcache(0.06, 3, [1.0, 1.1, 1.0, 0.97, 0.95], num_steps=10),
    ]
    for s in schedules:
        assert cc.Schedule.loads(s.dumps()) == s
    assert schedules[0].step_kinds() == ["full"] * 3 + ["dynamic"] * 5
    assert schedules[1].step_kinds() == ["full"] + ["dynamic"] * 4 + ["full"]
    assert schedules[1].params["coefficients"][0] == pytest.approx(498.651651)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: cc.Schedule.dbcache(-0.1, num_steps=4), "threshold must be a finite number >= 0"),
        (lambda: cc.Schedule.dbcache(float("nan"), num_steps=4), "threshold"),
        (lambda: cc.Schedule.dbcache(0.1, compute_first=0, num_steps=4), "compute_first must be an integer >= 1"),
        (lambda: cc.Schedule.dbcache(0.1, max_cached_steps=-1, num_steps=4), "max_cached_steps must be an integer >= 0"),
        (lambda: cc.Schedule.dbcache(0.1, num_steps=4).with_compensation(cc.GOC(1.0)), "drop compensation"),
        (lambda: cc.Schedule.teacache(0.1, [], num_steps=4), "non-empty list of numbers"),
        (lambda: cc.Schedule.teacache(0.1, "DiTTransformer2DModel", num_steps=4), "no published TeaCache coefficients.*cc.calibrate"),
        (lambda: cc.Schedule.magcache(0.1, 2, [], num_steps=4), "magnitude ratios"),
        (lambda: cc.Schedule.magcache(0.1, 2, [1.0], retention_ratio=1.5, num_steps=4), r"in \[0, 1\]"),
    ],
)
def test_bad_settings_fail_with_a_clear_error(build, match):
    with pytest.raises(ScheduleError, match=match):
        build()


@pytest.mark.parametrize(
    "schedule, match",
    [
        (cc.Schedule.teacache(0.1, None, num_steps=STEPS), "no rescaling coefficients yet.*cc.calibrate"),
        (cc.Schedule.magcache(0.1, 2, None, num_steps=STEPS), "no magnitude ratios yet.*cc.calibrate"),
    ],
)
def test_an_uncalibrated_schedule_is_data_but_does_not_compile(dit, schedule, match):
    assert cc.Schedule.loads(schedule.dumps()) == schedule
    cached = cc.optimize(dit, schedule)
    with pytest.raises(ScheduleError, match=match):
        ddim_sample(cached, LABELS, **_sample_kwargs(dit))
    assert not cached.is_captured


def test_a_file_cannot_hold_what_a_preset_refuses():
    d = cc.Schedule.dbcache(0.1, num_steps=4).to_dict()
    d["params"]["compute_last"] = -2
    with pytest.raises(ScheduleError, match="compute_last must be an integer >= 0"):
        cc.Schedule.from_dict(d)


def test_threshold_for_decides_like_a_float64_comparison():
    for t in (0.08, 0.1, 0.3, 1e-3, 0.5):
        c = torch.tensor(threshold_for(t), dtype=torch.float32)
        below = torch.nextafter(c, torch.tensor(0.0))
        assert (c.item() < t) is False and (below.item() < t) is True  # c is the smallest float32 >= t


def test_magcache_rule_as_diffusers_states_it():
    # retention 0.2 of 10 steps = 2 steps always computed; then accumulate ratio/error/skips
    assert magcache_steps([1.0] * 10, 10, 0.06, 3, 0.2) == [False, False, True, True, True, False] + [True] * 3 + [False]
    # a ratio far from 1 makes the error exceed the threshold at once
    assert magcache_steps([1.0, 1.5, 1.5, 1.5], 4, 0.06, 3, 0.0) == [False] * 4
    # resampled to another length by nearest index
    assert len(magcache_steps([1.0, 0.9, 0.8], 7, 0.06, 3, 0.0)) == 7


# --------------------------------------------------------------------------- the step graph


def test_a_dynamic_schedule_is_two_step_graphs_with_one_cond(dit):
    cached, _ = _run(dit, cc.Schedule.dbcache(0.3, compute_first=1, compute_last=1, warmup_steps=2, num_steps=STEPS))
    assert len(cached.step_graphs) == 2
    record, decide = cached.program.graphs
    io = cached.program.io
    assert io[0].cache_inputs == [] and set(io[0].cache_outputs) == {PROBE_SLOT, RESIDUAL_SLOT, STATE_SLOT}
    assert set(io[1].cache_inputs) == {PROBE_SLOT, RESIDUAL_SLOT, STATE_SLOT}
    assert set(io[1].cache_outputs) == {PROBE_SLOT, RESIDUAL_SLOT, STATE_SLOT, DECISION_SLOT}
    conds = [n for n in decide.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 1
    assert not [n for n in record.graph.nodes if n.target is torch.ops.higher_order.cond]

    def paths(graph):
        return {v[0] for n in graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()}

    # block 1 (the middle of 3) runs only inside the compute branch; blocks 0 and 2 stay outside
    _, cached_fn, compute_fn, operands = conds[0].args
    compute = getattr(decide, compute_fn.target)
    outer, inner = paths(decide.graph), paths(compute.graph)
    assert not [p for p in outer if "transformer_blocks.1" in p]
    assert any("transformer_blocks.1.ff" in p for p in inner) and not any("blocks.0." in p or "blocks.2." in p for p in inner)
    assert any("transformer_blocks.0.ff" in p for p in outer) and any("transformer_blocks.2.ff" in p for p in outer)
    cached_branch = getattr(decide, cached_fn.target)
    assert [n.target for n in cached_branch.graph.nodes if n.op == "call_function"] == [torch.ops.aten.add.Tensor]


def test_the_segment_must_leave_a_block_to_cache(dit):
    cached = cc.optimize(dit, cc.Schedule.dbcache(0.1, compute_first=2, compute_last=1, num_steps=STEPS))
    with pytest.raises(RegionError, match="compute_first=2 \\+ compute_last=1 leave no block to cache.*<= 2"):
        ddim_sample(cached, LABELS, **_sample_kwargs(dit))
    assert not cached.is_captured  # nothing half-applied


def test_decisions_stay_on_the_device_until_asked():
    # Meta tensors hold no data: recording them proves the log never reads a flag during a generation.
    log = DecisionLog()
    for step in range(4):
        log.record(step, 0, [DECISION_SLOT] if step else [], [torch.empty((), dtype=torch.bool, device="meta")] if step else [])
    assert all(f is None or f.device.type == "meta" for _, _, f in log._current)
    log.clear()
    log.record(0, 0, [], [])
    log.record(1, 0, ["x", DECISION_SLOT], [torch.zeros(3), torch.tensor(True)])
    log.record(1, 1, ["x", DECISION_SLOT], [torch.zeros(3), torch.tensor(False)])
    assert log.labels(lambda s: "full") == ["full", "cached+full"]


# --------------------------------------------------------------------------- against the references

DBCACHE_CASES = [  # (model, settings) — thresholds chosen so that both decisions occur
    ("dit", dict(threshold=0.3, compute_first=1, compute_last=0, warmup_steps=2)),
    ("dit", dict(threshold=0.4, compute_first=1, compute_last=1, warmup_steps=0, max_continuous_cached_steps=2)),
    ("digits", dict(threshold=0.12, compute_first=1, compute_last=0, warmup_steps=2)),
    ("digits", dict(threshold=0.2, compute_first=2, compute_last=1, warmup_steps=3, max_cached_steps=3)),
]


@pytest.mark.parametrize("name, settings", DBCACHE_CASES)
def test_dbcache_matches_the_eager_reference(request, name, settings):
    model = _model(request, name)
    ref = DynamicReference(
        model, "dbcache", threshold=settings["threshold"], first=settings["compute_first"], last=settings["compute_last"],
        warmup=settings["warmup_steps"], max_cached=settings.get("max_cached_steps", -1),
        max_run=settings.get("max_continuous_cached_steps", -1),
    )
    cached, outs = _run(model, cc.Schedule.dbcache(**settings, num_steps=STEPS), generations=2)
    for g, got in enumerate(outs):  # two generations: no state leaks from the first
        ref.restart()
        expected = ddim_sample(ref, LABELS, **{**_sample_kwargs(model), "seed": g})
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert cached.decisions == ref.decisions
    assert "cached" in ref.decisions and ref.decisions.count("full") > settings["warmup_steps"]


def test_a_dynamic_schedule_without_a_step_count_follows_each_generation(dit):
    """``Schedule.dbcache(t)`` binds to each generation's length, and one capture serves two
    batch sizes: each generation equals the reference run for its own length and batch."""
    settings = dict(threshold=0.3, compute_first=1, compute_last=0, warmup_steps=2)
    cached = cc.optimize(dit, cc.Schedule.dbcache(**settings))
    ref = DynamicReference(dit, "dbcache", threshold=0.3, first=1, last=0, warmup=2, max_cached=-1, max_run=-1)
    for steps, labels in ((8, LABELS), (12, torch.tensor([1, 7, 3]))):
        kwargs = {**_sample_kwargs(dit), "num_steps": steps}
        got = ddim_sample(cached, labels, **kwargs)
        ref.restart()
        torch.testing.assert_close(got, ddim_sample(ref, labels, **kwargs), rtol=0, atol=1e-6)
        assert cached.decisions == ref.decisions and len(cached.decisions) == steps
    assert cached.captures == 1


def _cache_dit_run(model, settings: dict, num_steps: int, seed: int):
    import cache_dit
    from cache_dit import DBCacheConfig

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    m = copy.deepcopy(model)
    cfg = DBCacheConfig(
        Fn_compute_blocks=settings["compute_first"], Bn_compute_blocks=settings["compute_last"],
        residual_diff_threshold=settings["threshold"], max_warmup_steps=settings["warmup_steps"],
        max_cached_steps=settings.get("max_cached_steps", -1),
        max_continuous_cached_steps=settings.get("max_continuous_cached_steps", -1),
        num_inference_steps=num_steps, enable_separate_cfg=False,  # CFG as one batched call
    )
    cache_dit.enable_cache(m, cache_config=cfg)
    cache_dit.refresh_context(m, cache_config=copy.deepcopy(cfg))
    out = ddim_sample(m, LABELS, **{**_sample_kwargs(model), "seed": seed})
    stats = cache_dit.summary(m)
    stats = stats[0] if isinstance(stats, list) else stats
    cached_steps = set(stats.cached_steps)
    return out, ["cached" if s in cached_steps else "full" for s in range(num_steps)]


@pytest.mark.skipif(not HAS_CACHE_DIT, reason="cache-dit is not installed (pip install 'cachecompile[bench]' or cache-dit==1.5.3)")
@pytest.mark.parametrize("name, settings", DBCACHE_CASES)
def test_dbcache_makes_cache_dits_decisions(request, name, settings):
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    model = _model(request, name)
    cached, (got,) = _run(model, cc.Schedule.dbcache(**settings, num_steps=STEPS))
    expected, decisions = _cache_dit_run(model, settings, STEPS, seed=0)
    assert cached.decisions == decisions
    assert "cached" in decisions
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_first_block_cache_matches_diffusers(request):
    """``compute_first=1, compute_last=0, warmup_steps=0`` against diffusers' FBC hooks (DiT has no
    CacheMixin: the cache context is set by hand, as a pipeline would)."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    for name, threshold in (("dit", 0.3), ("digits", 0.12)):
        model = _model(request, name)
        m = copy.deepcopy(model)
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=threshold))
        computed = []  # the steps where the last block's MLP ran
        m.transformer_blocks[-1].ff.register_forward_hook(lambda *_: computed.append(state["step"]))
        state = {"step": 0}

        class Hooked(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, **kw):
                if state["step"] == 0:
                    HookRegistry.check_if_exists_or_initialize(m).reset_stateful_hooks(recurse=True)
                _set_cache_context(m, CacheContext("cond", step_index=state["step"], num_inference_steps=STEPS))
                try:
                    return m(**kw)
                finally:
                    _set_cache_context(m, None)
                    state["step"] += 1

        expected = ddim_sample(Hooked(), LABELS, **_sample_kwargs(model))
        cached, (got,) = _run(model, cc.Schedule.dbcache(threshold, compute_first=1, num_steps=STEPS))
        assert cached.decisions == ["full" if s in computed else "cached" for s in range(STEPS)]
        assert "cached" in cached.decisions
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


TEACACHE_CASES = [
    ("dit", 0.4, [2.0, 0.5, 0.0]),  # rescale(x) = 2x² + 0.5x
    ("digits", 0.1, [1.0, 0.0]),  # the relative change itself
]


@pytest.mark.parametrize("name, threshold, coefficients", TEACACHE_CASES)
def test_teacache_matches_the_eager_reference(request, name, threshold, coefficients):
    model = _model(request, name)
    ref = DynamicReference(model, "teacache", threshold=threshold, coefficients=coefficients, num_steps=STEPS)
    cached, outs = _run(model, cc.Schedule.teacache(threshold, coefficients, num_steps=STEPS), generations=2)
    assert len(cached.step_graphs) == 3  # record, dynamic, the full last step
    for g, got in enumerate(outs):
        ref.restart()
        expected = ddim_sample(ref, LABELS, **{**_sample_kwargs(model), "seed": g})
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert cached.decisions == ref.decisions
    assert "cached" in ref.decisions and ref.decisions[-1] == "full"


def test_magcache_matches_diffusers(request):
    """The rule resolves to a static plan; its outputs and computed steps are diffusers' MagCache's."""
    from diffusers.hooks import HookRegistry, MagCacheConfig, apply_mag_cache

    model = _model(request, "digits")
    ratios = [1.0, 1.02, 1.01, 1.0, 0.99, 1.0, 0.99, 0.98, 0.99, 0.97, 0.96, 0.9]
    kwargs = dict(threshold=0.05, max_skip_steps=2, retention_ratio=0.2)
    m = copy.deepcopy(model)
    apply_mag_cache(m, MagCacheConfig(mag_ratios=ratios, num_inference_steps=STEPS, **kwargs))
    computed = []
    calls = {"n": 0}
    m.transformer_blocks[-1].ff.register_forward_hook(lambda *_: computed.append(calls["n"]))

    def hooked(**kw):
        if calls["n"] == 0:
            HookRegistry.check_if_exists_or_initialize(m).reset_stateful_hooks(recurse=True)
        try:
            return m(**kw)
        finally:
            calls["n"] += 1

    hooked.parameters = m.parameters
    expected = ddim_sample(hooked, LABELS, **_sample_kwargs(model))
    schedule = cc.Schedule.magcache(ratios=ratios, num_steps=STEPS, **kwargs)
    cached, (got,) = _run(model, schedule)
    assert cached.decisions == ["full" if s in computed else "cached" for s in range(STEPS)]
    assert "cached" in cached.decisions and len(cached.step_graphs) == 2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- calibration


def test_calibrate_measures_magcache_ratios_as_diffusers_does(digits):
    import ast
    import contextlib
    import io

    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    kw = dict(class_labels=LABELS, null_class=DIGITS_CONFIG.null_class, sample_size=16, in_channels=1, num_steps=STEPS)
    schedule = cc.calibrate(digits, cc.Schedule.magcache(0.05, 2, None, num_steps=STEPS), kw, num_samples=1)
    m = copy.deepcopy(digits)
    apply_mag_cache(m, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # diffusers prints the ratios of a calibration run
        ddim_sample(m, LABELS, **_sample_kwargs(digits))
    theirs = ast.literal_eval([ln for ln in printed.getvalue().splitlines() if ln.startswith("[")][-1])
    assert schedule.params["ratios"] == pytest.approx(theirs, abs=1e-6)
    assert schedule.step_kinds().count("cached") >= 1  # the calibrated schedule resolves


def test_calibrate_fits_teacache_on_what_the_policy_reads(digits):
    import numpy as np

    kw = dict(class_labels=LABELS, null_class=DIGITS_CONFIG.null_class, sample_size=16, in_channels=1, num_steps=STEPS)
    schedule, measured = cc.calibrate(digits, cc.Schedule.teacache(0.1, None, num_steps=STEPS), kw, num_samples=1, report=True)
    # independently: block 0's attention input and the model output of an uncached run
    seen = {"m": [], "y": []}
    m = copy.deepcopy(digits)
    m.transformer_blocks[0].attn1.register_forward_pre_hook(lambda mod, args, kwargs: seen["m"].append(args[0]), with_kwargs=True)

    def model(**call):
        out = m(**call)
        seen["y"].append(out[0])
        return out

    model.parameters = m.parameters
    ddim_sample(model, LABELS, **_sample_kwargs(digits))
    rel = lambda a, b: ((a - b).abs().mean() / b.abs().mean()).item()  # noqa: E731
    xs = [rel(c, p) for p, c in zip(seen["m"], seen["m"][1:])]
    ys = [rel(c, p) for p, c in zip(seen["y"], seen["y"][1:])]
    assert measured["input_change"] == pytest.approx(xs, abs=1e-6)
    assert measured["output_change"] == pytest.approx(ys, abs=1e-6)
    assert schedule.params["coefficients"] == pytest.approx(list(np.polyfit(xs, ys, 4)), rel=1e-4)
    cached, _ = _run(digits, schedule)
    assert "cached" in cached.decisions


def test_flops_are_counted_on_the_branch_taken(dit):
    """torch's FlopCounterMode counts the larger branch of a cond and returns the true branch's
    output whatever the predicate; the bench's counter counts (and returns) the branch taken."""
    from cachecompile.tools.measure import PerStep

    schedule = cc.Schedule.dbcache(0.3, compute_first=1, compute_last=1, warmup_steps=2, num_steps=STEPS)
    cached, (expected,) = _run(dit, schedule)
    counted = PerStep(cached, dit, flops=True)
    got = ddim_sample(counted, LABELS, **_sample_kwargs(dit))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # a counted run computes what an uncounted one does
    full = max(counted.values)
    assert ["full" if v == full else "cached" for v in counted.values] == cached.decisions
    assert 0 < min(counted.values) < full


def test_a_dynamic_schedule_is_a_drop_in_for_dit_pipeline():
    """In a diffusers pipeline (tiny random components): threshold 1 reuses at every step after
    the warm-up (cache-dit's rule), so the decisions are known; two identical generations give
    identical images (no state leaks), and the image differs from the uncached one."""
    pytest.importorskip("transformers")
    from diffusers import DiTPipeline

    from tests.pipelines._components import dit_components, images

    steps = 5
    pipe = DiTPipeline(**dit_components())
    pipe.set_progress_bar_config(disable=True)
    args = lambda: dict(class_labels=[1, 3], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),  # noqa: E731
                        output_type="np")
    uncached = images(pipe, args())
    cc.optimize(pipe, cc.Schedule.dbcache(1.0, warmup_steps=2, num_steps=steps))
    first, second = images(pipe, args()), images(pipe, args())
    assert pipe.transformer.decisions == ["full", "full", "cached", "cached", "cached"]
    assert (first - second).abs().max() == 0
    assert (first - uncached).abs().max() > 1e-4
