"""The memory-traffic count behind the bench's efficiency bound: bytes of cache each step reads
and writes, and bytes of weights each step graph reads, against counts made by hand from the
tiny DiT's shapes; and the bound's arithmetic."""

from __future__ import annotations

import pytest
import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample
from cachecompile.tools.traffic import read_bandwidth, record_traffic, traffic_bound
from tests.conftest import NULL_CLASS, TINY_DIT, make_dit

STEPS = 4
BATCH = 2  # images; CFG doubles it
F32 = 4


def _generate(fn):
    return ddim_sample(fn, torch.arange(BATCH), num_steps=STEPS, null_class=NULL_CLASS,
                       sample_size=TINY_DIT["sample_size"], in_channels=TINY_DIT["in_channels"])


def _shapes():
    d = TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"]
    tokens = (TINY_DIT["sample_size"] // TINY_DIT["patch_size"]) ** 2
    return d, tokens, TINY_DIT["num_layers"], 2 * BATCH


def _cached_step_weight_bytes() -> int:
    """What a FORA cached step of the tiny DiT reads: the patch embedding and its positions,
    every block's embedder (timestep MLP; the label table's rows of the batch) and its two gate
    chunks of the adaLN linear (2 of 6), the output head."""
    d, tokens, blocks, batch = _shapes()
    p, c_in, c_out = TINY_DIT["patch_size"], TINY_DIT["in_channels"], TINY_DIT["out_channels"]
    patch = (d * c_in * p * p + d + tokens * d) * F32
    embedder = (256 * d + d + d * d + d) * F32 + batch * d * F32
    gates = 2 * (d * d + d) * F32
    head = (d * 2 * d + 2 * d + d * p * p * c_out + p * p * c_out) * F32
    return patch + blocks * (embedder + gates) + head


@pytest.fixture(scope="module")
def fora():
    model = make_dit()
    cached = cc.optimize(model, cc.Schedule.fora(STEPS, 2), "eager")
    with torch.no_grad():
        _generate(cached)
    return model, cached, record_traffic(cached, _generate)


def test_cache_bytes_per_step_are_the_slots_fora_writes_and_reads(fora):
    _, cached, calls = fora
    d, tokens, blocks, batch = _shapes()
    slots = 2 * blocks * batch * tokens * d * F32  # attn and mlp output per block
    assert [c["cache_write"] for c in calls] == [slots, 0, slots, 0]
    assert [c["cache_read"] for c in calls] == [0, slots, 0, slots]
    assert [c["graph"] for c in calls] == cached.program.graph_of_step
    assert sum(c["cache_write"] for c in calls[:1]) == cached.cache_bytes  # one generation's cache


def test_weight_bytes_count_the_slices_and_rows_a_step_reads(fora):
    model, _, calls = fora
    full, partial = calls[0]["weights"], calls[1]["weights"]
    assert partial == _cached_step_weight_bytes()
    # a full step reads every weight but the label tables' other rows
    tables = sum(b.norm1.emb.class_embedder.embedding_table.weight.nbytes for b in model.transformer_blocks)
    d, _, blocks, batch = _shapes()
    everything = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert full == everything - tables + blocks * batch * d * F32


def test_counting_again_gives_the_same_bytes_and_leaves_the_graphs_as_they_were(fora):
    _, cached, calls = fora
    placeholder = next(iter(cached.program.graphs[0].graph.nodes))
    placeholder.meta["tensor_meta"] = "kept"  # a value the graph had before: it stays
    before = [{n.name: set(n.meta) for n in gm.graph.nodes} for gm in cached.program.graphs]
    assert record_traffic(cached, _generate) == calls
    assert [{n.name: set(n.meta) for n in gm.graph.nodes} for gm in cached.program.graphs] == before
    assert placeholder.meta.pop("tensor_meta") == "kept"


def test_bound_is_the_ideal_time_over_ideal_plus_traffic():
    calls = [{"cache_write": 100, "cache_read": 0, "weights": 1000},
             {"cache_write": 0, "cache_read": 100, "weights": 300}]
    out = traffic_bound(calls, [10, 1], 10, uncached_seconds=2.0, flops_ratio=2 / 1.1, bandwidth=1000.0)
    # the cached step reads 300 B of weights, its FLOPs share is 100 B of them
    assert out["weight_bytes_beyond_flops"] == pytest.approx(200)
    assert out["added_seconds"] == pytest.approx(0.4)
    assert out["bound"] == pytest.approx(1.1 / (1.1 + 0.4))
    with pytest.raises(ValueError, match="2 recorded calls but 1 steps"):
        traffic_bound(calls, [10], 10, 2.0, 2.0, 1000.0)


def test_record_traffic_needs_a_program_and_restores_the_runners(fora):
    model, cached, _ = fora
    with pytest.raises(ValueError, match="has run"):
        record_traffic(cc.optimize(model, cc.Schedule.fora(STEPS, 2), "eager"), _generate)
    runners = list(cached.program.runners)

    def fails(fn):
        _generate(fn)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        record_traffic(cached, fails)
    assert cached.program.runners == runners


def test_read_bandwidth_is_a_positive_rate():
    assert read_bandwidth(mib=16, repeats=3) > 1e6
