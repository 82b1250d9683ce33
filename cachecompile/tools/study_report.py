"""Analysis of quality-study runs (:mod:`cachecompile.tools.study`): metrics with bootstrap
intervals, Pareto fronts per method family against the exact FLOPs ratio, the best fidelity at
2×–5×, the seed claims with paired intervals, the sampler check, and the figures.

Intervals: 95 % percentile bootstrap over the samples (1,000 resamples), paired with the uncached
samples from the same noise. Fréchet distances are biased upward on a resample (a resample holds
about 63 % distinct samples), so their interval is the percentile interval moved back by the
bootstrap's own bias (``q − (mean of the resamples − value)``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachecompile.tools import stats as S
from cachecompile.tools.specs import spec_label, split_spec

__all__ = ["load_runs", "analyze", "analyze_main", "family", "safe_name", "CLAIMS"]

FD_METRICS = ("fd_uncached", "fid")
TOLERANCE = 0.05  # "at N×": FLOPs ratio at least (1 − TOLERANCE)·N

# (id, kind, claim, A, B, published anchor). kind "beats": the claim holds when A is closer to the
# uncached samples than B (the paired interval of rel-L1(A) − rel-L1(B) below 0); "matches": unless
# B is closer.
CLAIMS = [
    ("duca-vs-fora", "beats", "DuCa beats FORA at matched FLOPs", "duca:3:0.3", "uniform:20",
     "DiT-XL/2, ImageNet 256, 50 DDIM steps: DuCa N=3 FID 2.88 vs FORA 3.55"),
    ("duca-vs-fora", "beats", "DuCa beats FORA's Pareto front at the same FLOPs (interpolated)", "duca:3:0.3", "front:FORA", ""),
    ("duca-vs-fora", "beats", "DuCa beats FORA at matched FLOPs", "duca:4:0.3", "uniform:18", ""),
    ("duca-vs-fora", "beats", "DuCa beats FORA's Pareto front at the same FLOPs (interpolated)", "duca:4:0.3", "front:FORA", ""),
    ("toca-vs-fora", "beats", "ToCa beats FORA at matched FLOPs", "toca:3:0.3", "uniform:23", ""),
    ("toca-vs-fora", "beats", "ToCa beats FORA's Pareto front at the same FLOPs (interpolated)", "toca:3:0.3", "front:FORA", ""),
    ("duca-vs-toca", "beats", "DuCa beats ToCa (and saves more FLOPs)", "duca:3:0.3", "toca:3:0.3", ""),
    ("vnorm-vs-attention", "matches", "V-caching's value-norm score matches the attention score (ToCa 3/0.3)", "toca:3:0.3",
     "toca:3:0.3:attention", "V-caching: value-norm scores as good as attention scores, with fused attention kept"),
    ("vnorm-vs-random", "beats", "value-norm score beats random tokens (ToCa 3/0.3)", "toca:3:0.3", "toca:3:0.3:random", ""),
    ("vnorm-vs-staleness", "beats", "value-norm score beats staleness (ToCa 3/0.3)", "toca:3:0.3", "toca:3:0.3:staleness", ""),
    ("vnorm-vs-attention", "matches", "value-norm score matches the attention score (DuCa 3/0.3)", "duca:3:0.3", "duca:3:0.3:attention", ""),
    ("vnorm-vs-random", "beats", "value-norm score beats random tokens (DuCa 3/0.3)", "duca:3:0.3", "duca:3:0.3:random", ""),
    ("vnorm-vs-staleness", "beats", "value-norm score beats staleness (DuCa 3/0.3)", "duca:3:0.3", "duca:3:0.3:staleness", ""),
    ("goc-mask", "beats", "GOC (used queue, calibrated) repairs a mask caching 50 % of the branch-steps", "mask:cal:0.5+gocu",
     "mask:cal:0.5", "DiT-XL/2: 50 % blocks cached FID 6.857 → GOC 3.907"),
    ("goc-mask", "beats", "GOC (computed queue, calibrated) repairs the same mask", "mask:cal:0.5+goc", "mask:cal:0.5", ""),
    ("goc-fora", "beats", "GOC (used queue, calibrated) improves FORA:3", "fora:3+gocu", "fora:3", ""),
    ("goc-used-vs-computed", "beats", "the paper's used queue (calibrated) beats our computed queue, FORA:3", "fora:3+gocu", "fora:3+goc", ""),
    ("goc-used-vs-computed", "beats", "the paper's used queue (calibrated) beats our computed queue, FORA:4", "fora:4+gocu", "fora:4+goc", ""),
    ("goc-used-vs-computed", "beats", "the paper's used queue (calibrated) beats our computed queue, 50 % mask", "mask:cal:0.5+gocu",
     "mask:cal:0.5+goc", ""),
    ("eoc-overcaching", "beats", "EOC repairs over-caching (a mask caching 50 % of the branch-steps)", "mask:cal:0.5+eoc", "mask:cal:0.5",
     "DiT-XL/2: over-caching FID 6.857 → EOC 5.821"),
    ("eoc-fora", "beats", "EOC improves FORA:3", "fora:3+eoc", "fora:3", "DiT-XL/2: FORA FID 3.870 → EOC 3.692"),
    ("eoc-fora", "beats", "EOC improves FORA:6", "fora:6+eoc", "fora:6", ""),
    ("eoc-mask", "beats", "EOC improves a Learning-to-Cache style mask (25 % of the branch-steps cached)", "mask:cal:0.25+eoc",
     "mask:cal:0.25", "DiT-XL/2: Learning-to-Cache FID 3.539 → EOC 3.451"),
    ("eoc-mask", "beats", "EOC improves the deep-half mask", "mask:deep-half+eoc", "mask:deep-half", ""),
] + [
    ("compensated-vs-fora", "beats", f"Taylor-1 beats plain FORA:{n} at the same FLOPs", f"fora:{n}+taylor1", f"fora:{n}", "")
    for n in (2, 3, 4, 5, 6)
] + [
    ("calibrated-steps", "beats", "calibrated placement of 17 full steps beats FORA:3 (the same cost)", "steps:cal:17", "fora:3", ""),
    ("calibrated-steps", "beats", "16 calibrated full steps with Taylor-2 beat FORA:3 at no more FLOPs", "steps:cal:16+taylor2", "fora:3", ""),
    ("tune", "beats", "cc.tune at 3× beats FORA:3 at no more FLOPs", "tuned-3x", "fora:3", ""),
    ("tune", "beats", "cc.tune at 3× beats FORA:3 with the calibrated used-queue GOC", "tuned-3x", "fora:3+gocu", ""),
]


def safe_name(spec: str) -> str:
    """The file name of a spec's images and schedule in a run directory."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec)


