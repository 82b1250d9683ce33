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
    SUPPORTED_TENSORRT,
    TOPK_MAX_K,
    TensorRTUnsupportedError,
    assert_tensorrt_compatible,
    check_onnx_for_tensorrt,
    check_tensorrt_version,
    opset_range,
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
    # A DOUBLE value inside the graph runs as FLOAT: a warning.
    inner = _model(
        [helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE), helper.make_node("Add", ["d", "d"], ["e"], name="add"),
         helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT)],
        [_vi("x")], [_vi("y")],
    )
    issues = check_onnx_for_tensorrt(inner)
    assert {(i.op_type, i.severity) for i in issues} == {("Add", "warning"), ("Cast", "warning")}
    assert_tensorrt_compatible(inner)
    # Where's type column is about X (input 1), not the BOOL condition.
    where = _single("Where", [("c", TensorProto.BOOL), ("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)], ["y"])
    assert check_onnx_for_tensorrt(where) == []


def test_double_graph_io_is_an_error():
    """Defect 4: the parser makes a DOUBLE input FLOAT, so float64 data would be read as float32."""
    model = _single("Add", [("a", TensorProto.DOUBLE), ("b", TensorProto.DOUBLE)], ["y"], TensorProto.DOUBLE)
    errors = [i for i in check_onnx_for_tensorrt(model) if i.severity == "error"]
    assert [(i.node, i.op_type) for i in errors] == [("a", "graph input"), ("b", "graph input"), ("y", "graph output")]
    assert "cast the model and its inputs to float32" in errors[0].problem
    with pytest.raises(TensorRTUnsupportedError, match="DOUBLE"):
        assert_tensorrt_compatible(model)


def test_inputs_sharing_a_type_parameter_must_share_a_type():
    """Defect 1: only input 0 was checked, so a Gemm of float32 A and float16 B passed."""
    gemm = _model(
        [helper.make_node("Gemm", ["a", "b"], ["y"], name="gemm")],
        [_vi("a", TensorProto.FLOAT, (2, 4)), _vi("b", TensorProto.FLOAT16, (4, 3))], [_vi("y", TensorProto.FLOAT, (2, 3))],
    )
    (issue,) = check_onnx_for_tensorrt(gemm)
    assert issue.op_type == "Gemm" and "type parameter T bound to different types (FLOAT, FLOAT16)" in issue.problem
    # Inputs of different type parameters may differ: Where's BOOL condition, Pow's exponent.
    power = _single("Pow", [("x", TensorProto.FLOAT), ("p", TensorProto.INT64)], ["y"])
    assert check_onnx_for_tensorrt(power) == []
    # Every input of the main type parameter is checked against the supported types.
    (concat,) = check_onnx_for_tensorrt(_single("Concat", [("a", TensorProto.FLOAT), ("b", TensorProto.FLOAT)], ["y"], axis=0)) or [None]
    assert concat is None
    mixed = _model(
        [helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=0)],
        [_vi("a"), _vi("b", TensorProto.INT8)], [_vi("y")],
    )
    problems = {i.problem for i in check_onnx_for_tensorrt(mixed)}
    assert any("bound to different types" in p for p in problems)
    assert any("input type INT8 not supported" in p for p in problems)


def test_scatter_nd_reduction_and_layer_norm_outputs():
    scatter = _single("ScatterND", [("d", TensorProto.FLOAT), ("i", TensorProto.INT64), ("u", TensorProto.FLOAT)], ["y"], reduction="add")
    assert "reduction 'add' unsupported" in check_onnx_for_tensorrt(scatter)[0].problem
    norm = _single("LayerNormalization", [("x", TensorProto.FLOAT), ("s", TensorProto.FLOAT)], ["y", "mean"])
    assert "only the first output" in check_onnx_for_tensorrt(norm)[0].problem


def test_opset_outside_the_parser_range_is_reported():
    (issue,) = check_onnx_for_tensorrt(_single("Relu", [("x", TensorProto.FLOAT)], ["y"], opset=8))
    assert issue.op_type == "opset"
    opset25 = _single("Relu", [("x", TensorProto.FLOAT)], ["y"], opset=25)
    assert [i.op_type for i in check_onnx_for_tensorrt(opset25)] == ["opset"]  # 10.15: 9–24
    assert check_onnx_for_tensorrt(opset25, tensorrt_version="11.4.0.106") == []  # 11.x: 9–25


def test_supported_tensorrt_range_is_keyed_on_the_version_string():
    """Defect 10: the table is TensorRT 10.15's while pyproject allowed any 10.x."""
    assert check_tensorrt_version("10.15.1.29") == (10, 15)
    assert check_tensorrt_version("11.4.0.106") == (11, 4)
    assert check_tensorrt_version("10.16.0.1") == (10, 16)
    for old_or_new in ("10.0.1.6", "10.14.1.48", "8.6.1", "12.0.0"):
        with pytest.raises(TensorRTUnsupportedError, match=r"tensorrt>=10.15,<12"):
            check_tensorrt_version(old_or_new)
    assert opset_range("10.15.1.29") == (9, 24) and opset_range("11.0.0.1") == (9, 25)


def test_pyproject_pins_the_supported_tensorrt_range(repo_root):
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lo, hi = SUPPORTED_TENSORRT
    assert f"tensorrt>={lo[0]}.{lo[1]},<{hi[0]}" in extras["tensorrt"]


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
    assert profile_shapes(specs, batch=None, example_batch=2)["x"] == ((1, 4, 8), (2, 4, 8), (8, 4, 8))  # (1, B, 4B)
    assert profile_shapes(specs, batch=(2, 2, 2), example_batch=3)["x"] == ((2, 4, 8),) * 3  # given wins
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




@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_dit_graph_is_type_valid(dit_step, tmp_path, precision):
    """Defect 1: the DiT's timestep embedding hard-codes float32 (arange, _to_copy); cast to fp16/bf16
    the graph had a Gemm of float32 input and half weights, which ONNX Runtime refused to load."""
    import onnxruntime

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    inputs, outputs = graph_signature(dit_step.gm, dit_step.inputs, dit_step.input_names, dit_step.output_names)
    module = reduced_precision_module(dit_step.gm, dtype, outputs)
    with torch.no_grad():
        eager = module(*dit_step.inputs)  # raised "mat1 and mat2 must have the same dtype"
    # half precision inside, float32 outside: close to the float32 graph, not equal to it
    assert [o.dtype for o in eager] == [o.dtype for o in dit_step.expected]
    tolerance = {"fp16": 2e-2, "bf16": 1e-1}[precision]
    for got, want in zip(eager, dit_step.expected):
        assert 0 < (got - want).abs().max() <= tolerance * want.abs().max()

    opset = 22 if precision == "bf16" else 20  # Conv takes bfloat16 from opset 22
    path = export_onnx(module, dit_step.inputs, tmp_path / "half.onnx", inputs, outputs, opset_version=opset, full_check=True).path
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert check_onnx_for_tensorrt(model) == []
    # The sinusoid stays float32 (sin/cos of t near 1000 need its mantissa) and is cast once.
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    sin = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert sin and all(types.get(n.output[0]) == TensorProto.FLOAT for n in sin)
    half = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    weights = {i for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Conv") for i in n.input[1:]}
    assert {t.data_type for t in model.graph.initializer if t.name in weights} == {half}
    if precision == "fp16":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), dit_step.inputs)}
        for got, want in zip(session.run(None, feeds), eager):
            assert abs(got - want.numpy()).max() <= tolerance * abs(want.numpy()).max()
    else:  # ONNX Runtime has no CPU kernel for a bfloat16 Conv: the load passes type checking, then stops there
        with pytest.raises(Exception, match="NOT_IMPLEMENTED.*Conv") as failure:
            onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert "Type Error" not in str(failure.value)


