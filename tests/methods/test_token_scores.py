"""Token scores: each picks the tokens it claims (constructed inputs), and the graph records the
state they read (against values taken from the eager model with hooks)."""

import math

import pytest
import torch

import cachecompile as cc
from cachecompile.methods.dual import Partial, parse_score
from cachecompile.core.schedule import ScheduleError
from cachecompile.compile.pipeline import build_step_graph
from cachecompile.passes import counters
from cachecompile.passes.capture import capture
from cachecompile.methods.dual.partial import top_tokens
from cachecompile.passes.regions import find_regions
from cachecompile.methods.dual.scores import (
    attention_score,
    attention_state,
    random_score,
    restamp,
    staleness_score,
    stamp_all,
    state_slot,
    v_norm_score,
    v_norm_state,
    weighted_sum,
)
from tests.conftest import dit_inputs


def _picked(score: torch.Tensor, k: int) -> list[set[int]]:
    return [set(row.tolist()) for row in top_tokens(score, k)]


def test_v_norm_recomputes_the_tokens_with_the_smallest_value_norms_summed_over_heads():
    # [B=1, H=2, N=4, d=2]: per-head norms chosen so that "sum over heads" and "norm over the
    # concatenated heads" disagree: token 0 has head norms (3, 0) → sum 3, concat 3;
    # token 1 (2, 2) → sum 4, concat 2.83; tokens 2, 3 are large.
    norms = torch.tensor([[3.0, 0.0], [2.0, 2.0], [5.0, 5.0], [4.0, 6.0]])  # [N, H]
    v = torch.zeros(1, 2, 4, 2)
    v[0, :, :, 0] = norms.T
    state = v_norm_state(v)
    torch.testing.assert_close(state, torch.tensor([[3.0, 4.0, 10.0, 10.0]]))
    score = v_norm_score(state, heads=2)
    assert _picked(score, 1) == [{0}]  # the smallest Σ_h ‖v_h‖, not the smallest ‖v‖
    assert _picked(score, 2) == [{0, 1}]
    # DuCa's formula: normalize((1 - v_norm).sum(heads)), L2 over tokens
    expected = torch.nn.functional.normalize((1 - norms.T.unsqueeze(0)).sum(dim=1), p=2, dim=1)
    torch.testing.assert_close(score, expected)


def test_attention_picks_the_tokens_that_receive_the_most_attention():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 6, 4) * 0.1
    k = torch.randn(2, 3, 6, 4) * 0.1
    k[0, :, 4] = q[0].mean(dim=1) * 60  # every query of sample 0 attends to key 4
    k[1, :, 1] = q[1].mean(dim=1) * 60
    k[1, :, 5] = q[1].mean(dim=1) * 40
    state = attention_state(q, k, scale=0.5)
    probs = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    torch.testing.assert_close(state, probs.mean(dim=1).sum(dim=1))
    torch.testing.assert_close(state.sum(dim=1), torch.full((2,), 6.0))  # each query gives out 1
    assert _picked(attention_score(state), 1) == [{4}, {1}]
    assert _picked(attention_score(state), 2)[1] == {1, 5}


def test_staleness_picks_the_tokens_recomputed_longest_ago():
    stamp = torch.tensor([[0.0, 3.0, 1.0, 2.0], [2.0, 2.0, 0.0, 1.0]])
    step = torch.tensor(4)
    torch.testing.assert_close(staleness_score(stamp, step), torch.tensor([[4.0, 1.0, 3.0, 2.0], [2.0, 2.0, 4.0, 3.0]]))
    assert _picked(staleness_score(stamp, step), 2) == [{0, 2}, {2, 3}]
    fresh = stamp_all(torch.tensor(5), torch.empty(2, 4, 8))
    assert torch.equal(fresh, torch.full((2, 4), 5.0))
    idx = torch.tensor([[0, 2], [3, 1]])
    assert torch.equal(restamp(stamp, idx, step), torch.tensor([[4.0, 3.0, 4.0, 2.0], [2.0, 4.0, 0.0, 4.0]]))


def test_random_is_reproducible_per_step_and_seed_and_spreads_the_picks():
    a = random_score(torch.tensor(7), torch.empty(3, 64), seed=0)
    assert a.shape == (3, 64) and torch.equal(a[0], a[2])  # one row for every sample
    assert torch.equal(a, random_score(torch.tensor(7), torch.empty(3, 64), seed=0))
    assert not torch.equal(a, random_score(torch.tensor(8), torch.empty(3, 64), seed=0))
    assert not torch.equal(a, random_score(torch.tensor(7), torch.empty(3, 64), seed=1))
    assert ((a >= 0) & (a < 1)).all() and len(set(a[0].tolist())) == 64
    # over many steps every token is picked about k/N of the time
    counts = torch.zeros(64)
    for step in range(400):
        counts[top_tokens(random_score(torch.tensor(step), torch.empty(1, 64), seed=3), 16)[0]] += 1
    assert counts.min() > 0.5 * 100 and counts.max() < 1.5 * 100, counts


