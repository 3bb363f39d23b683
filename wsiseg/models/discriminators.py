"""The three PDAM domain discriminators (paper section 3.1, 3.3, tables 1 and 2) and their small helpers.

Domain labels: for the 2-way discriminators (image, semantic) class 0 is *source*, class 1 *target*; the
instance discriminator returns one logit, the log-odds of *source*. Every discriminator expects its input to
have passed through the gradient reversal layer already (see :mod:`wsiseg.models.pdam`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCE, TARGET = 0, 1


def _conv_gn_relu(cin: int, cout: int, k: int, s: int, p: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False),
        nn.GroupNorm(min(groups, cout), cout),
        nn.ReLU(inplace=True),
    )


def pool_fpn_levels(levels: Sequence[Tensor], size: int = 8) -> Tensor:
    """Table 1 input: every FPN map average-pooled to ``size x size`` and summed -> ``(N, C, size, size)``."""
    out = F.adaptive_avg_pool2d(levels[0], size)
    for f in levels[1:]:
        out = out + F.adaptive_avg_pool2d(f, size)
    return out


class ImageDiscriminator(nn.Module):
    """Table 1: three 3x3 stride-1 convolutions (GN + ReLU) and a 1x1 convolution to 2 domain logits per location.

    Input ``(N, in_channels, 8, 8)`` (see :func:`pool_fpn_levels`), output ``(N, 2, 8, 8)``. With the paper's values
    ``in_channels=256, channels=(256, 512, 512)``.
    """

    def __init__(self, in_channels: int = 256, channels: Sequence[int] = (256, 512, 512), gn_groups: int = 32):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = _conv_gn_relu(in_channels, c1, 3, 1, 1, gn_groups)
        self.conv2 = _conv_gn_relu(c1, c2, 3, 1, 1, gn_groups)
        self.conv3 = _conv_gn_relu(c2, c3, 3, 1, 1, gn_groups)
        self.conv4 = nn.Conv2d(c3, 2, 1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv4(self.conv3(self.conv2(self.conv1(x))))


class InstanceDiscriminator(nn.Module):
    """Section 3.1: three fully connected layers (``in -> 1024 -> 256 -> 1``) on per-RoI features.

    Input ``(R, in_features)`` (box-head feature + 2x2-pooled mask-branch feature), output ``(R, 1)`` log-odds of
    *source*.
    """

    def __init__(self, in_features: int = 1024, hidden: Sequence[int] = (1024, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.fc = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class _Residual(nn.Module):
    """``relu(x + GN(conv(relu(GN(conv(x))))))`` with two 3x3 stride-1 convolutions (the R_i1, R_i2 of table 2)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, c), c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, c), c)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(y)))


class SemanticDiscriminator(nn.Module):
    """Table 2: C1 7x7/2, then three 5x5/2 convolutions, each followed by a residual block, and a 1x1 to 2 logits.

    Input: the 2-channel normalised entropy map of the semantic softmax (:func:`entropy_map`), ``(N, 2, H, W)``;
    output ``(N, 2, H/16, W/16)`` (16x16 patches for a 256x256 input). Paper widths ``(64, 128, 256, 512)``.
    """

    def __init__(self, in_channels: int = 2, channels: Sequence[int] = (64, 128, 256, 512), gn_groups: int = 32):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.c1 = _conv_gn_relu(in_channels, c1, 7, 2, 3, gn_groups)
        self.r1 = _Residual(c1, gn_groups)
        self.c2 = _conv_gn_relu(c1, c2, 5, 2, 2, gn_groups)
        self.r2 = _Residual(c2, gn_groups)
        self.c3 = _conv_gn_relu(c2, c3, 5, 2, 2, gn_groups)
        self.r3 = _Residual(c3, gn_groups)
        self.c4 = _conv_gn_relu(c3, c4, 5, 2, 2, gn_groups)
        self.r4 = _Residual(c4, gn_groups)
        self.c5 = nn.Conv2d(c4, 2, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.r1(self.c1(x))
        x = self.r2(self.c2(x))
        x = self.r3(self.c3(x))
        x = self.r4(self.c4(x))
        return self.c5(x)


def entropy_map(probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-class weighted self-information ``-p log p / log C`` of a softmax ``(N, C, H, W)``, values in [0, 1/e/log C].

    Summed over the channel axis it is the Shannon entropy normalised to [0, 1].
    """
    c = probs.shape[1]
    return -probs * torch.log(probs.clamp_min(eps)) / float(torch.log(torch.tensor(float(c))))


def domain_ce(logits: Tensor, domain: int) -> Tensor:
    """Mean cross-entropy of 2-way per-location domain logits ``(N, 2, ...)`` against one domain label."""
    target = torch.full((logits.shape[0], *logits.shape[2:]), domain, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target)


def domain_bce(logits: Tensor, domain: int) -> Tensor:
    """Mean binary cross-entropy of source log-odds ``(R, 1)`` against one domain label."""
    y = torch.full_like(logits, 1.0 if domain == SOURCE else 0.0, dtype=torch.float32)
    return F.binary_cross_entropy_with_logits(logits.float(), y)


def log_ratio_2way(logits: Tensor) -> Tensor:
    """``log((1 - p_s) / p_s) = l_target - l_source`` per location for 2-way logits."""
    return logits[:, TARGET].float() - logits[:, SOURCE].float()


def log_ratio_1way(logits: Tensor) -> Tensor:
    """``log((1 - p_s) / p_s) = -logit`` for source log-odds."""
    return -logits.float()
