"""PixArt (``PixArtTransformer2DModel``): self-attention, cross-attention and MLP per block."""

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
def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(  # the tiny config of diffusers' PixArt pipeline tests
        sample_size=8, num_layers=LAYERS, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return randomize_zero_parameters(model)


g = torch.Generator().manual_seed(0)
X0 = torch.randn(2, 4, 8, 8, generator=g)
TEXT = torch.randn(2, 5, 32, generator=g)
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def kwargs(x, t):
    return dict(
        hidden_states=x, encoder_hidden_states=TEXT, encoder_attention_mask=MASK,
        timestep=torch.full((2,), 999.0 * t), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def branch_paths():
    return [f"transformer_blocks.{i}.{m}" for i in range(LAYERS) for m in ("attn1", "attn2", "ff")]


def test_capture_and_regions(pixart):
    cap = capture(pixart, (), {**kwargs(X0, 0.5), "return_dict": False})
    rm = find_regions(cap.gm, model_class=cap.call.model_class)
    assert rm.layout.branches == (("attn", "cross_attn", "mlp"),) * LAYERS
    assert len(rm.regions) == LAYERS * 4 + 1
    assert rm["blocks.1.cross_attn"].path == "transformer_blocks.1.attn2"
    assert rm["stack"].path == "transformer_blocks.0..transformer_blocks.1"
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    users = lambda region: {str(u.target) for o in rm[region].outputs for u in nodes[o].users}  # noqa: E731
    # self-attention and MLP are cached before their adaLN gate; cross-attention has no gate
    assert users("blocks.0.attn") == users("blocks.0.mlp") == {"aten.mul.Tensor"}
    assert users("blocks.0.cross_attn") == {"aten.add.Tensor"}


def test_all_compute_is_the_model(pixart):
    cached = cc.optimize(pixart, cc.Schedule.fora(STEPS, 1))
    expected = sample(pixart, X0, kwargs, STEPS)
    for _ in range(2):
        assert max_diff(sample(cached, X0, kwargs, STEPS), expected) <= 1e-5
    assert len(cached.step_graphs) == 1


def test_fora_matches_eager_reference(pixart):
    cached = cc.optimize(pixart, cc.Schedule.fora(STEPS, 2))
    ref = reuse_reference(pixart, branch_paths(), lambda s: s % 2 == 0)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(pixart, X0, kwargs, STEPS)) > 1e-3, "caching changed the result"
    assert len(cached.step_graphs) == 2


def test_stack_reuse_matches_eager_reference(pixart):
    schedule = cc.Schedule.explicit([{}, {"stack": "reuse"}, {"stack": "reuse"}, {}])
    cached = cc.optimize(pixart, schedule)
    blocks = [f"transformer_blocks.{i}" for i in range(LAYERS)]
    ref = stack_reference(pixart, blocks, lambda s: s in (0, 3), lambda hidden_states, *a, **k: hidden_states)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(pixart, X0, kwargs, STEPS)) > 1e-3
    reuse_graph = next(gm for plan, gm in cached.step_graphs.items() if not plan.is_full)
    ops = [str(n.target) for n in reuse_graph.graph.nodes]
    assert "aten.scaled_dot_product_attention.default" not in ops


def test_duca_matches_eager_reference(pixart):
    """fresh_ratio=1: conservative steps reuse every branch but the MLPs, computed for all tokens;
    aggressive steps reuse the stack. A partial ratio recomputes the MLPs on k tokens only."""
    cached = cc.optimize(pixart, cc.Schedule.duca(STEPS, 4, 1.0, score="random"))
    ref = duca_reference(pixart, 4, [f"transformer_blocks.{i}.{m}" for i in range(LAYERS) for m in ("attn1", "attn2")], [f"transformer_blocks.{i}.ff" for i in range(LAYERS)], [f"transformer_blocks.{i}" for i in range(LAYERS)], lambda hidden_states, *a, **k: hidden_states)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert len(cached.step_graphs) == 3
    partial = cc.optimize(pixart, cc.Schedule.duca(STEPS, 4, 0.5, score="v_norm"))
    out = sample(partial, X0, kwargs, STEPS)
    assert torch.isfinite(out).all() and max_diff(out, got) > 1e-4
    assert mlp_rows(conservative_graph(partial), ".ff.") == {16 // 2}
