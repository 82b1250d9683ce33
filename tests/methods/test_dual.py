"""ToCa / DuCa presets over whole CFG + DDIM loops against the independent eager reference in
tests/dual_reference.py; FLOPs; step-graph counts; exports; schedule validation."""

import contextlib
import io
import json
import math
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cachecompile as cc
from cachecompile.compile.pipeline import example_inputs
from cachecompile.tools.flops import flop_counter, sampling_flops
from cachecompile.methods.dual import Partial, ReuseResidual, toca_profile
from cachecompile.sampling import ddim_sample
from cachecompile.core.schedule import REUSE, Layout, ScheduleError
from cachecompile.compile.pipeline import build_step_graph
from cachecompile.passes.capture import capture
from cachecompile.passes.regions import find_regions
from tests.conftest import dit_inputs
from tests.dual_reference import DualReference, step_kind

LAYOUT = Layout(branches=(("attn", "mlp"),) * 3)


def _against_reference(dit, labels, sample_kwargs, schedule, ref):
    cached = cc.optimize(dit, schedule)
    for _ in range(2):  # two generations in a row: no state leaks from the first
        ref.restart()
        expected = ddim_sample(ref, labels, **sample_kwargs)
        got = ddim_sample(cached, labels, **sample_kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert cached.step == 0
    return cached, got


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("interval, mode", [(3, "output"), (3, "residual"), (4, "output"), (4, "residual")])
def test_duca_ratio_one_matches_the_eager_reference(dit, labels, sample_kwargs, uncached_samples, interval, mode):
    """Conservative steps reuse attention and recompute the MLP fully; aggressive steps reuse the stack."""
    schedule = cc.Schedule.duca(12, interval, 1.0, aggressive_reuse=mode)
    ref = DualReference(dit, "duca", interval, 1.0, mode=mode)
    cached, got = _against_reference(dit, labels, sample_kwargs, schedule, ref)
    assert len(cached.step_graphs) == 3
    assert (got - uncached_samples).abs().max() > 1e-3  # caching is active
    other = DualReference(dit, "duca", interval, 1.0, mode="residual" if mode == "output" else "output")
    assert (ddim_sample(other, labels, **sample_kwargs) - got).abs().max() > 1e-4  # the mode matters


def test_duca_ratio_zero_conservative_steps_are_pure_reuse(dit, labels, sample_kwargs):
    schedule = cc.Schedule.duca(12, 3, 0.0)
    cached, _ = _against_reference(dit, labels, sample_kwargs, schedule, DualReference(dit, "duca", 3, 0.0))
    conservative = cached.plans[1]
    assert all(a == REUSE for _, a in conservative.actions) and len(conservative.actions) == 6
    graph = cached.step_graphs[conservative]
    paths = [v[0] for n in graph.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()]
    assert not [p for p in paths if ".ff" in p or ".attn1" in p]


@pytest.mark.parametrize(
    "method, interval, ratio, score",
    [
        ("duca", 3, 0.3, {"v_norm": 1.0}),
        ("duca", 4, 0.5, {"v_norm": 1.0, "staleness": 0.25}),
        ("toca", 4, 0.3, {"v_norm": 1.0, "staleness": 0.25}),
        ("toca", 3, 0.25, {"attention": 1.0}),
    ],
)
def test_partial_recompute_matches_the_eager_reference(dit, labels, sample_kwargs, method, interval, ratio, score):
    make = cc.Schedule.duca if method == "duca" else cc.Schedule.toca
    schedule = make(12, interval, ratio, score)
    _, got = _against_reference(dit, labels, sample_kwargs, schedule, DualReference(dit, method, interval, ratio, score))
    # the other direction of the score picks other tokens and gives another result
    flipped = {k: -v for k, v in score.items()}
    other = ddim_sample(cc.optimize(dit, make(12, interval, ratio, flipped)), labels, **sample_kwargs)
    assert (other - got).abs().max() > 1e-4


def test_exactly_k_rows_of_each_mlp_cache_change_per_conservative_step(dit, labels, sample_kwargs):
    schedule = cc.Schedule.duca(12, 4, 0.3)  # steps: full, conservative, aggressive, conservative ...
    cached = cc.optimize(dit, schedule)
    snapshots, latest = [], {}
    store_write = cached._store.write

    def write(call, slot, value):  # the most recent value the runtime gave the store for each slot
        latest[slot] = value.clone()
        store_write(call, slot, value)

    cached._store.write = write

    def run(**kw):
        out = cached(**kw)
        if cached.step != 0:  # after the last step (the clock is back at 0): not compared
            snapshots.append({f"blocks.{i}.mlp": latest[f"blocks.{i}.mlp"] for i in range(3)})
        return out

    ddim_sample(run, labels, **sample_kwargs)
    k = 5  # round(0.3 × 16 tokens)
    kinds = schedule.step_kinds()
    assert len(snapshots) == 11
    for step in range(1, 11):
        for slot, now in snapshots[step].items():
            changed = (now != snapshots[step - 1][slot]).any(dim=-1).sum(dim=1)  # per CFG sample
            expected = {"full": 16, "conservative": k, "aggressive": 0}[kinds[step]]
            assert changed.tolist() == [expected] * 4, (step, kinds[step], slot)


# --------------------------------------------------------------------------- FLOPs


class _FlopsIn(torch.fx.Interpreter):
    """Runs a graph and counts FLOPs (torch's flop counter) of the nodes of one module path part."""

    def __init__(self, gm, part):
        super().__init__(gm)
        self.part, self.flops = part, 0

    def run_node(self, n):
        stack = n.meta.get("nn_module_stack") or {}
        if n.op == "call_function" and any(self.part in v[0] for v in stack.values()):
            with FlopCounterMode(display=False) as counter:
                out = super().run_node(n)
            self.flops += counter.get_total_flops()
            return out
        return super().run_node(n)


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.6])
def test_conservative_mlp_flops_scale_with_k(dit, ratio):
    cap = capture(dit, (), dit_inputs(batch=4))
    rm = find_regions(cap.gm)
    plans = cc.Schedule.duca(3, 3, ratio).resolve(rm.layout)
    full, conservative = build_step_graph(cap.gm, rm, plans[0]), build_step_graph(cap.gm, rm, plans[1])
    with torch.no_grad():
        f = _FlopsIn(full, ".ff")
        outs = f.run(*cap.example_inputs)
        caches = dict(zip(full.meta["cachecompile"].cache_outputs, outs[1:]))
        c = _FlopsIn(conservative, ".ff")
        io_ = conservative.meta["cachecompile"]
        c.run(*cap.example_inputs, *[caches[s] for s in io_.cache_inputs], *[torch.tensor(1)] * len(io_.step_inputs))
    k = math.floor(ratio * 16 + 0.5)
    assert f.flops > 0
    assert c.flops / f.flops == pytest.approx(k / 16, rel=0.05)


