"""Calibration: inflections, EOC priors and judgment from the uncached model; the schedule file."""

from __future__ import annotations

import math

import pytest
import torch

import cachecompile as cc
from cachecompile.calibration import Calibration, find_inflections, measure
from cachecompile.methods.compensation import GOC
from cachecompile.sampling import ddim_sample
from tests.methods.test_compensation import TOY_REGIONS, Toy, toy_inputs

TURN = 5  # the planted trajectory f(t) = −|t − TURN| rises until TURN and falls after it


def planted_toy():
    # attn output: lin(x) + f(t)·v turns at TURN; mlp output: t·w never turns
    return Toy(lambda t: -(t - TURN).abs(), lambda t: t, blocks=1, mlp_weight=False)


def toy_sampler(steps=12):
    x = toy_inputs()

    def run(model, i):
        out = None
        for s in range(steps):
            out = model(x + i, torch.full((2,), float(s)))
        return out

    return run


def eager_features(model, run, num_samples, module):
    """Independent record: forward hook on the module, one list of outputs per sample."""
    feats = []
    handle = module.register_forward_hook(lambda m, a, out: feats.append(out.detach().clone()))
    try:
        for i in range(num_samples):
            run(model, i)
    finally:
        handle.remove()
    steps = len(feats) // num_samples
    return [feats[i * steps : (i + 1) * steps] for i in range(num_samples)]


def test_find_inflections_on_a_synthetic_cosine_sequence():
    nan = float("nan")
    cos = [nan, nan, 0.95, 0.9, -0.7, 0.2, -0.01, 0.99]
    assert find_inflections(cos) == (4, 6)
    assert find_inflections(cos, cos_threshold=0.5) == (4, 5, 6)
    assert find_inflections(cos, cos_threshold=-0.9) == ()


def test_planted_inflection_is_found():
    toy = planted_toy()
    cal = measure(toy, cc.Schedule.fora(12, 4), toy_sampler(), num_samples=2, regions=TOY_REGIONS)
    # increments are +v up to step TURN and −v after: step TURN + 1 is the first that turned
    assert cal.inflections() == {"blocks.0.attn": (TURN + 1,), "blocks.0.mlp": ()}
    assert cal.cosine["blocks.0.attn"][TURN + 1] == pytest.approx(-1.0)
    assert math.isnan(cal.cosine["blocks.0.attn"][1])  # needs two differences
    assert cal.num_trajectories == 2


def test_calibrated_goc_skips_the_inflection_and_round_trips(tmp_path):
    toy = planted_toy()
    base = cc.Schedule.fora(12, 4)
    sched = cc.calibrate(toy, base, toy_sampler(), num_samples=2, compensation=cc.GOC(0.8, queue="computed"), regions=TOY_REGIONS)
    assert sched.compensation == cc.GOC(0.8, queue="computed", skip_steps={"blocks.0.attn": (TURN + 1,)})
    assert sched.method == base.method and sched.params == base.params
    path = tmp_path / "calibrated.json"
    sched.save(path)
    back = cc.Schedule.load(path)
    assert back == sched
    # the loaded schedule runs, and applies no gradient at the inflection step
    cached = cc.optimize(toy, back, regions=TOY_REGIONS)
    toy_sampler()(cached, 0)
    values = back.compensation.step_values(cached.plans)
    assert values["goc_c1:blocks.0.attn"][TURN + 1] == values["goc_c1:blocks.0.attn"][TURN]  # 4→5 counted, 6 skipped
    assert values["goc_c1:blocks.0.mlp"][TURN + 1] > values["goc_c1:blocks.0.mlp"][TURN]


@pytest.mark.parametrize("form", ["channel", "full"])
def test_eoc_prior_is_the_mean_trend(form):
    toy = Toy(lambda t: t * t, lambda t: t, blocks=2)
    run = toy_sampler()
    cal = measure(toy, cc.Schedule.fora(12, 3), run, num_samples=3, regions=TOY_REGIONS, prior=form)
    feats = eager_features(toy, run, 3, toy.blocks[1].attn)
    mean = torch.stack([torch.stack(f) for f in feats]).double().mean(0)  # [steps, B, T, C]
    if form == "channel":
        mean = mean.flatten(1, 2).mean(1)  # [steps, C]
    trend = torch.cat([torch.zeros_like(mean[:1]), mean[1:] - mean[:-1]]).float()
    got = cal.trend["blocks.1.attn"]
    assert got.shape == trend.shape == ((12, 4) if form == "channel" else (12, 2, 3, 4))
    torch.testing.assert_close(got, trend, rtol=0, atol=1e-5)


