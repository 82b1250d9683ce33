"""Plain reuse: FORA, Learning-to-Cache style masks and explicit per-step actions.

These methods only read and write whole cached outputs, so their graph pass is the generic cache
I/O of :mod:`cachecompile.passes.cache_io` and they have no per-step values; compensation
(:mod:`cachecompile.methods.compensation`) attaches to each of them.

* **FORA** — step ``s`` computes everything when ``s % interval == 0``; other steps reuse every
  block branch's output (taken before the adaLN gate).
* **mask** — ``mask[step][block][branch]``: 1 computes, 0 reuses.
* **explicit** — any region by name, per step.

>>> import cachecompile as cc
>>> cc.Schedule.fora(6, 3).step_kinds()
['full', 'cached', 'cached', 'full', 'cached', 'cached']
"""

from __future__ import annotations

from typing import Any, Mapping

from cachecompile.core.schedule import REUSE, Action, Layout, Method, Schedule, ScheduleError, check_int, register_method

__all__ = ["FORA", "MASK", "EXPLICIT", "check_params"]


def check_params(s: Schedule, **expected: Any) -> dict[str, Any]:
    """``s.params`` with every name of ``expected`` (name → default, or ``...`` when required)
    and no other; a :class:`ScheduleError` names a stray or missing parameter."""
    params = dict(s.params)
    stray = sorted(set(params) - set(expected))
    if stray:
        raise ScheduleError(f"schedule method {s.method!r} has no parameter(s) {stray}; its parameters are {sorted(expected)}")
    for name, default in expected.items():
        if name not in params:
            if default is ...:
                raise ScheduleError(f"schedule method {s.method!r} needs parameter {name!r}: Schedule.{s.method}({name}=...)")
            params[name] = default
    return params


# --------------------------------------------------------------------------- FORA


def _fora_check(s: Schedule) -> dict[str, Any]:
    params = check_params(s, interval=...)
    params["interval"] = check_int("interval", params["interval"])
    return params


def _fora_rules(s: Schedule, layout: Layout) -> list[dict[str, Action]]:
    interval = s.params["interval"]
    cached = {r: REUSE for r in layout.branch_regions()}
    return [{} if step % interval == 0 else dict(cached) for step in range(s.num_steps)]


FORA = register_method(Method(
    "fora", _fora_rules, _fora_check, label=lambda s, step: "full" if step % s.params["interval"] == 0 else "cached",
))


# --------------------------------------------------------------------------- mask


def _mask_check(s: Schedule) -> dict[str, Any]:
    params = check_params(s, branches=["attn", "mlp"])
    branches = params["branches"]
    if not isinstance(branches, (list, tuple)) or not branches or not all(isinstance(b, str) for b in branches):
        raise ScheduleError(f"mask branches must be a list of branch kinds like ['attn', 'mlp'], got {branches!r}")
    if s.mask is None:
        raise ScheduleError("a mask schedule needs its mask; build it with Schedule.from_mask(mask)")
    if len(s.mask) != s.num_steps or any(len(f) != len(branches) for row in s.mask for f in row):
        raise ScheduleError(
            f"the mask is {len(s.mask)} steps × {len(s.mask[0])} blocks × {len(s.mask[0][0])} branches, but the "
            f"schedule has {s.num_steps} steps and branches {list(branches)}; build it with Schedule.from_mask(mask)"
        )
    params["branches"] = list(branches)
    return params


def _mask_rules(s: Schedule, layout: Layout) -> list[dict[str, Action]]:
    mask = s.mask
    assert mask is not None
    if len(mask[0]) != layout.num_blocks:
        raise ScheduleError(
            f"the mask has {len(mask[0])} blocks per step but the model has {layout.num_blocks}; "
            f"build the mask with shape [num_steps={s.num_steps}][{layout.num_blocks}][{len(mask[0][0])}]"
        )
    kinds = s.params["branches"]
    steps = []
    for row in mask:
        acts: dict[str, Action] = {}
        for b, flags in enumerate(row):
            for kind, flag in zip(kinds, flags):
                if not flag:
                    acts[f"blocks.{b}.{kind}"] = REUSE
        steps.append(acts)
    return steps


MASK = register_method(Method(
    "mask", _mask_rules, _mask_check, label=lambda s, step: "full" if all(all(f) for f in s.mask[step]) else "cached",
))


# --------------------------------------------------------------------------- explicit


def _explicit_check(s: Schedule) -> Mapping[str, Any]:
    params = check_params(s)
    if s.steps is None or len(s.steps) != s.num_steps:
        raise ScheduleError("an explicit schedule needs one entry per step; build it with Schedule.explicit(steps)")
    for step, acts in enumerate(s.steps):
        for region, a in acts:
            # only the stack has a residual stream the graph pass can add the cached difference to
            if a.kind == "residual" and region != "stack":
                raise ScheduleError(
                    f"step {step}: residual reuse applies to the whole block stack ('stack'), not {region!r}; "
                    f"use 'reuse' for {region}"
                )
    return params


EXPLICIT = register_method(Method("explicit", lambda s, layout: [dict(step) for step in s.steps], _explicit_check))
