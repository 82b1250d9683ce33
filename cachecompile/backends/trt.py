"""The ``tensorrt`` backend: TensorRT engines built from the step graphs' ONNX.

Export writes, per step graph, ``<stem>.onnx`` (opset 20, cache as explicit I/O) and
``<stem>.engine`` (the serialized engine), and grows one ``timing.cache`` shared by all the
step graphs of a directory (they share most layers, so later builds reuse the timings).

Build settings (keyword options of ``compile``/``export``):
- ``precision``: ``"fp32"`` | ``"fp16"`` | ``"bf16"``.
- ``typing``: how the precision is applied. ``"weak"`` sets ``BuilderFlag.FP16``/``BF16`` and
  lets TensorRT choose per layer (TensorRT 10; deprecated in 10.12, removed in 11).
  ``"strong"`` bakes the precision into the ONNX (weights and activations cast inside, I/O
  kept in the step graph's dtypes) and builds a ``STRONGLY_TYPED`` network (TensorRT ≥ 10).
  ``"auto"`` (default): weak where ``BuilderFlag.FP16`` exists, else strong.
- ``batch=(min, opt, max)``: optimization-profile range for a dynamic batch dimension; static
  inputs get ``min = opt = max`` = their shape.
- ``workspace_bytes``, ``optimization_level`` (builder optimisation level 0–5),
  ``timing_cache`` (file name in the directory, ``None`` to disable), ``check_ops`` (static
  operator check, see ``trt_ops``), ``hardware_compatible`` (Ampere+ compatible engine).
- ``via="torch_tensorrt"``: compile the step's ExportedProgram with
  ``torch_tensorrt.dynamo.compile`` instead (see ``trt_torch``).

The runtime binds torch CUDA tensors by ``data_ptr()`` with ``set_tensor_address`` and
enqueues with ``execute_async_v3`` on torch's current stream: no host copies, no extra
synchronisation, and the caching allocator's stream order keeps the buffers alive.

Verified here: everything up to the ONNX and the operator check. Not run here: engine build
and execution (TensorRT needs a CUDA GPU, none on these machines).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
from cachecompile.backends import cuda_device
from cachecompile.backends.cuda_device import check_device, device_record
from cachecompile.backends.onnx_export import DEFAULT_OPSET, export_onnx, reduced_precision_module

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TYPINGS = ("auto", "weak", "strong")


@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built; recorded in the manifest entry."""

    precision: str = "fp32"
    typing: str = "auto"
    batch: tuple[int, int, int] | None = None
    workspace_bytes: int | None = None
    optimization_level: int | None = None
    timing_cache: str | None = "timing.cache"
    check_ops: bool = True
    hardware_compatible: bool = False
    opset_version: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"tensorrt precision {self.precision!r} is not one of {sorted(PRECISIONS)}")
        if self.typing not in TYPINGS:
            raise ValueError(f"tensorrt typing {self.typing!r} is not one of {TYPINGS}")
        if self.batch is not None:
            lo, opt, hi = self.batch
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"tensorrt batch range must satisfy 1 <= min <= opt <= max, got {self.batch}")


def resolve_typing(settings: BuildSettings, has_weak_flags: bool) -> str:
    """The typing actually used: fp32 needs none; "auto" prefers flags where they exist."""
    if settings.precision == "fp32":
        return "strong" if settings.typing == "strong" else "weak"
    if settings.typing == "weak" and not has_weak_flags:
        raise BackendCompileError(
            "tensorrt: this TensorRT has no BuilderFlag.FP16/BF16 (removed in TensorRT 11); use typing='strong'"
        )
    if settings.typing == "auto":
        return "weak" if has_weak_flags else "strong"
    return settings.typing