def test_eoc_judgment_selects_cached_steps_with_large_error():
    toy = Toy(lambda t: t * t, lambda t: t, blocks=2)
    run, sched = toy_sampler(), cc.Schedule.fora(12, 3)
    cal = measure(toy, sched, run, num_samples=2, regions=TOY_REGIONS)
    feats = eager_features(toy, run, 2, toy.blocks[0].mlp)
    expected = []
    for s in range(12):
        if s % 3 == 0:
            expected.append(float("nan"))
            continue
        c = s - s % 3
        errs = [((f[s] - f[c]).abs().mean() / f[s].abs().mean()).item() for f in feats]
        expected.append(sum(errs) / len(errs))
    got = cal.error["blocks.0.mlp"]
    for g, e in zip(got, expected):
        assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e, rel=1e-5)
    ordered = sorted(e for e in expected if not math.isnan(e))
    threshold = (ordered[3] + ordered[4]) / 2  # between two measured errors: no ties
    judged = cal.judged(threshold)["blocks.0.mlp"]
    assert judged == tuple(s for s, e in enumerate(expected) if not math.isnan(e) and e > threshold)
    assert len(judged) == 4
    eoc = cal.apply(sched, cc.EOC(theta=0.02), error_threshold=threshold).compensation
    assert eoc.threshold == threshold and dict(eoc.judged)["blocks.0.mlp"] == judged
    assert eoc.prior_tensor("blocks.0.mlp").shape == (12, 4)


def test_calibrate_a_dit_with_ddim_inputs_and_run_the_result(dit, labels, sample_kwargs, tmp_path):
    inputs = {k: v for k, v in sample_kwargs.items() if k not in ("num_steps", "seed")} | {"class_labels": labels}
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    sched = cc.calibrate(dit, cc.Schedule.fora(12, 3), inputs, num_samples=1, compensation=cc.EOC(theta=0.05))
    assert all(torch.equal(state[k], v) for k, v in dit.state_dict().items())
    assert not dit._forward_hooks and not dit.transformer_blocks[0].attn1._forward_hooks
    eoc = sched.compensation
    assert sorted(eoc.priors) == [f"blocks.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
    assert eoc.prior_tensor("blocks.0.attn").shape == (12, 16)
    path = tmp_path / "eoc.json"
    sched.save(path)
    back = cc.Schedule.load(path)
    assert back == sched
    cached = cc.optimize(dit, back)
    out = ddim_sample(cached, labels, **sample_kwargs)
    assert torch.equal(out, ddim_sample(cached, labels, **sample_kwargs))
    plain = ddim_sample(cc.optimize(dit, cc.Schedule.fora(12, 3)), labels, **sample_kwargs)
    assert (out - plain).abs().max() > 1e-5


def test_goc_weight_search_keeps_the_best_weight(dit, labels, sample_kwargs, uncached_samples):
    inputs = {k: v for k, v in sample_kwargs.items() if k not in ("num_steps",)} | {"class_labels": labels}
    sched, cal = cc.calibrate(
        dit, cc.Schedule.fora(12, 3), inputs, num_samples=1, compensation=GOC(queue="computed"),
        weights=(0.0, 0.5, 1.0), report=True,
    )
    assert sorted(cal.search) == [0.0, 0.5, 1.0]
    assert sched.compensation.weight == min(cal.search, key=cal.search.get)
    # weight 0 is plain caching: its score is FORA's own distance to the uncached samples
    fora = ddim_sample(cc.optimize(dit, cc.Schedule.fora(12, 3)), labels, **sample_kwargs)
    assert cal.search[0.0] == pytest.approx(((fora - uncached_samples).abs().mean() / uncached_samples.abs().mean()).item(), rel=1e-5)


def test_calibration_errors_are_clear_and_leave_the_model_alone():
    toy = planted_toy()
    with pytest.raises(ValueError, match="not 12 steps"):
        measure(toy, cc.Schedule.fora(12, 4), toy_sampler(steps=10), num_samples=1, regions=TOY_REGIONS)
    with pytest.raises(cc.ScheduleError, match="reuses no region"):
        measure(toy, cc.Schedule.fora(12, 1), toy_sampler(), num_samples=1, regions=TOY_REGIONS)
    with pytest.raises(ValueError, match="say which compensation"):
        cc.calibrate(toy, cc.Schedule.fora(12, 4), toy_sampler(), num_samples=1, regions=TOY_REGIONS)
    with pytest.raises(TypeError, match="sample_inputs must be"):
        measure(toy, cc.Schedule.fora(12, 4), [1, 2], regions=TOY_REGIONS)
    with pytest.raises(ValueError, match="searches GOC"):
        cc.calibrate(toy, cc.Schedule.fora(12, 4), toy_sampler(), 1, compensation="eoc", weights=(1.0,), regions=TOY_REGIONS)
    assert not any(m._forward_hooks for m in toy.modules())


def test_cc_calibrate_is_the_function_after_the_module_import():
    import cachecompile.calibration as mod

    assert cc.calibrate is mod.calibrate
    assert isinstance(mod.Calibration, type) and Calibration is mod.Calibration


def test_cli_writes_a_calibrated_schedule(tmp_path, capsys):
    from cachecompile.__main__ import main

    out = tmp_path / "s.json"
    argv = ["calibrate", "--model", "tiny", "--schedule", "fora:3", "--steps", "6", "--samples", "1", "--batch", "1",
            "--compensation", "eoc", "--theta", "0.02", "--out", str(out)]
    assert main(argv) == 0
    sched = cc.Schedule.load(out)
    assert sched.num_steps == 6 and sched.params["interval"] == 3
    assert sched.compensation.theta == 0.02 and len(sched.compensation.priors) == 8
    assert "inflection steps" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="say which compensation"):
        main(["calibrate", "--model", "tiny", "--schedule", "fora:3", "--steps", "6", "--out", str(out)])
