"""FLOPs of whole sampling runs, cached vs uncached: the limit every speedup is read against.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` over the ATen ops that really run (the
step graphs under the eager backend), so partial recompute, reuse and the always-recomputed
parts (embedding, adaLN, output head) are all in the measurement, not estimated.

Example (``model`` a class-conditional diffusers DiT)::

    import cachecompile as cc
    schedule = cc.Schedule.duca(50, 3, 0.3)
    ratio = cc.flops_ratio(model, schedule, torch.tensor([1, 7]), null_class=1000, sample_size=32, in_channels=4)
"""

from __future__ import annotations

from typing import Any

import torch

from cachecompile.api import optimize
from cachecompile.sampling import ddim_sample

__all__ = ["flop_counter", "sampling_flops", "flops_ratio"]


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts attention on CPU, and counts the branch a
    ``torch.cond`` takes.

    torch 2.13's counter knows the CUDA attention kernels but not
    ``aten._scaled_dot_product_flash_attention_for_cpu``: without this mapping every attention
    product (4·B·T²·d per block) is missing from the count on CPU. For ``torch.cond`` (the dynamic
    schedules' branch) it counts the larger of the two branches and returns the true branch's
    output whatever the predicate; here the predicate is read and only the branch taken runs and
    is counted, so a counted run computes what an uncounted one does.
    """
    from torch.utils import flop_counter as F

    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_sdpa: _cpu_sdpa_flops} if cpu_sdpa is not None else {}
    inner = getattr(F, "_FlopCounterMode", None)
    if inner is None:  # another torch: its own cond handling
        return F.FlopCounterMode(display=False, custom_mapping=mapping)

    class _TakenBranch(inner):  # type: ignore[misc, valid-type]
        def _handle_higher_order_ops(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
            if func is torch.ops.higher_order.cond:
                pred, true_fn, false_fn, operands = args
                branch = true_fn if bool(pred) else false_fn
                with self:
                    # .forward: the counter's module tracker fails on a module called under
                    # no_grad with a parameter among its arguments (a step graph passes the
                    # skipped blocks' weights into the branch as operands).
                    return getattr(branch, "forward", branch)(*operands)
            return super()._handle_higher_order_ops(func, types, args, kwargs)

    class _Counter(F.FlopCounterMode):
        def __enter__(self) -> "_Counter":
            self.flop_counts.clear()
            self.mod_tracker.__enter__()
            self.mode = _TakenBranch(self)
            self.mode.__enter__()
            return self

    return _Counter(display=False, custom_mapping=mapping)


def sampling_flops(transformer: Any, class_labels: torch.Tensor, **sample_kwargs: Any) -> int:
    """Total FLOPs of one :func:`~cachecompile.sampling.ddim_sample` run of ``transformer``."""
    with flop_counter() as counter:
        ddim_sample(transformer, class_labels, **sample_kwargs)
    return counter.get_total_flops()


def flops_ratio(model: torch.nn.Module, schedule: Any, class_labels: torch.Tensor, **sample_kwargs: Any) -> float:
    """Uncached FLOPs ÷ cached FLOPs of a whole sampling run of ``model`` under ``schedule``
    (eager step graphs; every backend runs the same graphs). ``num_steps`` defaults to the
    schedule's; the model is not modified."""
    steps = sample_kwargs.setdefault("num_steps", schedule.num_steps)
    if steps != schedule.num_steps:
        raise ValueError(f"num_steps={steps} but the schedule has {schedule.num_steps} steps; drop num_steps or rebuild the schedule")
    base = sampling_flops(model, class_labels, **sample_kwargs)
    cached = optimize(model, schedule)
    ddim_sample(cached, class_labels, **sample_kwargs)  # capture outside the count: export traces the model once
    return base / max(sampling_flops(cached, class_labels, **sample_kwargs), 1)
