"""The compensation pass: forecast and history graph structure, numerics of one step graph, and
the cache/prior tensors as explicit graph inputs (also after torch.export and ONNX export)."""

from __future__ import annotations

import pytest
import torch

import cachecompile as cc
from cachecompile.compile.pipeline import concrete_shape
from cachecompile.compile.pipeline import build_step_graph
from cachecompile.passes import counters
from cachecompile.passes.cache_io import cache_io
from cachecompile.passes.capture import capture
from cachecompile.passes.regions import find_regions
from tests.conftest import dit_inputs

SDPA = torch.ops.aten.scaled_dot_product_attention.default
BRANCHES = [f"blocks.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]


@pytest.fixture(scope="module")
def captured(dit):
    cap = capture(dit, (), dit_inputs(batch=4))
    return cap, find_regions(cap.gm)


def graphs(captured, schedule):
    """Plans and one step graph per step (built once per distinct plan, as the runtime does)."""
    cap, rm = captured
    plans = schedule.resolve(rm.layout)
    built = {p: build_step_graph(cap.gm, rm, p) for p in dict.fromkeys(plans)}
    return plans, {s: built[p] for s, p in enumerate(plans)}


def feature_shape(captured):
    cap, rm = captured
    node = {n.name: n for n in cap.gm.graph.nodes}[rm["blocks.0.attn"].outputs[0]]
    return concrete_shape(node.meta["val"])


def call(gm, cap, cache: dict, step: dict):
    """Run a step graph with named cache and step inputs; returns (user outputs, {slot: write})."""
    io = cache_io(gm)
    outs = gm(*cap.example_inputs, *[cache[s] for s in io.cache_inputs], *[step[n] for n in io.step_inputs])
    n = io.num_user_outputs if io.num_user_outputs is not None else len(outs)
    return outs[:n], dict(zip(io.cache_outputs, outs[n:]))


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_goc_forecast_step_structure_and_values(captured):
    cap, _ = captured
    counters.clear()
    plans, g = graphs(captured, cc.Schedule.fora(12, 3, compensation=cc.GOC(1.2, allow_divergence=True)))
    fc = g[1]
    assert counters["forecasts"] == 6 and counters["history_writes"] == 12  # one graph per distinct plan
    io = cache_io(fc)
    assert sum(n.target == SDPA for n in fc.graph.nodes) == 0
    assert sorted(io.cache_inputs) == sorted(BRANCHES + [r + "@h1" for r in BRANCHES])
    assert sorted(io.cache_outputs) == sorted(io.cache_inputs)
    assert sorted(io.step_inputs) == sorted("goc_w:" + r for r in BRANCHES)
    names = [n.name for n in fc.graph.nodes if n.op == "placeholder"]
    assert names[:3] == ["hidden_states", "timestep", "class_labels"]
    assert all(x.startswith("cache_") for x in names[3:15]) and all(x.startswith("step_goc_w") for x in names[15:])

    shape = feature_shape(captured)
    cache = {s: rand(shape, i) for i, s in enumerate(io.cache_inputs)}
    w = {n: torch.tensor(0.5 + i / 10) for i, n in enumerate(io.step_inputs)}
    user, writes = call(fc, cap, cache, w)
    for r in BRANCHES:
        u = cache[r] + w["goc_w:" + r] * (cache[r] - cache[r + "@h1"])
        torch.testing.assert_close(writes[r], u, rtol=0, atol=0)
        torch.testing.assert_close(writes[r + "@h1"], cache[r], rtol=0, atol=0)
        assert writes[r + "@h1"].data_ptr() != cache[r].data_ptr(), "a shifted value must not alias its input"
    # the user output is what plain reuse of the forecast values gives
    plain = build_step_graph(cap.gm, captured[1], cc.Schedule.fora(12, 3).resolve(captured[1].layout)[1])
    expected, _ = call(plain, cap, {r: writes[r] for r in BRANCHES}, {})
    torch.testing.assert_close(user[0], expected[0], rtol=0, atol=0)


def test_history_is_filled_at_the_first_compute_and_shifted_later(captured):
    cap, _ = captured
    plans, g = graphs(captured, cc.Schedule.fora(12, 3, compensation=cc.Taylor(2)))
    assert g[0].meta["cachecompile"].cache_inputs == []  # nothing to read at the first compute
    first_user, first = call(g[0], cap, {}, {})
    for r in BRANCHES:
        assert torch.equal(first[r], first[r + "@h1"]) and torch.equal(first[r], first[r + "@h2"])
    torch.testing.assert_close(first_user[0], cap.gm(*cap.example_inputs)[0], rtol=0, atol=0)

    later = g[3]
    assert plans[3] != plans[0] and plans[3] == plans[6]
    io = cache_io(later)
    assert sorted(io.cache_inputs) == sorted(BRANCHES + [r + "@h1" for r in BRANCHES])
    assert sum(n.target == SDPA for n in later.graph.nodes) == 3
    cache = {s: rand(feature_shape(captured), i) for i, s in enumerate(io.cache_inputs)}
    _, writes = call(later, cap, cache, {})
    for r in BRANCHES:
        assert torch.equal(writes[r + "@h2"], cache[r + "@h1"]) and torch.equal(writes[r + "@h1"], cache[r])
        assert torch.equal(writes[r], first[r])  # the freshly computed value


def test_taylor_forecast_uses_its_coefficients(captured):
    cap, _ = captured
    _, g = graphs(captured, cc.Schedule.fora(12, 3, compensation=cc.Taylor(2)))
    fc = g[4]
    io = cache_io(fc)
    assert sorted(io.step_inputs) == sorted([f"taylor_c{k}:{r}" for r in BRANCHES for k in (1, 2)])
    assert io.cache_outputs == []
    cache = {s: rand(feature_shape(captured), i) for i, s in enumerate(io.cache_inputs)}
    step = {n: torch.tensor(0.25 * (i + 1)) for i, n in enumerate(io.step_inputs)}
    user, _ = call(fc, cap, cache, step)
    u = {
        r: cache[r]
        + step["taylor_c1:" + r] * (cache[r] - cache[r + "@h1"])
        + step["taylor_c2:" + r] * (cache[r + "@h1"] - cache[r + "@h2"])
        for r in BRANCHES
    }
    plain = build_step_graph(cap.gm, captured[1], cc.Schedule.fora(12, 3).resolve(captured[1].layout)[1])
    expected, _ = call(plain, cap, u, {})
    torch.testing.assert_close(user[0], expected[0], rtol=0, atol=1e-6)


def eoc_schedule(shape_of_row):
    prior = {r: rand((12, *shape_of_row), i) for i, r in enumerate(BRANCHES)}
    return cc.Schedule.fora(12, 3, compensation=cc.EOC(0.1, prior=prior)), prior


def test_eoc_step_reads_the_prior_as_an_input(captured):
    cap, rm = captured
    sched, prior = eoc_schedule((16,))
    plans, g = graphs(captured, sched)
    fc = g[1]
    io = cache_io(fc)
    assert sorted(io.cache_inputs) == sorted(BRANCHES) and io.cache_outputs == []
    assert sorted(io.step_inputs) == sorted(["eoc_row"] + [f"eoc_{k}:{r}" for r in BRANCHES for k in ("prior", "scale")])
    assert not [n for n in fc.graph.nodes if n.op == "get_attr" and "prior" in str(n.target)]
    phs = {n.name: n for n in fc.graph.nodes if n.op == "placeholder"}
    assert tuple(phs["step_eoc_prior_blocks_0_attn"].meta["val"].shape) == (12, 16)
    assert phs["step_eoc_row"].meta["val"].dtype == torch.int64

    cache = {r: rand(feature_shape(captured), i) for i, r in enumerate(BRANCHES)}
    row, scale = 5, 0.3
    step = {n: torch.tensor([row]) if n == "eoc_row" else prior[n[10:]] if n.startswith("eoc_prior:") else torch.tensor(scale) for n in io.step_inputs}
    user, _ = call(fc, cap, cache, step)
    plain = build_step_graph(cap.gm, rm, cc.Schedule.fora(12, 3).resolve(rm.layout)[1])
    expected, _ = call(plain, cap, {r: cache[r] * (1 + scale * prior[r][row]) for r in BRANCHES}, {})
    torch.testing.assert_close(user[0], expected[0], rtol=0, atol=0)
    # the full compute step of EOC is the plain one: EOC keeps no history
    assert plans[0] == cc.Schedule.fora(12, 3).resolve(rm.layout)[0]


def test_prior_stays_an_explicit_input_after_export(captured):
    sched, _ = eoc_schedule((16,))
    _, g = graphs(captured, sched)
    fc = g[1]
    examples = [torch.zeros(concrete_shape(n.meta["val"]), dtype=n.meta["val"].dtype) for n in fc.graph.nodes if n.op == "placeholder"]
    ep = torch.export.export(fc, tuple(examples), strict=False)
    sig = ep.graph_signature
    assert "step_eoc_prior_blocks_0_attn" in sig.user_inputs and "cache_blocks_0_attn" in sig.user_inputs
    assert not sig.buffers_to_mutate and not sig.user_inputs_to_mutate


def test_prior_is_an_input_of_the_onnx_artifact(captured, tmp_path):
    pytest.importorskip("onnxruntime")
    from cachecompile.backends import get_backend

    cap, _ = captured
    sched, prior = eoc_schedule((16,))
    _, g = graphs(captured, sched)
    fc = g[1]
    io = cache_io(fc)
    cache = {r: rand(feature_shape(captured), i) for i, r in enumerate(BRANCHES)}
    step = {n: torch.tensor([3]) if n == "eoc_row" else prior[n[10:]] if n.startswith("eoc_prior:") else torch.tensor(0.2) for n in io.step_inputs}
    inputs = [*cap.example_inputs, *[cache[s] for s in io.cache_inputs], *[step[n] for n in io.step_inputs]]
    backend = get_backend("onnxruntime")
    entry = backend.export(fc, inputs, tmp_path, "eoc_step")
    specs = {d["name"]: d for d in entry["inputs"]}
    assert specs["step_eoc_prior_blocks_0_attn"]["shape"] == [12, 16]
    assert specs["step_eoc_row"]["dtype"] == "int64"
    got = backend.load(tmp_path, entry)(*inputs)
    torch.testing.assert_close(got[0], fc(*inputs)[0], rtol=1e-4, atol=1e-5)


def test_eoc_prior_shape_must_fit_the_feature(captured):
    sched, _ = eoc_schedule((3,))
    with pytest.raises(ValueError, match=r"rows of shape \[3\].*\[batch, 16, 16\]"):
        graphs(captured, sched)
