"""The bench's targets (what the benchmark must show, met or missed with the number) and its
Markdown report."""

from __future__ import annotations

from typing import Any

__all__ = ["EFFICIENCY_TARGET", "COMPILE_TIME_FACTOR", "CLOSE_EFFICIENCY_TARGET", "MEMORY_MARGIN_MB", "DYNAMIC_METHODS", "check_targets", "decisions_of", "markdown_report"]


EFFICIENCY_TARGET = 0.95
COMPILE_TIME_FACTOR = 2.5
# the cache-memory issue's targets: compiled efficiency of these schedules, over interleaved rounds
CLOSE_EFFICIENCY_TARGET = 0.97
CLOSE_EFFICIENCY_SCHEDULES = ("fora:3", "duca:3:0.3")
# peak memory of a cached run ≤ the uncached run's on the same backend + the cache + this margin
MEMORY_MARGIN_MB = 4.0
MEMORY_MARGIN_FRACTION = 0.05  # of the uncached peak + the cache (allocator rounding, RSS pages)


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
    ) + " (per-step times from the median instrumented run): the difference is work that caching does not remove and per-op overhead"


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

    def add_memory(r: dict, base: dict | None, name: str) -> None:
        t = (f"peak memory ≤ uncached peak + cache + margin ({MEMORY_MARGIN_MB:g} MiB + "
             f"{MEMORY_MARGIN_FRACTION:.0%} of the two)")
        if base is None or not ok(base) or base.get("peak_memory_mb") is None or r.get("peak_memory_mb") is None:
            memory = (r.get("info") or {}).get("memory", "")
            add(t, name, None, "not measured", memory if memory.startswith("not measured") else "needs the uncached row of the backend")
            return
        cache = r.get("cache_mb") or 0.0
        bound = (base["peak_memory_mb"] + cache) * (1 + MEMORY_MARGIN_FRACTION) + MEMORY_MARGIN_MB
        add(t, name, r["peak_memory_mb"] <= bound,
            f"{r['peak_memory_mb']:.1f} MiB (bound {bound:.1f}: uncached {base['peak_memory_mb']:.1f} + cache {cache:.1f})")

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
        if r["backend"] != "eager" and ok(r) and r["schedule"] in CLOSE_EFFICIENCY_SCHEDULES:
            info = r.get("info") or {}
            t = f"efficiency ≥ {CLOSE_EFFICIENCY_TARGET}, the median of interleaved rounds (compiled){where}"
            if "efficiency_interval" not in info:
                add(t, name, None, "fewer than 3 interleaved rounds with the uncached row", "run with --efficiency-rounds 60 or so")
            else:
                med, (lo, hi) = info["efficiency_median_round"], info["efficiency_interval"]
                rounds = len(info["efficiency_rounds"])
                bound = f"; memory-traffic bound {info['traffic']['bound']:.3f}" if "traffic" in info else ""
                add(t, name, med >= CLOSE_EFFICIENCY_TARGET,
                    f"{med:.3f} [{lo:.3f}, {hi:.3f}] over {rounds} rounds{bound}",
                    "" if hi - lo <= 0.02 + 1e-9 else "the interval is wider than ±0.01: more rounds (--efficiency-rounds) or a quieter machine")
        base = uncached.get(r["backend"])
        if ok(r):
            add_memory(r, base, name)
        if r["backend"] != "eager" and ok(r):
            t = f"compile time ≤ {COMPILE_TIME_FACTOR} × the uncached model's"
            if base is None or not ok(base) or not base["compile_seconds"]:
                add(t, name, None, f"{r['compile_seconds']:.1f} s", "no uncached compiled row")
            else:
                factor = r["compile_seconds"] / base["compile_seconds"]
                met = factor <= COMPILE_TIME_FACTOR
                add(t, name, met, f"{factor:.2f}× ({r['compile_seconds']:.1f} s vs {base['compile_seconds']:.1f} s)",
                    "" if met else f"{r['step_graphs']} step graphs are compiled one by one; the uncached model is one graph")
    for static in (r for r in rows if r["impl"] == "cachecompile-static-batch"):
        if ok(static):
            add_memory(static, uncached.get(static["backend"]), f"{static['schedule']} {static['backend']} (static batch)")
        mine = next((r for r in ours if r["schedule"] == static["schedule"] and r["backend"] == static["backend"]), None)
        name = f"{static['schedule']} {static['backend']}"
        t = f"with the dynamic batch in the step graphs, efficiency ≥ {EFFICIENCY_TARGET}{where}"
        if mine is None or not ok(mine) or not ok(static) or mine["efficiency"] is None or static["efficiency"] is None:
            add(t, name, None, "not measured", "needs the dynamic- and static-batch rows and the uncached row of the backend")
            continue
        add(t, name, mine["efficiency"] >= EFFICIENCY_TARGET,
            f"{mine['efficiency']:.2f} dynamic batch, {static['efficiency']:.2f} static batch "
            f"({static['seconds'] / mine['seconds']:.2f}× the static-batch speed)")
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
    for r in (r for r in ours if r.get("method") in DYNAMIC_METHODS and r["backend"] in ("eager", "inductor")):
        for peer in (p for p in rows if p["impl"] in DYNAMIC_PEERS and p["schedule"] == r["schedule"] and p["backend"] == r["backend"]):
            t = (f"at the same settings, the same decisions as {peer['impl']} and faster "
                 f"({'eager' if r['backend'] == 'eager' else 'compiled'})")
            name = f"{r['schedule']} {r['backend']}"
            if not ok(r) or not ok(peer):
                add(t, name, None, "not measured", peer["reason"] or r["reason"])
                continue
            mine, theirs = decisions_of(r), decisions_of(peer)
            same = mine is not None and mine == theirs
            met = same and r["seconds"] < peer["seconds"]
            add(t, name, met,
                f"decisions {'identical' if same else 'differ'} ({_compact(mine)} vs {_compact(theirs)}); "
                f"{peer['seconds'] / r['seconds']:.2f}× {peer['impl']}'s speed ({r['seconds']:.3f} s vs {peer['seconds']:.3f} s)",
                "" if met else _why_steps(r, peer))
    return out


