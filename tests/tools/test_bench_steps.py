"""The bench's per-step figures add up to its measured run times (issue 14, item 11).

The per-step times come from instrumented runs (a timer around each transformer call), each one
right after a timed run of the same configuration; the timed runs carry no instrumentation. On a
tiny DiT (4 steps, 9 rounds, eager, one thread as the bench runs on a CPU):

* every instrumented run holds its calls, and the reported figures are those of the median
  instrumented run: Σ per-step + the rest = its run time, exactly;
* the instrumented runs take what the timed runs take: per round, instrumented ÷ timed has a
  median within [0.67, 1.5] (the timer costs microseconds per call; a round's two runs are
  adjacent, so a load change between rounds moves both);
* so the per-step figures never claim more than the timed total: Σ per-step ≤ 1.5 × the timed
  median (before, a per-step run made apart from the timed ones, with two threads on a
  loaded 2-CPU machine, summed to 13× it).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from cachecompile.tools.bench import markdown_report, run_bench

ROUNDS = 9


@pytest.fixture(scope="module")
def result() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `python -m cachecompile bench` on a CPU (see its --threads)
    try:
        return run_bench(
            "tests.conftest:make_dit", ["fora:2"], ["eager"], steps=4, batch=2, repeats=ROUNDS,
            peers=[], handwritten=False, quality_samples=0, progress=False,
        )
    finally:
        torch.set_num_threads(threads)


def _rows(result):
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in rows} == {"uncached", "cachecompile"}
    return rows


def test_each_instrumented_run_holds_its_calls(result):
    for r in _rows(result):
        assert len(r["runs"]) == len(r["instrumented_runs"]) == len(r["step_runs"]) == ROUNDS
        for total, calls in zip(r["instrumented_runs"], r["step_runs"]):
            assert len(calls) == 4
            assert 0 < sum(calls) <= total
        assert r["calls_seconds"] == pytest.approx(sum(r["step_seconds"]))


def test_the_per_step_figures_add_up_to_the_median_instrumented_run(result):
    for r in _rows(result):
        assert r["instrumented_seconds"] == statistics.median(r["instrumented_runs"])  # an odd count of runs
        median_run = r["step_runs"][r["instrumented_runs"].index(r["instrumented_seconds"])]
        assert r["step_seconds"] == median_run
        assert r["calls_seconds"] + r["outside_seconds"] == pytest.approx(r["instrumented_seconds"], rel=1e-12)
        assert r["outside_seconds"] > 0


def test_instrumented_runs_take_what_the_timed_runs_take(result):
    for r in _rows(result):
        ratio = statistics.median(i / t for i, t in zip(r["instrumented_runs"], r["runs"]))
        assert 0.67 <= ratio <= 1.5, f"{r['label']}: instrumented / timed = {ratio:.2f}"
        assert r["calls_seconds"] <= 1.5 * r["seconds"], f"{r['label']}: calls {r['calls_seconds']:.4f} s, run {r['seconds']:.4f} s"


def test_the_table_says_what_the_per_step_figures_are(result):
    text = markdown_report(result)
    assert f"in the median of {ROUNDS} instrumented runs" in text
    assert "| calls (s) | rest (s) | instrumented run (s) | timed run (s) |" in text
    row = next(r for r in _rows(result) if r["impl"] == "cachecompile")
    line = next(ln for ln in text.splitlines() if ln.startswith("| cachecompile | fora:2 | eager | full"))
    assert line.endswith(f"| {row['calls_seconds']:.3f} | {row['outside_seconds']:.3f} | {row['instrumented_seconds']:.3f} | {row['seconds']:.3f} |")
