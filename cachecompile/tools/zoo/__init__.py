"""The models the tools run: the trained digits DiT, DiT-S/2-shaped random models (speed only),
a tiny one, or a user's ``module:attr``; plus the training and evaluation scripts of the models
shipped in :mod:`cachecompile.models` (:mod:`.train_digits`, :mod:`.eval_digits`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["BenchModel", "MODELS", "load_bench_model", "default_model_name", "tie_block_embedders"]


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    sample_size: int
    in_channels: int
    null_class: int
    num_classes: int
    trained: bool = False  # quality numbers (classifier accuracy, FID analogue) are meaningful


def _random_dit(name: str, *, tied_embedders: bool = False, **cfg: Any) -> BenchModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(norm_type="ada_norm_zero", **cfg).eval()
    if tied_embedders:
        tie_block_embedders(m)
    n = cfg["num_embeds_ada_norm"]
    return BenchModel(name, m, cfg["sample_size"], cfg["in_channels"], n, n)


def tie_block_embedders(model: torch.nn.Module) -> None:
    """Give every block's timestep/label embedder (``transformer_blocks.<i>.norm1.emb``) the
    values of block 0's, as a DiT checkpoint converted to diffusers' format has them: DiT has one
    ``t_embedder``/``y_embedder``, and the conversion copies it into every block. Separate
    tensors with equal values, not shared parameters."""
    blocks = model.transformer_blocks
    first = blocks[0].norm1.emb.state_dict()
    with torch.no_grad():
        for block in blocks[1:]:
            block.norm1.emb.load_state_dict(first)


def _digits() -> BenchModel:
    from cachecompile.models import DIGITS_CONFIG, digits_dit

    c = DIGITS_CONFIG
    return BenchModel("digits", digits_dit(), c.sample_size, c.in_channels, c.null_class, c.num_classes, trained=True)


_DIT_S2 = dict(
    num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
    sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
)

MODELS: dict[str, Callable[[], BenchModel]] = {
    "digits": _digits,
    # DiT-S/2: hidden 384, 12 layers, 6 heads, 32×32 latent, patch 2 (random weights: speed only),
    # one timestep/label embedder copied into every block as in converted DiT checkpoints;
    # dit-s2-untied keeps diffusers' random init (a distinct embedder per block, as a model
    # trained from scratch in diffusers' format has).
    "dit-s2": lambda: _random_dit("dit-s2", tied_embedders=True, **_DIT_S2),
    "dit-s2-untied": lambda: _random_dit("dit-s2-untied", **_DIT_S2),
    "tiny": lambda: _random_dit(
        "tiny", num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10,
    ),
}


def load_bench_model(name: str) -> BenchModel:
    """A model by name (``digits``, ``dit-s2``, ``dit-s2-untied``, ``tiny``) or a user's ``module:attr`` (a
    ``BenchModel``, a DiT-like module, or a function returning either)."""
    if name in MODELS:
        return MODELS[name]()
    if ":" in name:
        mod, attr = name.split(":", 1)
        obj = getattr(importlib.import_module(mod), attr)
        obj = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
        if isinstance(obj, BenchModel):
            return obj
        cfg = obj.config
        n = cfg.num_embeds_ada_norm
        return BenchModel(name, obj.eval(), cfg.sample_size, cfg.in_channels, n, n)
    raise SystemExit(f"unknown model {name!r}: use one of {sorted(MODELS)} or module:attr")


def default_model_name() -> str:
    """``digits`` when the trained weights ship (a source checkout may lack them), else ``tiny``."""
    try:
        from cachecompile.models.digits import DIT_WEIGHTS, WEIGHTS_DIR

        return "digits" if (Path(WEIGHTS_DIR) / DIT_WEIGHTS).exists() else "tiny"
    except Exception:  # the models package is optional in a trimmed install
        return "tiny"