def label(spec: str) -> str:
    """A spec as tables show it: a labelled schedule file by its label."""
    return spec_label(spec)


def _find(runs: "Runs", name: str) -> str | None:
    return next((s for s in runs.records if s == name or label(s) == name), None)


def family(spec: str) -> str:
    base, comp = split_spec(spec)
    if comp:
        name = comp.partition(":")[0]
        return {"taylor1": "+ Taylor", "taylor2": "+ Taylor", "goc": "+ GOC (computed)", "gocu": "+ GOC (used)",
                "eoc": "+ EOC"}.get(name, "+ " + name)
    if base.startswith("none"):
        return "uncached" if base == "none" else "uncached, other noise"
    if "=" in base or base.endswith(".json"):
        return "cc.tune"
    name = base.partition(":")[0]
    if name in ("fora", "uniform"):
        return "FORA"
    if base.startswith("steps:cal"):
        return "FORA, calibrated steps"
    return {"toca": "ToCa", "duca": "DuCa", "mask": "masks", "none": "uncached"}.get(name, name)


@dataclass
class Runs:
    path: Path
    records: dict[str, dict[str, Any]]
    labels: torch.Tensor
    reference: torch.Tensor
    timing: dict[str, Any] = field(default_factory=dict)
    per_sample: dict[str, S.PerSample] = field(default_factory=dict)
    summary: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    @property
    def setting(self) -> dict[str, Any]:
        r = self.records["none"]
        return {k: r[k] for k in ("samples", "steps", "solver", "cfg", "seed", "torch")}

    def images(self, spec: str) -> torch.Tensor:
        return torch.load(self.path / "images" / f"{safe_name(spec)}.pt")


