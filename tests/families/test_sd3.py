"""SD3 / SD3.5 (``SD3Transformer2DModel``): MM-DiT blocks, joint attention over the image and
text streams (a region with two outputs), an MLP per stream; SD3.5's second self-attention."""

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
def sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(  # diffusers' pipeline-test config, 2 layers, SD3.5 dual attention in block 0
        sample_size=8, patch_size=1, in_channels=4, num_layers=LAYERS, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        dual_attention_layers=(0,),
    )
    return randomize_zero_parameters(model)


g = torch.Generator().manual_seed(0)
X0 = torch.randn(2, 4, 8, 8, generator=g)
TEXT = torch.randn(2, 6, 32, generator=g)
POOLED = torch.randn(2, 64, generator=g)


def kwargs(x, t):
    return dict(
        hidden_states=x, encoder_hidden_states=TEXT, pooled_projections=POOLED,
        timestep=torch.full((2,), 1000.0 * t), joint_attention_kwargs=None,
    )


def branch_paths():
    paths = ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    return paths + ["transformer_blocks.1.attn", "transformer_blocks.1.ff"]  # the last block has no text MLP


def test_capture_and_regions(sd3):
    cap = capture(sd3, (), {**kwargs(X0, 0.5), "return_dict": False})
    rm = find_regions(cap.gm, model_class=cap.call.model_class)
    assert rm.layout.branches == (("attn", "attn2", "mlp", "mlp_context"), ("attn", "mlp"))
    assert len(rm.regions) == 4 + 2 + LAYERS + 1
    assert rm["blocks.0.mlp_context"].path == "transformer_blocks.0.ff_context"
    # joint attention: image and text outputs, two cache slots; the last block's text output is unused
    assert rm["blocks.0.attn"].slots == ["blocks.0.attn#0", "blocks.0.attn#1"]
    assert len(rm["blocks.1.attn"].outputs) == 1
    assert len(rm["blocks.0"].outputs) == 2 and len(rm["stack"].outputs) == 1
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    for name in ("blocks.0.attn", "blocks.0.attn2", "blocks.0.mlp", "blocks.0.mlp_context", "blocks.1.attn"):
        for out in rm[name].outputs:  # every branch output is cached before its gate
            assert [str(u.target) for u in nodes[out].users] == ["aten.mul.Tensor"], name


def test_all_compute_is_the_model(sd3):
    cached = cc.optimize(sd3, cc.Schedule.fora(STEPS, 1))
    expected = sample(sd3, X0, kwargs, STEPS)
    for _ in range(2):
        assert max_diff(sample(cached, X0, kwargs, STEPS), expected) <= 1e-5


def test_fora_matches_eager_reference(sd3):
    cached = cc.optimize(sd3, cc.Schedule.fora(STEPS, 2))
    ref = reuse_reference(sd3, branch_paths(), lambda s: s % 2 == 0)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(sd3, X0, kwargs, STEPS)) > 1e-3, "caching changed the result"
    # full steps write exactly what cached steps read: of block 0's joint attention only the image
    # output; its text output feeds only block 1's attention, which cached steps reuse (the last
    # block's text stream is unused), so that write is dropped as dead
    full = next(gm for plan, gm in cached.step_graphs.items() if plan.is_full)
    reuse = next(gm for plan, gm in cached.step_graphs.items() if not plan.is_full)
    written, read = full.meta["cachecompile"].cache_outputs, reuse.meta["cachecompile"].cache_inputs
    assert sorted(written) == sorted(read)
    assert len({"blocks.0.attn#0", "blocks.0.attn#1"} & set(written)) == 1


def test_stack_reuse_matches_eager_reference(sd3):
    schedule = cc.Schedule.explicit([{}, {"stack": "reuse"}, {"stack": "reuse"}, {}])
    cached = cc.optimize(sd3, schedule)
    blocks = [f"transformer_blocks.{i}" for i in range(LAYERS)]
    passthrough = lambda hidden_states, encoder_hidden_states, **k: (encoder_hidden_states, hidden_states)  # noqa: E731
    ref = stack_reference(sd3, blocks, lambda s: s in (0, 3), passthrough)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(sd3, X0, kwargs, STEPS)) > 1e-3


def test_duca_matches_eager_reference(sd3):
    """fresh_ratio=1: conservative steps reuse every branch but the MLPs, computed for all tokens;
    aggressive steps reuse the stack. A partial ratio recomputes the MLPs on k tokens only."""
    cached = cc.optimize(sd3, cc.Schedule.duca(STEPS, 4, 1.0, score="random"))
    ref = duca_reference(sd3, 4, ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.0.ff_context", "transformer_blocks.1.attn"], ["transformer_blocks.0.ff", "transformer_blocks.1.ff"], [f"transformer_blocks.{i}" for i in range(LAYERS)], lambda hidden_states, encoder_hidden_states, **k: (encoder_hidden_states, hidden_states))
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert len(cached.step_graphs) == 3
    partial = cc.optimize(sd3, cc.Schedule.duca(STEPS, 4, 0.5, score="random"))
    out = sample(partial, X0, kwargs, STEPS)
    assert torch.isfinite(out).all() and max_diff(out, got) > 1e-4
    assert mlp_rows(conservative_graph(partial), ".ff.") == {64 // 2}


def test_value_norm_score_over_joint_attention_is_refused(sd3):
    """Joint attention attends over image + text tokens (70) while the image MLP sees 64: the
    v_norm score cannot rank the MLP's tokens, and says so when the step graph is built."""
    from cachecompile.methods.dual.scores import TokenScoreError

    cached = cc.optimize(sd3, cc.Schedule.duca(STEPS, 3, 0.5, score="v_norm"))
    with pytest.raises(TokenScoreError, match=r"shape \(2, 70\).*2 samples × 64 tokens.*score='random'"):
        sample(cached, X0, kwargs, STEPS)
    assert not cached.is_captured