# Schedules whose steps are decided by the policy, and the peers that run the same policies.
DYNAMIC_METHODS = ("dbcache", "teacache", "magcache")
DYNAMIC_PEERS = ("cache-dit", "fbc", "magcache")


def decisions_of(row: dict) -> list[str] | None:
    """``full``/``cached`` per step of a row's last run: ours from ``cached.decisions`` (or the
    schedule's labels), cache-dit's from its cached steps, diffusers' hooks' from the steps where
    the last block ran."""
    info = row.get("info") or {}
    n = len(row.get("step_kinds") or row.get("step_flops") or [])
    if "decisions" in info:
        return list(info["decisions"])
    if "cached_steps" in info:
        return ["cached" if s in set(info["cached_steps"]) else "full" for s in range(n)]
    if "computed_steps" in info:
        return ["full" if s in set(info["computed_steps"]) else "cached" for s in range(n)]
    if row.get("impl") == "cachecompile" and row.get("step_kinds"):
        return list(row["step_kinds"])
    return None


def _compact(decisions: list[str] | None) -> str:
    """``F`` full, ``C`` cached, per step."""
    if decisions is None:
        return "?"
    return "".join({"full": "F", "cached": "C"}.get(d, "?") for d in decisions)


def _f(v: float | None, fmt: str, missing: str = "—") -> str:
    return missing if v is None else format(v, fmt)


def _quality_cell(q: dict | None) -> str:
    if not q:
        return "—"
    return f"acc {q['accuracy']:.3f}, FID {q['fid']:.1f}, PSNR {q.get('psnr', float('nan')):.1f}"


def _loaded_note(result: dict[str, Any]) -> str:
    """A warning when other jobs competed for the CPUs: with several intra-op threads each op
    waits for its slowest thread, so times then depend on the other jobs far more than 1:1."""
    la = (result.get("load_average") or {}).get("start")
    cpus = result.get("cpus")
    threads = result.get("threads")
    if not la or not cpus or not threads or threads < 2 or la[0] < 0.75 * cpus:
        return ""
    return (
        f"The machine was loaded (load average {la[0]:.1f} on {cpus} CPUs) and torch ran {threads} threads: every op "
        f"then waits for its slowest thread, so a call can take many times its unloaded time (measured here: "
        f"15-25x at load 8 on 2 CPUs). Compare rows only within this run, or rerun with --threads 1."
    )


def _runs_text(result: dict[str, Any]) -> str:
    """How many timed runs the medians are of."""
    extra = result.get("efficiency_rounds") or 0
    if not extra:
        return f"{result['repeats']} runs"
    return f"{result['repeats']} runs ({result['repeats'] + extra} for the compiled rows: --efficiency-rounds {extra})"


