"""The CUDA device an engine was built on, and the check that it runs on one like it: shared by
the TensorRT backend's two paths (:mod:`.trt`, :mod:`.trt_torch`)."""

from __future__ import annotations

from typing import Any

import torch

from cachecompile.backends._common import ArtifactError

__all__ = ["device_record", "check_device"]


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _gpu() -> tuple[str, list[int]]:
    """Name and compute capability of the current CUDA device."""
    return torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())


def device_record(hardware_compatible: bool = False) -> dict[str, Any]:
    """The GPU an engine was built on: engines only run on that compute capability."""
    name, capability = _gpu()
    return {"name": name, "capability": capability, "hardware_compatible": hardware_compatible}


def check_device(entry: dict[str, Any]) -> None:
    if not _cuda_available():
        raise ArtifactError("tensorrt: engines need a CUDA GPU; none is available")
    device = dict(entry.get("device", {}))
    if device.get("hardware_compatible"):
        return
    built = list(device.get("capability", []))
    name, running = _gpu()
    if built != running:
        raise ArtifactError(
            f"tensorrt: engine was built for compute capability {built} ({device.get('name')}), this GPU "
            f"({name}) is {running}; rebuild the engines on this GPU (or export with hardware_compatible=True)"
        )
