"""No-op squeezes are removed (torch.onnx turns them into Squeezes that ONNX Runtime rejects)."""

import torch

from cachecompile.passes import counters
from cachecompile.passes.capture import capture
from cachecompile.passes.noop_squeeze import remove_noop_squeezes


class _Head(torch.nn.Module):
    def forward(self, x, y):
        return x.squeeze(1) * 2, y.squeeze(1)  # x: [2, 16, 4] (no-op), y: [2, 1, 4] (real)


def _squeezes(gm):
    return [n for n in gm.graph.nodes if "squeeze" in str(n.target) and "unsqueeze" not in str(n.target)]


def test_only_noop_squeezes_are_removed():
    x, y = torch.randn(2, 16, 4), torch.randn(2, 1, 4)
    cap = capture(_Head(), (x, y))
    assert len(_squeezes(cap.gm)) == 2
    before = counters["noop_squeezes_removed"]
    gm = remove_noop_squeezes(cap.gm)
    gm.recompile()
    kept = _squeezes(gm)
    assert len(kept) == 1 and tuple(kept[0].args[0].meta["val"].shape) == (2, 1, 4)
    assert counters["noop_squeezes_removed"] == before + 1
    a, b = gm(x, y)
    assert torch.equal(a, x * 2) and torch.equal(b, y[:, 0])