def test_float32_only_graph_is_refused_at_opset_20_for_bf16(dit_step, tmp_path):
    """ONNX Conv before opset 22 has no bfloat16: the export's full check says so instead of the parser."""
    from cachecompile.backends import BackendCompileError

    inputs, outputs = graph_signature(dit_step.gm, dit_step.inputs, dit_step.input_names, dit_step.output_names)
    module = reduced_precision_module(dit_step.gm, torch.bfloat16, outputs)
    with pytest.raises(BackendCompileError, match="not a valid model.*bfloat16"):
        export_onnx(module, dit_step.inputs, tmp_path / "bf16.onnx", inputs, outputs, opset_version=20, full_check=True)


@pytest.fixture(scope="module")
def duca_step_graphs():
    """The step graphs cachecompile makes for DuCa 3/0.3 on a small DiT: full (with v_norm
    records), conservative (top-k partial recompute) and aggressive (stack reuse)."""
    import cachecompile as cc
    from cachecompile.compile.pipeline import example_inputs
    from cachecompile.tools.zoo import load_bench_model
    from cachecompile.sampling import ddim_sample

    bm = load_bench_model("tiny")
    cached = cc.optimize(bm.model, cc.Schedule.duca(3, interval=3, fresh_ratio=0.3))
    ddim_sample(cached, torch.tensor([1, 2]), num_steps=3, null_class=bm.null_class, sample_size=bm.sample_size,
                in_channels=bm.in_channels)
    graphs = list(cached.step_graphs.values())
    return [(gm, tuple(example_inputs(gm, cached.program.example_inputs))) for gm in graphs]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_every_duca_step_graph_casts_to_a_type_valid_onnx(duca_step_graphs, tmp_path, precision):
    """The whole schedule, not one graph: bf16 also meets ops ONNX has no bfloat16 for (the
    unpatchify Einsum, TopK before opset 24), which run as exact float32 islands."""
    import onnxruntime

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert len(duca_step_graphs) == 3
    ops: set[str] = set()
    for i, (gm, inputs) in enumerate(duca_step_graphs):
        specs_in, specs_out = graph_signature(gm, inputs)
        module = reduced_precision_module(gm, dtype, specs_out)
        with torch.no_grad():
            eager = module(*inputs)
        path = export_onnx(module, inputs, tmp_path / f"step{i}.onnx", specs_in, specs_out,
                           opset_version=22 if precision == "bf16" else 20, full_check=True).path
        model = onnx.load(str(path))
        ops |= {n.op_type for n in model.graph.node}
        assert [i for i in check_onnx_for_tensorrt(model) if i.severity == "error"] == []
        if precision == "fp16":
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            feeds = {s.name: t.numpy() for s, t in zip(specs_in, inputs) if s.name in names}
            results = session.run(None, feeds)
            if any(n.op_type == "TopK" for n in model.graph.node):
                continue  # the example cache is zeros: every score ties, and each runtime breaks ties its own way
            for got, want in zip(results, eager):
                scale = max(float(abs(want.float().numpy()).max()), 1e-6)
                assert abs(got.astype("float32") - want.float().numpy()).max() <= 1e-2 * scale
    assert {"TopK", "Einsum"} <= ops