def test_flops_ratio_of_a_whole_run(dit, labels, sample_kwargs):
    kw = {k: v for k, v in sample_kwargs.items() if k != "num_steps"}
    # All-compute: the model's FLOPs but one timestep-embedder MLP per step. DiT's output head
    # calls block 0's embedder again on the same inputs; the step graph computes it once.
    d = dit.config.num_attention_heads * dit.config.attention_head_dim
    per_step = sampling_flops(dit, labels, **sample_kwargs) / sample_kwargs["num_steps"]
    embedder = 2 * 4 * (256 * d + d * d)  # linear_1 (256 → d), linear_2 (d → d) at CFG batch 4
    assert cc.flops_ratio(dit, cc.Schedule.fora(12, 1), labels, **kw) == pytest.approx(per_step / (per_step - embedder), rel=1e-12)
    schedule = cc.Schedule.duca(12, 3, 0.25)
    ratio = cc.flops_ratio(dit, schedule, labels, **kw)
    # independently: the uncached FLOPs over the FLOPs of each step's graph, one call per step
    cached = cc.optimize(dit, schedule)
    ddim_sample(cached, labels, **sample_kwargs)
    inputs = dit_inputs(batch=4)

    def flops(fn):
        with flop_counter() as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    full = flops(lambda: dit(**inputs))
    per_kind = {}
    for plan, graph in cached.step_graphs.items():
        zeros = example_inputs(graph, list(inputs.values()))[3:]
        per_kind[plan] = flops(lambda: graph(*inputs.values(), *zeros))
    total = sum(per_kind[p] for p in cached.plans)
    assert ratio == pytest.approx(12 * full / total, rel=1e-9)
    assert 1.5 < ratio < 3.0


# --------------------------------------------------------------------------- graphs


