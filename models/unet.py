"""A small UNet for dense mask-to-mask prediction (PCNet-M's completion network).

Encoder-decoder with skip connections keeps the visible boundary pixel-exact
while the bottleneck sees enough context to extend a shape behind an occluder.
Inputs of any size work: they are padded to a multiple of 2**depth and the
output is cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """UNet(in_channels, out_channels, base_channels, depth): (B,Cin,H,W) -> (B,Cout,H,W) logits.

    Channels double at each of the `depth` downsamplings (capped at 8x base).
    """

    def __init__(self, in_channels: int, out_channels: int = 1, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or base_channels < 1 or depth < 1:
            raise ValueError(
                f"UNet: in_channels, out_channels, base_channels and depth must be >= 1, got "
                f"{in_channels}, {out_channels}, {base_channels}, {depth}"
            )
        self.depth = depth
        widths = [base_channels * min(2**i, 8) for i in range(depth + 1)]
        self.inc = _block(in_channels, widths[0])
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([up(y), skips.pop()], 1))
        return self.head(y)[..., :h, :w]
