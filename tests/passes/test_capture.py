import pytest
import torch

from cachecompile.passes.capture import CaptureError, capture
from tests.conftest import dit_inputs


def test_capture_is_flat_and_exact(dit):
    kw = dit_inputs()
    cap = capture(dit, (), kw)
    ph = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    assert [p.name for p in ph] == ["hidden_states", "timestep", "class_labels"]
    assert [leaf.name for leaf in cap.call.leaves] == ["hidden_states", "timestep", "class_labels"]
    out = cap.gm(*cap.example_inputs)
    assert isinstance(out, tuple) and len(out) == cap.call.num_outputs == 1
    torch.testing.assert_close(out[0], dit(**kw).sample, rtol=0, atol=0)


def test_attention_stays_fused_and_paths_are_kept(dit):
    cap = capture(dit, (), dit_inputs())
    targets = [n.target for n in cap.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.scaled_dot_product_attention.default) == 3
    paths = {v[0] for n in cap.gm.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()}
    assert {"transformer_blocks.0.attn1", "transformer_blocks.2.ff"} <= paths
    assert not any(n.op == "call_module" for n in cap.gm.graph.nodes)


def test_non_tensor_inputs_are_constants(dit):
    kw = dit_inputs()
    cap = capture(dit, (kw["hidden_states"],), dict(timestep=kw["timestep"], class_labels=kw["class_labels"], return_dict=False))
    assert [leaf.tensor_index for leaf in cap.call.leaves] == [0, 1, 2, None]
    assert cap.call.leaves[3].value is False
    assert cap.call.leaves[0].name == "hidden_states"  # a positional argument by its parameter's name
    torch.testing.assert_close(cap.gm(*cap.example_inputs)[0], dit(**kw).sample, rtol=0, atol=0)


def test_capture_leaves_the_model_untouched(dit):
    kw = dit_inputs()
    before = dit(**kw).sample
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    capture(dit, (), kw)
    assert all(torch.equal(state[k], v) for k, v in dit.state_dict().items())
    assert torch.equal(dit(**kw).sample, before)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_uncapturable_model_fails_with_a_clear_error():
    with pytest.raises(CaptureError, match="torch.export could not capture DataDependent"):
        capture(DataDependent(), (torch.randn(3),))
