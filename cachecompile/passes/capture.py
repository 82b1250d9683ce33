"""Capture: a model's first real call → a flat ATen ``GraphModule`` plus its calling convention.

Non-strict ``torch.export`` keeps the diffusers module paths in ``node.meta["nn_module_stack"]``
(strict export and ``symbolic_trace`` do not work on these models). Attention stays one
``scaled_dot_product_attention`` node, so fused attention survives lowering.

The result is called as ``gm(*tensor_inputs)`` and returns a tuple of the flat outputs; the
pytree specs rebuild the user's call and output types (``Transformer2DModelOutput``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.fx
from torch.utils import _pytree as pytree

from cachecompile.core.errors import CaptureError
from cachecompile.core.program import CallSpec, InputLeaf

log = logging.getLogger(__name__)

__all__ = ["Captured", "CaptureError", "capture", "InputLeaf", "timestep_index"]


@dataclass
class Captured:
    """A captured model: the flat graph, the call convention, and the example inputs."""

    gm: torch.fx.GraphModule
    call: CallSpec
    example_inputs: list[torch.Tensor]


def _decomposition_table() -> dict:
    table = torch.export.default_decompositions()
    # Keep attention whole: backends map it to flash/efficient kernels (or ONNX Attention).
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    return table


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, decompose: bool = False) -> Captured:
    """Export ``model(*args, **kwargs)`` non-strictly and return a flat :class:`Captured` graph.

    By default the graph stays in export's ATen IR (``aten.linear``, ``aten.layer_norm``,
    ``aten.scaled_dot_product_attention``): those call eager's own kernels, so an all-compute
    schedule is bit-identical to the model, and every backend decomposes further as it lowers.
    ``decompose=True`` runs ``run_decompositions`` to core ATen (attention kept), which changes
    float32 results by about 1e-7 per call. The model is not modified. Raises :class:`CaptureError` with the exporter's message when the
    model cannot be exported as a single graph.

    >>> import torch
    >>> cap = capture(torch.nn.Linear(3, 2).eval(), (torch.randn(4, 3),))
    >>> cap.gm(torch.ones(4, 3))[0].shape
    torch.Size([4, 2])
    """
    kwargs = dict(kwargs or {})
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
            if decompose:
                ep = ep.run_decompositions(_decomposition_table())
    except Exception as e:  # the exporter's own errors are long; keep them, add what to do
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} as one graph "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). cachecompile needs a "
            f"model that torch.export.export(model, args, kwargs, strict=False) accepts; fix the "
            f"data-dependent control flow it reports, or call the model with the inputs the "
            f"pipeline really uses."
        ) from e

    gm = _flat_module(ep)
    flat_args, in_spec = pytree.tree_flatten((tuple(args), kwargs))
    names = _leaf_names(args, kwargs)
    leaves, examples = [], []
    for name, value in zip(names, flat_args):
        if isinstance(value, torch.Tensor):
            leaves.append(InputLeaf(name, len(examples), tuple(value.shape), value.dtype))
            examples.append(value.detach())
        else:
            leaves.append(InputLeaf(name, None, value=value))
    call = CallSpec(
        in_spec=in_spec,
        out_spec=ep.call_spec.out_spec,
        leaves=leaves,
        num_outputs=len(gm.graph.output_node().args[0]),
        kwarg_order=tuple(kwargs),
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        timestep_arg=timestep_index(type(model)),
    )
    log.info("captured %s: %d nodes", call.model_class, len(gm.graph.nodes))
    return Captured(gm, call, examples)


def timestep_index(cls: type) -> int | None:
    """The positional index of ``forward``'s ``timestep`` argument (``self`` not counted), if any."""
    try:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # drop self
    except (AttributeError, TypeError, ValueError):
        return None
    return params.index("timestep") if "timestep" in params else None


def _flat_module(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """``ep.module()`` with its pytree codegen, guard module and input hooks removed: the graph
    takes only the tensor inputs and returns a flat tuple."""
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # Non-tensor inputs (return_dict=False ...) were specialised by export: drop their placeholders.
    for node in list(graph.nodes):
        if node.op == "placeholder" and not isinstance(node.meta.get("val"), torch.Tensor):
            if node.users:
                raise CaptureError(f"the captured graph uses non-tensor input {node.name!r} as a value")
            graph.erase_node(node)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat_out = out.args[0]
    if not isinstance(flat_out, (list, tuple)):
        flat_out = (flat_out,)
    out.args = (tuple(flat_out),)
    graph._codegen = torch.fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    graph.lint()
    gm.recompile()
    return gm


def _leaf_names(args: tuple, kwargs: dict) -> list[str]:
    """Readable names for the flattened leaves, for error messages (``hidden_states``, ``args[0]``)."""
    paths, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
    names = []
    for path, _ in paths:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        head = "args" if keys and keys[0] == "0" else ""
        names.append(".".join(keys[1:]) if head == "" else f"args[{keys[1]}]" + "".join(f".{k}" for k in keys[2:]))
    return names
