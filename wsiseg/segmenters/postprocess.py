"""Vectorised Mask R-CNN post-processing over all instances of a batch of tiles at once, on the model's device.

torchvision's eval path post-processes image by image and pastes masks instance by instance in Python; on a GPU
that loop is most of the inference time. The functions here do the same work with a constant number of tensor
operations per batch (plus, for the overlap rule, one short loop over *waves* of masks that do not touch each
other, not over instances):

- :func:`grouped_nms`: exact NMS that never lets boxes of different groups (image, level or class) suppress each
  other: over all groups at once as batched IoU matrices (:func:`matrix_nms`, the CUDA default), or in a few
  ``torchvision.ops.nms`` calls with the groups packed side by side on a 2-D grid (the CPU default).
- :func:`select_proposals`: the RPN's proposal filtering (per-level top-n, clip, small-box and score filters,
  per-level NMS, post-NMS top-n) for a whole batch.
- :func:`select_detections`: the RoI head's box decoding, softmax, per-class score threshold, per-class NMS and
  per-image top-k for a whole batch.
- :func:`paste_masks`: the ``M x M`` mask probabilities pasted at tile resolution for all detections at once, as two
  batched matrix products of bilinear weights: each pixel centre sampled at the mask coordinate it has in the frame
  the mask was learnt in (the inverse of torchvision's mask targets, :data:`MASK_FRAME_SHIFT`), not torchvision's
  ``paste_masks_in_image``, which stretches the mask over an integer window about a pixel wider than its box;
  :func:`paste_masks_reference` is the same sampling per instance with ``F.grid_sample``, the reference for tests.
- :func:`resolve_overlaps`: the authors' overlap rule for all tiles in parallel, giving per-tile label images (on
  the CPU each tile's few dozen windows one by one, which costs less there than the waves' tensor operations).
- :func:`resolve_overlaps_reference`: the same rule in plain per-instance code; the reference for tests.

Detections flow between these as plain tensors sorted by ``(image index, score descending)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import nms

#: A mask more than this fraction covered by higher-scored kept masks is dropped (authors' code: 70%).
MAX_COVER = 0.7


def _cover_ok(covered: torch.Tensor | int, area: torch.Tensor | int, max_cover: float) -> torch.Tensor | bool:
    """``area > 0 and covered <= max_cover * area``, exactly, in integers (max_cover as a fraction of 1000): of
    tensors (the waves) or of one detection's ints (rank by rank)."""
    k = int(round(max_cover * 1000))
    return (area > 0) & (covered * 1000 <= area * k)


def default_nms_chunk(device: torch.device) -> int:
    """Most boxes one ``nms`` call gets. CPU: the kernel's cost grows with (kept x boxes in the call), so packing
    groups only saves call overhead; keep calls small. CUDA: each call is a launch and a sync, and its IoU bit mask
    grows with boxes^2, so the total grows with (boxes x chunk): 4096 was the fastest chunk on an H200
    (``benchmarks/throughput.py --nms-sweep``; docs/speed.md)."""
    return 4096 if device.type == "cuda" else 256


def default_nms_method(device: torch.device) -> str:
    """``"matrix"`` on CUDA: torchvision's CUDA ``nms`` ends in a serial pass over the boxes of each call (one
    thread block walks the bit mask box by box), so the RPN's ~5,000 proposals per tile cost time in proportion to
    the boxes in the batch, call after call; :func:`matrix_nms` does that pass for every group at once.
    ``"sequential"`` (``torchvision.ops.nms`` calls) on the CPU, where its cost grows with kept x boxes per call,
    while the matrix form costs boxes^2 per group."""
    return "matrix" if device.type == "cuda" else "sequential"