def load_runs(path: Path) -> Runs:
    records = {}
    for line in (path / "runs.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["spec"]] = r
    if "none" not in records:
        raise SystemExit(f"{path} has no uncached run ('none') yet")
    n = records["none"]["samples"]
    labels = torch.arange(n) % 10
    runs = Runs(path, records, labels, torch.load(path / "images" / "none.pt"))
    if (path / "timing.json").exists():
        runs.timing = json.loads((path / "timing.json").read_text())
    return runs


def _pivotal(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Fréchet distances: the bootstrap interval moved back by the bootstrap's bias (see stats.shift_to_value)."""
    return {k: S.shift_to_value(v) if k in FD_METRICS else v for k, v in summary.items()}


def summarize_runs(runs: Runs, real: Any, boot: int, log: Any = print) -> None:
    ref = S.per_sample(runs.reference, runs.labels, runs.reference)
    runs.per_sample["none"] = ref
    for spec in runs.records:
        if spec not in runs.per_sample:
            runs.per_sample[spec] = S.per_sample(runs.images(spec), runs.labels, runs.reference)
        runs.summary[spec] = _pivotal(S.summarize(runs.per_sample[spec], ref, real, boot=boot))
        log(f"  {spec}: rel-L1 {runs.summary[spec]['rel_l1']['value']:.4f}")


# --------------------------------------------------------------------------- formatting


def ci(m: dict[str, float], fmt: str = ".3f") -> str:
    return f"{m['value']:{fmt}} [{m['lo']:{fmt}}, {m['hi']:{fmt}}]"


def _row(runs: Runs, spec: str) -> dict[str, Any]:
    r = runs.records[spec]
    speedup = 1.0 if spec.startswith("none") else runs.timing.get("speedup", {}).get(spec, math.nan)
    return {"spec": label(spec), "family": family(spec), "flops_ratio": r["flops_ratio"],
            "speedup": speedup, **runs.summary[spec]}


def _x(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:.2f}×"


def metrics_table(runs: Runs, specs: list[str]) -> str:
    head = ("| schedule | family | FLOPs ratio | measured speedup (eager) | rel-L1 ↓ | PSNR (dB) ↑ | SSIM ↑ | "
            "FD to uncached ↓ | FID analogue ↓ | accuracy ↑ |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for spec in specs:
        r = _row(runs, spec)
        lines.append(
            f"| {label(spec)} | {r['family']} | {r['flops_ratio']:.2f}× | {_x(r['speedup'])} | {ci(r['rel_l1'], '.4f')} | "
            f"{ci(r['psnr'], '.1f')} | {ci(r['ssim'], '.3f')} | {ci(r['fd_uncached'], '.2f')} | {ci(r['fid'], '.1f')} | "
            f"{ci(r['accuracy'], '.3f')} |"
        )
    return head + "\n".join(lines)


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated by another (higher FLOPs ratio and lower error), by ratio."""
    front = [p for p in points if not any((q[0] >= p[0] and q[1] < p[1]) or (q[0] > p[0] and q[1] <= p[1]) for q in points)]
    return sorted(front)


def best_at(runs: Runs, levels: tuple[int, ...] = (2, 3, 4, 5)) -> tuple[str, list[dict[str, Any]]]:
    fams = sorted({family(s) for s in runs.records if s != "none" and not s.startswith("none@")})
    rows = []
    head = "| family | " + " | ".join(f"best rel-L1 at ≥ {n}× (schedule, FLOPs ratio)" for n in levels) + " |\n"
    head += "|---|" + "---:|" * len(levels) + "\n"
    lines = []
    for fam in fams + ["all"]:
        cells = []
        for n in levels:
            cands = [s for s in runs.records if not s.startswith("none") and (fam == "all" or family(s) == fam)
                     and runs.records[s]["flops_ratio"] >= (1 - TOLERANCE) * n]
            if not cands:
                cells.append("–")
                continue
            best = min(cands, key=lambda s: runs.summary[s]["rel_l1"]["value"])
            rows.append({"family": fam, "level": n, "spec": label(best), "flops_ratio": runs.records[best]["flops_ratio"],
                         "rel_l1": runs.summary[best]["rel_l1"]})
            cells.append(f"{ci(runs.summary[best]['rel_l1'], '.4f')} ({label(best)}, {runs.records[best]['flops_ratio']:.2f}×)")
        lines.append(f"| {'**all**' if fam == 'all' else fam} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines), rows


TIE = 1e-6  # a paired interval inside ±TIE is a numerical tie: the two sample sets are the same


def outcome(d: dict[str, float]) -> str:
    """Which of A and B is closer to the uncached samples, where the paired interval excludes 0."""
    if -TIE <= d["lo"] and d["hi"] <= TIE:
        return "no difference: the same samples"
    return "A better" if d["hi"] < 0 else "B better" if d["lo"] > 0 else "no difference detected"


def verdict(kind: str, d: dict[str, float]) -> str:
    """A claim that A *beats* B holds when A is better; one that A *matches* B, unless B is better."""
    o = outcome(d)
    holds = o == "A better" if kind == "beats" else o != "B better"
    return ("**reproduced**" if holds else "**not reproduced**") + f" ({o})"


def _front_pair(runs: Runs, fam: str, ratio: float) -> tuple[str, str, float] | None:
    """The two runs of ``fam``'s Pareto front (rel-L1 against FLOPs ratio) that bracket ``ratio``,
    and the weight of the second in a linear interpolation at ``ratio``."""
    pts = [(runs.records[s]["flops_ratio"], runs.summary[s]["rel_l1"]["value"], s) for s in runs.records
           if family(s) == fam and s in runs.summary]
    front = pareto(pts)
    for (r0, _, s0), (r1, _, s1) in zip(front, front[1:]):
        if r0 <= ratio <= r1:
            return s0, s1, (ratio - r0) / (r1 - r0)
    return None


def _difference_to_front(runs: Runs, a: str, fam: str, metric: str, boot: int) -> tuple[dict[str, float], str] | None:
    """``metric(a)`` minus ``fam``'s front interpolated at a's FLOPs ratio, paired bootstrap."""
    pair = _front_pair(runs, fam, runs.records[a]["flops_ratio"])
    if pair is None:
        return None
    s0, s1, t = pair
    ref = runs.per_sample["none"]
    ps = runs.per_sample

    def diff(idx: np.ndarray) -> float:
        m = lambda s: S._metrics(ps[s], ref, idx, which=(metric,))[metric]  # noqa: E731
        return m(a) - ((1 - t) * m(s0) + t * m(s1))

    draws = [diff(idx) for idx in S._indices(len(ref.abs_err), boot, 2)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    out = {"value": diff(np.arange(len(ref.abs_err))), "lo": float(lo), "hi": float(hi), "mean": float(np.mean(draws))}
    if metric in FD_METRICS:
        bias = out["mean"] - out["value"]
        out["lo"], out["hi"] = out["lo"] - bias, out["hi"] - bias
    return out, f"{label(s0)} … {label(s1)} at t = {t:.2f}"


def claims_table(runs: Runs, boot: int) -> tuple[str, list[dict[str, Any]]]:
    head = ("| claim | A | B | FLOPs ratio A / B | rel-L1 A | rel-L1 B | A − B [95 % CI] | FD to uncached A − B | verdict | published anchor |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---|---|\n")
    lines, rows = [], []
    ref = runs.per_sample["none"]
    for cid, kind, text, a, b, anchor in CLAIMS:
        a = _find(runs, a)
        if a is None:
            continue
        ra = runs.records[a]["flops_ratio"]
        if b.startswith("front:"):
            fam = b.partition(":")[2]
            got = _difference_to_front(runs, a, fam, "rel_l1", boot)
            got_fd = _difference_to_front(runs, a, fam, "fd_uncached", boot)
            if got is None or got_fd is None:
                continue
            (d, where), (dfd, _) = got, got_fd
            b_label, rb, rel_b = f"{fam} front ({where})", ra, d["value"] - runs.summary[a]["rel_l1"]["value"]
            rel_b = -rel_b
        else:
            b = _find(runs, b)
            if b is None:
                continue
            d = S.paired_difference(runs.per_sample[a], runs.per_sample[b], ref, "rel_l1", boot=boot)
            dfd = S.paired_difference(runs.per_sample[a], runs.per_sample[b], ref, "fd_uncached", boot=boot)
            b_label, rb, rel_b = label(b), runs.records[b]["flops_ratio"], runs.summary[b]["rel_l1"]["value"]
        rel_a = runs.summary[a]["rel_l1"]["value"]
        rows.append({"id": cid, "kind": kind, "claim": text, "a": label(a), "b": b_label, "flops_ratio": [ra, rb], "diff": d,
                     "fd_diff": dfd, "rel_l1": [rel_a, rel_b], "verdict": verdict(kind, d), "anchor": anchor})
        lines.append(
            f"| {text} | {label(a)} | {b_label} | {ra:.2f}× / {rb:.2f}× | {rel_a:.4f} | {rel_b:.4f} | {ci(d, '+.4f')} | "
            f"{ci(dfd, '+.2f')} | {verdict(kind, d)} | {anchor} |"
        )
    return head + "\n".join(lines), rows


# --------------------------------------------------------------------------- figures


COLORS = {"cc.tune": "k", "FORA": "C0", "FORA, calibrated steps": "C9", "ToCa": "C1", "DuCa": "C2", "masks": "C7", "+ Taylor": "C3",
          "+ GOC (computed)": "C4", "+ GOC (used)": "C5", "+ EOC": "C6"}


def pareto_figure(runs: Runs, out: Path, name: str = "quality_pareto.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [s for s in runs.records if not s.startswith("none")]
    panels = [("flops_ratio", "FLOPs ratio (exact)")]
    if runs.timing.get("speedup"):  # measured by `study time`; without it the figure has one panel
        panels.append(("speedup", "measured speedup (eager, 1 thread, paired with the uncached run per round)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 5), squeeze=False)
    axes = axes[0]
    for ax, (key, xlabel) in zip(axes, panels):
        for fam in sorted({family(s) for s in specs}):
            rows = [_row(runs, s) for s in specs if family(s) == fam]
            xs = np.array([r[key] for r in rows])
            ys = np.array([r["rel_l1"]["value"] for r in rows])
            err = np.array([[r["rel_l1"]["value"] - r["rel_l1"]["lo"], r["rel_l1"]["hi"] - r["rel_l1"]["value"]] for r in rows]).T
            color = COLORS.get(fam)
            ax.errorbar(xs, ys, yerr=err, fmt="o", ms=3.5, capsize=2, color=color, alpha=0.75, label=fam)
            front = pareto([(x, y, "") for x, y in zip(xs, ys)])
            if len(front) > 1:
                ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=color, alpha=0.6)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rel-L1 to the uncached samples (log, lower is better)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="lower right")
    s = runs.setting
    fig.suptitle(f"digits DiT, {s['samples']} samples, {s['steps']} {s['solver'].upper()} steps: fidelity against cost\n"
                 f"(lines: Pareto front per family; bars: 95 % bootstrap CI)", fontsize=9)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def samples_figure(runs: Runs, specs: list[str], out: Path, name: str = "quality_samples.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [s for s in specs if s in runs.records]
    fig, axes = plt.subplots(len(specs), 10, figsize=(7, len(specs) * 0.75), squeeze=False)
    for i, spec in enumerate(specs):
        images = S.clamp(runs.images(spec))
        for k in range(10):
            ax = axes[i][k]
            ax.imshow(images[k, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(label(spec), rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    path = out / name
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- sampler


def sampler_table(all_runs: list[Runs], real: Any, boot: int) -> tuple[str, list[dict[str, Any]]]:
    """The uncached model under each sampler setting, on the first ``n`` samples of every run
    (the same labels and noise: chunks of 100 share their seeds): FID analogue and accuracy, and
    the distance of its samples to those of the longest DDIM run from the same noise."""
    ddim = [r for r in all_runs if r.setting["solver"] == "ddim"]
    finest = max(ddim, key=lambda r: r.setting["steps"]) if ddim else None
    n = min(r.setting["samples"] for r in all_runs)
    fs = finest.setting["steps"] if finest else "–"
    head = (f"{n} samples per setting (the first {n} of each run: same labels, same noise)\n\n"
            f"| solver | steps | FID analogue ↓ | accuracy ↑ | rel-L1 to DDIM {fs} (same noise) ↓ | FD to DDIM {fs} ↓ |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    lines, rows = [], []
    labels = torch.arange(n) % 10
    ref = S.per_sample(finest.reference[:n], labels, finest.reference[:n]) if finest else None
    for r in sorted(all_runs, key=lambda r: (r.setting["solver"], r.setting["steps"])):
        x = r.reference[:n]
        own = S.per_sample(x, labels, x)
        summ = _pivotal(S.summarize(own, own, real, boot=boot))
        conv = conv_fd = None
        if finest is not None and r is not finest:
            against = _pivotal(S.summarize(S.per_sample(x, labels, finest.reference[:n]), ref, real, boot=boot))
            conv, conv_fd = against["rel_l1"], against["fd_uncached"]
        rows.append({**r.setting, "samples": n, "fid": summ["fid"], "accuracy": summ["accuracy"],
                     "rel_l1_to_finest": conv, "fd_to_finest": conv_fd})
        lines.append(f"| {r.setting['solver']} | {r.setting['steps']} | {ci(summ['fid'], '.1f')} | {ci(summ['accuracy'], '.3f')} | "
                     f"{ci(conv, '.4f') if conv else '–'} | {ci(conv_fd, '.2f') if conv_fd else '–'} |")
    return head + "\n".join(lines), rows


# --------------------------------------------------------------------------- main


def analyze(paths: list[Path], out: Path, boot: int = 1000, log: Any = print) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    real = S.real_stats()
    all_runs = [load_runs(p) for p in paths]
    result: dict[str, Any] = {"runs": []}
    md = []
    for i, runs in enumerate(all_runs):
        if len(runs.records) < 2:
            continue
        log(f"{runs.path}:")
        summarize_runs(runs, real, boot, log)
        s = runs.setting
        specs = sorted((sp for sp in runs.records), key=lambda sp: (sp != "none", family(sp), runs.records[sp]["flops_ratio"], sp))
        title = f"{s['solver'].upper()} {s['steps']} steps"
        md.append(f"## {title}: every run\n\n{s['samples']} samples (labels 0–9 in turn, noise from seeds "
                  f"{s['seed']}…), CFG {s['cfg']}, eager, torch {s['torch']}. Intervals: 95 % bootstrap over samples.\n\n"
                  + metrics_table(runs, specs))
        best_md, best_rows = best_at(runs)
        md.append(f"## {title}: best fidelity at 2×, 3×, 4×, 5× (FLOPs ratio ≥ {1 - TOLERANCE:.2f}·N)\n\n" + best_md)
        entry = {"setting": s, "rows": [_row(runs, sp) for sp in specs], "best_at": best_rows,
                 "records": {label(k): {**v, "spec": label(k)} for k, v in runs.records.items()}}
        if i == 0:
            claims_md, claims_rows = claims_table(runs, boot)
            md.append(f"## {title}: the seed claims (paired, same noise)\n\n" + claims_md)
            entry["claims"] = claims_rows
            pareto_figure(runs, out)
            samples_figure(runs, ["none", "fora:3", "fora:3+taylor1", "fora:3+gocu", "duca:3:0.3", "toca:3:0.3",
                                  "mask:cal:0.5", "fora:6", "fora:6+taylor2"], out)
        else:
            pareto_figure(runs, out, f"quality_pareto_{safe_name(s['solver'])}_{s['steps']}.png")
        result["runs"].append(entry)
    sampler_md, sampler_rows = sampler_table(all_runs, real, boot)
    md.append("## The sampler: the uncached model at each setting\n\n" + sampler_md)
    result["sampler"] = sampler_rows
    (out / "quality.md").write_text("\n\n".join(md) + "\n")
    (out / "quality.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def analyze_main(args: Any) -> int:
    analyze([Path(p) for p in args.runs], Path(args.out), boot=args.boot, log=lambda m: print(m, flush=True))
    print(f"wrote {args.out}/quality.md, quality.json and figures")
    return 0
