"""Side effects and mutation: no pass merges, moves or drops what an in-place op or RNG touches."""

import pytest
import torch

import cachecompile as cc
from cachecompile.passes.capture import capture
from cachecompile.passes.cse import merge_common_subexpressions
from cachecompile.passes.effects import frozen_nodes, has_side_effects, mutated_nodes
from tests.conftest import make_dit

ARANGE = torch.ops.aten.arange.default


class TwoMutatedAranges(torch.nn.Module):
    """Two identical ``arange`` nodes, each divided in place by a different amount (diffusers'
    sin-cos position embedding does this at run time off its native size)."""

    def forward(self, x):
        a = torch.arange(x.shape[-1], dtype=torch.float32)
        a /= 2.0
        b = torch.arange(x.shape[-1], dtype=torch.float32)
        b /= 3.0
        return x + a + b + torch.arange(x.shape[-1], dtype=torch.float32) + torch.arange(x.shape[-1], dtype=torch.float32)


def test_mutated_values_and_their_readers_are_frozen_pure_repeats_are_not():
    x = torch.randn(2, 5)
    gm = capture(TwoMutatedAranges(), (x,)).gm
    aranges = [n for n in gm.graph.nodes if n.target == ARANGE]
    assert len(aranges) == 4
    mutated = mutated_nodes(gm.graph)
    assert sum(n in mutated for n in aranges) == 2  # the two divided in place
    frozen = frozen_nodes(gm.graph)
    assert all(n in frozen for n in mutated)
    merged = merge_common_subexpressions(gm)
    merged.recompile()
    # the two untouched aranges merge into one; the mutated ones stay apart
    assert sum(n.target == ARANGE for n in merged.graph.nodes) == 3
    assert torch.equal(merged(x)[0], TwoMutatedAranges()(x))


def test_attention_without_dropout_is_pure_random_ops_are_not():
    class M(torch.nn.Module):
        def forward(self, q, mask):
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            b = torch.nn.functional.scaled_dot_product_attention(q, q, q, mask, 0.0)  # dropout_p positional
            c = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
            return a, b, c, torch.rand_like(q)

    gm = capture(M(), (torch.randn(1, 2, 4, 8), torch.zeros(4, 4))).gm
    sdpa = [n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert [has_side_effects(n) for n in sdpa] == [False, False, True]
    assert has_side_effects(next(n for n in gm.graph.nodes if "rand" in str(n.target)))


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (12, 12)])
def test_dit_all_compute_is_the_model_at_native_and_other_resolutions(size):
    model = make_dit()  # native 8×8 latents; other sizes build the position embedding at run time
    # (diffusers' DiT unpatchifies as a square: non-square inputs are the other families' business)
    g = torch.Generator().manual_seed(0)
    call = dict(hidden_states=torch.randn(2, 4, *size, generator=g), timestep=torch.tensor([900, 900]), class_labels=torch.tensor([1, 7]))
    cached = cc.optimize(model, cc.Schedule.fora(2, 1))
    with torch.no_grad():
        assert torch.equal(cached(**call).sample, model(**call).sample)


@pytest.mark.parametrize("size", [(16, 16), (8, 12)])
def test_pixart_all_compute_is_the_model_off_its_native_resolution(size):
    from diffusers import PixArtTransformer2DModel

    from tests.families._common import randomize_zero_parameters

    torch.manual_seed(0)
    model = randomize_zero_parameters(PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ))
    g = torch.Generator().manual_seed(0)
    call = dict(
        hidden_states=torch.randn(2, 4, *size, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        timestep=torch.tensor([900, 900]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    cached = cc.optimize(model, cc.Schedule.fora(2, 1))
    with torch.no_grad():
        assert torch.equal(cached(**call).sample, model(**call).sample)


C10D = torch.ops._c10d_functional


def _collective_graph() -> torch.fx.GraphModule:
    """Four all-to-alls as a context-parallel attention records them (collective, then wait): a
    dead one, two identical live ones, one with a dead and a live wait; and an in-place
    all-reduce whose result nothing reads."""
    g = torch.fx.Graph()
    x = g.placeholder("x")

    def all_to_all(name):
        return g.create_node("call_function", C10D.all_to_all_single.default, (x, [2, 2], [2, 2], "0"), name=name)

    def wait(node, name):
        return g.create_node("call_function", C10D.wait_tensor.default, (node,), name=name)

    wait(all_to_all("dead"), "dead_wait")
    live_a = wait(all_to_all("live_a"), "live_a_wait")
    live_b = wait(all_to_all("live_b"), "live_b_wait")  # the same op on the same input as live_a
    shared = all_to_all("shared")
    wait(shared, "shared_dead_wait")
    shared_live = wait(shared, "shared_live_wait")
    reduced = g.create_node("call_function", C10D.all_reduce_.default, (x, "sum", "0"), name="inplace")
    wait(reduced, "inplace_wait")
    total = g.call_function(torch.ops.aten.add.Tensor, (live_a, live_b))
    g.output((g.call_function(torch.ops.aten.add.Tensor, (total, shared_live)),))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_a_collective_is_dropped_with_its_waits_only_when_nothing_reads_it():
    from cachecompile.passes import counters
    from cachecompile.passes.dce import remove_dead_code
    from cachecompile.passes.effects import is_collective, is_wait

    gm = _collective_graph()
    nodes = {n.name: n for n in gm.graph.nodes}
    assert is_collective(nodes["dead"]) and is_wait(nodes["dead_wait"]) and not is_wait(nodes["dead"])
    assert not has_side_effects(nodes["dead_wait"])  # its collective delivers to no one
    assert has_side_effects(nodes["shared_dead_wait"])  # its collective has a live wait
    assert has_side_effects(nodes["inplace_wait"])  # an in-place collective writes its input
    before = counters["collectives_removed"]
    remove_dead_code(gm)
    left = [n.name for n in gm.graph.nodes if is_collective(n)]
    assert left == ["live_a", "live_a_wait", "live_b", "live_b_wait", "shared", "shared_dead_wait",
                    "shared_live_wait", "inplace", "inplace_wait"]
    assert counters["collectives_removed"] - before == 1


def test_collectives_are_never_merged_or_moved():
    gm = _collective_graph()
    frozen = frozen_nodes(gm.graph)
    assert {n.name for n in gm.graph.nodes if n.op == "call_function" and "c10d" in str(n.target)} <= {n.name for n in frozen}
    order = [n.name for n in gm.graph.nodes]
    merge_common_subexpressions(gm)
    assert [n.name for n in gm.graph.nodes] == order  # live_a and live_b are the same op: not merged
