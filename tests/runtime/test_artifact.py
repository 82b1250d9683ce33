"""The deployable artifact: ``cached.export(dir, format)`` → ``cachecompile.load(dir)``.

Every expected value is the eager cached model's own sampling run (float32), computed in this
process before export; the loaded artifact must reproduce it (relative max difference ≤ 1e-4)
over two generations, in this process and in a fresh interpreter that never imports diffusers.

AOTInductor compiles cost ~30–60 s per step graph on these machines: the whole file shares one
AOTI export (FORA, 4 steps, 2 step graphs) and one ONNX export of the same schedule.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

import cachecompile as cc
from cachecompile.sampling import ddim_sample
from cachecompile.backends import ArtifactError
from cachecompile.runtime.cached import CachedTransformer, InputMismatchError
from tests.conftest import NULL_CLASS, dit_inputs
from tests.runtime import artifact_loop

NUM_STEPS = 4
SCHEDULE = cc.Schedule.fora(NUM_STEPS, 2)
LABELS = torch.tensor([1, 7])
SAMPLE = dict(num_steps=NUM_STEPS, guidance_scale=2.0, null_class=NULL_CLASS, sample_size=8, in_channels=4)
LOOP = dict(num_steps=NUM_STEPS, null_class=NULL_CLASS, sample_size=8, in_channels=4)
SEEDS = (0, 1)  # two generations with different noise


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@dataclass
class Exported:
    path: Path
    cached: CachedTransformer  # the eager cached model that was exported
    expected: list[torch.Tensor]  # its ddim_sample runs, one per seed
    loop_expected: Path  # its artifact_loop runs, saved for the fresh process


def _export(dit, tmp_path_factory, fmt: str, schedule: cc.Schedule = SCHEDULE, **options) -> Exported:
    cached = cc.optimize(dit, schedule)
    expected = [ddim_sample(cached, LABELS, seed=s, **SAMPLE) for s in SEEDS]  # the first call captures
    root = tmp_path_factory.mktemp(f"artifact-{fmt}")
    loop = [artifact_loop.sample(cached, LABELS, seed=s, **LOOP) for s in SEEDS]
    torch.save({"expected": loop, "labels": LABELS, "kwargs": LOOP}, root / "expected.pt")
    path = cached.export(root / "dit", fmt, **options)
    return Exported(path, cached, expected, root / "expected.pt")


@pytest.fixture(scope="session")
def aoti_artifact(dit, tmp_path_factory) -> Exported:
    return _export(dit, tmp_path_factory, "aoti")


@pytest.fixture(scope="session")
def onnx_artifact(dit, tmp_path_factory) -> Exported:
    return _export(dit, tmp_path_factory, "onnx")


def _artifact(request, fmt: str) -> Exported:
    return request.getfixturevalue(f"{fmt}_artifact")


def _copy(art: Exported, tmp_path: Path) -> Path:
    return Path(shutil.copytree(art.path, tmp_path / "copy"))


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["aoti", "onnx"])
def test_loaded_artifact_reproduces_the_eager_cached_run(request, dit, fmt):
    art = _artifact(request, fmt)
    uncached = ddim_sample(dit, LABELS, seed=0, **SAMPLE)
    assert rel_diff(art.expected[0], uncached) > 1e-3  # caching changes the result: the check can tell
    loaded = cc.load(art.path)
    assert isinstance(loaded, CachedTransformer) and loaded.model is None
    assert len(loaded.program.runners) == 2 and loaded.program.graph_of_step == [0, 1, 0, 1]
    for seed, expected in zip(SEEDS, art.expected):  # two generations
        got = ddim_sample(loaded, LABELS, seed=seed, **SAMPLE)
        assert rel_diff(got, expected) <= 1e-4, f"{fmt} seed {seed}: {rel_diff(got, expected):.3g}"
    assert loaded.step == 0  # the generation ended with the schedule's last step
    assert loaded.schedule == SCHEDULE and loaded.plans == art.cached.plans
    assert loaded.config.sample_size == 8 and loaded.config["in_channels"] == 4


def test_aoti_artifact_stores_the_weights_once(aoti_artifact):
    """weights='external' by default: the packages hold kernels, weights.pt holds every constant
    of both step graphs once, equal to the model's tensors."""
    from cachecompile.backends.aoti import graph_constants

    files = sorted(p.name for p in aoti_artifact.path.iterdir())
    assert files == ["manifest.json", "step0.pt2", "step1.pt2", "weights.pt"]
    stored = torch.load(aoti_artifact.path / "weights.pt", weights_only=True)
    union = {}
    for gm in aoti_artifact.cached.program.graphs:
        union.update(graph_constants(gm))
    assert set(stored) == set(union)
    assert all(torch.equal(stored[k], union[k]) for k in union)
    m = json.loads((aoti_artifact.path / "manifest.json").read_text())
    assert all(g["entry"]["options"]["weights"] == "external" for g in m["graphs"])


