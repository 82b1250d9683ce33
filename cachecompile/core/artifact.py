"""The artifact format: what :mod:`cachecompile.compile.export` writes and
:mod:`cachecompile.runtime.artifact` reads, in one place (file names, format version, and the JSON
forms of the call, the region map and dtypes).

An artifact is one directory::

    manifest.json     schedule, region map, call structure, step → graph map, versions,
                      and one backend entry per step graph (files, checksums, I/O specs)
    step0.pt2 ...     one file (or several) per distinct step plan, written by the backend
                      (aoti: step<i>.pt2; onnx: step<i>.onnx; tensorrt: step<i>.onnx + .engine)
    weights.pt        aoti only: the weights, once for all step graphs (the packages hold kernels)
    weights.onnx.data onnx only: the step graphs' large initializers, once
    step_inputs.pt    per-step input values (compensation coefficients, step index), if any
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from cachecompile.core.errors import ArtifactError
from cachecompile.core.program import InputLeaf
from cachecompile.core.regions import Region, RegionMap, RegionPatterns
from cachecompile.core.schedule import Layout

__all__ = [
    "ARTIFACT_FORMAT", "MANIFEST", "WEIGHTS", "STEP_INPUTS", "FORMATS", "TORCH_BOUND",
    "artifact_files", "dtype_to_str", "dtype_from_str", "leaf_to_json", "leaf_from_json", "region_map_to_json", "region_map_from_json",
]

ARTIFACT_FORMAT = "cachecompile.artifact/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
STEP_INPUTS = "step_inputs.pt"

# The user-facing format → the backend that writes and runs it.
FORMATS = {"aoti": "aoti", "onnx": "onnxruntime", "tensorrt": "tensorrt"}

# Backends whose files only run under the torch version that built them (a compiled .so against
# torch's C++ ABI). ONNX and TensorRT files do not depend on torch's version.
TORCH_BOUND = {"aoti"}


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in the manifest; re-export the model")
    return dtype


def leaf_to_json(leaf: InputLeaf) -> dict[str, Any]:
    """One input of the captured call; a constant must survive JSON unchanged."""
    value = leaf.value
    if leaf.tensor_index is None:
        try:
            ok = json.loads(json.dumps(value)) == value
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"constant argument {leaf.name}={value!r} cannot be written to the artifact manifest (JSON numbers, "
                f"strings, booleans and None only); call the model with a tensor or a plain value instead"
            )
    return {
        "name": leaf.name,
        "tensor_index": leaf.tensor_index,
        "shape": None if leaf.shape is None else list(leaf.shape),
        "dtype": None if leaf.dtype is None else dtype_to_str(leaf.dtype),
        "value": value,
        "device": leaf.device,
        "batched": leaf.batched,
        "index_bound": leaf.index_bound,
    }


def leaf_from_json(d: Mapping[str, Any]) -> InputLeaf:
    """An input leaf read back; a field of the wrong JSON type is a TypeError/ValueError (the
    loader reports it as a malformed manifest)."""
    bound, batched, device = d.get("index_bound"), d.get("batched", False), d.get("device")
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
        raise ValueError(f"leaf {d.get('name')!r}: index_bound {bound!r} is not a number of rows >= 1")
    if not isinstance(batched, bool):
        raise TypeError(f"leaf {d.get('name')!r}: batched {batched!r} is not true or false")
    if device is not None and not isinstance(device, str):
        raise TypeError(f"leaf {d.get('name')!r}: device {device!r} is not a device name")
    return InputLeaf(
        str(d["name"]),
        None if d["tensor_index"] is None else int(d["tensor_index"]),
        None if d["shape"] is None else tuple(int(s) for s in d["shape"]),
        None if d["dtype"] is None else dtype_from_str(d["dtype"]),
        d["value"],
        device,
        batched,
        bound,
    )


def region_map_to_json(region_map: RegionMap) -> dict[str, Any]:
    return {
        "layout": {"branches": [list(b) for b in region_map.layout.branches], "has_stack": region_map.layout.has_stack},
        "patterns": {
            "blocks": list(region_map.patterns.blocks),
            "branches": dict(region_map.patterns.branches),
            "block_branches": {k: dict(v) for k, v in region_map.patterns.block_branches.items()},
        },
        "regions": {
            name: {"path": r.path, "nodes": sorted(r.nodes), "outputs": list(r.outputs), "inputs": list(r.inputs)}
            for name, r in region_map.regions.items()
        },
    }


def region_map_from_json(d: Mapping[str, Any]) -> RegionMap:
    layout = Layout(tuple(tuple(b) for b in d["layout"]["branches"]), bool(d["layout"]["has_stack"]))
    patterns = RegionPatterns(
        tuple(d["patterns"]["blocks"]), dict(d["patterns"]["branches"]),
        {k: dict(v) for k, v in d["patterns"]["block_branches"].items()},
    )
    regions = {
        name: Region(name, r["path"], frozenset(r["nodes"]), tuple(r["outputs"]), tuple(r["inputs"]))
        for name, r in d["regions"].items()
    }
    return RegionMap(regions, layout, patterns)


def artifact_files(manifest: Mapping[str, Any]) -> set[str]:
    """Every path (relative to the directory) that belongs to the artifact this manifest
    describes: the manifest, each step graph's files, and the shared weight and step-input
    files. A directory holding anything else is not (only) an artifact."""
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ValueError("not a cachecompile manifest")
    names = {MANIFEST}
    for g in manifest["graphs"]:
        entry = g["entry"]
        names |= {str(n) for n in dict(entry.get("sha256", {}))}
        names |= {str(n) for n in dict(entry.get("files", {})).values()}
    for key in ("weights", "onnx_weights", "step_inputs"):
        info = manifest.get(key)
        if isinstance(info, Mapping) and "file" in info:
            names.add(str(info["file"]))
    return names
