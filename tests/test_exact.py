"""Exact where users go: an all-compute schedule is the model bit for bit, for every family, at
its native resolution, a larger one and a non-square one, and at several batch sizes — with one
optimized model (the batch is dynamic; another resolution captures again)."""

from __future__ import annotations

import pytest
import torch

import cachecompile as cc
from tests.families._common import randomize_zero_parameters


def _dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)

    def call(b, h, w, g):
        return dict(hidden_states=torch.randn(b, 4, h, w, generator=g), timestep=torch.full((b,), 700),
                    class_labels=torch.arange(b) % 10)
    return model, call


def _pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )

    def call(b, h, w, g):
        return dict(hidden_states=torch.randn(b, 4, h, w, generator=g), encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
                    timestep=torch.full((b,), 700.0), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, call


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                  pooled_projection_dim=64, out_channels=4, dual_attention_layers=(0,))

    def call(b, h, w, g):
        return dict(hidden_states=torch.randn(b, 4, h, w, generator=g), encoder_hidden_states=torch.randn(b, 6, 32, generator=g),
                    pooled_projections=torch.randn(b, 64, generator=g), timestep=torch.full((b,), 700.0))
    return model, call


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=[4, 4, 8])

    def call(b, h, w, g):
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1)
        return dict(hidden_states=torch.randn(b, h * w, 4, generator=g), encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
                    pooled_projections=torch.randn(b, 32, generator=g), timestep=torch.full((b,), 0.7),
                    img_ids=ids.reshape(h * w, 3), txt_ids=torch.zeros(5, 3), guidance=None)
    return model, call


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    def call(b, h, w, g):
        return dict(hidden_states=torch.randn(b, 4, 2, h, w, generator=g), timestep=torch.full((b,), 700.0),
                    encoder_hidden_states=torch.randn(b, 6, 32, generator=g))
    return model, call


FAMILIES = {"dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "wan": _wan}
# (height, width) in latent cells: native, larger, non-square (Flux's are packed tokens, any size).
# diffusers' DiT unpatchifies as a square (a non-square input gives a wrong batch even uncached).
SIZES = {"dit": [(8, 8), (16, 16), (12, 12)]}
DEFAULT_SIZES = [(8, 8), (16, 16), (8, 12)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_compute_is_the_model_at_every_resolution_and_batch(family):
    model, call = FAMILIES[family]()
    model = randomize_zero_parameters(model)
    cached = cc.optimize(model, cc.Schedule.fora(interval=1))
    g = torch.Generator().manual_seed(0)
    sizes = SIZES.get(family, DEFAULT_SIZES)
    for h, w in sizes:
        for batch in (2, 1, 3):
            kw = dict(call(batch, h, w, g), return_dict=False)
            with torch.no_grad():
                got, want = cached(**kw)[0], model(**kw)[0]
            assert torch.equal(got, want), f"{family} at {h}×{w}, batch {batch}: max |diff| {(got - want).abs().max():.3g}"
            cached.reset()
    assert cached.captures == len(sizes), "one capture per resolution, every batch size on it"
