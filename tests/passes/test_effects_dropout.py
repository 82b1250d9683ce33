"""Dropout that cannot drop (eval mode, or p == 0) and attention without dropout are pure: a
reused block's whole branch goes, not only its cached output's readers."""

import torch
import torch.nn.functional as F

from cachecompile.passes.capture import capture
from cachecompile.passes.effects import has_side_effects

DROPOUT = torch.ops.aten.dropout.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


class Dropouts(torch.nn.Module):
    def forward(self, x):
        q = x.reshape(1, 1, *x.shape)
        a = F.scaled_dot_product_attention(q, q, q, attn_mask=None, dropout_p=0.0, is_causal=False)
        return F.dropout(x, 0.1, training=False) + F.dropout(x, 0.0, training=True) + a.reshape(x.shape), F.dropout(x, 0.1, training=True)


def test_dropout_is_impure_only_where_it_drops():
    gm = capture(Dropouts(), (torch.randn(4, 8),)).gm
    drops = [n for n in gm.graph.nodes if n.target == DROPOUT]
    attention = [n for n in gm.graph.nodes if n.target == SDPA]
    assert len(drops) == 3 and len(attention) == 1
    assert [has_side_effects(n) for n in drops] == [False, False, True]  # eval, p = 0, training with p > 0
    assert not has_side_effects(attention[0])  # attn_mask given positionally: dropout_p is argument 4
