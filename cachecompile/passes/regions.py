"""Regions: module calls in the captured graph whose outputs can be cached.

A region is the set of nodes of one module *call* (``nn_module_stack`` call key, not the path
prefix: DiT calls ``transformer_blocks.0.norm1.emb`` a second time in its output head) with the
nodes whose values leave it. Found from module paths with glob patterns:

* blocks: ``transformer_blocks.*`` (one path segment per ``*``),
* branches inside a block: ``attn`` → ``attn1``, ``mlp`` → ``ff`` (relative to the block),
* the stack: the contiguous run of all blocks, from the first block's stream input to the last
  block's output.

Branch outputs are the module outputs, i.e. before the adaLN gate that the block applies after
the call, so gates are always recomputed at the current timestep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx

from cachecompile.core.errors import RegionError
from cachecompile.core.regions import Region, RegionMap, RegionPatterns
from cachecompile.core.schedule import Layout
from cachecompile.passes.families import patterns_for

__all__ = ["find_regions", "normalize_path"]


_STRICT_SELF = re.compile(r"^L\['self'\]\.?")


def normalize_path(path: str) -> str:
    """``L['self'].transformer_blocks[0].attn1`` / ``transformer_blocks.0.attn1`` → the latter."""
    path = _STRICT_SELF.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _glob_regex(pattern: str) -> re.Pattern:
    parts = [re.escape(p).replace(r"\*", r"[^.]+") for p in pattern.split(".")]
    return re.compile(r"^" + r"\.".join(parts) + r"$")


@dataclass
class _Call:
    key: str
    path: str
    nodes: list[torch.fx.Node] = field(default_factory=list)
    members: set = field(default_factory=set)


# ``x.float()`` / ``x.to(dtype)`` / ``x.type_as(y)`` return ``x`` itself when nothing changes, so the
# tracer records a node in the module that asked and later users of ``x`` read that node (Wan's
# blocks call ``temb.float()``: block 1 reads block 0's node). Such an alias of an outside value
# that is read outside the call belongs to no call: cached as a block output, it would go stale.
_ALIAS_OPS = ("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.type_as.default", "aten.alias.default")


def _is_alias_of_outside(node: torch.fx.Node, call: _Call) -> bool:
    if node.op != "call_function" or str(node.target) not in _ALIAS_OPS or not node.args:
        return False
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or src in call.members:
        return False
    a, b = node.meta.get("val"), src.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device):
        return False
    return any(call.key not in (u.meta.get("nn_module_stack") or {}) for u in node.users)


def _module_calls(graph: torch.fx.Graph) -> dict[str, _Call]:
    calls: dict[str, _Call] = {}
    for node in graph.nodes:
        if isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)):
            continue  # size arithmetic on the dynamic batch belongs to no call: it is not computed work
        stack = node.meta.get("nn_module_stack") or {}
        for key, value in stack.items():
            path = normalize_path(value[0] if isinstance(value, tuple) else str(value))
            if not path:
                continue
            call = calls.setdefault(key, _Call(key, path))
            if _is_alias_of_outside(node, call):
                continue
            call.nodes.append(node)
            call.members.add(node)
    return {k: c for k, c in calls.items() if c.nodes}


def _make_region(name: str, path: str, nodes: Sequence[torch.fx.Node]) -> Region:
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    inputs: list[torch.fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            # tensors only: a symbolic size read from outside (the batch) is not an input to cache or gather
            if a not in inside and a.op != "get_attr" and a not in inputs and isinstance(a.meta.get("val"), torch.Tensor):
                inputs.append(a)
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    inputs.sort(key=order.__getitem__)
    if not outputs:
        raise RegionError(f"region {name} ({path}) has no output used outside it")
    return Region(name, path, frozenset(n.name for n in nodes), tuple(n.name for n in outputs), tuple(n.name for n in inputs))


def find_regions(gm: torch.fx.GraphModule, patterns: RegionPatterns | None = None, model_class: str = "") -> RegionMap:
    """Find blocks, their branches and the block stack in a captured graph.

    Raises :class:`RegionError` naming the patterns tried when no block matches.
    """
    patterns = patterns or patterns_for(model_class.rsplit(".", 1)[-1])
    calls = _module_calls(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    block_res = [(p, _glob_regex(p)) for p in patterns.blocks]
    group = {c.key: next((p for p, r in block_res if r.match(c.path)), None) for c in calls.values()}
    blocks = [c for c in calls.values() if group[c.key] is not None]
    if not blocks:
        paths = sorted({c.path for c in calls.values()})
        raise RegionError(
            f"no transformer block found in {model_class or 'the model'} with patterns "
            f"{patterns.describe()}. Module paths in the graph include: {', '.join(paths[:15])}"
            f"{' ...' if len(paths) > 15 else ''}. Pass regions=cc.RegionPatterns(blocks=(...), "
            f"branches={{...}}) matching your model."
        )
    blocks.sort(key=lambda c: order[c.nodes[0]])
    paths = [c.path for c in blocks]
    dup = {p for p in paths if paths.count(p) > 1}
    if dup:
        raise RegionError(f"block(s) {sorted(dup)} are called more than once per forward; cachecompile needs one call per block")

    regions: dict[str, Region] = {}
    branches: list[tuple[str, ...]] = []
    for i, block in enumerate(blocks):
        block_keys = {block.key}
        kinds = []
        for kind, rel in patterns.branches_for(group[block.key]).items():
            rx = _glob_regex(f"{block.path}.{rel}")
            # The branch call nested in this block's call (not a second call elsewhere).
            match = [c for c in calls.values() if rx.match(c.path) and _inside(c, block_keys)]
            if not match:
                continue
            if len(match) > 1:
                raise RegionError(f"branch pattern {rel!r} matches {len(match)} calls in block {block.path}")
            regions[f"blocks.{i}.{kind}"] = _make_region(f"blocks.{i}.{kind}", match[0].path, match[0].nodes)
            kinds.append(kind)
        regions[f"blocks.{i}"] = _make_region(f"blocks.{i}", block.path, block.nodes)
        branches.append(tuple(kinds))
    if not any(branches):
        raise RegionError(
            f"found {len(blocks)} blocks but no branch inside them with patterns {patterns.describe()}; "
            f"paths inside the first block: {sorted({c.path for c in calls.values() if c.path.startswith(blocks[0].path + '.')})[:15]}"
        )
    stack_nodes = sorted({n for b in blocks for n in b.nodes}, key=order.__getitem__)
    regions["stack"] = _make_region("stack", f"{blocks[0].path}..{blocks[-1].path}", stack_nodes)
    return RegionMap(regions, Layout(branches=tuple(branches)), patterns)


def _inside(call: _Call, keys: set[str]) -> bool:
    stack = call.nodes[0].meta.get("nn_module_stack") or {}
    return bool(keys & set(stack))