def test_step_graph_count_stays_small(dit, labels, sample_kwargs):
    kw = dict(sample_kwargs, num_steps=50)
    duca = cc.optimize(dit, cc.Schedule.duca(50, 3, 0.3))
    ddim_sample(duca, labels, **kw)
    assert len(duca.step_graphs) == 3
    toca = cc.optimize(dit, cc.Schedule.toca(50, 4, 0.3, "v_norm+0.25*staleness"))
    ddim_sample(toca, labels, **kw)
    assert len(toca.step_graphs) == 2
    per_block = cc.Schedule.duca(50, 3, [0.5, 0.3, 0.1])
    assert len(set(per_block.resolve(LAYOUT))) == 3
    table = toca_profile(0.3, 50, 3)
    profiled = cc.Schedule.duca(50, 3, table).resolve(LAYOUT)
    conservative_rows = {tuple(table[s]) for s in range(50) if s % 3 == 1}
    assert len(set(profiled)) == 2 + len(conservative_rows)


def test_plans_follow_the_design_rules():
    plans = cc.Schedule.duca(8, 4, 0.3, aggressive_reuse="residual").resolve(LAYOUT)
    kinds = [step_kind("duca", s, 4) for s in range(8)]
    assert kinds == ["full", "conservative", "aggressive", "conservative"] * 2
    for plan, kind in zip(plans, kinds):
        acts = dict(plan.actions)
        if kind == "full":
            assert plan.is_full and "stack" in plan.writes
            assert {r: a.state for r, a in acts.items()} == {
                **{f"blocks.{i}.attn": ("v_norm",) for i in range(3)},
                "stack": ("residual",),
            }
        elif kind == "conservative":
            assert all(acts[f"blocks.{i}.attn"] == REUSE for i in range(3))
            assert all(acts[f"blocks.{i}.mlp"] == Partial(ratio=0.3) for i in range(3))
            assert "stack" in plan.writes  # the stack runs, so its cache is written
        else:
            assert acts == {"stack": ReuseResidual()} and not plan.writes


# --------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def three_step_graphs(dit):
    cap = capture(dit, (), dit_inputs(batch=4))
    rm = find_regions(cap.gm)
    schedule = cc.Schedule.duca(3, 3, 0.3, "v_norm+0.5*attention+0.25*staleness+0.1*random", "residual")
    plans = schedule.resolve(rm.layout)
    store: dict = {}
    out = []
    for step, plan in enumerate(plans):  # full, conservative, aggressive
        g = build_step_graph(cap.gm, rm, plan)
        io_ = g.meta["cachecompile"]
        args = [*cap.example_inputs, *[store[s] for s in io_.cache_inputs], *[torch.tensor(step)] * len(io_.step_inputs)]
        with torch.no_grad():
            eager = g(*args)
        store.update(zip(io_.cache_outputs, eager[1:]))
        out.append((g, args, eager))
    return out


@pytest.mark.parametrize("step", [0, 1, 2], ids=["full", "conservative", "aggressive"])
def test_step_graphs_export_with_torch_export(three_step_graphs, step):
    g, args, eager = three_step_graphs[step]
    ep = torch.export.export(g, tuple(args), strict=False)
    with torch.no_grad():
        again = ep.module()(*args)
    for a, b in zip(again, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("step", [0, 1, 2], ids=["full", "conservative", "aggressive"])
def test_step_graphs_export_to_onnx_and_run_in_onnxruntime(three_step_graphs, step, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    g, args, eager = three_step_graphs[step]
    path = tmp_path / f"step{step}.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(g, tuple(args), dynamo=True, opset_version=20).save(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if step == 1:
        assert {"TopK", "GatherElements", "ScatterElements"} <= ops
    if step == 0:
        assert "Softmax" in ops  # the explicit attention-score path
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    placeholders = [n.name for n in g.graph.nodes if n.op == "placeholder"]
    wanted = {i.name for i in sess.get_inputs()}
    feed = {name: a.numpy() for name, a in zip(placeholders, args) if name in wanted}
    outs = sess.run(None, feed)
    assert len(outs) == len(eager)
    for a, b in zip(outs, eager):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- schedule data


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: cc.Schedule.duca(12, 3, 1.5), r"fresh_ratio must be in \[0, 1\]"),
        (lambda: cc.Schedule.toca(12, 3, -0.1), r"fresh_ratio must be in \[0, 1\]"),
        (lambda: cc.Schedule.duca(12, 3, float("nan")), "must be a number"),
        (lambda: cc.Schedule.duca(12, 3, "0.3"), "fresh_ratio must be a number"),
        (lambda: cc.Schedule.duca(12, 3, [0.2, 1.2, 0.3]), r"fresh_ratio\[1\] must be in \[0, 1\]"),
        (lambda: cc.Schedule.duca(12, 3, [[0.2], [0.1, 0.3]]), "same number of blocks"),
        (lambda: cc.Schedule.duca(12, 0, 0.3), "interval"),
        (lambda: cc.Schedule.duca(12, 3, 0.3, aggressive_reuse="stack"), "aggressive_reuse"),
        (lambda: cc.Schedule.toca(12, 3, 0.3, score="entropy"), "unknown token score"),
        (lambda: cc.Schedule.toca(12, 3, 0.3, seed=-1), "seed"),
        (lambda: Partial(ratio=2.0), r"must be in \[0, 1\]"),
    ],
)
def test_bad_parameters_fail_clearly(make, match):
    with pytest.raises(ScheduleError, match=match):
        make()


