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
from typing import Any
from dataclasses import dataclass

import torch
import torch.fx
from torch.utils import _pytree as pytree

from cachecompile.core.errors import CaptureError
from cachecompile.core.program import CallSpec, InputLeaf, timestep_index

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


def capture(
    model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, decompose: bool = False, dynamic_batch: bool = True,
) -> Captured:
    """Export ``model(*args, **kwargs)`` non-strictly and return a flat :class:`Captured` graph.

    By default the graph stays in export's ATen IR (``aten.linear``, ``aten.layer_norm``,
    ``aten.scaled_dot_product_attention``): those call eager's own kernels, so an all-compute
    schedule is bit-identical to the model, and every backend decomposes further as it lowers.
    ``decompose=True`` runs ``run_decompositions`` to core ATen (attention kept), which changes
    float32 results by about 1e-7 per call. The model is not modified. Raises :class:`CaptureError` with the exporter's message when the
    model cannot be exported as a single graph.

    With ``dynamic_batch`` the batch dimension is symbolic: dimension 0 of every tensor input
    whose size there equals the first tensor input's (hidden states, timesteps, labels, text
    embeddings ...) is one ``torch.export.Dim``, so the graph serves every batch size. A batch of
    1 is captured as 2 (export specialises size-1 dimensions). Where export refuses the dynamic
    batch, the capture is static and another batch size captures again. A model with diffusers'
    context parallelism enabled is captured with a static batch at once: export refuses its
    dynamic batch (torch 2.13: "Constraints violated (batch)"), and each try costs a whole export.

    >>> import torch
    >>> cap = capture(torch.nn.Linear(3, 2).eval(), (torch.randn(4, 3),))
    >>> cap.gm(torch.ones(5, 3))[0].shape
    torch.Size([5, 2])
    """
    kwargs = dict(kwargs or {})
    _refuse_weight_hooks(model)
    flat_args, in_spec = pytree.tree_flatten((tuple(args), kwargs))
    batched = _batch_leaves(flat_args) if dynamic_batch and not _context_parallel(model) else set()
    ep = None
    if batched:
        try:
            ep = _export(model, flat_args, in_spec, batched, decompose)
        except Exception as e:  # noqa: BLE001 - a dynamic batch export refused: capture for this batch only
            log.info("cachecompile: a dynamic batch does not export (%s: %s); capturing a static batch",
                     type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            batched = set()
    if ep is None:
        ep = _export(model, flat_args, in_spec, set(), decompose)

    gm = _flat_module(ep)
    names = _leaf_names(args, kwargs, _forward_params(type(model)))
    bounds = _index_bounds(gm)
    leaves, examples = [], []
    for i, (name, value) in enumerate(zip(names, flat_args)):
        if isinstance(value, torch.Tensor):
            leaves.append(InputLeaf(name, len(examples), tuple(value.shape), value.dtype, device=str(value.device),
                                    batched=i in batched, index_bound=bounds.get(len(examples))))
            examples.append(_at_least_two(value.detach()) if i in batched else value.detach())
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
    log.info("captured %s: %d nodes%s", call.model_class, len(gm.graph.nodes), ", dynamic batch" if batched else "")
    return Captured(gm, call, examples)


def _context_parallel(model: torch.nn.Module) -> bool:
    """Whether diffusers' ``enable_parallelism`` gave the model a context-parallel config."""
    config = getattr(model, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None) is not None


# diffusers hooks that change the weights inside forward (cast them in and out, or move them
# between devices): a captured graph would bake one state of the weights.
_WEIGHT_HOOKS = {
    "layerwise_casting": "layerwise casting (enable_layerwise_casting)",
    "group_offloading": "group offloading (enable_group_offload)",
}


def _refuse_weight_hooks(model: torch.nn.Module) -> None:
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        found = [_WEIGHT_HOOKS[h] for h in getattr(registry, "hooks", {}) if h in _WEIGHT_HOOKS]
        if found:
            raise CaptureError(
                f"{type(model).__name__} has {found[0]} enabled: it changes the weights inside every forward, which a "
                f"captured graph cannot follow. Optimize the model without it (cast the model to the dtype to compute "
                f"in, e.g. model.to(torch.bfloat16), and keep it on one device), or call the model uncached"
            )


# Ops that pass integer indices through unchanged in value (to an embedding lookup).
_INDEX_PASS = ("aten.view.default", "aten.reshape.default", "aten.flatten.using_ints", "aten.unsqueeze.default",
               "aten.squeeze.dim", "aten._to_copy.default", "aten.to.dtype", "aten.clone.default", "aten.alias.default")


def _index_bounds(gm: torch.fx.GraphModule) -> dict[int, int]:
    """Tensor input position → the number of rows of the embedding table its values index
    (class labels): a value outside ``[0, rows)`` is an error in eager PyTorch, but an ONNX
    ``Gather`` wraps negative indices, so the runtime checks them before any backend runs."""
    out: dict[int, int] = {}
    for pos, ph in enumerate(gm.graph.find_nodes(op="placeholder")):
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or val.dtype == torch.bool:
            continue
        work, seen = [ph], set()
        while work:
            node = work.pop()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.target is torch.ops.aten.embedding.default and len(user.args) > 1 and user.args[1] is node:
                    weight = user.args[0].meta.get("val")
                    if isinstance(weight, torch.Tensor) and isinstance(weight.shape[0], int):
                        out[pos] = min(out.get(pos, weight.shape[0]), weight.shape[0])
                elif str(user.target) in _INDEX_PASS:
                    work.append(user)
    return out


def _batch_leaves(flat: list) -> set[int]:
    """Indices of the tensor leaves that carry the batch: dimension 0 equal to the first tensor's."""
    tensors = [(i, v) for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and v.dim() >= 1]
    if not tensors:
        return set()
    batch = tensors[0][1].shape[0]
    return {i for i, v in tensors if v.shape[0] == batch}


def _at_least_two(t: torch.Tensor) -> torch.Tensor:
    """A batch of 1 repeated to 2: export specialises size-1 dimensions, 2 stays symbolic."""
    return torch.cat([t, t]) if t.shape[0] == 1 else t


def _export(model: torch.nn.Module, flat: list, spec: pytree.TreeSpec, batched: set[int], decompose: bool) -> Any:
    example = [_at_least_two(v) if i in batched else v for i, v in enumerate(flat)]
    args, kwargs = pytree.tree_unflatten(example, spec)
    dynamic = None
    if batched:
        dim = torch.export.Dim("batch", min=1, max=1 << 16)
        # One spec per leaf, nested like the inputs (dicts, tuples), keyed by forward's parameter names.
        specs_args, specs_kwargs = pytree.tree_unflatten([{0: dim} if i in batched else None for i in range(len(flat))], spec)
        names = _forward_params(type(model))
        if len(specs_args) > len(names):
            raise CaptureError("more positional arguments than forward's named parameters")
        dynamic = {**dict(zip(names, specs_args)), **specs_kwargs}
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)
            if decompose:
                ep = ep.run_decompositions(_decomposition_table())
    except Exception as e:  # the exporter's own errors are long; keep them, add what to do
        if batched:
            raise
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} as one graph "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). cachecompile needs a "
            f"model that torch.export.export(model, args, kwargs, strict=False) accepts; fix the "
            f"data-dependent control flow it reports, or call the model with the inputs the "
            f"pipeline really uses."
        ) from e
    return ep


def _forward_params(cls: type) -> list[str]:
    try:
        return list(inspect.signature(cls.forward).parameters)[1:]  # drop self
    except (AttributeError, TypeError, ValueError):
        return []


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


def _leaf_names(args: tuple, kwargs: dict, params: list[str] = ()) -> list[str]:
    """Readable names for the flattened leaves, for error messages: a positional argument by its
    parameter's name in ``forward`` (``hidden_states``), else ``args[0]``; nested leaves add
    their keys (``added_cond_kwargs.resolution``)."""
    paths, _ = pytree.tree_flatten_with_path((tuple(args), kwargs))
    names = []
    for path, _ in paths:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if keys and keys[0] == "0":  # positional
            index = int(keys[1])
            head = params[index] if index < len(params) else f"args[{index}]"
            names.append(head + "".join(f".{k}" for k in keys[2:]))
        else:
            names.append(".".join(keys[1:]))
    return names
