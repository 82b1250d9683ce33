"""The quality study's tools: metrics with intervals, candidate schedules, the tuner."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample
from cachecompile.tools import stats as S
from cachecompile.tools.candidates import Calibrator, SampleSetup, build_schedule, calibrated_mask, calibrated_steps
from cachecompile.tools.specs import SpecError, parse_schedule, uniform_steps


def _images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale


def test_metrics_clamp_to_the_value_range_and_pair_the_bootstrap():
    labels = torch.arange(40) % 10
    ref = _images(40, 0)
    near = ref + 0.05 * _images(40, 1)
    far = ref + 0.20 * _images(40, 2)
    # values outside [-1, 1] are clamped before any metric, as a pipeline's postprocessing does
    overshoot = near.clone()
    overshoot[near > 0.9] = 5.0
    assert np.allclose(S.per_sample(overshoot, labels, ref).abs_err, S.per_sample(overshoot.clamp(-1, 1), labels, ref).abs_err)
    r, a, b = (S.per_sample(x, labels, ref) for x in (ref, near, far))
    real = S.fd_stats(r.features)
    s = S.summarize(a, r, real, boot=200)
    assert s["rel_l1"]["lo"] <= s["rel_l1"]["value"] <= s["rel_l1"]["hi"]
    assert s["rel_l1"]["value"] == pytest.approx(float(a.abs_err.sum() / r.ref_abs.sum()))
    d = S.paired_difference(a, b, r, "rel_l1", boot=200)
    assert d["hi"] < 0  # near is closer than far, on the same samples
    same = S.paired_difference(a, a, r, "rel_l1", boot=50)
    assert (same["value"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)


def test_uniform_fora_at_any_cost_matches_fora_where_it_can(dit, labels, sample_kwargs):
    assert uniform_steps(12, 3) == [0, 4, 8] and uniform_steps(50, 17)[:4] == [0, 2, 5, 8]
    uniform = parse_schedule("uniform:3", 12, 3)
    expected = ddim_sample(cc.optimize(dit, cc.Schedule.fora(12, 4)), labels, **sample_kwargs)
    assert torch.equal(ddim_sample(cc.optimize(dit, uniform), labels, **sample_kwargs), expected)


@pytest.fixture(scope="module")
def calibrator(dit):
    setup = SampleSetup(steps=12, null_class=10, sample_size=8, in_channels=4, num_classes=10)
    return Calibrator(dit, setup, labels=torch.tensor([1, 7]), seeds=(1000,))


def test_calibrated_steps_and_masks_spend_the_asked_budget(calibrator):
    steps = calibrated_steps(calibrator, 5)
    full = [s for s, row in enumerate(steps.mask) if all(all(f) for f in row)]
    assert len(full) == 5 and full[0] == 0
    assert all(not any(any(f) for f in row) for s, row in enumerate(steps.mask) if s not in full)  # the others reuse all
    mask = np.array(calibrated_mask(calibrator, 0.5).mask)
    assert mask[0].all()  # every branch computes at step 0
    assert 0.35 < 1 - mask.mean() < 0.65


def test_tune_returns_the_best_candidate_at_the_target(dit, calibrator, tmp_path):
    setup = calibrator.setup
    result = cc.tune(dit, 2.0, setup=setup, generations=1, labels=torch.tensor([1, 7]), out=tmp_path / "t.json",
                     bases=["uniform:6", "uniform:5", "steps:cal:5", "uniform:8"], compensations=("taylor1",))
    specs = {c.spec: c for c in result.candidates}
    assert "uniform:8" not in specs  # below the target: 12 steps with 8 full ones is 1.5×
    assert all(c.flops_ratio >= 2.0 for c in result.candidates)
    assert result.best.fidelity == min(c.fidelity for c in result.candidates)
    assert cc.Schedule.load(tmp_path / "t.json") == result.schedule
    # its fidelity is measured: rerunning the chosen schedule reproduces it
    assert calibrator.fidelity(result.schedule) == pytest.approx(result.best.fidelity, rel=1e-6)
    assert "**← chosen**" in result.table()


def test_calibrated_specs_need_a_calibrator_and_use_it(calibrator):
    for spec in ("mask:cal:0.5", "steps:cal:5", "fora:3+eoc", "fora:3+gocu"):
        with pytest.raises(SpecError, match="calibrat"):
            parse_schedule(spec, 12, 3)
    assert parse_schedule("fora:3+goc", 12, 3).compensation == cc.GOC(0.5, queue="computed")  # the fixed default
    assert parse_schedule("fora:3+gocu:0.5", 12, 3).compensation == cc.GOC(0.5, queue="used")
    steps = build_schedule("steps:cal:5", calibrator)
    assert steps == calibrated_steps(calibrator, 5) and build_schedule("steps:cal:5", calibrator) is steps
    goc = build_schedule("fora:3+goc", calibrator).compensation  # the weight is calibrated here
    assert goc.queue == "computed" and goc.weight in (0.25, 0.5, 0.75, 1.0)


def test_labelled_schedule_files(tmp_path):
    from cachecompile.tools.specs import spec_label

    path = tmp_path / "mine.json"
    cc.Schedule.fora(12, 3).save(path)
    assert parse_schedule(f"best={path}", 12) == parse_schedule(str(path), 12) == cc.Schedule.fora(12, 3)
    assert spec_label(f"best={path}") == "best" and spec_label(str(path)) == str(path)


def test_study_report_verdicts_families_and_fronts():
    from cachecompile.tools.study_report import family, outcome, pareto, verdict

    assert outcome({"lo": -0.02, "hi": -0.01}) == "A better" and outcome({"lo": 0.01, "hi": 0.02}) == "B better"
    assert outcome({"lo": -0.01, "hi": 0.01}) == "no difference detected"
    assert outcome({"lo": 0.0, "hi": 3e-9}).startswith("no difference")  # the same samples: a numerical tie
    assert verdict("matches", {"lo": -0.01, "hi": 0.01}).startswith("**reproduced**")
    assert verdict("beats", {"lo": -0.01, "hi": 0.01}).startswith("**not reproduced**")
    assert [family(s) for s in ("uniform:20", "steps:cal:17", "fora:3+gocu", "tuned=dir/dpm++2m/t.json", "none@1")] == [
        "FORA", "FORA, calibrated steps", "+ GOC (used)", "cc.tune", "uncached, other noise"]
    assert pareto([(2.0, 0.02, "a"), (2.5, 0.03, "b"), (2.9, 0.021, "c")]) == [(2.0, 0.02, "a"), (2.9, 0.021, "c")]