def test_weighted_combination():
    a, b = torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[0.0, 4.0, 1.0]])
    torch.testing.assert_close(weighted_sum(a, b, weights=(1.0, 0.25)), torch.tensor([[1.0, 1.0, 0.75]]))
    assert _picked(weighted_sum(a, b, weights=(1.0, 0.1)), 1) == [{0}]
    assert _picked(weighted_sum(a, b, weights=(1.0, 1.0)), 1) == [{1}]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("v_norm", (("v_norm", 1.0),)),
        ("v_norm+0.25*staleness", (("staleness", 0.25), ("v_norm", 1.0))),
        (" 0.5*attention + 0.5*random ", (("attention", 0.5), ("random", 0.5))),
        ("-1*v_norm", (("v_norm", -1.0),)),
        ("1e-1*staleness-v_norm", (("staleness", 0.1), ("v_norm", -1.0))),
        ({"random": 2, "v_norm": 1}, (("random", 2.0), ("v_norm", 1.0))),
    ],
)
def test_parse_score(spec, expected):
    assert parse_score(spec) == expected


@pytest.mark.parametrize("spec, match", [("norm", "unknown token score"), ("v_norm*2", "cannot read"), ("0*v_norm", "non-zero"), ({"v_norm": float("nan")}, "finite")])
def test_bad_scores_fail_clearly(spec, match):
    with pytest.raises(ScheduleError, match=match):
        parse_score(spec)


# --------------------------------------------------------------------------- in the graph


def _hooked(dit, inputs):
    """Per block: (Σ_h ‖v_h‖, attention received) from the eager model, via hooks."""
    got = {}
    hooks = []
    for i, block in enumerate(dit.transformer_blocks):
        for name in ("to_q", "to_k", "to_v"):
            mod = getattr(block.attn1, name)
            hooks.append(mod.register_forward_hook(lambda m, a, o, i=i, name=name: got.__setitem__((i, name), o)))
    with torch.no_grad():
        dit(**inputs)
    for h in hooks:
        h.remove()
    out = {}
    for i, block in enumerate(dit.transformer_blocks):
        heads = block.attn1.heads
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = (split(got[(i, n)]) for n in ("to_q", "to_k", "to_v"))
        vn = sum(v[:, h].norm(dim=-1) for h in range(heads))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1).mean(1).sum(1)
        out[i] = (vn, att)
    return out


def test_full_steps_record_v_norm_and_attention_as_cache_slots(dit):
    inputs = dit_inputs(batch=4)
    cap = capture(dit, (), inputs)
    rm = find_regions(cap.gm)
    plans = cc.Schedule.toca(4, 2, 0.5, score="v_norm+attention").resolve(rm.layout)
    counters.clear()
    full = build_step_graph(cap.gm, rm, plans[0])
    io = full.meta["cachecompile"]
    slots = [state_slot(f"blocks.{i}.attn", s) for i in range(3) for s in ("attention", "v_norm")]
    assert set(slots) <= set(io.cache_outputs) and counters["token_state_writes"] == 6
    with torch.no_grad():
        outs = full(*cap.example_inputs, *[torch.tensor(0)] * len(io.step_inputs))
    by_slot = dict(zip(io.cache_outputs, outs[1:]))
    ref = _hooked(dit, inputs)
    for i in range(3):
        torch.testing.assert_close(by_slot[state_slot(f"blocks.{i}.attn", "v_norm")], ref[i][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(by_slot[state_slot(f"blocks.{i}.attn", "attention")], ref[i][1], rtol=1e-5, atol=1e-5)
    # the fused attention stays: one SDPA per block, the explicit softmax path is extra
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert sum(n.target == sdpa for n in full.graph.nodes) == 3
    assert sum(n.target == torch.ops.aten._softmax.default for n in full.graph.nodes) == 3
    # v_norm alone adds no softmax
    v_only = build_step_graph(cap.gm, rm, cc.Schedule.toca(4, 2, 0.5).resolve(rm.layout)[0])
    assert not [n for n in v_only.graph.nodes if n.target == torch.ops.aten._softmax.default]
    # the output is unchanged by the recording
    torch.testing.assert_close(outs[0], cap.gm(*cap.example_inputs)[0], rtol=0, atol=0)


def test_random_score_adds_no_graphs(dit, labels, sample_kwargs):
    from cachecompile.sampling import ddim_sample

    kw = dict(sample_kwargs, num_steps=18)
    cached = cc.optimize(dit, cc.Schedule.duca(18, 3, 0.5, score="random", seed=5))
    a = ddim_sample(cached, labels, **kw)
    assert len(cached.step_graphs) == 3
    # the step index is a graph input of the conservative step graph, not a constant
    assert sum("step" in g.meta["cachecompile"].step_inputs for g in cached.step_graphs.values()) == 1
    torch.testing.assert_close(ddim_sample(cached, labels, **kw), a, rtol=0, atol=0)  # reproducible
    other = ddim_sample(cc.optimize(dit, cc.Schedule.duca(18, 3, 0.5, score="random", seed=6)), labels, **kw)
    assert (other - a).abs().max() > 1e-4  # the seed matters


def test_partial_without_an_earlier_attention_compute_is_refused():
    s = cc.Schedule.explicit([{"blocks.0.attn": "reuse", "blocks.0.mlp": Partial(ratio=0.5)}])
    with pytest.raises(ScheduleError, match="no earlier step computed blocks.0.attn"):
        s.resolve(cc.Layout(branches=(("attn", "mlp"),)))
    only_mlp = cc.Schedule.explicit([{}, {"blocks.0.mlp": Partial(ratio=0.5)}])
    with pytest.raises(ScheduleError, match="needs the attention branch blocks.0.attn"):
        only_mlp.resolve(cc.Layout(branches=(("mlp",),)))
