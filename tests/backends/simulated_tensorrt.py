"""A simulated ``tensorrt`` module for the CPU machines, which refuses what the real one refuses.

TensorRT cannot run here. This stand-in implements the part of the documented Python API the
backend uses (TensorRT 10.x / 11.x: ``Builder``, ``OnnxParser``, ``IBuilderConfig``,
``IOptimizationProfile``, ``ITimingCache``, ``Runtime``, ``ICudaEngine``, ``IExecutionContext``)
and the checks the real library makes, as its headers and bindings document them:

- ``IExecutionContext.set_tensor_address`` returns False for an address that is not 256-byte
  aligned (or a name that is not an I/O tensor) and keeps the previous address;
- ``set_input_shape`` returns False for a shape outside the optimization profile, of another
  rank, or off a static dimension; ``get_tensor_shape`` reports the shape that was set, resolves
  an output's dynamic dimensions from the input shapes set, and says -1 where it cannot;
- ``execute_async_v3`` returns False while an address or input shape is missing;
- ``IOptimizationProfile.set_shape`` raises RuntimeError on min > opt > max or mixed ranks,
  ``add_optimization_profile`` returns -1 for an invalid profile;
- the parser maps ONNX DOUBLE to FLOAT (as onnx-tensorrt's ``convertDtype`` does), BFLOAT16 to
  BF16, and refuses element types TensorRT lacks;
- the builder honours the config: ``BuilderFlag.TF32`` starts set, FP16/BF16 flags exist only
  before TensorRT 11 and are an error on a strongly typed network (11.x networks always are),
  a dynamic input without a covering profile, a profile off the network's shapes, or an
  AMPERE_PLUS build below compute capability 8.0 make ``build_serialized_network`` return None;
- ``create_timing_cache`` returns None for bytes it cannot read, ``set_timing_cache`` returns
  False for a cache from another TensorRT version or GPU; builds record cache hits;
- a runtime refuses (None) a plan from another TensorRT version;
- TensorRT keeps one logger: a builder or runtime with another one logs a warning.

The "engine" is the parsed ONNX model run by ONNX Runtime on the CPU, reading and writing the
bound addresses with the engine's I/O types, so a float64 tensor bound to a FLOAT input is read as
float32 here as on a GPU. The simulated GPU's memory is host memory: the backend's device seam
(``_engine_device``) is pointed at the CPU, and torch's stream API is replaced by
:class:`SimulatedStreams`, which records the order of stream waits and enqueues. It proves
nothing about TensorRT's kernels: tests/backends/test_trt_gpu.py does that on a GPU.
"""

from __future__ import annotations

import ctypes
import json
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

ALIGNMENT = 256
PLAN_MAGIC = b"SIMPLAN1\n"
CACHE_MAGIC = b"SIMCACHE1\n"

# ONNX element type → TensorRT DataType name, as TensorRT's ONNX parser converts them.
_ONNX_TO_TRT = {
    TensorProto.FLOAT: "FLOAT", TensorProto.DOUBLE: "FLOAT", TensorProto.FLOAT16: "HALF",
    TensorProto.BFLOAT16: "BF16", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
}
_TRT_TO_NUMPY = {
    "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8,
    "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
}


