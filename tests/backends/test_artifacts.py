"""aoti and onnxruntime: compile, export → load (here and in a fresh process), broken artifacts.

Each real export happens once per session (fixtures below); the broken-artifact tests work
on copies of the exported directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cachecompile.backends import ArtifactError, get_backend

FORMATS = ["aoti", "onnxruntime"]


@pytest.fixture(scope="session")
def exported(tmp_path_factory, dit_step, dit_onnx_dir):
    """format → directory holding the dit step's artifact, entry.json, inputs and expected outputs."""
    directory = tmp_path_factory.mktemp("export-aoti")
    entry = get_backend("aoti").export(
        dit_step.gm, dit_step.inputs, directory, "step0",
        input_names=dit_step.input_names, output_names=dit_step.output_names,
    )
    (directory / "entry.json").write_text(json.dumps(entry, indent=1))
    torch.save({"inputs": dit_step.inputs, "expected": dit_step.expected}, directory / "io.pt")
    return {"aoti": directory, "onnxruntime": dit_onnx_dir}


def _entry(directory: Path) -> dict:
    return json.loads((directory / "entry.json").read_text())


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "artifact"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_files_and_a_json_entry(exported, fmt):
    entry = _entry(exported[fmt])
    assert entry["backend"] == fmt
    assert [i["name"] for i in entry["inputs"]] == ["hidden_states", "timestep", "class_labels", "cache.block0"]
    assert [o["name"] for o in entry["outputs"]] == ["sample", "cache_write.block0"]
    assert entry["versions"]["torch"] == torch.__version__
    for name in entry["sha256"]:
        assert (exported[fmt] / name).is_file()


@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_artifact_matches_eager_on_several_steps(exported, dit_step, close, fmt):
    step = get_backend(fmt).load(exported[fmt], _entry(exported[fmt]))
    close(step(*dit_step.inputs), dit_step.expected)
    for seed in (1, 2):  # two more "steps" with fresh latents and cache
        inputs = dit_step.other_inputs(seed)
        close(step(*inputs), dit_step.reference(inputs))


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from cachecompile.backends import get_backend

    directory = Path(sys.argv[1])
    entry = json.loads((directory / "entry.json").read_text())
    io = torch.load(directory / "io.pt")
    out = get_backend(entry["backend"]).load(directory, entry)(*io["inputs"])
    for a, e in zip(out, io["expected"], strict=True):
        diff = (a - e).abs().max().item()
        assert diff <= 1e-4 * max(e.abs().max().item(), 1e-6), diff
    assert not any(m == "diffusers" or m.startswith("diffusers.") for m in sys.modules), "diffusers was imported"
    print("FRESH-PROCESS-OK", len(out))
    """
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_artifact_loads_in_a_fresh_process_without_diffusers(exported, subprocess_env, repo_root, fmt):
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(exported[fmt])],
        cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FRESH-PROCESS-OK 2" in proc.stdout


def test_aoti_external_weights_are_given_at_load(partial_step, tmp_path, close):
    """weights='external': one weights file for all step graphs instead of one copy per package."""
    backend = get_backend("aoti")
    entry = backend.export(partial_step.gm, partial_step.inputs, tmp_path, "step0", weights="external")
    from cachecompile.backends.aoti import graph_constants

    state = graph_constants(partial_step.gm)
    assert sorted(c["name"] for c in entry["constants"]) == sorted(state)
    step = backend.load(tmp_path, entry, constants=state)
    close(step(*partial_step.inputs), partial_step.expected)
    with pytest.raises(ArtifactError, match="pass constants="):
        backend.load(tmp_path, entry)
    with pytest.raises(ArtifactError, match="'mlp.0.weight' needed by step0.pt2 is missing"):
        backend.load(tmp_path, entry, constants={k: v for k, v in state.items() if k != "mlp.0.weight"})
    with pytest.raises(ArtifactError, match="does not match"):
        backend.load(tmp_path, entry, constants={**state, "mlp.0.weight": state["mlp.0.weight"].t()})


def test_onnxruntime_compile_runs_in_memory(partial_step, close):
    step = get_backend("onnxruntime").compile(partial_step.gm, partial_step.inputs, intra_op_num_threads=1)
    close(step(*partial_step.inputs), partial_step.expected)
    inputs = partial_step.other_inputs(3)
    close(step(*inputs), partial_step.reference(inputs))


# --------------------------------------------------------------------------------------
# Broken or mismatched artifacts fail at load, with the fix in the message


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_file_fails_at_load(exported, tmp_path, fmt):
    directory = _copy(exported[fmt], tmp_path)
    entry = _entry(directory)
    (directory / next(iter(entry["files"].values()))).unlink()
    with pytest.raises(ArtifactError, match="missing; re-export"):
        get_backend(fmt).load(directory, entry)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_file_fails_at_load(exported, tmp_path, fmt):
    directory = _copy(exported[fmt], tmp_path)
    entry = _entry(directory)
    path = directory / next(iter(entry["files"].values()))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="corrupt"):
        get_backend(fmt).load(directory, entry)
    # Without the checksum the native loader itself must fail, and still as an ArtifactError.
    with pytest.raises(ArtifactError, match="cannot load"):
        get_backend(fmt).load(directory, entry, verify=False)


def test_aoti_package_from_another_torch_version_is_refused(exported):
    entry = _entry(exported["aoti"])
    entry["versions"]["torch"] = "2.0.0"
    with pytest.raises(ArtifactError, match=r"built with torch 2\.0\.0.*install torch==2\.0\.0 or re-export"):
        get_backend("aoti").load(exported["aoti"], entry)


def test_entry_of_another_backend_is_refused(exported):
    with pytest.raises(ArtifactError, match="get_backend\\('onnxruntime'\\)"):
        get_backend("aoti").load(exported["onnxruntime"], _entry(exported["onnxruntime"]))


def test_onnx_file_swapped_for_another_model_is_refused(exported, partial_step, tmp_path):
    other = tmp_path / "other"
    other_entry = get_backend("onnxruntime").export(partial_step.gm, partial_step.inputs, other, "step0")
    directory = _copy(exported["onnxruntime"], tmp_path)
    entry = _entry(directory)
    shutil.copy(other / "step0.onnx", directory / "step0.onnx")
    entry["sha256"]["step0.onnx"] = other_entry["sha256"]["step0.onnx"]
    with pytest.raises(ArtifactError, match="do not match its manifest entry"):
        get_backend("onnxruntime").load(directory, entry)


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_input_shape_fails_before_the_native_runtime(exported, dit_step, fmt):
    step = get_backend(fmt).load(exported[fmt], _entry(exported[fmt]))
    inputs = list(dit_step.inputs)
    inputs[0] = torch.randn(4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"hidden_states: float32\[2, 4, 8, 8\].*got float32\[4, 4, 8, 8\]"):
        step(*inputs)
    inputs = list(dit_step.inputs)
    inputs[1] = inputs[1].to(torch.int32)
    with pytest.raises(ValueError, match="timestep: int64"):
        step(*inputs)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_unavailable_onnxruntime_provider_is_refused(exported):
    with pytest.raises(ArtifactError, match="TensorrtExecutionProvider is not available|cannot load"):
        get_backend("onnxruntime").load(
            exported["onnxruntime"], _entry(exported["onnxruntime"]),
            providers=["TensorrtExecutionProvider", "CPUExecutionProvider"],
        )
