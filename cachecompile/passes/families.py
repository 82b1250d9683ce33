"""Region defaults of the diffusers DiT families, registered by model class name.

Each family says where its blocks are and which module call inside a block is each branch.
A branch region's outputs are that module's outputs, which in every family below are taken
*before* the block's gate, so gates (functions of the current timestep) are always recomputed.

========================  =====================================  ===================================
family                    blocks (numbered in execution order)   branches (kind → module in block)
========================  =====================================  ===================================
DiTTransformer2DModel     ``transformer_blocks.*``               attn → attn1, mlp → ff
PixArtTransformer2DModel  ``transformer_blocks.*``               attn → attn1, cross_attn → attn2,
                                                                 mlp → ff
SD3Transformer2DModel     ``transformer_blocks.*``               attn → attn (joint: 2 outputs),
                                                                 attn2 → attn2 (SD3.5 dual attn),
                                                                 mlp → ff, mlp_context → ff_context
FluxTransformer2DModel    ``transformer_blocks.*`` then          double-stream: as SD3;
                          ``single_transformer_blocks.*``        single-stream: parallel → proj_out
WanTransformer3DModel     ``blocks.*``                           attn → attn1, cross_attn → attn2,
                                                                 mlp → ffn
========================  =====================================  ===================================

What is cached, where it is not simply "a branch before its gate":

* Cross-attention (PixArt ``attn2``, Wan ``attn2``) has no gate: its output is added to the
  stream as is. Caching it is exact up to the change of its query (the stream) between steps.
* Joint attention (SD3, FLUX double-stream) returns the image and the text stream's attention
  outputs; the region has two outputs, cached as slots ``blocks.{i}.attn#0`` / ``#1``. In SD3's
  last block (``context_pre_only``) the text output is unused, so that region has one output.
* FLUX single-stream blocks run attention and MLP in parallel on one normalised input and merge
  them with ``proj_out``: ``gate * proj_out(cat(attn(x), act(proj_mlp(x))))``. The branch is
  ``parallel`` = the output of ``proj_out`` (before the gate): reusing it skips attention, both
  MLP projections and ``proj_out``. ToCa/DuCa conservative steps reuse it (they partially
  recompute only branches of kind ``mlp``: here the double-stream blocks' image MLP).
* ToCa/DuCa token scores from attention (``v_norm``, ``attention``) assume the attention's
  tokens are the MLP's tokens. Joint attention (SD3, FLUX double-stream) runs over image and
  text tokens together: use ``score="random"`` or ``"staleness"`` there.
* Wan applies its gates in float32 (``ffn(x).float() * gate``); the cached ``mlp`` output is the
  ``ffn`` output in the model's dtype, before that cast.

Register another family with :func:`register_family`, or pass ``regions=cc.RegionPatterns(...)``
to :func:`cachecompile.optimize`.

>>> patterns_for("FluxTransformer2DModel").blocks
('transformer_blocks.*', 'single_transformer_blocks.*')
"""

from __future__ import annotations

from cachecompile.core.regions import RegionPatterns

__all__ = ["FAMILIES", "DEFAULT_PATTERNS", "register_family", "patterns_for"]

# MM-DiT blocks (SD3, FLUX double-stream): joint attention over both streams, an MLP per stream.
_MMDIT = {"attn": "attn", "attn2": "attn2", "mlp": "ff", "mlp_context": "ff_context"}

FAMILIES: dict[str, RegionPatterns] = {
    "DiTTransformer2DModel": RegionPatterns(),
    "PixArtTransformer2DModel": RegionPatterns(
        blocks=("transformer_blocks.*",), branches={"attn": "attn1", "cross_attn": "attn2", "mlp": "ff"}
    ),
    "SD3Transformer2DModel": RegionPatterns(blocks=("transformer_blocks.*",), branches=_MMDIT),
    "FluxTransformer2DModel": RegionPatterns(
        blocks=("transformer_blocks.*", "single_transformer_blocks.*"),
        branches=_MMDIT,
        block_branches={"single_transformer_blocks.*": {"parallel": "proj_out"}},
    ),
    "WanTransformer3DModel": RegionPatterns(
        blocks=("blocks.*",), branches={"attn": "attn1", "cross_attn": "attn2", "mlp": "ffn"}
    ),
}

# Any model whose blocks are diffusers BasicTransformerBlocks (attn1 / ff; attn2 is the cross-attention).
DEFAULT_PATTERNS = RegionPatterns(
    blocks=("transformer_blocks.*",),
    branches={"attn": "attn1", "cross_attn": "attn2", "mlp": "ff"},
)


def register_family(class_name: str, patterns: RegionPatterns) -> None:
    """Register the region patterns of a model family (by the model's class name)."""
    FAMILIES[class_name] = patterns


def patterns_for(model_class_name: str) -> RegionPatterns:
    """The registered patterns of a model class (by name), else :data:`DEFAULT_PATTERNS`."""
    return FAMILIES.get(model_class_name, DEFAULT_PATTERNS)
