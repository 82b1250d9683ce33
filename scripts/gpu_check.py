#!/usr/bin/env python3
"""One-shot GPU verification: what these CPU machines cannot run, in one command.

    scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--offline] [--only STEP ...] [--budget STEP=SECONDS ...]

On a CUDA machine it first makes sure what it needs is importable (``--wheels DIR``: a folder of
carried wheels, installed without an index; online: pinned packages from the package registry;
``--offline``: only what is installed and carried), then runs each step below in its own
process under its own time budget, so one slow or hung step cannot eat the others' time, and
writes ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/gpu_check.md``. It exits 1 when any check
mismatches, a step fails or runs out of time, 0 otherwise; a step that cannot run (no GPU,
a package missing) is reported as ``skipped`` with the reason, and ``--require`` turns named
skips into failures.

Steps, in this order (budgets in seconds, first guesses until the first GPU run; ``--budget``
overrides one, ``--total-budget`` (480) caps them all together, installs apart):

- ``environment`` (20): Python, torch and its CUDA, the GPU, TensorRT, ONNX Runtime and its
  providers, diffusers, cache-dit; what the install step did and skipped.
- ``tensorrt`` (150): on a DiT-S/2-sized model (``dit-s2``: hidden 384, 12 layers, 32×32 latent),
  a 6-step DDIM run with CFG (batch 2 → 4) through TensorRT engines against the same run in
  eager mode: FORA:3 fp32 through an exported artifact (``cached.export(format="tensorrt")``;
  the step graphs share one timing cache) loaded with ``cc.load``; DuCa 3/0.3 fp32 through
  ``cc.optimize(backend="tensorrt")``; an all-compute schedule at fp16 and bf16 with strong and
  (TensorRT 10 only) weak typing against the uncached eager model; an unaligned input; a float64
  model refused. Engines here are built at builder optimisation level 0 (fast builds; they
  check numbers, the bench times its own at TensorRT's default level).
- ``gpu-tests`` (60): pytest on the test files that skip without a GPU (``tests/**/*_gpu.py``).
- ``inductor-cudagraphs`` (75): FORA:3 through ``backend="inductor", mode="reduce-overhead"``,
  two generations, against eager.
- ``onnxruntime-cuda`` (45): FORA:3 through ONNX Runtime's CUDA provider (TF32 off) against eager.
- ``bench`` (120) and ``bench-tensorrt`` (90): the README benchmark's dit-s2 rows on the GPU
  (``python -m cachecompile bench --model dit-s2 --steps 20 --schedule fora:3 duca:3:0.3``):
  uncached, cached eager, inductor and cache-dit at the same mask (where installed); then the
  TensorRT rows in their own process and budget.

Tolerances, relative L1 of the final samples (mean |a − b| ÷ mean |b|) against the eager run
of the same schedule (eager fp32 with TF32 off): fp32 engines and compiled backends 1e-3;
fp16 2e-2 and bf16 5e-2 against the uncached fp32 model. The fp32/fp16/bf16 figures are first
guesses: the first GPU run reports the measured values beside them.

Without a GPU (``--dry-run``, or automatically) the GPU steps report "skipped: no GPU" and the
rest runs small (environment, the install plan, a 2-step bench of the tiny model on the CPU):
tests/tools/test_gpu_check.py runs that, so this script does not rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

# What the check installs where it can (online) and nothing provides it yet. Pinned.
TORCH_PIN = "torch==2.13.0"  # the PyPI wheel for Linux x86-64 is a CUDA build
PINS = {
    "diffusers": "diffusers==0.42.1",
    "onnx": "onnx==1.23.2",
    "onnxscript": "onnxscript==0.7.2",
    "pytest": "pytest>=7",
    "cache_dit": "cache-dit==1.5.3",
}
ORT_GPU_PIN = "onnxruntime-gpu==1.31.1"
TENSORRT_VERSION = "11.4.0.106"  # inside the supported range 10.15 <= TensorRT < 12

# Seconds per step (first guesses until the first GPU run), in the order the steps run: what
# issue 19's "done when" needs first. TOTAL_BUDGET caps the sum, so a run ends within it whatever
# each step does; a step the total leaves no time for fails as "timeout" (rerun it with --only).
BUDGETS = {
    "environment": 20,
    "tensorrt": 150,
    "gpu-tests": 60,
    "inductor-cudagraphs": 75,
    "onnxruntime-cuda": 45,
    "bench": 120,
    "bench-tensorrt": 90,
}
TOTAL_BUDGET = 480
GPU_STEPS = ("gpu-tests", "tensorrt", "inductor-cudagraphs", "onnxruntime-cuda", "bench-tensorrt")
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2, "inductor": 1e-3, "onnxruntime-cuda": 1e-3}
SAMPLE_STEPS = 6  # DDIM steps of the correctness runs: both FORA:3 graphs and all three DuCa kinds, twice
DEVICE = "cuda"  # where the GPU steps put the model (a seam for trying the steps elsewhere)
MODEL = "dit-s2"  # the bench model the GPU steps use
REDUCED_PRECISIONS = ("fp16", "bf16")


# ---------------------------------------------------------------------------------------
# Results


def check(name: str, value: float | None, tolerance: float | None, ok: bool | None = None, **extra: Any) -> dict[str, Any]:
    """One compared quantity; ``ok`` defaults to value <= tolerance."""
    if ok is None:
        ok = value is not None and tolerance is not None and value <= tolerance
    return {"check": name, "value": value, "tolerance": tolerance, "ok": bool(ok), **extra}


def step_status(result: dict[str, Any]) -> str:
    """A step with a failed check is failed, whatever it said of itself."""
    if any(not c["ok"] for c in result.get("checks", [])):
        return "failed"
    return result.get("status", "failed")


def exit_code(results: list[dict[str, Any]], required: set[str] = frozenset()) -> int:
    for r in results:
        status = step_status(r)
        if status in ("failed", "timeout", "error") or (status == "skipped" and r["step"] in required):
            return 1
    return 0


# ---------------------------------------------------------------------------------------
# Install: what is there, what was carried, what the registry gives


def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _probe(python: str, code: str, timeout: float = 60) -> Any:
    """Run ``code`` (which prints one JSON value) in ``python``; None when it fails."""
    try:
        done = _run([python, "-c", code], timeout)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


_TORCH_PROBE = (
    "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
    "'gpu': torch.cuda.is_available()}))"
)


def _importable(python: str, module: str) -> bool:
    return _probe(python, f"import json, importlib.util; print(json.dumps(importlib.util.find_spec({module!r}) is not None))") is True


def _gpu_present() -> bool:
    """A CUDA GPU on this machine, whether or not the installed torch can use it."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return _run([smi, "-L"], 20).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _registry_reachable(python: str, timeout: float) -> bool:
    """Ask pip's configured index for one small package (nothing is installed)."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--retries", "0", "--timeout", "8",
           "-d", tempfile.mkdtemp(prefix="gpu-check-probe-"), "six"]
    try:
        return _run(cmd, timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def install(args: argparse.Namespace, python: str) -> dict[str, Any]:
    """Make the packages importable that the steps need; returns what was done and skipped."""
    report: dict[str, Any] = {"installed": [], "skipped": [], "carried": [], "online": False}
    deadline = time.monotonic() + args.install_budget
    gpu = not args.dry_run and _gpu_present()
    report["gpu_present"] = gpu

    def left() -> float:
        return max(5.0, deadline - time.monotonic())

    def pip(*spec: str, index: bool = True) -> tuple[bool, str]:
        cmd = [python, "-m", "pip", "install", "-q", "--no-input", *spec]
        if not index:
            cmd[4:4] = ["--no-index", "--no-deps"]
        try:
            done = _run(cmd, left())
        except subprocess.TimeoutExpired:
            return False, "install budget spent"
        lines = (done.stderr or done.stdout).strip().splitlines()
        return done.returncode == 0, lines[-1] if lines else ""

    if args.wheels:
        wheels = sorted(Path(args.wheels).glob("*.whl"))
        torch_probe = _probe(python, _TORCH_PROBE)
        if torch_probe and torch_probe.get("cuda"):
            wheels = [w for w in wheels if not w.name.startswith("torch-")]  # never replace a CUDA torch
        if wheels:
            ok, msg = pip(*map(str, wheels), index=False)
            (report["carried"] if ok else report["skipped"]).append(
                {"what": [w.name for w in wheels]} if ok else {"what": "carried wheels", "why": msg}
            )
    if not args.offline:
        report["online"] = _registry_reachable(python, min(30.0, left()))
    online = report["online"]

    torch_info = _probe(python, _TORCH_PROBE)
    if gpu and not (torch_info and torch_info.get("gpu")):
        if online:
            ok, msg = pip(TORCH_PIN)
            (report["installed"] if ok else report["skipped"]).append(
                {"what": TORCH_PIN} if ok else {"what": TORCH_PIN, "why": msg}
            )
            torch_info = _probe(python, _TORCH_PROBE)
        else:
            report["skipped"].append({"what": "a CUDA torch", "why": "no registry reachable and none installed or carried"})
    constraints = None
    if torch_info:  # pip must never resolve torch on its own: pin it to what is there
        constraints = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "constraints.txt"
        constraints.write_text(f"torch=={torch_info['version']}\n")

    wanted = dict(PINS)
    if gpu:
        cuda_major = str((torch_info or {}).get("cuda") or "13").split(".")[0]
        wanted["tensorrt"] = f"tensorrt-cu{cuda_major}=={TENSORRT_VERSION}"
    for module, spec in wanted.items():
        if _importable(python, module):
            continue
        if not online:
            report["skipped"].append({"what": spec, "why": "not installed or carried, and no registry reachable (--offline)"
                                      if args.offline else "not installed or carried, and no registry reachable"})
            continue
        ok, msg = pip(spec, *(["-c", str(constraints)] if constraints else []))
        if ok:
            report["installed"].append({"what": spec})
        else:
            why = msg
            if module == "tensorrt":
                why = (f"{msg} (TensorRT's PyPI packages are stubs that download the libraries from NVIDIA's own "
                       "index at install time: carry the real wheels with --wheels DIR)")
            report["skipped"].append({"what": spec, "why": why})
    if gpu and online and not _probe(python, "import json, onnxruntime as o; print(json.dumps('CUDAExecutionProvider' in o.get_available_providers()))"):
        ok, msg = pip(ORT_GPU_PIN, *(["-c", str(constraints)] if constraints else []))
        (report["installed"] if ok else report["skipped"]).append(
            {"what": ORT_GPU_PIN} if ok else {"what": ORT_GPU_PIN, "why": msg}
        )
    return report


# ---------------------------------------------------------------------------------------
# Steps (each runs in its own process: `gpu_check.py --step NAME --result FILE ...`)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _rel_l1(a: Any, b: Any) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def _dit() -> Any:
    from cachecompile.tools.zoo import load_bench_model

    return load_bench_model(MODEL)


class _OnDevice:
    """A transformer called as it is, telling ``ddim_sample`` its device: a loaded artifact has
    no parameters to tell it from."""

    def __init__(self, model: Any, device: str) -> None:
        self.model_, self.device = model, device

    def parameters(self) -> Any:
        import torch

        return iter([torch.empty(0, device=self.device)])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model_(*args, **kwargs)


def _sample_kwargs(bm: Any, steps: int) -> dict[str, Any]:
    return dict(num_steps=steps, guidance_scale=2.0, null_class=bm.null_class, sample_size=bm.sample_size,
                in_channels=bm.in_channels)


def _labels(bm: Any) -> Any:
    import torch

    return torch.tensor([1, 207 % bm.num_classes])


def _sample(model: Any, bm: Any) -> Any:
    from cachecompile.sampling import ddim_sample

    return ddim_sample(_OnDevice(model, DEVICE), _labels(bm), seed=0, **_sample_kwargs(bm, SAMPLE_STEPS))


def _strict_fp32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def step_environment(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "argv": sys.argv[1:]}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    except ImportError as e:
        info["torch"] = f"not importable: {e}"
    for dist in ("diffusers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12",
                 "tensorrt-cu13", "torch-tensorrt", "cache-dit", "pytest"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    try:
        import tensorrt

        info["tensorrt_module"] = tensorrt.__version__
    except Exception as e:  # ImportError, or a library that does not load
        info["tensorrt_module"] = f"not importable: {str(e).splitlines()[0][:200]}"
    info["install"] = json.loads(Path(args.install_report).read_text()) if args.install_report else None
    return {"status": "passed", "details": info}


def step_gpu_tests(args: argparse.Namespace) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*_gpu.py"))
    junit = Path(args.out) / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={junit}", *files]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    cases = []
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            status = "passed"
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    status = {"failure": "failed"}.get(kind, kind)
                    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                                  "message": (node.get("message") or "")[:300]})
                    break
            else:
                cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": "passed"})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    checks = [check("pytest exit status", done.returncode, 0, ok=done.returncode in (0, 5) and not counts["failed"] and not counts["error"])]
    status = "passed" if counts["passed"] else "skipped"
    # pytest -rs prints "SKIPPED [n] file:line: reason"; the junit message of a module skip is only "collection skipped"
    skips = sorted({line.split(": ", 1)[-1] for line in done.stdout.splitlines() if line.startswith("SKIPPED [")})
    reason = "" if counts["passed"] else "every GPU test skipped: " + "; ".join(skips or sorted({c["message"] for c in cases}))[:400]
    return {"status": status, "reason": reason, "checks": checks, "details": {"files": files, "counts": counts, "tests": cases,
            "output_tail": done.stdout[-2000:]}}


def step_tensorrt(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch

    import cachecompile as cc

    try:
        import tensorrt as trt
    except Exception as e:
        return {"status": "skipped", "reason": f"tensorrt does not import ({str(e).splitlines()[0][:200]})"}
    _strict_fp32()
    bm = _dit()
    model = bm.model.to(DEVICE)
    steps = SAMPLE_STEPS
    checks: list[dict[str, Any]] = []
    details: dict[str, Any] = {"tensorrt": trt.__version__, "model": bm.name, "steps": steps, "optimization_level": 0}
    level = {"optimization_level": 0}  # build fast: these engines check numbers, the bench times its own
    fora, duca = cc.Schedule.fora(steps, interval=3), cc.Schedule.duca(steps, interval=3, fresh_ratio=0.3)
    full = cc.Schedule.fora(steps, interval=1)

    # FORA:3 fp32 through an exported artifact: its step graphs share one timing cache.
    eager = cc.optimize(model, fora)
    want = _sample(eager, bm)
    out = Path(args.out) / "trt-fora3"
    t0 = time.perf_counter()
    eager.export(out, format="tensorrt", overwrite=True, **level)
    details["fora3_export_s"] = round(time.perf_counter() - t0, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    caches = {g["entry"].get("timing_cache") for g in manifest["graphs"]}
    cache_file = out / "timing.cache"
    checks.append(check("fora:3 step graphs share one timing cache", len(manifest["graphs"]), None,
                        ok=caches == {"timing.cache"} and cache_file.is_file() and cache_file.stat().st_size > 0,
                        graphs=len(manifest["graphs"]), timing_cache_bytes=cache_file.stat().st_size if cache_file.exists() else 0))
    loaded = cc.load(out)
    checks.append(check("fora:3 fp32 engines vs eager (rel-L1)", _rel_l1(_sample(loaded, bm), want), TOLERANCES["fp32"]))

    # An unaligned input (a contiguous slice off a 256-byte boundary) gives the aligned result.
    from cachecompile.sampling import first_call_kwargs

    kwargs = first_call_kwargs(_OnDevice(loaded, DEVICE), _labels(bm), **_sample_kwargs(bm, steps))
    x = kwargs["hidden_states"]
    raw = torch.empty(x.numel() + 64, dtype=x.dtype, device=x.device)
    unaligned = raw[3:3 + x.numel()].view(x.shape).copy_(x)
    loaded.reset()
    aligned_out = loaded(**kwargs)[0]
    loaded.reset()
    unaligned_out = loaded(**{**kwargs, "hidden_states": unaligned})[0]
    checks.append(check(f"unaligned input (address % 256 = {unaligned.data_ptr() % 256}) equals aligned",
                        float((aligned_out - unaligned_out).abs().max()), 0.0))

    # DuCa 3/0.3 fp32 compiled in memory (cc.optimize; the process-wide timing cache).
    t0 = time.perf_counter()
    got = _sample(cc.optimize(model, duca, backend="tensorrt", **level), bm)
    details["duca_compile_and_run_s"] = round(time.perf_counter() - t0, 1)
    checks.append(check("duca:3:0.3 fp32 engines vs eager (rel-L1)", _rel_l1(got, _sample(cc.optimize(model, duca), bm)), TOLERANCES["fp32"]))

    # Reduced precision: strong typing always, weak where TensorRT still has it (10.x).
    uncached = _sample(model, bm)
    for precision in REDUCED_PRECISIONS:
        for typing in ("strong", "weak"):
            name = f"all-compute {precision} {typing} typing vs uncached fp32 (rel-L1)"
            if typing == "weak" and not hasattr(trt.BuilderFlag, "FP16"):
                details[name] = "skipped: TensorRT 11 has no weak typing"
                continue
            cached = cc.optimize(model, full, backend="tensorrt", precision=precision, typing=typing, **level)
            checks.append(check(name, _rel_l1(_sample(cached, bm), uncached), TOLERANCES[precision]))

    # A float64 model is refused with a message that says what to do.
    refused = None
    try:
        cached = cc.optimize(copy.deepcopy(bm.model).double().to(DEVICE), full, backend="tensorrt", **level)
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
        cached(**kw64)
    except Exception as e:
        refused = str(e)
    checks.append(check("float64 model refused", None, None, ok=refused is not None and "float64" in refused,
                        message=(refused or "accepted")[:300]))
    return {"status": "passed", "checks": checks, "details": details}


def step_inductor_cudagraphs(args: argparse.Namespace) -> dict[str, Any]:
    import cachecompile as cc

    _strict_fp32()
    bm = _dit()
    model = bm.model.to(DEVICE)
    fora = cc.Schedule.fora(SAMPLE_STEPS, interval=3)
    want = _sample(cc.optimize(model, fora), bm)
    compiled = cc.optimize(model, fora, backend="inductor", mode="reduce-overhead")
    checks = []
    for generation in (1, 2):  # a second generation replays the captured CUDA graphs
        checks.append(check(f"fora:3 reduce-overhead generation {generation} vs eager (rel-L1)",
                            _rel_l1(_sample(compiled, bm), want), TOLERANCES["inductor"]))
    return {"status": "passed", "checks": checks, "details": {"model": bm.name, "steps": SAMPLE_STEPS,
            "step_graphs": len(compiled.step_graphs)}}


def step_onnxruntime_cuda(args: argparse.Namespace) -> dict[str, Any]:
    import cachecompile as cc

    try:
        import onnxruntime
    except ImportError as e:
        return {"status": "skipped", "reason": f"onnxruntime does not import ({e})"}
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return {"status": "skipped", "reason": f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                f"(install {ORT_GPU_PIN} or carry it)"}
    _strict_fp32()
    bm = _dit()
    model = bm.model.to(DEVICE)
    fora = cc.Schedule.fora(SAMPLE_STEPS, interval=3)
    want = _sample(cc.optimize(model, fora), bm)
    cached = cc.optimize(model, fora, backend="onnxruntime", providers=["CUDAExecutionProvider"],
                         provider_options=[{"use_tf32": 0}])
    checks = [check("fora:3 ONNX Runtime CUDA vs eager (rel-L1)", _rel_l1(_sample(cached, bm), want), TOLERANCES["onnxruntime-cuda"])]
    return {"status": "passed", "checks": checks, "details": {"onnxruntime": onnxruntime.__version__, "model": bm.name}}


def _bench(args: argparse.Namespace, name: str, backends: list[str], peers: list[str]) -> dict[str, Any]:
    gpu = not args.dry_run and _cuda()
    out = Path(args.out) / name
    if gpu:
        cmd = ["--model", "dit-s2", "--steps", "20", "--schedule", "fora:3", "duca:3:0.3", "--repeats", "3", "--device", "cuda"]
    else:  # the dry run: the same command, small, on the CPU
        cmd = ["--model", "tiny", "--steps", "2", "--schedule", "fora:3", "--repeats", "1", "--device", "cpu"]
        backends, peers = ["eager"], []
    cmd = [sys.executable, "-m", "cachecompile", "bench", *cmd, "--backend", *backends, "--warmup", "1", "--no-handwritten",
           "--no-plots", "--no-progress", "--out", str(out)] + (["--peers", *peers] if peers else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_child_env())
    if done.returncode != 0:
        return {"status": "failed", "reason": f"bench exited {done.returncode}: {done.stderr.strip()[-600:]}", "details": {"command": cmd[1:]}}
    result = json.loads((out / "bench.json").read_text())
    rows = [{k: r.get(k) for k in ("impl", "schedule", "backend", "status", "reason", "seconds", "speedup",
                                   "speedup_same_backend", "flops_ratio", "efficiency", "compile_seconds", "rel_l1")}
            for r in result["rows"]]
    broken = [r for r in result["rows"] if r["status"] not in ("ok", "unavailable")]
    checks = [check("bench rows that ran or were unavailable", len(broken), 0,
                    failed=[f"{r['impl']} {r['schedule']} {r['backend']}: {r['status']} {r.get('reason', '')}"[:300] for r in broken])]
    return {"status": "passed", "checks": checks, "details": {"command": cmd[1:], "device": result["device"], "rows": rows,
            "markdown": str(out / "bench.md")}}


def step_bench(args: argparse.Namespace) -> dict[str, Any]:
    return _bench(args, "bench", ["eager", "inductor"], ["cache-dit-mask"])


def step_bench_tensorrt(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return {"status": "skipped", "reason": f"tensorrt does not import ({str(e).splitlines()[0][:200]})"}
    return _bench(args, "bench-tensorrt", ["tensorrt"], [])


STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "environment": step_environment,
    "tensorrt": step_tensorrt,
    "gpu-tests": step_gpu_tests,
    "inductor-cudagraphs": step_inductor_cudagraphs,
    "onnxruntime-cuda": step_onnxruntime_cuda,
    "bench": step_bench,
    "bench-tensorrt": step_bench_tensorrt,
}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_step(name: str, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """Run one step in a child process under ``budget`` seconds; never raises."""
    result_file = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-")) / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), args.out, "--step", name, "--result", str(result_file)]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--install-report", args.install_report] if args.install_report else []
    t0 = time.monotonic()
    log = Path(args.out) / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return {"step": name, "status": "timeout", "reason": f"over its budget of {budget:g} s", "seconds": round(time.monotonic() - t0, 1),
                    "budget": budget, "log": log.name}
        except BaseException:  # interrupted (SIGTERM from an outer `timeout`, Ctrl-C): take the step down too
            _kill(proc)
            raise
    seconds = round(time.monotonic() - t0, 1)
    if not result_file.exists():
        tail = log.read_text()[-800:]
        return {"step": name, "status": "error", "reason": f"exited {proc.returncode} without a result: {tail}", "seconds": seconds,
                "budget": budget, "log": log.name}
    result = json.loads(result_file.read_text())
    return {"step": name, **result, "seconds": seconds, "budget": budget, "log": log.name}


def _kill(proc: subprocess.Popen) -> None:
    """End the step's process group (the step and what it started), this one only."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


