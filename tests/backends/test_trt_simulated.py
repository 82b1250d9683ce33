"""The TensorRT backend's build and runtime code against a simulated ``tensorrt`` module.

The simulation (simulated_tensorrt.py) refuses what the real API refuses: unaligned addresses,
shapes outside the optimization profile, precision flags on strongly typed networks, timing
caches from another GPU, plans from another version. Each test below names the defect of the
TensorRT review it guards (issue 19, defects 1–11).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from cachecompile.backends import ArtifactError, BackendCompileError, get_backend
from tests.backends import simulated_tensorrt

import cachecompile.backends.trt as trt_backend


@pytest.fixture
def sim(monkeypatch):
    return simulated_tensorrt.install(monkeypatch)


@pytest.fixture
def sim11(monkeypatch):
    return simulated_tensorrt.install(monkeypatch, version="11.4.0.106")


def _names(case):
    return dict(input_names=case.input_names, output_names=case.output_names)


def _export(case, directory, stem="step0", **settings):
    return get_backend("tensorrt").export(case.gm, case.inputs, directory, stem, **_names(case), **settings)


def _load(directory, entry, **kw):
    return get_backend("tensorrt").load(directory, json.loads(json.dumps(entry)), **kw)


def _unaligned_copy(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A contiguous tensor equal to ``t`` whose address is ``offset_bytes`` past a 256-byte boundary."""
    nbytes = t.numel() * t.element_size()
    raw = trt_backend.aligned_empty((nbytes + 512,), torch.uint8, t.device)
    view = raw[offset_bytes:offset_bytes + nbytes].view(t.dtype).view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 256 == offset_bytes
    return view


# --------------------------------------------------------------------------------------
# The build: flags, profile, TF32, typing, timing cache, logger


def test_build_load_run_fp16_weak(sim, partial_step, tmp_path, close):
    entry = _export(partial_step, tmp_path, precision="fp16", workspace_bytes=1 << 20)
    calls = sim.calls
    assert ("create_network", 0) in calls and ("set_flag", "FP16") in calls and ("workspace", 1 << 20) in calls
    assert ("set_shape", "x", (2, 16, 16), (2, 16, 16), (2, 16, 16)) in calls
    assert entry["files"] == {"onnx": "step0.onnx", "engine": "step0.engine"}
    assert entry["options"]["typing"] == "weak" and entry["device"]["capability"] == [8, 9]
    step = _load(tmp_path, entry)
    close(step(*partial_step.inputs), partial_step.expected)
    inputs = partial_step.other_inputs(7)
    close(step(*inputs), partial_step.reference(inputs))


def test_fp32_engines_are_built_without_tf32(sim, partial_step, tmp_path):
    """Defect 7: BuilderFlag.TF32 is on by default, so a "fp32" engine computed in TF32."""
    entry = _export(partial_step, tmp_path, "fp32")
    assert ("clear_flag", "TF32") in sim.calls
    engine = sim.Runtime(trt_backend._logger()).deserialize_cuda_engine((tmp_path / "fp32.engine").read_bytes())
    assert "TF32" not in engine.header["flags"] and entry["options"]["tf32"] is False
    _export(partial_step, tmp_path, "tf32", tf32=True)
    engine = sim.Runtime(trt_backend._logger()).deserialize_cuda_engine((tmp_path / "tf32.engine").read_bytes())
    assert "TF32" in engine.header["flags"]


def test_tensorrt_11_builds_strongly_typed_fp16(sim11, partial_step, tmp_path, close):
    """TensorRT 11 has no BuilderFlag.FP16: "auto" typing builds a strongly typed network."""
    entry = _export(partial_step, tmp_path, precision="fp16")
    assert ("create_network", 1 << 1) in sim11.calls and not any(c[0] == "set_flag" for c in sim11.calls)
    assert entry["options"]["typing"] == "strong"
    step = _load(tmp_path, entry)
    close(step(*partial_step.inputs), partial_step.expected, rel=2e-2)  # float16 inside, float32 I/O
    with pytest.raises(BackendCompileError, match="typing='strong'"):
        _export(partial_step, tmp_path, "weak", precision="fp16", typing="weak")


