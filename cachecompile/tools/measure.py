"""How the bench measures: isolated compiles, per-call timers and FLOP counters, peak memory,
graph breaks and recompiles from Dynamo, per-kind step statistics."""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cachecompile.tools.flops import flop_counter

__all__ = [
    "isolated_compile", "sync", "PerStep", "PeakMemory", "dynamo_snapshot", "add_dynamo_delta", "per_kind",
    "kinds_from_flops", "first_line", "fresh_compile_cache",
]


def isolated_compile(model: Any, **options: Any) -> Any:
    """``torch.compile`` with its own cache of compiled entries (``isolate_recompiles``, torch
    >= 2.10 or so): models compiled side by side in one process — all the bench's rows stay
    alive for the interleaved timed runs — do not count as each other's recompiles nor share
    one recompile limit."""
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        options["isolate_recompiles"] = True
    return torch.compile(model, **options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PerStep:
    """Wraps a transformer: times each call, or counts its FLOPs; ``model`` tells ddim_sample the device."""

    def __init__(self, fn: Callable[..., Any], model: torch.nn.Module, *, flops: bool = False) -> None:
        self.fn, self.model, self.count_flops = fn, model, flops
        self.values: list[float] = []

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.count_flops:
            with flop_counter() as counter:
                out = self.fn(*args, **kwargs)
            self.values.append(counter.get_total_flops())
            return out
        device = next(self.model.parameters()).device
        sync(device)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        sync(device)
        self.values.append(time.perf_counter() - t0)
        return out


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so a run's peak RSS shows what it allocates
    rather than what earlier runs left in the allocator's free lists."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a block, in MiB above what was in use when it began.

    CUDA: ``max_memory_allocated``. CPU: the same measure, from the allocation and free events
    torch's profiler records for torch's CPU allocator (``profile_memory=True``): the most bytes
    of tensors allocated in the block alive at once. (An ONNX Runtime session's own arena is not
    torch's, and is not counted.) Where the profiler cannot say, Linux: peak RSS after
    ``malloc_trim``, reset through ``/proc/self/clear_refs`` (the C allocator's free lists and the
    kernel's lazy counters move it by tens of MiB); elsewhere the growth of the process's lifetime
    peak RSS (``ru_maxrss``), a lower bound. Both CPU measures slow the run: use it on an untimed run.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.mb, self.method = device, None, ""
        # True when only torch's allocator is counted (CUDA, the profiler), so that memory a
        # library allocates on its own (an ONNX Runtime session's arena) is not seen
        self.torch_allocations_only = False
        self._profile: Any = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method, self.torch_allocations_only = "cuda max_memory_allocated", True
            return self
        if self.device.type == "cpu":
            try:
                from torch.profiler import ProfilerActivity, profile

                self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                with _quiet_stderr():  # the profiler's library logs its start and stop there
                    self._profile.__enter__()
                self.method = "torch CPU allocator: most bytes allocated in the run alive at once (profiler events)"
                self.torch_allocations_only = True
                return self
            except Exception:  # noqa: BLE001 - a profiler that cannot start: measure RSS
                self._profile = None
        try:
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._base = _proc_status_kb("VmRSS")
            self.method = "peak RSS (VmHWM) above the RSS before"
        except OSError:
            self._base = None
        if self._base is None:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "growth of the process peak RSS (ru_maxrss; a lower bound)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._profile is not None:
            with _quiet_stderr():
                self._profile.__exit__(*exc)
            if exc[0] is None:
                self.mb = _allocated_peak(self._profile, self.device) / 2**20
        elif self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self.method.startswith("peak RSS"):
            self.mb = ((_proc_status_kb("VmHWM") or 0) - self._base) / 1024
        else:
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """The process's standard error (file descriptor 2, where C++ libraries log) sent to
    /dev/null for the block."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _allocated_peak(prof: Any, device: torch.device) -> int:
    """The most bytes alive at once among those allocated during ``prof`` (its allocation events
    are signed: positive allocations, negative frees; frees of blocks allocated before it count
    for nothing)."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == device.type:
            alloc = node.typed[1]
            events.append((node.start_time_ns, alloc.ptr, alloc.alloc_size))
    live: dict[int, int] = {}
    now = peak = 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            now += size
            peak = max(peak, now)
        elif ptr in live:  # a free of a block allocated in the run
            now -= live.pop(ptr)
    return peak


def dynamo_snapshot() -> dict[str, Any]:
    from torch._dynamo.utils import counters, get_compilation_metrics

    return {
        "breaks": dict(counters["graph_break"]),
        "graphs": counters["stats"]["unique_graphs"],
        "metrics": len(get_compilation_metrics()),
    }


def add_dynamo_delta(row: Any, before: dict[str, Any]) -> None:
    """Add the graph breaks (with reasons), recompiles and graphs compiled since ``before`` to ``row``."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    breaks = {k: v - before["breaks"].get(k, 0) for k, v in counters["graph_break"].items()}
    by_reason = dict(row.info.get("graph_breaks_by_reason", {}))
    for k, n in breaks.items():
        if n > 0:  # Dynamo's keys carry details after the first line
            first = k.splitlines()[0][:140] if k else "?"
            by_reason[first] = by_reason.get(first, 0) + n
    row.info["graph_breaks_by_reason"] = by_reason
    row.graph_breaks = sum(by_reason.values())
    row.graph_break_reasons = [f"{n}× {k}" for k, n in sorted(by_reason.items(), key=lambda kv: -kv[1])]
    new = get_compilation_metrics()[before["metrics"]:]
    row.recompiles = (row.recompiles or 0) + sum(1 for m in new if getattr(m, "recompile_reason", None))
    row.dynamo_graphs = (row.dynamo_graphs or 0) + counters["stats"]["unique_graphs"] - before["graphs"]


def per_kind(kinds: list[str], seconds: list[float], flops: list[int]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for i, kind in enumerate(kinds):
        d = out.setdefault(kind, {"count": 0, "total_s": 0.0, "flops": 0})
        d["count"] += 1
        d["total_s"] += seconds[i] if i < len(seconds) else 0.0
        d["flops"] += flops[i] if i < len(flops) else 0
    for d in out.values():
        d["mean_ms"] = 1e3 * d["total_s"] / d["count"]
        d["mean_gflops"] = d["flops"] / d["count"] / 1e9
    return out


def kinds_from_flops(step_flops: list[int], full_flops: float) -> list[str]:
    """Labels for peers that decide at run time: a step that did a full step's FLOPs was full."""
    return ["full" if f >= 0.99 * full_flops else "cached" for f in step_flops]


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def fresh_compile_cache(root: str | None) -> Any:
    """Empty Inductor caches (in memory and on disk) for one configuration, so its compile time
    is cold and owes nothing to kernels an earlier row or an earlier process compiled."""
    if root is None:
        return contextlib.nullcontext()
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:  # private API; without it compile times may be warm
        return contextlib.nullcontext()
    return fresh_cache(dir=root, delete=False)


