"""The main job: whole DDIM sampling runs — uncached vs cached, eager vs compiled, against the
FLOPs limit and against the peers (``python -m cachecompile bench``). See :mod:`.run` for what is
measured, :mod:`.measure` for how, :mod:`.report` for the targets and the table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cachecompile.tools.bench.report import check_targets, markdown_report
from cachecompile.tools.bench.run import run_bench
from cachecompile.tools.zoo import default_model_name

__all__ = ["run_bench", "check_targets", "markdown_report", "add_bench_arguments", "bench_main"]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="digits (default when its weights ship), dit-s2, dit-s2-untied, tiny, or module:attr")
    p.add_argument("--schedule", nargs="+", default=None,
                   help="presets (fora:3 ...) or .json files (default: fora:3 duca:3:0.3; with --quality: every preset)")
    p.add_argument("--quality", action="store_true",
                   help="the quality report on the trained digits model: every preset vs uncached (cachecompile.quality_report)")
    p.add_argument("--backend", nargs="+", default=["eager", "inductor"], help="eager, inductor, aoti, onnxruntime, tensorrt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", default="ddim", choices=["ddim", "dpm++2m"],
                   help="with --quality: the sampler (the model's scheduler config; dpm++2m = DPM-Solver++ 2M)")
    p.add_argument("--batch", type=int, default=2, help="images per run (the CFG batch is twice this)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the median is reported)")
    p.add_argument("--efficiency-rounds", type=int, default=0, metavar="N",
                   help="N more timed rounds of the compiled rows only, after the --repeats rounds and without "
                        "per-step runs: resolves the per-round efficiency at a fraction of the time")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--peers", nargs="*", default=None, metavar="PEER",
                   help="run peers too: all installed when given without names; names: cache-dit, cache-dit-mask, "
                        "fbc, taylorseer, magcache, pab (compiled too when --backend has inductor)")
    p.add_argument("--no-handwritten", action="store_true", help="skip the hand-written eager FORA rows")
    p.add_argument("--quality-samples", type=int, default=None,
                   help="images per configuration for the quality numbers (default 64 on the trained digits model, else 0)")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, torch's choice on CUDA). With several threads each op "
                        "waits for its slowest one, so on a machine shared with other jobs a call can take 15-40x its "
                        "time (measured on 2 CPUs at load 8); one thread slows down only in proportion to the load")
    p.add_argument("--warm-compile-cache", action="store_true", help="let Inductor reuse its on-disk caches (compile times are then warm)")
    p.add_argument("--static-batch", action="store_true",
                   help="also run each compiled schedule with step graphs of a fixed batch (what the dynamic batch costs)")
    p.add_argument("--context-parallel", type=int, default=None, metavar="N",
                   help="instead: cached step graphs under diffusers' context parallelism (Ulysses N) in N processes, "
                        "bytes each rank sends per generation, cached vs uncached (--model wan or flux; "
                        "cachecompile.tools.bench.parallel)")
    p.add_argument("--out", default="bench-out", help="directory for bench.json, bench.md and the plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def bench_main(args: argparse.Namespace) -> int:
    from cachecompile.tools import peers as P

    if args.threads is None and not (torch.cuda.is_available() and args.device != "cpu"):
        args.threads = 1  # steady on a shared CPU: see --help
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.quality:
        from cachecompile.tools.quality_report import quality_main

        return quality_main(args)
    if args.context_parallel is not None:
        return _parallel_main(args)
    args.schedule = args.schedule or ["fora:3", "duca:3:0.3"]

    model = args.model or default_model_name()
    peers = None if args.peers is None else (args.peers or P.peer_names())
    result = run_bench(
        model, args.schedule, args.backend, steps=args.steps, batch=args.batch, guidance_scale=args.cfg,
        repeats=args.repeats, warmup=args.warmup, peers=peers, handwritten=not args.no_handwritten,
        quality_samples=args.quality_samples, device=args.device, progress=not args.no_progress,
        cold_compile=not args.warm_compile_cache, static_batch=args.static_batch,
        efficiency_rounds=args.efficiency_rounds,
    )
    report = markdown_report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    if not args.no_plots:
        from cachecompile.tools.plots import write_plots

        written += write_plots(result, out)
    print(report)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(report + "\n")
    print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _parallel_main(args: argparse.Namespace) -> int:
    from cachecompile.tools.bench.parallel import parallel_report, run_parallel_bench

    result = run_parallel_bench(args.model or "wan", args.schedule or ["fora:3", "duca:3:0.3"], world=args.context_parallel,
                                steps=args.steps, repeats=args.repeats, device=args.device)
    report = parallel_report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(report)
    (out / "parallel.json").write_text(json.dumps(result, indent=1))
    (out / "parallel.md").write_text(report + "\n")
    print(f"\nwrote {out / 'parallel.json'}, {out / 'parallel.md'}", file=sys.stderr)
    return 0
