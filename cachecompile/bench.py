"""The main job: whole DDIM sampling runs — uncached vs cached, eager vs compiled, against the
FLOPs limit and against the peers.

``python -m cachecompile bench`` measures, per configuration (implementation × schedule × backend):

* the wall time of a whole sampling run: the median of ``--repeats`` runs after ``--warmup`` runs,
  the timed runs interleaved round-robin over all configurations (which all stay alive), so that
  a drift in the machine's speed — other jobs, thermal limits — hits every row alike;
* the per-step time by step kind (``schedule.step_kinds()``), from a separate run with a timer
  around each transformer call, so that the timed runs carry no per-call instrumentation;
* the compile time: preparation (capture, rewrite, lowering; a peer's calibration) plus what the
  first run costs beyond a steady-state run (``torch.compile`` compiles lazily);
* the FLOPs ratio (uncached ÷ this configuration) from ``torch.utils.flop_counter``, counted per
  step on the eager equivalent (compiled code hides its ops), and **efficiency = speedup ÷ FLOPs
  ratio**, where the speedup is taken against the uncached model on the same backend;
* peak memory of a sampling run (its own untimed run), the cache size, graph breaks and recompiles (from
  ``torch._dynamo``), the difference from the uncached samples, and the quality harness's numbers
  when the model is the trained digits model.

It prints a Markdown table, the per-step table and every target of the benchmark issue as
met/missed with its measured number, and writes ``bench.json``, ``bench.md`` and PNG plots into
``--out``. Peers (cache-dit, diffusers' cache hooks) run in the same process with ``--peers``.

Example::

    python -m cachecompile bench --model dit-s2 --steps 20 --schedule fora:3 --backend eager inductor --peers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import cachecompile as cc
from cachecompile.flops import flop_counter
from cachecompile.methods.dual import schedule_from_spec
from cachecompile.sampling import ddim_sample, first_call_kwargs

__all__ = [
    "BenchModel",
    "load_bench_model",
    "parse_schedule",
    "run_bench",
    "markdown_report",
    "check_targets",
    "bench_main",
    "flop_counter",
    "isolated_compile",
    "tie_block_embedders",
]


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    sample_size: int
    in_channels: int
    null_class: int
    num_classes: int
    trained: bool = False  # quality numbers (classifier accuracy, FID analogue) are meaningful


def _random_dit(name: str, *, tied_embedders: bool = False, **cfg: Any) -> BenchModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(norm_type="ada_norm_zero", **cfg).eval()
    if tied_embedders:
        tie_block_embedders(m)
    n = cfg["num_embeds_ada_norm"]
    return BenchModel(name, m, cfg["sample_size"], cfg["in_channels"], n, n)


def tie_block_embedders(model: torch.nn.Module) -> None:
    """Give every block's timestep/label embedder (``transformer_blocks.<i>.norm1.emb``) the
    values of block 0's, as a DiT checkpoint converted to diffusers' format has them: DiT has one
    ``t_embedder``/``y_embedder``, and the conversion copies it into every block. Separate
    tensors with equal values, not shared parameters."""
    blocks = model.transformer_blocks
    first = blocks[0].norm1.emb.state_dict()
    with torch.no_grad():
        for block in blocks[1:]:
            block.norm1.emb.load_state_dict(first)


def _digits() -> BenchModel:
    from cachecompile.models import DIGITS_CONFIG, digits_dit

    c = DIGITS_CONFIG
    return BenchModel("digits", digits_dit(), c.sample_size, c.in_channels, c.null_class, c.num_classes, trained=True)


_DIT_S2 = dict(
    num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
    sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
)

MODELS: dict[str, Callable[[], BenchModel]] = {
    "digits": _digits,
    # DiT-S/2: hidden 384, 12 layers, 6 heads, 32×32 latent, patch 2 (random weights: speed only),
    # one timestep/label embedder copied into every block as in converted DiT checkpoints;
    # dit-s2-untied keeps diffusers' random init (a distinct embedder per block, as a model
    # trained from scratch in diffusers' format has).
    "dit-s2": lambda: _random_dit("dit-s2", tied_embedders=True, **_DIT_S2),
    "dit-s2-untied": lambda: _random_dit("dit-s2-untied", **_DIT_S2),
    "tiny": lambda: _random_dit(
        "tiny", num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10,
    ),
}


def load_bench_model(name: str) -> BenchModel:
    """A model by name (``digits``, ``dit-s2``, ``dit-s2-untied``, ``tiny``) or a user's ``module:attr`` (a
    ``BenchModel``, a DiT-like module, or a function returning either)."""
    if name in MODELS:
        return MODELS[name]()
    if ":" in name:
        import importlib

        mod, attr = name.split(":", 1)
        obj = getattr(importlib.import_module(mod), attr)
        obj = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
        if isinstance(obj, BenchModel):
            return obj
        cfg = obj.config
        n = cfg.num_embeds_ada_norm
        return BenchModel(name, obj.eval(), cfg.sample_size, cfg.in_channels, n, n)
    raise SystemExit(f"unknown model {name!r}: use one of {sorted(MODELS)} or module:attr")


def default_model_name() -> str:
    """``digits`` when the trained weights ship (a source checkout may lack them), else ``tiny``."""
    try:
        from cachecompile.models.digits import DIT_WEIGHTS, WEIGHTS_DIR

        return "digits" if (Path(WEIGHTS_DIR) / DIT_WEIGHTS).exists() else "tiny"
    except Exception:  # the models package is optional in a trimmed install
        return "tiny"


def parse_schedule(spec: str, num_steps: int) -> cc.Schedule:
    """``none``, ``fora:3``, or a schedule file (``.json``) — other presets register here too."""
    if spec.endswith(".json"):
        s = cc.Schedule.load(spec)
        if s.num_steps != num_steps:
            raise SystemExit(f"schedule {spec} has {s.num_steps} steps but the bench runs --steps {num_steps}")
        return s
    name, _, arg = spec.partition(":")
    parsers = SCHEDULE_PARSERS
    if name not in parsers:
        raise SystemExit(f"unknown schedule {spec!r}: use {', '.join(sorted(parsers))} or a .json schedule file")
    return parsers[name](num_steps, arg)


SCHEDULE_PARSERS: dict[str, Callable[[int, str], cc.Schedule]] = {
    "fora": lambda n, arg: cc.Schedule.fora(n, int(arg or 3)),
    # toca:interval:fresh_ratio[:score], duca:interval:fresh_ratio[:score[:output|residual]]
    "toca": lambda n, arg: schedule_from_spec("toca", n, arg),
    "duca": lambda n, arg: schedule_from_spec("duca", n, arg),
}


# --------------------------------------------------------------------------- configurations


@dataclass
class Built:
    """A prepared configuration: ``fn`` is called like the transformer, one call per step."""

    fn: Callable[..., Any]
    step_graphs: int | None = None
    cache_bytes: Callable[[], int] | None = None
    info: Callable[[], dict] | None = None
    notes: list[str] = field(default_factory=list)
    step_kinds: list[str] | None = None  # a peer's own step labels, where its rule is fixed


@dataclass
class Config:
    """One row to measure. ``build`` is timed as preparation; ``flops_model`` builds the eager
    equivalent that FLOPs are counted on (configurations with one ``flops_key`` share a count)."""

    impl: str  # "uncached", "cachecompile", "hand-written", or a peer name
    schedule: str
    backend: str
    label: str
    build: Callable[[], Built]
    flops_key: str
    flops_model: Callable[[], Callable[..., Any]]
    baseline: str = "eager"  # the backend of the uncached row this one is compared with
    method: str = ""
    step_kinds: list[str] | None = None  # None: labelled from the per-step FLOPs
    mask: list[int] | None = None  # full steps (1) where the configuration has a fixed step mask
    unavailable: str = ""
    probe: Callable[[], str] | None = None  # extra verdict (export) added to the notes


@dataclass
class Row:
    impl: str
    schedule: str
    backend: str
    label: str
    status: str = "ok"  # ok | unsupported | failed
    reason: str = ""
    method: str = ""
    baseline_backend: str = "eager"
    seconds: float | None = None
    runs: list[float] = field(default_factory=list)
    first_run_seconds: float | None = None
    speedup: float | None = None  # vs the uncached model, eager
    speedup_same_backend: float | None = None  # vs the uncached model on baseline_backend
    flops: int | None = None
    flops_ratio: float | None = None
    efficiency: float | None = None  # speedup_same_backend / flops_ratio
    prepare_seconds: float | None = None
    compile_seconds: float | None = None
    step_graphs: int | None = None
    dynamo_graphs: int | None = None
    graph_breaks: int | None = None
    graph_break_reasons: list[str] = field(default_factory=list)
    recompiles: int | None = None
    peak_memory_mb: float | None = None
    cache_mb: float | None = None
    max_abs_diff: float | None = None
    rel_l1: float | None = None
    step_kinds: list[str] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    step_flops: list[int] = field(default_factory=list)
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    mask: list[int] | None = None
    quality: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- measuring


def isolated_compile(model: Any, **options: Any) -> Any:
    """``torch.compile`` with its own cache of compiled entries (``isolate_recompiles``, torch
    >= 2.10 or so): models compiled side by side in one process — all the bench's rows stay
    alive for the interleaved timed runs — do not count as each other's recompiles nor share
    one recompile limit."""
    import inspect

    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        options["isolate_recompiles"] = True
    return torch.compile(model, **options)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PerStep:
    """Wraps a transformer: times each call, or counts its FLOPs; ``model`` tells ddim_sample the device."""

    def __init__(self, fn: Callable[..., Any], model: torch.nn.Module, *, flops: bool = False) -> None:
        self.fn, self.model, self.count_flops = fn, model, flops
        self.values: list[float] = []

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.count_flops:
            with flop_counter() as counter:
                out = self.fn(*args, **kwargs)
            self.values.append(counter.get_total_flops())
            return out
        device = next(self.model.parameters()).device
        _sync(device)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        _sync(device)
        self.values.append(time.perf_counter() - t0)
        return out


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so a run's peak RSS shows what it allocates
    rather than what earlier runs left in the allocator's free lists."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory over a block, in MiB above what was in use when it began.

    CUDA: ``max_memory_allocated``. Linux: peak RSS after ``malloc_trim``, reset through
    ``/proc/self/clear_refs``. Elsewhere: the growth of the process's lifetime peak RSS
    (``ru_maxrss``), a lower bound. Trimming costs page faults: use it on an untimed run.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.mb, self.method = device, None, ""

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        try:
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._base = _proc_status_kb("VmRSS")
            self.method = "peak RSS (VmHWM) above the RSS before"
        except OSError:
            self._base = None
        if self._base is None:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "growth of the process peak RSS (ru_maxrss; a lower bound)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self.method.startswith("peak RSS"):
            self.mb = ((_proc_status_kb("VmHWM") or 0) - self._base) / 1024
        else:
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024


def _dynamo_snapshot() -> dict[str, Any]:
    from torch._dynamo.utils import counters, get_compilation_metrics

    return {
        "breaks": dict(counters["graph_break"]),
        "graphs": counters["stats"]["unique_graphs"],
        "metrics": len(get_compilation_metrics()),
    }


def _add_dynamo_delta(row: Row, before: dict[str, Any]) -> None:
    """Add the graph breaks (with reasons), recompiles and graphs compiled since ``before`` to ``row``."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    breaks = {k: v - before["breaks"].get(k, 0) for k, v in counters["graph_break"].items()}
    by_reason = dict(row.info.get("graph_breaks_by_reason", {}))
    for k, n in breaks.items():
        if n > 0:  # Dynamo's keys carry details after the first line
            first = k.splitlines()[0][:140] if k else "?"
            by_reason[first] = by_reason.get(first, 0) + n
    row.info["graph_breaks_by_reason"] = by_reason
    row.graph_breaks = sum(by_reason.values())
    row.graph_break_reasons = [f"{n}× {k}" for k, n in sorted(by_reason.items(), key=lambda kv: -kv[1])]
    new = get_compilation_metrics()[before["metrics"]:]
    row.recompiles = (row.recompiles or 0) + sum(1 for m in new if getattr(m, "recompile_reason", None))
    row.dynamo_graphs = (row.dynamo_graphs or 0) + counters["stats"]["unique_graphs"] - before["graphs"]


