"""TensorRT: the parts that need no GPU (operator check, profiles, precision, ONNX forms).

Building and running engines is in test_trt_gpu.py, which skips without TensorRT.
"""

from __future__ import annotations

import collections
import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from cachecompile.backends._common import TensorSpec, graph_signature
from cachecompile.backends.onnx_export import export_onnx, reduced_precision_module
from cachecompile.backends.trt import BuildSettings, profile_shapes, resolve_typing
from cachecompile.backends.trt_ops import (
    TOPK_MAX_K,
    TensorRTUnsupportedError,
    assert_tensorrt_compatible,
    check_onnx_for_tensorrt,
)

# --------------------------------------------------------------------------------------
# The operator check on the ONNX we really emit


def test_dit_step_onnx_is_tensorrt_compatible(dit_onnx_dir):
    path = dit_onnx_dir / json.loads((dit_onnx_dir / "entry.json").read_text())["files"]["onnx"]
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # The decomposed attention and adaLN of the DiT block, and the step's opset.
    assert {"MatMul", "Softmax", "LayerNormalization", "Gemm", "Conv"} <= set(ops)
    assert [o.version for o in model.opset_import if o.domain == ""] == [20]
    assert check_onnx_for_tensorrt(model) == []
    assert_tensorrt_compatible(path)


@pytest.fixture(scope="module")
def partial_onnx(tmp_path_factory, partial_step):
    inputs, outputs = graph_signature(partial_step.gm, partial_step.inputs, partial_step.input_names, partial_step.output_names)
    path = tmp_path_factory.mktemp("partial") / "partial.onnx"
    return export_onnx(partial_step.gm, partial_step.inputs, path, inputs, outputs)


def test_partial_recompute_onnx_with_topk_gather_scatter_is_compatible(partial_onnx):
    model = onnx.load(str(partial_onnx.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "GatherElements", "ScatterElements", "Gather"} <= ops
    assert check_onnx_for_tensorrt(model) == []


# --------------------------------------------------------------------------------------
# The operator check on small hand-built models, one constraint each


def _model(nodes, inputs, outputs, initializers=(), opset=20, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))


def _vi(name, elem=TensorProto.FLOAT, shape=(2, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _topk_model(k_source: str, k: int = 4, sorted_: int = 1):
    nodes, inits, inputs = [], [], [_vi("x")]
    if k_source == "initializer":
        inits.append(helper.make_tensor("k", TensorProto.INT64, [1], [k]))
    elif k_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64, [1], [k])))
    else:
        inputs.append(_vi("k", TensorProto.INT64, (1,)))
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1, sorted=sorted_))
    return _model(nodes, inputs, [_vi("v", shape=(2, k)), _vi("i", TensorProto.INT64, (2, k))], inits)


@pytest.mark.parametrize("source", ["initializer", "constant"])
def test_topk_with_constant_k_passes(source):
    assert check_onnx_for_tensorrt(_topk_model(source)) == []


def test_topk_k_must_be_a_build_time_constant():
    (issue,) = check_onnx_for_tensorrt(_topk_model("input"))
    assert issue.op_type == "TopK" and "`K` must be a build-time constant" in issue.problem


def test_topk_k_above_the_limit_is_rejected():
    assert check_onnx_for_tensorrt(_topk_model("initializer", k=TOPK_MAX_K)) == []
    (issue,) = check_onnx_for_tensorrt(_topk_model("initializer", k=TOPK_MAX_K + 1))
    assert f"exceeds TensorRT's TopK limit of {TOPK_MAX_K}" in issue.problem
    with pytest.raises(TensorRTUnsupportedError, match="TopK node 'topk'"):
        assert_tensorrt_compatible(_topk_model("initializer", k=5000))


def test_topk_must_be_sorted():
    (issue,) = check_onnx_for_tensorrt(_topk_model("initializer", sorted_=0))
    assert "`sorted` must be 1" in issue.problem


