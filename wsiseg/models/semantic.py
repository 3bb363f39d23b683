"""Panoptic-FPN style semantic branch (Kirillov et al. 2019) on the FPN levels P2..P5, 2 classes.

Level ``i`` (stride ``4 * 2**i``) goes through ``max(i, 1)`` stages of 3x3 conv + GroupNorm + ReLU, each stage but
the first-level one followed by nearest 2x upsampling, so every level arrives at stride 4; the maps are summed,
a 1x1 convolution gives 2 logits, and bilinear upsampling brings them to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class SemanticHead(nn.Module):
    """``forward(levels, size) -> (N, num_classes, *size)`` logits; ``levels`` are P2.. in stride order."""

    def __init__(self, in_channels: int, num_levels: int = 4, channels: int = 128, num_classes: int = 2,
                 gn_groups: int = 32):
        super().__init__()
        self.branches = nn.ModuleList()
        for i in range(num_levels):
            stages: list[nn.Module] = []
            for j in range(max(i, 1)):
                stages += [
                    nn.Conv2d(in_channels if j == 0 else channels, channels, 3, padding=1, bias=False),
                    nn.GroupNorm(gn_groups, channels),
                    nn.ReLU(inplace=True),
                ]
                if i > 0:
                    stages.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.branches.append(nn.Sequential(*stages))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: Sequence[Tensor], size: tuple[int, int] | None = None) -> Tensor:
        if len(levels) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} FPN levels, got {len(levels)}")
        base = levels[0].shape[-2:]
        out = None
        for branch, f in zip(self.branches, levels):
            y = branch(f)
            if y.shape[-2:] != base:  # odd sizes: nearest-upsampled maps may overshoot by a pixel
                y = F.interpolate(y, size=base, mode="nearest")
            out = y if out is None else out + y
        logits = self.classifier(out)
        if size is None:
            size = (base[0] * 4, base[1] * 4)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def semantic_loss(logits: Tensor, foreground: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel cross-entropy of ``(N, 2, H, W)`` logits against a ``(N, H, W)`` long map (0 bg, 1 fg, ignore)."""
    return F.cross_entropy(logits.float(), foreground.long(), ignore_index=ignore_index)


__all__ = ["SemanticHead", "semantic_loss"]
