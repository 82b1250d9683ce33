"""The quality report: every schedule preset on the trained digits DiT, against the uncached model.

``python -m cachecompile bench --quality`` generates the same N samples (same labels, same noise)
with the uncached model and with each schedule, and writes a Markdown table, JSON, a plot of
quality against measured speedup and FLOPs ratio (the Pareto front) and a grid of samples.
Quality (images clamped to the value range first): PSNR / SSIM / rel-L1 of each sample against
the uncached sample from the same noise, the Fréchet distance between the schedule's and the
uncached samples in the shipped classifier's feature space, the same distance against the real
digits (an FID analogue) and class accuracy; each with a 95 % bootstrap interval over samples
(:mod:`cachecompile.tools.stats`). ``--solver dpm++2m`` samples with DPM-Solver++ (2M).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import cachecompile as cc
from cachecompile.sampling import ddim_sample, first_call_kwargs
from cachecompile.tools import quality as Q
from cachecompile.tools import stats as S
from cachecompile.tools.flops import flops_ratio, sampling_flops
from cachecompile.tools.specs import parse_schedule

__all__ = ["DEFAULT_SCHEDULES", "run_quality_report", "quality_markdown"]

# Presets at several intervals and ratios. Compensated rows use fixed, uncalibrated settings; a
# calibrated schedule file (python -m cachecompile calibrate ...) can be passed instead.
DEFAULT_SCHEDULES = [
    "fora:2", "fora:3", "fora:4", "fora:6",
    "toca:3:0.3", "duca:3:0.3", "duca:4:0.3",
    "mask:deep-half",
    "fora:4+goc", "fora:4+taylor1", "fora:6+taylor1",
]


def _generate(model: Any, labels: torch.Tensor, steps: int, cfg: float, seed: int,
              solver: str = "ddim") -> tuple[torch.Tensor, float]:
    from cachecompile.models import DIGITS_CONFIG as C

    t0 = time.perf_counter()
    images = ddim_sample(model, labels, num_steps=steps, guidance_scale=cfg, null_class=C.null_class,
                         sample_size=C.sample_size, in_channels=C.in_channels, seed=seed, solver=solver)
    return images, time.perf_counter() - t0


def run_quality_report(
    schedules: list[str] | None = None, *, samples: int = 200, steps: int = 50, cfg: float = 2.0, seed: int = 0,
    progress: bool = True, solver: str = "ddim", boot: int = 500,
) -> dict[str, Any]:
    """Run the uncached model and every schedule on the same ``samples`` labels and noise."""
    from cachecompile.models import digits_dit

    schedules = schedules or DEFAULT_SCHEDULES
    model = digits_dit()
    num_blocks = len(model.transformer_blocks)
    labels = torch.arange(samples) % 10
    with torch.no_grad():
        _generate(model, labels[:2], 2, cfg, seed, solver)  # warm-up: first-call costs are not the model's
        reference, base_seconds = _generate(model, labels, steps, cfg, seed, solver)
    real = S.real_stats()
    ref_samples = S.per_sample(reference, labels, reference)

    def metrics(images: torch.Tensor) -> dict[str, Any]:
        out = Q.sample_metrics(images, labels, reference=reference)  # clamped to [-1, 1]
        summary = S.summarize(S.per_sample(images, labels, reference), ref_samples, real, boot=boot)
        out["fd_uncached"] = summary["fd_uncached"]["value"]
        out["ci"] = {k: [v["lo"], v["hi"]] for k, v in summary.items()}
        return out

    rows = [{"schedule": "none", "speedup": 1.0, "flops_ratio": 1.0, "seconds": base_seconds, **metrics(reference)}]
    images = {"none": reference}
    items = schedules
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(schedules, desc="schedules")
    from cachecompile.models import DIGITS_CONFIG as C

    small = dict(num_steps=steps, guidance_scale=cfg, null_class=C.null_class, sample_size=C.sample_size,
                 in_channels=C.in_channels, seed=seed, solver=solver)
    base_flops = None
    for spec in items:
        schedule = _calibrated(model, parse_schedule(spec, steps, num_blocks), labels, small)
        cached = cc.optimize(model, schedule)
        with torch.no_grad():
            cached.prepare(**first_call_kwargs(model, labels, **small))  # capture + rewrite, untimed
            out, seconds = _generate(cached, labels, steps, cfg, seed, solver)
        extra = {}
        if "dynamic" in schedule.step_kinds():
            # Decided per step from the whole batch: count the FLOPs of this very run (same labels
            # and noise: the same decisions), not of a 2-sample stand-in.
            with torch.no_grad():
                base_flops = base_flops or sampling_flops(model, labels, **small)
                ratio = base_flops / max(sampling_flops(cached, labels, **small), 1)
            extra["cached_steps"] = cached.decisions.count("cached")
        else:
            ratio = flops_ratio(model, schedule, labels[:2], **small)
        rows.append({"schedule": spec, "speedup": base_seconds / seconds, "flops_ratio": ratio, "seconds": seconds,
                     "step_graphs": len(cached.step_graphs), **extra, **metrics(out)})
        images[spec] = out
    return {"samples": samples, "steps": steps, "cfg": cfg, "seed": seed, "solver": solver, "torch": torch.__version__,
            "rows": rows, "_images": images}


def _calibrated(model: Any, schedule: cc.Schedule, labels: torch.Tensor, small: dict[str, Any]) -> cc.Schedule:
    """A TeaCache / MagCache schedule without its numbers, calibrated on 8 samples of other noise
    (seed + 1) than the report's."""
    missing = {"teacache": "coefficients", "magcache": "ratios"}.get(schedule.method)
    if missing is None or schedule.params[missing] is not None:
        return schedule
    kw = {**small, "class_labels": labels[:8], "seed": small["seed"] + 1}
    with torch.no_grad():
        return cc.calibrate(model, schedule, kw, num_samples=1)


