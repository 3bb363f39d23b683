"""RoIAlign on the CPU as one ``embedding_bag`` over the feature map's pixel rows, channels last.

:func:`roi_align_rows` computes what ``torchvision.ops.roi_align(x, rois, out, scale, sampling_ratio,
aligned=False)`` computes, for a fixed ``sampling_ratio >= 1``: every output bin is the mean of
``sampling_ratio ** 2`` bilinear samples, each a weighted sum of four feature-map pixels. Those pixels and weights
depend only on the boxes, so the whole pooling is one weighted gather of ``C``-channel pixel rows
(``torch.nn.functional.embedding_bag`` with ``per_sample_weights``), and a channels-last feature map (the layout
the backbone's convolutions produce on the CPU) is used in place, without a contiguous copy.

Sample positions follow torchvision's CPU kernel operation for operation (so they are the same floats); a sample
more than one pixel outside the map contributes zero, one inside it is clamped to the border, as there. The sums
run in another order, so results equal torchvision's up to float rounding (its speed: docs/speed.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import MultiScaleRoIAlign


def _axis(start: torch.Tensor, length: torch.Tensor, out: int, sampling: int, size: int):
    """Per box and sample position along one axis: low and high pixel index and their weights, each
    ``(n, out * sampling)``, with the weights of positions outside ``[-1, size]`` zero (torchvision's rule)."""
    length = length.clamp(min=1.0)
    bin_size = length / out
    p = torch.arange(out, dtype=start.dtype, device=start.device).repeat_interleave(sampling)
    i = torch.arange(sampling, dtype=start.dtype, device=start.device).repeat(out)
    # torchvision: roi_start + p * bin_size + (i + .5) * bin_size / sampling, in this order
    v = (start[:, None] + p * bin_size[:, None]) + (i + 0.5) * bin_size[:, None] / sampling
    inside = (v >= -1.0) & (v <= size)
    v = v.clamp(min=0.0)
    lo = v.to(torch.long)  # v >= 0: truncation is floor
    top = lo >= size - 1
    lo = torch.where(top, torch.full_like(lo, size - 1), lo)
    hi = torch.where(top, lo, lo + 1)
    frac = torch.where(top, torch.zeros_like(v), v - lo.to(v.dtype))
    w_hi = frac * inside
    w_lo = (1.0 - frac) * inside
    return lo, hi, w_lo, w_hi


def roi_align_rows(x: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
                   sampling_ratio: int) -> torch.Tensor:
    """``roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned=False)`` as an ``(n, out, out, C)``
    tensor (channels last; ``.permute(0, 3, 1, 2)`` is the ``(n, C, out, out)`` result with channels-last strides).

    ``x``: ``(B, C, H, W)`` float features, best channels-last (any layout works: others are copied once).
    ``rois``: ``(n, 5)`` rows ``(batch index, x1, y1, x2, y2)`` in input coordinates. ``sampling_ratio >= 1``
    (torchvision's adaptive ``<= 0``, a per-box count, is not supported: ValueError)."""
    if sampling_ratio < 1:
        raise ValueError(f"roi_align_rows needs a fixed sampling_ratio >= 1, got {sampling_ratio}")
    b, c, h, w = x.shape
    n, s, out = rois.shape[0], int(sampling_ratio), int(output_size)
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view when x is channels-last
    if n == 0:
        return x.new_zeros(0, out, out, c)
    r = rois.float()  # positions and weights in float32 whatever the features' type
    x1, y1, x2, y2 = (r[:, 1:] * spatial_scale).unbind(1)
    ylo, yhi, wylo, wyhi = _axis(y1, y2 - y1, out, s, h)
    xlo, xhi, wxlo, wxhi = _axis(x1, x2 - x1, out, s, w)
    base = r[:, 0].to(torch.long) * (h * w)
    # (n, out*s [y], out*s [x], 4 taps): taps in torchvision's order (lo,lo) (lo,hi) (hi,lo) (hi,hi)
    ry = torch.stack([ylo, ylo, yhi, yhi], -1) * w + base[:, None, None]
    rx = torch.stack([xlo, xhi, xlo, xhi], -1)
    wy = torch.stack([wylo, wylo, wyhi, wyhi], -1)
    wx = torch.stack([wxlo, wxhi, wxlo, wxhi], -1)
    idx = ry[:, :, None, :] + rx[:, None, :, :]
    wt = wy[:, :, None, :] * wx[:, None, :, :]
    if s > 1:  # gather each bin's s x s samples into one bag, each weighted 1 / s^2
        idx = idx.view(n, out, s, out, s, 4).permute(0, 1, 3, 2, 4, 5)
        wt = wt.view(n, out, s, out, s, 4).permute(0, 1, 3, 2, 4, 5) / (s * s)
    bag = 4 * s * s
    pooled = F.embedding_bag(idx.reshape(-1, bag), rows, per_sample_weights=wt.reshape(-1, bag).to(rows.dtype),
                             mode="sum")
    return pooled.view(n, out, out, c)


def rois_of(boxes: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(n, 5)`` RoIs ``(image index, x1, y1, x2, y2)`` of per-image ``boxes``, in ``dtype`` (default: the
    boxes')."""
    dtype = dtype or boxes[0].dtype
    idx = torch.cat([torch.full((b.shape[0], 1), i, dtype=dtype, device=b.device) for i, b in enumerate(boxes)])
    return torch.cat([idx, torch.cat(boxes).to(dtype)], dim=1)


def rois_at(boxes: torch.Tensor, image: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`rois_of` for all images' ``boxes`` ``(n, 4)`` at once, ``image`` ``(n,)`` their image index."""
    dtype = dtype or boxes.dtype
    return torch.cat([image.to(dtype)[:, None], boxes.to(dtype)], dim=1)


def multiscale_roi_align_rows(pooler, feats: dict, boxes: list[torch.Tensor],
                              image_shapes: list[tuple[int, int]]) -> torch.Tensor | None:
    """What torchvision's ``MultiScaleRoIAlign`` ``pooler(feats, boxes, image_shapes)`` computes, each FPN level's
    boxes pooled by :func:`roi_align_rows`, as an ``(n, out, out, C)`` tensor in the order of the boxes; differentiable
    with respect to the features. ``None`` where it does not apply: features off the CPU, an adaptive sampling ratio,
    a non-square output, or a pooler without torchvision's level mapping.

    The pooler's scales are set up as torchvision does on its first call (by calling it with no boxes), so every
    call, the first included, pools the same way: a box's result never depends on the other boxes of the call."""
    if not rows_apply(pooler, feats):
        return None
    boxes = boxes or [feats[pooler.featmap_names[0]].new_zeros(0, 4)]  # no image: no boxes
    return pool_rois_rows(pooler, feats, rois_of(boxes, torch.float32), torch.cat(boxes), image_shapes)


def rows_apply(pooler, feats: dict) -> bool:
    """Whether :func:`pool_rois_rows` pools for ``pooler`` on ``feats`` (see :func:`multiscale_roi_align_rows`)."""
    side = getattr(pooler, "output_size", None)
    names = getattr(pooler, "featmap_names", None)
    return (isinstance(pooler, MultiScaleRoIAlign) and side is not None and side[0] == side[1]
            and pooler.sampling_ratio >= 1 and feats[names[0]].device.type == "cpu")


def pool_rois_rows(pooler, feats: dict, rois: torch.Tensor, boxes: torch.Tensor,
                   image_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """:func:`multiscale_roi_align_rows` of all images' boxes at once: ``rois`` ``(n, 5)`` float32 (image index, box)
    and the same ``boxes`` ``(n, 4)`` in their own dtype, which the pooler's level mapping reads (its arithmetic is
    per box, so one call over all boxes gives each box the level a call per image gives it). Only where
    :func:`rows_apply`."""
    side, names = pooler.output_size, pooler.featmap_names
    if pooler.scales is None or pooler.map_levels is None:
        MultiScaleRoIAlign.forward(pooler, feats, [boxes[:0]], image_shapes)  # sets the scales up
    x0 = feats[names[0]]
    if rois.shape[0] == 0:
        return x0.new_zeros(0, side[0], side[0], x0.shape[1])
    if len(pooler.scales) == 1:
        return roi_align_rows(x0, rois, side[0], pooler.scales[0], pooler.sampling_ratio)
    levels = pooler.map_levels([boxes])
    present = torch.unique(levels).tolist()
    if len(present) == 1:
        lvl = present[0]
        return roi_align_rows(feats[names[lvl]], rois, side[0], pooler.scales[lvl], pooler.sampling_ratio)
    sel = [torch.where(levels == lvl)[0] for lvl in present]
    parts = [roi_align_rows(feats[names[lvl]], rois[s], side[0], pooler.scales[lvl], pooler.sampling_ratio)
             for lvl, s in zip(present, sel)]
    return torch.cat(parts).index_select(0, torch.argsort(torch.cat(sel)))  # back in the order of the boxes


class RowsMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` whose forward, on the CPU, pools with :func:`multiscale_roi_align_rows`
    (returned contiguous, ``(n, C, out, out)``, as torchvision's is); elsewhere torchvision's own. No parameters or
    state of its own, so checkpoints are unaffected."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        out = multiscale_roi_align_rows(self, x, boxes, image_shapes)
        if out is None:
            return super().forward(x, boxes, image_shapes)
        return out.permute(0, 3, 1, 2).contiguous()