def test_onnx_artifact_stores_the_weights_once(onnx_artifact):
    """The step graphs' ONNX files reference one weights file; a weight both graphs use (the
    gates, the embedders, the output head) is stored once."""
    import onnx

    files = sorted(p.name for p in onnx_artifact.path.iterdir())
    assert files == ["manifest.json", "step0.onnx", "step1.onnx", "weights.onnx.data"]
    m = json.loads((onnx_artifact.path / "manifest.json").read_text())
    shared = m["onnx_weights"]
    data_size = (onnx_artifact.path / "weights.onnx.data").stat().st_size
    referenced = {}
    for g in m["graphs"]:
        assert g["entry"]["files"]["weights"] == "weights.onnx.data" and "weights.onnx.data" in g["entry"]["sha256"]
        model = onnx.load(str(onnx_artifact.path / g["entry"]["files"]["onnx"]), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ref = {e.key: e.value for e in t.external_data}
                assert ref["location"] == "weights.onnx.data" and int(ref["offset"]) + int(ref["length"]) <= data_size
                referenced.setdefault((int(ref["offset"]), int(ref["length"])), []).append(g["entry"]["files"]["onnx"])
            else:
                assert len(t.raw_data) < 1024, f"{t.name} ({len(t.raw_data)} bytes) stayed inside the file"
    assert shared["tensors"] == len(referenced) and shared["bytes"] == sum(n for _, n in referenced)
    assert sum(n for (_, n), users in referenced.items() if len(users) == 2) > 0, "the graphs share weights"
    assert shared["bytes"] <= data_size < shared["bytes"] + 4096 * shared["tensors"]


def test_manifest_describes_the_schedule_and_the_call(onnx_artifact):
    m = json.loads((onnx_artifact.path / "manifest.json").read_text())
    cached = onnx_artifact.cached
    assert m["format"] == "cachecompile.artifact/1" and m["backend"] == "onnxruntime"
    assert cc.Schedule.from_dict(m["schedule"]) == SCHEDULE
    assert m["graph_of_step"] == cached.program.graph_of_step == [0, 1, 0, 1]
    assert [leaf["name"] for leaf in m["leaves"]] == ["hidden_states", "timestep", "class_labels", "return_dict"]
    assert m["leaves"][0]["shape"] == [4, 4, 8, 8] and m["leaves"][3]["value"] is False
    assert m["graphs"][0]["cache_inputs"] == [] and m["graphs"][1]["cache_outputs"] == []
    assert m["graphs"][1]["cache_inputs"] == m["graphs"][0]["cache_outputs"] == sorted(cached.region_map.layout.branch_regions())
    assert set(m["regions"]["regions"]) == set(cached.region_map.regions)
    assert m["versions"]["torch"] == torch.__version__
    names = [i["name"] for i in m["graphs"][1]["entry"]["inputs"]]
    assert names[:3] == ["hidden_states", "timestep", "class_labels"] and names[3] == "cache.blocks.0.attn"


@pytest.mark.parametrize("fmt", ["aoti", "onnx"])
def test_artifact_runs_in_a_fresh_process_without_diffusers(request, subprocess_env, repo_root, fmt):
    art = _artifact(request, fmt)
    script = (
        "import json, sys, torch\n"
        "import cachecompile as cc\n"
        "from tests.runtime import artifact_loop\n"
        "ref = torch.load(sys.argv[2], weights_only=True)\n"
        "loaded = cc.load(sys.argv[1])\n"
        "diffs = []\n"
        "for seed, exp in zip((0, 1), ref['expected']):\n"
        "    got = artifact_loop.sample(loaded, ref['labels'], seed=seed, **ref['kwargs'])\n"
        "    diffs.append(((got - exp).abs().max() / exp.abs().max()).item())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers')\n"
        "print(json.dumps({'diffs': diffs, 'diffusers': bad, 'no_model': loaded.model is None}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(art.path), str(art.loop_expected)],
        cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["diffusers"] == [] and result["no_model"]
    assert len(result["diffs"]) == 2 and max(result["diffs"]) <= 1e-4, result


@pytest.mark.parametrize("method", ["goc", "duca"])
def test_per_step_inputs_replay_from_the_artifact(dit, tmp_path_factory, method):
    """GOC's per-step gradient weights and the step index of DuCa's staleness score are graph
    inputs: the artifact stores their values and the loaded model feeds them without the providers."""
    schedule = {
        "goc": cc.Schedule.fora(6, 3, compensation=cc.GOC(weight=1.0, allow_divergence=True)),
        "duca": cc.Schedule.duca(6, 3, 0.3, "v_norm+0.25*staleness"),
    }[method]
    sample = dict(SAMPLE, num_steps=6)
    cached = cc.optimize(dit, schedule)
    expected = ddim_sample(cached, LABELS, **sample)
    assert rel_diff(expected, ddim_sample(cc.optimize(dit, cc.Schedule.fora(6, 3)), LABELS, **sample)) > 1e-4
    path = cached.export(tmp_path_factory.mktemp(f"artifact-{method}") / "dit", "onnx")
    m = json.loads((path / "manifest.json").read_text())
    assert m["step_inputs"] is not None and (path / "step_inputs.pt").is_file()
    loaded = cc.load(path)
    for seed in SEEDS:
        reference = expected if seed == 0 else ddim_sample(cached, LABELS, seed=seed, **sample)
        assert rel_diff(ddim_sample(loaded, LABELS, seed=seed, **sample), reference) <= 1e-4


def test_from_artifact_and_calls_per_step_override(onnx_artifact):
    loaded = CachedTransformer.from_artifact(onnx_artifact.path, calls_per_step=2)
    assert loaded.calls_per_step == 2
    kw = dict(dit_inputs(batch=4), return_dict=False)
    first = loaded(**kw)[0]
    second = loaded(**kw)[0]  # call 1 of step 0: its own cache, the same full graph
    assert loaded.step == 1 and torch.equal(first, second)
    assert "2 step graphs" in repr(loaded)


# --------------------------------------------------------------------------- outputs


def test_output_type_is_rebuilt_or_stood_in_for(dit):
    """return_dict=True outputs: the type's module is imported when it can be; else a
    namedtuple with the same fields stands in (``out.sample`` and ``out[0]`` still work)."""
    from cachecompile.compile.export import _out_type
    from cachecompile.runtime.artifact import _output_spec

    cached = cc.optimize(dit, SCHEDULE, example_kwargs=dit_inputs(batch=4))
    spec = cached.program.call.out_spec
    m = {"out_spec": pytree.treespec_dumps(spec), "out_type": _out_type(spec), "num_outputs": 1}
    assert _output_spec(m, import_output_type=True) == spec

    gone = dict(m, out_spec=m["out_spec"].replace("diffusers.models.modeling_outputs", "no_such_package.outputs"),
                out_type=dict(m["out_type"], module="no_such_package.outputs"))
    stand_in = _output_spec(gone, import_output_type=True)
    out = pytree.tree_unflatten([torch.ones(1)], stand_in)
    assert type(out).__name__ == "Transformer2DModelOutput" and out.sample is out[0]
    assert _output_spec(gone, import_output_type=False) == stand_in


# --------------------------------------------------------------------------- errors at load


def test_missing_or_invalid_manifest_is_an_artifact_error(onnx_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        cc.load(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="not a cachecompile artifact"):
        cc.load(tmp_path)
    path = _copy(onnx_artifact, tmp_path)
    (path / "manifest.json").write_text("{ truncated")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        cc.load(path)


def test_manifest_of_another_format_version_is_refused(onnx_artifact, tmp_path):
    path = _copy(onnx_artifact, tmp_path)
    _edit_manifest(path, lambda m: m.update(format="cachecompile.artifact/99"))
    with pytest.raises(ArtifactError, match=r"artifact/99.*re-export"):
        cc.load(path)


@pytest.mark.parametrize(
    "fmt,name", [("onnx", "step1.onnx"), ("onnx", "weights.onnx.data"), ("aoti", "step1.pt2"), ("aoti", "weights.pt")]
)
def test_missing_file_fails_at_load(request, tmp_path, fmt, name):
    path = _copy(_artifact(request, fmt), tmp_path)
    (path / name).unlink()
    with pytest.raises(ArtifactError, match=rf"{name}.*missing"):
        cc.load(path)


@pytest.mark.parametrize("fmt,name", [("onnx", "step0.onnx"), ("onnx", "weights.onnx.data"), ("aoti", "weights.pt")])
def test_corrupt_file_fails_at_load(request, tmp_path, fmt, name):
    path = _copy(_artifact(request, fmt), tmp_path)
    cc.load(path)  # intact, it loads; its checksums are then known to this process
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        cc.load(path)


@pytest.mark.parametrize("where", ["artifact", "entry"])
def test_aoti_artifact_from_another_torch_version_is_refused(aoti_artifact, tmp_path, where):
    path = _copy(aoti_artifact, tmp_path)

    def edit(m):
        versions = m["versions"] if where == "artifact" else m["graphs"][1]["entry"]["versions"]
        versions["torch"] = "2.0.0"

    _edit_manifest(path, edit)
    with pytest.raises(ArtifactError, match=r"torch 2\.0\.0.*re-export"):
        cc.load(path)


def test_onnx_artifact_does_not_depend_on_the_torch_version(onnx_artifact, tmp_path):
    path = _copy(onnx_artifact, tmp_path)
    _edit_manifest(path, lambda m: m["versions"].update(torch="2.0.0"))
    assert cc.load(path).backend == "onnxruntime"


def test_graphs_of_another_input_shape_are_refused_at_load(onnx_artifact, tmp_path):
    """A manifest whose call does not match its graphs' inputs (files of another export)."""
    path = _copy(onnx_artifact, tmp_path)
    _edit_manifest(path, lambda m: m["leaves"][0].update(shape=[4, 4, 16, 16]))
    with pytest.raises(ArtifactError, match=r"hidden_states: float32\[\?, 4, 8, 8\].*float32\[\?, 4, 16, 16\].*re-export"):
        cc.load(path)


def test_a_step_that_reads_an_unwritten_slot_is_refused_at_load(onnx_artifact, tmp_path):
    path = _copy(onnx_artifact, tmp_path)
    _edit_manifest(path, lambda m: m.update(graph_of_step=[1, 0, 1, 0]))
    with pytest.raises(ArtifactError, match="step 0 reads cache slot"):
        cc.load(path)


def test_call_with_another_input_shape_fails_before_any_step_runs(onnx_artifact):
    """The batch is the graphs' dynamic dimension; any other size is fixed by the export."""
    loaded = cc.load(onnx_artifact.path)
    bigger = dit_inputs(batch=2)
    bigger["hidden_states"] = torch.randn(2, 4, 16, 16)
    with pytest.raises(InputMismatchError, match=r"hidden_states.*\(2, 4, 16, 16\).*batch, 4, 8, 8"):
        loaded(**bigger, return_dict=False)
    assert loaded.step == 0 and loaded.cache_bytes == 0  # nothing ran, nothing was cached
    out = loaded(**dit_inputs(batch=8), return_dict=False)[0]  # another batch runs
    assert out.shape[0] == 8 and loaded.step == 1


# --------------------------------------------------------------------------- errors at export


def test_export_before_capture_says_what_to_do(dit, tmp_path):
    cached = cc.optimize(dit, SCHEDULE)
    with pytest.raises(RuntimeError, match=r"call it once.*example_kwargs"):
        cached.export(tmp_path / "out", "onnx")
    assert not (tmp_path / "out").exists() and not cached.is_captured


def test_export_refuses_other_formats_and_occupied_directories(onnx_artifact, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'pt2'"):
        onnx_artifact.cached.export(tmp_path / "a", "pt2")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not a cachecompile artifact \(it holds notes.txt\)"):
        onnx_artifact.cached.export(tmp_path / "mine", "onnx", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        onnx_artifact.cached.export(onnx_artifact.path, "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no half-written directory left


def test_overwrite_never_deletes_what_is_not_an_artifact(onnx_artifact, tmp_path):
    """A web app's folder that happens to hold a manifest.json, or an artifact with a user's
    file added, is not replaced: overwrite=True replaces only a directory holding an artifact
    and nothing else."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>")
    (site / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(FileExistsError, match="not a cachecompile artifact"):
        onnx_artifact.cached.export(site, "onnx", overwrite=True)
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "manifest.json"]
    edited = _copy(onnx_artifact, tmp_path)
    (edited / "README.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="it holds README.txt"):
        onnx_artifact.cached.export(edited, "onnx", overwrite=True)
    assert (edited / "README.txt").read_text() == "my notes"
    plain = _copy(onnx_artifact, tmp_path / "again")
    with pytest.raises(FileExistsError, match="already holds an artifact; pass overwrite=True"):
        onnx_artifact.cached.export(plain, "onnx")
    assert onnx_artifact.cached.export(plain, "onnx", overwrite=True) == plain
    assert cc.load(plain)(**dict(dit_inputs(batch=4), return_dict=False))[0].shape == (4, 4, 8, 8)


def test_tensorrt_export_needs_the_extra(onnx_artifact, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed: the export would really build engines")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"cachecompile\[tensorrt\]"):
        onnx_artifact.cached.export(tmp_path / "trt", "tensorrt")
    assert not (tmp_path / "trt").exists()


def test_a_constant_name_with_different_values_is_stored_per_graph(tmp_path):
    """Two step graphs that each lift a constant under the same name keep their own tensor."""
    from cachecompile.compile.export import _save_weights

    def graph(value: float) -> torch.fx.GraphModule:
        root = torch.nn.Module()
        root.shared = torch.ones(3)
        root.lifted = torch.full((3,), value)
        g = torch.fx.Graph()
        x = g.placeholder("x")
        y = g.call_function(torch.add, (x, g.get_attr("shared")))
        g.output((g.call_function(torch.add, (y, g.get_attr("lifted"))),))
        return torch.fx.GraphModule(root, g)

    gms = [graph(1.0), graph(2.0)]
    graphs = [{"entry": {"constants": [{"name": "shared"}, {"name": "lifted"}]}} for _ in gms]
    info = _save_weights(tmp_path, graphs, gms)
    stored = torch.load(tmp_path / info["file"], weights_only=True)
    assert graphs[0]["constants"] == {"shared": "shared", "lifted": "lifted"}
    assert graphs[1]["constants"] == {"shared": "shared", "lifted": "step1/lifted"}
    assert stored["lifted"].tolist() == [1.0] * 3 and stored["step1/lifted"].tolist() == [2.0] * 3


# --------------------------------------------------------------------------- CLI


def test_cli_exports_the_tiny_model_as_onnx(tmp_path, capsys):
    from cachecompile.__main__ import main
    from cachecompile.tools.zoo import load_bench_model
    from cachecompile.tools.export import sample_call

    out = tmp_path / "tiny"
    args = ["export", "--model", "tiny", "--schedule", "fora:2", "--steps", "4", "--format", "onnx", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 step graphs [0, 1, 0, 1]" in printed and "verified:" in printed and "FAILED" not in printed

    # Independently of the CLI's own check: the tiny model (same seed), eager cached, same call.
    bm = load_bench_model("tiny")
    cached = cc.optimize(bm.model, cc.Schedule.fora(4, 2), example_kwargs=sample_call(bm, 1))
    loaded = cc.load(out)
    kw = dict(num_steps=4, null_class=bm.null_class, sample_size=bm.sample_size, in_channels=bm.in_channels)
    for seed in SEEDS:
        expected = artifact_loop.sample(cached, torch.tensor([3]), seed=seed, **kw)
        assert rel_diff(artifact_loop.sample(loaded, torch.tensor([3]), seed=seed, **kw), expected) <= 1e-4

    with pytest.raises(SystemExit, match="not empty"):
        main(args)
    with pytest.raises(SystemExit, match="--weights applies to --format aoti"):
        main(args[:-1] + [str(tmp_path / "other"), "--weights", "embedded"])


def test_load_takes_the_manifest_path_and_checks_backend_options(onnx_artifact):
    assert cc.load(onnx_artifact.path / "manifest.json").backend == "onnxruntime"
    with pytest.raises(TypeError, match=r"no load option\(s\) \['threads'\].*providers"):
        cc.load(onnx_artifact.path, threads=2)


def test_cli_exports_a_users_model_with_a_schedule_file(dit, tmp_path, capsys):
    """``--model module:attr`` (here the test DiT factory) and ``--schedule FILE``."""
    from cachecompile.__main__ import main

    schedule = cc.Schedule.fora(4, 3)
    schedule.save(tmp_path / "schedule.json")
    out = tmp_path / "user"
    base = ["export", "--model", "tests.conftest:make_dit", "--schedule", str(tmp_path / "schedule.json"),
            "--format", "onnx", "--batch", "2"]
    with pytest.raises(SystemExit, match="has 4 steps but --steps is 5"):
        main(base + ["--out", str(out), "--steps", "5"])
    assert main(base + ["--out", str(out), "--no-verify"]) == 0
    assert "verified" not in capsys.readouterr().out
    loaded = cc.load(out)
    assert loaded.schedule == schedule and loaded.program.call.leaves[0].shape == (4, 4, 8, 8)
    cached = cc.optimize(dit, schedule)  # make_dit() is the `dit` fixture's model
    for seed in SEEDS:
        expected = ddim_sample(cached, LABELS, seed=seed, **SAMPLE)
        assert rel_diff(ddim_sample(loaded, LABELS, seed=seed, **SAMPLE), expected) <= 1e-4


def test_a_loaded_artifact_refuses_to_move(onnx_artifact):
    loaded = cc.load(onnx_artifact.path)
    assert loaded.to("cpu") is loaded and loaded.float() is loaded  # where it already is
    with pytest.raises(RuntimeError, match=r"runs on cpu in float32.*cannot move to cpu in float64.*export it again"):
        loaded.double()
    kw = dict(dit_inputs(batch=4), return_dict=False)
    torch.testing.assert_close(loaded(**kw)[0], cc.load(onnx_artifact.path)(**kw)[0], rtol=0, atol=0)
