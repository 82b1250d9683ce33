"""FLUX (``FluxTransformer2DModel``): double-stream blocks (joint attention with two outputs, an
MLP per stream), then single-stream blocks (attention ∥ MLP merged by ``proj_out``); rotary
embeddings from ``img_ids``/``txt_ids``. Blocks of both groups are numbered in execution order."""

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

DOUBLE, SINGLE = 1, 2
STEPS = 4


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(  # diffusers' pipeline-test config with two single-stream blocks
        patch_size=1, in_channels=4, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    return randomize_zero_parameters(model)


g = torch.Generator().manual_seed(0)
X0 = torch.randn(1, 16, 4, generator=g)  # 4×4 latent patches, packed
TEXT = torch.randn(1, 5, 32, generator=g)
POOLED = torch.randn(1, 32, generator=g)
IMG_IDS = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
TXT_IDS = torch.zeros(5, 3)


def kwargs(x, t):
    return dict(
        hidden_states=x, encoder_hidden_states=TEXT, pooled_projections=POOLED, timestep=torch.full((1,), t),
        img_ids=IMG_IDS, txt_ids=TXT_IDS, guidance=None, joint_attention_kwargs=None,
    )


def branch_paths():
    double = [f"transformer_blocks.{i}.{m}" for i in range(DOUBLE) for m in ("attn", "ff", "ff_context")]
    return double + [f"single_transformer_blocks.{i}.proj_out" for i in range(SINGLE)]


def block_paths():
    return [f"transformer_blocks.{i}" for i in range(DOUBLE)] + [f"single_transformer_blocks.{i}" for i in range(SINGLE)]


def test_capture_and_regions(flux):
    cap = capture(flux, (), {**kwargs(X0, 0.5), "return_dict": False})
    rm = find_regions(cap.gm, model_class=cap.call.model_class)
    assert rm.layout.branches == (("attn", "mlp", "mlp_context"), ("parallel",), ("parallel",))
    assert [rm[f"blocks.{i}"].path for i in range(3)] == block_paths()
    assert rm["blocks.2.parallel"].path == "single_transformer_blocks.1.proj_out"
    assert rm["stack"].path == "transformer_blocks.0..single_transformer_blocks.1"
    assert len(rm["blocks.0.attn"].outputs) == 2  # image and text attention outputs
    assert len(rm["blocks.0"].outputs) == 2 and len(rm["stack"].outputs) == 1
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    for name in ("blocks.0.attn", "blocks.0.mlp", "blocks.0.mlp_context", "blocks.1.parallel"):
        for out in rm[name].outputs:  # cached before the gate
            assert [str(u.target) for u in nodes[out].users] == ["aten.mul.Tensor"], name


def test_all_compute_is_the_model(flux):
    cached = cc.optimize(flux, cc.Schedule.fora(STEPS, 1))
    expected = sample(flux, X0, kwargs, STEPS)
    for _ in range(2):
        assert max_diff(sample(cached, X0, kwargs, STEPS), expected) <= 1e-5


def test_fora_matches_eager_reference(flux):
    cached = cc.optimize(flux, cc.Schedule.fora(STEPS, 2))
    ref = reuse_reference(flux, branch_paths(), lambda s: s % 2 == 0)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(flux, X0, kwargs, STEPS)) > 1e-3, "caching changed the result"
    # a cached step runs no attention at all: single-stream blocks skip theirs with proj_out
    cached_graph = next(gm for plan, gm in cached.step_graphs.items() if not plan.is_full)
    assert "aten.scaled_dot_product_attention.default" not in [str(n.target) for n in cached_graph.graph.nodes]


def test_stack_reuse_matches_eager_reference(flux):
    schedule = cc.Schedule.explicit([{}, {"stack": "reuse"}, {"stack": "reuse"}, {}])
    cached = cc.optimize(flux, schedule)
    passthrough = lambda hidden_states, encoder_hidden_states, **k: (encoder_hidden_states, hidden_states)  # noqa: E731
    ref = stack_reference(flux, block_paths(), lambda s: s in (0, 3), passthrough)
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert max_diff(got, sample(flux, X0, kwargs, STEPS)) > 1e-3


def test_duca_matches_eager_reference(flux):
    """fresh_ratio=1: conservative steps reuse every branch but the MLPs, computed for all tokens;
    aggressive steps reuse the stack. A partial ratio recomputes the MLPs on k tokens only."""
    cached = cc.optimize(flux, cc.Schedule.duca(STEPS, 4, 1.0, score="random"))
    ref = duca_reference(flux, 4, ["transformer_blocks.0.attn", "transformer_blocks.0.ff_context"] + [f"single_transformer_blocks.{i}.proj_out" for i in range(SINGLE)], ["transformer_blocks.0.ff"], block_paths(), lambda hidden_states, encoder_hidden_states, **k: (encoder_hidden_states, hidden_states))
    got = sample(cached, X0, kwargs, STEPS)
    torch.testing.assert_close(got, sample(ref, X0, kwargs, STEPS), rtol=0, atol=1e-5)
    assert len(cached.step_graphs) == 3
    partial = cc.optimize(flux, cc.Schedule.duca(STEPS, 4, 0.5, score="random"))
    out = sample(partial, X0, kwargs, STEPS)
    assert torch.isfinite(out).all() and max_diff(out, got) > 1e-4
    assert mlp_rows(conservative_graph(partial), ".ff.") == {16 // 2}


def test_guidance_distilled_flux_takes_the_guidance_input():
    """FLUX.1-dev embeds the guidance scale: one more tensor input, same regions."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    dev = randomize_zero_parameters(FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ))
    with_guidance = lambda x, t: {**kwargs(x, t), "guidance": torch.full((1,), 3.5)}  # noqa: E731
    cached = cc.optimize(dev, cc.Schedule.fora(STEPS, 2))
    ref = reuse_reference(dev, branch_paths(), lambda s: s % 2 == 0)
    torch.testing.assert_close(sample(cached, X0, with_guidance, STEPS), sample(ref, X0, with_guidance, STEPS), rtol=0, atol=1e-5)
    assert [leaf.name for leaf in cached.program.call.tensor_leaves if leaf.name == "guidance"] == ["guidance"]
