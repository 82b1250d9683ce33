"""The ``inductor`` backend: ``torch.compile(fullgraph=True)``, one compile per step graph.

Why each setting:
- ``fullgraph=True``: a graph break raises instead of splitting the step into eager pieces.
- the batch dimension: a step graph captured with a dynamic batch (its placeholders' batch size
  is symbolic) is compiled with that dimension marked dynamic, so one compile serves the batch
  sizes its kernels' guards admit. Dynamo specialises a size of 1, and some kernel choices guard
  a range (on CPU the convolution backend guards batch ≤ 15): a step graph compiles once per such
  class of batch sizes (1; 2–15; 16 and up on this CPU), at most ``batch_compiles`` times (4).
  Every other dimension is static (partial recompute uses a static k per plan).
- ``recompile_limit``: with fullgraph, a guard failure beyond those (other shape, dtype, grad
  mode) raises ``FailOnRecompileLimitHit`` instead of recompiling or silently falling back to eager.
- ``isolate_recompiles=True``: every step graph is compiled through the same
  ``nn.Module.__call__`` code object; isolation keeps one graph's entry from counting as a
  recompile of another, so the compile count equals the number of step graphs.
- inputs are made contiguous before every call (a no-op for contiguous tensors): strides are
  part of Dynamo's guards, and pipelines pass the timestep both expanded (stride 0, e.g.
  ``DiTPipeline``) and materialised; one layout means one compile, whichever the caller uses.
- calls run under ``torch.no_grad()``: grad mode is part of Dynamo's guards, and an inference
  step graph must not build an autograd graph (or recompile when the caller's mode differs).
  Inference-mode tensors (made under ``torch.inference_mode()``) carry other dispatch keys
  than normal tensors, so they fail the guards of a graph warmed up on normal tensors: call
  consistently, or pass ``warmup=False`` so that the first real call compiles.

With ``mode="reduce-overhead"`` Inductor captures the step in a CUDA graph on a GPU. Its
outputs then live in the graph's static memory and are overwritten by the next replay: the
caller must copy cache writes into its own buffers (the runtime does) before the next step.
On CPU the mode compiles but no CUDA graph is used; CUDA graphs were not run here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

from cachecompile.backends._common import (
    BackendCompileError,
    TensorSpec,
    check_call_inputs,
    graph_output_nodes,
    graph_signature,
)

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class InductorStep:
    """A compiled step graph; the first call (made by ``compile``) did the compile."""

    def __init__(self, compiled: Any, mode: str | None, inputs: list[TensorSpec]) -> None:
        self._compiled = compiled
        self._mark_step = mode == "reduce-overhead"
        # CUDA graphs (reduce-overhead; max-autotune on GPU) replay into the same output memory.
        self.reuses_outputs = mode in ("reduce-overhead", "max-autotune")
        self._inputs = inputs

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        from torch._dynamo.exc import FailOnRecompileLimitHit

        if self._mark_step:
            # Tells the CUDA-graph tree that outputs of the previous replay are consumed.
            torch.compiler.cudagraph_mark_step_begin()
        args = tuple(_contiguous(a) for a in args)
        try:
            with torch.no_grad():
                return self._compiled(*args)
        except FailOnRecompileLimitHit as e:
            raise BackendCompileError(self._why_recompile(args)) from e

    def _why_recompile(self, args: Sequence[Tensor]) -> str:
        """Name the cause: a shape/dtype change, or a tensor kind the guards distinguish."""
        try:
            check_call_inputs(args, self._inputs, "inductor step")
        except ValueError as e:
            return f"{e} (step graphs have static shapes but the batch: no recompiles)"
        kinds = sorted({"inference-mode" if t.is_inference() else "normal" for t in args})
        return (
            "inductor: the step graph would recompile for inputs of the right shapes and dtypes but "
            f"another kind ({', '.join(kinds)} tensors, devices {sorted({str(t.device) for t in args})}) "
            "than it was compiled for. Call the model the same way every time: under torch.no_grad() "
            "rather than torch.inference_mode() (or compile with warmup=False, so that the first real "
            "call compiles), with all inputs on one device"
        )


class InductorBackend:
    """``compile`` only; Inductor has no file format of its own here (use ``aoti``)."""

    name = "inductor"

    def validate_options(self, *, mode: str | None = None, **_: Any) -> None:
        if mode not in _MODES:
            raise ValueError(f"inductor mode {mode!r} is not one of {_MODES}")

    def compile(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Tensor],
        *,
        mode: str | None = None,
        dynamic: bool | None = False,
        options: dict[str, Any] | None = None,
        warmup: bool = True,
        batch_compiles: int = 4,
        **unknown: Any,
    ) -> InductorStep:
        """Compile ``gm``; with ``warmup`` the compile happens here, on ``example_inputs``.

        ``options`` are Inductor config options (``torch.compile(options=...)``); ``mode`` is
        mutually exclusive with them, as in torch.compile.
        """
        if unknown:
            raise TypeError(f"backend 'inductor' got unknown options {sorted(unknown)}")
        self.validate_options(mode=mode)
        graph_output_nodes(gm)
        inputs, _ = graph_signature(gm, example_inputs)
        batched = _mark_batch_dynamic(gm, example_inputs)
        compile_mode, compile_options = _with_guard_filter(gm, mode, options)
        compiled = torch.compile(
            gm,
            backend="inductor",
            fullgraph=True,
            mode=compile_mode,
            dynamic=None if batched and dynamic is False else dynamic,
            options=compile_options,
            recompile_limit=max(1, batch_compiles) if batched else 1,
            isolate_recompiles=True,
        )
        step = InductorStep(compiled, mode, inputs)
        if warmup:
            _check_tuple(step(*example_inputs))
        return step

    def export(
        self, gm: GraphModule, example_inputs: Sequence[Tensor], directory: Path, stem: str, **options: Any
    ) -> dict[str, Any]:
        raise NotImplementedError(
            "backend 'inductor' compiles in memory and has no artifact format: export with "
            "format='aoti' for AOTInductor packages"
        )

    def load(self, directory: Path, entry: dict[str, Any], **options: Any) -> InductorStep:
        raise NotImplementedError("backend 'inductor' has no artifact format; load 'aoti' entries with get_backend('aoti')")


def _mark_batch_dynamic(gm: GraphModule, example_inputs: Sequence[Tensor]) -> bool:
    """Mark, on the example inputs, every dimension that is symbolic in the step graph (the
    batch) as dynamic for Dynamo; returns whether there was one."""
    marked = False
    for node, example in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        val = node.meta.get("val")
        if not isinstance(val, Tensor) or not isinstance(example, Tensor):
            continue
        dims = [i for i, d in enumerate(val.shape) if not isinstance(d, int)]
        if dims:
            torch._dynamo.maybe_mark_dynamic(example, dims)  # the batch dims of all inputs are one size
            marked = True
    return marked


def _with_guard_filter(gm: GraphModule, mode: str | None, options: dict[str, Any] | None) -> tuple[str | None, Any]:
    """``(mode, options)`` for ``torch.compile``. Tracing a ``torch.cond`` (the dynamic schedules'
    branch) flattens its operands with ``torch.utils._pytree``, and Dynamo then guards on the
    registry of pytree node types: any library that registers a type later (diffusers' and
    cache-dit's hooks do) would fail that guard and force a recompile, which this backend refuses.
    The operands are a tuple of tensors, whose flattening no new node type changes, so for graphs
    with a ``cond`` that guard is dropped (``guard_filter_fn``; a mode is passed as its options,
    since torch.compile takes a mode or options, not both)."""
    if not any(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes):
        return mode, options
    from torch._inductor import list_mode_options

    merged = dict(list_mode_options(mode)) if mode not in (None, "default") else {}
    merged.update(options or {})
    merged["guard_filter_fn"] = _skip_pytree_registry_guards
    return None, merged


def _skip_pytree_registry_guards(entries: Sequence[Any]) -> list[bool]:
    return [not ("SUPPORTED_NODES" in str(e.name) or "SUPPORTED_NODES" in str(e.orig_guard.source)) for e in entries]


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _check_tuple(out: Any) -> None:
    if not isinstance(out, tuple):
        raise BackendCompileError(f"inductor: compiled step returned {type(out).__name__}, expected a tuple")