def test_strongly_typed_network_refuses_precision_flags(sim, partial_step, tmp_path):
    """The simulated builder honours its config: FP16 on a strongly typed network is an error."""
    config = sim.Builder(sim.Logger()).create_builder_config()
    network = sim.Builder(sim.Logger()).create_network(1 << 1)
    network.model = __import__("onnx").helper.make_model(__import__("onnx").helper.make_graph([], "g", [], []))
    config.set_flag(sim.BuilderFlag.FP16)
    assert sim.Builder(sim.Logger()).build_serialized_network(network, config) is None
    assert "not allowed on a strongly typed network" in sim.log[-1][1]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_dit_strong_typing_builds_a_type_valid_network(sim11, dit_step, tmp_path, precision):
    """Defect 1: the DiT's float32 timestep embedding met fp16/bf16 weights in one Gemm."""
    entry = _export(dit_step, tmp_path, precision=precision)
    assert entry["options"]["typing"] == "strong"
    assert entry["options"]["opset_version"] == (22 if precision == "bf16" else 20)
    assert (tmp_path / "step0.engine").stat().st_size > 0


def test_bf16_strong_typing_refuses_an_opset_without_bf16_conv(sim11, dit_step, tmp_path):
    with pytest.raises(ValueError, match="opset >= 22"):
        _export(dit_step, tmp_path, precision="bf16", opset_version=20)


def test_invalid_optimization_profile_is_an_error(sim, partial_step, tmp_path, monkeypatch):
    """Defect 6: add_optimization_profile returns -1 on an invalid profile."""
    config_class = type(sim.Builder(sim.Logger()).create_builder_config())
    monkeypatch.setattr(config_class, "add_optimization_profile", lambda self, profile: -1)
    with pytest.raises(BackendCompileError, match="optimization profile"):
        _export(partial_step, tmp_path)


def test_failed_build_is_an_error(sim, partial_step, tmp_path, monkeypatch):
    builder = type(sim.Builder(sim.Logger()))
    monkeypatch.setattr(builder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(BackendCompileError, match="engine build failed"):
        _export(partial_step, tmp_path)


def test_timing_cache_is_shared_by_the_step_graphs_of_a_directory(sim, partial_step, tmp_path):
    _export(partial_step, tmp_path, "step0")
    _export(partial_step, tmp_path, "step1")
    builds = [c[1] for c in sim.calls if c[0] == "build"]
    assert builds[0]["timing_cache_hits"] == 0 and builds[1]["timing_cache_hits"] > 0


def test_compile_shares_one_timing_cache_per_process(sim, partial_step, monkeypatch, tmp_path):
    """Defect 6: compile() built each step graph in a fresh directory, so no timing was reused."""
    monkeypatch.setattr(trt_backend, "_TIMING_DIR", tmp_path / "timing")
    (tmp_path / "timing").mkdir()
    backend = get_backend("tensorrt")
    backend.compile(partial_step.gm, partial_step.inputs, **_names(partial_step))
    backend.compile(partial_step.gm, partial_step.inputs, **_names(partial_step))
    builds = [c[1] for c in sim.calls if c[0] == "build"]
    assert builds[0]["timing_cache_hits"] == 0 and builds[1]["timing_cache_hits"] > 0
    assert (tmp_path / "timing" / "timing.cache").stat().st_size > 0


def test_timing_cache_from_another_gpu_is_replaced_not_rewritten(sim, partial_step, tmp_path):
    """Defect 6: set_timing_cache returns False on a mismatch; the stale cache was written back."""
    other = simulated_tensorrt.make_tensorrt(gpu="Another GPU")
    stale = other.Builder(other.Logger()).create_builder_config().create_timing_cache(b"")
    stale.entries.add("Conv:3")
    (tmp_path / "timing.cache").write_bytes(stale.serialize())
    with pytest.warns(UserWarning, match="from another GPU or TensorRT version"):
        _export(partial_step, tmp_path)
    written = json.loads((tmp_path / "timing.cache").read_bytes()[len(simulated_tensorrt.CACHE_MAGIC):])
    assert written["key"][1] == "Simulated GPU" and "Conv:3" not in written["entries"] and written["entries"]


def test_corrupt_timing_cache_is_replaced(sim, partial_step, tmp_path):
    """Defect 6: create_timing_cache returns None for bytes it cannot read."""
    (tmp_path / "timing.cache").write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="unreadable"):
        _export(partial_step, tmp_path)
    assert (tmp_path / "timing.cache").read_bytes().startswith(simulated_tensorrt.CACHE_MAGIC)