def make_tensorrt(version: str = "10.15.1.29", gpu: str = "Simulated GPU", capability: tuple[int, int] = (8, 9)) -> Any:
    """A fresh simulated ``tensorrt`` module of that version, "running" on that GPU."""
    import importlib.machinery

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") asks (torch._dynamo does)
    trt.__version__ = version
    major = int(version.split(".")[0])
    trt.gpu, trt.capability = gpu, tuple(capability)
    trt.calls = []  # what the backend asked for, in order
    trt.log = []  # (severity, message), as TensorRT's logger would print them
    trt.loggers = []
    trt.active_logger = None

    class Logger:
        WARNING, ERROR, INFO = 2, 1, 3

        def __init__(self, level: int = 2) -> None:
            self.level = level
            trt.loggers.append(self)

    def use_logger(logger: Any) -> None:
        if not isinstance(logger, Logger):
            raise TypeError("a tensorrt.Logger is required")
        if trt.active_logger is None:
            trt.active_logger = logger
        elif logger is not trt.active_logger:
            trt.log.append(("W", "The logger passed differs from one already provided; the existing one is kept"))

    def error(message: str) -> None:
        trt.log.append(("E", message))

    trt.Logger = Logger
    trt.DataType = types.SimpleNamespace(**{n: n for n in ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "UINT8", "BOOL", "FP8", "INT4"]})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    flags = {"TF32": "TF32"}
    if major < 11:  # weak typing was removed in TensorRT 11
        flags.update(FP16="FP16", BF16="BF16")
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS", SAME_COMPUTE_CAPABILITY="SAME")
    trt.TensorIOMode = types.SimpleNamespace(NONE="NONE", INPUT="INPUT", OUTPUT="OUTPUT")
    cache_key = [version, gpu, list(capability)]

    @dataclass
    class ITensor:
        name: str
        shape: tuple[int, ...]
        dtype: str
        dims: tuple[Any, ...]  # per axis: an int, or the ONNX dim_param naming a dynamic size

    class Network:
        def __init__(self, creation_flags: int) -> None:
            trt.calls.append(("create_network", creation_flags))
            self.strongly_typed = bool(creation_flags & (1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) or major >= 11
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.model: Any = None

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

    def tensor_of(value: Any) -> ITensor | str:
        elem = value.type.tensor_type.elem_type
        if elem not in _ONNX_TO_TRT:
            return f"{value.name}: element type {TensorProto.DataType.Name(elem)} is not supported by TensorRT"
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim)
        shape = tuple(d if isinstance(d, int) else -1 for d in dims)
        return ITensor(value.name, shape, _ONNX_TO_TRT[elem], dims)

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            use_logger(logger)
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)  # external data resolved next to the model, as the parser does
            initializers = {t.name for t in model.graph.initializer}
            for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
                for value in values:
                    if value.name in initializers:
                        continue
                    t = tensor_of(value)
                    if isinstance(t, str):
                        self.errors.append(t)
                    else:
                        getattr(self.network, kind).append(t)
            self.network.model = model
            return not self.errors

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
            if not len(lo) == len(opt) == len(hi) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
            self.shapes[name] = (lo, opt, hi)
            trt.calls.append(("set_shape", name, lo, opt, hi))

        def __bool__(self) -> bool:
            return bool(self.shapes)

    class TimingCache:
        def __init__(self, key: Any, entries: list[str]) -> None:
            self.key, self.entries = key, set(entries)

        def serialize(self) -> bytes:
            key = cache_key if self.key is None else self.key  # a refused cache keeps its origin
            return CACHE_MAGIC + json.dumps({"key": key, "entries": sorted(self.entries)}).encode()

    class Config:
        def __init__(self) -> None:
            self.flags = {trt.BuilderFlag.TF32}  # TF32 is on by default
            self.profiles: list[Profile] = []
            self.timing_cache: TimingCache | None = None
            self.builder_optimization_level = 3
            self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE

        def set_flag(self, flag: Any) -> None:
            trt.calls.append(("set_flag", flag))
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            trt.calls.append(("clear_flag", flag))
            self.flags.discard(flag)

        def get_flag(self, flag: Any) -> bool:
            return flag in self.flags

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            trt.calls.append(("workspace", size))

        def add_optimization_profile(self, profile: Profile) -> int:
            if not profile:
                error("IBuilderConfig::addOptimizationProfile: profile is invalid")
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob: Any) -> TimingCache | None:
            blob = bytes(blob)
            trt.calls.append(("timing_cache_in", blob))
            if not blob:
                return TimingCache(None, [])
            try:
                assert blob.startswith(CACHE_MAGIC)
                data = json.loads(blob[len(CACHE_MAGIC):])
                return TimingCache(data["key"], data["entries"])
            except Exception:
                error("createTimingCache: the serialized timing cache is corrupt")
                return None

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache.key is not None and cache.key != cache_key and not ignore_mismatch:
                error("setTimingCache: the timing cache was created for another device or TensorRT version")
                return False
            cache.key = cache_key if cache.key is None else cache.key
            self.timing_cache = cache
            return True

    class Builder:
        def __init__(self, logger: Any) -> None:
            use_logger(logger)

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            problem = self._problem(network, config)
            if problem:
                error(f"buildSerializedNetwork: {problem}")
                return None
            hits = 0
            if config.timing_cache is not None:  # one "tactic" per node kind
                keys = {f"{node.op_type}:{len(node.input)}" for node in network.model.graph.node}
                hits = len(keys & config.timing_cache.entries)
                config.timing_cache.entries |= keys
            trt.calls.append(("build", {"timing_cache_hits": hits}))
            header = {
                "version": version, "strongly_typed": network.strongly_typed, "flags": sorted(config.flags),
                "hardware_compatibility": config.hardware_compatibility_level,
                "profile": {k: [list(s) for s in v] for k, v in (config.profiles[0].shapes.items() if config.profiles else [])},
                "inputs": [[t.name, list(t.dims), t.dtype] for t in network.inputs],
                "outputs": [[t.name, list(t.dims), t.dtype] for t in network.outputs],
            }
            return PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network.model.SerializeToString()

        @staticmethod
        def _problem(network: Network, config: Config) -> str:
            weak = {getattr(trt.BuilderFlag, n, None) for n in ("FP16", "BF16")} - {None}
            if network.strongly_typed and config.flags & weak:
                return "precision flags (FP16/BF16) are not allowed on a strongly typed network"
            if config.hardware_compatibility_level == "AMPERE_PLUS" and tuple(capability) < (8, 0):
                return "hardware compatibility AMPERE_PLUS needs compute capability >= 8.0"
            profile = config.profiles[0].shapes if config.profiles else {}
            for t in network.inputs:
                if t.name not in profile:
                    if -1 in t.shape:
                        return f"input {t.name} has dynamic dimensions and no optimization profile"
                    continue
                for s in profile[t.name]:
                    if len(s) != len(t.shape) or any(d != -1 and d != v for d, v in zip(t.shape, s)):
                        return f"optimization profile shape {s} of {t.name} does not fit its dimensions {t.shape}"
            return ""

    class Engine:
        def __init__(self, header: dict, model_bytes: bytes) -> None:
            self.header, self.model_bytes, self.session = header, model_bytes, None
            self.io = {n: ("INPUT", tuple(d), dt) for n, d, dt in header["inputs"]}
            self.io.update({n: ("OUTPUT", tuple(d), dt) for n, d, dt in header["outputs"]})
            self.names = list(self.io)
            self.profile = {k: tuple(tuple(s) for s in v) for k, v in header["profile"].items()}
            self.hardware_compatibility_level = header["hardware_compatibility"]

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return self.io[name][0] if name in self.io else trt.TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> str:
            return self.io[name][2]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(d if isinstance(d, int) else -1 for d in self.io[name][1])

        def create_execution_context(self) -> Context:
            return Context(self)

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self.streams: list[int] = []

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(s) for s in shape)
            if self.engine.get_tensor_mode(name) != "INPUT":
                error(f"setInputShape: {name} is not an input tensor")
                return False
            declared = self.engine.get_tensor_shape(name)
            bounds = self.engine.profile.get(name, (declared, declared, declared))
            lo, hi = bounds[0], bounds[2]
            fits = len(shape) == len(declared) and all(
                (d == -1 or d == s) and a <= s <= b for d, s, a, b in zip(declared, shape, lo, hi)
            )
            if not fits:
                error(f"setInputShape: shape {shape} of {name} is outside the optimization profile {bounds}")
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.shapes:
                return self.shapes[name]
            sizes: dict[str, int] = {}
            for n, shape in self.shapes.items():
                for d, s in zip(self.engine.io[n][1], shape):
                    if isinstance(d, str):
                        sizes[d] = s
            return tuple(d if isinstance(d, int) else sizes.get(d, -1) for d in self.engine.io[name][1])

        def set_tensor_address(self, name: str, address: int) -> bool:
            if name not in self.engine.io:
                error(f"setTensorAddress: {name} is not an I/O tensor")
                return False
            if int(address) % ALIGNMENT:
                error(f"setTensorAddress: address {int(address):#x} of {name} is not {ALIGNMENT}-byte aligned")
                return False
            self.addresses[name] = int(address)
            return True

        def _view(self, name: str) -> np.ndarray:
            dtype = np.dtype(_TRT_TO_NUMPY[self.engine.get_tensor_dtype(name)])
            shape = self.get_tensor_shape(name)
            count = int(np.prod(shape)) if shape else 1
            raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
            return np.frombuffer(raw, dtype=dtype).reshape(shape)

        def execute_async_v3(self, stream_handle: int) -> bool:
            self.streams.append(int(stream_handle))
            trt.calls.append(("execute", int(stream_handle)))
            missing = [n for n in self.engine.names if n not in self.addresses]
            missing += [n for n, (mode, _, _) in self.engine.io.items() if mode == "INPUT" and n not in self.shapes and -1 in self.engine.get_tensor_shape(n)]
            if missing:
                error(f"enqueueV3: no address or shape set for {missing}")
                return False
            if any(dt not in _TRT_TO_NUMPY for _, _, dt in self.engine.io.values()):
                error("enqueueV3: the simulation cannot run this engine's types (BF16) on the CPU")
                return False
            import onnxruntime

            if self.engine.session is None:
                try:
                    self.engine.session = onnxruntime.InferenceSession(self.engine.model_bytes, providers=["CPUExecutionProvider"])
                except Exception as e:  # ONNX Runtime has no CPU kernel for, e.g., a bfloat16 Conv
                    error(f"enqueueV3: the simulation cannot run this engine on the CPU ({str(e)[:200]})")
                    return False
            session = self.engine.session
            feeds = {}
            for i in session.get_inputs():  # read with the engine's type, fed with the model's
                feeds[i.name] = self._view(i.name).astype(_ort_numpy(i.type))
            for out, value in zip(session.get_outputs(), session.run(None, feeds)):
                np.copyto(self._view(out.name), value.astype(self._view(out.name).dtype))
            return True

    class Runtime:
        def __init__(self, logger: Any) -> None:
            use_logger(logger)

        def deserialize_cuda_engine(self, plan: Any) -> Engine | None:
            plan = bytes(plan)
            if not plan.startswith(PLAN_MAGIC):
                error("deserializeCudaEngine: not a serialized engine")
                return None
            header_line, model = plan[len(PLAN_MAGIC):].split(b"\n", 1)
            header = json.loads(header_line)
            if header["version"] != version:
                error(f"deserializeCudaEngine: the engine was built with TensorRT {header['version']}, not {version}")
                return None
            return Engine(header, model)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def _ort_numpy(ort_type: str) -> Any:
    return {
        "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
        "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
        "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
    }[ort_type]