def grouped_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    iou_threshold: float,
    max_boxes_per_call: int | None = None,
    method: str | None = None,
) -> torch.Tensor:
    """NMS within each group, never across groups.

    Returns the indices kept, sorted by ``(group ascending, score descending)``. Exactly
    ``torchvision.ops.batched_nms`` per group (the sequential method breaks score ties by index, lower first, where
    torchvision's order among equal scores is unspecified), by ``method`` (default :func:`default_nms_method`):

    - ``"sequential"``: groups are split into chunks of at most ``max_boxes_per_call`` boxes (a larger group makes
      its own chunk); inside a chunk each group's boxes are shifted to their own cell of a 2-D grid (so shifts stay
      small and IoUs stay precise in float32) and one ``nms`` runs on the whole chunk.
    - ``"matrix"``: :func:`matrix_nms` (groups too large for its matrices go the sequential way).
    """
    device = boxes.device
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    method = method or default_nms_method(device)
    if method == "matrix":
        return matrix_nms(boxes, scores, groups, iou_threshold, max_boxes_per_call=max_boxes_per_call)
    if method != "sequential":
        raise ValueError(f"nms method must be 'matrix' or 'sequential', got {method!r}")
    if max_boxes_per_call is None:
        max_boxes_per_call = default_nms_chunk(device)
    boxes = boxes.float()
    order = torch.argsort(groups, stable=True)
    g_sorted = groups[order]
    uniq, counts = torch.unique_consecutive(g_sorted, return_counts=True)
    counts_l = counts.tolist()
    # chunk boundaries over whole groups
    chunks: list[tuple[int, int, int, int]] = []  # (box start, box end, group start, group end)
    b0 = g0 = 0
    size = 0
    for gi, c in enumerate(counts_l):
        if size > 0 and size + c > max_boxes_per_call:
            chunks.append((b0, b0 + size, g0, gi))
            b0, g0, size = b0 + size, gi, 0
        size += c
    chunks.append((b0, b0 + size, g0, len(counts_l)))
    # local group number of each sorted box
    local = torch.repeat_interleave(torch.arange(len(counts_l), device=device), counts)
    lo = boxes.min()
    span = boxes.max() - lo + 1.0
    # nms sorts its scores unstably: give it each box's rank (score descending, ties by index) so that equal
    # scores are ordered the same whatever else shares the call (exact in float32 up to 2^24 boxes)
    rank = torch.empty(n, dtype=torch.float32, device=device)
    rank[torch.argsort(scores, descending=True, stable=True)] = -torch.arange(n, dtype=torch.float32, device=device)
    # every box's cell of its chunk's grid, for all chunks at once (the same arithmetic, box by box, as chunk by chunk)
    first = torch.tensor([gs for _, _, gs, _ in chunks], device=device)
    side = torch.tensor([max(1, math.ceil(math.sqrt(ge - gs))) for _, _, gs, ge in chunks], device=device)
    chunk_of = torch.repeat_interleave(torch.arange(len(chunks), device=device),
                                       torch.tensor([e - s for s, e, _, _ in chunks], device=device))
    lg, sd = local - first[chunk_of], side[chunk_of]
    off = torch.stack([(lg % sd), (lg // sd)], 1).to(boxes.dtype) * span
    shifted = boxes[order] - lo + off.repeat(1, 2)
    ranks = rank[order]
    # each chunk's kept boxes come in score order; chunks hold whole groups in group order, so one stable sort by
    # group of them all is each chunk's sort in turn
    kept = torch.cat([nms(shifted[s:e], ranks[s:e], iou_threshold) + s for s, e, _, _ in chunks])
    kept = order[kept]
    return kept[torch.argsort(groups[kept], stable=True)]


#: most IoU-matrix entries :func:`matrix_nms` holds at once (a few float32 buffers of this size are alive)
MATRIX_NMS_ELEMENTS = 1 << 26


def _iou_over(b: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(G, P, P)`` bool: IoU of boxes ``b (G, P, 4)`` pairwise within each group ``> threshold``, with the same
    float32 arithmetic as torchvision's ``nms`` kernels (``inter / (area_a + area_b - inter) > threshold``)."""
    x0, y0, x1, y1 = b.unbind(-1)
    w = (torch.minimum(x1[:, :, None], x1[:, None, :]) - torch.maximum(x0[:, :, None], x0[:, None, :])).clamp_(min=0)
    h = (torch.minimum(y1[:, :, None], y1[:, None, :]) - torch.maximum(y0[:, :, None], y0[:, None, :])).clamp_(min=0)
    inter = w.mul_(h)
    del h
    area = (x1 - x0) * (y1 - y0)
    union = (area[:, :, None] + area[:, None, :]).sub_(inter)
    return inter.div_(union) > threshold


def matrix_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    iou_threshold: float,
    max_elements: int = MATRIX_NMS_ELEMENTS,
    max_boxes_per_call: int | None = None,
) -> torch.Tensor:
    """Exact greedy NMS within each group, all groups at once, as a fixed point of IoU matrices.

    Boxes are sorted by (group, score descending); ``S[i, j]`` is "``i`` comes before ``j`` in its group and their
    IoU exceeds the threshold". Greedy NMS keeps ``j`` iff no kept ``i`` has ``S[i, j]``: the unique solution of
    ``keep = valid & ~(S^T keep)``, which the iteration ``keep <- valid & ~(S^T keep)`` started from all boxes
    reaches exactly (after ``t`` steps the first ``t`` boxes of every group are final, and most groups settle in a
    few steps: the length of their longest suppression chain; Zheng et al. 2020, "Cluster-NMS"). So the result is
    torchvision's ``batched_nms`` (same IoU arithmetic; boxes of equal score in their input order), with each step a
    batched matrix-vector product over every group. Groups are padded to the size of the largest in their chunk
    (chunks of similar sizes, at most ``max_elements`` matrix entries); a group with more than
    ``sqrt(max_elements)`` boxes goes through ``torchvision.ops.nms`` instead (chunks of ``max_boxes_per_call``).
    Returns the kept indices sorted by ``(group ascending, score descending)``.
    """
    device = boxes.device
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    boxes = boxes.float()
    scores = scores.float()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    counts_np = counts.cpu().numpy()
    big = counts_np.astype(np.int64) ** 2 > max_elements
    kept: list[torch.Tensor] = []
    gorder = np.argsort(counts_np[~big], kind="stable")
    small = np.flatnonzero(~big)[gorder]
    sizes = counts_np[small].astype(np.int64)
    mm_dtype = torch.float16 if device.type == "cuda" else torch.float32  # 0/1 entries: exact in either
    s = 0
    while s < len(small):
        # the largest chunk of consecutive (by size) groups whose padded matrices fit in max_elements
        ng = np.arange(1, len(small) - s + 1)
        e = s + max(1, int(np.searchsorted(ng * sizes[s:] ** 2, max_elements, side="right")))
        p = int(sizes[e - 1])
        gi = torch.from_numpy(small[s:e]).to(device)
        ar = torch.arange(p, device=device)
        valid = ar[None, :] < counts[gi][:, None]  # (G, P)
        pos = (starts[gi][:, None] + ar[None, :]).clamp_(max=order.shape[0] - 1)
        idx = order[pos]  # (G, P) input index of each slot
        over = _iou_over(boxes[idx], iou_threshold)
        over &= torch.ones(p, p, dtype=torch.bool, device=device).triu_(1)
        over &= valid[:, :, None] & valid[:, None, :]
        sup = over.to(mm_dtype)
        del over
        keep = valid
        for _ in range(p):
            hit = torch.bmm(keep.to(mm_dtype)[:, None, :], sup)[:, 0, :] > 0
            new = valid & ~hit
            if torch.equal(new, keep):
                break
            keep = new
        kept.append(idx[keep])
        s = e
    if big.any():
        starts_np = starts.cpu().numpy()
        sel = torch.cat([order[int(starts_np[g]) : int(starts_np[g] + counts_np[g])] for g in np.flatnonzero(big)])
        kept.append(sel[grouped_nms(boxes[sel], scores[sel], groups[sel], iou_threshold, max_boxes_per_call,
                                    method="sequential")])
    k = torch.sort(torch.cat(kept)).values  # ties in score: input order, as in the sort above
    k = k[torch.argsort(scores[k], descending=True, stable=True)]
    return k[torch.argsort(groups[k], stable=True)]


def _rank_within(image_index: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For items sorted by image: their rank inside their image, and the count per image."""
    counts = torch.bincount(image_index, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(image_index.shape[0], device=image_index.device) - starts[image_index]
    return rank, counts


def _sort_by_image_then_score(image_index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    return order[torch.argsort(image_index[order], stable=True)]


def _clip(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    h, w = image_size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


@dataclass(frozen=True)
class NMSOptions:
    """How :func:`grouped_nms` runs (``chunk``: most boxes per ``nms`` call; ``method``: ``"matrix"`` or
    ``"sequential"``; None: the defaults). The kept boxes are the same either way."""

    chunk: int | None = None
    method: str | None = None


@dataclass(frozen=True)
class ProposalSettings:
    """The RPN's proposal filter settings, as torchvision's ``RegionProposalNetwork`` holds them in eval mode."""

    pre_nms_top_n: int
    post_nms_top_n: int
    nms_thresh: float
    score_thresh: float = 0.0
    min_size: float = 1e-3

    @classmethod
    def of(cls, rpn) -> "ProposalSettings":
        """The settings of a ``RegionProposalNetwork`` (its testing top-n when in eval mode)."""
        return cls(rpn.pre_nms_top_n(), rpn.post_nms_top_n(), rpn.nms_thresh, rpn.score_thresh, rpn.min_size)

    def scaled(self, factor: float) -> "ProposalSettings":
        """The top-n counts times ``factor``, rounded up (the same settings for ``factor`` 1): see
        :func:`cap_scale`."""
        return replace(self, pre_nms_top_n=_times(self.pre_nms_top_n, factor),
                       post_nms_top_n=_times(self.post_nms_top_n, factor))


@dataclass(frozen=True)
class DetectionSettings:
    """The RoI head's detection settings, as torchvision's ``RoIHeads`` holds them."""

    box_coder: object
    score_thresh: float
    nms_thresh: float
    detections_per_img: int

    @classmethod
    def of(cls, roi) -> "DetectionSettings":
        """The settings of a ``RoIHeads``."""
        return cls(roi.box_coder, roi.score_thresh, roi.nms_thresh, roi.detections_per_img)

    def scaled(self, factor: float) -> "DetectionSettings":
        """``detections_per_img`` times ``factor``, rounded up (the same settings for ``factor`` 1): see
        :func:`cap_scale`."""
        return replace(self, detections_per_img=_times(self.detections_per_img, factor))


def cap_scale(tile: tuple[int, int], own_tile: int) -> float:
    """How many times its model's own per-image counts (the RPN's top-n before and after NMS, the detections kept)
    a tile of ``tile`` pixels (height, width, at the model's resolution) gets: its area over that of the model's own
    tile (``own_tile`` square, the size those counts were chosen at), at least 1. The counts bound how many nuclei
    one tile can hold; fixed, a tile of twice the side would keep at most as many nuclei as one of the model's own
    (measured: docs/precision.md), so they grow with the tile's area and a tile holds as many per unit of area as the
    model's own. A tile no larger than the model's own keeps the model's counts."""
    return max(1.0, tile[0] * tile[1] / float(own_tile) ** 2)


def _times(count: int, factor: float) -> int:
    return int(math.ceil(count * factor))


#: on the CPU :class:`EncodedBoxes` decodes its rows in multiples of this many (padded), so that every ``exp`` of
#: the box coder runs through torch's vectorised kernel, as in a decode of all anchors of a batch; torch computes a
#: tail shorter than two vectors with the scalar ``exp``, which may differ from it by one unit in the last place,
#: and a tile's proposals would then depend on how many tiles share its batch (a GPU computes every element alike)
DECODE_ROWS = 64


@dataclass(frozen=True)
class EncodedBoxes:
    """Region proposals not yet decoded: ``deltas`` ``(B, A, 4)`` (the RPN's regression), ``anchors`` ``(A, 4)`` (the
    same for every image) and the RPN's ``box_coder``. :func:`select_proposals` decodes only the boxes it keeps
    from each level's top-n, about a sixth of the anchors of a 256 px tile: the box coder's arithmetic is per box,
    so these are the boxes a decode of every anchor gives (tested)."""

    deltas: torch.Tensor
    anchors: torch.Tensor
    box_coder: object

    def take(self, batch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The decoded boxes ``(B, k, 4)`` float32 of the anchors ``index`` ``(B, k)`` of each image (``batch``:
        ``(B, 1)`` image indices)."""
        d = self.deltas[batch, index].reshape(-1, 4).float()
        a = self.anchors[index].reshape(-1, 4).float()
        n = d.shape[0]
        pad = -n % DECODE_ROWS
        if pad and d.device.type == "cpu":
            d, a = F.pad(d, (0, 0, 0, pad)), F.pad(a, (0, 0, 0, pad))
        return self.box_coder.decode_single(d, a)[:n].view(*index.shape, 4)


def select_proposals(
    objectness: torch.Tensor,
    proposals: torch.Tensor | EncodedBoxes,
    num_anchors_per_level: list[int],
    image_size: tuple[int, int],
    settings: ProposalSettings,
    nms_options: NMSOptions = NMSOptions(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RPN's ``filter_proposals`` for a batch: ``objectness (B, A)`` logits, ``proposals (B, A, 4)`` decoded (or
    :class:`EncodedBoxes`, decoded here where kept).

    Returns ``(boxes (P, 4) float32, image_index (P,) int64)`` sorted by (image, objectness descending), at most
    ``settings.post_nms_top_n`` per image: the same boxes as torchvision's ``RegionProposalNetwork.filter_proposals``.
    """
    pre_nms_top_n, post_nms_top_n = settings.pre_nms_top_n, settings.post_nms_top_n
    num_images = objectness.shape[0]
    device = objectness.device
    objectness = objectness.float()
    top_idx, lvls = [], []
    offset = 0
    for lvl, ob in enumerate(objectness.split(num_anchors_per_level, 1)):
        k = min(pre_nms_top_n, ob.shape[1])
        _, idx = ob.topk(k, dim=1)
        top_idx.append(idx + offset)
        lvls.append(torch.full((k,), lvl, dtype=torch.int64, device=device))
        offset += ob.shape[1]
    top_idx = torch.cat(top_idx, 1)
    levels = torch.cat(lvls).expand(num_images, -1)
    batch = torch.arange(num_images, device=device)[:, None]
    prob = torch.sigmoid(objectness[batch, top_idx]).reshape(-1)
    top = proposals.take(batch, top_idx) if isinstance(proposals, EncodedBoxes) else proposals[batch, top_idx].float()
    boxes = _clip(top, image_size).reshape(-1, 4)
    image = batch.expand_as(top_idx).reshape(-1)
    groups = image * len(num_anchors_per_level) + levels.reshape(-1)
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ok = (ws >= settings.min_size) & (hs >= settings.min_size) & (prob >= settings.score_thresh)
    keep = _leading_nms(boxes, prob, groups, image, ok, num_images, post_nms_top_n, settings.nms_thresh,
                        nms_options.chunk, nms_options.method)
    keep = keep[_sort_by_image_then_score(image[keep], prob[keep])]
    rank, _ = _rank_within(image[keep], num_images)
    keep = keep[rank < post_nms_top_n]
    return boxes[keep], image[keep]


#: :func:`_leading_nms` first runs NMS on each image's ``LEADING_FACTOR x post_nms_top_n`` best-scored proposals
LEADING_FACTOR = 4


def _leading_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, image: torch.Tensor,
                 ok: torch.Tensor, num_images: int, top_n: int, iou_threshold: float, nms_chunk: int | None,
                 nms_method: str | None) -> torch.Tensor:
    """Indices of the boxes (``ok`` ones only) that survive NMS within their group, of which the caller keeps each
    image's ``top_n`` best: those are exactly the ``top_n`` best survivors of NMS over all ``ok`` boxes.

    Whether a box survives depends only on the boxes of its group scored above it. So NMS over a *leading* set,
    each image's boxes scored at least its ``LEADING_FACTOR x top_n``-th best score (ties at that score all in),
    finds exactly the survivors among them, and when an image has ``top_n`` of them, its ``top_n`` best survivors
    overall are among them: every box left out scores lower. An image with fewer is redone over all its boxes. The
    RPN's 1,000 proposals per level make about 3,000 per 256 px tile, of which the best 300 survivors come from
    the best 530-700 (bundled model, Kumar tiles): on the CPU, where ``nms`` costs (kept x boxes), this is several
    times less work."""
    def survivors(sel: torch.Tensor) -> torch.Tensor:  # the indices, of the boxes where sel, that NMS keeps
        idx = torch.where(sel)[0]
        return idx[grouped_nms(boxes[idx], scores[idx], groups[idx], iou_threshold, nms_chunk, nms_method)]

    k = LEADING_FACTOR * top_n
    per_image = scores.shape[0] // max(num_images, 1)
    if per_image <= k or scores.shape[0] != per_image * num_images:
        return survivors(ok)
    ranked = torch.where(ok, scores, torch.full_like(scores, -1.0)).view(num_images, per_image)
    cut = ranked.topk(k, dim=1).values[:, -1]  # each image's k-th best score (-1: fewer than k ok boxes)
    keep = survivors(ok & (scores >= cut[image]))
    short = (torch.bincount(image[keep], minlength=num_images) < top_n) & (cut >= 0)
    if bool(short.any()):  # rare: redo those images over all their boxes
        keep = torch.cat([keep[~short[image[keep]]], survivors(ok & short[image])])
    return keep


@dataclass
class Detections:
    """Detections of a batch, sorted by (image, score descending). ``boxes`` are in model-input pixel coordinates."""

    boxes: torch.Tensor  # (N, 4) float32
    scores: torch.Tensor  # (N,) float32
    labels: torch.Tensor  # (N,) int64, 1..C-1
    image_index: torch.Tensor  # (N,) int64

    def counts(self, num_images: int) -> torch.Tensor:
        return torch.bincount(self.image_index, minlength=num_images)


def select_detections(
    class_logits: torch.Tensor,
    box_regression: torch.Tensor,
    proposals: tuple[torch.Tensor, torch.Tensor],
    num_images: int,
    image_size: tuple[int, int],
    settings: DetectionSettings,
    nms_options: NMSOptions = NMSOptions(),
    decoded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Detections:
    """The RoI head's ``postprocess_detections`` for a whole batch at once; ``proposals``: ``(boxes (P, 4),
    image_index (P,))`` as :func:`select_proposals` gives them.

    Same result as torchvision's per-image loop: decode with ``settings.box_coder``, softmax, clip to the image, drop
    the background class, keep ``score > score_thresh`` and boxes wider and taller than 0.01, NMS per (image, class),
    then the ``detections_per_img`` best per image. ``decoded``: the ``(boxes (N, C, 4), probabilities (N, C))`` of
    :func:`decode_detections` (e.g. averaged over test-time augmentations) instead of the logits and regression.
    """
    proposals, proposal_image = proposals
    if decoded is None:
        decoded = decode_detections(class_logits, box_regression, proposals, image_size, settings.box_coder)
    boxes, scores = decoded
    device = boxes.device
    num_classes = scores.shape[-1]
    num_props = scores.shape[0]
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = torch.arange(1, num_classes, device=device).repeat(num_props)
    image = proposal_image.repeat_interleave(num_classes - 1)
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cand = torch.where((scores > settings.score_thresh) & (ws >= 1e-2) & (hs >= 1e-2))[0]
    groups = image[cand] * (num_classes - 1) + labels[cand] - 1
    keep = cand[grouped_nms(boxes[cand], scores[cand], groups, settings.nms_thresh, nms_options.chunk,
                            nms_options.method)]
    keep = keep[_sort_by_image_then_score(image[keep], scores[keep])]
    rank, _ = _rank_within(image[keep], num_images)
    keep = keep[rank < settings.detections_per_img]
    return Detections(boxes[keep], scores[keep], labels[keep], image[keep])


def decode_detections(class_logits: torch.Tensor, box_regression: torch.Tensor, proposals: torch.Tensor,
                      image_size: tuple[int, int], box_coder) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class boxes ``(N, C, 4)`` decoded from the proposals and clipped to the image, and class probabilities
    ``(N, C)`` (softmax), in float32."""
    boxes = box_coder.decode(box_regression.float(), [proposals.float()])
    return _clip(boxes, image_size), F.softmax(class_logits.float(), -1)


def flip_boxes(boxes: torch.Tensor, flip: tuple[bool, bool], image_size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``(..., 4)`` (x0, y0, x1, y1) of an ``image_size`` (h, w) image mirrored left-right (``flip[0]``) and/or
    top-bottom (``flip[1]``): pixel ``i`` of ``w`` covers ``[i, i+1)`` and goes to ``w - 1 - i``, so ``x -> w - x``.
    Its own inverse."""
    h, w = image_size
    out = boxes.clone()
    if flip[0]:
        out[..., 0], out[..., 2] = w - boxes[..., 2], w - boxes[..., 0]
    if flip[1]:
        out[..., 1], out[..., 3] = h - boxes[..., 3], h - boxes[..., 1]
    return out


#: a test-time view of a tile: (transposed, mirrored left-right, mirrored top-bottom), applied in that order
View = tuple[bool, bool, bool]


def tta_views(n: int, square: bool = True) -> list[View]:
    """The first view is the tile itself; ``n`` = 4: and its three mirror images; 8: and the transposed four too
    (the eight symmetries of a square; only for square tiles, else the four mirror images)."""
    if n not in (1, 4, 8):
        raise ValueError(f"test-time augmentation takes 1, 4 or 8 views, got {n}")
    flips = [(False, False), (True, False), (False, True), (True, True)][: 1 if n == 1 else 4]
    return [(t, fx, fy) for t in ((False, True) if n == 8 and square else (False,)) for fx, fy in flips]


def _mirror(x: torch.Tensor, v: View) -> torch.Tensor:
    """``x (..., H, W)`` mirrored as view ``v`` says (left-right, top-bottom; not transposed)."""
    dims = [d for d, on in ((-1, v[1]), (-2, v[2])) if on]
    return x.flip(dims) if dims else x


def view_images(x: torch.Tensor, v: View) -> torch.Tensor:
    """Images ``(..., H, W)`` seen under view ``v``."""
    return _mirror(x.transpose(-1, -2) if v[0] else x, v)


def view_boxes(boxes: torch.Tensor, v: View, image_size: tuple[int, int], inverse: bool = False) -> torch.Tensor:
    """Boxes ``(..., 4)`` of an ``image_size`` image mapped into view ``v`` (or back from it, ``inverse``)."""
    swap = [1, 0, 3, 2]
    size = image_size[::-1] if v[0] else image_size  # the viewed image's size
    if not inverse:
        b = boxes[..., swap] if v[0] else boxes
        return flip_boxes(b, v[1:], size) if any(v[1:]) else b
    b = flip_boxes(boxes, v[1:], size) if any(v[1:]) else boxes
    return b[..., swap] if v[0] else b


def unview_masks(m: torch.Tensor, v: View) -> torch.Tensor:
    """Masks ``(..., M, M)`` predicted on boxes in view ``v``, mapped back onto the boxes in the image."""
    m = _mirror(m, v)
    return m.transpose(-1, -2) if v[0] else m


#: Where torchvision's Mask R-CNN learns each mask, relative to its box, in pixels right and down. The mask targets are
#: ``roi_align(gt_masks, boxes, M, aligned=False)`` (``roi_heads.project_masks_on_boxes``), which samples mask bin
#: ``j`` at pixel-centre coordinate ``x1 + (j + 0.5) w / M`` (pixel ``i``'s centre at ``i``), while boxes are in
#: pixel-edge coordinates (pixel ``i`` spans ``[i, i + 1)``), the frame masks are pasted in. So a mask is learnt for
#: its box moved half a pixel right and down; pasted at the box itself (as torchvision does), it lands half a pixel up
#: and left of where it was learnt, in every prediction and in every pseudo-label made from one. Not exactly 0.5:
#: there, each object's first column and row fall where the mask's zero padding meets its first bin, exactly on the
#: 0.5 threshold, and are lost. Real labels round-tripped through the targets and :func:`paste_masks` come back with
#: IoU 0.999 at 0.4 (0.997 at 0.45, 0.966 at 0.5, 0.932 at 0), on Kumar development images: ``tests/segmenters/test_predictor.py``
#: keeps that.
MASK_FRAME_SHIFT = 0.4


def mask_frame_offset(views: Sequence[View]) -> tuple[float, float]:
    """``(x, y)``: where to paste, relative to their boxes, masks averaged over the TTA ``views``
    (:func:`tta_views`). Each view learns its masks :data:`MASK_FRAME_SHIFT` right and down in its own frame,
    which is left (up) in the image's along an axis the view mirrors; the mean over the views (the shift itself for
    the tile alone, 0 for 4 or 8 views, which mirror each axis in half of them)."""
    sx = sy = 0.0
    for t, fx, fy in views:
        mx, my = (fy, fx) if t else (fx, fy)  # the view's mirrors, as axes of the image
        sx += -MASK_FRAME_SHIFT if mx else MASK_FRAME_SHIFT
        sy += -MASK_FRAME_SHIFT if my else MASK_FRAME_SHIFT
    return sx / len(views), sy / len(views)


def stock_predict(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """torchvision's ``GeneralizedRCNN`` eval forward (its transform, RPN, RoI heads and box post-processing), each
    mask pasted by :func:`paste_masks_reference` where it was learnt (:data:`MASK_FRAME_SHIFT`): ``masks`` ``(N, 1,
    H, W)`` probabilities as torchvision returns them; the boxes are the model's own."""
    from torchvision.models.detection.transform import resize_boxes

    sizes = [tuple(im.shape[-2:]) for im in images]
    batch, _ = model.transform(images)
    feats = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, feats)
    dets, _ = model.roi_heads(feats, proposals, batch.image_sizes)
    for d, s, o in zip(dets, batch.image_sizes, sizes):
        at = resize_boxes(d["boxes"] + MASK_FRAME_SHIFT, s, o)
        d["masks"] = paste_masks_reference(d["masks"][:, 0], at, o)[:, None]
        d["boxes"] = resize_boxes(d["boxes"], s, o)
    return dets


def _sample_weights(b0: torch.Tensor, size: torch.Tensor, origin: torch.Tensor, k: int, limit: int, m: int,
                    padding: int) -> torch.Tensor:
    """Bilinear weights ``(N, k, M + 2 padding)`` along one axis: window pixel ``x = origin + j`` (centre at
    ``x + 0.5``) of a box starting at ``b0`` of extent ``size`` samples the padded mask at ``(x + 0.5 - b0) M / size -
    0.5 + padding`` (bin ``i``'s centre at ``i``); weights outside the padded mask or the tile (``0..limit-1``) are
    zero, so the sampling is ``F.grid_sample``'s with zero padding."""
    mp = m + 2 * padding
    x = origin[:, None] + torch.arange(k, device=b0.device)[None, :]  # (N, k) tile coordinate
    u = (x.to(torch.float32) + 0.5 - b0[:, None]) * (m / size[:, None]) - 0.5 + padding
    i0 = torch.floor(u)
    l1 = u - i0
    i0 = i0.to(torch.int64)
    w = torch.zeros(b0.shape[0], k, mp, device=b0.device, dtype=torch.float32)
    for idx, wt in ((i0, 1.0 - l1), (i0 + 1, l1)):
        ok = ((idx >= 0) & (idx < mp) & (x < limit)).to(torch.float32)
        w.scatter_add_(2, idx.clamp(0, mp - 1)[..., None], (wt * ok)[..., None])
    return w


def _paste_extents(boxes: torch.Tensor, m: int, padding: int, image_size: tuple[int, int]):
    """Per box: its start and extent (x, y; at least 1e-3) and the window ``(origin x, origin y, extent x, extent
    y)`` of tile pixels whose centres sample the padded mask (the ones that can be foreground), clipped to the tile."""
    h, w = image_size
    b = boxes.float()
    sw = (b[:, 2] - b[:, 0]).clamp(min=1e-3)
    sh = (b[:, 3] - b[:, 1]).clamp(min=1e-3)
    rx, ry = (padding + 0.5) * sw / m + 0.5, (padding + 0.5) * sh / m + 0.5
    ox = torch.floor(b[:, 0] - rx).clamp(0, w - 1).to(torch.int64)
    oy = torch.floor(b[:, 1] - ry).clamp(0, h - 1).to(torch.int64)
    ex = (torch.ceil(b[:, 2] + rx).clamp(max=w - 1).to(torch.int64) - ox + 1).clamp(min=1)
    ey = (torch.ceil(b[:, 3] + ry).clamp(max=h - 1).to(torch.int64) - oy + 1).clamp(min=1)
    return b, sw, sh, ox, oy, ex, ey


#: most detections :func:`paste_masks` computes at once on the CPU (sorted by extent, so each chunk's window is as
#: small as its largest mask); elsewhere (a GPU) only ``max_elements`` splits them, since each chunk costs launches
_PASTE_CHUNK = 64


def _paste_limit(device: torch.device) -> int | None:
    """Most detections of one chunk of :func:`paste_masks` on ``device`` (None: only ``max_elements`` splits)."""
    return _PASTE_CHUNK if device.type == "cpu" else None


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    padding: int = 1,
    max_elements: int = 1 << 25,
    fuse: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``mask_probs (N, M, M)`` (probabilities) into boxes ``(N, 4)`` of an image of ``image_size``, binarised.

    Each pixel centre is sampled bilinearly at the mask coordinate it has in its box (bin ``j`` of ``M`` spans
    ``[x1 + j w / M, x1 + (j + 1) w / M)``; the mask zero-padded by ``padding`` bins), so a mask comes back at its
    box's position and size (torchvision's ``paste_masks_in_image`` stretches it over an integer window about a
    pixel wider than the box: masks about 5% larger in area). Boxes are in the frame the masks were learnt in (the
    predictor adds :data:`MASK_FRAME_SHIFT`).

    Returns ``(windows (N, K, K) bool, origins (N, 2) int64 as (y, x))``: pixel ``(i, j)`` of window ``n`` is tile
    pixel ``(origins[n, 0] + i, origins[n, 1] + j)``; window pixels outside the tile or beyond the detection's own
    extent are False. ``K`` is the largest pasted extent in the batch (at most ``max(H, W)``); each detection's
    mask lies in ``windows[n, :e, :e]`` with ``e`` its own extent, and is computed at that size (chunks of similar
    extent), so the work grows with the sum of squared extents. Guarantee: ``paste_masks_reference(...) >
    threshold`` on the window, up to float rounding of values on the threshold. Done in chunks of detections so that
    no float buffer exceeds ``max_elements`` (on the CPU also of at most :data:`_PASTE_CHUNK`); a detection's mask
    does not depend on the chunk it is computed in (tested). ``fuse``: ``(sem (B, H, W), image_index (N,))``: on
    each detection's own pixels (its extent), the probability thresholded is the mean of the pasted mask's and
    ``sem[image_index[n]]``'s (e.g. a semantic foreground probability); with ``sem`` = 0.5 everywhere the masks are
    those without it.
    """
    device = mask_probs.device
    n, m = mask_probs.shape[0], mask_probs.shape[-1]
    h, w = image_size
    if n == 0:
        return torch.zeros(0, 1, 1, dtype=torch.bool, device=device), torch.zeros(0, 2, dtype=torch.int64, device=device)
    b, sw, sh, ox, oy, ext_x, ext_y = _paste_extents(boxes, m, padding, image_size)
    ext = torch.maximum(ext_x, ext_y)
    max_count = _paste_limit(device)
    # by extent, so that each chunk is computed at its own (small) window size: cost ~ sum of extent^2, not N K^2
    order = torch.argsort(ext)
    ext_sorted = ext[order].cpu().numpy()
    k = int(ext_sorted[-1])
    padded = F.pad(mask_probs.float().reshape(n, m, m), (padding,) * 4)
    out = torch.zeros(n, k, k, dtype=torch.bool, device=device)
    s = 0
    while s < n:
        sizes = np.arange(1, n - s + 1)
        costs = sizes * ext_sorted[s:].astype(np.int64) ** 2
        e = s + max(1, int(np.searchsorted(costs, max_elements, side="right")))
        if max_count is not None:
            e = min(e, s + max_count)
        kc = int(ext_sorted[e - 1])
        idx = order[s:e]
        wx = _sample_weights(b[idx, 0], sw[idx], ox[idx], kc, w, m, padding)  # (n, kc, Mp)
        wy = _sample_weights(b[idx, 1], sh[idx], oy[idx], kc, h, m, padding)
        prob = torch.bmm(wy, torch.bmm(padded[idx], wx.transpose(1, 2)))  # along x first, then y
        ar = torch.arange(kc, device=device)
        inside = (ar < ext_y[idx, None])[:, :, None] & (ar < ext_x[idx, None])[:, None, :]
        if fuse is not None:  # the mean with the semantic foreground probability, on the detection's own pixels
            sem, img = fuse
            yy = (oy[idx, None] + ar).clamp(max=h - 1)
            xx = (ox[idx, None] + ar).clamp(max=w - 1)
            s_win = sem[img[idx, None, None], yy[:, :, None], xx[:, None, :]]
            prob = torch.where(inside, 0.5 * (prob + s_win), prob)
        out[idx, :kc, :kc] = (prob > threshold) & inside
        s = e
    return out, torch.stack((oy, ox), 1)


def paste_masks_reference(mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                          padding: int = 1) -> torch.Tensor:
    """The sampling of :func:`paste_masks` in plain per-instance code: ``(N, H, W)`` probabilities, each mask
    resampled by ``F.grid_sample`` (bilinear, zero padding) over the pixels that can sample it (its window, as
    :func:`paste_masks` finds it; zero elsewhere). The reference for tests and the predictor's simple path."""
    h, w = image_size
    n, m = mask_probs.shape[0], mask_probs.shape[-1]
    out = torch.zeros(n, h, w, dtype=torch.float32, device=mask_probs.device)
    padded = F.pad(mask_probs.float().reshape(n, 1, m, m), (padding,) * 4)
    mp = m + 2 * padding
    b, sw, sh, ox, oy, ex, ey = (t.tolist() for t in _paste_extents(boxes, m, padding, image_size))
    for i, ((x1, y1, _, _), sx, sy) in enumerate(zip(b, sw, sh)):
        xs = torch.arange(ox[i], ox[i] + ex[i], device=out.device)
        ys = torch.arange(oy[i], oy[i] + ey[i], device=out.device)
        u = (xs + 0.5 - x1) * (m / sx) - 0.5 + padding
        v = (ys + 0.5 - y1) * (m / sy) - 0.5 + padding
        gy, gx = torch.meshgrid((v + 0.5) / mp * 2 - 1, (u + 0.5) / mp * 2 - 1, indexing="ij")
        out[i, oy[i]:oy[i] + ey[i], ox[i]:ox[i] + ex[i]] = F.grid_sample(
            padded[i:i + 1], torch.stack((gx, gy), -1)[None], mode="bilinear", padding_mode="zeros",
            align_corners=False)[0, 0]
    return out


#: most detections :func:`resolve_overlaps` settles in one step of a wave on the CPU (sorted by extent, so each
#: step's window is as small as its largest mask, and a step's gathers stay in cache)
_WAVE_CHUNK = 64
#: most window pixels of one step elsewhere (a GPU): a wave in as few steps as fit 8M pixels (64 MB of indices),
#: since each step costs a dozen kernel launches (steps of 64 made R101's post-processing 0.4 -> 1.0 ms/tile on an
#: H200: about 200 steps for the 12,800 detections of a batch of 128 tiles)
_WAVE_PIXELS = 1 << 23


def _wave_limits(device: torch.device) -> tuple[int | None, int | None]:
    """``(most detections, most window pixels)`` of one step of :func:`resolve_overlaps` on ``device``."""
    return (_WAVE_CHUNK, None) if device.type == "cpu" else (None, _WAVE_PIXELS)


def _wave_steps(per_wave: list[int], ext_sorted: list[int], max_count: int | None,
                max_pixels: int | None) -> list[tuple[int, int, int]]:
    """Steps ``(start, end, window size)`` over detections sorted by (wave, extent): each step within one wave, of
    at most ``max_count`` detections and ``max_pixels`` window pixels (at least one detection), its window the
    largest extent among its detections (at least 1)."""
    steps, s = [], 0
    for count in per_wave:
        end = s + count
        c = s
        while c < end:
            n = end - c if max_count is None else min(max_count, end - c)
            if max_pixels is not None:  # extents ascend: the window of [c, c + m) is that of its last detection
                while n > 1 and n * max(1, ext_sorted[c + n - 1]) ** 2 > max_pixels:
                    n = max(1, max_pixels // max(1, ext_sorted[c + n - 1]) ** 2)  # < n: it ends
            steps.append((c, c + n, max(1, ext_sorted[c + n - 1])))
            c += n
        s = end
    return steps


def default_overlap_method(device: torch.device) -> str:
    """:func:`resolve_overlaps`' method on ``device`` when none is given: ``"ranks"`` on the CPU, ``"waves"``
    elsewhere."""
    return "ranks" if device.type == "cpu" else "waves"


def resolve_overlaps(
    windows: torch.Tensor,
    origins: torch.Tensor,
    image_index: torch.Tensor,
    num_images: int,
    image_size: tuple[int, int],
    max_cover: float = MAX_COVER,
    method: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' overlap rule for all tiles at once; detections must be sorted by (image, score descending).

    In score order within each tile, a mask of area 0 or more than ``max_cover`` covered by the pixels already
    claimed by better kept masks is dropped; otherwise it keeps only its unclaimed pixels. Returns
    ``(labels (B, H, W) int32, keep (N,) bool)``: ``labels`` 0 = background, the k-th kept detection of a tile (in
    score order) is ``k``, so labels are contiguous ``1..n`` and every pixel belongs to at most one instance.

    ``method`` (default :func:`default_overlap_method`): ``"waves"`` (:func:`_resolve_in_waves`, off the CPU: a few
    tensor operations a wave of masks that do not touch), or ``"ranks"`` (:func:`_resolve_by_rank`, on the CPU: the
    rule itself, detection by detection in each one's window of its tile, where a loop over a tile's few dozen
    windows costs less than the waves' tensor operations: measured in docs/speed.md). The same result either way,
    the plain reference's (tested).
    """
    method = method or default_overlap_method(windows.device)
    if method == "ranks":
        return _resolve_by_rank(windows, origins, image_index, num_images, image_size, max_cover)
    if method != "waves":
        raise ValueError(f"unknown overlap method {method!r} (ranks or waves)")
    return _resolve_in_waves(windows, origins, image_index, num_images, image_size, max_cover)


def _resolve_in_waves(windows: torch.Tensor, origins: torch.Tensor, image_index: torch.Tensor, num_images: int,
                      image_size: tuple[int, int], max_cover: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resolve_overlaps` (``method="waves"``). A mask's fate depends only on the better masks whose
    footprints (the rectangle of its window that holds its pixels) overlap its own. So each detection gets a *wave*:
    0 when no better mask of its tile overlaps it, else one more than the latest wave among those that do. The masks
    of one wave never share a pixel with each other (two of the same tile that overlapped would be in different
    waves), and every mask that can claim a pixel before them is in an earlier wave: each wave is settled at once, a
    few tensor operations over all tiles, and the waves (the longest chain of overlapping masks, a handful for
    nuclei) replace the loop over score ranks (the most detections of a tile)."""
    device = windows.device
    h, w = image_size
    n = image_index.shape[0]
    k = windows.shape[-1]
    canvas = torch.zeros(num_images, h + k, w + k, dtype=torch.int32, device=device)
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    if n == 0:
        return canvas[:, :h, :w].contiguous(), keep
    rank, counts = _rank_within(image_index, num_images)
    max_rank = int(counts.max().item())
    row_px = windows.sum(2, dtype=torch.int32)  # (a sum: any() is 8x slower here)
    area = row_px.sum(1, dtype=torch.int64)
    # footprint: from the origin to the last row / column holding a pixel (empty masks: none)
    ar_k = torch.arange(1, k + 1, device=device, dtype=torch.int32)
    ext_y = ((row_px > 0) * ar_k).amax(1).long()
    ext_x = ((windows.sum(1, dtype=torch.int32) > 0) * ar_k).amax(1).long()
    y0, x0 = origins[:, 0], origins[:, 1]
    foot = torch.stack([y0, y0 + ext_y, x0, x0 + ext_x], 1)
    # per tile, by rank (padding rows: empty footprints): does the better mask j overlap mask i?
    table = torch.full((num_images, max_rank), n, dtype=torch.int64, device=device)
    table[image_index, rank] = torch.arange(n, device=device)
    fp = torch.cat([foot, foot.new_zeros(1, 4)])[table]  # (B, R, 4)
    a, b = fp[:, :, None, :], fp[:, None, :, :]
    better = torch.ones(max_rank, max_rank, dtype=torch.bool, device=device).tril(-1)  # [i, j]: j < i
    over = better & (a[..., 0] < b[..., 1]) & (b[..., 0] < a[..., 1]) & (a[..., 2] < b[..., 3]) & (b[..., 2] < a[..., 3])
    wave = torch.zeros(num_images, max_rank, dtype=torch.int64, device=device)
    for _ in range(max_rank):  # fixed point: as many passes as the longest chain of overlapping masks
        nxt = torch.where(over, wave[:, None, :] + 1, 0).amax(2)
        if torch.equal(nxt, wave):
            break
        wave = nxt
    ext = torch.maximum(ext_y, ext_x)
    # settled wave by wave; inside a wave by extent, in chunks each computed at its own window size
    det_wave = wave[image_index, rank]
    order = torch.argsort(det_wave * (k + 1) + ext, stable=True)
    chunks = _wave_steps(torch.bincount(det_wave).tolist(), ext[order].tolist(), *_wave_limits(device))
    hp, wp = h + k, w + k
    flat = canvas.view(-1)
    ar = torch.arange(k, device=device)
    offs = ar[:, None] * wp + ar[None, :]  # (K, K) flat offsets of a window
    start = torch.arange(num_images, device=device) * (hp * wp)
    for c, e, kr in chunks:  # canvas pixels hold the claiming detection's index + 1
        d = order[c:e]
        win = windows[:, :kr, :kr].index_select(0, d)
        lin = ((start[image_index[d]] + y0[d] * wp + x0[d])[:, None, None] + offs[:kr, :kr]).view(-1)
        claimed = flat.index_select(0, lin).view_as(win) > 0
        ok = _cover_ok((win & claimed).sum((1, 2), dtype=torch.int64), area[d], max_cover)
        new = win & ~claimed & ok[:, None, None]
        # a mask's new pixels are unclaimed (0) and no other mask of the step has them: a max writes exactly those
        # (windows of one step may overlap outside their masks, where plain writes could undo each other's)
        flat.scatter_reduce_(0, lin, torch.where(new, (d.to(torch.int32) + 1)[:, None, None], 0).view(-1), "amax")
        keep[d] = ok
    # the k-th kept detection of its tile (score order) is label k
    kept = torch.cumsum(keep, 0, dtype=torch.int32)
    before = torch.cat([kept.new_zeros(1), kept])[torch.cumsum(counts, 0) - counts]  # kept before each tile
    lut = torch.cat([kept.new_zeros(1), torch.where(keep, kept - before[image_index], 0)])
    labels = canvas[:, :h, :w].reshape(-1).long()
    return lut.index_select(0, labels).view(num_images, h, w), keep


def _resolve_by_rank(windows: torch.Tensor, origins: torch.Tensor, image_index: torch.Tensor, num_images: int,
                     image_size: tuple[int, int], max_cover: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resolve_overlaps` (``method="ranks"``) on CPU tensors: each detection, in order, compared with and
    written into the part of its tile's label image under its window's footprint (the rectangle holding its
    pixels), as :func:`resolve_overlaps_reference` does on whole tiles."""
    h, w = image_size
    n = image_index.shape[0]
    labels = np.zeros((num_images, h, w), np.int32)
    keep = np.zeros(n, bool)
    if n == 0:
        return torch.from_numpy(labels), torch.from_numpy(keep)
    win = windows.numpy()
    rows, cols = win.any(2), win.any(1)
    area = np.count_nonzero(win.reshape(n, -1), axis=1).tolist()
    k = win.shape[-1]
    # footprint: from the origin to the last row / column holding a pixel
    ext_y = np.where(rows.any(1), k - np.argmax(rows[:, ::-1], 1), 0).tolist()
    ext_x = np.where(cols.any(1), k - np.argmax(cols[:, ::-1], 1), 0).tolist()
    count = [0] * num_images
    for d, (i, (y0, x0)) in enumerate(zip(image_index.tolist(), origins.tolist())):
        a = area[d]
        sub = labels[i, y0:y0 + ext_y[d], x0:x0 + ext_x[d]]  # (a view, cut where the window reaches past the tile,
        m = win[d, :sub.shape[0], :sub.shape[1]]            # where paste_masks leaves no pixel; any there count free)
        new = m & (sub == 0)
        inside = a if m.shape == (ext_y[d], ext_x[d]) else int(np.count_nonzero(m))
        if not _cover_ok(inside - int(np.count_nonzero(new)), a, max_cover):  # (empty, or too much already claimed)
            continue
        keep[d] = True
        count[i] += 1
        sub[new] = count[i]
    return torch.from_numpy(labels), torch.from_numpy(keep)


def resolve_overlaps_reference(
    masks: np.ndarray, scores: np.ndarray, max_cover: float = MAX_COVER
) -> tuple[np.ndarray, np.ndarray]:
    """Plain per-instance version of the overlap rule (the reference): ``masks (n, H, W)`` bool in score order.

    Returns ``(labels (H, W) int32, kept scores float32)``.
    """
    masks = np.asarray(masks, bool)
    scores = np.asarray(scores, np.float32)
    labels = np.zeros(masks.shape[1:], np.int32)
    kept = []
    k = int(round(max_cover * 1000))
    for m, s in zip(masks, scores):
        area = int(m.sum())
        covered = int((m & (labels > 0)).sum())
        if area == 0 or covered * 1000 > area * k:
            continue
        kept.append(s)
        labels[m & (labels == 0)] = len(kept)
    return labels, np.asarray(kept, np.float32)
