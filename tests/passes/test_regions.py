import pytest
import torch

from cachecompile.passes.capture import capture
from cachecompile.passes.regions import RegionError, RegionPatterns, find_regions, normalize_path
from tests.conftest import dit_inputs


@pytest.fixture(scope="module")
def captured(dit):
    return capture(dit, (), dit_inputs())


def test_dit_regions(captured):
    rm = find_regions(captured.gm, model_class="diffusers.DiTTransformer2DModel")
    assert rm.layout.branches == (("attn", "mlp"),) * 3
    assert set(rm.regions) == {f"blocks.{i}{k}" for i in range(3) for k in ("", ".attn", ".mlp")} | {"stack"}
    assert rm["blocks.1.attn"].path == "transformer_blocks.1.attn1"
    assert rm["blocks.2.mlp"].path == "transformer_blocks.2.ff"
    for name, r in rm.regions.items():
        assert len(r.outputs) == 1, name


def test_branch_outputs_are_before_the_gate(captured):
    """The attention output's users are the gate multiply, not the residual add."""
    rm = find_regions(captured.gm)
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    for i in range(3):
        for kind in ("attn", "mlp"):
            out = nodes[rm[f"blocks.{i}.{kind}"].outputs[0]]
            assert [u.target for u in out.users] == [torch.ops.aten.mul.Tensor], (i, kind)


def test_second_call_of_a_module_is_not_in_the_block(captured):
    """DiT calls transformer_blocks.0.norm1.emb again in its output head: not part of block 0."""
    rm = find_regions(captured.gm)
    block0 = rm["blocks.0"].nodes
    stray = [
        n.name
        for n in captured.gm.graph.nodes
        if any(k.endswith("@1") for k in (n.meta.get("nn_module_stack") or {}))
    ]
    assert stray and not (set(stray) & block0)
    assert not (set(stray) & rm["stack"].nodes)


def test_stack_spans_all_blocks(captured):
    rm = find_regions(captured.gm)
    stack = rm["stack"]
    assert stack.outputs == rm["blocks.2"].outputs
    assert all(rm[f"blocks.{i}"].nodes <= stack.nodes for i in range(3))


def test_no_region_names_the_patterns(captured):
    with pytest.raises(RegionError, match=r"layers\.\*.*Module paths in the graph include: .*transformer_blocks"):
        find_regions(captured.gm, RegionPatterns(blocks=("layers.*",)))


def test_blocks_without_branches_fail(captured):
    with pytest.raises(RegionError, match="no branch inside them"):
        find_regions(captured.gm, RegionPatterns(branches={"attn": "self_attn"}))


def test_custom_patterns(captured):
    rm = find_regions(captured.gm, RegionPatterns(blocks=("transformer_blocks.*",), branches={"mlp": "ff"}))
    assert rm.layout.branches == (("mlp",),) * 3


def test_normalize_path():
    assert normalize_path("L['self'].transformer_blocks[0].attn1") == "transformer_blocks.0.attn1"
    assert normalize_path("transformer_blocks.0.attn1") == "transformer_blocks.0.attn1"
