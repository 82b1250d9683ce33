"""Region defaults per family, per-group branches, and aliases that belong to no block."""

import torch

import cachecompile as cc
from cachecompile.passes.capture import capture
from cachecompile.passes.families import FAMILIES
from cachecompile.passes.regions import RegionPatterns, find_regions, patterns_for
from tests.conftest import dit_inputs


def test_every_family_is_registered():
    for name in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                 "FluxTransformer2DModel", "WanTransformer3DModel"):
        assert patterns_for(name) is FAMILIES[name]


def test_block_branches_override_the_branches_of_one_group(dit):
    cap = capture(dit, (), dit_inputs())
    patterns = RegionPatterns(
        blocks=("transformer_blocks.0", "transformer_blocks.*"), block_branches={"transformer_blocks.0": {"mlp": "ff"}}
    )
    rm = find_regions(cap.gm, patterns)
    assert rm.layout.branches == (("mlp",), ("attn", "mlp"), ("attn", "mlp"))
    assert "in 'transformer_blocks.0' {'mlp': 'ff'}" in patterns.describe()


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, temb):
        return x + self.lin(x) * temb.float()  # a no-op .float(): the tracer records it here


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x, t):
        temb = torch.sin(t)[:, None]
        for block in self.blocks:
            x = block(x, temb)
        return x * temb


def test_alias_of_an_outside_value_is_no_block_output():
    torch.manual_seed(0)
    net, patterns = _Net().eval(), RegionPatterns(blocks=("blocks.*",), branches={"mlp": "lin"})
    x = torch.randn(2, 4)
    cap = capture(net, (x, torch.ones(2)))
    rm = find_regions(cap.gm, patterns)
    assert len(rm["blocks.0"].outputs) == 1  # not the block-0 node that block 1 reads as temb
    # reusing block 0 at step 1: block 1 and the head see step 1's temb, not step 0's
    cached = cc.optimize(net, cc.Schedule.explicit([{}, {"blocks.0": "reuse"}]), regions=patterns)
    h0 = net.blocks[0](x, torch.sin(torch.ones(2))[:, None])
    cached(x, torch.ones(2))
    t1 = torch.full((2,), 0.5)
    temb1 = torch.sin(t1)[:, None]
    expected = net.blocks[1](h0, temb1) * temb1
    torch.testing.assert_close(cached(x, t1), expected, rtol=0, atol=1e-6)
