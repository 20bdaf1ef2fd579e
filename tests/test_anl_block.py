"""The ANL block on its own: exact identity at init, real dependence on tokens once trained."""

import torch

from anl_core.anl import ANLBlock


def test_fresh_block_is_exact_identity():
    torch.manual_seed(0)
    block = ANLBlock(channels=32, context_dim=24, head_dim=8)
    x, ctx = torch.randn(3, 32, 5, 7), torch.randn(3, 6, 24)
    out = block(x, ctx)
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_block_uses_tokens_once_output_projection_moves():
    torch.manual_seed(0)
    block = ANLBlock(channels=16, context_dim=8, head_dim=8)
    torch.nn.init.normal_(block.to_out.weight, std=0.1)
    x = torch.randn(2, 16, 4, 4)
    a = block(x, torch.randn(2, 3, 8))
    b = block(x, torch.randn(2, 3, 8))
    assert not torch.allclose(a, b), "attention output must depend on the condition tokens"
    assert block.num_heads == 2


def test_gradients_reach_both_zero_initialised_outputs():
    torch.manual_seed(0)
    block = ANLBlock(channels=16, context_dim=8, head_dim=8)
    block(torch.randn(2, 16, 4, 4), torch.randn(2, 3, 8)).square().sum().backward()
    assert block.to_out.weight.grad.abs().sum() > 0
    assert block.ff.proj_out.weight.grad.abs().sum() > 0
