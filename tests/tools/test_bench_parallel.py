"""``bench --context-parallel 2``: two spawned gloo ranks run diffusers' Wan with Ulysses degree 2,
uncached and with FORA; the bytes each rank sends per generation, as the bench counts them from the
step graphs, against the count from the model's shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", minversion="0.36")

from cachecompile.tools.bench.parallel import parallel_report, run_parallel_bench  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def result():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    return run_parallel_bench("wan", ["fora:3", "dbcache:0.1"], world=2, steps=STEPS, repeats=1, device="cpu")


def test_bytes_per_generation_follow_the_shapes(result):
    # Wan (the bench's configuration): 4 blocks; each self-attention sends q, k, v and its output
    # through an all-to-all, this rank's 128 of 4×8×8 tokens × 4 heads × 16, float32; the output
    # head gathers this rank's 128 tokens × 4 channels × 1×2×2 patch. Cross-attention sends nothing.
    attention = 4 * 4 * 128 * 64 * 4
    gather = 128 * 16 * 4
    none, fora, dbcache = result["rows"]
    assert none["schedule"] == "none" and none["bytes_per_rank"] == STEPS * (attention + gather)
    # FORA:3 over 4 steps computes steps 0 and 3; steps 1 and 2 reuse every attention: only the gather
    assert fora["bytes_per_rank"] == 2 * (attention + gather) + 2 * gather
    assert fora["uncached_bytes_per_rank"] == none["bytes_per_rank"]
    assert fora["saved"] == pytest.approx(1 - fora["bytes_per_rank"] / none["bytes_per_rank"])
    assert fora["decisions"] == ["full", "cached", "cached", "full"]
    assert 0 < fora["rel_l1"] < 1 and none["rel_l1"] == 0.0
    # Wan's own plan splits the sequence inside block 0, which DBCache's stack residual cannot pair
    assert "error" in dbcache and dbcache["error"].startswith("RegionError")


def test_report_is_a_table_with_every_schedule(result):
    report = parallel_report(result)
    assert "| fora:3 |" in report and "| none |" in report and "refused: RegionError" in report
    assert "gloo" in report and "Ulysses degree 2" in report


def test_bad_settings_are_refused_before_any_process_starts():
    with pytest.raises(SystemExit, match="wan"):
        run_parallel_bench("dit", ["fora:3"])
    with pytest.raises(SystemExit, match="2 or more"):
        run_parallel_bench("wan", ["fora:3"], world=1)
    with pytest.raises(Exception, match="interval must be"):
        run_parallel_bench("wan", ["fora:0"])