def test_one_logger_for_every_builder_and_runtime(sim, partial_step, tmp_path):
    """Defect 8: TensorRT keeps one logger pointer and warns on every other one."""
    entries = [_export(partial_step, tmp_path, f"step{i}") for i in range(2)]
    for entry in entries:
        _load(tmp_path, entry)
    assert len(sim.loggers) == 1
    assert not [m for s, m in sim.log if "logger" in m]


# --------------------------------------------------------------------------------------
# Versions and devices


@pytest.mark.parametrize("version", ["10.0.1.6", "10.14.1.48", "12.0.0.1"])
def test_unsupported_tensorrt_versions_are_refused(monkeypatch, partial_step, tmp_path, version):
    """Defect 10: the operator table is TensorRT 10.15's; older parsers differ."""
    simulated_tensorrt.install(monkeypatch, version=version)
    with pytest.raises(BackendCompileError, match="tensorrt>=10.15,<12"):
        _export(partial_step, tmp_path)


def test_engine_from_another_tensorrt_or_gpu_is_refused(sim, partial_step, tmp_path):
    entry = _export(partial_step, tmp_path)
    stale = json.loads(json.dumps(entry))
    stale["versions"]["tensorrt"] = "10.16.0.1"
    with pytest.raises(ArtifactError, match="built with tensorrt 10.16.0.1"):
        _load(tmp_path, stale)
    stale = json.loads(json.dumps(entry))
    stale["device"]["capability"] = [7, 5]
    with pytest.raises(ArtifactError, match="compute capability"):
        _load(tmp_path, stale)


