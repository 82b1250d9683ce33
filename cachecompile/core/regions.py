"""Regions as data: where a model's blocks and branches are (:class:`RegionPatterns`), and the
regions found in one captured graph (:class:`RegionMap`: names → node sets and outputs).

Finding them in a graph is a pass (:func:`cachecompile.passes.regions.find_regions`); this
module only holds what the compiler, the runtime and artifacts share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from cachecompile.core.errors import RegionError
from cachecompile.core.schedule import Layout

__all__ = ["Region", "RegionMap", "RegionPatterns"]


@dataclass(frozen=True)
class RegionPatterns:
    """Where the blocks and their branches are, as globs over module paths.

    ``blocks`` match block paths (``*`` is one path segment); ``branches`` map a branch kind to a
    path relative to its block. A branch missing in a block is simply absent there.

    >>> RegionPatterns(blocks=("layers.*",), branches={"attn": "self_attn", "mlp": "mlp"}).blocks
    ('layers.*',)
    """

    blocks: tuple[str, ...] = ("transformer_blocks.*",)
    branches: Mapping[str, str] = field(default_factory=lambda: {"attn": "attn1", "mlp": "ff"})
    # Per block pattern, branches that replace ``branches`` for the blocks it matches (FLUX's
    # single-stream blocks have other branches than its double-stream blocks).
    block_branches: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def branches_for(self, block_pattern: str) -> Mapping[str, str]:
        return self.block_branches.get(block_pattern, self.branches)

    def describe(self) -> str:
        br = ", ".join(f"{k}={v!r}" for k, v in self.branches.items())
        extra = "".join(f", in {p!r} {dict(b)}" for p, b in self.block_branches.items())
        return f"blocks={list(self.blocks)}, branches {{{br}}}{extra}"


@dataclass(frozen=True)
class Region:
    name: str  # blocks.3.attn, blocks.3, stack
    path: str  # module path (for the stack: the first block's path .. the last block's)
    nodes: frozenset[str]  # node names inside the region
    outputs: tuple[str, ...]  # nodes whose values leave the region, in graph order
    inputs: tuple[str, ...]  # tensor nodes from outside that the region consumes, in graph order

    def slot(self, index: int = 0) -> str:
        """Cache slot name of output ``index``."""
        return self.name if len(self.outputs) == 1 else f"{self.name}#{index}"

    @property
    def slots(self) -> list[str]:
        return [self.slot(i) for i in range(len(self.outputs))]


@dataclass
class RegionMap:
    regions: dict[str, Region]
    layout: Layout
    patterns: RegionPatterns

    def __getitem__(self, name: str) -> Region:
        if name not in self.regions:
            raise RegionError(f"unknown region {name!r}; the model has: {', '.join(sorted(self.regions))}")
        return self.regions[name]

    def __contains__(self, name: str) -> bool:
        return name in self.regions

    def slot_region(self, slot: str) -> tuple[Region, int]:
        name, _, idx = slot.partition("#")
        return self.regions[name], int(idx or 0)

    def summary(self) -> str:
        lines = [f"{len(self.layout.branches)} blocks ({self.patterns.describe()})"]
        for name, r in self.regions.items():
            lines.append(f"  {name:<20} {r.path:<40} {len(r.nodes):>5} nodes, {len(r.outputs)} output(s)")
        return "\n".join(lines)
