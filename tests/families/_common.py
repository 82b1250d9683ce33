"""Helpers of the family tests: a short sampling loop and independent eager references.

The references never look at cachecompile's regions: each test names the modules (by their
diffusers paths) whose outputs the method reuses, and the reference wraps exactly those.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch

from tests.conftest import CountingModel, ReuseOnSteps, StepCounter

MakeKwargs = Callable[[torch.Tensor, float], dict]


def randomize_zero_parameters(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """diffusers zero-initialises gates and output heads of several families; random values make
    a caching error visible in the output."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def sample(model: Any, x0: torch.Tensor, make_kwargs: MakeKwargs, steps: int) -> torch.Tensor:
    """Euler steps from t = 1 down to 0 on ``x`` with the model's first output (its first
    ``x.shape[1]`` entries along dim 1, so learned-sigma outputs work). ``make_kwargs(x, t)``
    builds the model's call for ``t`` in [0, 1]; each family scales t as its model expects."""
    x = x0.clone()
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    with torch.no_grad():
        for i in range(steps):
            out = model(**make_kwargs(x, ts[i]), return_dict=False)[0]
            x = x + (ts[i + 1] - ts[i]) * out.narrow(1, 0, x.shape[1])
    return x


def _replace(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def reference(
    model: torch.nn.Module,
    reuse: Mapping[str, Callable[[int], bool]] | None = None,
    stack: tuple[Sequence[str], Callable[[int], bool], Callable] | None = None,
) -> CountingModel:
    """A copy of ``model`` in which the module at each path of ``reuse`` returns its last output
    on the steps where its predicate is false, and, with ``stack=(block_paths, compute,
    passthrough)``, the whole block stack is skipped on the steps where ``compute`` is false,
    the head reading the stack's last computed output. ``passthrough(*args, **kwargs)`` returns
    a block's input streams in the block's output format."""
    ref = copy.deepcopy(model)
    counter = StepCounter()
    for path, compute in (reuse or {}).items():
        _replace(ref, path, ReuseOnSteps(ref.get_submodule(path), counter, compute))
    if stack is not None:
        block_paths, compute, passthrough = stack
        for i, path in enumerate(block_paths):
            last = i == len(block_paths) - 1
            _replace(ref, path, _StackBlock(ref.get_submodule(path), counter, compute, last, passthrough))
    return CountingModel(ref, counter)


def reuse_reference(model: torch.nn.Module, paths: Sequence[str], compute: Callable[[int], bool]) -> CountingModel:
    """FORA's reference when ``paths`` are every branch module."""
    return reference(model, {p: compute for p in paths})


class _StackBlock(torch.nn.Module):
    """On skipped steps a block passes its streams through; the last block returns its output
    of the last computed step, so the model's head sees the cached output of the whole stack."""

    def __init__(self, inner: torch.nn.Module, counter: StepCounter, compute, last: bool, passthrough) -> None:
        super().__init__()
        self.inner, self.counter, self.compute, self.last, self.passthrough = inner, counter, compute, last, passthrough
        self.cached = None

    def forward(self, *args, **kwargs):
        if self.compute(self.counter.step):
            out = self.inner(*args, **kwargs)
            if self.last:
                self.cached = out
            return out
        return self.cached if self.last else self.passthrough(*args, **kwargs)


def stack_reference(
    model: torch.nn.Module, block_paths: Sequence[str], compute: Callable[[int], bool], passthrough
) -> CountingModel:
    return reference(model, stack=(block_paths, compute, passthrough))


def duca_kind(step: int, interval: int) -> str:
    """DuCa's step kinds: full at s % interval == 0, conservative at odd remainders, aggressive at even ones."""
    r = step % interval
    return "full" if r == 0 else "conservative" if r % 2 else "aggressive"


def duca_reference(
    model: torch.nn.Module, interval: int, reused: Sequence[str], mlps: Sequence[str], block_paths: Sequence[str], passthrough
) -> CountingModel:
    """DuCa with ``fresh_ratio=1``: conservative steps reuse every non-MLP branch and compute the
    MLPs (all tokens); aggressive steps skip the stack; full steps compute everything."""
    full = lambda s: duca_kind(s, interval) == "full"  # noqa: E731
    runs = lambda s: duca_kind(s, interval) != "aggressive"  # noqa: E731
    return reference(model, {**{p: full for p in reused}, **{p: runs for p in mlps}}, (block_paths, runs, passthrough))


def mlp_rows(gm: torch.fx.GraphModule, weight_fragment: str = ".ff.") -> set[int]:
    """Token counts (dim -2) fed to the linears whose weight path contains ``weight_fragment``."""
    return {
        int(n.args[0].meta["val"].shape[-2])
        for n in gm.graph.nodes
        if n.op == "call_function"
        and "linear" in str(n.target)
        and getattr(n.args[1], "op", "") == "get_attr"
        and weight_fragment in n.args[1].target
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def conservative_graph(cached: Any) -> torch.fx.GraphModule:
    """The step graph of a plan with partial actions (a ToCa/DuCa conservative step)."""
    return next(gm for plan, gm in cached.step_graphs.items() if any(a.kind == "partial" for _, a in plan.actions))