def _single(op, inputs, outputs, elem=TensorProto.FLOAT, domain="", opset=20, **attrs):
    node = helper.make_node(op, [i for i, _ in inputs], outputs, name="n", domain=domain, **attrs)
    graph_inputs = [_vi(name, e) for name, e in inputs]
    model = _model([node], graph_inputs, [_vi(o, elem) for o in outputs], opset=opset)
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def test_unsupported_unknown_and_custom_operators_are_errors():
    (unique,) = check_onnx_for_tensorrt(_single("Unique", [("x", TensorProto.FLOAT)], ["y"]))
    assert "not supported" in unique.problem
    (custom,) = check_onnx_for_tensorrt(_single("FusedThing", [("x", TensorProto.FLOAT)], ["y"], domain="com.example"))
    assert custom.op_type == "com.example::FusedThing" and "plugin" in custom.problem


def test_input_types_are_checked():
    (issue,) = check_onnx_for_tensorrt(_single("Sin", [("x", TensorProto.INT64)], ["y"], TensorProto.INT64))
    assert "input type INT64 not supported" in issue.problem
    (double,) = check_onnx_for_tensorrt(
        _single("Add", [("a", TensorProto.DOUBLE), ("b", TensorProto.DOUBLE)], ["y"], TensorProto.DOUBLE)
    )
    assert double.severity == "warning"
    assert_tensorrt_compatible(_single("Add", [("a", TensorProto.DOUBLE), ("b", TensorProto.DOUBLE)], ["y"], TensorProto.DOUBLE))
    # Where's type column is about X (input 1), not the BOOL condition.
    where = _single("Where", [("c", TensorProto.BOOL), ("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)], ["y"])
    assert check_onnx_for_tensorrt(where) == []


def test_scatter_nd_reduction_and_layer_norm_outputs():
    scatter = _single("ScatterND", [("d", TensorProto.FLOAT), ("i", TensorProto.INT64), ("u", TensorProto.FLOAT)], ["y"], reduction="add")
    assert "reduction 'add' unsupported" in check_onnx_for_tensorrt(scatter)[0].problem
    norm = _single("LayerNormalization", [("x", TensorProto.FLOAT), ("s", TensorProto.FLOAT)], ["y", "mean"])
    assert "only the first output" in check_onnx_for_tensorrt(norm)[0].problem


def test_opset_outside_the_parser_range_is_reported():
    (issue,) = check_onnx_for_tensorrt(_single("Relu", [("x", TensorProto.FLOAT)], ["y"], opset=8))
    assert issue.op_type == "opset"


def test_subgraphs_and_local_functions_are_checked():
    then_branch = helper.make_graph([helper.make_node("Unique", ["x"], ["t"])], "then", [], [_vi("t")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e")])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)
    model = _model([node], [_vi("c", TensorProto.BOOL, ()), _vi("x")], [_vi("y")])
    assert [i.op_type for i in check_onnx_for_tensorrt(model)] == ["Unique"]

    fn = helper.make_function("local", "Block", ["a"], ["b"], [helper.make_node("Det", ["a"], ["b"])], [helper.make_opsetid("", 20)])
    call = helper.make_node("Block", ["x"], ["y"], domain="local")
    model = _model([call], [_vi("x")], [_vi("y")], functions=[fn])
    model.opset_import.append(helper.make_opsetid("local", 1))
    assert [i.op_type for i in check_onnx_for_tensorrt(model)] == ["Det"]


# --------------------------------------------------------------------------------------
# Build settings that need no TensorRT


def test_profile_shapes_static_and_dynamic_batch():
    specs = [TensorSpec("x", (None, 4, 8), "float32"), TensorSpec("t", (2,), "int64")]
    shapes = profile_shapes(specs, batch=(1, 2, 8))
    assert shapes == {"x": ((1, 4, 8), (2, 4, 8), (8, 4, 8)), "t": ((2,), (2,), (2,))}
    with pytest.raises(ValueError, match="pass batch"):
        profile_shapes(specs, batch=None)
    with pytest.raises(ValueError, match="only batch may vary"):
        profile_shapes([TensorSpec("x", (2, None), "float32")], batch=(1, 1, 1))


def test_build_settings_validate_and_typing_resolution():
    with pytest.raises(ValueError, match="precision"):
        BuildSettings(precision="int8")
    with pytest.raises(ValueError, match="batch range"):
        BuildSettings(batch=(4, 2, 8))
    assert resolve_typing(BuildSettings(precision="fp16"), has_weak_flags=True) == "weak"
    assert resolve_typing(BuildSettings(precision="fp16"), has_weak_flags=False) == "strong"
    assert resolve_typing(BuildSettings(precision="bf16", typing="strong"), has_weak_flags=True) == "strong"
    with pytest.raises(Exception, match="typing='strong'"):
        resolve_typing(BuildSettings(precision="fp16", typing="weak"), has_weak_flags=False)


def test_strongly_typed_onnx_keeps_float32_io_and_half_weights(partial_step, tmp_path):
    """typing='strong': the precision lives in the ONNX, the engine's I/O stays float32."""
    inputs, outputs = graph_signature(partial_step.gm, partial_step.inputs, partial_step.input_names, partial_step.output_names)
    module = reduced_precision_module(partial_step.gm, torch.float16, outputs)
    onnx_file = export_onnx(module, partial_step.inputs, tmp_path / "half.onnx", inputs, outputs)
    model = onnx.load(str(onnx_file.path))
    io_types = {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io_types == {TensorProto.FLOAT}
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert check_onnx_for_tensorrt(model) == []
    assert all(p.dtype == torch.float32 for p in partial_step.gm.parameters()), "the step graph was modified"


# --------------------------------------------------------------------------------------
# The engine build and runtime code, run against a simulated ``tensorrt`` module.
#
# TensorRT cannot run here. This stand-in implements the documented Python API surface the
# backend uses (Builder, OnnxParser, IBuilderConfig, optimization profile, timing cache,
# Runtime, ICudaEngine, IExecutionContext with set_tensor_address / execute_async_v3). Its
# "engine" is the ONNX model run by ONNX Runtime directly on the bound addresses, so the test
# checks the backend's calls, binding by data_ptr() and the manifest on CPU tensors. It proves
# nothing about TensorRT itself: test_trt_gpu.py does that on a GPU.


def _fake_tensorrt(weak_flags: bool = True):
    import ctypes
    import types

    import numpy as np
    import onnxruntime

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-simulated"
    trt.calls = []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(**({"FP16": "FP16", "BF16": "BF16"} if weak_flags else {}))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    names = ["FLOAT", "HALF", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL"]
    trt.DataType = types.SimpleNamespace(**{n: n for n in names})
    onnx_to_trt = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.INT64: "INT64",
                   TensorProto.INT32: "INT32", TensorProto.BOOL: "BOOL"}
    trt_to_np = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}

    class Network:
        def __init__(self, flags):
            trt.calls.append(("create_network", flags))
            self.model = None

        @property
        def num_inputs(self):
            return len(self.model.graph.input)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.model.graph.input[i].name)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.model = onnx.load(path)
            return True

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            trt.calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+"

    class Config:
        def set_flag(self, flag):
            trt.calls.append(("set_flag", flag))

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("workspace", size))

        def add_optimization_profile(self, profile):
            trt.calls.append(("add_profile",))

        def create_timing_cache(self, blob):
            trt.calls.append(("timing_cache_in", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            assert ignore_mismatch is False

    class Builder:
        def __init__(self, logger):
            pass

        create_network = staticmethod(Network)
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            return network.model.SerializeToString()  # the simulated "plan" is the ONNX itself

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def get_tensor_shape(self, name):
            return self.engine.shapes[name]

        def _view(self, name, shape):
            dtype = np.dtype(trt_to_np[self.engine.get_tensor_dtype(name)])
            count = int(np.prod(shape)) if shape else 1
            raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
            return np.frombuffer(raw, dtype=dtype).reshape(shape)

        def execute_async_v3(self, stream):
            feeds = {i.name: self._view(i.name, self.shapes[i.name]).copy() for i in self.engine.session.get_inputs()}
            for out, value in zip(self.engine.session.get_outputs(), self.engine.session.run(None, feeds)):
                np.copyto(self._view(out.name, self.engine.shapes[out.name]), value)
            return True

    class Engine:
        def __init__(self, plan):
            model = onnx.load_from_string(plan)
            self.session = onnxruntime.InferenceSession(plan, providers=["CPUExecutionProvider"])
            values = [*model.graph.input, *model.graph.output]
            self.io = [(v.name, "INPUT" if v in model.graph.input else "OUTPUT") for v in values]
            self.dtypes = {v.name: onnx_to_trt[v.type.tensor_type.elem_type] for v in values}
            self.shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in values}
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return dict(self.io)[name]

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(plan)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def simulated_tensorrt(monkeypatch):
    import cachecompile.backends.trt as trt_backend

    fake = _fake_tensorrt()
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", fake)
    from cachecompile.backends import cuda_device

    monkeypatch.setattr(cuda_device, "_cuda_available", lambda: True)
    monkeypatch.setattr(cuda_device, "_gpu", lambda: ("Simulated GPU", [8, 9]))
    monkeypatch.setattr(trt_backend, "_require_cuda", lambda device, where: None)
    monkeypatch.setattr(trt_backend, "_stream_handle", lambda device: 0)
    return fake


def test_engine_build_and_runtime_on_a_simulated_tensorrt(simulated_tensorrt, partial_step, tmp_path, close):
    from cachecompile.backends import ArtifactError, get_backend

    backend = get_backend("tensorrt")
    names = dict(input_names=partial_step.input_names, output_names=partial_step.output_names)
    entry = backend.export(partial_step.gm, partial_step.inputs, tmp_path, "step0", precision="fp16",
                           workspace_bytes=1 << 20, **names)
    calls = simulated_tensorrt.calls
    assert ("create_network", 0) in calls and ("set_flag", "FP16") in calls and ("workspace", 1 << 20) in calls
    assert ("set_shape", "x", (2, 16, 16), (2, 16, 16), (2, 16, 16)) in calls
    assert ("timing_cache_in", b"") in calls and (tmp_path / "timing.cache").read_bytes() == b"+"
    assert entry["files"] == {"onnx": "step0.onnx", "engine": "step0.engine"}
    assert entry["options"]["typing"] == "weak" and entry["device"]["capability"] == [8, 9]

    step = backend.load(tmp_path, json.loads(json.dumps(entry)))
    close(step(*partial_step.inputs), partial_step.expected)
    inputs = partial_step.other_inputs(7)
    close(step(*inputs), partial_step.reference(inputs))

    # A second step graph in the same directory starts from the first one's timing cache.
    backend.export(partial_step.gm, partial_step.inputs, tmp_path, "step1", **names)
    assert ("timing_cache_in", b"+") in calls

    stale = json.loads(json.dumps(entry))
    stale["versions"]["tensorrt"] = "10.0.0"
    with pytest.raises(ArtifactError, match="built with tensorrt 10.0.0"):
        backend.load(tmp_path, stale)
    stale = json.loads(json.dumps(entry))
    stale["device"]["capability"] = [7, 5]
    with pytest.raises(ArtifactError, match="compute capability"):
        backend.load(tmp_path, stale)


def test_strong_typing_on_a_simulated_tensorrt_without_weak_flags(simulated_tensorrt, monkeypatch, partial_step, tmp_path):
    from cachecompile.backends import get_backend

    monkeypatch.setattr(simulated_tensorrt, "BuilderFlag", __import__("types").SimpleNamespace())
    entry = get_backend("tensorrt").export(partial_step.gm, partial_step.inputs, tmp_path, "step0", precision="fp16")
    # STRONGLY_TYPED is bit 1 of the creation flags (EXPLICIT_BATCH, now ignored, is bit 0).
    assert ("create_network", 1 << 1) in simulated_tensorrt.calls
    model = onnx.load(str(tmp_path / "step0.onnx"))
    assert {t.data_type for t in model.graph.initializer if len(t.dims) == 2} == {TensorProto.FLOAT16}
    assert entry["options"]["typing"] == "strong"
