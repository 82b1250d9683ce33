"""Calibration of the dynamic policies that need per-model numbers, from uncached runs:

* **TeaCache** — its rescaling polynomial. Per step ``s ≥ 1`` of each run: ``x`` = the relative
  L1 change of block 0's modulated input, ``mean|m_s − m_{s−1}| / mean|m_{s−1}|`` (what the
  policy measures), ``y`` = the relative L1 change of the model's output (what it estimates);
  the coefficients are the least-squares polynomial ``y ≈ p(x)`` (``numpy.polyfit``, degree 4
  as published, less when there are fewer points), highest degree first.
* **MagCache** — its magnitude ratios. Per step ``s``: the mean over tokens of
  ``‖R_s‖ / (‖R_{s−1}‖ + 1e-8)`` (norms over channels, float32), ``R`` the block stack's
  residual (output − input); ``1.0`` at step 0; averaged over runs. This is the quantity
  diffusers' MagCache prints in its calibration mode.

The runs go through the captured graph (the same values a step graph sees) with the probes
exposed as extra outputs; ``cachecompile.calibrate`` calls :func:`calibrate_dynamic`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils import _pytree as pytree

from cachecompile.core.errors import ScheduleError
from cachecompile.core.schedule import Schedule
from cachecompile.methods.dual.stack import stream_input
from cachecompile.methods.dynamic.graph import modulated_input
from cachecompile.passes import copy_graph_module
from cachecompile.passes.cache_io import add_cache_output
from cachecompile.passes.capture import capture
from cachecompile.passes.regions import find_regions

__all__ = ["CALIBRATED", "calibrate_dynamic"]

CALIBRATED = ("teacache", "magcache")
TEACACHE_DEGREE = 4


class _Probe(torch.nn.Module):
    """Stands in for the model in a sampling loop: runs the captured graph and keeps, per call,
    the stack's input and output, block 0's modulated input and the model's output."""

    def __init__(self, model: torch.nn.Module, regions: Any, calls_per_step: int) -> None:
        super().__init__()
        self.model, self.patterns, self.calls_per_step = model, regions, calls_per_step
        self.gm: Any = None
        self.calls = 0
        self.records: list[tuple[int, int, list[torch.Tensor]]] = []  # (step, call, [h0, out, m, y])

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        cap = capture(self.model, args, kwargs)
        rm = find_regions(cap.gm, self.patterns, cap.call.model_class)
        gm = copy_graph_module(cap.gm)
        h0, out = stream_input(gm, rm["stack"])
        add_cache_output(gm, "h0", h0)
        add_cache_output(gm, "out", out)
        add_cache_output(gm, "m", modulated_input(gm, rm))
        gm.recompile()
        self.gm, self.call = gm, cap.call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.gm is None:
            self._prepare(args, kwargs)
        cap = self.call
        tensors = cap.tensors(args, kwargs)  # InputMismatchError when the loop calls otherwise than at first
        with torch.no_grad():
            outs = self.gm(*tensors)
        n = cap.num_outputs
        step, call = divmod(self.calls, self.calls_per_step)
        self.records.append((step, call, [t.detach() for t in (*outs[n:], outs[0])]))
        self.calls += 1
        return pytree.tree_unflatten(list(outs[:n]), cap.out_spec)


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


def calibrate_dynamic(
    model: torch.nn.Module,
    schedule: Schedule,
    run: Callable[[Any, int], Any],
    num_samples: int,
    *,
    calls_per_step: int = 1,
    regions: Any = None,
) -> tuple[Schedule, dict[str, Any]]:
    """``schedule`` with its TeaCache coefficients or MagCache ratios measured on ``num_samples``
    uncached runs (``run(model, i)`` runs generation ``i``), and what was measured."""
    if schedule.method not in CALIBRATED:
        raise ScheduleError(f"cc.calibrate fits {CALIBRATED} schedules here, not {schedule.method!r}")
    probe = _Probe(model, regions, calls_per_step)
    per_run = schedule.num_steps * calls_per_step
    for i in range(num_samples):
        start = len(probe.records)
        run(probe, i)
        if len(probe.records) - start != per_run:
            raise ValueError(
                f"the sampling run made {len(probe.records) - start} model calls, not {schedule.num_steps} steps × "
                f"{calls_per_step} calls per step; sample with num_steps={schedule.num_steps}"
            )
    runs = [probe.records[k : k + per_run] for k in range(0, len(probe.records), per_run)]
    params = dict(schedule.params)
    if schedule.method == "teacache":
        xs, ys = [], []
        for records in runs:
            by_call: dict[int, list[list[torch.Tensor]]] = {}
            for _, call, vals in records:
                by_call.setdefault(call, []).append(vals)
            for seq in by_call.values():
                for prev, cur in zip(seq, seq[1:]):
                    xs.append(_rel_l1(cur[2], prev[2]))
                    ys.append(_rel_l1(cur[3], prev[3]))
        degree = min(TEACACHE_DEGREE, len(xs) - 1)
        if degree < 1:
            raise ValueError("TeaCache calibration needs at least 3 steps per run")
        params["coefficients"] = [float(c) for c in np.polyfit(np.array(xs), np.array(ys), degree)]
        measured: dict[str, Any] = {"input_change": xs, "output_change": ys}
    else:
        table = np.zeros((len(runs), schedule.num_steps))
        for r, records in enumerate(runs):
            prev: dict[int, torch.Tensor] = {}
            ratios: dict[int, list[float]] = {}
            for step, call, (h0, out, _, _) in records:
                res = (out - h0).float()
                if call in prev:
                    cur_norm, prev_norm = torch.linalg.norm(res, dim=-1), torch.linalg.norm(prev[call], dim=-1)
                    ratios.setdefault(step, []).append((cur_norm / (prev_norm + 1e-8)).mean().item())
                prev[call] = res
            table[r] = [1.0] + [float(np.mean(ratios[s])) for s in range(1, schedule.num_steps)]
        params["ratios"] = [float(v) for v in table.mean(axis=0)]
        measured = {"ratios_per_run": table.tolist()}
    out = Schedule(num_steps=schedule.num_steps, method=schedule.method, params=params, cache_dtype=schedule.cache_dtype)
    return out, measured
