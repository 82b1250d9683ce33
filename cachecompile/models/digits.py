"""A small class-conditional DiT trained on scikit-learn's handwritten digits, and a classifier.

Everything here runs offline: the data set ships inside scikit-learn and the weights ship in
``cachecompile/models/weights/``.

Conventions shared by the model, the classifier and the metrics (see :data:`DIGITS_CONFIG`):

* images are ``[B, 1, 16, 16]`` float tensors in ``[-1, 1]``; the 8x8 digits (values 0..16) are
  scaled to ``[-1, 1]`` and upsampled bilinearly (``align_corners=False``) to 16x16, which
  keeps strokes smooth and stays inside ``[-1, 1]``;
* class ids 0..9 are the digits, id 10 is the null ("unconditional") class used for
  classifier-free guidance;
* noise schedule: DDPM, 1000 training steps, linear betas 1e-4..0.02 -- the betas of
  ``diffusers.DDPMScheduler()`` and ``diffusers.DDIMScheduler()``; the model predicts epsilon;
* sampler: ``weights/digits_scheduler.json`` (DDIM on those betas, **no x0 clipping**), attached
  to the model by :func:`digits_dit` as ``model.scheduler_config`` so that every sampling loop
  (:func:`cachecompile.sampling.ddim_sample`) uses it;
* learned sigma is off (``out_channels == in_channels == 1``): the model is sampled with
  DDIM/DDPM fixed variances, so a variance head would be dead weight.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIT_WEIGHTS = "digits_dit.safetensors"
CLASSIFIER_WEIGHTS = "digits_classifier.safetensors"
CONFIG_FILE = "digits_config.json"
SCHEDULER_FILE = "digits_scheduler.json"

# The held-out split is fixed independently of any training seed so that every
# classifier is evaluated on the same 20 % of the digits.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsConfig:
    """Data, label and noise-schedule conventions of the digits models.

    Example:
        >>> from cachecompile.models import DIGITS_CONFIG
        >>> DIGITS_CONFIG.sample_size, DIGITS_CONFIG.null_class
        (16, 10)
    """

    sample_size: int = 16
    in_channels: int = 1
    num_classes: int = 10
    null_class: int = 10
    value_range: tuple[float, float] = (-1.0, 1.0)
    upsample: str = "bilinear"  # 8x8 -> 16x16, align_corners=False
    # Noise schedule = diffusers.DDPMScheduler() defaults.
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    learned_sigma: bool = False
    class_dropout_prob: float = 0.1


DIGITS_CONFIG = DigitsConfig()


def dit_config() -> dict[str, Any]:
    """Keyword arguments of the ``DiTTransformer2DModel`` (about 2.1 M parameters).

    ``num_embeds_ada_norm=10``: with diffusers' default ``class_dropout_prob=0.1`` each
    ``LabelEmbedding`` gets an 11th row, which is the null class (id 10).

    Example:
        >>> dit_config()["num_layers"]
        6
    """
    c = DIGITS_CONFIG
    return dict(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=c.in_channels,
        out_channels=c.in_channels,  # learned sigma off
        num_layers=6,
        sample_size=c.sample_size,
        patch_size=2,
        num_embeds_ada_norm=c.num_classes,
        norm_type="ada_norm_zero",
    )


def build_dit(config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised digits DiT (random weights, train mode).

    Example:
        >>> m = build_dit()
        >>> sum(p.numel() for p in m.parameters()) > 2_000_000
        True
    """
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**(config or dit_config()))


