"""Random mutations of saved schedule files and artifact manifests: reading one gives a valid
object or the library's own error (``ScheduleError``, ``ArtifactError``), never anything else.

A mutation replaces a value anywhere in the JSON tree by another JSON value (numbers of every
kind, NaN and infinities included, strings, lists, objects), deletes a key or list item, adds a
stray key, or cuts or edits the text itself. A schedule that reads back must also print, round
trip through its file form and resolve on a model layout (or refuse that layout with a
ScheduleError). A manifest that loads must run its first call or refuse it with the runtime's
own input errors. ``CACHECOMPILE_FUZZ_EXAMPLES`` scales the example counts (default 3: 30
schedule and 15 manifest mutations; the ONNX artifact of a tiny DiT is exported once).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import cachecompile as cc
from cachecompile.core.errors import ArtifactError, InputMismatchError, ScheduleError, StepMismatchError
from cachecompile.core.schedule import Layout
from cachecompile.methods.dual import Partial
from tests.conftest import dit_inputs, make_dit

EXAMPLES = int(os.environ.get("CACHECOMPILE_FUZZ_EXAMPLES", "3"))


def _settings(n: int) -> settings:
    return settings(
        max_examples=n, deadline=None, derandomize=EXAMPLES <= 10,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------- mutations

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["reuse", "compute", "partial", "goc", "eoc", "taylor", "fora", "0", "1", "cpu", "stack", "blocks.0.attn"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated(draw, doc: dict) -> str:
    """``doc`` as JSON text, with one to three random mutations (each noted for a failure report)."""
    obj = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "stray", "retype"]))
        if not path:
            if op == "replace":
                obj = draw(JSON_VALUES)
            continue
        parent, key = _get(obj, path[:-1]), path[-1]
        note(f"mutation {op} at {list(path)}")
        if op == "replace":
            parent[key] = draw(JSON_VALUES)
        elif op == "delete":
            del parent[key]
        elif op == "stray" and isinstance(parent[key], dict):
            parent[key][draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
        elif op == "retype":
            v = parent[key]
            parent[key] = str(v) if not isinstance(v, str) else (int(v) if v.isdigit() else [v])
        if not isinstance(obj, (dict, list)):
            break
    text = json.dumps(obj, allow_nan=True)
    cut = draw(st.sampled_from(["none", "none", "none", "truncate", "edit"]))
    if cut == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif cut == "edit" and text:
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from(["{", "}", "[", "]", ",", '"', "0", "-", "e", "N"])) + text[i + 1:]
    note(f"text: {cut}")
    return text


# --------------------------------------------------------------------------- schedule files

LAYOUT = Layout(branches=(("attn", "mlp"),) * 2)
SCHEDULES = [
    cc.Schedule.fora(5, 2),
    cc.Schedule.toca(5, 3, [0.25, 0.5], "v_norm+0.25*staleness", seed=1),
    cc.Schedule.duca(6, 3, [[0.3, 0.5]] * 6, "random", "residual"),
    cc.Schedule.from_mask([[[1, 1], [1, 1]], [[0, 1], [1, 0]], [[0, 0], [1, 1]]]),
    cc.Schedule.explicit([{}, {"blocks.0.mlp": Partial(ratio=0.5, score=(("random", 1.0),)), "stack": "compute"}, {"stack": {"kind": "residual"}}]),
    cc.Schedule.fora(6, 3, compensation=cc.GOC(0.8, skip_steps={"blocks.0.attn": (4,)}, queue="computed", steps=(1, 2, 4))),
    cc.Schedule.fora(6, 2, compensation=cc.Taylor(order=2)),
    cc.Schedule.fora(6, 3, compensation=cc.EOC(theta=0.02, prior={"blocks.0.attn": torch.ones(6, 4)}, threshold=0.1, judged={"blocks.0.attn": [1, 2]})),
    cc.Schedule.duca(6, 3, 0.5, cache_dtype=torch.bfloat16),
]


def check_schedule_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mutated.json"
    path.write_text(text)
    try:
        s = cc.Schedule.load(path)
    except ScheduleError as e:
        assert "mutated.json" in str(e), f"the error does not name the file: {e}"
        return
    # it read back: it is a whole, usable schedule
    again = cc.Schedule.loads(s.dumps())
    assert again == s and hash(again) == hash(s)
    str(s)
    repr(s)
    s.step_kinds(num_steps=None if s.is_bound else 6)  # a file may leave the step count to each generation
    try:
        s.resolve(LAYOUT)
    except ScheduleError:
        pass


@pytest.mark.parametrize("index", range(len(SCHEDULES)), ids=lambda i: SCHEDULES[i].method + ("+" + SCHEDULES[i].compensation.kind if SCHEDULES[i].compensation else ""))
def test_mutated_schedule_files_load_or_raise_schedule_error(tmp_path, index):
    doc = SCHEDULES[index].to_dict()

    @_settings(max(10, EXAMPLES * 10) // len(SCHEDULES) + 1)
    @given(text=mutated(doc))
    def run(text):
        note(text[:3000])
        check_schedule_text(tmp_path, text)

    run()


# --------------------------------------------------------------------------- artifact manifests


@pytest.fixture(scope="module")
def tiny_onnx_artifact(tmp_path_factory):
    """A 3-step ToCa (random score: per-step inputs) ONNX artifact of a one-block tiny DiT,
    exported once (two step graphs)."""
    cached = cc.optimize(make_dit(num_layers=1), cc.Schedule.toca(3, 2, 0.5, "random"))
    call = dict(dit_inputs(batch=2), return_dict=False)
    cached(**call)
    cached.reset()
    path = cached.export(tmp_path_factory.mktemp("fuzz-artifact") / "dit", "onnx")
    return path, call


def _copy_with(path: Path, dest: Path, manifest: str) -> Path:
    """The artifact at ``path`` with another manifest; the other files are hard links."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in path.iterdir():
        if f.name != "manifest.json":
            os.link(f, dest / f.name)
    (dest / "manifest.json").write_text(manifest)
    return dest


