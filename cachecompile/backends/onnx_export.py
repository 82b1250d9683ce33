"""ONNX export of a step graph, shared by the ``onnxruntime`` and ``tensorrt`` backends.

Cache tensors are ordinary graph inputs and outputs with explicit names: the ONNX exporter
drops in-place buffer writes without a warning, so the cache never lives in a buffer.
Opset 20 is the default because TensorRT 10.0's parser accepts opsets 9–20 (later 10.x up to
24) and ONNX Runtime 1.17+ runs it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from cachecompile.backends._common import BackendCompileError, TensorSpec

DEFAULT_OPSET = 20
# protobuf refuses messages over 2 GiB; stay well below it before moving weights out.
_EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class OnnxFile:
    """What an export produced: the file, the opset, and the graph's I/O names in order."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    external_data: bool


def param_bytes(gm: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_onnx(
    gm: torch.nn.Module,
    example_inputs: Sequence[Tensor],
    path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    opset_version: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    optimize: bool = True,
    full_check: bool = False,
) -> OnnxFile:
    """Export ``gm`` to ``path`` with the given I/O names; checks the model afterwards.

    ``external_data=None`` keeps the weights inside the file unless they exceed 1 GiB, in
    which case they go to ``<path>.data`` (ONNX Runtime and TensorRT's parser read both).
    Symbolic dimensions of the inputs (``None`` in ``inputs``) are exported as dynamic.
    ``full_check=True`` adds ONNX's strict shape and type inference to the check, which fails
    on a node whose inputs are bound to different element types (what ONNX Runtime and
    TensorRT's parser refuse to load); the reduced-precision exports for TensorRT use it.
    """
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = param_bytes(gm) > _EXTERNAL_DATA_BYTES
    dims = torch.export.Dim.AUTO
    dynamic: Any = None
    if any(size is None for spec in inputs for size in spec.shape):
        dynamic = tuple({i: dims for i, size in enumerate(spec.shape) if size is None} or None for spec in inputs)
        if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(gm.forward).parameters.values()):
            dynamic = (dynamic,)  # forward(*args): one positional argument, a tuple of the inputs
    log = io.StringIO()
    try:
        # The exporter prints progress lines on stdout; keep them for the error message only.
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            # An ATen-level step graph has no train/eval-dependent modules left.
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            torch.onnx.export(
                gm,
                tuple(example_inputs),
                str(path),
                dynamo=True,
                opset_version=opset_version,
                input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs],
                dynamic_shapes=dynamic,
                external_data=external_data,
                optimize=optimize,
                verbose=False,
            )
    except Exception as e:
        raise BackendCompileError(f"ONNX export of step graph to {path.name} failed: {e}\n{log.getvalue()}") from e
    # check_model on a path also validates external data files.
    try:
        onnx.checker.check_model(str(path), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BackendCompileError(f"the ONNX exported to {path.name} is not a valid model: {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    in_names = [i.name for i in model.graph.input]
    out_names = [o.name for o in model.graph.output]
    _check_io_names(in_names, out_names, inputs, outputs, path)
    return OnnxFile(path, opset, in_names, out_names, external_data)


def _check_io_names(
    in_names: list[str], out_names: list[str], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], path: Path
) -> None:
    """Outputs must come back exactly; an input may only be missing if the graph ignores it."""
    if out_names != [s.name for s in outputs]:
        raise BackendCompileError(f"{path.name}: ONNX outputs {out_names} differ from the step graph's {[s.name for s in outputs]}")
    expected = [s.name for s in inputs]
    if [n for n in expected if n in in_names] != in_names:
        raise BackendCompileError(f"{path.name}: ONNX inputs {in_names} are not a subsequence of {expected}")


def onnx_dtype(dtype: torch.dtype) -> int:
    """The ``onnx.TensorProto`` element type of a torch dtype (IOBinding takes these ints)."""
    import onnx

    table = {
        torch.float32: onnx.TensorProto.FLOAT,
        torch.float16: onnx.TensorProto.FLOAT16,
        torch.bfloat16: onnx.TensorProto.BFLOAT16,
        torch.float64: onnx.TensorProto.DOUBLE,
        torch.int64: onnx.TensorProto.INT64,
        torch.int32: onnx.TensorProto.INT32,
        torch.int16: onnx.TensorProto.INT16,
        torch.int8: onnx.TensorProto.INT8,
        torch.uint8: onnx.TensorProto.UINT8,
        torch.bool: onnx.TensorProto.BOOL,
    }
    if dtype not in table:
        raise TypeError(f"dtype {dtype} has no ONNX element type here")
    return table[dtype]


class CastedStep(torch.nn.Module):
    """Runs a reduced-precision copy of a step graph behind the step graph's own I/O dtypes.

    For strongly typed TensorRT builds the precision must be in the graph itself; this keeps
    the engine's I/O in the step graph's dtypes so the runtime's cache buffers do not change,
    while every weight and activation inside is ``dtype``.

    A step graph captured in float32 also hard-codes float32 in places: diffusers' timestep
    embedding builds its sinusoid with ``arange(dtype=float32)`` and casts it with
    ``_to_copy(dtype=float32)`` before the embedding MLP. ``.to(dtype)`` changes the weights
    only, so such a value would meet ``dtype`` weights in one op (an ONNX ``Gemm`` bound to two
    types, which ONNX Runtime and TensorRT's parser refuse). The graph is therefore run by
    :class:`_ReducedPrecisionInterpreter`, which casts the float32 operands of every op that
    mixes float32 with ``dtype`` down to ``dtype``: float32 islands such as the sinusoid stay
    float32 (sin/cos of a timestep near 1000 need float32's mantissa) and are cast once, where
    they meet the reduced-precision weights. Tracing this module (``torch.export``, the ONNX
    exporter) records those casts as ordinary graph ops.
    """

    def __init__(self, gm: GraphModule, dtype: torch.dtype, io_dtypes: Sequence[torch.dtype]) -> None:
        super().__init__()
        import copy

        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"CastedStep casts to float16 or bfloat16, not {dtype}")
        self.inner = copy.deepcopy(gm).to(dtype)
        self.dtype = dtype
        self.io_dtypes = list(io_dtypes)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        cast = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
        outs = _ReducedPrecisionInterpreter(self.inner, self.dtype).run(*cast)
        return tuple(o.to(d) if o.is_floating_point() else o for o, d in zip(outs, self.io_dtypes))


