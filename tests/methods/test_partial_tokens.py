"""The partial-token pass: token-wise check, gather → region on k tokens → scatter, cache write."""

import pytest
import torch
import torch.nn.functional as F

import cachecompile as cc
from cachecompile.methods.dual import Partial
from cachecompile.compile.pipeline import build_step_graph
from cachecompile.passes import counters
from cachecompile.passes.capture import capture
from cachecompile.methods.dual.partial import PartialTokensError, check_tokenwise
from cachecompile.passes.regions import RegionPatterns, find_regions
from tests.conftest import dit_inputs

LINEAR = torch.ops.aten.linear.default
TOPK = torch.ops.aten.topk.default
GATHER = torch.ops.aten.gather.default
SCATTER = torch.ops.aten.scatter.src


def _path(node):
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


@pytest.fixture(scope="module")
def captured(dit):
    cap = capture(dit, (), dit_inputs(batch=4))
    return cap, find_regions(cap.gm)


def _run(graph, cap, store, step):
    io = graph.meta["cachecompile"]
    with torch.no_grad():
        outs = graph(*cap.example_inputs, *[store[s] for s in io.cache_inputs], *[torch.tensor(step)] * len(io.step_inputs))
    store.update(zip(io.cache_outputs, outs[cap.call.num_outputs :]))
    return outs[: cap.call.num_outputs]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("region, what", [("blocks.0.attn", "node 'view' .aten.view"), ("blocks.1", "input 'timestep'")])
def test_regions_that_mix_tokens_are_refused(captured, region, what):
    cap, rm = captured
    plans = cc.Schedule.explicit([{}, {region: Partial(ratio=0.5, score="random")}]).resolve(rm.layout)
    with pytest.raises(PartialTokensError, match=rf"{region} .*is not token-wise.*{what}.*MLP branch"):
        build_step_graph(cap.gm, rm, plans[1])


def test_a_refused_partial_leaves_the_model_untouched(dit):
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    cached = cc.optimize(dit, cc.Schedule.explicit([{}, {"blocks.0.attn": Partial(ratio=0.5, score="random")}]))
    with pytest.raises(PartialTokensError, match="not token-wise"):
        cached(**dit_inputs())
    assert not cached.is_captured and cached.step_graphs == {}
    assert all(torch.equal(state[k], v) for k, v in dit.state_dict().items())


