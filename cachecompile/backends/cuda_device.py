"""The CUDA device an engine was built on, and the checks that it runs (or is built) on one that
can: shared by the TensorRT backend's two paths (:mod:`.trt`, :mod:`.trt_torch`)."""

from __future__ import annotations

from typing import Any

import torch

from cachecompile.backends._common import ArtifactError, BackendCompileError

__all__ = ["device_record", "check_device", "check_ampere_plus"]


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _gpu() -> tuple[str, list[int]]:
    """Name and compute capability of the current CUDA device."""
    return torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())


def check_ampere_plus(what: str) -> None:
    name, capability = _gpu()
    if tuple(capability) < (8, 0):
        raise BackendCompileError(
            f"tensorrt: cannot {what} on {name} (compute capability {capability}): hardware-compatible "
            "engines need compute capability >= 8.0 (Ampere or newer)"
        )


def device_record(hardware_compatible: bool = False) -> dict[str, Any]:
    """The GPU an engine was built on: engines only run on that compute capability."""
    name, capability = _gpu()
    return {"name": name, "capability": capability, "hardware_compatible": hardware_compatible}


def check_device(entry: dict[str, Any]) -> None:
    if not _cuda_available():
        raise ArtifactError("tensorrt: engines need a CUDA GPU; none is available")
    device = dict(entry.get("device", {}))
    built = list(device.get("capability", []))
    name, running = _gpu()
    if device.get("hardware_compatible"):
        if tuple(running) < (8, 0):
            raise ArtifactError(
                f"tensorrt: hardware-compatible (AMPERE_PLUS) engines need compute capability >= 8.0; this GPU "
                f"({name}) is {running}; rebuild the engines on this GPU without hardware_compatible"
            )
        return
    if built != running:
        raise ArtifactError(
            f"tensorrt: engine was built for compute capability {built} ({device.get('name')}), this GPU "
            f"({name}) is {running}; rebuild the engines on this GPU (or export with hardware_compatible=True)"
        )