# ATen ops whose ONNX form has no bfloat16 at the opsets we export (Einsum: none at any opset;
# TopK: from opset 24 only). Under bf16 they run as float32 islands: bf16 → float32 is exact, so
# a permutation (DiT's unpatchify einsum) and the top-k choice of tokens are the same.
_FLOAT32_UNDER_BF16 = frozenset({torch.ops.aten.einsum.default, torch.ops.aten.topk.default})


class _ReducedPrecisionInterpreter(torch.fx.Interpreter):
    """Executes a graph, casting float32 operands down wherever an op mixes them with ``dtype``
    (and running the ops of ``_FLOAT32_UNDER_BF16`` in float32 under bfloat16)."""

    def __init__(self, gm: GraphModule, dtype: torch.dtype) -> None:
        super().__init__(gm)
        self.dtype = dtype
        self.casts = 0  # how many operands were cast (for tests: did the fix fire?)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        tree_map, leaves = torch.utils._pytree.tree_map, torch.utils._pytree.tree_leaves
        if self.dtype == torch.bfloat16 and target in _FLOAT32_UNDER_BF16:
            args, kwargs = tree_map(lambda v: self._cast(v, torch.bfloat16, torch.float32), (args, kwargs))
            out = super().call_function(target, args, kwargs)
            return tree_map(lambda v: self._cast(v, torch.float32, torch.bfloat16), out)
        dtypes = {t.dtype for t in leaves((args, kwargs)) if isinstance(t, Tensor) and t.is_floating_point()}
        if self.dtype in dtypes and torch.float32 in dtypes:
            args, kwargs = tree_map(lambda v: self._cast(v, torch.float32, self.dtype), (args, kwargs))
        return super().call_function(target, args, kwargs)

    def _cast(self, value: Any, source: torch.dtype, target: torch.dtype) -> Any:
        if isinstance(value, Tensor) and value.dtype == source:
            self.casts += 1
            return value.to(target)
        return value


def reduced_precision_module(gm: GraphModule, dtype: torch.dtype, outputs: Sequence[TensorSpec]) -> Any:
    return CastedStep(gm, dtype, [s.torch_dtype for s in outputs])


def share_initializers(directory: Path, names: Sequence[str], data_name: str, *, min_bytes: int = 1024) -> dict[str, Any]:
    """Move the weights of several ONNX files in ``directory`` into one external-data file.

    Step graphs of one schedule hold mostly the same weights (a cached step's gates are the full
    step's, a partial step's MLP too); exported one by one, each file carries its own copy. Here
    every initializer of ``min_bytes`` or more is stored once in ``data_name``, keyed by dtype,
    shape and content (the exporter names the same weight differently per graph), and each file
    references it by offset, as ONNX external data does (tensors from 64 KiB at 4 KiB-aligned
    offsets, for memory mapping; smaller ones 64-byte aligned). Side files ``<name>.data`` the
    exporter wrote are removed. ONNX Runtime and TensorRT's parser resolve the data file next to
    the model. Returns what was stored.
    """
    import hashlib

    import onnx

    directory = Path(directory)
    stored: dict[tuple[int, tuple[int, ...], str], tuple[int, int]] = {}
    referenced = 0
    models = []
    with open(directory / data_name, "wb") as data:
        for name in names:
            model = onnx.load(str(directory / name), load_external_data=True)
            for tensor in _initializers(model.graph):
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes:
                    continue  # small, or stored in typed fields: stays inside the file
                raw = tensor.raw_data
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
                if key not in stored:
                    data.write(b"\0" * (-data.tell() % (4096 if len(raw) >= 1 << 16 else 64)))
                    stored[key] = (data.tell(), len(raw))
                    data.write(raw)
                offset, length = stored[key]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    tensor.external_data.add(key=k, value=v)
                referenced += length
            models.append((name, model))
    for name, model in models:
        (directory / name).write_bytes(model.SerializeToString())
        side = directory / f"{name}.data"
        if side.exists():
            side.unlink()
        onnx.checker.check_model(str(directory / name))  # also checks every external reference
    return {"file": data_name, "tensors": len(stored), "bytes": sum(n for _, n in stored.values()), "referenced_bytes": referenced}


def _initializers(graph: Any) -> Any:
    """A graph's initializers and those of its subgraphs (If/Loop bodies)."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _initializers(g)