class _Attn(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        q, k, v = (m(x).unsqueeze(1) for m in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v).squeeze(1)


class _GegluNormFF(torch.nn.Module):
    """Token-wise: linear, split over channels, gating, norms over channels, per-channel scale."""

    def __init__(self, d):
        super().__init__()
        self.proj, self.out = torch.nn.Linear(d, 4 * d), torch.nn.Linear(2 * d, d)
        self.norm = torch.nn.LayerNorm(2 * d)
        self.gamma = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        a, b = self.proj(x).chunk(2, dim=-1)
        h = self.norm(a * F.gelu(b))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # a hand-written RMSNorm
        return self.out(h) * self.gamma + 0.5


class _MeanFF(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x) + x.mean(dim=1, keepdim=True)


class _PositionalFF(torch.nn.Module):
    def __init__(self, d, n=6):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.pos = torch.nn.Parameter(torch.randn(n, d))

    def forward(self, x):
        return self.proj(x) * self.pos


class _Block(torch.nn.Module):
    def __init__(self, ff, d):
        super().__init__()
        self.attn, self.ff = _Attn(d), ff(d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ff(x)


class _Toy(torch.nn.Module):
    def __init__(self, ff, d=8):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(ff, d) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return (x,)


TOY_REGIONS = RegionPatterns(blocks=("blocks.*",), branches={"attn": "attn", "mlp": "ff"})


def _toy(ff):
    torch.manual_seed(0)
    model = _Toy(ff).eval()
    x = torch.randn(2, 6, 8)
    cap = capture(model, (x,))
    return model, x, cap, find_regions(cap.gm, TOY_REGIONS)


@pytest.mark.parametrize("ff, why", [(_MeanFF, r"node 'mean'.*aten.mean"), (_PositionalFF, r"node 'mul'.*combines tokens with 'blocks_0_ff_pos'")])
def test_mlps_that_are_not_tokenwise_are_refused(ff, why):
    _, _, cap, rm = _toy(ff)
    with pytest.raises(PartialTokensError, match=why):
        check_tokenwise(cap.gm, rm["blocks.0.mlp"])


def test_a_tokenwise_custom_mlp_is_accepted_and_exact_at_ratio_one():
    model, x, cap, rm = _toy(_GegluNormFF)
    assert check_tokenwise(cap.gm, rm["blocks.0.mlp"]) == (2, 6)
    step = {"blocks.0.attn": "reuse", "blocks.1.attn": "reuse"}
    plans = cc.Schedule.explicit(
        [{}, dict(step, **{f"blocks.{i}.mlp": Partial(ratio=1.0, score="random") for i in range(2)})]
    ).resolve(rm.layout)
    full, partial = build_step_graph(cap.gm, rm, plans[0]), build_step_graph(cap.gm, rm, plans[1])
    store: dict = {}
    ref = _run(full, cap, store, 0)
    got = _run(partial, cap, store, 1)  # same input, attention reused, every token recomputed
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref[0], model(x)[0], rtol=0, atol=0)


# --------------------------------------------------------------------------- the rewrite


def test_conservative_graph_runs_the_mlp_on_k_tokens(captured):
    cap, rm = captured
    plans = cc.Schedule.toca(4, 2, 0.3).resolve(rm.layout)
    counters.clear()
    g = build_step_graph(cap.gm, rm, plans[1])
    assert counters["partial_tokens"] == 3
    k = 5  # round(0.3 × 16)
    ff = [n for n in g.graph.nodes if n.target == LINEAR and ".ff." in _path(n)]
    assert len(ff) == 6 and all(n.meta["val"].shape[:2] == (4, k) for n in ff)
    assert sum(n.target == TOPK for n in g.graph.nodes) == 3
    assert sum(n.target == GATHER for n in g.graph.nodes) == 3
    assert sum(n.target == SCATTER for n in g.graph.nodes) == 3
    topk = [n for n in g.graph.nodes if n.target == TOPK]
    assert all(n.args[1] == k for n in topk)  # static k per plan
    io = g.meta["cachecompile"]
    mlp = [f"blocks.{i}.mlp" for i in range(3)]
    assert set(mlp) <= set(io.cache_outputs) and set(mlp) <= set(io.cache_inputs)
    assert {f"blocks.{i}.attn@v_norm" for i in range(3)} <= set(io.cache_inputs)
    # no attention left: it is reused
    assert not [n for n in g.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]


@pytest.mark.parametrize("ratio", [0.0, 0.03])
def test_k_zero_is_a_pure_cache_read(captured, ratio):
    cap, rm = captured
    plans = cc.Schedule.explicit([{}, {"blocks.0.attn": "reuse", "blocks.0.mlp": Partial(ratio=ratio, score="random")}]).resolve(rm.layout)
    g = build_step_graph(cap.gm, rm, plans[1])
    io = g.meta["cachecompile"]
    assert "blocks.0.mlp" in io.cache_inputs and "blocks.0.mlp" not in io.cache_outputs
    assert not [n for n in g.graph.nodes if "transformer_blocks.0.ff" in _path(n)]
    assert not [n for n in g.graph.nodes if n.target == TOPK]


def test_exactly_the_k_lowest_value_norm_rows_of_the_mlp_slot_change(captured):
    cap, rm = captured
    plans = cc.Schedule.toca(4, 2, 0.3).resolve(rm.layout)
    full, partial = build_step_graph(cap.gm, rm, plans[0]), build_step_graph(cap.gm, rm, plans[1])
    store: dict = {}
    _run(full, cap, store, 0)
    before = dict(store)
    # other inputs at another timestep: the stream into the MLPs differs from the full step's
    x = dit_inputs(batch=4, seed=3)
    user = [x["hidden_states"], torch.full((4,), 300, dtype=torch.int64), x["class_labels"]]
    io = partial.meta["cachecompile"]
    with torch.no_grad():
        outs = partial(*user, *[store[s] for s in io.cache_inputs], *[torch.tensor(1)] * len(io.step_inputs))
    after = dict(zip(io.cache_outputs, outs[1:]))
    for i in range(3):
        changed = (after[f"blocks.{i}.mlp"] != before[f"blocks.{i}.mlp"]).any(dim=-1)  # [B, N]
        assert changed.sum(dim=1).tolist() == [5, 5, 5, 5]
        lowest = before[f"blocks.{i}.attn@v_norm"].argsort(dim=1)[:, :5]
        assert all(set(torch.nonzero(changed[b]).flatten().tolist()) == set(lowest[b].tolist()) for b in range(4))
