"""Static check: can TensorRT's ONNX parser take every node of a model we emit?

The table below encodes TensorRT's published ONNX operator support matrix as of TensorRT 10.15
(the onnx-tensorrt ``docs/operators.md`` of that release: opsets 9–24). The supported TensorRT
range is therefore **10.15 ≤ version < 12** (:data:`SUPPORTED_TENSORRT`, checked on
``tensorrt.__version__`` by :func:`check_tensorrt_version`): earlier 10.x parsers differ in ops
we may emit (BlackmanWindow/HammingWindow/HannWindow and tensor ``axes`` of Pad only from 10.4,
Slice ``axes`` from 10.3, STFT from 10.5). TensorRT 11's parser only added operators (Swish, the
``TRT_*`` custom ops) and opset 25, so the same table applies to 11.x with opsets 9–25. For every
node it checks:

1. the operator is in the matrix and marked supported (a custom domain needs a plugin);
2. the element types of its inputs: those of the operator's main type parameter must be ones
   TensorRT supports for it, and inputs that share a type parameter in the ONNX schema (``T`` of
   Gemm's A, B and C, say) must have one element type (ONNX Runtime and TensorRT's parser refuse
   a node "bound to different types");
3. the operator's documented constraints, e.g. TopK: ``K`` a build-time constant (initializer
   or Constant node) no larger than 3840 and ``sorted=1``; Reduce*/Squeeze/Unsqueeze ``axes``
   constant; ScatterND ``reduction="none"``; LayerNormalization only output ``Y``;
4. the graph's inputs and outputs: TensorRT has no float64, and its parser turns a DOUBLE input
   into a FLOAT one, so a float64 tensor bound to it would be read as float32 (an error here).

Subgraphs (If/Loop/Scan bodies) and model-local functions are checked too. This check runs
anywhere (no TensorRT needed), so CI catches an unsupported op before anyone builds an engine.

>>> issues = check_onnx_for_tensorrt("step0.onnx")   # doctest: +SKIP
>>> [str(i) for i in issues if i.severity == "error"]  # doctest: +SKIP
[]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MATRIX_VERSION = "10.15"
OPSET_RANGE = (9, 24)
# TensorRT versions this backend supports: [10.15, 12). See the module docstring.
SUPPORTED_TENSORRT = ((10, 15), (12, 0))
TOPK_MAX_K = 3840


def tensorrt_version_tuple(version: str) -> tuple[int, int]:
    """``"10.15.1.29"`` → ``(10, 15)``; raises ValueError on a string that is not a version."""
    parts = str(version).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) if len(parts) > 1 else 0)
    except (ValueError, IndexError):
        raise ValueError(f"not a TensorRT version: {version!r}") from None


def check_tensorrt_version(version: str) -> tuple[int, int]:
    """Raise unless ``version`` (``tensorrt.__version__``) is in :data:`SUPPORTED_TENSORRT`."""
    lo, hi = SUPPORTED_TENSORRT
    got = tensorrt_version_tuple(version)
    if not lo <= got < hi:
        raise TensorRTUnsupportedError(
            f"tensorrt {version} is not supported: cachecompile's TensorRT backend needs "
            f"{lo[0]}.{lo[1]} <= tensorrt < {hi[0]} (pip install 'tensorrt>={lo[0]}.{lo[1]},<{hi[0]}')"
        )
    return got


def opset_range(tensorrt_version: str | None = None) -> tuple[int, int]:
    """The ONNX opsets the parser of that TensorRT accepts (the table's release when None)."""
    if tensorrt_version is not None and check_tensorrt_version(tensorrt_version)[0] >= 11:
        return (9, 25)
    return OPSET_RANGE

# Element-type groups (names as in onnx.TensorProto.DataType).
_F = ("FLOAT", "FLOAT16", "BFLOAT16")
_FH = ("FLOAT", "FLOAT16")  # no BF16
_I = ("INT32", "INT64")
_B = ("BOOL",)
_FI = _F + _I
_FIB = _F + _I + _B
_ANY = None  # no type constraint worth checking (quantized types, shape producers)


def _ops(names: str, types: tuple[str, ...] | None) -> dict[str, tuple[str, ...] | None]:
    return {name: types for name in names.split()}


# Operator → element types TensorRT supports for its main input.
SUPPORTED: dict[str, tuple[str, ...] | None] = {
    **_ops(
        "Acos Acosh Asin Asinh Atan Atanh Attention AveragePool BatchNormalization Ceil Celu Clip Conv "
        "ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool "
        "GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler "
        "InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM "
        "LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu "
        "QuantizeLinear Reciprocal Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh Scan "
        "Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample",
        _F,
    ),
    **_ops("BlackmanWindow HammingWindow HannWindow DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign", _FH),
    **_ops("STFT", ("FLOAT",)),
    **_ops(
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max "
        "Mean Min Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax "
        "ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements "
        "ScatterND Shrink Sign SpaceToDepth Sub Sum TopK",
        _FI,
    ),
    **_ops("Gelu", _FI + ("INT8",)),
    **_ops(
        "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape "
        "ReverseSequence Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where",
        _FIB,
    ),
    **_ops("Cast CastLike", _FIB + ("UINT8",)),
    **_ops("And Not Or Xor", _B),
    **_ops("TensorScatter", _F + ("INT32",)),
    # Shape accepts any input type; Constant*/Random*/DequantizeLinear have no float input to check.
    **_ops("Shape Constant ConstantOfShape DequantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike", _ANY),
}

# Listed in the matrix as not supported (anything absent from both tables is unknown to it).
UNSUPPORTED = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad "
    "Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger "
    "MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional "
    "OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt "
    "SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap "
    "SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer "
    "Unique".split()
)

