"""The dynamic policies' graph pass: the skip decision and its branch inside the one step graph.

At a :class:`~cachecompile.methods.dynamic.schedule.Decide` step the pass

1. computes the *probe* from this step's values — DBCache: the residual of the first blocks,
   ``R = h_first − h_0``; TeaCache: block 0's timestep-modulated input (its attention's input);
2. compares it with the cached probe (a cache input) and updates the counters (a cache input of
   float32 counters) into a 0-d boolean ``reuse``;
3. replaces the *segment* of blocks it may skip (DBCache: blocks ``[first, L − last)``; TeaCache:
   the whole stack but the nodes that compute the probe) by
   ``torch.ops.higher_order.cond(reuse, cached, compute, operands)``: ``cached`` adds the cached
   residual to the segment's input, ``compute`` is a subgraph holding the segment's own nodes;
4. writes the new probe, the new residual (``where(reuse, cached, out − in)``), the new
   counters and ``reuse`` itself (:data:`~cachecompile.core.program.DECISION_SLOT`, which the
   runtime keeps per step without reading it).

Under context parallelism (the step graph holds collectives) each rank's probe is its shard of
the sequence: the metric's sums are all-reduced over the ranks' process group before the ratio,
so every rank compares the whole sequence's change and takes the same branch (the segment's
collectives run on every rank or on none). A probe that every rank holds whole gives the same
ratio: numerator and denominator grow alike.

No graph break and no per-step Python: the decision is data. Inductor and AOTInductor lower the
``cond`` to an ``if`` on the predicate (one scalar read inside the compiled step, on GPU a
device-to-host copy); ONNX exports it as ``If``.

At a :class:`~cachecompile.methods.dynamic.schedule.Record` step (a full step) the pass only
adds the cache writes a later dynamic step reads, computed from the full step's own values.

Only single-stream blocks are supported (DiT, PixArt): the stack and every block must have one
output and one stream input shaped like it; two-stream models (SD3, FLUX) raise a
:class:`~cachecompile.core.errors.RegionError`.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
import torch.fx

from cachecompile.core.errors import RegionError
from cachecompile.core.program import DECISION_SLOT
from cachecompile.core.regions import RegionMap
from cachecompile.core.schedule import StepPlan
from cachecompile.methods.dual.stack import stream_input
from cachecompile.methods.dynamic.schedule import PROBE_SLOT, RESIDUAL_SLOT, STATE_SLOT, Decide, Record
from cachecompile.passes import counters
from cachecompile.passes.cache_io import add_cache_input, add_cache_output
from cachecompile.passes.effects import collective_groups

log = logging.getLogger(__name__)

__all__ = ["dynamic_reuse", "modulated_input", "threshold_for"]

aten = torch.ops.aten
STATE_SIZE = {"dbcache": 2, "teacache": 1}


def dynamic_reuse(gm: torch.fx.GraphModule, regions: RegionMap, plan: StepPlan) -> torch.fx.GraphModule:
    """Rewrite a :class:`Decide` step into its decision and ``cond``; add a :class:`Record`
    step's writes (see the module docstring). Other plans are left as they are."""
    action = plan.action("stack")
    if isinstance(action, Decide):
        _decide(gm, regions, action)
        counters["dynamic_decisions"] += 1
    elif isinstance(action, Record):
        _record(gm, regions, action)
        counters["dynamic_records"] += 1
    return gm


# --------------------------------------------------------------------------- where things are


class _Graph:
    """Node creation with fake-tensor metadata (later passes and the backends read ``meta["val"]``)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
        self.fake_mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
        self.group: str | None = None  # the ranks' process group under context parallelism

    def example(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.fake_mode.from_tensor(tensor, static_shapes=True) if self.fake_mode is not None else tensor

    def call(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = self.gm.graph.call_function(target, args, kwargs)
        fake = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fake[0], **fake[1])
        else:
            node.meta["val"] = target(*fake[0], **fake[1])
        return node


def _nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _check_blocks(regions: RegionMap, first: int, last: int, policy: str) -> int:
    n = regions.layout.num_blocks
    if first + last >= n:
        raise RegionError(
            f"{policy}: compute_first={first} + compute_last={last} leave no block to cache in a model with {n} "
            f"blocks; choose compute_first + compute_last <= {n - 1}"
        )
    return n


def _block_output(gm: torch.fx.GraphModule, regions: RegionMap, i: int) -> torch.fx.Node:
    region = regions[f"blocks.{i}"]
    if len(region.outputs) != 1:
        raise RegionError(
            f"dynamic caching needs blocks with one output (one residual stream); block {i} ({region.path}) has "
            f"{len(region.outputs)}: two-stream models (SD3, FLUX) are not supported by dbcache/teacache yet"
        )
    return _nodes(gm)[region.outputs[0]]


def modulated_input(gm: torch.fx.GraphModule, regions: RegionMap) -> torch.fx.Node:
    """Block 0's timestep-modulated input: the input of its attention branch shaped like the
    attention's (first) output."""
    if "blocks.0.attn" not in regions:
        raise RegionError("teacache probes the input of block 0's attention, but the model's regions have no 'blocks.0.attn'")
    region = regions["blocks.0.attn"]
    nodes = _nodes(gm)
    out = nodes[region.outputs[0]].meta["val"]
    cands = [nodes[i] for i in region.inputs if _is_like(nodes[i].meta.get("val"), out)]
    if len(cands) != 1:
        raise RegionError(
            f"teacache needs one input of {region.path} shaped like its output {list(out.shape)}, found "
            f"{[c.name for c in cands]}"
        )
    return cands[0]


