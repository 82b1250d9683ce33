"""The quality report on the shipped digits model (tiny run: 4 samples, 4 steps)."""

import argparse
import json

import pytest
import torch

import cachecompile as cc
from cachecompile.tools.quality_report import quality_main
from cachecompile.tools.specs import SpecError, parse_schedule


def test_build_schedule_parses_every_form(tmp_path):
    assert parse_schedule("fora:3", 12, 6) == cc.Schedule.fora(12, 3)
    goc = parse_schedule("fora:4+goc", 12, 6)
    assert goc.compensation is not None and goc.compensation.kind == "goc"
    mask = parse_schedule("mask:deep-half", 4, 6)
    assert mask.mask[0] == ((True, True),) * 6
    assert mask.mask[1] == ((True, True),) * 3 + ((False, False),) * 3
    path = tmp_path / "s.json"
    cc.Schedule.fora(12, 2).save(path)
    assert parse_schedule(str(path), 12, 6) == cc.Schedule.fora(12, 2)
    with pytest.raises(SpecError, match="not an integer"):
        parse_schedule("fora:4+magic", 12, 6)
    assert parse_schedule("fora:3@bf16", 12) == cc.Schedule.fora(12, 3, cache_dtype=torch.bfloat16)
    assert parse_schedule("duca:3:0.3:v_norm+0.25*staleness@float8_e4m3fn", 12) == \
        cc.Schedule.duca(12, 3, 0.3, "v_norm+0.25*staleness", cache_dtype=torch.float8_e4m3fn)
    assert parse_schedule("fora:4+taylor1@fp16", 12).compensation is not None
    with pytest.raises(cc.ScheduleError, match="cache_dtype must be one of"):
        parse_schedule("fora:3@int8", 12)
    with pytest.raises(SpecError, match="fora:3@bf16"):
        parse_schedule("fora:3@", 12)


def test_report_writes_table_json_and_pictures(tmp_path, capsys):
    args = argparse.Namespace(schedule=["fora:2", "fora:2+taylor1"], quality_samples=4, steps=4, cfg=2.0,
                              no_progress=True, out=str(tmp_path), no_plots=False)
    assert quality_main(args) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    rows = {r["schedule"]: r for r in result["rows"]}
    assert list(rows) == ["none", "fora:2", "fora:2+taylor1"]
    assert rows["none"]["rel_l1"] == 0 and rows["none"]["ssim"] == pytest.approx(1.0)
    # 4 steps of FORA:2: two full and two cached steps, so between 1× and 2× fewer FLOPs
    assert 1.2 < rows["fora:2"]["flops_ratio"] < 2.0
    assert rows["fora:2"]["rel_l1"] > 0 and rows["fora:2"]["step_graphs"] == 2
    assert rows["fora:2+taylor1"]["rel_l1"] != rows["fora:2"]["rel_l1"]
    assert (tmp_path / "quality_pareto.png").stat().st_size > 0
    assert (tmp_path / "quality_samples.png").stat().st_size > 0
    assert "| fora:2 |" in (tmp_path / "quality.md").read_text()


def test_quality_report_with_dpm_solver(tmp_path):
    args = argparse.Namespace(schedule=["fora:2"], quality_samples=4, steps=4, cfg=2.0, no_progress=True,
                              out=str(tmp_path), no_plots=True, solver="dpm++2m")
    assert quality_main(args) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["solver"] == "dpm++2m"
    row = result["rows"][1]
    assert row["ci"]["rel_l1"][0] <= row["rel_l1"] <= row["ci"]["rel_l1"][1]
    assert "DPM-Solver++ (2M)" in (tmp_path / "quality.md").read_text()
