"""The bench's dynamic rows: a dbcache schedule labelled by its own decisions, its FLOPs counted on
the branch taken, and the peers that run the same policy (cache-dit, diffusers' FBC) configured
from the schedule, with their decisions compared. One tiny eager run; no test asserts a timing."""

from __future__ import annotations

import importlib.util

import pytest

import cachecompile as cc
from cachecompile.tools.bench import markdown_report, run_bench
from cachecompile.tools.bench.report import decisions_of
from cachecompile.tools.peers import matches_schedule
from cachecompile.tools.specs import SpecError, parse_schedule

MODEL = "tests.conftest:make_dit"
STEPS = 6
HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


@pytest.fixture(scope="module")
def result() -> dict:
    peers = ["fbc", "cache-dit"] if HAS_CACHE_DIT else ["fbc"]
    return run_bench(MODEL, ["dbcache:0.3"], ["eager"], steps=STEPS, batch=2, repeats=1, peers=peers,
                     handwritten=False, quality_samples=0, progress=False)


def _row(result: dict, impl: str) -> dict:
    (row,) = [r for r in result["rows"] if r["impl"] == impl and r["schedule"] == "dbcache:0.3"]
    assert row["status"] == "ok", row["reason"]
    return row


def test_specs_name_the_dynamic_presets():
    assert parse_schedule("dbcache:0.1:2:1:3", 8) == cc.Schedule.dbcache(0.1, 2, 1, 3, num_steps=8)
    assert parse_schedule("fbc:0.2", 8) == cc.Schedule.dbcache(0.2, num_steps=8)
    assert parse_schedule("teacache:0.3", 8).params["coefficients"] is None  # calibrated by the bench
    assert parse_schedule("magcache:0.1:2", 8).params["max_skip_steps"] == 2
    with pytest.raises(SpecError, match="dbcache:threshold"):
        parse_schedule("dbcache", 8)


def test_peers_match_only_the_policy_they_implement():
    fbc = cc.Schedule.dbcache(0.1, num_steps=4)
    db = cc.Schedule.dbcache(0.1, 1, 1, num_steps=4)
    assert matches_schedule("fbc", fbc) and not matches_schedule("fbc", db)
    assert matches_schedule("cache-dit", db) and not matches_schedule("cache-dit", cc.Schedule.fora(4, 2))


def test_dynamic_row_is_labelled_by_its_decisions_and_counted_on_the_branch_taken(result):
    row = _row(result, "cachecompile")
    decisions = row["info"]["decisions"]
    assert row["step_kinds"] == decisions and "cached" in decisions and decisions[0] == "full"
    assert row["graph_breaks"] == 0 and row["recompiles"] == 0 and row["step_graphs"] == 2
    full = max(row["step_flops"])
    assert [f == full for f in row["step_flops"]] == [d == "full" for d in decisions]
    assert row["per_kind"]["cached"]["count"] == decisions.count("cached")


def test_peers_run_the_schedules_settings_and_make_its_decisions(result):
    ours = decisions_of(_row(result, "cachecompile"))
    peers = ["fbc", "cache-dit"] if HAS_CACHE_DIT else ["fbc"]
    for name in peers:
        peer = _row(result, name)
        assert decisions_of(peer) == ours, name
        assert "0.3" in peer["info"].get("peer", "") or "0.3" in peer["label"]
        full = max(peer["step_flops"])
        assert [f < full for f in peer["step_flops"]] == [d == "cached" for d in ours]  # its FLOPs drop where ours do
    targets = [t for t in result["targets"] if "same decisions" in t["target"]]
    assert len(targets) == len(peers) and all("decisions identical" in t["measured"] for t in targets)
    report = markdown_report(result)
    assert "Decisions of the dynamic rows" in report and f"`{''.join('F' if d == 'full' else 'C' for d in ours)}`" in report