def _is_assert(node: torch.fx.Node) -> bool:
    return getattr(node.target, "__name__", "").startswith("_assert")


def _is_like(v: Any, like: torch.Tensor) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == like.shape


def _ancestors(node: torch.fx.Node, within: set[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen or n not in within:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    # A kept multi-output op (chunk, split) keeps its element reads: operands are tensors.
    for n in list(seen):
        seen |= {u for u in n.users if u in within and u.target is operator.getitem}
    return seen


def _segment(
    gm: torch.fx.GraphModule, regions: RegionMap, policy: str, first: int, last: int
) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node, list[torch.fx.Node], torch.fx.Node]:
    """``(h0, seg_in, seg_out, segment nodes in graph order, probe source)`` of a policy."""
    n = _check_blocks(regions, first, last, policy)
    try:
        h0, stack_out = stream_input(gm, regions["stack"])
    except RegionError as e:
        raise RegionError(f"{policy} needs a single residual stream through the blocks: {e}") from None
    nodes = _nodes(gm)
    if policy == "dbcache":
        seg_in = _block_output(gm, regions, first - 1)
        seg_out = _block_output(gm, regions, n - last - 1)
        names = set().union(*(regions[f"blocks.{i}"].nodes for i in range(first, n - last)))
        members = {nodes[k] for k in names}
        source = seg_in
    else:
        seg_in, seg_out, source = h0, stack_out, modulated_input(gm, regions)
        stack = {nodes[k] for k in regions["stack"].nodes}
        members = stack - _ancestors(source, stack)
    order = [x for x in gm.graph.nodes if x in members and x.op == "call_function" and not _is_assert(x)]
    if order and order[-1] is not seg_out:
        raise RegionError(f"{policy}: {order[-1].name} of the blocks to skip comes after their output {seg_out.name}")
    outside = [x.name for x in order if x is not seg_out and any(u not in members for u in x.users)]
    if outside or seg_out not in members:
        raise RegionError(
            f"{policy}: the blocks to skip must leave only through their last output ({seg_out.name}), but "
            f"{outside[:5]} are read after them; this model's blocks cannot be skipped as one segment"
        )
    return h0, seg_in, seg_out, order, source


# --------------------------------------------------------------------------- record (full steps)


def _record(gm: torch.fx.GraphModule, regions: RegionMap, action: Record) -> None:
    g = _Graph(gm)
    h0, seg_in, seg_out, _, source = _segment(gm, regions, action.policy, action.first, action.last)
    with gm.graph.inserting_before(seg_out.next):
        probe = g.call(aten.sub.Tensor, seg_in, h0) if action.policy == "dbcache" else source
        residual = g.call(aten.sub.Tensor, seg_out, seg_in)
        state = g.call(aten.new_zeros.default, h0, [STATE_SIZE[action.policy]], dtype=torch.float32)
    add_cache_output(gm, PROBE_SLOT, probe)
    add_cache_output(gm, RESIDUAL_SLOT, residual)
    add_cache_output(gm, STATE_SLOT, state)


# --------------------------------------------------------------------------- decide (dynamic steps)


def _decide(gm: torch.fx.GraphModule, regions: RegionMap, action: Decide) -> None:
    g = _Graph(gm)
    g.group = _ranks_group(gm, action.policy)
    h0, seg_in, seg_out, order, source = _segment(gm, regions, action.policy, action.first, action.last)
    doomed = [n for n in gm.graph.nodes if n in set(order) or (_is_assert(n) and set(n.all_input_nodes) & set(order))]
    prev = add_cache_input(gm, PROBE_SLOT, source)
    residual = add_cache_input(gm, RESIDUAL_SLOT, seg_out)
    state = add_cache_input(gm, STATE_SLOT, seg_out)
    state.meta = {"val": g.example(torch.zeros(STATE_SIZE[action.policy], dtype=torch.float32))}
    with gm.graph.inserting_before(seg_out.next):
        if action.policy == "dbcache":
            probe = g.call(aten.sub.Tensor, seg_in, h0)
            reuse, new_state = _dbcache_rule(g, action, probe, prev, state)
        else:
            probe = source
            reuse, new_state = _teacache_rule(g, action, probe, prev, state)
        out = _branch(g, reuse, order, seg_in, seg_out, residual)
        new_residual = g.call(aten.where.self, reuse, residual, g.call(aten.sub.Tensor, out, seg_in))
        new_probe = g.call(aten.where.self, reuse, prev, probe) if action.policy == "dbcache" else probe
    seg_out.replace_all_uses_with(out)
    for n in reversed(doomed):  # the segment now lives in the branch
        gm.graph.erase_node(n)
    add_cache_output(gm, PROBE_SLOT, new_probe)
    add_cache_output(gm, RESIDUAL_SLOT, new_residual)
    add_cache_output(gm, STATE_SLOT, new_state)
    add_cache_output(gm, DECISION_SLOT, reuse)
    log.debug("%s: %d nodes moved into the compute branch", action.policy, len(order))


def threshold_for(threshold: float) -> float:
    """The float32 ``c`` with ``x < c ⟺ x < threshold`` for every float32 ``x``: the reference
    implementations compare a float32 value with a Python float (float64); the graph compares in
    float32 with the smallest float32 at or above the threshold, which decides the same.

    >>> threshold_for(0.5), threshold_for(0.1) > 0.1
    (0.5, True)
    """
    v = torch.tensor(threshold, dtype=torch.float32)
    if v.item() < threshold:
        v = torch.nextafter(v, torch.tensor(math.inf, dtype=torch.float32))
    return v.item()


def _ranks_group(gm: torch.fx.GraphModule, policy: str) -> str | None:
    """The process group the model's collectives use (context parallelism), or None."""
    groups = collective_groups(gm.graph)
    if len(groups) > 1:
        raise RegionError(
            f"{policy}: the model's collectives use {len(groups)} process groups ({', '.join(groups)}); a decision "
            f"taken alike on every rank needs one (Ulysses or ring alone, not both)"
        )
    return groups[0] if groups else None


def _relative_l1(g: _Graph, probe: torch.fx.Node, prev: torch.fx.Node, probe_first: bool) -> torch.fx.Node:
    """``mean|a − b| / mean|prev|`` as float32, with the operand order of the reference; with a
    process group (``g.group``), ``Σ|a − b| / Σ|prev|`` summed over every rank's shard."""
    a, b = (probe, prev) if probe_first else (prev, probe)
    if g.group is None:
        num = g.call(aten.mean.default, g.call(aten.abs.default, g.call(aten.sub.Tensor, a, b)))
        den = g.call(aten.mean.default, g.call(aten.abs.default, prev))
    else:
        c10d = torch.ops._c10d_functional
        sums = g.call(aten.stack.default, [g.call(aten.sum.default, g.call(aten.abs.default, g.call(aten.sub.Tensor, a, b))),
                                           g.call(aten.sum.default, g.call(aten.abs.default, prev))])
        sums = g.call(c10d.wait_tensor.default, g.call(c10d.all_reduce.default, sums, "sum", g.group))
        num, den = g.call(aten.select.int, sums, 0, 0), g.call(aten.select.int, sums, 0, 1)
    rel = g.call(aten.div.Tensor, num, den)
    if rel.meta["val"].dtype != torch.float32:
        rel = g.call(aten._to_copy.default, rel, dtype=torch.float32)
    return rel


def _dbcache_rule(g: _Graph, a: Decide, probe: torch.fx.Node, prev: torch.fx.Node, state: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """cache-dit's ``can_cache``: reuse when ``mean|R' − R| / mean|R'| < threshold`` (a threshold
    of 1 or more always reuses, as there), and neither limit is reached. State: [cached steps,
    cached steps in a row]."""
    if a.threshold >= 1.0:
        reuse = g.call(aten.new_ones.default, state, [], dtype=torch.bool)
    else:
        reuse = g.call(aten.lt.Scalar, _relative_l1(g, probe, prev, probe_first=False), threshold_for(a.threshold))
    total = g.call(aten.select.int, state, 0, 0)
    run = g.call(aten.select.int, state, 0, 1)
    if a.max_cached >= 0:
        reuse = g.call(aten.logical_and.default, reuse, g.call(aten.lt.Scalar, total, float(a.max_cached)))
    if a.max_run >= 0:
        reuse = g.call(aten.logical_and.default, reuse, g.call(aten.lt.Scalar, run, float(a.max_run)))
    hit = g.call(aten._to_copy.default, reuse, dtype=torch.float32)
    new_total = g.call(aten.add.Tensor, total, hit)
    new_run = g.call(aten.where.ScalarOther, reuse, g.call(aten.add.Scalar, run, 1.0), 0.0)
    return reuse, g.call(aten.stack.default, [new_total, new_run])


def _teacache_rule(g: _Graph, a: Decide, probe: torch.fx.Node, prev: torch.fx.Node, state: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """TeaCache: ``acc += poly(mean|m − m'| / mean|m'|)``; reuse while ``acc < threshold``, else
    compute and restart the sum at 0. State: [acc]."""
    rel = _relative_l1(g, probe, prev, probe_first=True)
    coef = a.coefficients
    value = g.call(aten.mul.Tensor, rel, coef[0]) if len(coef) > 1 else g.call(aten.add.Tensor, g.call(aten.mul.Tensor, rel, 0.0), coef[0])
    for i, c in enumerate(coef[1:], start=1):
        value = g.call(aten.add.Tensor, value, c)
        if i < len(coef) - 1:
            value = g.call(aten.mul.Tensor, value, rel)
    acc = g.call(aten.add.Tensor, g.call(aten.select.int, state, 0, 0), value)
    reuse = g.call(aten.lt.Scalar, acc, threshold_for(a.threshold))
    return reuse, g.call(aten.unsqueeze.default, g.call(aten.where.ScalarOther, reuse, acc, 0.0), 0)


def _with_symbolic_sizes(g: _Graph, order: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """``order`` with the size computations it reads from outside (``sym_size`` of the dynamic
    batch, arithmetic on it) copied in, so the branch computes them from its tensor operands: a
    branch's operands are tensors."""
    members, extra = set(order), []
    todo = list(order)
    while todo:
        for a in todo.pop().all_input_nodes:
            symbolic = isinstance(a.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))
            if a not in members and a.op == "call_function" and symbolic:
                members.add(a)
                extra.append(a)
                todo.append(a)
    if not extra:
        return order
    position = {n: i for i, n in enumerate(g.gm.graph.nodes)}
    return sorted(order + extra, key=position.__getitem__)


def _branch(
    g: _Graph,
    reuse: torch.fx.Node,
    order: list[torch.fx.Node],
    seg_in: torch.fx.Node,
    seg_out: torch.fx.Node,
    residual: torch.fx.Node,
) -> torch.fx.Node:
    """``cond(reuse, residual + seg_in, segment(...))`` and its output node."""
    order = _with_symbolic_sizes(g, order)
    members = set(order)
    operands: list[torch.fx.Node] = []
    for n in order:  # weights too: export lifts a branch's inputs, not attributes it reads
        operands += [a for a in n.all_input_nodes if a not in members and a not in operands]
    operands += [x for x in (seg_in, residual) if x not in operands]
    bad = [a.name for a in operands if not isinstance(a.meta.get("val"), torch.Tensor)]
    if bad:
        raise RegionError(f"the blocks to skip read non-tensor values {bad[:5]} from outside; they cannot become a branch")

    compute = torch.fx.Graph()
    env = {}
    for i, a in enumerate(operands):
        env[a] = compute.placeholder(f"x{i}")
        env[a].meta["val"] = a.meta["val"]
    for n in order:
        env[n] = compute.node_copy(n, env.__getitem__)
    compute.output((env[seg_out],))

    cached = torch.fx.Graph()
    phs = [cached.placeholder(f"x{i}") for i in range(len(operands))]
    for p, a in zip(phs, operands):
        p.meta["val"] = a.meta["val"]
    add = cached.call_function(aten.add.Tensor, (phs[operands.index(residual)], phs[operands.index(seg_in)]))
    add.meta["val"] = seg_out.meta["val"]
    cached.output((add,))

    gm = g.gm
    names = []
    for stem, graph in (("dynamic_cached", cached), ("dynamic_compute", compute)):
        name, k = stem, 0
        while hasattr(gm, name):
            k += 1
            name = f"{stem}_{k}"
        gm.add_submodule(name, torch.fx.GraphModule(torch.nn.Module(), graph))
        names.append(name)
    true_fn = gm.graph.get_attr(names[0])
    false_fn = gm.graph.get_attr(names[1])
    node = gm.graph.call_function(torch.ops.higher_order.cond, (reuse, true_fn, false_fn, tuple(operands)))
    node.meta["val"] = (seg_out.meta["val"],)
    out = gm.graph.call_function(operator.getitem, (node, 0))
    out.meta["val"] = seg_out.meta["val"]
    return out
