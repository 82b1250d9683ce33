"""pytest plugin for running diffusers' own pipeline tests with cachecompile swapped in.

CC_MODE=plain      run the tests as they are (offline stand-ins for the hub's tiny T5 only)
CC_MODE=optimized  every DiT / PixArt pipeline is optimized with an all-compute schedule right
                   after it is built (cc.optimize(pipe, cc.Schedule.fora(interval=1)))
"""
import functools
import os

MODE = os.environ.get("CC_MODE", "plain")


def _tiny_t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0)


def _tiny_t5():
    import torch
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(_tiny_t5_config()).eval()


def _tiny_tokenizer():
    import tempfile
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + "a painting of squirrel eating burger cat dog photo bad quality blurry".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tempfile.mktemp(suffix=".json")
    tok.save(path)
    return PreTrainedTokenizerFast(tokenizer_file=path, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def pytest_configure(config):
    import transformers

    hub = "hf-internal-testing/tiny-random-t5"
    for cls, make in ((transformers.T5EncoderModel, _tiny_t5), (transformers.AutoTokenizer, _tiny_tokenizer),
                      (transformers.AutoConfig, _tiny_t5_config)):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, name, *a, _orig=original, _make=make, **k):
            if name == hub:
                return _make()
            return _orig(klass, name, *a, **k)

        cls.from_pretrained = classmethod(from_pretrained)
    if MODE != "optimized":
        return
    import cachecompile as cc
    from diffusers import DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline

    for pipe_cls in (DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline):
        original_init = pipe_cls.__init__

        def make(_orig):
            @functools.wraps(_orig)  # diffusers reads the components from __init__'s signature
            def __init__(self, *a, **k):
                _orig(self, *a, **k)
                if self.transformer is not None and not isinstance(self.transformer, cc.CachedTransformer):
                    cc.optimize(self, cc.Schedule.fora(interval=1))
            return __init__

        pipe_cls.__init__ = make(original_init)
