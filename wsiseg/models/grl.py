"""Gradient reversal layer (Ganin & Lempitsky): identity forward, gradient multiplied by ``-alpha`` backward."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        ctx.alpha = float(alpha)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.neg() * ctx.alpha, None


def grl(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Return ``x`` unchanged; in the backward pass the gradient w.r.t. ``x`` is ``-alpha * grad``."""
    return _GradReverse.apply(x, alpha)


class GradientReversal(nn.Module):
    """Module form of :func:`grl`; ``alpha`` may be changed between steps (e.g. by the eq. 5 schedule)."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return grl(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
