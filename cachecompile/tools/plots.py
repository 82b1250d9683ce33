"""PNG plots of a bench result (``bench.json``): speedup against quality, and per-step time by
step kind. matplotlib is optional (the ``bench`` extra); without it no plot is written.

Example::

    >>> import json                                                   # doctest: +SKIP
    >>> from cachecompile.tools.plots import write_plots
    >>> write_plots(json.load(open("bench-out/bench.json")), "bench-out")
    [PosixPath('bench-out/speed_vs_quality.png'), PosixPath('bench-out/step_times.png')]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["write_plots", "plot_speed_vs_quality", "plot_step_times"]

# One colour per implementation family, one marker per backend: the picture a user reads first.
_COLOURS = {"cachecompile": "tab:blue", "hand-written": "tab:green", "uncached": "black"}
_PEER_COLOURS = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
_MARKERS = {"eager": "o", "inductor": "s", "aoti": "D", "onnxruntime": "^", "tensorrt": "v"}


def _label(r: dict) -> str:
    return f"{r['impl']} {r['schedule']} {r['backend']}".replace(" none", "")


def _colour(impl: str, peers: list[str]) -> str:
    if impl in _COLOURS:
        return _COLOURS[impl]
    return _PEER_COLOURS[peers.index(impl) % len(_PEER_COLOURS)]


def _quality_axis(result: dict) -> tuple[str, str]:
    """Quality from the quality harness on the trained model (PSNR vs the uncached samples,
    higher is better); otherwise the rel-L1 difference from the uncached samples of the run."""
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if any(r.get("quality") and "psnr" in r["quality"] for r in rows):
        return "psnr", "PSNR vs uncached samples (dB), higher is better"
    return "rel_l1", "rel-L1 difference from the uncached samples, lower is better"


def plot_speed_vs_quality(result: dict[str, Any], path: str | Path) -> Path:
    """Speedup over the uncached eager model (y) against quality (x), one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, xlabel = _quality_axis(result)
    rows = [r for r in result["rows"] if r["status"] == "ok" and r["speedup"] is not None]
    peers = sorted({r["impl"] for r in rows if r["impl"] not in _COLOURS})
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        x = r["quality"].get("psnr") if key == "psnr" and r.get("quality") else r["rel_l1"]
        if x is None or x != x or x == float("inf"):
            x = 0.0 if key == "rel_l1" else None
        if x is None:
            continue
        ax.scatter(x, r["speedup"], c=_colour(r["impl"], peers), marker=_MARKERS.get(r["backend"], "o"), s=60)
        ax.annotate(_label(r), (x, r["speedup"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if key == "rel_l1":
        ax.set_xscale("symlog", linthresh=1e-4)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speedup over the uncached model (eager)")
    ax.set_title(f"{result['model']}, {result['steps']} steps, CFG batch {result['cfg_batch']}: speed vs quality")
    handles = [plt.Line2D([], [], color=_colour(i, peers), marker="o", ls="", label=i) for i in ["uncached", "cachecompile", "hand-written", *peers]
               if any(r["impl"] == i for r in rows)]
    handles += [plt.Line2D([], [], color="grey", marker=m, ls="", label=b) for b, m in _MARKERS.items() if any(r["backend"] == b for r in rows)]
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_step_times(result: dict[str, Any], path: str | Path) -> Path:
    """Mean time of a step of each kind (full, cached, ...) per row, as grouped horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok" and r.get("per_kind")]
    kinds: list[str] = []
    for r in rows:
        kinds += [k for k in r["per_kind"] if k not in kinds]
    fig, ax = plt.subplots(figsize=(10.5, 0.42 * len(rows) + 1.6))
    cmap = plt.get_cmap("tab10")
    labelled: set[str] = set()
    for i, r in enumerate(rows):  # each row splits its band among its own step kinds
        own = [k for k in kinds if k in r["per_kind"]]
        h = 0.8 / len(own)
        for j, kind in enumerate(own):
            ms = r["per_kind"][kind]["mean_ms"]
            ax.barh(i - 0.4 + (j + 0.5) * h, ms, height=h, color=cmap(kinds.index(kind)),
                    label=None if kind in labelled else kind)
            ax.annotate(f"{ms:.1f}", (ms, i - 0.4 + (j + 0.5) * h), fontsize=6, va="center",
                        xytext=(2, 0), textcoords="offset points")
            labelled.add(kind)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_label(r) for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlabel("mean time per step (ms, log scale)")
    ax.set_title(f"{result['model']}: per-step time by step kind")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Both plots into ``out_dir``; returns the files written (none without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'cachecompile[bench]')", file=sys.stderr)
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_speed_vs_quality(result, out / "speed_vs_quality.png"), plot_step_times(result, out / "step_times.png")]
