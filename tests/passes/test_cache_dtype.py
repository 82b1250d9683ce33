"""Low-precision cache storage (``cache_dtype``): where the casts are, and cached runs against an
eager reference that rounds the cached branch outputs through the same dtype."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import cachecompile as cc
from cachecompile.runtime.cache_store import CacheStore
from cachecompile.sampling import ddim_sample
from tests.conftest import CountingModel, NULL_CLASS, StepCounter, make_dit

STEPS = 7
SAMPLE = dict(num_steps=STEPS, guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4, seed=0)
LABELS = torch.tensor([1, 7])
TO_COPY = torch.ops.aten._to_copy.default


@pytest.fixture(scope="module")
def model():
    return make_dit(num_layers=2)


class RoundedReuse(torch.nn.Module):
    """Runs ``inner`` at FORA's full steps and keeps its output rounded through ``dtype``; other
    steps return the kept value, back in the output's dtype."""

    def __init__(self, inner: torch.nn.Module, counter: StepCounter, interval: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.counter, self.interval, self.dtype, self.kept = inner, counter, interval, dtype, None

    def forward(self, *args, **kwargs):
        if self.counter.step % self.interval == 0:
            out = self.inner(*args, **kwargs)
            self.kept = out.to(self.dtype)
            return out  # the full step itself uses the value it computed
        return self.kept.to(torch.float32)


def rounded_fora_reference(model: torch.nn.Module, interval: int, dtype: torch.dtype) -> CountingModel:
    ref = copy.deepcopy(model)
    counter = StepCounter()
    for block in ref.transformer_blocks:
        block.attn1 = RoundedReuse(block.attn1, counter, interval, dtype)
        block.ff = RoundedReuse(block.ff, counter, interval, dtype)
    return CountingModel(ref, counter)


def _cached_graph(cached) -> torch.fx.GraphModule:
    return next(gm for plan, gm in cached.step_graphs.items() if not plan.is_full)


def _full_graph(cached) -> torch.fx.GraphModule:
    return next(gm for plan, gm in cached.step_graphs.items() if plan.is_full)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_fora_matches_a_reference_that_rounds_the_cache(model, dtype):
    cached = cc.optimize(model, cc.Schedule.fora(interval=3, cache_dtype=dtype))
    got = ddim_sample(cached, LABELS, **SAMPLE)
    expected = ddim_sample(rounded_fora_reference(model, 3, dtype), LABELS, **SAMPLE)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and the rounding is really there: float32 storage gives another result
    plain = ddim_sample(cc.optimize(model, cc.Schedule.fora(interval=3)), LABELS, **SAMPLE)
    assert (got - plain).abs().max() > 1e-5


def test_casts_sit_at_the_cache_io_and_compute_stays_float32(model):
    low = cc.optimize(model, cc.Schedule.fora(STEPS, 3, cache_dtype=torch.bfloat16))
    high = cc.optimize(model, cc.Schedule.fora(STEPS, 3))
    ddim_sample(low, LABELS, **SAMPLE)
    ddim_sample(high, LABELS, **SAMPLE)
    program = low.program
    n_user = len(program.example_inputs)
    for gm, io in zip(program.graphs, program.io):
        reads = gm.graph.find_nodes(op="placeholder")[n_user:n_user + len(io.cache_inputs)]
        for ph in reads:  # read: a bfloat16 placeholder, used only by a cast back to float32
            assert ph.meta["val"].dtype == torch.bfloat16
            assert [(u.target, u.kwargs["dtype"]) for u in ph.users] == [(TO_COPY, torch.float32)]
        outs = gm.graph.output_node().args[0][io.num_user_outputs:]
        for value in outs:  # write: a cast to bfloat16 of a float32 value
            assert value.target is TO_COPY and value.kwargs["dtype"] == torch.bfloat16
            assert value.args[0].meta["val"].dtype == torch.float32
        # each read is cast back just before its first use and each write right where it is computed,
        # so full-precision copies live only while used: compute runs between consecutive casts
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        for ph in reads:
            (back,) = ph.users
            assert order[back] < min(order[u] for u in back.users)
        for value in outs:
            assert order[value] == order[value.args[0]] + 1
        casts = sorted([order[next(iter(ph.users))] for ph in reads] + [order[v] for v in outs])
        assert all(b - a > 1 for a, b in zip(casts, casts[1:]))
        # nothing else is in bfloat16: the casts are the only low-precision values
        low_nodes = [n for n in gm.graph.nodes if n.op != "output" and getattr(n.meta.get("val"), "dtype", None) == torch.bfloat16]
        assert len(low_nodes) == len(io.cache_inputs) + len(io.cache_outputs)
    # the same graphs as float32 storage but for one cast per cache read and write
    for plan, gm in low.step_graphs.items():
        io = low.program.io[list(low.step_graphs).index(plan)]
        ref = high.step_graphs[plan]
        extra = len(io.cache_inputs) + len(io.cache_outputs)
        assert len(gm.graph.nodes) == len(ref.graph.nodes) + extra
        assert sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target is not TO_COPY) == \
            sorted(str(n.target) for n in ref.graph.nodes if n.op == "call_function" and n.target is not TO_COPY)
    assert len(_cached_graph(low).graph.find_nodes(op="placeholder")) > n_user  # the cached step reads the cache
    assert low.cache_bytes * 2 == high.cache_bytes


def test_all_compute_schedule_is_unaffected(model):
    cached = cc.optimize(model, cc.Schedule.fora(interval=1, cache_dtype=torch.float16))
    out = ddim_sample(cached, LABELS, **SAMPLE)
    assert torch.equal(out, ddim_sample(model, LABELS, **SAMPLE))
    gm = _full_graph(cached)
    assert not any(n.target is TO_COPY and n.kwargs.get("dtype") == torch.float16 for n in gm.graph.nodes)
    assert cached.cache_bytes == 0


def test_only_features_change_dtype(model):
    """Token scores and staleness (ToCa) and a dynamic schedule's probe and counters keep their
    dtype; the cached branch outputs and the dynamic residual are stored low."""
    stored = {}

    def record(store, call, items, caller=()):  # every value the store is given, as it is given
        items = list(items)
        stored.update((slot, value.dtype) for slot, value in items)
        return CacheStore.write_all(store, call, items, caller)

    toca = cc.optimize(model, cc.Schedule.toca(STEPS, 2, 0.5, score="v_norm+0.25*staleness", cache_dtype=torch.bfloat16))
    db = cc.optimize(model, cc.Schedule.dbcache(0.1, warmup_steps=1, num_steps=STEPS, cache_dtype=torch.bfloat16))
    for cached in (toca, db):
        cached._store.write_all = functools.partial(record, cached._store)
        ddim_sample(cached, LABELS, **SAMPLE)
    assert stored["blocks.0.mlp"] == stored["blocks.1.attn"] == stored["dynamic.residual"] == torch.bfloat16
    assert stored["blocks.0.attn@v_norm"] == stored["blocks.0.mlp@staleness"] == stored["dynamic.probe"] == torch.float32
    assert stored["dynamic.state"] == torch.float32 and stored["dynamic.decision"] == torch.bool
