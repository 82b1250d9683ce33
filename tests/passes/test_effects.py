"""Side effects and mutation: no pass merges, moves or drops what an in-place op or RNG touches."""

import pytest
import torch

import cachecompile as cc
from cachecompile.passes.capture import capture
from cachecompile.passes.cse import merge_common_subexpressions
from cachecompile.passes.effects import frozen_nodes, has_side_effects, mutated_nodes
from tests.conftest import make_dit

ARANGE = torch.ops.aten.arange.default


class TwoMutatedAranges(torch.nn.Module):
    """Two identical ``arange`` nodes, each divided in place by a different amount (diffusers'
    sin-cos position embedding does this at run time off its native size)."""

    def forward(self, x):
        a = torch.arange(x.shape[-1], dtype=torch.float32)
        a /= 2.0
        b = torch.arange(x.shape[-1], dtype=torch.float32)
        b /= 3.0
        return x + a + b + torch.arange(x.shape[-1], dtype=torch.float32) + torch.arange(x.shape[-1], dtype=torch.float32)


def test_mutated_values_and_their_readers_are_frozen_pure_repeats_are_not():
    x = torch.randn(2, 5)
    gm = capture(TwoMutatedAranges(), (x,)).gm
    aranges = [n for n in gm.graph.nodes if n.target == ARANGE]
    assert len(aranges) == 4
    mutated = mutated_nodes(gm.graph)
    assert sum(n in mutated for n in aranges) == 2  # the two divided in place
    frozen = frozen_nodes(gm.graph)
    assert all(n in frozen for n in mutated)
    merged = merge_common_subexpressions(gm)
    merged.recompile()
    # the two untouched aranges merge into one; the mutated ones stay apart
    assert sum(n.target == ARANGE for n in merged.graph.nodes) == 3
    assert torch.equal(merged(x)[0], TwoMutatedAranges()(x))


def test_attention_without_dropout_is_pure_random_ops_are_not():
    class M(torch.nn.Module):
        def forward(self, q, mask):
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            b = torch.nn.functional.scaled_dot_product_attention(q, q, q, mask, 0.0)  # dropout_p positional
            c = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
            return a, b, c, torch.rand_like(q)

    gm = capture(M(), (torch.randn(1, 2, 4, 8), torch.zeros(4, 4))).gm
    sdpa = [n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert [has_side_effects(n) for n in sdpa] == [False, False, True]
    assert has_side_effects(next(n for n in gm.graph.nodes if "rand" in str(n.target)))


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (12, 12)])
def test_dit_all_compute_is_the_model_at_native_and_other_resolutions(size):
    model = make_dit()  # native 8×8 latents; other sizes build the position embedding at run time
    # (diffusers' DiT unpatchifies as a square: non-square inputs are the other families' business)
    g = torch.Generator().manual_seed(0)
    call = dict(hidden_states=torch.randn(2, 4, *size, generator=g), timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 7]))
    cached = cc.optimize(model, cc.Schedule.fora(2, 1))
    with torch.no_grad():
        assert torch.equal(cached(**call).sample, model(**call).sample)


@pytest.mark.parametrize("size", [(16, 16), (8, 12)])
def test_pixart_all_compute_is_the_model_off_its_native_resolution(size):
    from diffusers import PixArtTransformer2DModel

    from tests.families._common import randomize_zero_parameters

    torch.manual_seed(0)
    model = randomize_zero_parameters(PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ))
    g = torch.Generator().manual_seed(0)
    call = dict(
        hidden_states=torch.randn(2, 4, *size, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        timestep=torch.tensor([900, 900]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    cached = cc.optimize(model, cc.Schedule.fora(2, 1))
    with torch.no_grad():
        assert torch.equal(cached(**call).sample, model(**call).sample)
