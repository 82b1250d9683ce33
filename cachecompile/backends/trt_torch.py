"""The torch-tensorrt path of the ``tensorrt`` backend (``via="torch_tensorrt"``).

The step graph is exported (``torch.export``) and compiled with
``torch_tensorrt.dynamo.compile``. torch-tensorrt normally partitions a graph and runs what
TensorRT cannot take in PyTorch; here that would be a silent fallback, so the compile uses
``require_full_compilation=True`` and ``pass_through_build_failures=True``, and the result is
checked to contain TensorRT engines only.

Reduced precision is put into the graph (weights and activations cast, float32 islands cast
where they meet them, I/O kept; see ``onnx_export.CastedStep``), which is what torch-tensorrt's
explicit typing (its default since 2.8, ``enabled_precisions`` deprecated) expects. fp32 is
compiled with ``disable_tf32=True`` (TensorRT's TF32 is on by default).

Saved with ``torch_tensorrt.save(..., output_format="exported_program")`` as
``<stem>.trt.ep``; loading checks torch, torch-tensorrt and TensorRT versions and the GPU, and
the loaded module checks its inputs' shapes and dtypes on every call (``check_inputs``).
Not run here: torch-tensorrt needs a CUDA GPU to import.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from cachecompile.backends._common import (
    ArtifactError,
    BackendCompileError,
    TensorSpec,
    check_call_inputs,
    check_entry,
    check_version,
    graph_signature,
    make_entry,
)
from cachecompile.backends.cuda_device import check_device, device_record

_PRECISION = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_step(
    gm: GraphModule,
    example_inputs: Sequence[Tensor],
    *,
    precision: str = "fp32",
    workspace_bytes: int | None = None,
    optimization_level: int | None = None,
    timing_cache: str | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **unknown: Any,
) -> GraphModule:
    """torch_tensorrt.dynamo.compile on the step's ExportedProgram; TensorRT engines only."""
    import torch_tensorrt

    if unknown:
        raise TypeError(f"tensorrt via torch_tensorrt got unsupported options {sorted(unknown)}")
    if precision not in _PRECISION:
        raise ValueError(f"tensorrt precision {precision!r} is not one of {sorted(_PRECISION)}")
    _, outputs = graph_signature(gm, example_inputs, input_names, output_names)
    module: torch.nn.Module = gm
    if _PRECISION[precision] is not None:
        from cachecompile.backends.onnx_export import reduced_precision_module

        module = reduced_precision_module(gm, _PRECISION[precision], outputs)
    ep = torch.export.export(module, tuple(example_inputs), strict=False)
    kwargs: dict[str, Any] = {
        "arg_inputs": list(example_inputs),
        "require_full_compilation": True,
        "pass_through_build_failures": True,
        "min_block_size": 1,
    }
    if _PRECISION[precision] is None:
        kwargs["disable_tf32"] = True  # a float32 engine computes in float32, as the manifest says
    if workspace_bytes is not None:
        kwargs["workspace_size"] = int(workspace_bytes)
    if optimization_level is not None:
        kwargs["optimization_level"] = int(optimization_level)
    if timing_cache is not None:
        kwargs["timing_cache_path"] = str(timing_cache)
    accepted = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    missing = [k for k in kwargs if k not in accepted]
    if missing:
        raise BackendCompileError(f"this torch_tensorrt.dynamo.compile does not accept {missing}; upgrade torch-tensorrt")
    try:
        trt_gm = torch_tensorrt.dynamo.compile(ep, **kwargs)
    except Exception as e:
        raise BackendCompileError(f"tensorrt via torch_tensorrt failed: {e}") from e
    assert_fully_converted(trt_gm)
    return trt_gm


def assert_fully_converted(trt_gm: torch.nn.Module) -> None:
    """torch-tensorrt names its partitions ``_run_on_acc_N`` (TensorRT) and ``_run_on_gpu_N``."""
    names = [name for name, _ in trt_gm.named_children()]
    in_torch = [n for n in names if n.startswith("_run_on_gpu")]
    if in_torch or not any(n.startswith("_run_on_acc") for n in names):
        raise BackendCompileError(
            f"tensorrt via torch_tensorrt: parts of the step graph would run in PyTorch ({in_torch or names}); "
            "that is a fallback this backend refuses"
        )


def export_step(
    gm: GraphModule,
    example_inputs: Sequence[Tensor],
    directory: Path,
    stem: str,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    **settings: Any,
) -> dict[str, Any]:
    import tensorrt as trt
    import torch_tensorrt

    inputs, outputs = graph_signature(gm, example_inputs, input_names, output_names)
    trt_gm = compile_step(gm, example_inputs, **settings)
    path = directory / f"{stem}.trt.ep"
    torch_tensorrt.save(trt_gm, str(path), output_format="exported_program", arg_inputs=list(example_inputs))
    return make_entry(
        "tensorrt", directory, {"program": path.name}, inputs, outputs,
        versions={"tensorrt": trt.__version__, "torch_tensorrt": torch_tensorrt.__version__},
        options=settings, via="torch_tensorrt", device=device_record(),
    )


def load_step(directory: Path, entry: dict[str, Any], *, verify: bool = True, check_inputs: bool = True) -> Any:
    import tensorrt as trt
    import torch_tensorrt

    inputs, _ = check_entry(directory, entry, "tensorrt", verify=verify)
    check_version(entry, "torch", torch.__version__)  # the saved ExportedProgram format follows torch
    check_version(entry, "torch_tensorrt", torch_tensorrt.__version__)
    check_version(entry, "tensorrt", trt.__version__)  # its engines only load in the TensorRT that built them
    check_device(entry)
    path = Path(directory) / entry["files"]["program"]
    try:
        module = torch_tensorrt.load(str(path)).module()
    except Exception as e:
        raise ArtifactError(f"tensorrt: cannot load {path} ({e}); re-export the model") from e
    return CheckedStep(module, inputs, f"tensorrt step {path.name}") if check_inputs else module


class CheckedStep:
    """A loaded program that checks its inputs first, so a wrong shape names the input."""

    def __init__(self, module: Any, inputs: list[TensorSpec], where: str) -> None:
        self.module, self._inputs, self._where = module, inputs, where

    def __call__(self, *args: Tensor) -> Any:
        check_call_inputs(args, self._inputs, self._where)
        return self.module(*args)
