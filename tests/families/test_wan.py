"""Wan 2.1 (``WanTransformer3DModel``), a video DiT: 3D patches, rotary embeddings,
self-attention, cross-attention to the text and an MLP per block, gates applied in float32."""

import pytest
import torch

import cachecompile as cc
from cachecompile.passes.capture import capture
from cachecompile.passes.regions import find_regions
from tests.families._common import (
    conservative_graph,
    duca_reference,
    max_diff,
    mlp_rows,
    randomize_zero_parameters,
    reuse_reference,
    sample,
    stack_reference,
)

LAYERS = 2
STEPS = 4


@pytest.fixture(scope="module")
def wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(  # the tiny config of diffusers' Wan tests, 4 latent channels
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return randomize_zero_parameters(model)


g = torch.Generator().manual_seed(0)
X0 = torch.randn(1, 4, 2, 8, 8, generator=g)  # 2 latent frames of 8×8
TEXT = torch.randn(1, 6, 32, generator=g)


def kwargs(x, t):
    return dict(hidden_states=x, timestep=torch.full((1,), 1000.0 * t), encoder_hidden_states=TEXT)


def branch_paths():
    return [f"blocks.{i}.{m}" for i in range(LAYERS) for m in ("attn1", "attn2", "ffn")]


def test_capture_and_regions(wan):
    cap = capture(wan, (), {**kwargs(X0, 0.5), "return_dict": False})
    rm = find_regions(cap.gm, model_class=cap.call.model_class)
    assert rm.layout.branches == (("attn", "cross_attn", "mlp"),) * LAYERS
    assert rm["blocks.1.mlp"].path == "blocks.1.ffn"
    # every block reads the timestep embedding through `temb.float()`, which the tracer records in
    # block 0: that alias is no output of block 0 (cached, it would hold a stale timestep)
    assert all(len(rm[f"blocks.{i}"].outputs) == 1 for i in range(LAYERS))
    assert rm["stack"].outputs == rm["blocks.1"].outputs
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    assert [str(u.target) for u in nodes[rm["blocks.0.attn"].outputs[0]].users] == ["aten.mul.Tensor"]


def test_all_compute_is_the_model(wan):
    cached = cc.optimize(wan, cc.Schedule.fora(STEPS, 1))
    expected = sample(wan, X0, kwargs, STEPS)
    for _ in range(2):
        assert max_diff(sample(cached, X0, kwargs, STEPS), expected) <= 1e-5


def test_fora_matches_eager_reference(wan):
    cached = cc.optimize(wan, cc.Schedule.fora(STEPS, 2))
    ref = reuse_reference(wan, branch_paths(), lambda s: s % 2 == 0)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(wan, X0, kwargs, STEPS)) > 1e-3, "caching changed the result"


def test_block_and_stack_reuse_match_eager_references(wan):
    passthrough = lambda hidden_states, *a, **k: hidden_states  # noqa: E731
    schedule = cc.Schedule.explicit([{}, {"stack": "reuse"}, {"stack": "reuse"}, {}])
    got = sample(cc.optimize(wan, schedule), X0, kwargs, STEPS)
    ref = stack_reference(wan, [f"blocks.{i}" for i in range(LAYERS)], lambda s: s in (0, 3), passthrough)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(wan, X0, kwargs, STEPS)) > 1e-3
    # reusing block 0 alone: block 1 must still see the current timestep embedding
    schedule = cc.Schedule.explicit([{}, {"blocks.0": "reuse"}, {"blocks.0": "reuse"}, {}])
    got = sample(cc.optimize(wan, schedule), X0, kwargs, STEPS)
    ref = reuse_reference(wan, ["blocks.0"], lambda s: s in (0, 3))
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)


def test_duca_matches_eager_reference(wan):
    """fresh_ratio=1: conservative steps reuse every branch but the MLPs, computed for all tokens;
    aggressive steps reuse the stack. A partial ratio recomputes the MLPs on k tokens only."""
    cached = cc.optimize(wan, cc.Schedule.duca(STEPS, 4, 1.0, score="random"))
    ref = duca_reference(wan, 4, [f"blocks.{i}.{m}" for i in range(LAYERS) for m in ("attn1", "attn2")], [f"blocks.{i}.ffn" for i in range(LAYERS)], [f"blocks.{i}" for i in range(LAYERS)], lambda hidden_states, *a, **k: hidden_states)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert len(cached.step_graphs) == 3
    partial = cc.optimize(wan, cc.Schedule.duca(STEPS, 4, 0.5, score="v_norm"))
    out = sample(partial, X0, kwargs, STEPS)
    assert torch.isfinite(out).all() and max_diff(out, got) > 1e-4
    assert mlp_rows(conservative_graph(partial), ".ffn.") == {32 // 2}
