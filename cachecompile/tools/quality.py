"""Quality metrics for generated digits: classifier accuracy, a Fréchet distance in the
classifier's feature space (an FID analogue), and PSNR / SSIM / rel-L1 against reference images.

All functions take image tensors ``[B, C, H, W]`` in the models' value range ``[-1, 1]``.
Classifier-based metrics use the shipped :func:`cachecompile.models.digits_classifier` unless
another classifier is passed.

Example:
    >>> import torch
    >>> from cachecompile.tools import quality as Q
    >>> a = torch.rand(4, 1, 16, 16) * 2 - 1
    >>> Q.ssim(a, a).item(), Q.rel_l1(a, a).item()
    (1.0, 0.0)
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- classifier metrics


@lru_cache(maxsize=1)
def _shipped_classifier() -> nn.Module:
    from cachecompile.models import digits_classifier

    return digits_classifier()


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    return images.float()


@torch.no_grad()
def classifier_logits(images: torch.Tensor, classifier: nn.Module | None = None,
                      batch_size: int = 1024) -> torch.Tensor:
    """Logits ``[B, 10]`` of the (shipped) digits classifier.

    Example:
        >>> from cachecompile.models import load_digits_images
        >>> x, y = load_digits_images("test")
        >>> classifier_logits(x[:3]).shape
        torch.Size([3, 10])
    """
    clf = classifier or _shipped_classifier()
    images = _check_images(images)
    return torch.cat([clf(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: nn.Module | None = None,
                        batch_size: int = 1024) -> torch.Tensor:
    """Penultimate features ``[B, D]`` of the (shipped) digits classifier, for Fréchet distances.

    Example:
        >>> from cachecompile.models import load_digits_images
        >>> x, _ = load_digits_images("test")
        >>> classifier_features(x[:3]).shape
        torch.Size([3, 64])
    """
    clf = classifier or _shipped_classifier()
    images = _check_images(images)
    return torch.cat([clf.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: nn.Module | None = None) -> float:
    """Fraction of images the classifier assigns to the requested label (an IS analogue).

    Example:
        >>> from cachecompile.models import load_digits_images
        >>> x, y = load_digits_images("test")
        >>> class_accuracy(x, y) > 0.95
        True
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    pred = classifier_logits(images, classifier).argmax(1)
    return (pred == labels.to(pred.device)).float().mean().item()


# ----------------------------------------------------------------------------- Fréchet distance


