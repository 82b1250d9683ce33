"""Compensated reuse as graph ops: ``forecast`` actions and the history they read (GOC, EOC, Taylor).

For a ``forecast`` region the pass replaces the region's outputs (their uses outside the
region) by a value computed from cache slots and per-step inputs, with plain ATen ops:

* GOC, used-value queue: ``u = r + w·(r − r@h1)``; writes ``r ← u``, ``r@h1 ← r``.
* GOC computed / Taylor: ``u = r + c1·(r − r@h1) [+ c2·(r@h1 − r@h2)]``.
* EOC: ``u = r ⊙ (1 + scale·E[row])``, ``E`` the prior table (an explicit graph input).

At a compute step whose action keeps a ``history<k>`` state (see
:class:`cachecompile.methods.compensation.History`) the region runs as usual, :mod:`cachecompile.passes.cache_io`
writes its value to ``r``, and this pass shifts the older values down
(``r@hk ← … ← r@h1 ← r``), or fills them with the computed value at the first compute of a run.
Slot and input names are those of :mod:`cachecompile.methods.compensation`. The skipped region's nodes
are left to dead code removal.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

from cachecompile.methods.compensation.schedule import history_of, history_slots, state_slots
from cachecompile.core.schedule import Action, StepPlan
from cachecompile.passes import counters
from cachecompile.passes.cache_io import add_cache_input, add_cache_output, add_step_input
from cachecompile.core.regions import Region, RegionMap

log = logging.getLogger(__name__)

__all__ = ["compensate"]

aten = torch.ops.aten


def compensate(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Rewrite the plan's ``forecast`` regions and the history of its compute steps."""
    nodes = {n.name: n for n in gm.graph.nodes}
    n_forecast = n_history = 0
    for name, action in plan.actions:
        history = history_of(action)
        if action.kind != "forecast" and history is None:
            continue
        region = regions[name]
        for i, out_name in enumerate(region.outputs):
            out = nodes[out_name]
            with gm.graph.inserting_before(out.next):
                if history is not None:
                    _keep_history(gm, region.slot(i), out, *history)
                    n_history += 1
                else:
                    value = _forecast(gm, region, i, out, action)
                    out.replace_all_uses_with(value, delete_user_cb=lambda u: u.name not in region.nodes)
                    n_forecast += 1
    counters["forecasts"] += n_forecast
    counters["history_writes"] += n_history
    log.debug("compensation: %d forecast outputs, %d outputs keep history", n_forecast, n_history)
    return gm


# --------------------------------------------------------------------------- history


def _keep_history(gm: torch.fx.GraphModule, slot: str, out: torch.fx.Node, depth: int, first: bool) -> None:
    slots = history_slots(slot, depth)
    if first:  # nothing to shift yet: every older value is the computed one
        for s in slots[1:]:
            add_cache_output(gm, s, out)
        return
    _shift(gm, slots, out)


def _shift(gm: torch.fx.GraphModule, slots: list[str], like: torch.fx.Node) -> None:
    """``slots[k] ← slots[k-1]`` for the older entries. The value is cloned: the runtime writes
    outputs into the input buffers one after another, so an output that aliases an input would
    see that input overwritten first."""
    for newer, older in zip(slots[:-1], slots[1:]):
        ph = add_cache_input(gm, newer, like)
        add_cache_output(gm, older, _call(gm, aten.clone.default, ph, val=ph.meta.get("val")))


# --------------------------------------------------------------------------- forecast


def _forecast(gm: torch.fx.GraphModule, region: Region, index: int, out: torch.fx.Node, action: Action) -> torch.fx.Node:
    slot = region.slot(index)
    val = out.meta.get("val")
    method = action.method  # type: ignore[attr-defined]
    if method == "eoc":
        return _eoc(gm, slot, index, out, action, val)
    hist = [add_cache_input(gm, s, out) for s in state_slots(action, slot)]
    if action.queue == "used":  # type: ignore[attr-defined]
        r, h1 = hist
        w = _scalar(gm, f"{method}_w:{slot}", val)
        value = _call(gm, aten.add.Tensor, r, _call(gm, aten.mul.Tensor, _call(gm, aten.sub.Tensor, r, h1), w), val=val)
        add_cache_output(gm, f"{slot}@h1", _call(gm, aten.clone.default, r, val=val))
        add_cache_output(gm, slot, value)
        return value
    value = hist[0]
    for k in range(1, len(hist)):
        c = _scalar(gm, f"{method}_c{k}:{slot}", val)
        diff = _call(gm, aten.sub.Tensor, hist[k - 1], hist[k])
        value = _call(gm, aten.add.Tensor, value, _call(gm, aten.mul.Tensor, diff, c), val=val)
    return value


def _eoc(gm: torch.fx.GraphModule, slot: str, index: int, out: torch.fx.Node, action: Action, val: Any) -> torch.fx.Node:
    shapes = action.prior_shapes  # type: ignore[attr-defined]
    if index >= len(shapes):
        raise ValueError(f"EOC has no prior for output {index} of region {slot.partition('#')[0]!r} (slot {slot!r})")
    shape = tuple(shapes[index])
    feature = tuple(d if isinstance(d, int) else "batch" for d in val.shape) if val is not None else None
    row_shape = shape[1:]
    # a full prior was calibrated at one batch size: it fits the features of that batch
    full = feature is not None and len(row_shape) == len(feature) and row_shape[1:] == feature[1:]
    if feature is not None and not full and row_shape != feature[-1:]:
        shown = "[" + ", ".join(map(str, feature)) + "]"
        raise ValueError(
            f"EOC prior for {slot!r} has rows of shape {list(row_shape)}, but the feature has shape "
            f"{shown}: calibrate the prior on this model (per-channel rows [{feature[-1]}] or full rows {shown})"
        )
    cached = add_cache_input(gm, slot, out)
    prior = add_step_input(gm, f"eoc_prior:{slot}", _example(val, torch.zeros(shape, dtype=torch.float32)))
    row = add_step_input(gm, "eoc_row", _example(val, torch.zeros(1, dtype=torch.int64)))
    scale = _scalar(gm, f"eoc_scale:{slot}", val)
    trend = _call(gm, aten.view.default, _call(gm, aten.index_select.default, prior, 0, row), list(row_shape))
    if val is not None and val.dtype != torch.float32:
        trend = _call(gm, aten._to_copy.default, trend, dtype=val.dtype)
    factor = _call(gm, aten.add.Tensor, _call(gm, aten.mul.Tensor, trend, scale), 1)
    return _call(gm, aten.mul.Tensor, cached, factor, val=val)


# --------------------------------------------------------------------------- helpers


def _scalar(gm: torch.fx.GraphModule, name: str, val: Any) -> torch.fx.Node:
    """A float32 scalar step input, cast to the feature's dtype when that is not float32."""
    node = add_step_input(gm, name, _example(val, torch.zeros((), dtype=torch.float32)))
    if val is not None and val.dtype != torch.float32:
        node = _call(gm, aten._to_copy.default, node, dtype=val.dtype)
    return node


def _example(like: Any, tensor: torch.Tensor) -> torch.Tensor:
    """A placeholder's example value, fake when the graph's values are fake."""
    mode = getattr(like, "fake_mode", None)
    return mode.from_tensor(tensor, static_shapes=True) if mode is not None else tensor


def _call(gm: torch.fx.GraphModule, target: Any, *args: Any, val: Any = None, **kwargs: Any) -> torch.fx.Node:
    node = gm.graph.call_function(target, args, kwargs)
    if val is not None:
        node.meta["val"] = val
    return node