class DigitsClassifier(nn.Module):
    """Small CNN on 16x16 digits in ``[-1, 1]``; ``features`` gives the embedding used for FID.

    Example:
        >>> clf = DigitsClassifier()
        >>> clf(torch.zeros(2, 1, 16, 16)).shape, clf.features(torch.zeros(2, 1, 16, 16)).shape
        (torch.Size([2, 10]), torch.Size([2, 64]))
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.width, self.feature_dim, self.num_classes = width, feature_dim, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-activation penultimate features ``[B, feature_dim]`` (closer to Gaussian than post-ReLU)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(images)))


def load_digits_images(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits as ``([N, 1, 16, 16]`` images in ``[-1, 1]``, ``[N]`` int64 labels).

    ``split`` is ``"all"`` (1797), ``"train"`` (80 %) or ``"test"`` (20 %, fixed by SPLIT_SEED).

    Example:
        >>> x, y = load_digits_images("test")
        >>> x.shape[1:], float(x.min()) >= -1.0, float(x.max()) <= 1.0
        (torch.Size([1, 16, 16]), True, True)
    """
    x, y = _all_digits()
    if split == "all":
        return x.clone(), y.clone()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * len(y)))
    idx = {"test": perm[:n_test], "train": perm[n_test:]}.get(split)
    if idx is None:
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    return x[idx].clone(), y[idx].clone()


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    x = F.interpolate(x, size=(DIGITS_CONFIG.sample_size,) * 2, mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0), torch.tensor(d.target, dtype=torch.int64)


def read_config(weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The JSON written by the training script: model configs, training record, metrics.

    Example:
        >>> read_config()["dit"]["num_layers"]
        6
    """
    return json.loads((Path(weights_dir or WEIGHTS_DIR) / CONFIG_FILE).read_text())


def scheduler_config(weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The sampler shipped beside the weights: a diffusers scheduler config (DDIM, the training
    betas, no x0 clipping); :func:`cachecompile.sampling.make_scheduler` builds a scheduler from
    it for any solver.

    Example:
        >>> scheduler_config()["clip_sample"], scheduler_config()["beta_end"]
        (False, 0.02)
    """
    return json.loads((Path(weights_dir or WEIGHTS_DIR) / SCHEDULER_FILE).read_text())


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m cachecompile.tools.zoo.train_digits` to create it")
    # Shipped in float16 to halve the package size; models run in float32.
    return {k: v.float() for k, v in load_file(str(path)).items()}


def digits_dit(weights_dir: str | Path | None = None) -> nn.Module:
    """The shipped trained digits ``DiTTransformer2DModel``, float32, eval mode.

    Call it with ``class_labels`` in 0..10 (10 = null class) and int64 timesteps in 0..999.

    Example:
        >>> import torch
        >>> dit = digits_dit()
        >>> out = dit(torch.zeros(2, 1, 16, 16), timestep=torch.tensor([999, 999]),
        ...           class_labels=torch.tensor([3, 10])).sample
        >>> out.shape
        torch.Size([2, 1, 16, 16])
    """
    wdir = Path(weights_dir or WEIGHTS_DIR)
    model = build_dit(read_config(wdir)["dit"])
    model.load_state_dict(_load_state(wdir / DIT_WEIGHTS))
    # The sampler travels with the model: ddim_sample builds its scheduler from this.
    model.scheduler_config = scheduler_config(wdir)
    # eval() also matters for correctness: in train mode every block's LabelEmbedding
    # drops labels to the null class at random.
    return model.eval().requires_grad_(False)


def digits_classifier(weights_dir: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier (eval mode): ``[B, 1, 16, 16]`` in ``[-1, 1]`` -> ``[B, 10]`` logits.

    Example:
        >>> clf = digits_classifier()
        >>> x, y = load_digits_images("test")
        >>> bool((clf(x).argmax(1) == y).float().mean() > 0.9)
        True
    """
    wdir = Path(weights_dir or WEIGHTS_DIR)
    cfg = read_config(wdir)["classifier"]
    model = DigitsClassifier(cfg["width"], cfg["feature_dim"], cfg["num_classes"])
    model.load_state_dict(_load_state(wdir / CLASSIFIER_WEIGHTS))
    return model.eval().requires_grad_(False)


def config_dict() -> dict[str, Any]:
    """:data:`DIGITS_CONFIG` as a JSON-ready dict."""
    return asdict(DIGITS_CONFIG)