class Interrupted(Exception):
    """The check was told to stop (SIGTERM, SIGINT): the report is written with what ran."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def child_main(args: argparse.Namespace) -> int:
    """Inside a step's process: run it and write its result."""
    name = args.step
    gpu_ok = not args.dry_run and _cuda_or_false()
    try:
        if name in GPU_STEPS and not gpu_ok:
            result = {"status": "skipped", "reason": "no GPU" + (" (dry run)" if args.dry_run else "")}
        else:
            result = STEPS[name](args)
    except Exception as e:  # a crash is a failed step with its message, not a lost report
        import traceback

        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-3000:]}
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return 0


def _cuda_or_false() -> bool:
    try:
        return _cuda()
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------
# Report


def markdown(report: dict[str, Any]) -> str:
    env = next((r for r in report["steps"] if r["step"] == "environment"), {}).get("details", {})
    lines = [
        "# GPU check", "",
        f"{report['started']}, {report['total_seconds']} s, exit {report['exit_code']}"
        + (" (dry run: no GPU steps)" if report["dry_run"] else ""),
        f"GPU: {env.get('gpu', 'none')} {env.get('capability', '')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}); "
        f"TensorRT {env.get('tensorrt_module')}; ONNX Runtime {env.get('onnxruntime') or env.get('onnxruntime-gpu')}; "
        f"diffusers {env.get('diffusers')}; cache-dit {env.get('cache-dit')}", "",
        "| step | status | seconds | budget | note |", "|---|---|---:|---:|---|",
    ]
    for r in report["steps"]:
        lines.append(f"| {r['step']} | {step_status(r)} | {r.get('seconds', '')} | {r.get('budget', '')} | {str(r.get('reason', '')).replace('|', '/')[:200]} |")
    checks = [(r["step"], c) for r in report["steps"] for c in r.get("checks", [])]
    if checks:
        lines += ["", "| step | check | value | tolerance | ok |", "|---|---|---:|---:|---|"]
        for step, c in checks:
            value = c["value"] if not isinstance(c["value"], float) else f"{c['value']:.3g}"
            lines.append(f"| {step} | {c['check']} | {value} | {c['tolerance'] if c['tolerance'] is not None else ''} | {'yes' if c['ok'] else '**NO**'} |")
    for r in report["steps"]:
        rows = r.get("details", {}).get("rows") if isinstance(r.get("details"), dict) else None
        if rows:
            lines += ["", f"`{r['step']}` ({r['details']['device']}):", "",
                      "| implementation | schedule | backend | status | time (s) | speedup | FLOPs ratio | efficiency | compile (s) |",
                      "|---|---|---|---|---:|---:|---:|---:|---:|"]
            for row in rows:
                def f(v: Any, fmt: str = "{:.3f}") -> str:
                    return "" if v is None else fmt.format(v)
                lines.append(f"| {row['impl']} | {row['schedule']} | {row['backend']} | {row['status']} | {f(row['seconds'])} | "
                             f"{f(row['speedup'], '{:.2f}×')} | {f(row['flops_ratio'], '{:.2f}×')} | {f(row['efficiency'], '{:.2f}')} | "
                             f"{f(row['compile_seconds'], '{:.1f}')} |")
    install = report.get("install") or {}
    if install:
        lines += ["", f"Install (registry reachable: {install.get('online')}):", ""]
        lines += [f"- installed {i['what']}" for i in install.get("installed", [])]
        lines += [f"- carried {', '.join(i['what'])}" for i in install.get("carried", [])]
        lines += [f"- skipped {i['what']}: {i['why']}" for i in install.get("skipped", [])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for gpu_check.json, gpu_check.md and the step logs")
    p.add_argument("--wheels", default=None, help="a folder of carried wheels, installed without an index first")
    p.add_argument("--offline", action="store_true", help="ask no registry: use what is installed and carried")
    p.add_argument("--no-install", action="store_true", help="skip the install step entirely")
    p.add_argument("--install-budget", type=float, default=300.0, help="seconds for all installs together")
    p.add_argument("--dry-run", action="store_true", help="as without a GPU: GPU steps skipped, the rest small")
    p.add_argument("--only", nargs="+", choices=list(STEPS), default=None, help="run these steps only")
    p.add_argument("--budget", nargs="+", default=[], metavar="STEP=SECONDS", help="override step budgets")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (a slower machine)")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET, help="seconds for all steps together (installs apart)")
    p.add_argument("--require", nargs="+", default=[], choices=list(STEPS), help="steps whose skip is a failure")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--install-report", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        return child_main(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    budgets = {k: v * args.budget_scale for k, v in BUDGETS.items()}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds:
            raise SystemExit(f"--budget {item!r}: expected STEP=SECONDS with STEP one of {', '.join(budgets)}")
        budgets[name] = float(seconds)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    install_report: dict[str, Any] = {}
    if not args.no_install:
        print("gpu_check: install", flush=True)
        install_report = install(args, sys.executable)
        args.install_report = str(out / "install.json")
        Path(args.install_report).write_text(json.dumps(install_report, indent=1))
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    results: list[dict[str, Any]] = []
    steps_start = time.monotonic()
    interrupted = False
    for name in args.only or list(STEPS):
        if interrupted:
            results.append({"step": name, "status": "timeout", "budget": budgets[name], "seconds": 0.0,
                            "reason": f"not run: the check was interrupted; rerun it with --only {name}"})
            continue
        remaining = args.total_budget * args.budget_scale - (time.monotonic() - steps_start)
        if remaining < 5:
            results.append({"step": name, "status": "timeout", "budget": budgets[name], "seconds": 0.0,
                            "reason": f"the total budget ({args.total_budget * args.budget_scale:g} s) was spent before "
                                      f"this step; rerun it with --only {name}"})
            continue
        budget = min(budgets[name], remaining)
        print(f"gpu_check: {name} (budget {budget:g} s)", flush=True)
        try:
            result = run_step(name, args, budget)
        except Interrupted as e:
            interrupted = True
            result = {"step": name, "status": "timeout", "budget": budget, "seconds": 0.0,
                      "reason": f"interrupted ({e}) while running; rerun it with --only {name}"}
        print(f"gpu_check: {name}: {step_status(result)} in {result.get('seconds')} s {result.get('reason', '')}"[:300], flush=True)
        results.append(result)
    code = exit_code(results, set(args.require))
    report = {"started": started, "total_seconds": round(time.monotonic() - t0, 1), "dry_run": args.dry_run, "exit_code": code,
              "budgets": budgets, "total_budget": args.total_budget * args.budget_scale, "tolerances": TOLERANCES,
              "install": install_report, "steps": results}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; exit {code}", flush=True)
    return 124 if interrupted else code


if __name__ == "__main__":
    sys.exit(main())
