"""The main job: whole DDIM sampling runs — uncached vs cached, eager vs compiled, against the
FLOPs limit and against the peers.

``python -m cachecompile bench`` measures, per configuration (implementation × schedule × backend):

* the wall time of a whole sampling run: the median of ``--repeats`` runs after ``--warmup`` runs,
  the timed runs interleaved round-robin over all configurations (which all stay alive), so that
  a drift in the machine's speed — other jobs, thermal limits — hits every row alike;
* the per-step time by step kind (``schedule.step_kinds()``), from instrumented runs with a timer
  around each transformer call, one right after each timed run of the same configuration (so
  the timed runs carry no per-call instrumentation, and both see the same machine); the figures
  are those of the instrumented run with the median time. What it spends outside the transformer
  calls (noise, CFG combine, the scheduler) is reported beside them: calls + the rest = that
  run's time, to be read against the timed runs' median;
* the compile time: preparation (capture, rewrite, lowering; a peer's calibration) plus what the
  first run costs beyond a steady-state run (``torch.compile`` compiles lazily);
* the FLOPs ratio (uncached ÷ this configuration) from ``torch.utils.flop_counter``, counted per
  step on the eager equivalent (compiled code hides its ops), and **efficiency = speedup ÷ FLOPs
  ratio**, where the speedup is taken against the uncached model on the same backend;
* for the compiled rows, more timed rounds without instrumented runs with ``--efficiency-rounds``
  (the per-round efficiency, its median and 95 % interval), and the memory traffic caching adds
  (cache writes and reads, the weights a step reads beyond its FLOPs share: one recorded run)
  with the efficiency bound it sets at the measured read bandwidth (:mod:`cachecompile.tools.traffic`);
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

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import cachecompile as cc
from cachecompile.backends import available_backends, get_backend
from cachecompile.sampling import ddim_sample, first_call_kwargs
from cachecompile.tools import peers as P
from cachecompile.tools.measure import (
    PeakMemory, PerStep, add_dynamo_delta, dynamo_snapshot, first_line, fresh_compile_cache, isolated_compile,
    kinds_from_flops, per_kind, sync,
)
from cachecompile.tools.bench.report import check_targets
from cachecompile.tools.specs import parse_schedule
from cachecompile.tools.traffic import read_bandwidth, record_traffic, traffic_bound
from cachecompile.tools.zoo import BenchModel, load_bench_model

__all__ = ["Built", "Config", "Row", "run_bench"]


@dataclass
class Built:
    """A prepared configuration: ``fn`` is called like the transformer, one call per step."""

    fn: Callable[..., Any]
    step_graphs: int | None = None
    cache_bytes: Callable[[], int] | None = None
    predicted_cache_bytes: int | None = None  # cc.cache_bytes before the build (cachecompile rows)
    untimed_seconds: float = 0.0  # of the build, spent on what is not preparation (the prediction)
    info: Callable[[], dict] | None = None
    notes: list[str] = field(default_factory=list)
    step_kinds: list[str] | None = None  # a peer's own step labels, where its rule is fixed
    traffic: Callable[[Callable[[Any], Any]], list[dict]] | None = None  # cache/weight bytes per call of a generation


STATIC_BATCH = "cachecompile-static-batch"  # the implementation name of --static-batch rows


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
    cache_predicted_mb: float | None = None  # cc.cache_bytes, predicted before anything ran
    max_abs_diff: float | None = None
    rel_l1: float | None = None
    step_kinds: list[str] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # per step, from the median instrumented run
    step_runs: list[list[float]] = field(default_factory=list)  # per instrumented run: each call's seconds
    instrumented_runs: list[float] = field(default_factory=list)  # wall time of each instrumented run
    calls_seconds: float | None = None  # sum of step_seconds
    outside_seconds: float | None = None  # the median instrumented run's time outside the calls
    instrumented_seconds: float | None = None  # the median instrumented run's time
    step_flops: list[int] = field(default_factory=list)
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    mask: list[int] | None = None
    quality: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


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
    efficiency_rounds: int = 0  # extra timed rounds of the compiled rows only (no instrumented runs)
    bandwidth: float | None = None  # read bandwidth (bytes/s), measured after the timed runs when a row needs it

    def sample_kwargs(self) -> dict[str, Any]:
        """ddim_sample's settings of this run (all but labels, seed and progress)."""
        return dict(num_steps=self.steps, guidance_scale=self.guidance_scale, null_class=self.bm.null_class,
                    sample_size=self.bm.sample_size, in_channels=self.bm.in_channels)

    def sample(self, fn: Any, progress: bool = False, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        return ddim_sample(fn, self.labels if labels is None else labels, seed=seed,
                           progress=progress and self.progress, **self.sample_kwargs())

    def timed(self, fn: Any, progress: bool = False) -> tuple[float, torch.Tensor]:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.sample(fn, progress)
        sync(self.device)
        return time.perf_counter() - t0, out

    def per_step(self, fn: Any) -> tuple[float, list[float]]:
        """An instrumented run: its wall time and the seconds of each transformer call."""
        timer = PerStep(fn, self.bm.model)
        seconds, _ = self.timed(timer)
        return seconds, timer.values

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
            counter = PerStep(model, run.bm.model, flops=True)
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
    snap = dynamo_snapshot()
    try:
        with torch.no_grad(), fresh_compile_cache(run.compile_cache_root):
            t0 = time.perf_counter()
            built = cfg.build()
            row.prepare_seconds = time.perf_counter() - t0 - built.untimed_seconds
            row.first_run_seconds, out = run.timed(built.fn)
            for _ in range(run.warmup - 1):
                run.sample(built.fn)
            with PeakMemory(run.device) as mem:  # its own run: the memory measure slows it down
                run.sample(built.fn)
            row.peak_memory_mb, row.info["memory"] = mem.mb, mem.method
            if cfg.backend == "onnxruntime" and mem.torch_allocations_only:
                # its session allocates activations and outputs in its own arena: torch sees none of it
                row.peak_memory_mb, row.info["memory"] = None, "not measured: ONNX Runtime allocates outside torch's allocator"
            if built.info is not None:  # what the last run did (decisions): a run of the bench's inputs, not quality's
                row.info.update(built.info())
            if built.traffic is not None and cfg.backend != "eager":  # the bytes behind the efficiency bound
                try:
                    row.info["traffic_calls"] = built.traffic(run.sample)
                except Exception as e:  # noqa: BLE001 - an analysis, not the row's run
                    row.notes.append(f"memory traffic not counted: {first_line(e)}")
            if run.quality_samples and run.bm.trained:
                from cachecompile.tools import quality as Q

                images = run.quality_images(built.fn)
                row.quality = Q.sample_metrics(images, run.quality_labels, reference=run.quality_reference)
        add_dynamo_delta(row, snap)
        row.step_flops = _step_flops(run, cfg, built)
    except Exception as e:  # noqa: BLE001 - one configuration failing must not end the bench
        row.status, row.reason = "failed", first_line(e)
        return row, None, None
    row.step_graphs = built.step_graphs
    row.cache_mb = built.cache_bytes() / 2**20 if built.cache_bytes else None
    if built.predicted_cache_bytes is not None:
        row.cache_predicted_mb = built.predicted_cache_bytes / 2**20
        row.info["cache_bytes"] = {"predicted": built.predicted_cache_bytes, "allocated": built.cache_bytes()}
    row.notes = list(built.notes)
    row.step_kinds = list(built.step_kinds or [])
    row.flops = sum(row.step_flops)
    ref = run.reference if run.reference is not None else out
    row.max_abs_diff = (out - ref).abs().max().item()
    row.rel_l1 = ((out - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)).item()
    if cfg.probe is not None:
        try:
            row.notes.append(cfg.probe())
        except Exception as e:  # noqa: BLE001
            row.notes.append(f"export probe failed: {first_line(e)}")
    return row, built, out


def _time_interleaved(run: _Run, prepared: list[tuple[Row, Built]], progress: bool) -> None:
    """The timed runs, round-robin over the configurations: on a machine whose speed drifts
    (other jobs, thermal limits) every configuration sees the same drift, so the ratios between
    rows stay fair. Each timed run is followed by an instrumented run of the same configuration
    (a timer around each call), so the per-step figures come from the same rounds, under the same
    load, as the totals. Then ``run.efficiency_rounds`` more rounds over the compiled rows only
    (cached and uncached alike, so that every round still pairs each cached row with its uncached
    row) and without instrumented runs: the per-round efficiency needs many rounds to be resolved
    to ±0.01, which the eager rows and the per-step runs would make several times longer; their
    runs join the rows' timed runs (the eager rows keep ``repeats``). Fills ``runs``,
    ``seconds``, ``compile_seconds`` and the per-step fields."""
    _rounds(run, prepared, run.repeats, progress, "timed runs", instrumented=True)
    compiled = [(r, b) for r, b in prepared if r.backend != "eager"]
    _rounds(run, compiled, run.efficiency_rounds, progress, "efficiency rounds", instrumented=False)
    for row, _ in prepared:
        if row.status == "ok":
            row.seconds = statistics.median(row.runs)
            row.info["min_seconds"] = min(row.runs)
            row.compile_seconds = row.prepare_seconds + max(0.0, row.first_run_seconds - row.seconds)
            _per_step_summary(row)


def _rounds(
    run: _Run, rows: list[tuple[Row, Built]], rounds: int, progress: bool, desc: str, *, instrumented: bool,
) -> None:
    """``rounds`` timed runs of each row that is ok, round-robin; with ``instrumented``, each
    followed by an instrumented run of the same row."""
    order = [(r, b) for _ in range(rounds) for r, b in rows]
    for row, built in _progress(order, progress and bool(order), desc):
        if row.status != "ok":
            continue
        snap = dynamo_snapshot()
        try:
            with torch.no_grad():
                row.runs.append(run.timed(built.fn)[0])
                if instrumented:
                    seconds, calls = run.per_step(built.fn)
                    row.instrumented_runs.append(seconds)
                    row.step_runs.append(calls)
        except Exception as e:  # noqa: BLE001
            row.status, row.reason = "failed", f"in a timed run: {first_line(e)}"
            continue
        add_dynamo_delta(row, snap)


def _per_step_summary(row: Row) -> None:
    """The per-step figures of the instrumented run with the median run time (the upper one of
    two), so that they add up: its calls + the rest of it = its run time. (Medians taken per
    step do not add up: each may come from another run.)"""
    runs = row.instrumented_runs
    median = sorted(range(len(runs)), key=runs.__getitem__)[len(runs) // 2]
    row.step_seconds = list(row.step_runs[median])
    row.calls_seconds = sum(row.step_seconds)
    row.instrumented_seconds = runs[median]
    row.outside_seconds = row.instrumented_seconds - row.calls_seconds


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
            row.info["efficiency_rounds"] = per_round
            if len(per_round) >= 3:  # the median round and its 95 % bootstrap interval
                from cachecompile.tools.stats import bootstrap_interval

                row.info["efficiency_median_round"] = statistics.median(per_round)
                row.info["efficiency_interval"] = list(bootstrap_interval(np.asarray(per_round), np.median))
    calls = row.info.pop("traffic_calls", None)
    if calls is not None and same is not None and same.status == "ok" and same.seconds and row.flops_ratio:
        if len(calls) != len(row.step_flops):  # more than one call per step: FLOPs are counted per step
            row.notes.append(f"memory traffic not bounded: {len(calls)} calls for {len(row.step_flops)} steps")
        else:
            if run.bandwidth is None:
                run.bandwidth = read_bandwidth(run.device)
            full = max(same.step_flops)
            row.info["traffic"] = traffic_bound(calls, row.step_flops, full, same.seconds, row.flops_ratio, run.bandwidth)
    kinds = kinds or row.step_kinds or row.info.get("decisions") or None
    if kinds is None:
        full = max(base.step_flops) if base is not None and base.step_flops else max(row.step_flops)
        kinds = kinds_from_flops(row.step_flops, full)
    row.step_kinds = list(kinds)
    row.per_kind = per_kind(row.step_kinds, row.step_seconds, row.step_flops)


def _load_handwritten():
    """``examples/handwritten_fora.py`` (in a source checkout), loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[3] / "examples" / "handwritten_fora.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("cachecompile_examples_handwritten_fora", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _configs(
    run: _Run, schedules: list[tuple[str, cc.Schedule]], backends: list[str], peers: list[str], handwritten: bool,
    static_batch: bool = False,
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
        if "dynamic" in kinds:  # decided in the graph: labelled from cached.decisions after a run
            kinds, mask = None, None
        eager_cc = _cc_builder(bm.model, schedule, "eager", ex)
        for backend in backends:
            configs.append(
                Config("cachecompile", spec, backend, f"cachecompile {spec} {backend}",
                       eager_cc if backend == "eager" else _cc_builder(bm.model, schedule, backend, ex),
                       f"cc:{spec}", lambda b=eager_cc: b().fn, baseline=backend, method=schedule.method,
                       step_kinds=kinds, mask=mask, unavailable=_backend_unavailable(backend))
            )
            if static_batch and backend != "eager":
                configs.append(
                    Config(STATIC_BATCH, spec, backend, f"cachecompile {spec} {backend}, static batch",
                           _cc_builder(bm.model, schedule, backend, ex, dynamic_batch=False),
                           f"cc:{spec}", lambda b=eager_cc: b().fn, baseline=backend, method=schedule.method,
                           step_kinds=kinds, mask=mask, unavailable=_backend_unavailable(backend))
                )
    hw = _load_handwritten() if handwritten else None
    for spec, schedule in schedules:
        if not handwritten or schedule.method != "fora" or schedule.cache_dtype is not None:
            continue
        make = lambda i=schedule.params["interval"]: hw.handwritten_fora(bm.model, steps, i)  # noqa: E731
        configs.append(
            Config("hand-written", spec, "eager", f"hand-written eager {spec}", lambda m=make: _handwritten_built(m()),
                   f"hw:{spec}", make, method="fora", step_kinds=schedule.step_kinds(),
                   unavailable="" if hw else "examples/handwritten_fora.py not found (it ships in the source checkout only)")
        )
    # the hand-written FORA and the peers keep their cache in the model's dtype: they pair with
    # our schedules that do too
    configs += _peer_configs(run, [(spec, s) for spec, s in schedules if s.cache_dtype is None], backends, peers)
    return configs


def _handwritten_built(model: Any) -> Built:
    return Built(model, cache_bytes=lambda: model.cache_bytes)


def _cc_builder(
    model: torch.nn.Module, schedule: cc.Schedule, backend: str, example: dict, note: str = "", dynamic_batch: bool = True,
) -> Callable[[], Built]:
    dynamic = "dynamic" in schedule.step_kinds()

    def build() -> Built:
        # the footprint known before anything is captured for running (checked against the store's)
        t0 = time.perf_counter()
        predicted = cc.cache_bytes(model, schedule, example, dynamic_batch=dynamic_batch)
        predict_seconds = time.perf_counter() - t0
        cached = cc.optimize(model, schedule, backend, dynamic_batch=dynamic_batch)
        cached.prepare(**example)  # capture, rewrite, lower (compile) before the first run
        info = (lambda: {"decisions": cached.decisions}) if dynamic else None  # read once, after a run
        return Built(cached, len(cached.step_graphs), lambda: cached.cache_bytes, predicted_cache_bytes=predicted,
                     untimed_seconds=predict_seconds, notes=[note] if note else [], info=info,
                     traffic=lambda generate: record_traffic(cached, generate))

    return build


def _backend_unavailable(backend: str) -> str:
    if backend == "eager":
        return ""
    try:
        get_backend(backend)
    except ImportError as e:  # an optional dependency is missing: "tensorrt where it imports"
        return first_line(e)
    return ""


def _peer_configs(run: _Run, schedules: list[tuple[str, cc.Schedule]], backends: list[str], peers: list[str]) -> list[Config]:
    bm, steps = run.bm, run.steps
    compiled = "inductor" in backends
    calibrate = lambda peer: run.sample(peer)  # noqa: E731 - MagCache's calibration run
    variants: list[tuple[str, str, dict[str, Any], list[int] | None]] = []  # (peer, schedule label, kwargs, mask)
    for name in peers:
        spec = P.PEERS[name]
        if not spec.uses_interval:
            # a dynamic peer runs each of our dynamic schedules it implements, with its settings
            matched = [(sched_spec, s) for sched_spec, s in schedules if P.matches_schedule(name, s)]
            for sched_spec, s in matched:
                variants.append((name, sched_spec, {"settings": dict(s.params)}, None))
            if not matched:
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
    static_batch: bool = False,
    efficiency_rounds: int = 0,
) -> dict[str, Any]:
    """Measure every configuration; returns the JSON-able result (see the module docstring).

    ``peers`` names peers from :data:`cachecompile.peers.PEERS` (compiled too when ``inductor``
    is among ``backends``); ``quality_samples`` defaults to 64 on the trained digits model, 0
    otherwise; ``cold_compile`` gives every configuration empty Inductor caches (a fresh cache
    directory, in-memory caches cleared, FX-graph and AOTAutograd caches off), so that compile
    times are cold and comparable between rows. ``static_batch`` adds, per compiled backend and
    schedule, a row whose step graphs fix the batch (``dynamic_batch=False``): what the dynamic
    batch dimension costs, measured in the same interleaved run.
    """
    if repeats < 1 or warmup < 1 or steps < 1 or batch < 1:
        raise SystemExit("--repeats, --warmup, --steps and --batch must be >= 1")
    if efficiency_rounds < 0:
        raise SystemExit("--efficiency-rounds must be >= 0")
    parsed = []
    for spec in schedules:
        if spec == "none":
            continue
        try:
            parsed.append((spec, parse_schedule(spec, steps)))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"schedule {spec!r}: {e}") from e
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
    run.efficiency_rounds = efficiency_rounds
    parsed = [(spec, _calibrated(run, schedule)) for spec, schedule in parsed]
    # The exact arguments of ddim_sample's first call (shapes, dtypes and strides: its timestep
    # is an expanded, stride-0 tensor), for preparing (capturing, compiling) before the first run.
    run.example_kwargs = first_call_kwargs(run.bm.model, run.labels, **run.sample_kwargs())
    if quality_samples:
        n = math.ceil(quality_samples / batch) * batch
        run.quality_labels = torch.arange(n) % bm.num_classes
        with torch.no_grad():
            run.quality_reference = run.quality_images(bm.model)
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    configs = _configs(run, parsed, backends, peers, handwritten, static_batch)
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
        "efficiency_rounds": efficiency_rounds,
        "warmup": warmup,
        "quality_samples": quality_samples,
        "schedules": [s for s, _ in parsed],
        "backends": backends,
        "peers": peers,
        "torch": torch.__version__,
        "device": str(dev),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": {"start": load_before, "end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "cold_compile": cold_compile,
        "rows": [asdict(r) for r in rows],
    }
    result["targets"] = check_targets(result)
    return result


def _calibrated(run: _Run, schedule: cc.Schedule) -> cc.Schedule:
    """A TeaCache or MagCache schedule without its numbers, calibrated on this model by one
    uncached sampling run of the bench's own inputs (as the MagCache peer is)."""
    missing = {"teacache": "coefficients", "magcache": "ratios"}.get(schedule.method)
    if missing is None or schedule.params[missing] is not None:
        return schedule
    with torch.no_grad():
        return cc.calibrate(run.bm.model, schedule, lambda model, i: run.sample(model), num_samples=1)


def _progress(items: list, enabled: bool, desc: str = "configurations"):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


