"""The main job: a whole DDIM sampling run, uncached vs cached, eager vs compiled.

``python -m cachecompile bench`` prints a Markdown table (wall time, speedup, FLOPs ratio,
efficiency = speedup ÷ FLOPs ratio, difference from the uncached samples) and writes JSON.
Ratios are measured in one run, against the uncached run of the same process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample

__all__ = ["BenchModel", "load_bench_model", "parse_schedule", "run_bench", "main"]


@dataclass
class BenchModel:
    name: str
    model: torch.nn.Module
    sample_size: int
    in_channels: int
    null_class: int
    num_classes: int


def _random_dit(name: str, **cfg: Any) -> BenchModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(norm_type="ada_norm_zero", **cfg).eval()
    n = cfg["num_embeds_ada_norm"]
    return BenchModel(name, m, cfg["sample_size"], cfg["in_channels"], n, n)


def _digits() -> BenchModel:
    from cachecompile.models import DIGITS_CONFIG, digits_dit

    m = digits_dit()
    c = DIGITS_CONFIG
    return BenchModel("digits", m, c["sample_size"], c["in_channels"], c["null_class"], c["num_classes"])


MODELS: dict[str, Callable[[], BenchModel]] = {
    "digits": _digits,
    # DiT-S/2 shape: hidden 384, 12 layers, 6 heads, 32×32 latent, patch 2 (random weights: speed only)
    "dit-s2": lambda: _random_dit(
        "dit-s2", num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
    ),
    "tiny": lambda: _random_dit(
        "tiny", num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10,
    ),
}


def load_bench_model(name: str) -> BenchModel:
    """A model by name (``digits``, ``dit-s2``, ``tiny``) or a user's ``module:attr`` (a
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
    try:
        from cachecompile.models import digits_dit  # noqa: F401

        return "digits"
    except Exception:  # the shipped weights are optional in a source checkout
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
}


@dataclass
class Row:
    schedule: str
    backend: str
    seconds: float
    speedup: float = 1.0
    flops_ratio: float = 1.0
    efficiency: float = 1.0
    max_abs_diff: float = 0.0
    rel_l1: float = 0.0
    step_graphs: int = 0
    cache_mb: float = 0.0
    prepare_seconds: float = 0.0
    runs: list[float] = field(default_factory=list)


def _sample(model: Any, bm: BenchModel, labels: torch.Tensor, steps: int, cfg: float, progress: bool) -> torch.Tensor:
    return ddim_sample(
        model, labels, num_steps=steps, guidance_scale=cfg, null_class=bm.null_class,
        sample_size=bm.sample_size, in_channels=bm.in_channels, seed=0, progress=progress,
    )


def _flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _time(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_bench(
    model_name: str,
    schedules: list[str],
    backends: list[str],
    *,
    steps: int = 20,
    batch: int = 2,
    guidance_scale: float = 2.0,
    repeats: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    bm = load_bench_model(model_name)
    labels = torch.arange(batch) % bm.num_classes
    run = lambda m, prog=False: _sample(m, bm, labels, steps, guidance_scale, prog)  # noqa: E731

    with torch.no_grad():
        run(bm.model)  # warm-up
        base_times = _time(lambda: run(bm.model, progress), repeats)
        reference = run(bm.model)
        base_flops = _flops(lambda: run(bm.model))
    base = statistics.median(base_times)
    rows = [Row("none", "eager", base, runs=base_times)]
    configs = [(s, b) for s in schedules if s != "none" for b in backends]
    bar = _progress(configs, progress)
    for spec, backend in bar:
        schedule = parse_schedule(spec, steps)
        cached = cc.optimize(bm.model, schedule, backend)
        t0 = time.perf_counter()
        out = run(cached)  # captures, rewrites, lowers (compiles) and warms up
        prepare = time.perf_counter() - t0
        times = _time(lambda: run(cached, progress), repeats)
        flops = _flops(lambda: run(cached)) if backend == "eager" else _flops(lambda: run(cc.optimize(bm.model, schedule)))
        sec = statistics.median(times)
        speedup = base / sec
        ratio = base_flops / max(flops, 1)
        rows.append(
            Row(
                spec, backend, sec, speedup, ratio, speedup / ratio,
                (out - reference).abs().max().item(),
                ((out - reference).abs().mean() / reference.abs().mean()).item(),
                len(cached.step_graphs), cached.cache_bytes / 2**20, prepare, times,
            )
        )
    return {
        "model": bm.name,
        "steps": steps,
        "batch": batch,
        "cfg_batch": 2 * batch,
        "guidance_scale": guidance_scale,
        "repeats": repeats,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "rows": [asdict(r) for r in rows],
    }


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="configurations")


def markdown_table(result: dict[str, Any]) -> str:
    head = (
        f"model `{result['model']}`, {result['steps']} DDIM steps, CFG batch {result['cfg_batch']}, "
        f"median of {result['repeats']} runs, torch {result['torch']}, {result['machine']}\n\n"
        "| schedule | backend | time (s) | speedup | FLOPs ratio | efficiency | max abs diff | rel-L1 | graphs | cache MiB | prepare (s) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['schedule']} | {r['backend']} | {r['seconds']:.3f} | {r['speedup']:.2f}× | {r['flops_ratio']:.2f}× | "
        f"{r['efficiency']:.2f} | {r['max_abs_diff']:.2e} | {r['rel_l1']:.4f} | {r['step_graphs']} | "
        f"{r['cache_mb']:.2f} | {r['prepare_seconds']:.1f} |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="digits (default when shipped), dit-s2, tiny, or module:attr")
    p.add_argument("--schedule", nargs="+", default=["fora:2", "fora:3"], help="presets (fora:3 ...) or .json files")
    p.add_argument("--backend", nargs="+", default=["eager"], help="eager, inductor, aoti, onnxruntime, tensorrt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2, help="images per run (the CFG batch is twice this)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-out", help="directory for bench.json")
    p.add_argument("--no-progress", action="store_true")


def bench_main(args: argparse.Namespace) -> int:
    model = args.model or default_model_name()
    result = run_bench(
        model, args.schedule, args.backend, steps=args.steps, batch=args.batch,
        guidance_scale=args.cfg, repeats=args.repeats, progress=not args.no_progress,
    )
    table = markdown_table(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(table + "\n")
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)
    return 0
