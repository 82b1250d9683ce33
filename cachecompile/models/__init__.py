"""Models shipped with cachecompile: a trained digits DiT and a digits classifier (offline)."""

from .digits import (
    DIGITS_CONFIG,
    DigitsClassifier,
    DigitsConfig,
    build_dit,
    digits_classifier,
    digits_dit,
    dit_config,
    load_digits_images,
    read_config,
    scheduler_config,
)

__all__ = [
    "DIGITS_CONFIG",
    "DigitsClassifier",
    "DigitsConfig",
    "build_dit",
    "digits_classifier",
    "digits_dit",
    "dit_config",
    "load_digits_images",
    "read_config",
    "scheduler_config",
]