def profile_shapes(
    inputs: Sequence[TensorSpec], batch: tuple[int, int, int] | None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input. Only a leading (batch) dimension may be dynamic."""
    shapes = {}
    for spec in inputs:
        if any(s is None for s in spec.shape[1:]):
            raise ValueError(f"tensorrt: input {spec.describe()} has a dynamic non-batch dimension; only batch may vary")
        if spec.shape and spec.shape[0] is None:
            if batch is None:
                raise ValueError(f"tensorrt: input {spec.describe()} has a dynamic batch: pass batch=(min, opt, max)")
            rest = tuple(int(s) for s in spec.shape[1:])  # type: ignore[arg-type]
            shapes[spec.name] = tuple((b, *rest) for b in batch)  # type: ignore[assignment]
        else:
            static = tuple(int(s) for s in spec.shape)  # type: ignore[arg-type]
            shapes[spec.name] = (static, static, static)
    return shapes


class TensorRTBackend:
    name = "tensorrt"

    def compile(self, gm: GraphModule, example_inputs: Sequence[Tensor], **options: Any) -> Any:
        """Build in a temporary directory and deserialize the engine (or torch-tensorrt)."""
        if options.pop("via", "onnx") == "torch_tensorrt":
            from cachecompile.backends import trt_torch

            return trt_torch.compile_step(gm, example_inputs, **options)
        with tempfile.TemporaryDirectory(prefix="cachecompile-trt-") as tmp:
            entry = self.export(gm, example_inputs, Path(tmp), "step", **options)
            return self.load(Path(tmp), entry)

    def export(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Tensor],
        directory: Path,
        stem: str,
        *,
        via: str = "onnx",
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """Write ``<stem>.onnx`` + ``<stem>.engine`` (or a torch-tensorrt program)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if via == "torch_tensorrt":
            from cachecompile.backends import trt_torch

            return trt_torch.export_step(gm, example_inputs, directory, stem, input_names, output_names, **settings)
        if via != "onnx":
            raise ValueError(f"tensorrt via={via!r}: expected 'onnx' or 'torch_tensorrt'")
        return _export_engine(gm, example_inputs, directory, stem, input_names, output_names, BuildSettings(**settings))

    def load(self, directory: Path, entry: dict[str, Any], *, verify: bool = True, check_inputs: bool = True) -> Any:
        """Deserialize ``entry``'s engine after checking files, TensorRT version and GPU."""
        directory = Path(directory)
        if entry.get("via") == "torch_tensorrt":
            from cachecompile.backends import trt_torch

            return trt_torch.load_step(directory, entry, verify=verify)
        import tensorrt as trt

        inputs, outputs = check_entry(directory, entry, "tensorrt", verify=verify)
        check_version(entry, "tensorrt", trt.__version__)
        check_device(entry)
        path = directory / entry["files"]["engine"]
        runtime = trt.Runtime(_logger())
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ArtifactError(f"tensorrt: cannot deserialize {path}; rebuild it with this TensorRT and GPU")
        return TRTStep(engine, inputs, outputs, check_inputs, f"tensorrt step {path.name}")


def _export_engine(
    gm: GraphModule,
    example_inputs: Sequence[Tensor],
    directory: Path,
    stem: str,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    settings: BuildSettings,
) -> dict[str, Any]:
    import tensorrt as trt

    from cachecompile.backends.trt_ops import assert_tensorrt_compatible

    if not cuda_device._cuda_available():
        raise BackendCompileError("tensorrt: building an engine needs a CUDA GPU; none is available")
    inputs, outputs = graph_signature(gm, example_inputs, input_names, output_names)
    typing = resolve_typing(settings, hasattr(trt.BuilderFlag, "FP16"))
    module = gm
    dtype = PRECISIONS[settings.precision]
    if typing == "strong" and dtype is not None:
        module = reduced_precision_module(gm, dtype, outputs)
    onnx_file = export_onnx(
        module, example_inputs, directory / f"{stem}.onnx", inputs, outputs, opset_version=settings.opset_version
    )
    if settings.check_ops:
        assert_tensorrt_compatible(onnx_file.path)
    present = set(onnx_file.input_names)
    shapes = {k: v for k, v in profile_shapes(inputs, settings.batch).items() if k in present}
    cache_path = directory / settings.timing_cache if settings.timing_cache else None
    engine = build_engine(onnx_file.path, shapes, settings, typing, cache_path)
    engine_path = directory / f"{stem}.engine"
    engine_path.write_bytes(engine)
    return make_entry(
        "tensorrt", directory, {"onnx": onnx_file.path.name, "engine": engine_path.name}, inputs, outputs,
        versions={"tensorrt": trt.__version__}, options={**asdict(settings), "typing": typing},
        via="onnx", device=device_record(settings.hardware_compatible),
        timing_cache=settings.timing_cache,
    )


def build_engine(
    onnx_path: Path,
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    settings: BuildSettings,
    typing: str,
    timing_cache: Path | None,
) -> bytes:
    """Parse the ONNX file and build a serialized engine with one optimization profile."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typing == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model's directory.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendCompileError(f"tensorrt: the ONNX parser rejected {onnx_path.name}:\n  {errors}")
    config = builder.create_builder_config()
    _apply_settings(trt, config, settings, typing)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(blob)
        # ignore_mismatch=False: a cache from another GPU/TensorRT is refused, not misused.
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendCompileError(f"tensorrt: engine build failed for {onnx_path.name} (see the TensorRT log above)")
    if cache is not None and timing_cache is not None:
        timing_cache.write_bytes(memoryview(cache.serialize()))
    return bytes(memoryview(serialized))


def _apply_settings(trt: Any, config: Any, settings: BuildSettings, typing: str) -> None:
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    if settings.optimization_level is not None:
        config.builder_optimization_level = int(settings.optimization_level)
    if settings.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if typing == "weak" and settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif typing == "weak" and settings.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)


def _logger() -> Any:
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream: TensorRT enqueues in torch's order."""
    return torch.cuda.current_stream(device).cuda_stream


def _require_cuda(device: torch.device, where: str) -> None:
    if device.type != "cuda":
        raise ValueError(f"{where}: TensorRT engines take CUDA tensors, got {device}")


def torch_dtype_of(trt: Any, dt: Any) -> torch.dtype:
    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
        "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
    }
    for key, value in table.items():
        if getattr(trt.DataType, key, None) == dt:
            return value
    raise ArtifactError(f"tensorrt: engine tensor type {dt} has no torch dtype here")