def _trace_sqrt_product_eigh(a: np.ndarray, b: np.ndarray) -> float:
    """tr sqrt(A B) for symmetric PSD A, B via tr sqrt(A^½ B A^½), which is symmetric PSD."""
    w, v = np.linalg.eigh(a)
    sa = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sa @ b @ sa
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from scipy.linalg import sqrtm
    except ImportError:
        return _trace_sqrt_product_eigh(a, b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = sqrtm(a @ b)
    # sqrtm of a (near-)singular product warns, or comes back non-finite or clearly complex;
    # the symmetric form is exact for PSD inputs, so use it then.
    if caught or not np.all(np.isfinite(s)) or np.abs(np.imag(s)).max() > 1e-3 * max(1.0, np.abs(s).max()):
        return _trace_sqrt_product_eigh(a, b)
    return float(np.real(np.trace(s)))


def gaussian_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, in float64."""
    x = np.asarray(feats.detach().cpu().double().numpy())
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||² + tr(A + B - 2 (A B)^½) between two Gaussians."""
    d = float(((mu_a - mu_b) ** 2).sum())
    return max(0.0, d + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * _trace_sqrt_product(cov_a, cov_b))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``.

    Example:
        >>> f = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
        >>> round(frechet_distance(f, f), 6), round(frechet_distance(f, f + 1.0), 6)
        (0.0, 8.0)
    """
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


@lru_cache(maxsize=1)
def _real_digit_stats() -> tuple[np.ndarray, np.ndarray]:
    from cachecompile.models import load_digits_images

    return gaussian_stats(classifier_features(load_digits_images("all")[0]))


def fid_digits(images: torch.Tensor, classifier: nn.Module | None = None) -> float:
    """FID analogue: Fréchet distance in classifier-feature space between ``images`` and all
    1797 real digits. Biased upward for small sample counts; compare at equal N.

    Example:
        >>> from cachecompile.models import load_digits_images
        >>> x, _ = load_digits_images("all")
        >>> fid_digits(x) < 1e-6
        True
    """
    if classifier is None:
        ref = _real_digit_stats()
    else:
        from cachecompile.models import load_digits_images

        ref = gaussian_stats(classifier_features(load_digits_images("all")[0], classifier))
    return frechet_distance_from_stats(*gaussian_stats(classifier_features(images, classifier)), *ref)


# ----------------------------------------------------------------------------- paired metrics


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return _check_images(a).double(), _check_images(b).double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, 10·log10(range² / MSE); ``inf`` if identical.

    ``reduction="mean"`` averages the per-image values (``inf`` if any pair is identical);
    ``"none"`` returns them.

    Example:
        >>> a = torch.zeros(1, 1, 4, 4)
        >>> psnr(a, a + 0.2).item()  # 10·log10(4 / 0.04)
        20.0
    """
    a, b = _check_pair(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return _reduce(10.0 * torch.log10(data_range**2 / mse), reduction).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    return k[:, None] * k[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window (11, σ=1.5), valid filtering,
    averaged over the SSIM map and channels per image. The window shrinks to the image size
    for images smaller than it.

    Example:
        >>> a = torch.rand(2, 1, 16, 16)
        >>> ssim(a, a).item()
        1.0
    """
    a, b = _check_pair(a, b)
    c = a.shape[1]
    size = min(window_size, a.shape[-2], a.shape[-1])
    w = _gaussian_window(size, sigma).expand(c, 1, size, size)
    filt = lambda x: F.conv2d(x, w, groups=c)  # noqa: E731
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return _reduce(m.flatten(1).mean(1), reduction).float()


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L1 error of ``a`` against the reference ``b``: mean|a − b| / mean|b| over all elements.

    Example:
        >>> b = torch.full((1, 1, 2, 2), 2.0)
        >>> rel_l1(b + 0.5, b).item()
        0.25
    """
    a, b = _check_pair(a, b)
    return ((a - b).abs().mean() / b.abs().mean()).float()


def sample_metrics(images: torch.Tensor, labels: torch.Tensor,
                   reference: torch.Tensor | None = None,
                   value_range: tuple[float, float] | None = (-1.0, 1.0)) -> dict[str, float]:
    """All metrics of one run: accuracy and FID analogue, plus PSNR/SSIM/rel-L1 against
    ``reference`` (e.g. the uncached samples from the same noise) when given. Both are clamped
    to ``value_range`` first, as a pipeline's postprocessing does (``None``: as given).

    Example:
        >>> from cachecompile.models import load_digits_images
        >>> x, y = load_digits_images("test")
        >>> sorted(sample_metrics(x, y, reference=x))
        ['accuracy', 'fid', 'psnr', 'rel_l1', 'ssim']
    """
    if value_range is not None:
        images = images.float().clamp(*value_range)
        reference = None if reference is None else reference.float().clamp(*value_range)
    out = {"accuracy": class_accuracy(images, labels), "fid": fid_digits(images)}
    if reference is not None:
        out.update(psnr=psnr(images, reference).item(), ssim=ssim(images, reference).item(),
                   rel_l1=rel_l1(images, reference).item())
    return out


__all__ = [
    "class_accuracy", "classifier_features", "classifier_logits", "fid_digits", "frechet_distance",
    "frechet_distance_from_stats", "gaussian_stats", "psnr", "rel_l1", "sample_metrics", "ssim",
]
