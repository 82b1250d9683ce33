"""Backend registry, shared helpers, and the eager and inductor backends."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from torch._dynamo.utils import counters

from cachecompile.backends import ArtifactError, Backend, BackendCompileError, available_backends, get_backend
from cachecompile.backends._common import TensorSpec, check_call_inputs, check_entry, graph_signature, make_entry

# --------------------------------------------------------------------------------------
# Registry


def test_known_backends_are_listed():
    assert available_backends() == ["eager", "inductor", "aoti", "onnxruntime", "tensorrt"]


@pytest.mark.parametrize("name", ["eager", "inductor", "aoti", "onnxruntime", "onnx"])
def test_get_backend_returns_a_backend(name):
    backend = get_backend(name)
    assert isinstance(backend, Backend)
    assert backend.name in available_backends()


def test_unknown_backend_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown backend 'tvm'.*aoti, eager, inductor, onnxruntime, tensorrt"):
        get_backend("tvm")


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    monkeypatch.delitem(__import__("sys").modules, "onnxruntime", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'cachecompile\[onnx\]'"):
        get_backend("onnxruntime")


def test_tensorrt_backend_needs_its_extra_or_loads():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"cachecompile\[tensorrt\]"):
            get_backend("tensorrt")
    else:
        assert get_backend("tensorrt").name == "tensorrt"


# --------------------------------------------------------------------------------------
# Shared helpers


def test_graph_signature_reads_names_shapes_and_dtypes(dit_step):
    inputs, outputs = graph_signature(dit_step.gm, dit_step.inputs, dit_step.input_names, dit_step.output_names)
    assert [s.describe() for s in inputs] == [
        "hidden_states: float32[2, 4, 8, 8]", "timestep: int64[2]", "class_labels: int64[2]",
        "cache.block0: float32[2, 16, 16]",
    ]
    assert [s.describe() for s in outputs] == ["sample: float32[2, 4, 8, 8]", "cache_write.block0: float32[2, 16, 16]"]


def test_graph_signature_rejects_bad_names_and_inputs(dit_step):
    with pytest.raises(ValueError, match="3 input names given for 4"):
        graph_signature(dit_step.gm, dit_step.inputs, dit_step.input_names[:3])
    with pytest.raises(ValueError, match="not unique"):
        graph_signature(dit_step.gm, dit_step.inputs, ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="example input does not match"):
        graph_signature(dit_step.gm, (*dit_step.inputs[:3], torch.zeros(2, 16, 8)))


def test_check_call_inputs_names_the_mismatch():
    spec = [TensorSpec("x", (2, 4), "float32"), TensorSpec("cache.a", (None, 3), "float32")]
    check_call_inputs((torch.zeros(2, 4), torch.zeros(7, 3)), spec, "step")  # None = any size
    with pytest.raises(ValueError, match=r"cache.a: float32\[\?, 3\].*got float32\[2, 4\].*re-export"):
        check_call_inputs((torch.zeros(2, 4), torch.zeros(2, 4)), spec, "step")
    with pytest.raises(ValueError, match="expected 2 inputs"):
        check_call_inputs((torch.zeros(2, 4),), spec, "step")


def test_entry_round_trips_through_json_and_detects_tampering(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    spec = [TensorSpec("x", (2,), "float32")]
    entry = json.loads(json.dumps(make_entry("aoti", tmp_path, {"package": "a.bin"}, spec, spec, {}, {"k": (1, 2)})))
    assert entry["options"] == {"k": [1, 2]} and entry["versions"]["torch"] == torch.__version__
    assert check_entry(tmp_path, entry, "aoti") == (spec, spec)
    with pytest.raises(ArtifactError, match="for backend 'aoti', not 'onnxruntime'"):
        check_entry(tmp_path, entry, "onnxruntime")
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(ArtifactError, match="corrupt"):
        check_entry(tmp_path, entry, "aoti")
    (tmp_path / "a.bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        check_entry(tmp_path, entry, "aoti")


# --------------------------------------------------------------------------------------
# eager


def test_eager_returns_the_graph_module_and_has_no_artifacts(dit_step, tmp_path):
    backend = get_backend("eager")
    assert backend.compile(dit_step.gm, dit_step.inputs) is dit_step.gm
    with pytest.raises(NotImplementedError, match="format='aoti'"):
        backend.export(dit_step.gm, dit_step.inputs, tmp_path, "step0")


# --------------------------------------------------------------------------------------
# inductor: one real compile per graph for the whole suite


@pytest.fixture(scope="session")
def inductor_steps(dit_step, partial_step):
    """Both graphs compiled once; counters measured around the compiles only."""
    before = _dynamo_counts()
    steps = [get_backend("inductor").compile(case.gm, case.inputs) for case in (dit_step, partial_step)]
    return steps, before, _dynamo_counts()


def _dynamo_counts() -> dict[str, int]:
    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def test_inductor_compiles_each_graph_once_without_graph_breaks(inductor_steps):
    _, before, after = inductor_steps
    assert after["unique_graphs"] - before["unique_graphs"] == 2
    assert after["graph_breaks"] == before["graph_breaks"]


def test_inductor_matches_eager_over_two_generations_without_recompiles(inductor_steps, dit_step, partial_step, close):
    steps, _, after = inductor_steps
    for generation in range(2):
        for step, case in zip(steps, (dit_step, partial_step)):
            inputs = case.other_inputs(seed=10 + generation)
            out = step(*inputs)
            close(out, case.reference(inputs))
    assert _dynamo_counts() == after  # no new graph: no recompile


def test_inductor_runs_under_grad_mode_without_recompiling(inductor_steps, partial_step):
    steps, _, after = inductor_steps
    with torch.enable_grad():
        out = steps[1](*partial_step.inputs)
    assert not any(o.requires_grad for o in out)
    assert _dynamo_counts() == after


def test_inductor_refuses_to_recompile_for_a_new_shape(inductor_steps):
    steps, _, after = inductor_steps
    with pytest.raises(BackendCompileError, match=r"x: float32\[2, 16, 16\].*got float32\[3, 16, 16\].*static shapes"):
        steps[1](torch.randn(3, 16, 16), torch.randn(3, 16, 16))
    assert _dynamo_counts() == after


def test_inductor_explains_an_inference_mode_recompile(inductor_steps, partial_step):
    steps, _, after = inductor_steps
    with torch.inference_mode():
        inputs = [t.clone() for t in partial_step.inputs]
    with pytest.raises(BackendCompileError, match="inference-mode.*torch.no_grad\(\).*warmup=False"):
        steps[1](*inputs)
    assert _dynamo_counts() == after


def test_inductor_rejects_unknown_options(dit_step):
    with pytest.raises(TypeError, match="unknown options"):
        get_backend("inductor").compile(dit_step.gm, dit_step.inputs, fullgraph=False)
    with pytest.raises(ValueError, match="mode"):
        get_backend("inductor").compile(dit_step.gm, dit_step.inputs, mode="fast")