def _per_kind(kinds: list[str], seconds: list[float], flops: list[int]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for i, kind in enumerate(kinds):
        d = out.setdefault(kind, {"count": 0, "total_s": 0.0, "flops": 0})
        d["count"] += 1
        d["total_s"] += seconds[i] if i < len(seconds) else 0.0
        d["flops"] += flops[i] if i < len(flops) else 0
    for d in out.values():
        d["mean_ms"] = 1e3 * d["total_s"] / d["count"]
        d["mean_gflops"] = d["flops"] / d["count"] / 1e9
    return out


def _kinds_from_flops(step_flops: list[int], full_flops: float) -> list[str]:
    """Labels for peers that decide at run time: a step that did a full step's FLOPs was full."""
    return ["full" if f >= 0.99 * full_flops else "cached" for f in step_flops]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What every configuration shares: the model, the inputs, the uncached references."""

    bm: BenchModel
    steps: int
    batch: int
    guidance_scale: float
    repeats: int
    warmup: int
    progress: bool
    quality_samples: int
    device: torch.device
    labels: torch.Tensor = None  # type: ignore[assignment]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    reference: torch.Tensor | None = None
    quality_reference: torch.Tensor | None = None
    quality_labels: torch.Tensor | None = None
    flops_memo: dict[str, list[int]] = field(default_factory=dict)
    baselines: dict[str, Row] = field(default_factory=dict)
    compile_cache_root: str | None = None  # set: every configuration compiles with empty Inductor caches

    def sample_kwargs(self) -> dict[str, Any]:
        """ddim_sample's settings of this run (all but labels, seed and progress)."""
        return dict(num_steps=self.steps, guidance_scale=self.guidance_scale, null_class=self.bm.null_class,
                    sample_size=self.bm.sample_size, in_channels=self.bm.in_channels)

    def sample(self, fn: Any, progress: bool = False, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        return ddim_sample(fn, self.labels if labels is None else labels, seed=seed,
                           progress=progress and self.progress, **self.sample_kwargs())

    def timed(self, fn: Any, progress: bool = False) -> tuple[float, torch.Tensor]:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.sample(fn, progress)
        _sync(self.device)
        return time.perf_counter() - t0, out

    def quality_images(self, fn: Any) -> torch.Tensor:
        """``quality_samples`` images, in chunks of the bench batch (step graphs have static shapes)."""
        assert self.quality_labels is not None
        chunks = self.quality_labels.split(self.batch)
        return torch.cat([self.sample(fn, labels=c, seed=1000 + i) for i, c in enumerate(chunks)])


def _step_flops(run: _Run, cfg: Config, built: Built) -> list[int]:
    """FLOPs per step, counted on the eager equivalent: the row's own model when it is eager
    (every implementation here starts a new generation after ``steps`` calls)."""
    if cfg.flops_key not in run.flops_memo:
        with torch.no_grad():
            model = built.fn if cfg.backend == "eager" else cfg.flops_model()
            counter = _PerStep(model, run.bm.model, flops=True)
            run.sample(counter)
        run.flops_memo[cfg.flops_key] = [int(v) for v in counter.values]
    return run.flops_memo[cfg.flops_key]


def _prepare(run: _Run, cfg: Config) -> tuple[Row, Built | None, torch.Tensor | None]:
    """Everything but the timed runs: build (timed as preparation), first run, warm-up, the
    per-step run, quality, FLOPs. Returns the row, the built configuration (kept for the timed
    runs) and its samples; ``built`` is None when the configuration did not run."""
    row = Row(cfg.impl, cfg.schedule, cfg.backend, cfg.label, method=cfg.method, baseline_backend=cfg.baseline, mask=cfg.mask)
    if cfg.unavailable:
        row.status, row.reason = "unsupported", cfg.unavailable
        return row, None, None
    # Every torch.compile here is isolated (isolate_recompiles), so one configuration's compiles
    # never count as another's recompiles and all compiled models stay alive for the timed runs.
    snap = _dynamo_snapshot()
    try:
        with torch.no_grad(), _fresh_compile_cache(run.compile_cache_root):
            t0 = time.perf_counter()
            built = cfg.build()
            row.prepare_seconds = time.perf_counter() - t0
            row.first_run_seconds, out = run.timed(built.fn)
            for _ in range(run.warmup - 1):
                run.sample(built.fn)
            timer = _PerStep(built.fn, run.bm.model)
            run.sample(timer)
            with _PeakMemory(run.device) as mem:  # its own run: trimming the heap costs time
                run.sample(built.fn)
            row.peak_memory_mb, row.info["memory"] = mem.mb, mem.method
            if run.quality_samples and run.bm.trained:
                from cachecompile import quality as Q

                images = run.quality_images(built.fn)
                row.quality = Q.sample_metrics(images, run.quality_labels, reference=run.quality_reference)
        _add_dynamo_delta(row, snap)
        row.step_flops = _step_flops(run, cfg, built)
    except Exception as e:  # noqa: BLE001 - one configuration failing must not end the bench
        row.status, row.reason = "failed", _first_line(e)
        return row, None, None
    row.step_graphs = built.step_graphs
    row.cache_mb = built.cache_bytes() / 2**20 if built.cache_bytes else None
    row.notes = list(built.notes)
    row.step_kinds = list(built.step_kinds or [])
    if built.info is not None:
        row.info.update(built.info())
    row.flops = sum(row.step_flops)
    row.step_seconds = timer.values
    ref = run.reference if run.reference is not None else out
    row.max_abs_diff = (out - ref).abs().max().item()
    row.rel_l1 = ((out - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)).item()
    if cfg.probe is not None:
        try:
            row.notes.append(cfg.probe())
        except Exception as e:  # noqa: BLE001
            row.notes.append(f"export probe failed: {_first_line(e)}")
    return row, built, out


def _fresh_compile_cache(root: str | None) -> Any:
    """Empty Inductor caches (in memory and on disk) for one configuration, so its compile time
    is cold and owes nothing to kernels an earlier row or an earlier process compiled."""
    import contextlib

    if root is None:
        return contextlib.nullcontext()
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:  # private API; without it compile times may be warm
        return contextlib.nullcontext()
    return fresh_cache(dir=root, delete=False)


def _time_interleaved(run: _Run, prepared: list[tuple[Row, Built]], progress: bool) -> None:
    """The timed runs, round-robin over the configurations: on a machine whose speed drifts
    (other jobs, thermal limits) every configuration sees the same drift, so the ratios between
    rows stay fair. Fills ``runs``, ``seconds`` and ``compile_seconds``."""
    order = [(r, b) for _ in range(run.repeats) for r, b in prepared]
    bar = _progress(order, progress, "timed runs")
    for row, built in bar:
        if row.status != "ok":
            continue
        snap = _dynamo_snapshot()
        try:
            with torch.no_grad():
                row.runs.append(run.timed(built.fn)[0])
        except Exception as e:  # noqa: BLE001
            row.status, row.reason = "failed", f"in a timed run: {_first_line(e)}"
            continue
        _add_dynamo_delta(row, snap)
    for row, _ in prepared:
        if row.status == "ok":
            row.seconds = statistics.median(row.runs)
            row.info["min_seconds"] = min(row.runs)
            row.compile_seconds = row.prepare_seconds + max(0.0, row.first_run_seconds - row.seconds)


def _finish(run: _Run, row: Row, kinds: list[str] | None) -> None:
    """Ratios against the uncached rows, and step-kind labels."""
    if row.status != "ok":
        return
    base = run.baselines.get("eager")
    same = run.baselines.get(row.baseline_backend)
    if base is not None and base.seconds:
        row.speedup = base.seconds / row.seconds
        row.flops_ratio = base.flops / max(row.flops, 1)
    if same is not None and same.status == "ok" and same.seconds:
        row.speedup_same_backend = same.seconds / row.seconds
    if row.speedup_same_backend is not None and row.flops_ratio:
        row.efficiency = row.speedup_same_backend / row.flops_ratio
        if same is not None and len(same.runs) == len(row.runs) > 1:
            # the timed runs are interleaved: round i of both rows ran within one round robin
            per_round = [b / r / row.flops_ratio for b, r in zip(same.runs, row.runs)]
            row.info["efficiency_per_round"] = [min(per_round), max(per_round)]
    kinds = kinds or row.step_kinds or None
    if kinds is None:
        full = max(base.step_flops) if base is not None and base.step_flops else max(row.step_flops)
        kinds = _kinds_from_flops(row.step_flops, full)
    row.step_kinds = list(kinds)
    row.per_kind = _per_kind(row.step_kinds, row.step_seconds, row.step_flops)


def _load_handwritten():
    """``examples/handwritten_fora.py`` (in a source checkout), loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "handwritten_fora.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("cachecompile_examples_handwritten_fora", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _configs(
    run: _Run, schedules: list[tuple[str, cc.Schedule]], backends: list[str], peers: list[str], handwritten: bool
) -> list[Config]:
    bm, steps, ex = run.bm, run.steps, run.example_kwargs
    uncached_flops = lambda: bm.model  # noqa: E731
    full = ["full"] * steps
    configs = [Config("uncached", "none", "eager", "uncached model", lambda: Built(bm.model), "uncached", uncached_flops, step_kinds=full)]
    for backend in backends:
        if backend == "eager":
            continue
        if backend == "inductor":
            build = lambda: Built(isolated_compile(bm.model, fullgraph=True), notes=["torch.compile(model, fullgraph=True)"])  # noqa: E731
        else:
            build = _cc_builder(bm.model, cc.Schedule.fora(steps, 1), backend, ex, note="compute-all schedule through the same backend")
        configs.append(
            Config("uncached", "none", backend, f"uncached model, {backend}", build, "uncached", uncached_flops,
                   baseline=backend, step_kinds=full, unavailable=_backend_unavailable(backend))
        )
    for spec, schedule in schedules:
        kinds = schedule.step_kinds()
        mask = [1 if k == "full" else 0 for k in kinds]
        eager_cc = _cc_builder(bm.model, schedule, "eager", ex)
        for backend in backends:
            configs.append(
                Config("cachecompile", spec, backend, f"cachecompile {spec} {backend}",
                       eager_cc if backend == "eager" else _cc_builder(bm.model, schedule, backend, ex),
                       f"cc:{spec}", lambda b=eager_cc: b().fn, baseline=backend, method=schedule.method,
                       step_kinds=kinds, mask=mask, unavailable=_backend_unavailable(backend))
            )
    hw = _load_handwritten() if handwritten else None
    for spec, schedule in schedules:
        if not handwritten or schedule.method != "fora":
            continue
        make = lambda i=schedule.params["interval"]: hw.handwritten_fora(bm.model, steps, i)  # noqa: E731
        configs.append(
            Config("hand-written", spec, "eager", f"hand-written eager {spec}", lambda m=make: _handwritten_built(m()),
                   f"hw:{spec}", make, method="fora", step_kinds=schedule.step_kinds(),
                   unavailable="" if hw else "examples/handwritten_fora.py not found (it ships in the source checkout only)")
        )
    configs += _peer_configs(run, schedules, backends, peers)
    return configs


def _handwritten_built(model: Any) -> Built:
    return Built(model, cache_bytes=lambda: model.cache_bytes)


def _cc_builder(model: torch.nn.Module, schedule: cc.Schedule, backend: str, example: dict, note: str = "") -> Callable[[], Built]:
    def build() -> Built:
        cached = cc.optimize(model, schedule, backend)
        cached.prepare(**example)  # capture, rewrite, lower (compile) before the first run
        return Built(cached, len(cached.step_graphs), lambda: cached.cache_bytes, notes=[note] if note else [])

    return build


def _backend_unavailable(backend: str) -> str:
    if backend == "eager":
        return ""
    from cachecompile.backends import get_backend

    try:
        get_backend(backend)
    except ImportError as e:  # an optional dependency is missing: "tensorrt where it imports"
        return _first_line(e)
    return ""


def _peer_configs(run: _Run, schedules: list[tuple[str, cc.Schedule]], backends: list[str], peers: list[str]) -> list[Config]:
    from cachecompile import peers as P

    bm, steps = run.bm, run.steps
    compiled = "inductor" in backends
    calibrate = lambda peer: run.sample(peer)  # noqa: E731 - MagCache's calibration run
    variants: list[tuple[str, str, dict[str, Any], list[int] | None]] = []  # (peer, schedule label, kwargs, mask)
    for name in peers:
        spec = P.PEERS[name]
        if not spec.uses_interval:
            variants.append((name, "dynamic", {}, None))
            continue
        seen: set = set()
        for sched_spec, schedule in schedules:
            kinds = schedule.step_kinds()
            mask = [1 if k == "full" else 0 for k in kinds]
            interval = schedule.params.get("interval")
            key = tuple(mask) if name == "cache-dit-mask" else interval
            if key is None or key in seen:
                continue  # one row per distinct mask (cache-dit) or interval (TaylorSeer, PAB)
            seen.add(key)
            kw = {"mask": mask} if name == "cache-dit-mask" else {"interval": interval}
            variants.append((name, sched_spec, kw, mask if name == "cache-dit-mask" else None))
    configs = []
    for name, label, kw, mask in variants:
        make = lambda n=name, k=kw: P.build_peer(n, bm.model, num_steps=steps, calibrate=calibrate, **k)  # noqa: E731
        reason = ""
        try:
            P._version(P.PEERS[name].library)
        except P.PeerUnavailable as e:
            reason = str(e)
        flops_model = lambda m=make: m()  # noqa: E731
        for backend in ["eager"] + (["inductor"] if compiled else []):
            if backend == "eager":
                build = lambda m=make: _peer_built(m())  # noqa: E731
                probe = lambda m=make: P.probe_export(m(), dict(run.example_kwargs))  # noqa: E731
            else:
                build = lambda m=make: _peer_built(m().compile())  # noqa: E731
                probe = None
            configs.append(
                Config(name, label, backend, f"{name} {label} {'torch.compile' if backend != 'eager' else 'eager'}",
                       build, f"peer:{name}:{label}", flops_model, baseline=backend, mask=mask,
                       step_kinds=None, unavailable=reason, probe=probe)
            )
    return configs


def _peer_built(peer: Any) -> Built:
    return Built(peer, info=lambda: {"peer": peer.label, **peer.info()}, notes=list(peer.notes), step_kinds=peer.step_kinds)


def run_bench(
    model_name: str,
    schedules: list[str],
    backends: list[str],
    *,
    steps: int = 20,
    batch: int = 2,
    guidance_scale: float = 2.0,
    repeats: int = 3,
    warmup: int = 1,
    peers: list[str] | None = None,
    handwritten: bool = True,
    quality_samples: int | None = None,
    device: str | None = None,
    progress: bool = True,
    cold_compile: bool = True,
) -> dict[str, Any]:
    """Measure every configuration; returns the JSON-able result (see the module docstring).

    ``peers`` names peers from :data:`cachecompile.peers.PEERS` (compiled too when ``inductor``
    is among ``backends``); ``quality_samples`` defaults to 64 on the trained digits model, 0
    otherwise; ``cold_compile`` gives every configuration empty Inductor caches (a fresh cache
    directory, in-memory caches cleared, FX-graph and AOTAutograd caches off), so that compile
    times are cold and comparable between rows.
    """
    from cachecompile import peers as P

    if repeats < 1 or warmup < 1 or steps < 1 or batch < 1:
        raise SystemExit("--repeats, --warmup, --steps and --batch must be >= 1")
    parsed = []
    for spec in schedules:
        if spec == "none":
            continue
        try:
            parsed.append((spec, parse_schedule(spec, steps)))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"schedule {spec!r}: {e}") from e
    from cachecompile.backends import available_backends

    known = ["eager", *[b for b in available_backends() if b != "eager"]]
    for b in backends:
        if b not in known:
            raise SystemExit(f"unknown backend {b!r}: use {', '.join(known)}")
    peers = list(peers or [])
    for p in peers:
        if p not in P.PEERS:
            raise SystemExit(f"unknown peer {p!r}: use {', '.join(P.PEERS)}")
    cache_root = None
    if cold_compile:
        import tempfile

        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
        cache_root = tempfile.mkdtemp(prefix="cachecompile-bench-inductor-")
    from torch._dynamo.utils import set_compilation_metrics_limit

    set_compilation_metrics_limit(1_000_000)  # count every recompile, not the last 64

    bm = load_bench_model(model_name)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bm.model.to(dev)
    if quality_samples is None:
        quality_samples = 64 if bm.trained else 0
    run = _Run(bm, steps, batch, guidance_scale, repeats, warmup, progress, quality_samples, dev)
    run.labels = torch.arange(batch) % bm.num_classes
    run.compile_cache_root = cache_root
    # The exact arguments of ddim_sample's first call (shapes, dtypes and strides: its timestep
    # is an expanded, stride-0 tensor), for preparing (capturing, compiling) before the first run.
    run.example_kwargs = first_call_kwargs(run.bm.model, run.labels, **run.sample_kwargs())
    if quality_samples:
        n = math.ceil(quality_samples / batch) * batch
        run.quality_labels = torch.arange(n) % bm.num_classes
        with torch.no_grad():
            run.quality_reference = run.quality_images(bm.model)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    configs = _configs(run, parsed, backends, peers, handwritten)
    prepared: list[tuple[Row, Built | None]] = []
    bar = _progress(configs, progress, "preparing")
    for cfg in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(cfg.label[:48])
        row, built, out = _prepare(run, cfg)
        if cfg.impl == "uncached":
            run.baselines[cfg.backend] = row
            if cfg.backend == "eager":
                if out is None:
                    raise SystemExit(f"the uncached model failed to run: {row.reason}")
                run.reference = out  # every other row is compared with these samples
        prepared.append((row, built))
    _time_interleaved(run, prepared, progress)
    if cache_root is not None:
        import shutil

        shutil.rmtree(cache_root, ignore_errors=True)  # loaded kernels stay mapped
    rows = [row for row, _ in prepared]
    for cfg, row in zip(configs, rows):
        _finish(run, row, cfg.step_kinds)
    result = {
        "model": bm.name,
        "trained_model": bm.trained,
        "steps": steps,
        "batch": batch,
        "cfg_batch": 2 * batch,
        "guidance_scale": guidance_scale,
        "repeats": repeats,
        "warmup": warmup,
        "quality_samples": quality_samples,
        "schedules": [s for s, _ in parsed],
        "backends": backends,
        "peers": peers,
        "torch": torch.__version__,
        "device": str(dev),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "load_average": {"start": load_before, "end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "cold_compile": cold_compile,
        "rows": [asdict(r) for r in rows],
    }
    result["targets"] = check_targets(result)
    return result


def _progress(items: list, enabled: bool, desc: str = "configurations"):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


# --------------------------------------------------------------------------- targets


EFFICIENCY_TARGET = 0.95
COMPILE_TIME_FACTOR = 2.5


def _why_steps(row: dict, other: dict | None = None) -> str:
    """Where the time goes: per-kind step time against per-kind FLOPs (or against another row)."""
    pk = row.get("per_kind") or {}
    if other is not None:
        ok = other.get("per_kind") or {}
        parts = [
            f"{k}: {v['mean_ms']:.1f} vs {ok[k]['mean_ms']:.1f} ms"
            for k, v in pk.items() if k in ok
        ]
        return "per-step " + ", ".join(parts) if parts else ""
    full = pk.get("full")
    others = [(k, v) for k, v in pk.items() if k != "full"]
    if not full or not others or not full["mean_gflops"]:
        return ""
    return "; ".join(
        f"{k} steps take {_pct(v['mean_ms'] / full['mean_ms'])} of a full step's time for "
        f"{_pct(v['mean_gflops'] / full['mean_gflops'])} of its FLOPs ({v['mean_ms']:.1f} vs {full['mean_ms']:.1f} ms)"
        for k, v in others
    ) + " (per-step times from one untimed run): the difference is work that caching does not remove and per-op overhead"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x < 0.1 else f"{x:.0%}"


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the benchmark issue that this run can check, as met/missed with the number.

    ``met`` is ``None`` when the run lacks a row the target needs (the note says which).
    """
    rows = [r for r in result["rows"]]
    ok = lambda r: r["status"] == "ok"  # noqa: E731
    ours = [r for r in rows if r["impl"] == "cachecompile"]
    uncached = {r["backend"]: r for r in rows if r["impl"] == "uncached"}
    issue_setting = result["model"] in ("dit-s2", "dit-s2-untied") and result["steps"] == 20
    where = "" if issue_setting else " (the issue sets this target on dit-s2, 20 steps; this run differs)"
    out: list[dict[str, Any]] = []

    def add(target: str, config: str, met: bool | None, measured: str, note: str = "") -> None:
        out.append({"target": target, "config": config, "met": met, "measured": measured, "note": note})

    for r in ours:
        name = f"{r['schedule']} {r['backend']}"
        if r["backend"] != "eager":
            t = f"efficiency ≥ {EFFICIENCY_TARGET} × FLOPs ratio (compiled){where}"
            if not ok(r):
                add(t, name, None, r["status"], r["reason"])
            elif r["efficiency"] is None:
                add(t, name, None, "no uncached row on this backend", "")
            else:
                met = r["efficiency"] >= EFFICIENCY_TARGET
                spread = (r.get("info") or {}).get("efficiency_per_round")
                rounds = f"; per round {spread[0]:.2f}–{spread[1]:.2f}" if spread else ""
                add(t, name, met, f"{r['efficiency']:.2f} ({r['speedup_same_backend']:.2f}× vs uncached {r['backend']}, "
                    f"FLOPs ratio {r['flops_ratio']:.2f}×{rounds})", "" if met else _why_steps(r))
        if ok(r):
            met = r["graph_breaks"] == 0 and r["recompiles"] == 0
            add("zero graph breaks and zero recompiles", name, met,
                f"{r['graph_breaks']} graph breaks, {r['recompiles']} recompiles",
                "" if met else "; ".join(r["graph_break_reasons"][:3]))
        base = uncached.get(r["backend"])
        if r["backend"] != "eager" and ok(r):
            t = f"compile time ≤ {COMPILE_TIME_FACTOR} × the uncached model's"
            if base is None or not ok(base) or not base["compile_seconds"]:
                add(t, name, None, f"{r['compile_seconds']:.1f} s", "no uncached compiled row")
            else:
                factor = r["compile_seconds"] / base["compile_seconds"]
                met = factor <= COMPILE_TIME_FACTOR
                add(t, name, met, f"{factor:.2f}× ({r['compile_seconds']:.1f} s vs {base['compile_seconds']:.1f} s)",
                    "" if met else f"{r['step_graphs']} step graphs are compiled one by one; the uncached model is one graph")
    for hw in (r for r in rows if r["impl"] == "hand-written"):
        mine = next((r for r in ours if r["schedule"] == hw["schedule"] and r["backend"] == "eager"), None)
        t = "eager: no slower than a hand-written eager implementation"
        if mine is None or not ok(mine) or not ok(hw):
            add(t, f"{hw['schedule']} eager", None, "not measured", "needs both the eager cachecompile row and the hand-written row")
            continue
        ratio = hw["seconds"] / mine["seconds"]
        met = mine["seconds"] <= hw["seconds"]
        add(t, f"{hw['schedule']} eager", met, f"{ratio:.2f}× the hand-written speed ({mine['seconds']:.3f} s vs {hw['seconds']:.3f} s)",
            "" if met else _why_steps(mine, hw))
    for r in (r for r in ours if r.get("method") == "fora" and r["backend"] in ("eager", "inductor")):
        peer = next((p for p in rows if p["impl"] == "cache-dit-mask" and p["mask"] == r["mask"] and p["backend"] == r["backend"]), None)
        t = f"at the same compute mask, faster than cache-dit ({'eager' if r['backend'] == 'eager' else 'compiled'})"
        if peer is None:
            continue  # peers not requested: nothing to say
        if not ok(r) or not ok(peer):
            add(t, f"{r['schedule']} {r['backend']}", None, "not measured", peer["reason"] or r["reason"])
            continue
        met = r["seconds"] < peer["seconds"]
        add(t, f"{r['schedule']} {r['backend']}", met,
            f"{peer['seconds'] / r['seconds']:.2f}× cache-dit's speed ({r['seconds']:.3f} s vs {peer['seconds']:.3f} s)",
            "" if met else _why_steps(r, peer))
    return out


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str, missing: str = "—") -> str:
    return missing if v is None else format(v, fmt)


def _quality_cell(q: dict | None) -> str:
    if not q:
        return "—"
    return f"acc {q['accuracy']:.3f}, FID {q['fid']:.1f}, PSNR {q.get('psnr', float('nan')):.1f}"


def markdown_report(result: dict[str, Any]) -> str:
    """The main table, the per-step table, the targets, and what did not run."""
    la = result.get("load_average") or {}
    load = ""
    if la.get("start"):
        load = f", load average {la['start'][0]:.1f} → {la['end'][0]:.1f}"
    lines = [
        f"model `{result['model']}`, {result['steps']} DDIM steps, CFG batch {result['cfg_batch']}, "
        f"median of {result['repeats']} runs after {result['warmup']} warm-up, torch {result['torch']}, "
        f"{result['device']}, {result['machine']}{load}",
        "",
        "speedup: against the uncached model in eager mode; vs same backend: against the uncached model "
        "on the row's backend (torch.compile for inductor); efficiency = vs same backend ÷ FLOPs ratio "
        "(from the medians; the targets also give its range over the rounds of interleaved runs).",
        "",
        "| implementation | schedule | backend | time (s) | speedup | vs same backend | FLOPs ratio | efficiency "
        "| compile (s) | graphs | breaks / recompiles | peak MiB | cache MiB | max abs diff | rel-L1 | quality |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | {r['schedule']} | {r['backend']} | {r['status']} |" + " |" * 12)
            continue
        graphs = r["step_graphs"] if r["step_graphs"] is not None else r["dynamo_graphs"]
        lines.append(
            f"| {r['impl']} | {r['schedule']} | {r['backend']} | {r['seconds']:.3f} | {_f(r['speedup'], '.2f')}× "
            f"| {_f(r['speedup_same_backend'], '.2f')}× | {_f(r['flops_ratio'], '.2f')}× | {_f(r['efficiency'], '.2f')} "
            f"| {_f(r['compile_seconds'], '.1f')} | {graphs if graphs is not None else '—'} "
            f"| {r['graph_breaks']} / {r['recompiles']} | {_f(r['peak_memory_mb'], '.0f')} | {_f(r['cache_mb'], '.2f')} "
            f"| {r['max_abs_diff']:.1e} | {r['rel_l1']:.4f} | {_quality_cell(r['quality'])} |"
        )
    lines += ["", "Per-step time by step kind (mean ms, number of steps; one untimed run with a timer around each call):", "",
              "| implementation | schedule | backend | per step |", "|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] == "ok":
            cells = " · ".join(f"{k} {v['mean_ms']:.1f} ({v['count']})" for k, v in r["per_kind"].items())
            lines.append(f"| {r['impl']} | {r['schedule']} | {r['backend']} | {cells} |")
    lines += ["", "Targets:", ""]
    for t in result.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        note = f" — {t['note']}" if t["note"] else ""
        lines.append(f"- **{mark}** {t['target']}: {t['config']}: {t['measured']}{note}")
    skipped = [r for r in result["rows"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {r['impl']} {r['schedule']} {r['backend']}: {r['status']}: {r['reason']}" for r in skipped]
    peers = [r for r in result["rows"] if r["impl"] not in ("uncached", "cachecompile", "hand-written") and r["status"] == "ok"]
    if peers:
        lines += ["", "Peers: what they could not do, and their graph breaks under torch.compile:", ""]
        seen: set = set()
        for r in peers:
            for n in r["notes"]:
                if (r["impl"], n) not in seen:
                    seen.add((r["impl"], n))
                    lines.append(f"- {r['impl']}: {n}")
            if r["backend"] != "eager":
                why = "; ".join(r["graph_break_reasons"][:2])
                lines.append(f"- {r['impl']} {r['schedule']} torch.compile: {r['graph_breaks']} graph breaks, "
                             f"{r['recompiles']} recompiles, {r['dynamo_graphs']} graphs" + (f" ({why})" if why else ""))
    return "\n".join(lines)


# kept for callers of the first version of the bench
markdown_table = markdown_report


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="digits (default when its weights ship), dit-s2, dit-s2-untied, tiny, or module:attr")
    p.add_argument("--schedule", nargs="+", default=None,
                   help="presets (fora:3 ...) or .json files (default: fora:2 fora:3; with --quality: every preset)")
    p.add_argument("--quality", action="store_true",
                   help="the quality report on the trained digits model: every preset vs uncached (cachecompile.quality_report)")
    p.add_argument("--backend", nargs="+", default=["eager"], help="eager, inductor, aoti, onnxruntime, tensorrt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2, help="images per run (the CFG batch is twice this)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--peers", nargs="*", default=None, metavar="PEER",
                   help="run peers too: all installed when given without names; names: cache-dit, cache-dit-mask, "
                        "fbc, taylorseer, magcache, pab (compiled too when --backend has inductor)")
    p.add_argument("--no-handwritten", action="store_true", help="skip the hand-written eager FORA rows")
    p.add_argument("--quality-samples", type=int, default=None,
                   help="images per configuration for the quality numbers (default 64 on the trained digits model, else 0)")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is steadier on a machine shared with other jobs")
    p.add_argument("--warm-compile-cache", action="store_true", help="let Inductor reuse its on-disk caches (compile times are then warm)")
    p.add_argument("--out", default="bench-out", help="directory for bench.json, bench.md and the plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def bench_main(args: argparse.Namespace) -> int:
    from cachecompile import peers as P

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.quality:
        from cachecompile.quality_report import quality_main

        return quality_main(args)
    args.schedule = args.schedule or ["fora:2", "fora:3"]

    model = args.model or default_model_name()
    peers = None if args.peers is None else (args.peers or P.peer_names())
    result = run_bench(
        model, args.schedule, args.backend, steps=args.steps, batch=args.batch, guidance_scale=args.cfg,
        repeats=args.repeats, warmup=args.warmup, peers=peers, handwritten=not args.no_handwritten,
        quality_samples=args.quality_samples, device=args.device, progress=not args.no_progress,
        cold_compile=not args.warm_compile_cache,
    )
    report = markdown_report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    if not args.no_plots:
        from cachecompile.plots import write_plots

        written += write_plots(result, out)
    print(report)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(report + "\n")
    print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
