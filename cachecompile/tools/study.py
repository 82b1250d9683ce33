"""The quality study: every method family swept over its knobs on the digits DiT, the same
labels and noise for all, then fidelity and distribution metrics with bootstrap intervals,
Pareto fronts against the exact FLOPs ratio, the best fidelity at 2×–5× and the seed claims.

Two stages, so a long sampling run can be resumed and analysed while it goes::

    python -m cachecompile.tools.study run --out bench-out/study/ddim-50 --samples 500 --steps 50 --threads 1
    python -m cachecompile.tools.study time --out bench-out/study/ddim-50 --samples 10 --rounds 3
    python -m cachecompile.tools.study analyze --runs bench-out/study/ddim-50 --out docs/quality

``run`` generates, per spec (:mod:`cachecompile.tools.specs`, calibrated by
:mod:`cachecompile.tools.candidates`; ``label=path.json`` runs a saved schedule under a label),
``samples`` images with
labels ``i % 10`` from the noise of seeds ``seed + chunk`` (chunks of 100), saves them with the
schedule file, its exact FLOPs ratio and the wall time; a spec already done is skipped.
Calibrated settings are chosen on calibration generations with their own seeds (1000, 1001).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import cachecompile as cc
from cachecompile.sampling import SOLVERS, ddim_sample, first_call_kwargs
from cachecompile.tools.candidates import Calibrator, SampleSetup, build_schedule
from cachecompile.tools.flops import flops_ratio
from cachecompile.tools.study_report import safe_name

__all__ = ["DDIM_SPECS", "DPM_SPECS", "generate", "run_specs", "time_specs", "main"]

# Priority order: the first ones answer the claims, the rest fill the Pareto fronts.
DDIM_SPECS = [
    "none", "none@1",
    "fora:2", "fora:3", "fora:4", "fora:5", "fora:6", "fora:8",
    "duca:3:0.3", "toca:3:0.3", "duca:4:0.3", "uniform:20", "uniform:23", "uniform:18",
    "toca:3:0.3:attention", "toca:3:0.3:random", "toca:3:0.3:staleness",
    "duca:3:0.3:attention", "duca:3:0.3:random", "duca:3:0.3:staleness",
    "fora:2+taylor1", "fora:3+taylor1", "fora:4+taylor1", "fora:5+taylor1", "fora:6+taylor1",
    "fora:3+gocu", "fora:4+gocu", "fora:3+goc", "fora:4+goc",
    "mask:cal:0.5", "mask:cal:0.25", "mask:deep-half",
    "mask:cal:0.5+gocu", "mask:cal:0.5+goc", "mask:cal:0.5+eoc", "mask:cal:0.25+eoc", "mask:deep-half+eoc",
    "fora:3+eoc", "fora:6+eoc",
    "steps:cal:17", "steps:cal:10",
    "steps:cal:17+taylor1", "steps:cal:13+taylor1", "steps:cal:10+taylor1", "steps:cal:9+taylor1",
    "fora:4+taylor2", "fora:6+taylor2",
]
DPM_SPECS = [
    "none", "none@1",
    "fora:2", "fora:3", "fora:4",
    "fora:2+taylor1", "fora:3+taylor1", "fora:4+taylor1", "fora:3+taylor2",
    "fora:3+gocu", "fora:3+goc", "fora:3+eoc",
    "duca:3:0.3", "toca:3:0.3",
    "steps:cal:7", "steps:cal:7+taylor1",
]
CHUNK = 100


def generate(model: Any, setup: SampleSetup, samples: int, seed: int) -> tuple[torch.Tensor, float]:
    """``samples`` images (labels ``i % classes``), chunks of 100 with seeds ``seed + chunk``; raw
    solver output and the wall time."""
    labels = torch.arange(samples) % setup.num_classes
    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, samples, CHUNK):
            out.append(ddim_sample(model, labels[i:i + CHUNK], seed=seed + i // CHUNK, **setup.kwargs()))
    return torch.cat(out), time.perf_counter() - t0


def run_specs(specs: list[str], out: Path, setup: SampleSetup, samples: int, seed: int = 0,
              log: Any = print) -> None:
    from cachecompile.models import digits_dit

    if samples > CHUNK and samples % CHUNK:
        raise SystemExit(f"--samples must be a multiple of {CHUNK} (the step graphs have a static batch)")

    model = digits_dit()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "schedules").mkdir(parents=True, exist_ok=True)
    done = set()
    runs = out / "runs.jsonl"
    if runs.exists():
        done = {json.loads(line)["spec"] for line in runs.read_text().splitlines() if line.strip()}
    cal: Calibrator | None = None
    labels2 = torch.arange(2)
    for spec in specs:
        if spec in done:
            continue
        t0 = time.perf_counter()
        record: dict[str, Any] = {"spec": spec, "samples": samples, "steps": setup.steps, "solver": setup.solver,
                                  "cfg": setup.cfg, "seed": seed, "torch": torch.__version__}
        if spec.startswith("none"):
            run_seed = seed + int(spec.partition("@")[2] or 0) * 10000  # far from the calibration seeds
            images, seconds = generate(model, setup, samples, run_seed)
            record.update(seed=run_seed, flops_ratio=1.0)
        else:
            if cal is None:
                cal = Calibrator(model, setup, log=log)
            schedule = build_schedule(spec, cal)
            schedule.save(out / "schedules" / f"{safe_name(spec)}.json")
            record["calibration_seconds"] = round(time.perf_counter() - t0, 1)
            kw = {k: v for k, v in setup.kwargs().items()}
            record["flops_ratio"] = flops_ratio(model, schedule, labels2, **kw)
            cached = cc.optimize(model, schedule)
            first = first_call_kwargs(model, torch.arange(min(samples, CHUNK)) % setup.num_classes, seed=seed, **kw)
            with torch.no_grad():
                cached.prepare(**first)  # capture and rewrite outside the timed run
            images, seconds = generate(cached, setup, samples, seed)
            record["step_graphs"] = len(cached.step_graphs)
            record["calibration_fidelity"] = cal.fidelity(schedule)
        record["seconds"] = round(seconds, 2)
        torch.save(images.to(torch.float32), out / "images" / f"{safe_name(spec)}.pt")
        with runs.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"{spec}: {json.dumps({k: record[k] for k in ('flops_ratio', 'seconds') if k in record})} "
            f"({time.perf_counter() - t0:.0f} s)")


def time_specs(out: Path, setup: SampleSetup, samples: int = 10, rounds: int = 3, log: Any = print) -> dict[str, Any]:
    """Measured eager speedup of every run's schedule: ``rounds`` rounds, each timing the
    uncached model and then the schedule on the same ``samples`` images, so that a change in the
    machine's load hits both; the speedup is the median over rounds of their ratio. Written to
    ``timing.json`` beside the runs."""
    from cachecompile.models import digits_dit

    model = digits_dit()
    specs = [json.loads(line)["spec"] for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    specs = [s for s in specs if not s.startswith("none")]
    labels = torch.arange(samples) % setup.num_classes
    first = first_call_kwargs(model, labels, **setup.kwargs())
    result: dict[str, Any] = {"samples": samples, "rounds": rounds, "threads": torch.get_num_threads(), "speedup": {}, "seconds": {}}
    for spec in specs:
        cached = cc.optimize(model, cc.Schedule.load(out / "schedules" / f"{safe_name(spec)}.json"))
        with torch.no_grad():
            cached.prepare(**first)
        generate(cached, setup, samples, 0)  # warm-up
        ratios, times = [], []
        for _ in range(rounds):
            _, t_none = generate(model, setup, samples, 0)
            _, t_spec = generate(cached, setup, samples, 0)
            ratios.append(t_none / t_spec)
            times.append(t_spec)
        result["speedup"][spec] = float(sorted(ratios)[len(ratios) // 2])
        result["seconds"][spec] = float(sorted(times)[len(times) // 2])
        log(f"{spec}: {result['speedup'][spec]:.2f}×")
        (out / "timing.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachecompile.tools.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate samples for every spec (resumable)")
    r.add_argument("--out", required=True)
    r.add_argument("--samples", type=int, default=500)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--solver", default="ddim", choices=list(SOLVERS))
    r.add_argument("--cfg", type=float, default=2.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--specs", nargs="*", default=None, help="default: the study's list for the solver")
    t = sub.add_parser("time", help="measured eager speedup of every run's schedule (paired with the uncached model per round)")
    t.add_argument("--out", required=True, help="a run directory")
    t.add_argument("--samples", type=int, default=10)
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("analyze", help="metrics with intervals, Pareto fronts, claims → Markdown/JSON/figures")
    a.add_argument("--runs", nargs="+", required=True, help="run directories (the first is the main one)")
    a.add_argument("--out", required=True)
    a.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    args = p.parse_args(argv)
    if args.command == "run":
        torch.set_num_threads(args.threads)
        setup = SampleSetup.digits(args.steps, args.solver, args.cfg)
        specs = args.specs or (DDIM_SPECS if args.solver == "ddim" else DPM_SPECS)
        run_specs(specs, Path(args.out), setup, args.samples, args.seed, log=lambda m: print(m, flush=True))
        return 0
    if args.command == "time":
        torch.set_num_threads(args.threads)
        first = json.loads((Path(args.out) / "runs.jsonl").read_text().splitlines()[0])
        setup = SampleSetup.digits(first["steps"], first["solver"], first["cfg"])
        time_specs(Path(args.out), setup, args.samples, args.rounds, log=lambda m: print(m, flush=True))
        return 0
    from cachecompile.tools.study_report import analyze_main

    return analyze_main(args)


if __name__ == "__main__":
    sys.exit(main())
