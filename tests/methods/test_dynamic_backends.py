"""A dynamic schedule (DBCache) through the compiled backends: its decision step graph under
Inductor (fullgraph, no graph break, no recompile) and as AOTInductor and ONNX artifacts that a
fresh interpreter loads and runs. Every expected value is the eager cached model's own run.

CI cost: one Inductor compile (the dynamic step graph only: the record graph is an ordinary full
graph), one AOTInductor export of both step graphs (two compiles) and one ONNX export, in one
module-scoped fixture each.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import cachecompile as cc
from cachecompile.backends import get_backend
from cachecompile.compile.pipeline import example_inputs
from cachecompile.core.program import DECISION_SLOT
from tests.conftest import NULL_CLASS
from tests.runtime import artifact_loop

NUM_STEPS = 8
SCHEDULE = cc.Schedule.dbcache(0.3, compute_first=1, compute_last=1, warmup_steps=1, num_steps=NUM_STEPS)
LABELS = torch.tensor([1, 7])
LOOP = dict(num_steps=NUM_STEPS, null_class=NULL_CLASS, sample_size=8, in_channels=4)
SEEDS = (0, 1)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.fixture(scope="module")
def eager(dit):
    cached = cc.optimize(dit, SCHEDULE)
    runs, decisions = [], []
    for seed in SEEDS:
        runs.append(artifact_loop.sample(cached, LABELS, seed=seed, **LOOP))
        decisions.append(cached.decisions)
    assert all("cached" in d and "full" in d[1:] for d in decisions)  # both branches are taken
    return cached, runs, decisions


def _graph_counts() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_the_decision_graph_compiles_once_under_inductor(dit, eager):
    cached, runs, decisions = eager
    compiled = cc.optimize(dit, SCHEDULE)
    compiled.prepare(**_first_call())
    program = compiled.program
    idx = program.graph_of_step[-1]
    assert DECISION_SLOT in program.io[idx].cache_outputs
    before = _graph_counts()
    gm = program.graphs[idx]
    program.runners[idx] = get_backend("inductor").compile(gm, example_inputs(gm, program.example_inputs))
    after = _graph_counts()
    assert after[0] - before[0] == 1 and after[1] == before[1]  # one graph, no graph break

    class Registered:  # a library registering a pytree node type between two generations (diffusers' hooks do)
        pass

    try:
        for seed, expected, decided in zip(SEEDS, runs, decisions):
            got = artifact_loop.sample(compiled, LABELS, seed=seed, **LOOP)
            assert rel_diff(got, expected) <= 1e-4
            assert compiled.decisions == decided
            if seed == SEEDS[0]:
                pytree.register_pytree_node(Registered, lambda x: ([], None), lambda c, _: Registered())
    finally:
        pytree._deregister_pytree_node(Registered)
    assert _graph_counts() == after  # both generations, both branches, a new pytree type: no recompile


def _first_call() -> dict:
    b = LABELS.shape[0]
    return dict(hidden_states=torch.zeros(2 * b, 4, 8, 8), timestep=torch.full((2 * b,), 999, dtype=torch.int64),
                class_labels=torch.cat([LABELS, torch.full_like(LABELS, NULL_CLASS)]), return_dict=False)


@pytest.fixture(scope="module")
def artifacts(eager, tmp_path_factory):
    cached, runs, decisions = eager
    root = tmp_path_factory.mktemp("dynamic-artifacts")
    torch.save({"expected": runs, "labels": LABELS, "kwargs": LOOP}, root / "expected.pt")
    paths = {fmt: cached.export(root / fmt, fmt) for fmt in ("onnx", "aoti")}
    return paths, root / "expected.pt", decisions


def test_onnx_artifact_branches_with_an_if_node_tensorrt_accepts(artifacts):
    import onnx

    from cachecompile.backends.trt_ops import check_onnx_for_tensorrt

    paths, _, _ = artifacts
    manifest = json.loads((paths["onnx"] / "manifest.json").read_text())
    models = [onnx.load(str(paths["onnx"] / g["entry"]["files"]["onnx"])) for g in manifest["graphs"]]
    assert ["If" in [n.op_type for n in m.graph.node] for m in models] == [False, True]  # record graph: no branch
    # the static check against TensorRT's ONNX support matrix (If and its subgraphs included); no engine is built here
    assert [check_onnx_for_tensorrt(m) for m in models] == [[], []]


def test_artifacts_reproduce_the_run_in_a_fresh_process(artifacts, subprocess_env, repo_root):
    paths, expected, decisions = artifacts
    script = (
        "import json, sys, torch\n"
        "import cachecompile as cc\n"
        "from tests.runtime import artifact_loop\n"
        "ref = torch.load(sys.argv[1], weights_only=True)\n"
        "out = {}\n"
        "for path in sys.argv[2:]:\n"
        "    loaded = cc.load(path)\n"
        "    diffs, decisions = [], []\n"
        "    for seed, exp in zip((0, 1), ref['expected']):\n"
        "        got = artifact_loop.sample(loaded, ref['labels'], seed=seed, **ref['kwargs'])\n"
        "        diffs.append(((got - exp).abs().max() / exp.abs().max()).item())\n"
        "        decisions.append(loaded.decisions)\n"
        "    out[loaded.backend] = {'diffs': diffs, 'decisions': decisions}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(expected), str(paths["aoti"]), str(paths["onnx"])],
        cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result) == ["aoti", "onnxruntime"]
    for backend, r in result.items():
        assert max(r["diffs"]) <= 1e-4, (backend, r)
        assert r["decisions"] == decisions, backend
