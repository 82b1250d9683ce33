"""Metric functions of cachecompile.tools.quality on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cachecompile.tools import quality as Q
from cachecompile.models import load_digits_images


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    f = torch.randn(300, 16, generator=_gen())
    assert Q.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift() -> None:
    f = torch.randn(300, 16, generator=_gen())
    shift = torch.linspace(-1, 1, 16)
    assert Q.frechet_distance(f, f + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form() -> None:
    # d = |mu_a - mu_b|² + Σ (σ_a - σ_b)² for diagonal covariances.
    mu_a, mu_b = np.zeros(4), np.array([1.0, 0.0, -2.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([4.0, 1.0, 0.25, 8.0])
    expected = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())
    got = Q.frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_sampled_gaussians_approaches_the_closed_form() -> None:
    # N(0, I) vs N(mu, 4 I) in 8 dims: |mu|² + 8 (2 - 1)² = 4 + 8.
    a = torch.randn(20000, 8, generator=_gen(1))
    b = 2.0 * torch.randn(20000, 8, generator=_gen(2)) + torch.full((8,), 2.0 / math.sqrt(8))
    assert Q.frechet_distance(a, b) == pytest.approx(12.0, rel=0.03)


def test_scipy_and_eigen_square_roots_agree_on_non_commuting_covariances() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    a, b = x @ x.T, y @ y.T + np.eye(6)
    assert Q._trace_sqrt_product(a, b) == pytest.approx(Q._trace_sqrt_product_eigh(a, b), rel=1e-8)


def test_frechet_distance_with_singular_covariances_is_finite() -> None:
    # Fewer samples than dimensions and a constant feature: both covariances are singular.
    a, b = torch.randn(10, 32, generator=_gen(3)), torch.randn(12, 32, generator=_gen(4))
    a[:, 0] = 0.0
    d = Q.frechet_distance(a, b)
    assert math.isfinite(d) and d > 0


# ----------------------------------------------------------------------------- paired metrics


def test_psnr_identical_is_inf_and_known_noise_gives_known_value() -> None:
    a = torch.rand(3, 1, 16, 16, generator=_gen()) * 2 - 1
    assert math.isinf(Q.psnr(a, a).item())
    # Constant error 0.1 → MSE 0.01 → 10 log10(2² / 0.01).
    assert Q.psnr(a + 0.1, a).item() == pytest.approx(10 * math.log10(400.0), abs=1e-4)
    assert Q.psnr(a + 0.1, a, data_range=1.0).item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_per_sample() -> None:
    a = torch.zeros(2, 1, 4, 4)
    b = torch.stack([torch.full((1, 4, 4), 0.2), torch.full((1, 4, 4), 0.02)])
    assert Q.psnr(b, a, reduction="none").tolist() == pytest.approx([20.0, 40.0], abs=1e-4)


def test_ssim_identical_is_one_and_noise_lowers_it() -> None:
    a = torch.rand(4, 1, 16, 16, generator=_gen()) * 2 - 1
    assert Q.ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)
    noisy = a + 0.3 * torch.randn(a.shape, generator=_gen(1))
    s = Q.ssim(noisy, a).item()
    assert 0.0 < s < 0.95
    assert Q.ssim(a, noisy).item() == pytest.approx(s, abs=1e-6)  # symmetric


def test_ssim_of_constant_images_matches_the_luminance_term() -> None:
    # No variance anywhere: SSIM = (2 μa μb + C1) / (μa² + μb² + C1).
    c1 = (0.01 * 2.0) ** 2
    got = Q.ssim(torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), -0.25)).item()
    assert got == pytest.approx((2 * 0.5 * -0.25 + c1) / (0.25 + 0.0625 + c1), abs=1e-6)


def test_rel_l1_known_values() -> None:
    b = torch.full((2, 1, 4, 4), -2.0)
    assert Q.rel_l1(b, b).item() == 0.0
    assert Q.rel_l1(b + 0.5, b).item() == pytest.approx(0.25)
    assert Q.rel_l1(torch.zeros_like(b), b).item() == pytest.approx(1.0)


def test_paired_metrics_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        Q.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(2, 1, 4, 4))


# ----------------------------------------------------------------------------- classifier metrics


def test_classifier_is_accurate_on_held_out_real_digits() -> None:
    x, y = load_digits_images("test")
    assert Q.class_accuracy(x, y) >= 0.95


def test_classifier_features_shape() -> None:
    x, _ = load_digits_images("test")
    assert Q.classifier_features(x[:5]).shape == (5, 64)


def test_fid_of_real_digits_is_zero_and_of_noise_is_large() -> None:
    x, _ = load_digits_images("all")
    assert Q.fid_digits(x) == pytest.approx(0.0, abs=1e-6)
    held_out = Q.fid_digits(load_digits_images("test")[0])
    noise = Q.fid_digits(torch.rand(360, 1, 16, 16, generator=_gen()) * 2 - 1)
    assert noise > 10 * held_out


def test_sample_metrics_keys() -> None:
    x, y = load_digits_images("test")
    m = Q.sample_metrics(x, y, reference=x)
    assert set(m) == {"accuracy", "fid", "psnr", "ssim", "rel_l1"} and m["ssim"] == pytest.approx(1.0)


def test_ssim_with_a_flat_full_image_window_is_the_global_formula() -> None:
    # A window as large as the image with (nearly) uniform weights gives one SSIM value
    # computed from the global means, population variances and covariance.
    a = torch.rand(1, 1, 8, 8, generator=_gen(5)) * 2 - 1
    b = 0.7 * a + 0.2 * torch.rand(1, 1, 8, 8, generator=_gen(6))
    x, y = a.double().flatten(), b.double().flatten()
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy, cxy = x.var(unbiased=False), y.var(unbiased=False), ((x - mx) * (y - my)).mean()
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert Q.ssim(a, b, window_size=8, sigma=1e6).item() == pytest.approx(expected.item(), abs=1e-6)
