"""The step-graph passes: cache writes, cache reads, dead code removal (and their counters)."""

import torch

import cachecompile as cc
from cachecompile.compile.pipeline import concrete_shape
from cachecompile.compile.pipeline import build_step_graph
from cachecompile.passes import counters
from cachecompile.passes.capture import capture
from cachecompile.passes.dce import remove_dead_code
from cachecompile.passes import copy_graph_module
from cachecompile.passes.regions import find_regions
from tests.conftest import dit_inputs

SDPA = torch.ops.aten.scaled_dot_product_attention.default
LINEAR = torch.ops.aten.linear.default


def _setup(dit, schedule):
    cap = capture(dit, (), dit_inputs())
    rm = find_regions(cap.gm)
    return cap, rm, schedule.resolve(rm.layout)


def _linear_paths(gm):
    return [
        list((n.meta.get("nn_module_stack") or {}).values())[-1][0]
        for n in gm.graph.nodes
        if n.target == LINEAR
    ]


def test_fora_cached_step_has_no_attention_or_mlp(dit):
    cap, rm, plans = _setup(dit, cc.Schedule.fora(12, 3))
    full, cached = build_step_graph(cap.gm, rm, plans[0]), build_step_graph(cap.gm, rm, plans[1])
    assert sum(n.target == SDPA for n in full.graph.nodes) == 3
    assert sum(n.target == SDPA for n in cached.graph.nodes) == 0
    # no linear of attn1 or ff survives; the adaLN linears do, narrowed to the two gates (chunks
    # 2 and 5 of 6: gate_msa, gate_mlp), and the output head
    paths = _linear_paths(cached)
    assert not [p for p in paths if ".attn1" in p or ".ff" in p]
    assert sum(".norm1.linear" in p for p in paths) == 2 * 3
    d = dit.config.num_attention_heads * dit.config.attention_head_dim
    rows = {tuple(n.args[1].args[2:]) for n in cached.graph.nodes if n.target == LINEAR and n.args[1].op == "call_function"}
    assert rows == {(2 * d, 3 * d), (5 * d, 6 * d)}
    assert "proj_out_2" in paths
    branch_nodes = set().union(*(rm[r].nodes for r in rm.layout.branch_regions()))
    assert not [n.name for n in cached.graph.nodes if n.name in branch_nodes]
    assert len([n for n in full.graph.nodes if n.name in branch_nodes]) == len({b for b in branch_nodes if not b.startswith("_assert")})


def test_cache_io_convention(dit):
    cap, rm, plans = _setup(dit, cc.Schedule.fora(12, 3))
    full, cached = build_step_graph(cap.gm, rm, plans[0]), build_step_graph(cap.gm, rm, plans[1])
    slots = [f"blocks.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
    assert full.meta["cachecompile"].cache_inputs == []
    assert full.meta["cachecompile"].cache_outputs == sorted(slots)
    assert sorted(cached.meta["cachecompile"].cache_inputs) == sorted(slots)
    assert cached.meta["cachecompile"].cache_outputs == []
    outs = full(*cap.example_inputs)
    assert len(outs) == 1 + 6
    # feeding the full step's writes back into the cached step reproduces the full step
    by_slot = dict(zip(full.meta["cachecompile"].cache_outputs, outs[1:]))
    again = cached(*cap.example_inputs, *[by_slot[s] for s in cached.meta["cachecompile"].cache_inputs])
    torch.testing.assert_close(again[0], outs[0], rtol=0, atol=0)


def test_stack_reuse_removes_every_block(dit):
    cap, rm, plans = _setup(dit, cc.Schedule.explicit([{}, {"stack": "reuse"}]))
    g = build_step_graph(cap.gm, rm, plans[1])
    assert g.meta["cachecompile"].cache_inputs == ["stack"]
    assert not [n for n in g.graph.nodes if rm["stack"].nodes & {n.name}]
    # the output head (second call of norm1.emb, proj_out) stays
    assert "proj_out_2" in _linear_paths(g)


def test_step_graphs_share_parameters(dit):
    cap, rm, plans = _setup(dit, cc.Schedule.fora(4, 2))
    full = build_step_graph(cap.gm, rm, plans[0])
    model_params = {p.data_ptr() for p in dit.parameters()}
    assert {p.data_ptr() for p in full.parameters()} <= model_params


def test_counters_and_dce(dit):
    cap, rm, plans = _setup(dit, cc.Schedule.fora(4, 2))
    counters.clear()
    build_step_graph(cap.gm, rm, plans[1])
    assert counters["cache_reads"] == 6 and counters["dead_nodes_removed"] > 100
    # dce alone on an unchanged graph only removes the export asserts
    g = copy_graph_module(cap.gm)
    n_assert = sum(getattr(n.target, "__name__", "").startswith("_assert") for n in g.graph.nodes)
    before = len(g.graph.nodes)
    remove_dead_code(g)
    assert before - len(g.graph.nodes) >= n_assert
    assert sum(n.target == SDPA for n in g.graph.nodes) == 3


def test_placeholders_follow_the_calling_convention(dit):
    from cachecompile.passes.cache_io import add_cache_input, add_step_input, cache_io, order_placeholders

    cap, rm, plans = _setup(dit, cc.Schedule.fora(4, 2))
    g = copy_graph_module(cap.gm)
    nodes = {n.name: n for n in g.graph.nodes}
    out = nodes[rm["blocks.0.mlp"].outputs[0]]
    w = add_step_input(g, "weight:blocks.0.mlp", torch.tensor(1.0))
    c = add_cache_input(g, "blocks.0.mlp", out)
    user = list(out.users)[0]
    with g.graph.inserting_before(user):
        mixed = g.graph.call_function(torch.ops.aten.add.Tensor, (c, w))
    user.replace_input_with(out, mixed)
    order_placeholders(g)
    names = [n.name for n in g.graph.nodes if n.op == "placeholder"]
    assert names == ["hidden_states", "timestep", "class_labels", "cache_blocks_0_mlp", "step_weight_blocks_0_mlp"]
    assert cache_io(g).step_inputs == ["weight:blocks.0.mlp"]
    g.recompile()
    ref = cap.gm(*cap.example_inputs)[0]
    assert torch.isfinite(g(*cap.example_inputs, torch.zeros(concrete_shape(out.meta["val"])), torch.tensor(0.5))[0]).all()
    assert not torch.equal(g(*cap.example_inputs, torch.zeros(concrete_shape(out.meta["val"])), torch.tensor(0.5))[0], ref)