# The input whose element type the matrix's "Supported Types" column refers to.
_TYPED_INPUT = {"Where": 1}


@dataclass(frozen=True)
class OpIssue:
    """One problem TensorRT's parser would have with one node."""

    node: str
    op_type: str
    problem: str
    severity: str = "error"  # "error": the parser or builder rejects it; "warning": degraded

    def __str__(self) -> str:
        return f"{self.severity}: {self.op_type} node {self.node!r}: {self.problem}"


class TensorRTUnsupportedError(ValueError):
    """The ONNX model uses operators or forms TensorRT cannot build."""


def check_onnx_for_tensorrt(model: Any, tensorrt_version: str | None = None) -> list[OpIssue]:
    """Every issue TensorRT's ONNX parser would have with ``model`` (a ModelProto or a path).

    ``tensorrt_version`` (``tensorrt.__version__``) selects the accepted opsets; it must be a
    supported version (:func:`check_tensorrt_version`).
    """
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    issues = list(_check_opset(model, opset_range(tensorrt_version)))
    types = _element_types(model)
    issues += list(_check_io_types(model, types))
    functions = {(f.domain, f.name): f for f in model.functions}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET_RANGE[1])
    issues += _check_graph(model.graph, _Scope.of_graph(model.graph), types, functions, opset)
    return issues


def assert_tensorrt_compatible(model: Any, tensorrt_version: str | None = None) -> None:
    """Raise TensorRTUnsupportedError listing every error-level issue (warnings pass)."""
    errors = [i for i in check_onnx_for_tensorrt(model, tensorrt_version) if i.severity == "error"]
    if errors:
        lines = "\n  ".join(str(i) for i in errors)
        release = tensorrt_version or MATRIX_VERSION
        raise TensorRTUnsupportedError(
            f"the ONNX model has {len(errors)} node(s) TensorRT {release} cannot build:\n  {lines}"
        )


def _check_opset(model: Any, accepted: tuple[int, int]) -> Iterator[OpIssue]:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not accepted[0] <= entry.version <= accepted[1]:
            yield OpIssue("<model>", "opset", f"opset {entry.version} outside TensorRT's {accepted[0]}–{accepted[1]}")


def _check_io_types(model: Any, types: dict[str, str]) -> Iterator[OpIssue]:
    """DOUBLE graph I/O: the parser makes it FLOAT, so a float64 buffer would be misread."""
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if types.get(value.name) == "DOUBLE":
                yield OpIssue(
                    value.name, f"graph {kind}",
                    "DOUBLE: TensorRT has no float64 and reads this tensor as float32; cast the model and its inputs to float32",
                )


# ---------------------------------------------------------------------------------------
# Constants and element types


