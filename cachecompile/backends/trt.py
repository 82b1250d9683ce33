"""The ``tensorrt`` backend: TensorRT engines built from the step graphs' ONNX.

Supported TensorRT: 10.15 ≤ ``tensorrt.__version__`` < 12 (10.x and 11.x; see ``trt_ops``), checked
before every build and load.

Export writes, per step graph, ``<stem>.onnx`` (cache as explicit I/O) and ``<stem>.engine``
(the serialized engine), and grows one ``timing.cache`` shared by all the step graphs of a
directory (they share most layers, so later builds reuse the timings). ``compile`` (in memory)
shares one timing cache per process the same way.

Build settings (keyword options of ``compile``/``export``):
- ``precision``: ``"fp32"`` | ``"fp16"`` | ``"bf16"``. fp32 engines are built without TF32
  (``BuilderFlag.TF32`` is on by default in TensorRT; ``tf32=True`` allows it).
- ``typing``: how the precision is applied. ``"weak"`` sets ``BuilderFlag.FP16``/``BF16`` and
  lets TensorRT choose per layer (TensorRT 10; deprecated in 10.12, removed in 11).
  ``"strong"`` bakes the precision into the ONNX (weights and activations cast inside, float32
  islands such as the timestep sinusoid cast where they meet the weights, I/O kept in the step
  graph's dtypes; see ``onnx_export.CastedStep``) and builds a ``STRONGLY_TYPED`` network.
  ``"auto"`` (default): weak where ``BuilderFlag.FP16`` exists (10.x), else strong (11.x).
- ``batch=(min, opt, max)``: optimization-profile range for a dynamic batch dimension (default
  ``(1, B, 4·B)`` around the captured batch ``B``; a call outside it is a clear error); static
  inputs get ``min = opt = max`` = their shape.
- ``workspace_bytes``, ``optimization_level`` (builder optimisation level 0–5),
  ``timing_cache`` (file name in the directory, or an absolute path; ``None`` to disable),
  ``check_ops`` (static operator check, see ``trt_ops``), ``hardware_compatible`` (an Ampere+
  compatible engine: needs compute capability ≥ 8.0 to build and to run),
  ``opset_version`` (default 20; 22 for strongly typed bf16, whose Conv needs opset 22).
- ``via="torch_tensorrt"``: compile the step's ExportedProgram with
  ``torch_tensorrt.dynamo.compile`` instead (see ``trt_torch``).

Graph inputs and outputs must have a TensorRT type: float64 is refused at export (TensorRT's
ONNX parser would make a DOUBLE input FLOAT, and a float64 tensor bound to it would be read as
float32), and a loaded engine's I/O types are checked against the manifest.

The runtime binds torch CUDA tensors by ``data_ptr()`` with ``set_tensor_address`` (TensorRT
requires 256-byte aligned addresses: an unaligned input, such as a contiguous slice of a larger
tensor, is copied to an aligned buffer first; every return code is checked, so an address that
TensorRT refused can never leave the previous call's address bound). Every input must be on the
engine's device; load and call run under ``torch.cuda.device`` of that device. Execution is
enqueued with ``execute_async_v3`` on torch's current stream when that is a user stream; on the
default stream (where ``enqueueV3`` adds device synchronisation) it runs on a side stream
ordered after the current stream's work and before anything enqueued after the call.

Verified here: everything up to the ONNX and the operator check, and the build and runtime code
against a simulated ``tensorrt`` module (tests/backends/simulated_tensorrt.py). Not run here:
engine build and execution (TensorRT needs a CUDA GPU, none on these machines).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
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
from cachecompile.backends.cuda_device import check_ampere_plus, check_device, device_record
from cachecompile.backends.onnx_export import DEFAULT_OPSET, export_onnx, reduced_precision_module

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TYPINGS = ("auto", "weak", "strong")
# TensorRT requires every tensor address bound with set_tensor_address to be 256-byte aligned.
ALIGNMENT = 256
# Opset from which ONNX Conv (the DiT patch embedding) accepts bfloat16.
BF16_MIN_OPSET = 22
# torch dtypes a TensorRT engine can take or give (TensorRT has no float64, int16, complex ...).
ENGINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool)


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
    opset_version: int | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"tensorrt precision {self.precision!r} is not one of {sorted(PRECISIONS)}")
        if self.typing not in TYPINGS:
            raise ValueError(f"tensorrt typing {self.typing!r} is not one of {TYPINGS}")
        if self.batch is not None:
            lo, opt, hi = self.batch
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"tensorrt batch range must satisfy 1 <= min <= opt <= max, got {self.batch}")
        if self.optimization_level is not None and not 0 <= int(self.optimization_level) <= 5:
            raise ValueError(f"tensorrt optimization_level must be 0–5, got {self.optimization_level}")

    def opset(self, typing: str) -> int:
        """The ONNX opset to export: strongly typed bf16 needs Conv-22's bfloat16."""
        needs = BF16_MIN_OPSET if typing == "strong" and self.precision == "bf16" else DEFAULT_OPSET
        if self.opset_version is None:
            return needs
        if self.opset_version < needs:
            raise ValueError(
                f"tensorrt precision='bf16' with strong typing needs ONNX opset >= {BF16_MIN_OPSET} "
                f"(Conv accepts bfloat16 from opset 22), got opset_version={self.opset_version}; leave it unset"
            )
        return int(self.opset_version)


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


