"""``python -m cachecompile bench --context-parallel N``: cached step graphs under diffusers'
context parallelism (Ulysses degree ``N``), one process per rank on this machine (gloo on the CPU,
NCCL on CUDA devices), per schedule: the bytes each rank hands to collectives in one generation,
cached against uncached, and the wall time of a generation.

Bytes are counted from the step graphs each rank runs (every collective but the waits: the
tensor it sends, ``numel × itemsize``), one call per step of the generation; the uncached count is
that of the all-compute schedule, whose one step graph is the captured model with its
collectives. A reused attention leaves its all-to-alls out of the step graph on every rank: that
difference is communication saved. The ranks must agree (the run fails when they do not).

Example::

    python -m cachecompile bench --context-parallel 2 --model wan --schedule fora:3 duca:4:1.0 dbcache:0.1:1:0:1

The models are small configurations of diffusers' ``WanTransformer3DModel`` and
``FluxTransformer2DModel`` with random weights (their zero-initialised layers are given small
random values so outputs move); timings on CPU processes over gloo are indicative of nothing but
this machine.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cachecompile.passes.effects import is_collective, is_wait

__all__ = ["PARALLEL_MODELS", "collective_bytes", "generation_bytes", "run_parallel_bench", "parallel_report"]


def collective_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes one call of ``gm`` hands to collectives: the tensor each collective op sends (its
    first argument); a wait sends nothing."""
    total = 0
    for node in gm.graph.nodes:
        if not is_collective(node) or is_wait(node):
            continue
        sent = node.args[0] if node.args else None
        val = sent.meta.get("val") if isinstance(sent, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            total += val.numel() * val.element_size()
    return total


def generation_bytes(cached: Any) -> int:
    """Bytes a rank hands to collectives in one generation of a prepared ``CachedTransformer``:
    each step's graph once per call of the step."""
    program = cached.program
    calls = cached.calls_per_step if isinstance(cached.calls_per_step, int) else 1
    return calls * sum(collective_bytes(program.graphs[g]) for g in program.graph_of_step)


@dataclass
class _Model:
    make: Callable[[], torch.nn.Module]
    x0: Callable[[], torch.Tensor]
    kwargs: Callable[[torch.Tensor, float], dict]  # the call at t in [0, 1]
    note: str


def _small_random(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised weights (output heads, gates) get small random values, so a cached
    output differs from the uncached one and both from zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _wan() -> _Model:
    def make():
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        return _small_random(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=256, ffn_dim=128, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        ))

    g = torch.Generator().manual_seed(1)
    x0, text = torch.randn(1, 4, 4, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)
    return _Model(make, lambda: x0.clone(),
                  lambda x, t: dict(hidden_states=x, timestep=torch.full((1,), 1000.0 * t), encoder_hidden_states=text),
                  "Wan: 4 blocks, 4 heads × 16, 4 latent frames of 16×16 (256 tokens), 8 text tokens")


def _flux() -> _Model:
    def make():
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        return _small_random(FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
        ))

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 256, 4, generator=g)  # 16×16 latent patches, packed
    text, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1).reshape(256, 3)
    txt_ids = torch.zeros(8, 3)
    return _Model(make, lambda: x0.clone(),
                  lambda x, t: dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                                    timestep=torch.full((1,), t), img_ids=img_ids, txt_ids=txt_ids, guidance=None),
                  "Flux: 2 double + 4 single blocks, 4 heads × 16, 16×16 latent (256 tokens), 8 text tokens")


PARALLEL_MODELS: dict[str, Callable[[], _Model]] = {"wan": _wan, "flux": _flux}


