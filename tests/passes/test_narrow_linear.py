"""Chunked linears compute only the chunks a step graph still reads."""

import torch

from cachecompile.passes import counters
from cachecompile.passes.capture import capture
from cachecompile.passes.narrow_linear import narrow_chunked_linears

LINEAR = torch.ops.aten.linear.default


class _AdaLN(torch.nn.Module):
    def __init__(self, dim=8, chunks=6):
        super().__init__()
        self.linear = torch.nn.Linear(dim, chunks * dim)
        self.all = torch.nn.Linear(dim, 2 * dim)

    def forward(self, emb, x):
        a, b, c, d, e, f = self.linear(emb).chunk(6, dim=1)
        g, h = self.all(emb).chunk(2, dim=-1)  # both chunks used: left alone
        return x * a[:, None] + b[:, None] + e[:, None], g + h


def _linears(gm):
    return [n for n in gm.graph.nodes if n.target == LINEAR]


def test_only_used_chunks_are_computed_from_weight_row_views():
    torch.manual_seed(0)
    m = _AdaLN().eval()
    emb, x = torch.randn(3, 8), torch.randn(3, 5, 8)
    cap = capture(m, (emb, x))
    cap.gm.graph.eliminate_dead_code()  # what dead code removal leaves: getitems of a, b, e only
    before = counters["linears_narrowed"]
    gm = narrow_chunked_linears(cap.gm)
    gm.graph.lint()
    gm.recompile()
    assert counters["linears_narrowed"] == before + 1
    # chunks (a, b) form one run over rows 0:16, e is rows 32:40; the 2-chunk linear is untouched
    rows = sorted(tuple(n.args[1].args[2:]) for n in _linears(gm) if n.args[1].op == "call_function")
    assert rows == [(0, 16), (32, 40)]
    assert len(_linears(gm)) == 3
    ref = m(emb, x)
    with torch.no_grad():
        out = gm(emb, x)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_linear_with_other_users_is_left_alone():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 8)

        def forward(self, x):
            y = self.linear(x)
            return y.chunk(2, dim=-1)[0] + y.sum()

    cap = capture(M().eval(), (torch.randn(2, 4),))
    cap.gm.graph.eliminate_dead_code()
    before = counters["linears_narrowed"]
    narrow_chunked_linears(cap.gm)
    assert counters["linears_narrowed"] == before