def test_profile_shape_is_checked_against_the_model(dit):
    with pytest.raises(ScheduleError, match="2 per-block values but the model has 3 blocks"):
        cc.Schedule.duca(6, 3, [0.3, 0.3]).resolve(LAYOUT)
    with pytest.raises(ScheduleError, match=r"fresh_ratio table has 4 rows but the schedule has 6 steps"):
        cc.Schedule.duca(6, 3, [[0.3] * 3] * 4)  # the table's step count is checked when it is built
    with pytest.raises(ScheduleError, match=r"6 steps × 2 blocks but the schedule has 6 steps and the model 3 blocks"):
        cc.Schedule.duca(6, 3, [[0.3] * 2] * 6).resolve(LAYOUT)
    cached = cc.optimize(dit, cc.Schedule.duca(6, 3, [0.3, 0.3]))
    with pytest.raises(ScheduleError):
        cached(**dit_inputs())
    assert not cached.is_captured


@pytest.mark.parametrize(
    "schedule",
    [
        cc.Schedule.duca(12, 3, 0.3),
        cc.Schedule.duca(12, 4, [0.5, 0.3, 0.1], "v_norm+0.25*staleness", "residual", seed=3),
        cc.Schedule.toca(12, 3, toca_profile(0.2, 12, 3), "attention"),
        cc.Schedule.explicit([{}, {"blocks.0.attn": "reuse", "blocks.0.mlp": Partial(ratio=0.5, score="random", seed=2)}, {"stack": ReuseResidual()}]),
    ],
)
def test_save_load_round_trip(tmp_path, schedule):
    schedule.save(tmp_path / "s.json")
    loaded = cc.Schedule.load(tmp_path / "s.json")
    assert loaded == schedule and hash(loaded) == hash(schedule)
    assert loaded.resolve(LAYOUT) == schedule.resolve(LAYOUT)
    json.loads((tmp_path / "s.json").read_text())


def test_the_table_shows_partial_and_stack_reuse():
    lines = str(cc.Schedule.duca(4, 4, 0.3)).splitlines()
    assert [line.split()[1] for line in lines[2:]] == ["full", "conservative", "aggressive", "conservative"]
    assert lines[3].split()[-1] == "·p" and lines[4].split()[-1] == "SS"


def test_bench_parses_toca_and_duca():
    from cachecompile.tools.specs import parse_schedule

    assert parse_schedule("duca:3:0.3", 12) == cc.Schedule.duca(12, 3, 0.3)
    assert parse_schedule("duca:4:0.25:v_norm+0.25*staleness:residual", 12) == cc.Schedule.duca(
        12, 4, 0.25, "v_norm+0.25*staleness", "residual"
    )
    assert parse_schedule("toca:2:0.5:random", 12) == cc.Schedule.toca(12, 2, 0.5, "random")
    with pytest.raises(ScheduleError, match=r"fresh_ratio must be in \[0, 1\]"):
        parse_schedule("duca:3:3", 12)


def test_a_saved_schedule_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    schedule = cc.Schedule.duca(6, 3, [0.2, 0.3, 0.4], "v_norm+0.25*staleness", "residual")
    schedule.save(tmp_path / "s.json")
    code = f"import cachecompile as cc; print(repr(cc.Schedule.load({str(tmp_path / 's.json')!r})))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(schedule)


def test_flop_counter_counts_attention_on_cpu():
    q = k = v = torch.randn(2, 3, 8, 4)  # [B, heads, T, d]
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 8 * 8 * 4)  # QKᵀ and AV