def _to(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _generation(fn: Any, spec: _Model, steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """One generation (Euler steps from t = 1 to 0) and its wall time."""
    x = spec.x0().to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            out = fn(**_to(spec.kwargs(x, ts[i]), device), return_dict=False)[0]
            x = x + (ts[i + 1] - ts[i]) * out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, x.cpu()


def _rank(rank: int, world: int, store: str, out_dir: str, model: str, specs: list[str], steps: int,
          repeats: int, device_type: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import cachecompile as cc
    from cachecompile.tools.specs import parse_schedule

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    notes = []
    if torch.accelerator.device_count() == 0:
        # diffusers places rank r on device r % device_count(): on a CPU build of torch that divides
        # by zero; count the CPU as one device (this process only)
        torch.accelerator.device_count = lambda: 1
        notes.append("CPU build of torch: diffusers' device lookup given one device (rank % 1)")
    torch.set_num_threads(1)
    spec = PARALLEL_MODELS[model]()
    net = spec.make().to(device)
    net.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    rows = []
    all_compute = cc.optimize(net, cc.Schedule.fora(steps, 1))
    _generation(all_compute, spec, steps, device)
    uncached_bytes = generation_bytes(all_compute)
    del all_compute
    _generation(net, spec, steps, device)  # warm-up
    seconds = [_generation(net, spec, steps, device)[0] for _ in range(repeats)]
    _, reference = _generation(net, spec, steps, device)
    rows.append(dict(schedule="none", bytes=uncached_bytes, seconds=statistics.median(seconds), rel_l1=0.0, kinds=None))
    for name in specs:
        schedule = parse_schedule(name, steps)
        cached = cc.optimize(net, schedule)
        try:
            _, out = _generation(cached, spec, steps, device)  # capture, rewrite, first run
        except Exception as e:  # noqa: BLE001 - refused alike on every rank (before any collective runs)
            rows.append(dict(schedule=name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        seconds = [_generation(cached, spec, steps, device)[0] for _ in range(repeats)]
        rel = ((out - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12)).item()
        rows.append(dict(schedule=name, bytes=generation_bytes(cached), seconds=statistics.median(seconds),
                         rel_l1=rel, kinds=cached.decisions))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rows=rows, notes=notes), f)
    dist.destroy_process_group()


def run_parallel_bench(model: str, specs: list[str], *, world: int = 2, steps: int = 8, repeats: int = 3,
                       device: str | None = None, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run ``world`` ranks (spawned processes) and return the table: per schedule, the bytes each
    rank sent in one generation (equal on every rank, else an error), against uncached."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if model not in PARALLEL_MODELS:
        raise SystemExit(f"--context-parallel runs {sorted(PARALLEL_MODELS)}, not {model!r}")
    if world < 2:
        raise SystemExit("--context-parallel needs 2 or more ranks")
    if not dist.is_available():
        raise SystemExit("this torch build has no torch.distributed")
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise SystemExit(f"--context-parallel {world} on CUDA needs {world} devices, this machine has {torch.cuda.device_count()}")
    from cachecompile.tools.specs import parse_schedule

    for name in specs:  # bad specs fail here, before any process starts
        parse_schedule(name, steps)
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_rank, args=(world, os.path.join(folder, "store"), folder, model, list(specs), steps, repeats,
                                              device_type), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise RuntimeError(f"the {world} ranks did not finish in {timeout_s:.0f} s")
        ranks = []
        for r in range(world):
            with open(os.path.join(folder, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    def agreed(rank: dict) -> list:
        return [(row["schedule"], row.get("bytes"), row.get("kinds"), row.get("error")) for row in rank["rows"]]

    for r, got in enumerate(ranks[1:], 1):
        if agreed(got) != agreed(ranks[0]):
            raise RuntimeError(f"rank {r} sent other bytes or decided otherwise than rank 0: {agreed(got)} vs {agreed(ranks[0])}")
    uncached = ranks[0]["rows"][0]["bytes"]
    rows = []
    for i, row in enumerate(ranks[0]["rows"]):
        if "error" in row:
            rows.append(dict(schedule=row["schedule"], error=row["error"]))
            continue
        seconds = max(rank["rows"][i]["seconds"] for rank in ranks)  # a generation ends when its slowest rank does
        rows.append(dict(schedule=row["schedule"], bytes_per_rank=row["bytes"], uncached_bytes_per_rank=uncached,
                         saved=1 - row["bytes"] / uncached if uncached else 0.0, seconds=seconds,
                         rel_l1=max(rank["rows"][i]["rel_l1"] for rank in ranks), decisions=row["kinds"]))
    return dict(model=model, description=PARALLEL_MODELS[model]().note, world=world, ulysses_degree=world, steps=steps,
                repeats=repeats, device=device_type, backend="nccl" if device_type == "cuda" else "gloo",
                torch=torch.__version__, notes=ranks[0]["notes"], rows=rows)


def parallel_report(result: dict[str, Any]) -> str:
    lines = [
        f"Context parallelism: {result['description']}; Ulysses degree {result['ulysses_degree']} over "
        f"{result['world']} processes ({result['backend']}, {result['device']}), {result['steps']} Euler steps, "
        f"median of {result['repeats']} generations, torch {result['torch']}.",
        "",
        "Bytes each rank hands to collectives in one generation (counted from its step graphs; every rank "
        "the same); a reused attention's all-to-alls are not sent. Time: the slowest rank's median generation.",
        "",
        "| schedule | bytes per rank per generation | uncached | saved | time (s) | rel-L1 to uncached |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['schedule']} | refused: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['schedule']} | {r['bytes_per_rank']:,} | {r['uncached_bytes_per_rank']:,} | {r['saved']:.0%} "
                     f"| {r['seconds']:.3f} | {r['rel_l1']:.4f} |")
    if result["notes"]:
        lines += ["", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines)