class TRTStep:
    """A deserialized engine called like the step graph, on CUDA tensors."""

    def __init__(self, engine: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], check_inputs: bool, where: str) -> None:
        import tensorrt as trt

        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ArtifactError(f"{where}: cannot create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        engine_inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self._inputs = inputs
        # The ONNX exporter drops inputs the graph never reads: bind only the engine's.
        self._bound = [(i, s.name) for i, s in enumerate(inputs) if s.name in engine_inputs]
        self._outputs = [(s.name, torch_dtype_of(trt, engine.get_tensor_dtype(s.name))) for s in outputs]
        for (name, dtype), spec in zip(self._outputs, outputs):
            if dtype != spec.torch_dtype:
                raise ArtifactError(f"{where}: engine output {name} is {dtype}, the manifest says {spec.dtype}")
        self._check_inputs = check_inputs
        self._where = where

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        if self._check_inputs:
            check_call_inputs(args, self._inputs, self._where)
        device = args[0].device
        _require_cuda(device, self._where)
        ctx = self._context
        keep = []  # contiguous copies live until enqueued; the allocator orders reuse on this stream
        for i, name in self._bound:
            t = args[i].contiguous()
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{self._where}: shape {tuple(t.shape)} of {name} is outside the engine's optimization profile")
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name, dtype in self._outputs:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(_stream_handle(device)):
            raise RuntimeError(f"{self._where}: execute_async_v3 failed (see the TensorRT log)")
        return tuple(outs)