DEFAULT_MAX_BATCH_FACTOR = 4  # a dynamic batch's default profile: (1, captured, 4 × captured)


def profile_shapes(
    inputs: Sequence[TensorSpec], batch: tuple[int, int, int] | None, example_batch: int | None = None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input. Only a leading (batch) dimension may be dynamic; its range
    is ``batch``, else ``(1, example_batch, 4 × example_batch)`` around the captured batch."""
    if batch is None and example_batch is not None:
        batch = (1, example_batch, DEFAULT_MAX_BATCH_FACTOR * example_batch)
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


def check_engine_dtypes(specs: Sequence[TensorSpec], where: str) -> None:
    """Refuse graph I/O a TensorRT engine cannot take (float64 above all: see the module doc)."""
    bad = [s for s in specs if s.torch_dtype not in ENGINE_DTYPES]
    if bad:
        names = ", ".join(s.describe() for s in bad)
        raise BackendCompileError(
            f"{where}: TensorRT has no type for {names} (its ONNX parser would read float64 as float32); "
            "cast the model and its inputs to float32 (model.float()) or a half precision first"
        )


class TensorRTBackend:
    name = "tensorrt"
    bakes_weights = True  # the lowered graphs hold a copy of the weights
    # The engine build settings, taken as keyword options (checked at cachecompile.optimize).
    extra_options = tuple(f.name for f in dataclasses.fields(BuildSettings))

    def validate_options(self, *, via: str = "onnx", **settings: Any) -> None:
        if via not in ("onnx", "torch_tensorrt"):
            raise ValueError(f"tensorrt via={via!r}: use 'onnx' (engines from our ONNX) or 'torch_tensorrt'")
        BuildSettings(**{k: v for k, v in settings.items() if k in self.extra_options})  # checks the values

    def compile(self, gm: GraphModule, example_inputs: Sequence[Tensor], **options: Any) -> Any:
        """Build in a temporary directory and deserialize the engine (or torch-tensorrt).

        The timing cache is shared by every compile of this process (a process-wide file unless
        ``timing_cache`` names one), so the step graphs of a schedule reuse each other's timings.
        """
        if options.pop("via", "onnx") == "torch_tensorrt":
            from cachecompile.backends import trt_torch

            return trt_torch.compile_step(gm, example_inputs, **options)
        if options.get("timing_cache", "timing.cache") == "timing.cache":
            options["timing_cache"] = str(_process_timing_cache())
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

            return trt_torch.load_step(directory, entry, verify=verify, check_inputs=check_inputs)
        import tensorrt as trt

        inputs, outputs = check_entry(directory, entry, "tensorrt", verify=verify)
        check_version(entry, "tensorrt", trt.__version__)
        _check_supported(trt.__version__, ArtifactError)
        check_device(entry)
        path = directory / entry["files"]["engine"]
        device = _engine_device()
        with _device_guard(device):
            engine = trt.Runtime(_logger()).deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ArtifactError(f"tensorrt: cannot deserialize {path}; rebuild it with this TensorRT and GPU")
            return TRTStep(engine, inputs, outputs, check_inputs, f"tensorrt step {path.name}", device)


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

    _check_supported(trt.__version__, BackendCompileError)
    if not cuda_device._cuda_available():
        raise BackendCompileError("tensorrt: building an engine needs a CUDA GPU; none is available")
    inputs, outputs = graph_signature(gm, example_inputs, input_names, output_names)
    check_engine_dtypes([*inputs, *outputs], f"tensorrt export of {stem}")
    typing = resolve_typing(settings, hasattr(trt.BuilderFlag, "FP16"))
    opset = settings.opset(typing)
    if settings.hardware_compatible:
        check_ampere_plus("build a hardware-compatible (AMPERE_PLUS) engine")
    module = gm
    dtype = PRECISIONS[settings.precision]
    if typing == "strong" and dtype is not None:
        module = reduced_precision_module(gm, dtype, outputs)
    # full_check: strict type inference, so a node bound to two types fails here, not in the parser.
    onnx_file = export_onnx(
        module, example_inputs, directory / f"{stem}.onnx", inputs, outputs, opset_version=opset, full_check=True
    )
    if settings.check_ops:
        assert_tensorrt_compatible(onnx_file.path, trt.__version__)
    present = set(onnx_file.input_names)
    batched = [x for x, spec in zip(example_inputs, inputs) if spec.shape and spec.shape[0] is None]
    example_batch = int(batched[0].shape[0]) if batched else None
    shapes = {k: v for k, v in profile_shapes(inputs, settings.batch, example_batch).items() if k in present}
    cache_path = directory / settings.timing_cache if settings.timing_cache else None
    engine = build_engine(onnx_file.path, shapes, settings, typing, cache_path)
    engine_path = directory / f"{stem}.engine"
    engine_path.write_bytes(engine)
    timing_cache = None
    if cache_path is not None:  # a name inside the artifact, or an outside path recorded as is
        timing_cache = cache_path.name if cache_path.parent == directory else str(cache_path)
    return make_entry(
        "tensorrt", directory, {"onnx": onnx_file.path.name, "engine": engine_path.name}, inputs, outputs,
        versions={"tensorrt": trt.__version__}, options={**asdict(settings), "typing": typing, "opset_version": opset},
        via="onnx", device=device_record(settings.hardware_compatible),
        timing_cache=timing_cache,
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
    if config.add_optimization_profile(profile) < 0:
        raise BackendCompileError(
            f"tensorrt: the optimization profile for {onnx_path.name} is invalid ({shapes}); "
            "check batch=(min, opt, max) against the inputs' shapes"
        )
    cache = _attach_timing_cache(config, timing_cache) if timing_cache is not None else None
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendCompileError(f"tensorrt: engine build failed for {onnx_path.name} (see the TensorRT log above)")
    if cache is not None and timing_cache is not None:
        timing_cache.write_bytes(memoryview(cache.serialize()))
    return bytes(memoryview(serialized))


def _attach_timing_cache(config: Any, path: Path) -> Any:
    """Load ``path`` (or start empty) into ``config``; a stale or corrupt file is replaced.

    ``set_timing_cache(ignore_mismatch=False)`` refuses a cache from another GPU or TensorRT
    (returns False), and ``create_timing_cache`` returns None for bytes it cannot read: then the
    build starts from an empty cache, with a warning, and that new cache replaces the file.
    """
    blob = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(blob) if blob else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if blob:
        why = "unreadable" if cache is None else "from another GPU or TensorRT version"
        warnings.warn(f"tensorrt: timing cache {path} is {why}; building with an empty one, which replaces it", stacklevel=3)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BackendCompileError("tensorrt: cannot create an empty timing cache (see the TensorRT log); pass timing_cache=None")
    return cache


def _apply_settings(trt: Any, config: Any, settings: BuildSettings, typing: str) -> None:
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    if settings.optimization_level is not None:
        config.builder_optimization_level = int(settings.optimization_level)
    if settings.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if not settings.tf32:  # on by default: float32 layers would compute in TF32
        config.clear_flag(trt.BuilderFlag.TF32)
    if typing == "weak" and settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif typing == "weak" and settings.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)


_LOGGER: Any = None


def _logger() -> Any:
    """One ``trt.Logger`` for the process: TensorRT keeps a single logger pointer and warns
    each time a builder or runtime brings another."""
    global _LOGGER
    import tensorrt as trt

    if _LOGGER is None or not isinstance(_LOGGER, trt.Logger):
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


_TIMING_DIR: Path | None = None


def _process_timing_cache() -> Path:
    """The timing-cache file shared by every in-memory ``compile`` of this process."""
    global _TIMING_DIR
    if _TIMING_DIR is None or not _TIMING_DIR.is_dir():
        _TIMING_DIR = Path(tempfile.mkdtemp(prefix="cachecompile-trt-timing-"))
        atexit.register(shutil.rmtree, _TIMING_DIR, True)
    return _TIMING_DIR / "timing.cache"


def _check_supported(version: str, error: type[Exception]) -> None:
    from cachecompile.backends.trt_ops import TensorRTUnsupportedError, check_tensorrt_version

    try:
        check_tensorrt_version(version)
    except (TensorRTUnsupportedError, ValueError) as e:
        raise error(str(e)) from None


def _engine_device() -> torch.device:
    """The CUDA device engines are deserialized on and run on: torch's current device."""
    return torch.device("cuda", torch.cuda.current_device())


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for TensorRT calls (its CUDA context is the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def torch_dtype_of(trt: Any, dt: Any) -> torch.dtype:
    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
        "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
    }
    for key, value in table.items():
        if getattr(trt.DataType, key, None) == dt:
            return value
    raise ArtifactError(f"tensorrt: engine tensor type {dt} has no torch dtype here")


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` whose ``data_ptr()`` is ``ALIGNMENT``-byte aligned (the CUDA caching
    allocator's blocks already are; anything else is carved out of a slightly larger buffer)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if t.data_ptr() % ALIGNMENT == 0:
        return t
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -raw.data_ptr() % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).view(tuple(shape))


def bindable(t: Tensor) -> Tensor:
    """``t`` itself when TensorRT can read it in place (contiguous, aligned), else an aligned copy.

    ``.contiguous()`` alone is not enough: a contiguous slice such as ``x.view(-1)[7:]`` keeps
    its unaligned address.
    """
    if t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0:
        return t
    return aligned_empty(t.shape, t.dtype, t.device).copy_(t)


class TRTStep:
    """A deserialized engine called like the step graph, on CUDA tensors of one device."""

    def __init__(
        self,
        engine: Any,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        check_inputs: bool,
        where: str,
        device: torch.device,
    ) -> None:
        import tensorrt as trt

        self._engine = engine
        self._device = device
        self._where = where
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ArtifactError(f"{where}: cannot create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        engine_inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self._inputs = inputs
        # The ONNX exporter drops inputs the graph never reads: bind only the engine's.
        self._bound = [(i, s.name) for i, s in enumerate(inputs) if s.name in engine_inputs]
        for i, name in self._bound:
            self._check_dtype("input", name, torch_dtype_of(trt, engine.get_tensor_dtype(name)), inputs[i])
        self._outputs = [(s.name, torch_dtype_of(trt, engine.get_tensor_dtype(s.name))) for s in outputs]
        for (name, dtype), spec in zip(self._outputs, outputs):
            self._check_dtype("output", name, dtype, spec)
        self._check_inputs = check_inputs
        self._side_stream: Any = None

    def _check_dtype(self, kind: str, name: str, engine_dtype: torch.dtype, spec: TensorSpec) -> None:
        if engine_dtype != spec.torch_dtype:
            raise ArtifactError(
                f"{self._where}: engine {kind} {name} is {engine_dtype}, the manifest says {spec.dtype}; "
                "a tensor bound to it would be misread; re-export the model (float64 I/O is not supported)"
            )

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        if self._check_inputs:
            check_call_inputs(args, self._inputs, self._where)
        for spec, arg in zip(self._inputs, args):
            if not isinstance(arg, Tensor) or arg.device != self._device:
                got = arg.device if isinstance(arg, Tensor) else type(arg).__name__
                raise ValueError(
                    f"{self._where}: input {spec.name} is on {got}; this TensorRT engine runs on {self._device} "
                    f"and takes CUDA tensors of that device only (move the inputs with .to({str(self._device)!r}))"
                )
        with _device_guard(self._device):
            return self._run(args)

    def _run(self, args: Sequence[Tensor]) -> tuple[Tensor, ...]:
        ctx = self._context
        keep = []  # aligned copies live until enqueued; the allocator orders reuse on this stream
        for i, name in self._bound:
            t = bindable(args[i])
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{self._where}: shape {tuple(t.shape)} of {name} is outside the engine's optimization profile")
            self._bind(name, t)
        outs = []
        for name, dtype in self._outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(int(s) < 0 for s in shape):
                raise RuntimeError(f"{self._where}: TensorRT could not infer the shape of output {name} ({shape})")
            out = aligned_empty(shape, dtype, self._device)
            self._bind(name, out)
            outs.append(out)
        with self._stream() as handle:
            if not ctx.execute_async_v3(handle):
                raise RuntimeError(f"{self._where}: execute_async_v3 failed (see the TensorRT log)")
        return tuple(outs)

    def _bind(self, name: str, t: Tensor) -> None:
        # A refused address would leave the previous call's (maybe freed) buffer bound.
        if not self._context.set_tensor_address(name, t.data_ptr()):
            raise RuntimeError(
                f"{self._where}: TensorRT refused the address of {name} ({t.data_ptr():#x}; it needs "
                f"{ALIGNMENT}-byte alignment and a tensor name of the engine)"
            )

    @contextlib.contextmanager
    def _stream(self) -> Iterator[int]:
        """Yield the stream handle to enqueue on; never the default stream."""
        current = torch.cuda.current_stream(self._device)
        if int(current.cuda_stream) not in _DEFAULT_STREAMS:
            yield int(current.cuda_stream)
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self._device)
        side = self._side_stream
        side.wait_stream(current)  # inputs written on the current stream are ready
        try:
            yield int(side.cuda_stream)
        finally:
            current.wait_stream(side)  # whatever comes next on the current stream sees the outputs


# cudaStreamLegacy (the default stream torch reports as 0 or 1) and cudaStreamPerThread (2).
_DEFAULT_STREAMS = frozenset({0, 1, 2})
