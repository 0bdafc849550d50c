"""CropEncoder's folded, channels-last backbone for eval mode without gradient: the plain
backbone's values, used only where no gradient is needed, never stale."""

from __future__ import annotations

import copy
import pickle

import torch

from amodal3d.models.encoder import CropEncoder, set_fused_inference


def encoder_and_input(seed: int = 0):
    torch.manual_seed(seed)
    enc = CropEncoder("resnet10t", in_chans=5, feat_dim=32, num_categories=3)
    enc.train()
    with torch.no_grad():  # BatchNorm statistics away from their initial 0 / 1
        for _ in range(3):
            enc(torch.rand(8, 5, 32, 32), torch.zeros(8, dtype=torch.long))
    return enc.eval(), torch.rand(4, 5, 32, 32), torch.tensor([0, 1, 2, 0])


def test_folded_backbone_gives_the_plain_values_without_gradient():
    enc, x, c = encoder_and_input()
    with torch.no_grad():
        folded = enc(x, c)
        assert enc._fused is not None  # the folded copy served it
        set_fused_inference(enc, False)
        plain = enc(x, c)
    assert (folded - plain).abs().max() < 1e-4 * plain.abs().max()
    names = {type(m).__name__ for m in enc._fused[1].modules()}
    assert "BatchNorm2d" not in names  # folded, not merely copied


def test_it_is_not_used_where_a_gradient_or_training_needs_the_batchnorm():
    enc, x, c = encoder_and_input()
    enc(x, c).sum().backward()  # eval mode, gradient enabled: the plain backbone
    assert enc._fused is None and enc.backbone.conv1[0].weight.grad is not None
    enc.train()
    with torch.no_grad():
        enc(x, c)
    assert enc._fused is None
    assert set_fused_inference(torch.nn.Sequential(enc, torch.nn.Linear(1, 1)), False) == 1 and not enc.fused_inference


def test_it_follows_every_weight_change():
    """An optimiser step and a load_state_dict each rebuild the folded copy: its output
    is always that of the current weights."""
    enc, x, c = encoder_and_input()
    with torch.no_grad():
        before = enc(x, c)
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    enc.train()
    enc(torch.rand(8, 5, 32, 32), torch.zeros(8, dtype=torch.long)).pow(2).mean().backward()
    opt.step()
    enc.eval()
    with torch.no_grad():
        after = enc(x, c)
        set_fused_inference(enc, False)
        plain_after = enc(x, c)
        set_fused_inference(enc, True)
    assert (after - before).abs().max() > 1e-3
    assert (after - plain_after).abs().max() < 1e-4 * plain_after.abs().max()
    other, _, _ = encoder_and_input(seed=1)
    enc.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert (enc(x, c) - other(x, c)).abs().max() < 1e-4 * other(x, c).abs().max()


def test_copies_and_pickles_drop_the_folded_copy():
    enc, x, c = encoder_and_input()
    with torch.no_grad():
        enc(x, c)
    assert enc._fused is not None
    assert copy.deepcopy(enc)._fused is None
    again = pickle.loads(pickle.dumps(enc))
    assert again._fused is None and "_fused" not in "".join(again.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x, c), enc(x, c), atol=1e-6)


def test_channels_last_training_gives_the_contiguous_values_and_gradients():
    """channels_last=True: the backbone's conv weights and its input channels-last in training,
    the same loss and gradients as the contiguous layout up to float rounding; a contiguous
    state_dict loads into it (and back) without a layout error."""
    torch.manual_seed(0)
    plain = CropEncoder("resnet10t", in_chans=5, feat_dim=32, num_categories=3).train()
    fast = CropEncoder("resnet10t", in_chans=5, feat_dim=32, num_categories=3, channels_last=True).train()
    fast.load_state_dict(plain.state_dict())
    conv = fast.backbone.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, c = torch.rand(8, 5, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for enc in (plain, fast):
        enc(x, c).pow(2).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-8, name
        assert b.grad.stride() == b.stride(), name  # the gradient keeps the weight's layout
    for a, b in zip(plain.buffers(), fast.buffers()):  # BatchNorm statistics of that step
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)
    plain.load_state_dict(fast.state_dict())
