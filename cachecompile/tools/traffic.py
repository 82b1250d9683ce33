"""The memory traffic caching adds, and the efficiency it leaves reachable on a machine.

A cached step does a fraction of a percent of a full step's FLOPs but still moves memory: it
reads the cache and the weights of what it recomputes (FORA: every block's gate linears, the
timestep embedder, the output head), and a full step of a cached program writes the cache on
top of what the uncached step does. At the machine's read bandwidth that traffic costs time the
FLOPs ratio does not count, so whatever else a step costs (kernel launches, Python, the
sampler), the efficiency (speedup ÷ FLOPs ratio) of a cached program stays below

    bound = T / (T + added bytes / bandwidth),   T = uncached run time / FLOPs ratio

where the added bytes are the cache's writes and reads plus the weights a step reads beyond its
share of the FLOPs (a step with 0.15 % of the FLOPs reads far more than 0.15 % of the weights).
The bench (:mod:`cachecompile.tools.bench`) gives it beside the measured efficiency.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import torch
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from cachecompile.tools.measure import sync

__all__ = ["weight_bytes", "record_traffic", "read_bandwidth", "traffic_bound"]

# ops whose output aliases their input: reading one reads (part of) the attribute it views
_VIEWS = {"slice", "t", "view", "reshape", "_reshape_alias", "transpose", "permute", "unsqueeze", "squeeze",
          "expand", "select", "alias", "detach", "split", "chunk", "unflatten", "flatten", "getitem"}


def _name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _is_view(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and _name(node) in _VIEWS


def _nbytes(node: torch.fx.Node) -> int:
    """Bytes of a node's tensor value, from ShapeProp's ``tensor_meta`` (0 for non-tensors)."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata):
        return 0
    return meta.shape.numel() * meta.dtype.itemsize


def weight_bytes(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> int:
    """Bytes of its parameters and buffers that one run of ``gm`` on ``example_inputs`` reads:
    per attribute, what the ops that compute read of it through views (a slice of the adaLN
    weight is read, not the whole weight; an embedding lookup reads the rows it gathers), at
    most the whole tensor. Runs ``gm`` once (``ShapeProp``) and leaves its nodes as they were."""
    kept = {n: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    ShapeProp(gm).propagate(*example_inputs)
    try:
        total = 0
        for node in gm.graph.find_nodes(op="get_attr"):
            value = functools.reduce(getattr, node.target.split("."), gm)
            if not isinstance(value, torch.Tensor):
                continue
            reads: dict[torch.fx.Node, int] = {}  # per node read by a computing op (the attribute or a view)
            frontier, seen = [node], set()
            while frontier:
                n = frontier.pop()
                for user in n.users:
                    if _is_view(user):
                        if user not in seen:
                            seen.add(user)
                            frontier.append(user)
                        continue
                    whole = value.nbytes if n is node else _nbytes(n)
                    gathered = _name(user) == "embedding" and user.args[0] is n
                    reads[n] = max(reads.get(n, 0), min(_nbytes(user), whole) if gathered else whole)
            total += min(sum(reads.values()), value.nbytes)
        return total
    finally:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        for node, meta in kept.items():
            node.meta["tensor_meta"] = meta


def record_traffic(cached: Any, generate: Callable[[Any], Any]) -> list[dict[str, int]]:
    """Per transformer call of one generation ``generate(cached)`` of a prepared cached
    transformer (``cc.optimize(...)`` after its first run): the step graph it ran, the bytes of
    cache it read and wrote, and the bytes of weights its graph reads (:func:`weight_bytes`)."""
    program = cached.program
    if program is None or program.graphs is None:
        raise ValueError("record_traffic needs a cached transformer that has run (its program keeps its step graphs)")
    n_in, n_out = len(program.call.tensor_leaves), program.call.num_outputs
    calls: list[dict[str, int]] = []
    weights: dict[int, int] = {}
    runners = list(program.runners)

    def recording(idx: int, runner: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            outs = runner(*args)
            if idx not in weights:
                weights[idx] = weight_bytes(program.graphs[idx], list(args))
            reads = args[n_in:n_in + len(program.io[idx].cache_inputs)]
            calls.append({"graph": idx, "cache_read": sum(t.nbytes for t in reads),
                          "cache_write": sum(t.nbytes for t in outs[n_out:]), "weights": weights[idx]})
            return outs
        return run

    program.runners[:] = [recording(i, r) for i, r in enumerate(runners)]
    try:
        with torch.no_grad():
            generate(cached)
    finally:
        program.runners[:] = runners
    return calls


def read_bandwidth(device: torch.device | str = "cpu", mib: int = 1024, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s with the current torch threads: the median time of summing a
    buffer far larger than the CPU caches (on CUDA, timed with a synchronize either side)."""
    device = torch.device(device)
    x = torch.ones(mib * 2**20 // 4, device=device)
    x.sum()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times)


def traffic_bound(
    calls: list[dict[str, int]], step_flops: list[int], full_flops: int, uncached_seconds: float,
    flops_ratio: float, bandwidth: float,
) -> dict[str, float]:
    """The efficiency bound (module docstring) of one generation whose calls are ``calls``
    (:func:`record_traffic`) with ``step_flops`` FLOPs each, against an uncached run of
    ``uncached_seconds`` whose every step does ``full_flops``; ``bandwidth`` in bytes/s."""
    if len(calls) != len(step_flops):
        raise ValueError(f"{len(calls)} recorded calls but {len(step_flops)} steps of FLOPs")
    full_weights = max(c["weights"] for c in calls)  # a full step reads every weight the model uses
    writes = sum(c["cache_write"] for c in calls)
    reads = sum(c["cache_read"] for c in calls)
    weights = sum(max(0.0, c["weights"] - f / full_flops * full_weights) for c, f in zip(calls, step_flops))
    added = (writes + reads + weights) / bandwidth
    ideal = uncached_seconds / flops_ratio
    return {"cache_write_bytes": writes, "cache_read_bytes": reads, "weight_bytes_beyond_flops": weights,
            "bandwidth": bandwidth, "added_seconds": added, "bound": ideal / (ideal + added)}