def markdown_report(result: dict[str, Any]) -> str:
    """The main table, the per-step table, the targets, and what did not run."""
    la = result.get("load_average") or {}
    load = ""
    if la.get("start"):
        load = f", load average {la['start'][0]:.1f} → {la['end'][0]:.1f}"
    lines = [
        f"model `{result['model']}`, {result['steps']} DDIM steps, CFG batch {result['cfg_batch']}, "
        f"median of {_runs_text(result)} after {result['warmup']} warm-up, torch {result['torch']}, "
        f"{result['device']}, {result['machine']}{load}",
        "",
        "speedup: against the uncached model in eager mode; vs same backend: against the uncached model "
        "on the row's backend (torch.compile for inductor); efficiency = vs same backend ÷ FLOPs ratio "
        "(from the medians; the targets also give its range over the rounds of interleaved runs).",
        "",
        "| implementation | schedule | backend | time (s) | speedup | vs same backend | FLOPs ratio | efficiency "
        "| compile (s) | graphs | breaks / recompiles | peak MiB | cache MiB | predicted cache MiB | max abs diff | rel-L1 | quality |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | {r['schedule']} | {r['backend']} | {r['status']} |" + " |" * 13)
            continue
        graphs = r["step_graphs"] if r["step_graphs"] is not None else r["dynamo_graphs"]
        lines.append(
            f"| {r['impl']} | {r['schedule']} | {r['backend']} | {r['seconds']:.3f} | {_f(r['speedup'], '.2f')}× "
            f"| {_f(r['speedup_same_backend'], '.2f')}× | {_f(r['flops_ratio'], '.2f')}× | {_f(r['efficiency'], '.2f')} "
            f"| {_f(r['compile_seconds'], '.1f')} | {graphs if graphs is not None else '—'} "
            f"| {r['graph_breaks']} / {r['recompiles']} | {_f(r['peak_memory_mb'], '.0f')} | {_f(r['cache_mb'], '.2f')} | {_f(r.get('cache_predicted_mb'), '.2f')} "
            f"| {r['max_abs_diff']:.1e} | {r['rel_l1']:.4f} | {_quality_cell(r['quality'])} |"
        )
    lines += [
        "",
        f"Per-step time by step kind: mean ms of one transformer call (number of steps) in the median of "
        f"{result['repeats']} instrumented runs, each made right after a timed run of the same row (a timer around "
        f"each call; the timed runs carry none). calls = the sum of its steps; rest = that run outside the calls "
        f"(noise, CFG combine, scheduler); calls + rest = that run's time, which should match the timed median.",
        "",
        "| implementation | schedule | backend | per step (ms) | calls (s) | rest (s) | instrumented run (s) | timed run (s) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["status"] == "ok":
            cells = " · ".join(f"{k} {v['mean_ms']:.1f} ({v['count']})" for k, v in r["per_kind"].items())
            lines.append(
                f"| {r['impl']} | {r['schedule']} | {r['backend']} | {cells} | {_f(r.get('calls_seconds'), '.3f')} "
                f"| {_f(r.get('outside_seconds'), '.3f')} | {_f(r.get('instrumented_seconds'), '.3f')} | {r['seconds']:.3f} |"
            )
    loaded = _loaded_note(result)
    if loaded:
        lines += ["", loaded]
    dynamic = [r for r in result["rows"] if r["status"] == "ok" and (r.get("method") in DYNAMIC_METHODS or r["impl"] in DYNAMIC_PEERS)]
    if dynamic:
        lines += ["", "Decisions of the dynamic rows (F full, C cached, per step of the run on the bench's inputs):", "",
                  "| implementation | schedule | backend | decisions | cached steps |", "|---|---|---|---|---:|"]
        for r in dynamic:
            d = decisions_of(r)
            lines.append(f"| {r['impl']} | {r['schedule']} | {r['backend']} | `{_compact(d)}` | "
                         f"{'—' if d is None else d.count('cached')} |")
    traffic = [r for r in result["rows"] if r["status"] == "ok" and "traffic" in (r.get("info") or {})]
    if traffic:
        bw = traffic[0]["info"]["traffic"]["bandwidth"]
        lines += ["", f"Memory traffic a generation adds to the uncached one (cache writes and reads; weights a step "
                      f"reads beyond its share of the FLOPs) and the efficiency it leaves reachable at the measured read "
                      f"bandwidth, {bw / 1e9:.1f} GB/s: bound = T / (T + added bytes / bandwidth), T = the uncached "
                      f"run ÷ the FLOPs ratio (every other cost only lowers it):", "",
                  "| implementation | schedule | backend | cache writes (MB) | cache reads (MB) | weights (MB) "
                  "| added (ms) | bound | efficiency |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in traffic:
            t = r["info"]["traffic"]
            lines.append(
                f"| {r['impl']} | {r['schedule']} | {r['backend']} | {t['cache_write_bytes'] / 1e6:.1f} "
                f"| {t['cache_read_bytes'] / 1e6:.1f} | {t['weight_bytes_beyond_flops'] / 1e6:.1f} "
                f"| {1e3 * t['added_seconds']:.1f} | {t['bound']:.3f} | {_f(r['efficiency'], '.3f')} |"
            )
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


