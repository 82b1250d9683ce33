"""Tiny random models of every family for the fuzz tests, each described by its diffusers module
paths only (blocks in execution order, branch kind → submodule), never by cachecompile's regions.

The configurations are those of ``tests/families`` (diffusers' own pipeline-test sizes). Models
are built once per process and cached (:func:`model`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from tests.conftest import TINY_DIT
from tests.families._common import randomize_zero_parameters


@dataclass(frozen=True)
class Family:
    """What the reference needs to know about a family, in diffusers' own terms.

    ``blocks``: block module paths in execution order; ``branches[i]``: branch kind → submodule
    name inside block ``i``; ``tuple_blocks``: blocks return ``(encoder_hidden_states,
    hidden_states)`` (MM-DiT) instead of ``hidden_states``; ``scores``: the token scores the
    family's partial regions can use (joint attention covers text + image tokens, so attention
    state cannot rank an image MLP's tokens); ``partial_kinds``: branch kinds that are token-wise.
    """

    name: str
    build: Callable[[], torch.nn.Module]
    blocks: tuple[str, ...]
    branches: tuple[tuple[tuple[str, str], ...], ...]
    inputs: Callable[[int, torch.Generator], dict]  # batch, generator → fixed inputs (text, labels ...)
    latent: Callable[[int], tuple[int, ...]]  # batch → shape of x
    call: Callable[[torch.Tensor, float, dict], dict]  # x, t, fixed → the model's keyword arguments
    tuple_blocks: bool = False
    scores: tuple[str, ...] = ("attention", "random", "staleness", "v_norm")
    partial_kinds: tuple[str, ...] = ("mlp",)
    extra: dict = field(default_factory=dict)

    def kinds(self, block: int) -> tuple[str, ...]:
        return tuple(k for k, _ in self.branches[block])

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def branch_regions(self) -> list[str]:
        return [f"blocks.{i}.{k}" for i in range(self.num_blocks) for k in self.kinds(i)]

    def all_kinds(self) -> tuple[str, ...]:
        out: list[str] = []
        for i in range(self.num_blocks):
            out += [k for k in self.kinds(i) if k not in out]
        return tuple(out)


# --------------------------------------------------------------------------- DiT


def _dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return randomize_zero_parameters(DiTTransformer2DModel(**TINY_DIT))


DIT = Family(
    "dit", _dit,
    blocks=tuple(f"transformer_blocks.{i}" for i in range(3)),
    branches=((("attn", "attn1"), ("mlp", "ff")),) * 3,
    inputs=lambda b, g: {"class_labels": torch.randint(0, 11, (b,), generator=g)},
    latent=lambda b: (b, 4, 8, 8),
    call=lambda x, t, f: dict(hidden_states=x, timestep=torch.full((x.shape[0],), 999.0 * t), class_labels=f["class_labels"]),
)


# --------------------------------------------------------------------------- PixArt


def _pixart() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return randomize_zero_parameters(PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ))


def _pixart_inputs(b: int, g: torch.Generator) -> dict:
    mask = torch.ones(b, 5, dtype=torch.int64)
    mask[0, 3:] = 0  # one sample with padding
    return {"text": torch.randn(b, 5, 32, generator=g), "mask": mask}


PIXART = Family(
    "pixart", _pixart,
    blocks=("transformer_blocks.0", "transformer_blocks.1"),
    branches=((("attn", "attn1"), ("cross_attn", "attn2"), ("mlp", "ff")),) * 2,
    inputs=_pixart_inputs,
    latent=lambda b: (b, 4, 8, 8),
    call=lambda x, t, f: dict(
        hidden_states=x, encoder_hidden_states=f["text"], encoder_attention_mask=f["mask"],
        timestep=torch.full((x.shape[0],), 999.0 * t), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ),
)


# --------------------------------------------------------------------------- SD3


def _sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return randomize_zero_parameters(SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        dual_attention_layers=(0,),
    ))


SD3 = Family(
    "sd3", _sd3,
    blocks=("transformer_blocks.0", "transformer_blocks.1"),
    branches=(
        (("attn", "attn"), ("attn2", "attn2"), ("mlp", "ff"), ("mlp_context", "ff_context")),
        (("attn", "attn"), ("mlp", "ff")),  # the last block has no text MLP
    ),
    inputs=lambda b, g: {"text": torch.randn(b, 6, 32, generator=g), "pooled": torch.randn(b, 64, generator=g)},
    latent=lambda b: (b, 4, 8, 8),
    call=lambda x, t, f: dict(
        hidden_states=x, encoder_hidden_states=f["text"], pooled_projections=f["pooled"],
        timestep=torch.full((x.shape[0],), 1000.0 * t), joint_attention_kwargs=None,
    ),
    tuple_blocks=True,
    scores=("random", "staleness"),
    partial_kinds=("mlp", "mlp_context"),
)


# --------------------------------------------------------------------------- FLUX


def _flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return randomize_zero_parameters(FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ))


_IMG_IDS = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)

FLUX = Family(
    "flux", _flux,
    blocks=("transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"),
    branches=(
        (("attn", "attn"), ("mlp", "ff"), ("mlp_context", "ff_context")),
        (("parallel", "proj_out"),),
        (("parallel", "proj_out"),),
    ),
    inputs=lambda b, g: {"text": torch.randn(b, 5, 32, generator=g), "pooled": torch.randn(b, 32, generator=g)},
    latent=lambda b: (b, 16, 4),
    call=lambda x, t, f: dict(
        hidden_states=x, encoder_hidden_states=f["text"], pooled_projections=f["pooled"],
        timestep=torch.full((x.shape[0],), t), img_ids=_IMG_IDS, txt_ids=torch.zeros(5, 3), guidance=None,
        joint_attention_kwargs=None,
    ),
    tuple_blocks=True,
    scores=("random", "staleness"),
    partial_kinds=("mlp", "mlp_context", "parallel"),
)


# --------------------------------------------------------------------------- Wan


def _wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return randomize_zero_parameters(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ))


WAN = Family(
    "wan", _wan,
    blocks=("blocks.0", "blocks.1"),
    branches=((("attn", "attn1"), ("cross_attn", "attn2"), ("mlp", "ffn")),) * 2,
    inputs=lambda b, g: {"text": torch.randn(b, 6, 32, generator=g)},
    latent=lambda b: (b, 4, 2, 8, 8),
    call=lambda x, t, f: dict(hidden_states=x, timestep=torch.full((x.shape[0],), 1000.0 * t), encoder_hidden_states=f["text"]),
)

FAMILIES = {f.name: f for f in (DIT, PIXART, SD3, FLUX, WAN)}


@functools.lru_cache(maxsize=None)
def model(name: str) -> torch.nn.Module:
    """The family's tiny model, built once per process (never modified by the tests)."""
    return FAMILIES[name].build()
