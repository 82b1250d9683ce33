"""The GPU check (scripts/gpu_check.sh) run dry on the CPU, so that the script does not rot.

The dry run is the same script: the GPU steps report "skipped: no GPU", the rest really runs,
small (the environment, the install plan with no registry asked, a 2-step bench of the tiny
model). A run takes about 15 s here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(out.parent)}
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    done = _run(out, "--dry-run", "--offline")
    return out, done


def test_dry_run_passes_and_writes_json_and_markdown(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    module = _gpu_check_module()
    assert [s["step"] for s in report["steps"]] == list(module.STEPS)
    status = {s["step"]: s["status"] for s in report["steps"]}
    assert status["environment"] == "passed" and status["bench"] == "passed"
    for name in module.GPU_STEPS:
        assert status[name] == "skipped"
        assert next(s for s in report["steps"] if s["step"] == name)["reason"].startswith("no GPU")
    env = next(s for s in report["steps"] if s["step"] == "environment")["details"]
    import torch

    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    # every step ran under its own budget and reported its time
    assert all(0 <= s["seconds"] <= s["budget"] for s in report["steps"])
    assert report["budgets"] == module.BUDGETS and report["exit_code"] == 0


def test_dry_run_really_runs_the_small_bench(dry_run):
    out, _ = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    bench = next(s for s in report["steps"] if s["step"] == "bench")
    rows = {(r["impl"], r["schedule"], r["backend"]): r for r in bench["details"]["rows"]}
    assert bench["details"]["device"] == "cpu"
    ran = rows[("cachecompile", "fora:3", "eager")]
    assert ran["status"] == "ok" and ran["seconds"] > 0 and ran["flops_ratio"] > 1
    assert (out / "bench" / "bench.json").is_file()
    markdown = (out / "gpu_check.md").read_text()
    assert "| tensorrt | skipped |" in markdown and "| cachecompile | fora:3 | eager | ok |" in markdown


def test_offline_install_reports_what_it_skipped(dry_run):
    out, _ = dry_run
    install = json.loads((out / "install.json").read_text())
    assert install["online"] is False and install["gpu_present"] is False
    assert install["installed"] == []  # --offline: nothing asked of a registry, nothing installed
    for item in install["skipped"]:
        assert "no registry reachable" in item["why"]


def test_a_step_over_its_budget_fails_the_run(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--dry-run", "--no-install", "--only", "environment", "--budget", "environment=0.001", timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    (step,) = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert step["status"] == "timeout" and "budget" in step["reason"]


def test_the_total_budget_caps_the_run(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--dry-run", "--no-install", "--only", "environment", "bench", "--total-budget", "0.001", timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["timeout", "timeout"]
    assert "rerun it with --only bench" in steps[1]["reason"]


def test_a_mismatch_or_a_required_skip_gives_a_non_zero_exit():
    module = _gpu_check_module()
    passed = {"step": "tensorrt", "status": "passed", "checks": [module.check("rel-L1", 1e-4, 1e-3)]}
    mismatch = {"step": "tensorrt", "status": "passed", "checks": [module.check("rel-L1", 2e-3, 1e-3)]}
    skipped = {"step": "tensorrt", "status": "skipped", "reason": "no GPU"}
    assert module.exit_code([passed]) == 0 and module.exit_code([skipped]) == 0
    assert module.step_status(mismatch) == "failed" and module.exit_code([passed, mismatch]) == 1
    assert module.exit_code([skipped], required={"tensorrt"}) == 1


def test_usage_error_without_an_output_folder():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: scripts/gpu_check.sh OUT_DIR" in done.stderr


def test_tensorrt_step_against_the_simulated_tensorrt(monkeypatch, tmp_path):
    """The GPU step of issue 19's "done when", run on the CPU against the simulated TensorRT 11
    (tests/backends/simulated_tensorrt.py) with the tiny model: the same calls as on the GPU day
    (artifact export + load, compile, strong fp16, unaligned input, float64 refusal), so the
    step's code cannot rot unseen. Its numbers say nothing about TensorRT. Under a minute here."""
    import argparse

    import diffusers  # noqa: F401  (imported before torch.cuda's stream API is replaced)

    from tests.backends import simulated_tensorrt

    simulated_tensorrt.install(monkeypatch, version="11.4.0.106")
    gc = _gpu_check_module()
    monkeypatch.setattr(gc, "DEVICE", "cpu")
    monkeypatch.setattr(gc, "MODEL", "tiny")
    monkeypatch.setattr(gc, "SAMPLE_STEPS", 3)
    monkeypatch.setattr(gc, "REDUCED_PRECISIONS", ("fp16",))  # the simulation runs engines with ONNX Runtime: no bf16 Conv on the CPU
    monkeypatch.setattr(gc, "_strict_fp32", lambda: None)
    result = gc.step_tensorrt(argparse.Namespace(out=str(tmp_path), dry_run=False, install_report=None))
    checks = {c["check"].split(" (")[0]: c for c in result["checks"]}
    assert result["status"] == "passed" and all(c["ok"] for c in result["checks"]), result
    assert set(checks) == {
        "fora:3 step graphs share one timing cache", "fora:3 fp32 engines vs eager", "unaligned input",
        "duca:3:0.3 fp32 engines vs eager", "all-compute fp16 strong typing vs uncached fp32", "float64 model refused",
    }
    assert checks["fora:3 step graphs share one timing cache"]["graphs"] == 2
    assert "cast the model and its inputs to float32" in checks["float64 model refused"]["message"]
    assert result["details"]["all-compute fp16 weak typing vs uncached fp32 (rel-L1)"] == "skipped: TensorRT 11 has no weak typing"
