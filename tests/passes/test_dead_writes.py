"""Cache writes no step reads are dropped, and a partial recompute's scatter then sinks below
the elementwise ops that consume it; results stay bit-identical."""

import pytest
import torch

import cachecompile as cc
import cachecompile.compile.driver
from cachecompile.sampling import ddim_sample
from cachecompile.passes import counters
from cachecompile.core.program import StepIO
from cachecompile.passes.cache_io import cache_io
from cachecompile.passes.dead_writes import dead_cache_writes

SCATTER = torch.ops.aten.scatter.src


def _io(reads, writes):
    return StepIO(cache_inputs=list(reads), cache_outputs=list(writes))


def test_a_write_is_dead_when_overwritten_before_any_read_or_never_read():
    full = _io([], ["a", "b", "s"])
    partial = _io(["a", "b"], ["b", "s"])  # reads b, updates it
    reuse = _io(["s"], [])
    # full, partial, reuse, full …: partial's b is overwritten by full before anyone reads it;
    # full's s is overwritten by partial before reuse reads it
    assert dead_cache_writes([full, partial, reuse], [0, 1, 2, 0, 1, 2]) == [{"s"}, {"b"}, set()]
    # full, partial, reuse, partial: the second partial reads the first one's b
    assert dead_cache_writes([full, partial, reuse], [0, 1, 2, 1]) == [{"s"}, set(), set()]
    # a graph keeps a write that is live at one of its steps and dead at another
    assert dead_cache_writes([full, reuse], [0, 1, 0]) == [{"a", "b"}, set()]
    # the last step's writes are dead: the next generation starts over
    assert dead_cache_writes([_io([], ["a"])], [0]) == [{"a"}]


def _io_of(cached, kind):
    return next(cache_io(gm) for plan, gm in cached.step_graphs.items() if cached.schedule.step_kinds()[cached.plans.index(plan)] == kind)


@pytest.fixture(scope="module")
def duca3(dit):
    from tests.conftest import dit_inputs

    return cc.optimize(dit, cc.Schedule.duca(12, 3, 0.3)).prepare(**dit_inputs())


def test_duca_interval_3_keeps_only_what_a_later_step_reads(dit, duca3):
    from tests.conftest import dit_inputs

    layers = dit.config.num_layers
    mlp = {f"blocks.{i}.mlp" for i in range(layers)}
    full, conservative = _io_of(duca3, "full"), _io_of(duca3, "conservative")
    # conservative → aggressive (reads the stack only) → full (overwrites the MLP caches)
    assert conservative.cache_outputs == ["stack"]
    assert mlp <= set(conservative.cache_inputs)
    assert "stack" not in full.cache_outputs and mlp <= set(full.cache_outputs)
    # at interval 4 the second conservative step reads the first one's MLP caches
    duca4 = cc.optimize(dit, cc.Schedule.duca(12, 4, 0.3)).prepare(**dit_inputs())
    assert mlp <= set(_io_of(duca4, "conservative").cache_outputs)


def test_the_conservative_scatter_sinks_below_the_gated_residual(duca3):
    gm = next(gm for plan, gm in duca3.step_graphs.items() if duca3.schedule.step_kinds()[duca3.plans.index(plan)] == "conservative")
    scatters = [n for n in gm.graph.nodes if n.target == SCATTER]
    assert scatters
    for s in scatters:
        # the scatter writes the residual stream, not an updated cache: its base is an add,
        # and nothing multiplies the scattered tensor by a gate any more
        assert s.args[0].target == torch.ops.aten.add.Tensor
        assert not [u for u in s.users if u.target == torch.ops.aten.mul.Tensor]


@pytest.mark.parametrize(
    "schedule", [cc.Schedule.duca(12, 3, 0.3), cc.Schedule.duca(12, 3, 0.5, "v_norm+0.25*staleness", aggressive_reuse="residual")]
)
def test_results_are_bit_identical_without_the_schedule_wide_passes(dit, labels, sample_kwargs, monkeypatch, schedule):
    before = (counters["dead_cache_writes"], counters["scatters_sunk"])
    finished = ddim_sample(cc.optimize(dit, schedule), labels, **sample_kwargs)
    assert counters["dead_cache_writes"] > before[0] and counters["scatters_sunk"] > before[1]
    monkeypatch.setattr(cachecompile.compile.driver, "finish_step_graphs", lambda graphs, graph_of_step, *storage: None)
    plain = cc.optimize(dit, schedule)
    assert torch.equal(ddim_sample(plain, labels, **sample_kwargs), finished)
