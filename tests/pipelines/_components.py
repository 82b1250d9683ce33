"""Small random pipeline components, built the way diffusers' own pipeline tests build them
(``get_dummy_components``), without the hub: the text encoders come from config objects and
the tokenizers from vocabulary files written to a temporary directory.

Also an eager reference for pipelines: a copy of the transformer (a real diffusers model, so the
pipeline reads its ``config``) whose branch modules reuse their outputs on the cached steps.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from tests.families._common import randomize_zero_parameters

TEXT_WORDS = "a painting of squirrel eating burger cat dog photo bad quality blurry".split()


@functools.lru_cache(maxsize=None)
def _tokenizer_dir() -> Path:
    """vocab.json + merges.txt of a byte-level BPE (CLIP's format: every byte, no merges) and a
    word-level tokenizer.json (standing in for T5's sentencepiece model)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    root = Path(tempfile.mkdtemp(prefix="cachecompile-tokenizers-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    clip = root / "clip"
    clip.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (clip / "vocab.json").write_text(json.dumps(vocab))
    (clip / "merges.txt").write_text("#version: 0.2\n")
    words = ["<pad>", "</s>", "<unk>"] + TEXT_WORDS
    t5 = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t5.normalizer = normalizers.Lowercase()
    t5.pre_tokenizer = pre_tokenizers.Whitespace()
    t5.save(str(root / "t5-tokenizer.json"))
    return root


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(_tokenizer_dir() / "clip"), model_max_length=77)


def t5_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(_tokenizer_dir() / "t5-tokenizer.json"),
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512,
    )


def clip_text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(  # diffusers' pipeline tests' tiny CLIP
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
        projection_dim=32,
    )


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(  # the shape of hf-internal-testing/tiny-random-t5
        vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, **extra,
    ).eval()


# ------------------------------------------------------------------------------ pipelines


def dit_components() -> dict:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(  # diffusers' DiT pipeline test config
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    return dict(transformer=randomize_zero_parameters(transformer), vae=tiny_vae(), scheduler=DDIMScheduler())


def tiny_pixart() -> torch.nn.Module:
    """The tiny PixArt transformer of diffusers' PixArt pipeline tests, zero parameters randomised."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return randomize_zero_parameters(transformer)


def pixart_components() -> dict:
    from diffusers import DDIMScheduler

    return dict(
        transformer=tiny_pixart(), vae=tiny_vae(), scheduler=DDIMScheduler(),
        text_encoder=t5_encoder(), tokenizer=t5_tokenizer(),
    )


def sd3_components() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(clip_text_config()).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config()).eval()
    return dict(
        transformer=randomize_zero_parameters(transformer),
        vae=tiny_vae(4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder, text_encoder_2=text_encoder_2, text_encoder_3=t5_encoder(),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), tokenizer_3=t5_tokenizer(),
    )


def flux_components() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config()).eval()
    return dict(
        transformer=randomize_zero_parameters(transformer),
        vae=tiny_vae(1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder, text_encoder_2=t5_encoder(), tokenizer=clip_tokenizer(), tokenizer_2=t5_tokenizer(),
        image_encoder=None, feature_extractor=None,
    )


# ------------------------------------------------------------------------------ references


class _ReusePerCall(torch.nn.Module):
    """Runs ``inner`` on the steps where ``compute(step)`` holds, else returns the output it gave
    the same call of the step (the conditional and unconditional calls keep separate values)."""

    def __init__(self, inner: torch.nn.Module, counter: dict, compute: Callable[[int], bool]) -> None:
        super().__init__()
        self.inner, self.counter, self.compute, self.cached = inner, counter, compute, {}

    def forward(self, *args, **kwargs):
        calls, per_step = self.counter["calls"], self.counter["calls_per_step"]
        step, call = divmod(calls, per_step)
        if self.compute(step) or call not in self.cached:
            self.cached[call] = self.inner(*args, **kwargs)
        return self.cached[call]


def reference_transformer(
    transformer: torch.nn.Module, paths: Sequence[str], compute: Callable[[int], bool], calls_per_step: int = 1
) -> torch.nn.Module:
    """A copy of ``transformer`` whose modules at ``paths`` reuse their outputs on the steps where
    ``compute(step)`` is false; a forward hook counts the calls. Still a diffusers model, so it
    drops into the pipeline as is."""
    ref = copy.deepcopy(transformer)
    counter = {"calls": 0, "calls_per_step": calls_per_step}
    for path in paths:
        parent, _, name = path.rpartition(".")
        setattr(ref.get_submodule(parent), name, _ReusePerCall(ref.get_submodule(path), counter, compute))

    def count(*_):
        counter["calls"] += 1

    ref.register_forward_hook(count)
    ref.counter = counter
    return ref


def images(pipe, inputs: dict) -> torch.Tensor:
    """Run ``pipe`` (seeded by ``inputs``) and return its images as a float tensor."""
    import numpy as np

    out = pipe(**inputs).images
    return out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
