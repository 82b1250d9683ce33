"""Repeated computations are merged: the timestep embedding, and embedders shared by value."""

import copy

import torch

import cachecompile as cc
from cachecompile.tools.zoo import tie_block_embedders
from cachecompile.sampling import ddim_sample
from cachecompile.passes import counters
from tests.conftest import dit_inputs, fora_reference

LINEAR = torch.ops.aten.linear.default
SIN = torch.ops.aten.sin.default


def _embedder_linears(gm):
    return [n for n in gm.graph.nodes if n.target == LINEAR and ".norm1.emb.timestep_embedder." in str(n.meta.get("nn_module_stack"))]


def _converted_checkpoint(dit):
    """Like diffusers' conversion of the original DiT: one embedder copied into every block."""
    shared = copy.deepcopy(dit)
    tie_block_embedders(shared)
    return shared


def test_embedders_equal_by_value_run_once_and_results_are_unchanged(dit, labels, sample_kwargs):
    model = _converted_checkpoint(dit)
    before = counters["nodes_merged"]
    cached = cc.optimize(model, cc.Schedule.fora(12, 3))
    got = ddim_sample(cached, labels, **sample_kwargs)
    assert counters["nodes_merged"] > before
    for gm in cached.step_graphs.values():
        assert len(_embedder_linears(gm)) == 2  # linear_1 and linear_2 once, not once per block
        assert sum(n.target == SIN for n in gm.graph.nodes) == 1
    # exact against the independent FORA reference, and all-compute is bit-identical to the model
    expected = ddim_sample(fora_reference(model, 3), labels, **sample_kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    uncached = ddim_sample(model, labels, **sample_kwargs)
    assert torch.equal(ddim_sample(cc.optimize(model, cc.Schedule.fora(12, 1)), labels, **sample_kwargs), uncached)


def test_distinct_weights_are_not_merged(dit):
    cached = cc.optimize(dit, cc.Schedule.fora(12, 3))
    cached.prepare(**dit_inputs())
    layers = dit.config.num_layers
    for gm in cached.step_graphs.values():
        # every block keeps its own embedder MLP; the output head's call of block 0's is merged
        assert len(_embedder_linears(gm)) == 2 * layers
        assert sum(n.target == SIN for n in gm.graph.nodes) == 1


def test_parameters_are_compared_by_value_in_any_dtype():
    from cachecompile.passes.capture import capture
    from cachecompile.passes.cse import merge_common_subexpressions

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(4, 4).to(torch.bfloat16) for _ in range(3))
            with torch.no_grad():
                self.b.load_state_dict(self.a.state_dict())  # b is an equal copy of a; c differs

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x)

    m = Two().eval()
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    gm = merge_common_subexpressions(capture(m, (x,)).gm)
    gm.recompile()
    assert sum(n.target == LINEAR for n in gm.graph.nodes) == 2
    assert torch.equal(gm(x)[0], m(x))