def check_manifest_text(path: Path, dest: Path, text: str, call: dict) -> None:
    try:
        loaded = cc.load(_copy_with(path, dest, text))
    except ArtifactError:
        return
    try:
        out = loaded(**call)
    except (InputMismatchError, StepMismatchError, ArtifactError):
        return
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(calls_per_step=0), r"calls_per_step must be an integer >= 1"),
    (lambda m: m.update(calls_per_step="two"), r"calls_per_step must be an integer >= 1"),
    (lambda m: m.update(device="banana"), r"names device 'banana'"),
    (lambda m: m.update(device=7), r"names device 7"),
    # found by the long run: a leaf field of the wrong JSON type ran until the first call
    (lambda m: m["leaves"][1].update(index_bound=False), r"index_bound False"),
    (lambda m: m["leaves"][0].update(batched="yes"), r"batched 'yes'"),
])
def test_manifest_with_bad_calls_per_step_or_device_is_an_artifact_error(tiny_onnx_artifact, tmp_path, edit, match):
    path, _ = tiny_onnx_artifact
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    with pytest.raises(ArtifactError, match=match):
        cc.load(_copy_with(path, tmp_path / "a", json.dumps(m)))
    # the caller's own bad argument is their ValueError, not a corrupt artifact
    with pytest.raises(ValueError, match="calls_per_step"):
        cc.load(path, calls_per_step=0)


def test_mutated_manifests_load_or_raise_artifact_error(tiny_onnx_artifact, tmp_path):
    path, call = tiny_onnx_artifact
    doc = json.loads((path / "manifest.json").read_text())
    assert cc.load(path)(**call)[0].shape == call["hidden_states"].shape  # the intact artifact loads and runs

    @_settings(EXAMPLES * 5)
    @given(text=mutated(doc))
    def run(text):
        check_manifest_text(path, tmp_path / "m", text, call)

    run()


def test_the_mutation_engine_changes_documents():
    """Guard against a fuzzer that mutates nothing: most drawn texts differ from the original."""
    doc = SCHEDULES[1].to_dict()
    original = json.dumps(doc, allow_nan=True)
    seen = []

    @_settings(30)
    @given(text=mutated(doc))
    def run(text):
        seen.append(text != original)

    run()
    assert sum(seen) >= 0.8 * len(seen)
    assert not math.isnan(len(seen))