def test_hardware_compatible_engines_need_ampere(monkeypatch, partial_step, tmp_path):
    """Defect 9: a hardware-compatible entry skipped every GPU check, but needs sm >= 8.0."""
    sim = simulated_tensorrt.install(monkeypatch)
    entry = _export(partial_step, tmp_path, hardware_compatible=True)
    assert entry["device"]["hardware_compatible"] is True
    _load(tmp_path, entry)  # 8.9: fine
    monkeypatch.setattr(sim, "capability", (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(ArtifactError, match=r"compute capability >= 8.0"):
        _load(tmp_path, entry)
    with pytest.raises(BackendCompileError, match=r"compute capability >= 8.0"):
        _export(partial_step, tmp_path, "other", hardware_compatible=True)


def test_inputs_on_another_device_are_refused_by_name(sim, partial_step, tmp_path):
    """Defect 3: only args[0] was checked; a tensor elsewhere was bound as a device pointer."""
    step = _load(tmp_path, _export(partial_step, tmp_path))
    x, cache = partial_step.inputs
    with pytest.raises(ValueError, match=r"input cache\.mlp is on meta.*runs on cpu"):
        step(x, cache.to("meta"))


def test_device_guard_makes_the_engine_device_current():
    """Defect 3: load and call run under torch.cuda.device(engine device)."""
    guard = trt_backend._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(trt_backend._device_guard(torch.device("cpu")), torch.cuda.device)


# --------------------------------------------------------------------------------------
# Binding: dtypes, alignment, return codes, shapes, streams


def test_float64_graphs_are_refused_at_export(sim, tmp_path):
    """Defect 4: the parser reads DOUBLE as FLOAT, so float64 data was bound as float32."""
    from tests.backends.conftest import flat_step_graph

    gm = flat_step_graph(torch.nn.Linear(4, 4).double(), (torch.randn(2, 4, dtype=torch.float64),))
    with pytest.raises(BackendCompileError, match="float64.*cast the model and its inputs to float32"):
        get_backend("tensorrt").export(gm, (torch.randn(2, 4, dtype=torch.float64),), tmp_path, "step0")


def test_engine_io_types_are_checked_against_the_manifest(sim, partial_step, tmp_path):
    """Defect 4: a manifest saying float64 over a FLOAT engine input is refused at load."""
    entry = _export(partial_step, tmp_path)
    lying = json.loads(json.dumps(entry))
    lying["inputs"][0]["dtype"] = "float64"
    with pytest.raises(ArtifactError, match="engine input x is torch.float32, the manifest says float64"):
        _load(tmp_path, lying, check_inputs=False)


def test_simulated_engine_reads_a_double_input_as_float(sim, tmp_path):
    """Why defect 4 matters: the parser makes a DOUBLE input FLOAT; float64 bytes read as float32 are garbage."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [4])], [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "d.onnx"))
    network = sim.Builder(sim.Logger()).create_network(0)
    assert sim.OnnxParser(network, sim.Logger()).parse_from_file(str(tmp_path / "d.onnx"))
    assert network.get_input(0).dtype == sim.DataType.FLOAT
    config = sim.Builder(sim.Logger()).create_builder_config()
    engine = sim.Runtime(sim.Logger()).deserialize_cuda_engine(sim.Builder(sim.Logger()).build_serialized_network(network, config))
    ctx = engine.create_execution_context()
    x = trt_backend.aligned_empty((4,), torch.float64, torch.device("cpu")).copy_(torch.arange(1.0, 5.0, dtype=torch.float64))
    y = trt_backend.aligned_empty((4,), torch.float64, torch.device("cpu")).zero_()
    assert ctx.set_tensor_address("x", x.data_ptr()) and ctx.set_tensor_address("y", y.data_ptr())
    assert ctx.execute_async_v3(0)
    assert not torch.equal(y, x)


def test_unaligned_contiguous_input_is_copied_to_an_aligned_buffer(sim, partial_step, tmp_path, close):
    """Defect 2: .contiguous() keeps an unaligned view; set_tensor_address refused it, the result was
    ignored and the previous call's address stayed bound."""
    step = _load(tmp_path, _export(partial_step, tmp_path))
    close(step(*partial_step.inputs), partial_step.expected)
    x, cache = partial_step.other_inputs(3)
    unaligned = _unaligned_copy(x, 248)
    close(step(unaligned, cache), partial_step.reference((x, cache)))
    bound = step._context.addresses
    assert all(a % 256 == 0 for a in bound.values()) and bound["x"] != unaligned.data_ptr()


def test_refused_address_is_an_error(sim, partial_step, tmp_path, monkeypatch):
    """Defect 2: the return value of set_tensor_address was ignored."""
    step = _load(tmp_path, _export(partial_step, tmp_path))
    monkeypatch.setattr(type(step._context), "set_tensor_address", lambda self, name, address: False)
    with pytest.raises(RuntimeError, match="TensorRT refused the address of x"):
        step(*partial_step.inputs)


def test_simulated_context_refuses_unaligned_addresses_and_shapes_outside_the_profile(sim, partial_step, tmp_path):
    """Defect 11: the simulation accepted every address and shape."""
    _export(partial_step, tmp_path)
    engine = sim.Runtime(sim.Logger()).deserialize_cuda_engine((tmp_path / "step0.engine").read_bytes())
    ctx = engine.create_execution_context()
    aligned = trt_backend.aligned_empty((2, 16, 16), torch.float32, torch.device("cpu"))
    assert not ctx.set_tensor_address("x", aligned.data_ptr() + 64)
    assert ctx.set_tensor_address("x", aligned.data_ptr())
    assert not ctx.set_tensor_address("no such tensor", aligned.data_ptr())
    assert not ctx.set_input_shape("x", (3, 16, 16)) and not ctx.set_input_shape("x", (2, 16))
    assert ctx.set_input_shape("x", (2, 16, 16)) and ctx.get_tensor_shape("x") == (2, 16, 16)
    assert not ctx.execute_async_v3(0)  # cache.mlp and the outputs have no address yet


class _DynamicBatch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, cache):
        y = self.proj(x) + cache
        return y, y * 2


@pytest.fixture
def dynamic_batch_step():
    """A step graph whose batch dimension is dynamic, as the core captures them."""
    torch.manual_seed(0)
    module = _DynamicBatch().eval()
    args = (torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = torch.export.export(module, args, dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    gm = ep.module()
    gm._forward_pre_hooks.clear()
    gm.graph._codegen = torch.fx.graph.CodeGen()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "_guards" in str(node.target):
            gm.graph.erase_node(node)
    gm.recompile()
    return gm, args, module


def test_dynamic_batch_profile_and_output_shapes(sim, dynamic_batch_step, tmp_path, close):
    """Defect 11: get_tensor_shape ignored the set shape, so the batch path was never tested."""
    gm, args, module = dynamic_batch_step
    backend = get_backend("tensorrt")
    entry = backend.export(gm, args, tmp_path, "step0", input_names=["x", "cache.a"], output_names=["y", "cache_write.a"], batch=(1, 2, 4))
    assert entry["inputs"][0]["shape"] == [None, 4, 8]
    step = _load(tmp_path, entry)
    for b in (1, 3, 4):
        inputs = (torch.randn(b, 4, 8), torch.randn(b, 4, 8))
        with torch.no_grad():
            close(step(*inputs), tuple(module(*inputs)))
    with pytest.raises(ValueError, match="outside the engine's optimization profile"):
        step(torch.randn(5, 4, 8), torch.randn(5, 4, 8))


def test_default_stream_work_runs_on_a_side_stream(sim, partial_step, tmp_path):
    """Defect 5: execute_async_v3 on the default stream adds device synchronisation."""
    step = _load(tmp_path, _export(partial_step, tmp_path))
    step(*partial_step.inputs)
    side = sim.streams.created[0].cuda_stream
    assert step._context.streams == [side] and side != 0
    assert sim.streams.log == [("wait", side, 0), ("wait", 0, side)]


def test_user_stream_is_used_as_it_is(sim, partial_step, tmp_path):
    sim.streams.current_stream.cuda_stream = 0x77
    step = _load(tmp_path, _export(partial_step, tmp_path))
    step(*partial_step.inputs)
    assert step._context.streams == [0x77] and not sim.streams.created


# --------------------------------------------------------------------------------------
# torch-tensorrt loader (defect 9)


@pytest.fixture
def torch_tensorrt_artifact(sim, monkeypatch, partial_step, tmp_path):
    """A torch-tensorrt entry whose "program" loads as the eager step graph."""
    import sys
    import types

    from cachecompile.backends._common import graph_signature, make_entry

    fake = types.ModuleType("torch_tensorrt")
    fake.__version__ = "2.13.0"
    fake.load = lambda path: types.SimpleNamespace(module=lambda: partial_step.gm)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    (tmp_path / "step0.trt.ep").write_bytes(b"program")
    inputs, outputs = graph_signature(partial_step.gm, partial_step.inputs, partial_step.input_names, partial_step.output_names)
    entry = make_entry("tensorrt", tmp_path, {"program": "step0.trt.ep"}, inputs, outputs,
                       versions={"tensorrt": sim.__version__, "torch_tensorrt": "2.13.0"}, options={},
                       via="torch_tensorrt", device=trt_backend.device_record())
    return tmp_path, entry


def test_torch_tensorrt_loader_checks_the_tensorrt_version(torch_tensorrt_artifact):
    directory, entry = torch_tensorrt_artifact
    entry["versions"]["tensorrt"] = "10.16.0.1"
    with pytest.raises(ArtifactError, match="built with tensorrt 10.16.0.1"):
        _load(directory, entry)


def test_torch_tensorrt_loader_checks_inputs(torch_tensorrt_artifact, partial_step, close):
    directory, entry = torch_tensorrt_artifact
    step = _load(directory, entry)
    close(tuple(step(*partial_step.inputs)), partial_step.expected)
    with pytest.raises(ValueError, match=r"input x: float32\[2, 16, 16\]"):
        step(torch.randn(3, 16, 16), partial_step.inputs[1])
    unchecked = _load(directory, entry, check_inputs=False)
    assert unchecked is not None and not hasattr(unchecked, "_inputs")


def test_no_warning_on_a_plain_export(sim, partial_step, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _export(partial_step, tmp_path)