def quality_markdown(result: dict[str, Any]) -> str:
    solver = {"ddim": "DDIM", "dpm++2m": "DPM-Solver++ (2M)"}.get(result.get("solver", "ddim"), result.get("solver"))
    head = (
        f"digits DiT, {result['samples']} samples (labels 0–9 in turn), {result['steps']} {solver} steps, CFG "
        f"{result['cfg']}, seed {result['seed']}, eager backend, torch {result['torch']}; images clamped to [-1, 1]; "
        "[95 % bootstrap interval over samples]\n\n"
        "| schedule | speedup | FLOPs ratio | rel-L1 vs uncached ↓ | PSNR (dB) ↑ | SSIM ↑ | FD to uncached ↓ | FID analogue ↓ | accuracy ↑ |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        lo, hi = r.get("ci", {}).get(key, (None, None))
        return f"{r[key]:{fmt}}" + ("" if lo is None else f" [{lo:{fmt}}, {hi:{fmt}}]")

    lines = [
        f"| {r['schedule']} | {r['speedup']:.2f}× | {r['flops_ratio']:.2f}× | {cell(r, 'rel_l1', '.4f')} | "
        f"{cell(r, 'psnr', '.1f')} | {cell(r, 'ssim', '.3f')} | {r['fd_uncached']:.2f} | {r['fid']:.1f} | {cell(r, 'accuracy', '.3f')} |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines)


def _plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [(metric, ylabel, key, xlabel)
              for metric, ylabel in (("fid", "FID analogue vs real digits (lower is better)"),
                                     ("rel_l1", "rel-L1 vs the uncached samples (lower is better)"))
              for key, xlabel in (("speedup", "measured speedup (eager, CPU)"), ("flops_ratio", "FLOPs ratio"))]
    for ax, (metric, ylabel, key, xlabel) in zip(axes.flat, panels):
        xs = [r[key] for r in rows]
        ys = [r[metric] for r in rows]
        ax.scatter(xs, ys)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["schedule"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        # Pareto front: no other point is both faster and better.
        front = sorted((x, y) for x, y in zip(xs, ys) if not any(x2 >= x and y2 < y or x2 > x and y2 <= y for x2, y2 in zip(xs, ys)))
        if front:
            ax.plot(*zip(*front), "--", alpha=0.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("digits DiT: quality against speed")
    fig.tight_layout()
    pareto = out / "quality_pareto.png"
    fig.savefig(pareto, dpi=110)
    plt.close(fig)

    images = result["_images"]
    names = list(images)
    cols = min(10, result["samples"])  # one sample per class, 0..9
    fig, axes = plt.subplots(len(names), cols, figsize=(cols * 0.7, len(names) * 0.75), squeeze=False)
    for i, name in enumerate(names):
        for k in range(cols):
            ax = axes[i][k]
            ax.imshow(images[name][k, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    grid = out / "quality_samples.png"
    fig.savefig(grid, dpi=110)
    plt.close(fig)
    return [pareto, grid]


def quality_main(args: Any) -> int:
    schedules = [s for s in args.schedule if s != "none"] if args.schedule else None
    result = run_quality_report(schedules, samples=args.quality_samples or 200, steps=args.steps,
                                cfg=args.cfg, progress=not args.no_progress, solver=getattr(args, "solver", "ddim"))
    table = quality_markdown(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps({k: v for k, v in result.items() if k != "_images"}, indent=1))
    paths = [] if args.no_plots else _plots(result, out)
    print("\nwrote " + ", ".join(str(p) for p in [out / "quality.md", out / "quality.json", *paths]))
    return 0
