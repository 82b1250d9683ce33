"""Low-precision cache storage: cached values are cast where a step graph writes them and back
where it reads them.

With a schedule's ``cache_dtype`` (``bfloat16``, ``float16``, ``float8_e4m3fn`` ...) each cache
output the pass is told about leaves the graph as ``_to_copy(value, dtype=cache_dtype)``, cast
where the value is computed (so the full-precision value is freed after its last use, not held
until the step returns), and each such cache input enters as a ``cache_dtype`` placeholder cast
back (``_to_copy(placeholder, dtype=<the dtype it was computed in>)``) just before its first use
(so a cached step never holds a full-precision copy of the whole cache). Everything between runs in the
model's dtype as before: only what the cache store holds (and the traffic to read it) shrinks.
A slot is cast on both sides or neither, since the choice depends only on its name and the
dtype of the value computed for it, which every step graph agrees on. Values that are not
floating point, or already in ``cache_dtype``, are left alone.

Runs once per finished step graph, after the dead cache writes are dropped (a cast of a dropped
write would be left behind as dead code).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx

from cachecompile.passes import counters
from cachecompile.passes.cache_io import cache_io

log = logging.getLogger(__name__)

__all__ = ["store_cache_in"]

aten = torch.ops.aten


def store_cache_in(gm: torch.fx.GraphModule, dtype: torch.dtype, cast: Callable[[str], bool]) -> int:
    """Cast the cache slots of ``gm`` for which ``cast(slot)`` is true to ``dtype`` at their write
    and back at their read (in place). Returns the number of casts added."""
    io = cache_io(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    order = {node: i for i, node in enumerate(graph.nodes)}
    n = 0
    for slot in io.cache_inputs:
        ph = nodes[io.placeholders[slot]]
        val = ph.meta.get("val")
        if not cast(slot) or not _castable(val, dtype):
            continue
        users = sorted(ph.users, key=order.__getitem__)
        ph.meta["val"] = _as(val, dtype)
        if users:
            # at its first use, not at the top: each read's full-precision copy lives only while it is used
            with graph.inserting_before(users[0]):
                back = graph.call_function(aten._to_copy.default, (ph,), {"dtype": val.dtype})
            back.meta["val"] = val
            for user in users:
                user.replace_input_with(ph, back)
        ph.meta.pop("tensor_meta", None)
        n += 1
    out = graph.output_node()
    values = list(out.args[0])
    first = io.num_user_outputs or 0
    for k, slot in enumerate(io.cache_outputs):
        value = values[first + k]
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if not cast(slot) or not _castable(val, dtype):
            continue
        # right where the value is computed, not at the end: the full-precision value is then
        # freed after its last use in the step instead of living until the step returns
        after = value if value.op != "placeholder" else next(m for m in graph.nodes if m.op != "placeholder").prev
        with graph.inserting_after(after):
            down = graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
        down.meta["val"] = _as(val, dtype)
        values[first + k] = down
        n += 1
    out.args = (tuple(values),)
    if n:
        graph.lint()
        gm.recompile()
    counters["cache_casts"] += n
    log.debug("cache storage in %s: %d casts", dtype, n)
    return n


def _castable(val: object, dtype: torch.dtype) -> bool:
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.dtype != dtype


def _as(val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``val`` (a fake tensor from the capture) as ``dtype``, in its own fake mode."""
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return val.to(dtype)
    with mode:
        return val.to(dtype)