@dataclass
class _Scope:
    """Names whose value is known at build time: initializers and Constant outputs."""

    values: dict[str, Any]

    @classmethod
    def of_graph(cls, graph: Any, parent: _Scope | None = None) -> _Scope:
        from onnx import numpy_helper

        values = dict(parent.values) if parent else {}
        for init in graph.initializer:
            values[init.name] = _lazy_array(init)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        values[node.output[0]] = numpy_helper.to_array(attr.t)
                    elif attr.name in ("value_int", "value_ints"):
                        values[node.output[0]] = attr.i if attr.name == "value_int" else list(attr.ints)
        return cls(values)

    def is_constant(self, name: str) -> bool:
        return name in self.values

    def value(self, name: str) -> Any:
        v = self.values[name]
        return v() if callable(v) else v


def _lazy_array(init: Any) -> Callable[[], Any]:
    """Read an initializer only when a constraint needs its value (weights stay untouched)."""

    def read() -> Any:
        from onnx import numpy_helper

        return numpy_helper.to_array(init)

    return read


def _element_types(model: Any) -> dict[str, str]:
    """Value name → element type name, after ONNX shape inference (best effort)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is an aid here; the checks degrade to "type unknown"
        inferred = model
    graph = inferred.graph
    types = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
    for init in graph.initializer:
        types[init.name] = onnx.TensorProto.DataType.Name(init.data_type)
    return types


# ---------------------------------------------------------------------------------------
# Node checks


def _check_graph(graph: Any, scope: _Scope, types: dict[str, str], functions: dict, opset: int) -> list[OpIssue]:
    issues: list[OpIssue] = []
    for node in graph.node:
        name = node.name or (node.output[0] if node.output else node.op_type)
        if (node.domain, node.op_type) in functions:
            fn = functions[(node.domain, node.op_type)]
            issues += _check_graph(_FunctionGraph(fn), scope, types, functions, opset)
            continue
        if node.domain not in ("", "ai.onnx"):
            issues.append(OpIssue(name, f"{node.domain}::{node.op_type}", "custom-domain operator: needs a TensorRT plugin"))
            continue
        issues += _check_node(node, name, scope, types, opset)
        for attr in node.attribute:  # If/Loop/Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                issues += _check_graph(sub, _Scope.of_graph(sub, scope), types, functions, opset)
    return issues


class _FunctionGraph:
    """A FunctionProto seen as a graph (nodes only) for the walk above."""

    def __init__(self, fn: Any) -> None:
        self.node = fn.node
        self.initializer = ()


def _check_node(node: Any, name: str, scope: _Scope, types: dict[str, str], opset: int) -> list[OpIssue]:
    op = node.op_type
    if op in UNSUPPORTED:
        return [OpIssue(name, op, "not supported by TensorRT's ONNX parser")]
    if op not in SUPPORTED:
        return [OpIssue(name, op, f"not in TensorRT {MATRIX_VERSION}'s ONNX operator matrix")]
    issues = _check_type(node, name, types, opset)
    checker = _CONSTRAINTS.get(op) or (_reduce_axes_constant if op.startswith("Reduce") else None)
    if checker is not None:
        problem = checker(node, scope)
        if problem:
            issues.append(OpIssue(name, op, problem))
    return issues


def _type_params(op_type: str, opset: int, count: int) -> list[str | None]:
    """The schema's type parameter ("T", "T1", …) of each of a node's ``count`` inputs."""
    import onnx

    try:
        formal = onnx.defs.get_schema(op_type, opset, "").inputs
    except Exception:  # not in this onnx's schemas: fall back to "every input on its own"
        return [None] * count
    params: list[str | None] = []
    for i in range(count):
        param = formal[min(i, len(formal) - 1)] if formal else None
        variadic = param is not None and param.option == onnx.defs.OpSchema.FormalParameterOption.Variadic
        if param is None or (i >= len(formal) and not variadic):
            params.append(None)
        elif param.type_str.startswith("tensor(") or (variadic and not param.is_homogeneous):
            params.append(None)  # a fixed type, or a heterogeneous variadic: nothing shared
        else:
            params.append(param.type_str)
    return params


def _check_type(node: Any, name: str, types: dict[str, str], opset: int = OPSET_RANGE[1]) -> list[OpIssue]:
    issues = []
    params = _type_params(node.op_type, opset, len(node.input))
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, (value, param) in enumerate(zip(node.input, params)):
        if value and param is not None and types.get(value) is not None:
            groups.setdefault(param, []).append((i, types[value]))
    for param, members in groups.items():
        bound = sorted({elem for _, elem in members})
        if len(bound) > 1:
            issues.append(OpIssue(name, node.op_type, f"inputs of type parameter {param} bound to different types ({', '.join(bound)})"))
    allowed = SUPPORTED[node.op_type]
    index = _TYPED_INPUT.get(node.op_type, 0)
    if allowed is None or len(node.input) <= index or not node.input[index]:
        return issues
    main = params[index]
    checked = [i for i, _ in groups.get(main, [])] if main is not None else [index]
    for elem in dict.fromkeys(types.get(node.input[i]) for i in checked or [index]):
        if elem is None or elem in allowed:
            continue
        if elem == "DOUBLE":
            issues.append(OpIssue(name, node.op_type, "DOUBLE input: TensorRT casts it down to FLOAT", "warning"))
        else:
            issues.append(OpIssue(name, node.op_type, f"input type {elem} not supported (TensorRT supports {', '.join(allowed)})"))
    return issues


def _attr(node: Any, key: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == key:
            return helper.get_attribute_value(attr)
    return default


def _input_constant(index: int, what: str) -> Callable[[Any, _Scope], str | None]:
    def check(node: Any, scope: _Scope) -> str | None:
        if len(node.input) > index and node.input[index] and not scope.is_constant(node.input[index]):
            return f"`{what}` must be a build-time constant (initializer or Constant node)"
        return None

    return check


def _topk(node: Any, scope: _Scope) -> str | None:
    if _attr(node, "sorted", 1) != 1:
        return "`sorted` must be 1"
    k_name = node.input[1] if len(node.input) > 1 else ""
    if not k_name or not scope.is_constant(k_name):
        return "`K` must be a build-time constant (initializer or Constant node); use a static k per step plan"
    k = int(_scalar(scope.value(k_name)))
    if k > TOPK_MAX_K:
        return f"K = {k} exceeds TensorRT's TopK limit of {TOPK_MAX_K}"
    return None


def _scalar(value: Any) -> Any:
    import numpy as np

    arr = np.asarray(value).reshape(-1)
    return arr[0]


def _reduce_axes_constant(node: Any, scope: _Scope) -> str | None:
    return _input_constant(1, "axes")(node, scope)


def _scatter_nd(node: Any, scope: _Scope) -> str | None:
    reduction = _attr(node, "reduction", b"none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    return None if reduction == "none" else f"reduction {reduction!r} unsupported (only 'none')"


def _layer_norm(node: Any, scope: _Scope) -> str | None:
    return "only the first output `Y` is supported" if any(node.output[1:]) else None


def _max_pool(node: Any, scope: _Scope) -> str | None:
    if len(node.output) > 1 and node.output[1]:
        return "the `Indices` output is unsupported"
    return _pool_rank(node, scope)


def _pool_rank(node: Any, scope: _Scope) -> str | None:
    kernel = _attr(node, "kernel_shape", [])
    return None if len(kernel) in (2, 3) else f"{len(kernel)}D pooling unsupported (2D or 3D only)"


def _dropout(node: Any, scope: _Scope) -> str | None:
    if len(node.input) > 2 and node.input[2]:
        if not scope.is_constant(node.input[2]) or bool(_scalar(scope.value(node.input[2]))):
            return "`training_mode` must be a constant False"
    return None


def _constant(node: Any, scope: _Scope) -> str | None:
    bad = {a.name for a in node.attribute} & {"sparse_value", "value_string", "value_strings"}
    return f"attribute {sorted(bad)[0]} unsupported" if bad else None


_CONSTRAINTS: dict[str, Callable[[Any, _Scope], str | None]] = {
    "TopK": _topk,
    "Squeeze": _input_constant(1, "axes"),
    "Unsqueeze": _input_constant(1, "axes"),
    "CumSum": _input_constant(1, "axis"),
    "OneHot": _input_constant(1, "depth"),
    "ScatterND": _scatter_nd,
    "LayerNormalization": _layer_norm,
    "MaxPool": _max_pool,
    "AveragePool": _pool_rank,
    "Dropout": _dropout,
    "Constant": _constant,
}
