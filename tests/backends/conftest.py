"""Step graphs for the backend tests, built the way the core builds them.

Every compile is expensive on this CPU (Inductor ~20 s, AOTInductor ~35 s for the tiny DiT),
so the graphs and every compiled or exported artifact are session-scoped fixtures: each real
compile happens once in the whole suite.

Two graphs:
- ``dit_step``: a tiny diffusers DiT captured with torch.export, decomposed to ATen with SDPA
  kept, flattened, plus one simulated cache read (input ``cache.block0`` added to the block-0
  output before block 1 reads it) and one cache write (the block-0 output as an extra output).
- ``partial_step``: a token-wise partial recompute (topk → gather → linear → scatter,
  index_select) with the cache as explicit input/output, as a ToCa step emits it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule, Node


@dataclass
class StepCase:
    """A step graph with its inputs, names and eager reference outputs."""

    gm: GraphModule
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    expected: tuple[torch.Tensor, ...]

    def other_inputs(self, seed: int) -> tuple[torch.Tensor, ...]:
        """Fresh float inputs of the same shapes (integer inputs kept): a second "step"."""
        g = torch.Generator().manual_seed(seed)
        return tuple(
            torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) if t.is_floating_point() else t.clone()
            for t in self.inputs
        )

    def reference(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.gm(*inputs))


def flat_step_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> GraphModule:
    """Export + decompose (SDPA kept) + flat calling convention, as the core does."""
    ep = torch.export.export(module, args, strict=False)
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    gm = ep.run_decompositions(table).module()
    graph = gm.graph
    for node in list(graph.nodes):
        is_guard = node.op == "call_module" and "_guards" in str(node.target)
        is_assert = node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default
        if is_guard or is_assert:
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    # ep.module() checks its inputs against the exported pytree spec in a pre-hook: drop it,
    # the step graph gains cache inputs the spec does not know.
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def add_cache_io(gm: GraphModule, source: Node, name: str) -> GraphModule:
    """Simulate a cache read (new input added to ``source``) and write (``source`` as output)."""
    graph = gm.graph
    val = source.meta["val"]
    last_placeholder = graph.find_nodes(op="placeholder")[-1]
    with graph.inserting_after(last_placeholder):
        cache_in = graph.placeholder(name)
    cache_in.meta["val"] = val.fake_mode.from_tensor(torch.empty(val.shape, dtype=val.dtype), static_shapes=True)
    with graph.inserting_after(source):
        mixed = graph.call_function(torch.ops.aten.add.Tensor, (source, cache_in))
    mixed.meta["val"] = val
    source.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
    out = graph.output_node()
    out.args = (tuple(out.args[0]) + (source,),)
    gm.recompile()
    return gm


def _block_input(gm: GraphModule, block: str) -> Node:
    """The hidden-states node produced outside ``block`` and first consumed inside it."""

    def inside(node: Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(str(path).endswith(block) for path, _ in stack.values())

    for node in gm.graph.nodes:
        if not inside(node):
            continue
        for arg in node.args:
            val = arg.meta.get("val") if isinstance(arg, Node) else None
            if arg is not None and isinstance(val, torch.Tensor) and val.dim() == 3 and not inside(arg):
                if arg.op == "call_function" and val.shape[1] > 1:
                    return arg
    raise LookupError(f"no input of {block} found")


class DiTCall(torch.nn.Module):
    """Calls the diffusers model with tensors only, returning a tuple."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, class_labels):
        return self.model(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=False)


def build_dit_step(device: str = "cpu") -> StepCase:
    """The tiny DiT step graph, captured on ``device`` (graphs bake their device in)."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    ).eval().to(device)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2]))
    args = tuple(a.to(device) for a in args)
    gm = flat_step_graph(DiTCall(model), args)
    gm = add_cache_io(gm, _block_input(gm, "transformer_blocks.1"), "cache_block0")
    inputs = (*args, torch.randn(2, 16, 16, device=device))
    case = StepCase(gm, inputs, ["hidden_states", "timestep", "class_labels", "cache.block0"],
                    ["sample", "cache_write.block0"], ())
    case.expected = case.reference(inputs)
    return case


class PartialRecompute(torch.nn.Module):
    """Recompute the k highest-scoring tokens through a small MLP, reuse the cached rest."""

    def __init__(self, dim: int = 16, k: int = 4) -> None:
        super().__init__()
        self.k = k
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.register_buffer("order", torch.arange(15, -1, -1))

    def forward(self, x: torch.Tensor, cache: torch.Tensor):
        score = x.norm(dim=-1)                                    # [B, N]
        idx = torch.topk(score, self.k, dim=1).indices            # [B, k]
        idx3 = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        fresh = self.mlp(torch.gather(x, 1, idx3))                # [B, k, D]
        new_cache = torch.scatter(cache, 1, idx3, fresh)          # cache write
        reordered = torch.index_select(new_cache, 1, self.order)
        return reordered + x, new_cache


def build_partial_step() -> StepCase:
    torch.manual_seed(1)
    args = (torch.randn(2, 16, 16), torch.randn(2, 16, 16))
    gm = flat_step_graph(PartialRecompute().eval(), args)
    case = StepCase(gm, args, ["x", "cache.mlp"], ["out", "cache_write.mlp"], ())
    case.expected = case.reference(args)
    return case


@pytest.fixture(scope="session")
def dit_step() -> StepCase:
    return build_dit_step()


@pytest.fixture(scope="session")
def partial_step() -> StepCase:
    return build_partial_step()


def assert_close(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rel: float = 1e-4) -> None:
    """Relative max-abs agreement per output: max|a - e| <= rel * max(max|e|, 1e-6)."""
    assert isinstance(actual, tuple), f"backend returned {type(actual).__name__}, not a tuple"
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"output {i}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
        diff = (a.detach().float() - e.float()).abs().max().item()
        scale = max(e.float().abs().max().item(), 1e-6)
        assert diff <= rel * scale, f"output {i}: max abs diff {diff:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(scope="session")
def dit_step_builder() -> Callable[..., StepCase]:
    """``build_dit_step(device)``, for tests that need the graph on another device."""
    return build_dit_step


@pytest.fixture(scope="session")
def dit_onnx_dir(tmp_path_factory, dit_step) -> Path:
    """The dit step exported once with the onnxruntime backend: step0.onnx, entry.json, io.pt."""
    import json

    from cachecompile.backends import get_backend

    directory = tmp_path_factory.mktemp("export-onnxruntime")
    entry = get_backend("onnxruntime").export(
        dit_step.gm, dit_step.inputs, directory, "step0",
        input_names=dit_step.input_names, output_names=dit_step.output_names,
    )
    (directory / "entry.json").write_text(json.dumps(entry, indent=1))
    torch.save({"inputs": dit_step.inputs, "expected": dit_step.expected}, directory / "io.pt")
    return directory


@pytest.fixture(scope="session")
def close() -> Callable[..., None]:
    """``assert_close`` as a fixture (test modules do not import conftest by name)."""
    return assert_close