@dataclass
class SimulatedStream:
    cuda_stream: int
    log: list = field(repr=False)

    def wait_stream(self, other: SimulatedStream) -> None:
        self.log.append(("wait", self.cuda_stream, other.cuda_stream))


class SimulatedStreams:
    """Stands in for ``torch.cuda.current_stream`` / ``torch.cuda.Stream``; records the waits."""

    def __init__(self, current: int = 0) -> None:
        self.log: list = []
        self.created: list[SimulatedStream] = []
        self.current_stream = SimulatedStream(current, self.log)

    def current(self, device: Any = None) -> SimulatedStream:
        return self.current_stream

    def new(self, device: Any = None, priority: int = 0) -> SimulatedStream:
        stream = SimulatedStream(0x5000 + len(self.created), self.log)
        self.created.append(stream)
        return stream


def install(monkeypatch: Any, **kwargs: Any) -> Any:
    """Make ``import tensorrt`` give a simulated module, and point the backend's CUDA seams at
    the host (see the module docstring). Returns the module; its ``streams`` the stream stand-in."""
    import sys

    import torch

    import cachecompile.backends.trt as trt_backend

    fake = make_tensorrt(**kwargs)
    fake.streams = SimulatedStreams()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "_LOGGER", None)
    from cachecompile.backends import cuda_device

    monkeypatch.setattr(cuda_device, "_cuda_available", lambda: True)
    monkeypatch.setattr(trt_backend, "_engine_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: fake.gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: fake.capability)
    streams = fake.streams

    class Stream:  # a class, as torch.cuda.Stream is (code annotates with `torch.cuda.Stream | None`)
        def __new__(cls, device: Any = None, priority: int = 0) -> SimulatedStream:  # type: ignore[misc]
            return streams.new(device, priority)

    monkeypatch.setattr(torch.cuda, "current_stream", streams.current)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    return fake
