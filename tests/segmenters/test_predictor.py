"""The fast batched predictor equals the simple (torchvision eval forward) path; the post-processing pieces equal
torchvision's; the overlap rule on hand-made cases."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms

from wsiseg.segmenters import postprocess as pp
from wsiseg.segmenters.base import Segmenter, TileInstances
from wsiseg.segmenters.rcnn import PDAMSegmenter
from helpers import interrupting_sink

ROOT = Path(__file__).resolve().parents[2]

CROPS = [(0, 0), (300, 300), (600, 100)]  # (y, x) of 256x256 crops


def random_maskrcnn(seed: int = 0, dets: int = 40) -> MaskRCNN:
    """A fixed-seed random ResNet-18-FPN Mask R-CNN that keeps many detections with crisp (saturated) masks."""
    torch.manual_seed(seed)
    bb = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(  # narrow box (256) and mask (64) heads to keep the test fast on a shared CPU
        bb, num_classes=None, min_size=256, max_size=256, rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, box_score_thresh=0.0, box_detections_per_img=dets,
        box_head=TwoMLPHead(256 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, 2), mask_head=MaskRCNNHeads(256, [64, 64], 1), mask_predictor=MaskRCNNPredictor(64, 64, 2),
    )
    with torch.no_grad():  # random logits are ~0: scale them so masks are not all on the 0.5 threshold
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(100)
    return model.eval()


@pytest.fixture(scope="module")
def kumar_tiles(kumar_dir) -> np.ndarray:
    tifffile = pytest.importorskip("tifffile")
    path = sorted((kumar_dir / "images").glob("*.tif"))[0]
    img = tifffile.imread(path)[..., :3]
    return np.stack([img[y : y + 256, x : x + 256] for y, x in CROPS]).astype(np.uint8)


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    return random_maskrcnn()


def assert_same_instances(fast: list[TileInstances], ref: list[TileInstances]) -> None:
    """Same instance count per tile; instance k of one is instance k of the other: every differing pixel on the
    boundary of one of the two masks (a 1 px change), IoU >= 0.9 (for instances of 20+ px: on a 5 px one, 1 px is IoU 0.8),
    at most 0.1% of all instance pixels differ; scores equal to float precision."""
    assert len(fast) == len(ref)
    assert sum(((f.labels > 0) != (r.labels > 0)).sum() for f, r in zip(fast, ref)) <= 1e-3 * sum(
        (r.labels > 0).sum() for r in ref
    )
    for f, r in zip(fast, ref):
        assert f.count == r.count
        np.testing.assert_allclose(f.scores, r.scores, rtol=1e-4, atol=1e-5)  # fp32, other reduction order
        for k in range(1, r.count + 1):
            a, b = f.labels == k, r.labels == k
            iou = (a & b).sum() / max((a | b).sum(), 1)
            assert iou >= 0.9 or b.sum() < 20, (k, iou, b.sum())
            near = (ndi.binary_dilation(b) & ~ndi.binary_erosion(b)) | (ndi.binary_dilation(a) & ~ndi.binary_erosion(a))
            assert not ((a ^ b) & ~near).any()  # a flip is a boundary pixel of one of the two masks


def assert_valid(inst: TileInstances) -> None:
    ids = np.unique(inst.labels)
    assert inst.labels.dtype == np.int32 and inst.scores.dtype == np.float32
    np.testing.assert_array_equal(ids[ids > 0], np.arange(1, inst.count + 1))  # contiguous 1..n, none empty
    assert np.all(np.diff(inst.scores) <= 0)  # ids in decreasing score order


@pytest.mark.parametrize("nms_method", ["sequential", "matrix"])
def test_fast_equals_simple_on_kumar_tiles(model, kumar_tiles, nms_method):
    fast = PDAMSegmenter(model, mpp=0.25, max_nucleus_px=40, device="cpu", nms_method=nms_method)
    simple = PDAMSegmenter(model, mpp=0.25, max_nucleus_px=40, device="cpu", fast=False)
    assert isinstance(fast, Segmenter)
    out_fast, out_ref = fast.predict(kumar_tiles[:2]), simple.predict(kumar_tiles[:2])
    assert all(r.count >= 20 for r in out_ref)  # the model really produces many overlapping instances
    assert_same_instances(out_fast, out_ref)
    for inst in out_fast:
        assert inst.labels.shape == (256, 256)
        assert_valid(inst)
    # a batch is the sum of its tiles
    single = fast.predict(kumar_tiles[1:2])[0]
    np.testing.assert_array_equal(single.labels, out_fast[1].labels)


def test_fast_equals_simple_when_the_model_resizes_and_pads(model, kumar_tiles):
    resized = copy.deepcopy(model)
    t = resized.transform
    resized.transform = GeneralizedRCNNTransform(170, 170, t.image_mean, t.image_std)  # 112 -> 170, padded to 192
    tiles = kumar_tiles[:2, :112, :112]
    fast = PDAMSegmenter(resized, 0.25, 40, device="cpu").predict(tiles)
    ref = PDAMSegmenter(resized, 0.25, 40, device="cpu", fast=False).predict(tiles)
    assert sum(r.count for r in ref) > 10
    assert_same_instances(fast, ref)


def test_no_detection_gives_empty_tiles(model, kumar_tiles):
    none = copy.deepcopy(model)
    none.roi_heads.score_thresh = 1.0  # softmax scores never exceed 1
    seg = PDAMSegmenter(none, 0.25, 40, device="cpu")
    out = seg.predict(kumar_tiles[:2])
    assert [o.count for o in out] == [0, 0]
    assert all(o.labels.shape == (256, 256) and not o.labels.any() for o in out)
    assert seg.predict(np.zeros((0, 256, 256, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        seg.predict(np.zeros((1, 256, 256), np.uint8))


def test_paste_masks_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    n, size = 150, (200, 240)
    probs = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 28, 28, generator=g), 5, 1, 2)[:, 0] * 1.6 - 0.3
    xy = torch.rand(n, 2, generator=g) * 260 - 20
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) ** 2 * 120 + 0.05], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
    ref = pp.paste_masks_reference(probs, boxes, size) > 0.5
    win, org = pp.paste_masks(probs, boxes, size, max_elements=1 << 20)  # several chunks
    k = win.shape[-1]
    full = torch.zeros(n, size[0] + k, size[1] + k, dtype=torch.bool)
    for i, (y, x) in enumerate(org.tolist()):
        full[i, y : y + k, x : x + k] = win[i]
    assert ref.sum() > 5000
    assert (full[:, : size[0], : size[1]] ^ ref).sum() <= 5
    assert not full[:, size[0] :].any() and not full[:, :, size[1] :].any()


@pytest.mark.parametrize("fused", [False, True])
def test_paste_masks_does_not_depend_on_the_chunks(fused, monkeypatch):
    """A detection's pasted mask is the same bits whether it is computed with every other detection at the batch's
    largest window, in chunks of a few detections at their own largest window (the CPU's chunks), or alone: the
    instances of a tile do not depend on what shares its batch."""
    g = torch.Generator().manual_seed(1)
    n, size = 90, (160, 160)
    probs = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 28, 28, generator=g), 5, 1, 2)[:, 0] * 1.6 - 0.3
    xy = torch.rand(n, 2, generator=g) * 170 - 5
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) ** 2 * 70 + 1], 1)
    fuse = (torch.rand(3, *size, generator=g), torch.arange(n) % 3) if fused else None
    runs = []
    for chunk in (None, pp._PASTE_CHUNK, 7, 1):
        monkeypatch.setattr(pp, "_PASTE_CHUNK", chunk)
        runs.append(pp.paste_masks(probs, boxes, size, fuse=fuse))
    (win0, org0), k0 = runs[0], runs[0][0].shape[-1]
    assert win0.sum() > 2000
    for win, org in runs[1:]:
        assert torch.equal(org, org0) and win.shape[-1] == k0
        assert torch.equal(win, win0)


def _round_trip(kumar_dir, views) -> tuple[np.ndarray, np.ndarray]:
    """Real labelled nuclei (a development image) turned into Mask R-CNN mask targets by torchvision's own training
    code, averaged over ``views`` as TTA does, pasted back by the predictor's paste at its frame offset: per nucleus,
    the pasted mask's centroid minus the label's, (dy, dx), and their IoU."""
    from skimage import io
    from torchvision.models.detection.roi_heads import project_masks_on_boxes
    from wsiseg.train.trainer import targets_from_labels

    dev = [r.split(",")[0] for r in (kumar_dir / "split.csv").read_text().splitlines() if ",train," in r]
    lab = io.imread(kumar_dir / "labels" / f"{dev[0]}.png").astype(np.int64)[:300, :300]
    t = targets_from_labels(lab)
    keep = t["masks"].flatten(1).sum(1) >= 30
    boxes, masks = t["boxes"][keep], t["masks"][keep].numpy().astype(bool)
    size = lab.shape
    probs = []
    for v in views:  # each view's target, mapped back onto the box as the predictor maps a view's mask
        vm = pp.view_images(torch.from_numpy(masks).to(torch.uint8), v)
        vb = pp.view_boxes(boxes, v, size)
        probs.append(pp.unview_masks(project_masks_on_boxes(vm, vb, torch.arange(len(vb)), 28), v))
    sx, sy = pp.mask_frame_offset(views)
    win, org = pp.paste_masks(torch.stack(probs).mean(0), boxes + torch.tensor([sx, sy, sx, sy]), size)
    offsets, ious = [], []
    for n, (y, x) in enumerate(org.tolist()):
        pasted = np.zeros((size[0] + win.shape[1], size[1] + win.shape[2]), bool)
        pasted[y:y + win.shape[1], x:x + win.shape[2]] = win[n].numpy()
        pasted = pasted[: size[0], : size[1]]
        offsets.append(np.subtract(ndi.center_of_mass(pasted), ndi.center_of_mass(masks[n])))
        ious.append((pasted & masks[n]).sum() / (pasted | masks[n]).sum())
    return np.array(offsets), np.array(ious)


@pytest.mark.parametrize("n_views", [1, 4, 8])
def test_masks_are_pasted_where_they_were_learnt(kumar_dir, n_views):
    """torchvision learns each mask half a pixel right and down of its box (roi_align, aligned=False): real nuclei
    made into its mask targets and pasted back by the predictor come back where and as large as they were, alone
    or averaged over TTA views."""
    views = pp.tta_views(n_views)
    d, iou = _round_trip(kumar_dir, views)
    assert len(d) >= 20
    assert np.abs(d.mean(0)).max() < 0.1, d.mean(0)
    assert iou.mean() > (0.99 if n_views == 1 else 0.95), iou.mean()
    s = pp.MASK_FRAME_SHIFT
    assert pp.mask_frame_offset(views) == ((s, s) if n_views == 1 else (0.0, 0.0))


def test_pasting_at_the_box_itself_shifts_masks_up_and_left(kumar_dir, monkeypatch):
    """What torchvision does (masks pasted at the box): nuclei come back 0.4 px up and left, the bias every
    self-training round copied into its labels."""
    monkeypatch.setattr(pp, "MASK_FRAME_SHIFT", 0.0)
    d, iou = _round_trip(kumar_dir, pp.tta_views(1))
    assert (d.mean(0) < -0.3).all(), d.mean(0)
    assert iou.mean() < 0.96


def test_paste_masks_fused_with_a_semantic_map():
    """``fuse``: the mean of the pasted probability and the map, on each detection's own pixels: a map of 0.5 gives
    the masks without it; 0 none; 1 every pixel of the extent where the mask has any weight; and the map is read
    at the right tile pixels (a map that is 1 on one half only grows masks there)."""
    g = torch.Generator().manual_seed(3)
    n, size = 60, (128, 160)
    probs = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 28, 28, generator=g), 5, 1, 2)[:, 0] * 1.6 - 0.3
    xy = torch.rand(n, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 4], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
    image = torch.randint(0, 2, (n,), generator=g)
    plain, org = pp.paste_masks(probs, boxes, size)

    def fused(sem):
        return pp.paste_masks(probs, boxes, size, fuse=(sem, image))[0]

    assert torch.equal(fused(torch.full((2, *size), 0.5)), plain)
    assert not fused(torch.zeros(2, *size)).any()
    ones = fused(torch.ones(2, *size))
    assert (ones & plain).sum() == plain.sum() and ones.sum() > plain.sum()
    half = torch.zeros(2, *size)
    half[:, :, size[1] // 2:] = 1.0  # right half
    got = fused(half)
    k = got.shape[-1]
    cols = org[:, 1, None] + torch.arange(k)  # tile column of each window column
    assert not (got & (cols < size[1] // 2)[:, None, :]).any()  # left of the half: (p + 0) / 2 <= 0.5
    assert (got | ~plain)[(cols >= size[1] // 2)[:, None, :].expand_as(got)].all()  # right: at least the mask


def test_grouped_nms_equals_batched_nms():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(9000, 2, generator=g) * 256
    boxes = torch.cat([xy, xy + torch.rand(9000, 2, generator=g) * 30 + 1], 1)
    scores = torch.rand(9000, generator=g)
    groups = torch.randint(0, 37, (9000,), generator=g)
    ref = batched_nms(boxes, scores, groups, 0.5)
    got = pp.grouped_nms(boxes, scores, groups, 0.5, max_boxes_per_call=1000)
    assert sorted(got.tolist()) == sorted(ref.tolist())
    key = groups[got] * 2.0 - scores[got]  # sorted by group, then score descending
    assert torch.all(key[1:] >= key[:-1])


@pytest.mark.parametrize("case", ["groups", "ties", "one big group", "many small groups"])
def test_matrix_nms_equals_batched_nms(case):
    """The fixed-point (matrix) NMS keeps exactly what torchvision keeps, at every threshold, in one chunk or many
    (a small ``max_elements``), with groups too large for its matrices sent to ``nms`` instead; dense overlapping
    boxes make long suppression chains."""
    g = torch.Generator().manual_seed(len(case))
    n, ngroups = {"groups": (6000, 37), "ties": (2000, 3), "one big group": (2500, 1), "many small groups": (4000, 900)}[case]
    xy = torch.rand(n, 2, generator=g) * (64 if case == "one big group" else 256)
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], 1)
    scores = torch.rand(n, generator=g)
    if case == "ties":
        scores = (scores * 8).round() / 8
    groups = torch.randint(0, ngroups, (n,), generator=g)
    for thr in (0.3, 0.5, 0.7):
        ref = batched_nms(boxes, scores, groups, thr)
        seq = pp.grouped_nms(boxes, scores, groups, thr, method="sequential")
        for max_elements in (pp.MATRIX_NMS_ELEMENTS, 400 ** 2):
            got = pp.matrix_nms(boxes, scores, groups, thr, max_elements=max_elements)
            assert sorted(got.tolist()) == sorted(ref.tolist())
            if case != "ties":  # equal scores: any order among them is torchvision's
                assert got.tolist() == seq.tolist()  # same order: by group, then score descending
            key = groups[got] * 2.0 - scores[got]
            assert torch.all(key[1:] >= key[:-1])
    with pytest.raises(ValueError, match="nms method"):
        pp.grouped_nms(boxes, scores, groups, 0.5, method="fast")


def _square(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def _vectorised(masks_per_tile: list[np.ndarray], shape, method: str) -> tuple[np.ndarray, np.ndarray]:
    windows = torch.from_numpy(np.concatenate(masks_per_tile))
    image = torch.cat([torch.full((len(m),), i) for i, m in enumerate(masks_per_tile)])
    origins = torch.zeros(len(image), 2, dtype=torch.int64)
    labels, keep = pp.resolve_overlaps(windows, origins, image, len(masks_per_tile), shape, method=method)
    assert labels.dtype == torch.int32 and labels.is_contiguous() and keep.dtype == torch.bool
    return labels.numpy(), keep.numpy()


@pytest.mark.parametrize("method", ["ranks", "waves"])
def test_overlap_rule_on_hand_made_masks(method):
    shape = (20, 20)
    a = _square(shape, 0, 10, 0, 10)  # 100 px, best
    b = _square(shape, 2, 12, 0, 10)  # 80 of its 100 px under a: more than 70% covered -> dropped
    c = _square(shape, 0, 10, 7, 17)  # 30 of 100 px under a -> kept, the overlap subtracted (70 px left)
    d = _square(shape, 3, 13, 0, 10)  # exactly 70 of 100 px under a (not more than 70%) -> kept, 30 px left
    masks = np.stack([a, b, c, d])
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels, kept = pp.resolve_overlaps_reference(masks, scores)
    np.testing.assert_array_equal(kept, scores[[0, 2, 3]])
    assert (labels == 1).sum() == 100 and (labels[a] == 1).all()
    assert (labels == 2).sum() == 70 and (labels[c & ~a] == 2).all()
    assert (labels == 3).sum() == 30 and (labels[d & ~a] == 3).all()
    # vectorised, with a second tile holding fewer detections and one empty mask
    e = np.zeros(shape, bool)
    vec, keep = _vectorised([masks, np.stack([c, e, a])], shape, method)
    np.testing.assert_array_equal(vec[0], labels)
    np.testing.assert_array_equal(keep, [True, False, True, True, True, False, True])
    assert (vec[1] == 1).sum() == 100 and (vec[1] == 2).sum() == 70
    ref1, _ = pp.resolve_overlaps_reference(np.stack([c, e, a]), np.ones(3))
    np.testing.assert_array_equal(vec[1], ref1)
    with pytest.raises(ValueError, match="overlap method"):
        _vectorised([masks], shape, "greedy")


@pytest.mark.parametrize("method", ["ranks", "waves"])
def test_overlap_rule_vectorised_equals_reference_on_random_masks(method):
    rng = np.random.default_rng(3)
    shape = (48, 48)
    tiles = []
    for count in (0, 7, 25, 13):
        masks = np.zeros((count, *shape), bool)
        for m in masks:
            y, x, r = rng.integers(0, 48), rng.integers(0, 48), rng.integers(2, 12)
            yy, xx = np.ogrid[:48, :48]
            m[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = True
        tiles.append(masks)
    vec, _ = _vectorised(tiles, shape, method)
    for i, masks in enumerate(tiles):
        ref, kept = pp.resolve_overlaps_reference(masks, np.ones(len(masks)))
        np.testing.assert_array_equal(vec[i], ref)
        assert_valid(TileInstances(ref, kept))


@pytest.mark.parametrize("method,limits", [("waves", (pp._WAVE_CHUNK, None)), ("waves", (16, None)),
                                           ("waves", (None, pp._WAVE_PIXELS)), ("waves", (None, 5000)),
                                           (None, None)])
def test_overlap_rule_on_cropped_windows_equals_reference(method, limits, monkeypatch):
    """Masks in their own small windows (as ``paste_masks`` gives them: an origin, the mask somewhere inside),
    settled wave by wave or, the CPU's default, rank by rank in their windows: the same labels and kept detections
    as the plain rank-by-rank reference. Dense tiles make long chains of overlapping masks, waves of more masks than
    one step takes, windows that overlap where their masks do not, irregular and empty masks, and masks cut by the
    tile's border (``limits``, most masks settled at once: 16 splits the larger waves; a GPU's pixel budget: whole
    waves, or split by their windows' pixels)."""
    if limits is not None:
        monkeypatch.setattr(pp, "_wave_limits", lambda device: limits)
    rng = np.random.default_rng(7)
    shape = (96, 96)
    yy, xx = np.ogrid[:96, :96]
    tiles = []
    for count, rmax in ((0, 0), (1, 9), (30, 14), (90, 8), (170, 4)):
        masks = np.zeros((count, *shape), bool)
        for m in masks:
            if rng.random() < 0.05:
                continue  # empty mask
            cy, cx = rng.integers(-4, 100, 2)
            for _ in range(rng.integers(1, 4)):  # a union of nearby discs
                y, x = (cy, cx) + rng.integers(-rmax, rmax + 1, 2)
                r = rng.integers(1, rmax + 1)
                m[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = True
        tiles.append(masks)
    masks = np.concatenate(tiles)
    k = 4 * 14 + 8
    windows = np.zeros((len(masks), k, k), bool)
    origins = np.zeros((len(masks), 2), np.int64)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            origins[i] = rng.integers(0, 90, 2)
            continue
        oy, ox = max(0, ys.min() - rng.integers(0, 4)), max(0, xs.min() - rng.integers(0, 4))
        origins[i] = oy, ox
        crop = m[oy:oy + k, ox:ox + k]
        windows[i, :crop.shape[0], :crop.shape[1]] = crop
        assert crop.sum() == m.sum()
    image = torch.cat([torch.full((len(t),), i) for i, t in enumerate(tiles)])
    labels, keep = pp.resolve_overlaps(torch.from_numpy(windows), torch.from_numpy(origins), image, len(tiles),
                                       shape, method=method)
    s = 0
    for i, t in enumerate(tiles):
        scores = np.arange(len(t), 0, -1, dtype=np.float32)
        ref, kept = pp.resolve_overlaps_reference(t, scores)
        np.testing.assert_array_equal(labels[i].numpy(), ref)
        np.testing.assert_array_equal(scores[keep[s:s + len(t)].numpy()], kept)
        s += len(t)
    assert int(labels[4].max()) > 100  # the densest tile: most of its masks kept


def test_wave_steps_honour_their_limits():
    """Steps stay within one wave, in order, cover every detection once, and keep to the count and pixel limits
    (a detection whose window alone exceeds the pixel budget is a step of its own)."""
    per_wave = [5, 0, 7, 1]
    ext = [1, 2, 3, 3, 9, 0, 0, 4, 4, 5, 40, 41, 2]
    for max_count, max_px in ((None, None), (2, None), (None, 50), (3, 100), (None, 1)):
        steps = pp._wave_steps(per_wave, ext, max_count, max_px)
        assert [i for c, e, _ in steps for i in range(c, e)] == list(range(len(ext)))
        bounds = np.cumsum([0] + per_wave)
        for c, e, kr in steps:
            assert np.searchsorted(bounds, c, "right") == np.searchsorted(bounds, e - 1, "right")  # one wave
            assert kr == max(1, max(ext[c:e]))
            assert max_count is None or e - c <= max_count
            assert max_px is None or e - c == 1 or (e - c) * kr * kr <= max_px
    assert pp._wave_steps(per_wave, ext, None, None) == [(0, 5, 9), (5, 12, 41), (12, 13, 2)]


def _pdam_lite(dets: int = 40):
    """PDAM of ``configs/pdam_lite.yaml``, random init, score threshold 0 so that it keeps ``dets`` per tile."""
    try:
        from wsiseg.models.pdam import build_pdam
        from wsiseg.train.trainer import load_run_config
    except ImportError as e:  # pragma: no cover - while the model is not there
        pytest.skip(f"PDAM builder not available: {e}")
    cfg = load_run_config(ROOT / "configs" / "pdam_lite.yaml").model
    cfg.roi.score_thresh, cfg.roi.detections_per_img = 0.0, dets
    cfg.rpn.pre_nms_top_n_test, cfg.rpn.post_nms_top_n_test = 300, 150  # fewer RoIs: a fast test
    # seed 0 gives random-init scores tied to 1e-7, whose order then depends on the thread count (rounding);
    # seed 2 has no such ties with 1 or 2 threads, so the comparison tests the paths, not float rounding
    torch.manual_seed(2)
    model = build_pdam(cfg).eval()
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(100)
    return model, cfg


def test_fast_equals_simple_with_pdam_lite(kumar_tiles):
    model, cfg = _pdam_lite()
    fast = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", name=cfg.name)
    tiles = kumar_tiles[:, :160, :160]  # PDAM's transform never resizes; 160 is padded to 160
    ref = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", fast=False).predict(tiles)
    out = fast.predict(tiles)
    assert all(r.count >= 10 for r in ref)
    assert_same_instances(out, ref)


def test_fast_equals_simple_on_tiles_larger_than_the_model_s_own(kumar_tiles):
    """A tile of four times the area of the model's own tile gets four times its proposals and detections, the same
    in the fast path and the stock forward (whose settings are the model's again afterwards)."""
    model, cfg = _pdam_lite(dets=10)
    fast = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu")
    simple = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", fast=False)
    fast.tile_size = simple.tile_size = 80
    tiles = kumar_tiles[:2, :160, :160]
    out, ref = fast.predict(tiles), simple.predict(tiles)
    assert max(r.count for r in ref) > 10  # more than the model's own 10 detections a tile
    assert_same_instances(out, ref)
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n(), model.roi_heads.detections_per_img) == (300, 150, 10)
    assert pp.cap_scale((160, 160), 80) == 4 and pp.cap_scale((64, 64), 80) == 1
    assert pp.ProposalSettings(1000, 150, 0.7).scaled(1.78) == pp.ProposalSettings(1780, 267, 0.7)


def test_a_tile_larger_than_the_model_s_own_keeps_its_nuclei(kumar_dir):
    """The bundled model (its own tile 384 px) on a 768 px tile of a development image finds about the nuclei of the
    tile's four 384 px quarters (which count a nucleus cut by their borders twice), not at most its own tile's
    proposals' worth (134 of 289 before the counts grew with the tile)."""
    tifffile = pytest.importorskip("tifffile")
    from wsiseg.api import load_model

    seg = load_model("default", "cpu")
    dev = [r.split(",")[0] for r in (kumar_dir / "split.csv").read_text().splitlines() if ",train," in r]
    img = tifffile.imread(kumar_dir / "images" / f"{dev[0]}.tif")[:768, :768, :3].astype(np.uint8)
    quarters = sum(r.count for r in seg.predict(np.stack([img[y:y + 384, x:x + 384] for y in (0, 384)
                                                          for x in (0, 384)])))
    whole = seg.predict(img[None])[0]
    assert seg.tile_size == 384 and quarters > 200
    assert 0.85 * quarters <= whole.count <= quarters


@pytest.mark.parametrize("tta", [0, 4])
def test_first_call_equals_later_calls(kumar_tiles, tta):
    """A fresh segmenter's first batch (the call that sets the RoI poolers' scales up) gives exactly what later
    calls give: the labels a pseudo-labelling teacher wrote equal a re-prediction (it once pooled through
    torchvision's kernel on the first call only)."""
    model, cfg = _pdam_lite()
    tiles = kumar_tiles[:2, :160, :160]
    first = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", tta=tta)
    a = first.predict(tiles)
    b = first.predict(tiles)
    assert sum(t.count for t in a) >= 10
    assert all(np.array_equal(x.labels, y.labels) and np.array_equal(x.scores, y.scores) for x, y in zip(a, b))


def test_from_checkpoint_round_trip(tmp_path, kumar_tiles):
    try:
        from wsiseg.models.checkpoint import save_checkpoint
        from wsiseg.models.config import to_dict
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"checkpoint module not available: {e}")
    model, cfg = _pdam_lite(dets=20)
    path = tmp_path / "lite.safetensors"
    save_checkpoint(path, model, config=to_dict(cfg), mpp=0.5, inference_only=True)
    seg = PDAMSegmenter.from_checkpoint(path, device="cpu")
    assert (seg.name, seg.mpp, seg.max_nucleus_px) == (cfg.name, 0.5, cfg.max_nucleus_px)
    tile = kumar_tiles[:1, :128, :128]
    direct = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu").predict(tile)[0]
    loaded = seg.predict(tile)[0]
    np.testing.assert_array_equal(loaded.labels, direct.labels)
    from wsiseg.core.errors import WsisegError

    with pytest.raises(WsisegError):
        PDAMSegmenter.from_checkpoint(tmp_path / "missing.safetensors", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [None, "fp16"])
def test_fast_equals_simple_on_cuda(model, kumar_tiles, amp, monkeypatch):
    # fp32 means fp32 here: cuDNN's default TF32 convolutions (10-bit mantissa) moved scores by 1e-4 between the
    # paths on an H200, whose convolutions pick different algorithms (channels-last vs not)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fast = PDAMSegmenter(copy.deepcopy(model), 0.25, 40, device="cuda", amp=amp).predict(kumar_tiles)
    ref = PDAMSegmenter(copy.deepcopy(model), 0.25, 40, device="cuda", amp=amp, fast=False).predict(kumar_tiles)
    if amp is None:
        assert_same_instances(fast, ref)
    else:  # fp16 RPN/box decoding differs between the paths (ours decodes in fp32): compare counts loosely
        for f, r in zip(fast, ref):
            assert abs(f.count - r.count) <= max(2, r.count // 10)
            assert_valid(f)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [None, "fp16"])
def test_the_backbone_as_a_cuda_graph_gives_the_eager_features(model, kumar_tiles, amp):
    eager = PDAMSegmenter(copy.deepcopy(model), 0.25, 40, device="cuda", amp=amp, cuda_graphs=False)
    graphed = PDAMSegmenter(copy.deepcopy(model), 0.25, 40, device="cuda", amp=amp)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    for tiles in (kumar_tiles, kumar_tiles[:2], kumar_tiles[:1], kumar_tiles):  # a third shape runs eagerly
        a, b = eager.backbone_features(tiles), graphed.backbone_features(tiles)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
        assert_same_instances(graphed.predict(tiles), eager.predict(tiles))
    assert len(graphed._nets[0].backbone.graphs) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_graphed_backbone_follows_a_precision_set_after_construction(model, kumar_tiles):
    from wsiseg.segmenters.registry import set_precision

    eager = PDAMSegmenter(copy.deepcopy(model), 0.25, 40, device="cuda", amp="fp16", cuda_graphs=False)
    graphed = PDAMSegmenter(copy.deepcopy(model), 0.25, 40, device="cuda")  # fp32 when built
    graphed.backbone_features(kumar_tiles)  # a graph captured in fp32 first
    set_precision(graphed, "fp16")
    a, b = eager.backbone_features(kumar_tiles), graphed.backbone_features(kumar_tiles)
    for k in a:
        assert b[k].dtype == a[k].dtype
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_single_level_pooling_equals_multiscale_roi_align():
    from torchvision.ops import MultiScaleRoIAlign

    from wsiseg.segmenters.rcnn import _pool

    g = torch.Generator().manual_seed(0)
    feats = {"0": torch.randn(2, 16, 64, 64, generator=g), "1": torch.randn(2, 16, 32, 32, generator=g)}
    shapes = [(256, 256)] * 2
    for sampling in (1, 2, -1):  # -1 (adaptive): the GPU's way, torchvision's roi_align, on the CPU
        pooler = MultiScaleRoIAlign(["0", "1"], 7, sampling)
        xy = torch.rand(2, 30, 2, generator=g) * 200
        boxes = [torch.cat([xy[i], xy[i] + 8 + torch.rand(30, 2, generator=g) * 30], 1) for i in range(2)]
        ref = pooler(feats, boxes, shapes)  # also sets the pooler's scales up
        assert (pooler.map_levels(boxes) == 0).all()  # nuclei-sized boxes: all on the finest level
        assert torch.allclose(_pool(pooler, feats, *flat(boxes), shapes), ref, atol=1e-6)
        mixed = [torch.cat([b, torch.tensor([[0.0, 0.0, 250.0, 250.0]])]) for b in boxes]  # one box per level 1
        assert torch.allclose(_pool(pooler, feats, *flat(mixed), shapes), pooler(feats, mixed, shapes), atol=1e-6)


def flat(boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image boxes as ``_pool`` takes them: all boxes, and each one's image."""
    return torch.cat(boxes), torch.cat([torch.full((len(b),), i) for i, b in enumerate(boxes)])


@pytest.mark.parametrize("channels_last", [True, False])
def test_roi_align_rows_equals_torchvision_roi_align(channels_last):
    """The CPU pooling (one embedding_bag over pixel rows) equals torchvision's roi_align: boxes inside, across
    and beyond the border of the map, degenerate boxes, 1-3 samples per bin side, two scales, 7 and 14 bins."""
    from torchvision.ops import roi_align

    from wsiseg.models.roi_pool import roi_align_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 40, 50, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xy = torch.rand(200, 2, generator=g) * 260 - 30
    boxes = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 60], 1)
    boxes[:5, 2:] = boxes[:5, :2]  # zero-size boxes
    rois = torch.cat([torch.randint(0, 3, (200, 1), generator=g).float(), boxes], 1)
    for sampling in (1, 2, 3):
        for out in (7, 14):
            for scale in (0.25, 0.125):
                got = roi_align_rows(x, rois, out, scale, sampling)
                assert got.shape == (200, out, out, 16)
                ref = roi_align(x, rois, out, scale, sampling, aligned=False)
                assert torch.allclose(got.permute(0, 3, 1, 2), ref, atol=2e-6)
    assert roi_align_rows(x, rois[:0], 7, 0.25, 1).shape == (0, 7, 7, 16)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_rows(x, rois, 7, 0.25, 0)


def test_rows_pooler_equals_torchvision_forward_and_backward():
    """PDAM's RoI pooler (``RowsMultiScaleRoIAlign``: the embedding_bag pooling on the CPU, also in training) gives
    torchvision's ``MultiScaleRoIAlign`` values and feature gradients, boxes on several FPN levels, first call
    included."""
    from torchvision.ops import MultiScaleRoIAlign

    from wsiseg.models.roi_pool import RowsMultiScaleRoIAlign

    g = torch.Generator().manual_seed(1)
    shapes = [(256, 256)] * 2
    xy = torch.rand(2, 40, 2, generator=g) * 200
    xy[0, :20] *= 0.05  # large boxes from near the corner: the coarse levels
    boxes = [torch.cat([xy[i], xy[i] + 4 + torch.rand(40, 2, generator=g) * (30 if i else 250)], 1).clamp(max=256)
             for i in range(2)]
    for sampling in (1, 2):
        grads = []
        for cls in (MultiScaleRoIAlign, RowsMultiScaleRoIAlign):
            feats = {k: torch.randn(2, 8, s, s, generator=torch.Generator().manual_seed(s)).requires_grad_(True)
                     for k, s in (("0", 64), ("1", 32), ("2", 16))}
            out = cls(["0", "1", "2"], 7, sampling)(feats, boxes, shapes)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((out.detach(), [f.grad for f in feats.values()]))
        (ref, ref_g), (got, got_g) = grads
        assert got.shape == ref.shape == (80, 8, 7, 7) and got.is_contiguous()
        assert torch.allclose(got, ref, atol=2e-6)
        assert all(a is not None and torch.allclose(a, b, atol=1e-5) for a, b in zip(got_g, ref_g))
        assert all(bool(gr.abs().sum() > 0) for gr in ref_g)  # boxes on every level


def test_box_and_mask_heads_on_channels_last_rois_equal_the_modules():
    """The box head reads channels-last RoIs with its first weight's columns reordered, and the mask head makes
    each GroupNorm's input contiguous: both give what the modules give on the contiguous RoIs."""
    from wsiseg.models.pdam import GNMLPHead
    from wsiseg.segmenters.rcnn import _box_head_fn, _mask_head_fn

    torch.manual_seed(0)
    x = torch.randn(30, 16, 7, 7)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    heads = [GNMLPHead(16, 7, [], [32, 32], 8, 1e-5), TwoMLPHead(16 * 7 * 7, 32),
             GNMLPHead(16, 7, [16], [32], 8, 1e-5)]  # a head that starts with a conv: called as is
    with torch.no_grad():
        for head in heads:
            head.eval()
            assert torch.allclose(_box_head_fn(head)(x_cl), head(x), atol=1e-5)
            assert torch.allclose(_box_head_fn(head)(x), head(x), atol=1e-5)
        norm = lambda c: torch.nn.GroupNorm(4, c)  # noqa: E731
        mask_head = MaskRCNNHeads(16, [8, 8], 1, norm_layer=norm).eval()
        xm = torch.randn(30, 16, 14, 14)
        got = _mask_head_fn(mask_head)(xm.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, mask_head(xm), atol=1e-5)


def test_proposals_equal_torchvision_filter_proposals():
    """The fast path's proposal filtering (NMS first over each image's leading proposals, redone over all of them
    for an image with too few survivors there) keeps exactly the proposals of torchvision's RPN, in its order."""
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    g = torch.Generator().manual_seed(5)
    levels = [1200, 600, 150]
    n_img, total = 3, sum(levels)
    xy = torch.rand(n_img, total, 2, generator=g) * 240
    wh = torch.rand(n_img, total, 2, generator=g) * 30 + 2
    dense = torch.arange(total) % 10 > 0  # image 1: 9 in 10 proposals nearly one box: few survive NMS
    xy[1, dense] = xy[1, dense] * 0.02 + 100
    wh[1, dense] = wh[1, dense] * 0.02 + 20
    proposals = torch.cat([xy, xy + wh], 2)
    objectness = torch.randn(n_img, total, generator=g) * 3
    objectness[2, ::7] = objectness[2, 0]  # ties in image 2
    for post in (50, 200):
        rpn = RegionProposalNetwork(None, RPNHead(8, 3), 0.7, 0.3, 256, 0.5, dict(training=2000, testing=1000),
                                    dict(training=2000, testing=post), 0.7).eval()
        ref, _ = rpn.filter_proposals(proposals.clone(), objectness.reshape(-1, 1).clone(), [(256, 256)] * n_img,
                                      levels)
        boxes, image = pp.select_proposals(objectness, proposals, levels, (256, 256), pp.ProposalSettings.of(rpn))
        # the dense image has too few survivors among its leading proposals: some it keeps come from beyond them
        clipped = proposals[1].clamp(0, 256)
        kept = [int(torch.all(clipped == b, 1).nonzero()) for b in boxes[image == 1]]
        leading = torch.cat([o.topk(min(1000, o.shape[0])).values for o in objectness[1].split(levels)])
        assert objectness[1, kept].min() < leading.topk(pp.LEADING_FACTOR * post).values[-1]
        for i in range(n_img):
            got = boxes[image == i]
            assert got.shape == ref[i].shape
            if i == 2:  # equal scores: torchvision's order among them is unspecified
                assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, ref[i].tolist()))
            else:
                assert torch.equal(got, ref[i])


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_rpn_head_as_one_product_and_proposals_decoded_where_kept_are_exact(kumar_tiles, amp):
    """On the CPU the fast path's RPN head (one product of the channels-last pixel rows with the stacked 1x1
    weights) gives the values of the head's two convolutions (up to rounding) in ``concat_box_prediction_layers``'
    order, in float32 and under bfloat16 autocast, also after a head's own 3x3 convolution; features that are not
    channels-last, and a head of another class, go through the head itself. Proposals decoded only where kept
    (:class:`EncodedBoxes`) are the boxes of a decode of every anchor, whatever the number kept (a tail shorter than
    a vector included)."""
    from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers

    from wsiseg.segmenters.rcnn import _rpn_head_fn

    model, _ = _pdam_lite()
    seg = PDAMSegmenter(model, 0.25, 64, device="cpu", amp=amp)
    with torch.inference_mode():
        batch_features = seg._features(kumar_tiles)
        feats = list(batch_features.feats[0].values())
        assert all(f.permute(0, 2, 3, 1).is_contiguous() for f in feats)  # the product's case
        torch.manual_seed(0)
        with_conv = RPNHead(feats[0].shape[1], 3).eval()  # torchvision's head: a 3x3 conv first

        class OwnHead(torch.nn.Module):  # not an RPNHead: called as is
            def forward(self, fs):
                return model.rpn.head(fs)

        for head, fs in ((model.rpn.head, feats), (model.rpn.head, [f.contiguous() for f in feats]),
                         (with_conv, feats), (OwnHead(), feats)):
            with seg._autocast():
                obj, deltas, counts = _rpn_head_fn(head)(fs)
                ref_obj, ref_deltas = concat_box_prediction_layers(*head(fs))
            # (bit for bit where torch's convolution sums in the product's order: here at two threads, not at one,
            # where the objectness differs by a few float32 ulps, 3e-7 of 0.86; the rounding of either dtype)
            torch.testing.assert_close(obj, ref_obj)
            torch.testing.assert_close(deltas, ref_deltas)
            assert counts == [f.shape[2] * f.shape[3] * 3 for f in fs]
        b, coder = len(kumar_tiles), model.rpn.box_coder
        with seg._autocast():
            deltas = _rpn_head_fn(model.rpn.head)(feats)[1].view(b, -1, 4)  # the bundled head's, as the fast path
        anchors = seg._anchors(batch_features.images, feats)
        full = coder.decode_single(deltas.reshape(-1, 4).float(), anchors.repeat(b, 1)).view(b, -1, 4)
        batch = torch.arange(b)[:, None]
        for k in (1, 21, 64, 1000):  # 3, 63, 192, 3000 boxes
            index = torch.randperm(anchors.shape[0], generator=torch.Generator().manual_seed(k))[:k].repeat(b, 1)
            assert torch.equal(pp.EncodedBoxes(deltas, anchors, coder).take(batch, index), full[batch, index])


def test_mask_logits_as_matrix_products_equal_the_predictor():
    """The fast path's mask logits (two matrix products, the instance's own class only) equal torchvision's
    MaskRCNNPredictor (transposed conv, ReLU, 1x1 conv, then indexed by class), for 2 and for 3 classes."""
    from wsiseg.segmenters.rcnn import _mask_logits_fn

    torch.manual_seed(0)
    for classes in (2, 3):
        pred = MaskRCNNPredictor(32, 24, classes).eval()
        with torch.no_grad():
            pred.conv5_mask.bias.normal_()
            pred.mask_fcn_logits.bias.normal_()
        x = torch.randn(30, 32, 14, 14)  # 5,880 pixel rows: two blocks of the one-class product
        labels = torch.randint(1, classes, (30,))
        with torch.no_grad():
            ref = pred(x)[torch.arange(30), labels]
            got = _mask_logits_fn(pred)(x, labels)
            if classes == 3:  # one class for all (the one-class product) and mixed classes
                assert len(set(labels.tolist())) == 2
                assert torch.allclose(_mask_logits_fn(pred)(x, labels * 0 + 2), pred(x)[:, 2], atol=1e-5)
        assert got.shape == ref.shape == (30, 28, 28)
        assert torch.allclose(got, ref, atol=1e-5)
        with torch.no_grad():  # a channels-last input (as the backbone's features are on the CPU) gives the same
            assert torch.allclose(_mask_logits_fn(pred)(x.contiguous(memory_format=torch.channels_last), labels),
                                  ref, atol=1e-5)
    other = torch.nn.Conv2d(32, 3, 1)  # not a MaskRCNNPredictor: called as is, then indexed by class
    x, labels = x[:20], labels[:20]
    with torch.no_grad():
        assert torch.equal(_mask_logits_fn(other)(x, labels), other(x)[torch.arange(20), labels])


def test_cpu_allocator_tuning_is_idempotent():
    from wsiseg.core.runtime import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    x = torch.ones(64, 1024, 1024)  # a large block after tuning: allocated, usable, freed
    assert float(x.sum()) == 64 * 1024 * 1024
    del x


def test_settled_imports_stay_frozen_through_a_slide_s_frozen_heap():
    """:func:`import_settled` (the command line's and the predicting process's) imports torch and torchvision with the
    collector paused, leaves it on and their objects frozen, once a process; a slide's :func:`frozen_heap` then
    keeps them frozen, where in a process that froze nothing it hands its heap back. A fresh interpreter, so that
    the test process's own collector is not touched."""
    code = """if True:
        import gc, sys
        from wsiseg.core.runtime import frozen_heap, import_settled
        assert "torch" not in sys.modules
        with frozen_heap():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0
        import_settled()
        n = gc.get_freeze_count()
        assert gc.isenabled() and "torchvision" in sys.modules and n > 100_000, n
        import_settled()
        with frozen_heap():
            x = [[] for _ in range(1000)]
        assert gc.get_freeze_count() == n and gc.isenabled()
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_an_image_much_smaller_than_the_model_s_tile_gets_a_tile_of_its_own_size(tmp_path, kumar_dir):
    """A 200 px H&E crop (at the model's resolution) is segmented in one 224 px tile (its side rounded up to 32), not
    in a 384 px tile that is mostly white: the same as asking for 224, through the API and ``segment_slide``, whose
    GeoJSON header says so; a 300 px crop (more than two thirds of 384) keeps the model's tile; a tile asked for is
    fitted the same way (asked for 2048 px, a 300 px image lost all its nuclei to the padding)."""
    import json

    import tifffile
    from PIL import Image

    from wsiseg.api import load_model, segment_image, segment_slide
    from wsiseg.wsi.grid import fitted_tile

    seg = load_model("default", "cpu")
    img = tifffile.imread(kumar_dir / "images" / "TCGA-18-5592-01Z-00-DX1.tif")[..., :3]
    small, larger = img[:200, :200], img[:300, :300]
    fitted = segment_image(small, seg, mpp=0.25)
    assert np.array_equal(fitted, segment_image(small, seg, mpp=0.25, tile_size=224)) and fitted.max() > 10
    assert np.array_equal(fitted, segment_image(small, seg, mpp=0.25, tile_size=384))
    assert np.array_equal(segment_image(larger, seg, mpp=0.25, tile_size=2048),
                          segment_image(larger, seg, mpp=0.25, tile_size=320))  # (300 rounded up to 32)
    assert np.array_equal(segment_image(larger, seg, mpp=0.25), segment_image(larger, seg, mpp=0.25, tile_size=384))
    assert fitted_tile(384, (200, 200), 0.25, 0.25) == 224 and fitted_tile(384, (256, 100), 0.25, 0.25) == 256
    assert fitted_tile(384, (257, 100), 0.25, 0.25) == 384 and fitted_tile(384, (400, 400), 0.5, 0.25) == 384
    assert fitted_tile(384, (100, 100), 0.5, 0.25) == 224  # (200 px at the model's 0.25 um)
    assert fitted_tile(384, (40, 40), 0.25, 0.25, overlap=64) == 128  # (at least twice an overlap asked for)
    png = tmp_path / "small.png"
    Image.fromarray(np.ascontiguousarray(small)).save(png)
    for asked, want in ((None, 224), (384, 224), (2048, 224), (128, 128)):
        out = tmp_path / f"{asked}.geojson"
        segment_slide(png, geojson=out, model=seg, mpp=0.25, tile_size=asked)
        assert json.loads(out.read_text())["wsiseg"]["tile_size"] == want


def test_a_checkpoint_s_tile_size_is_the_run_s_unless_asked(tmp_path, kumar_tiles):
    """A checkpoint that says its inference tile (``tile_size``, as the bundled ``default``'s 384) is run with that
    tile when none is asked for: its GeoJSON (header and outlines) is that of the same run with ``tile_size`` given;
    one asked for wins; a model without one gets 256. An overlap larger than half the model's tile is a one-line
    ConfigError."""
    from wsiseg.api import load_model, segment_slide
    from wsiseg.core.errors import ConfigError
    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.config import to_dict
    from wsiseg.segmenters.base import describe

    cv2 = pytest.importorskip("cv2")
    model, cfg = _pdam_lite(dets=30)
    plain, tiled = tmp_path / "plain.safetensors", tmp_path / "tiled.safetensors"
    save_checkpoint(plain, model, config=to_dict(cfg), mpp=0.25, inference_only=True)
    cfg.tile_size = 160
    save_checkpoint(tiled, model, config=to_dict(cfg), mpp=0.25, inference_only=True)
    assert (describe(load_model(str(plain), "cpu")).tile_size, describe(load_model(str(tiled), "cpu")).tile_size) \
        == (256, 160)
    img = tmp_path / "crop.png"
    cv2.imwrite(str(img), np.ascontiguousarray(np.tile(kumar_tiles[0], (2, 2, 1))[:, :, ::-1]))  # 512 px: seams
    runs = {}
    for name, model_file, tile in (("own", tiled, None), ("given", plain, 160), ("asked", tiled, 128),
                                   ("plain", plain, None)):
        out = tmp_path / f"{name}.geojson"
        segment_slide(img, geojson=out, model=str(model_file), mpp=0.25, tile_size=tile, use_tissue_mask=False,
                      device="cpu", uuid_seed=7)
        doc = json.loads(out.read_text())
        runs[name] = (doc["wsiseg"]["tile_size"], [f["geometry"] for f in doc["features"]])
    assert runs["own"] == runs["given"] and runs["own"][0] == 160
    assert runs["asked"][0] == 128 and runs["plain"][0] == 256
    with pytest.raises(ConfigError, match="half the tile size \\(80\\)"):
        segment_slide(img, geojson=tmp_path / "x.geojson", model=str(tiled), mpp=0.25, overlap=96,
                      use_tissue_mask=False, device="cpu")


def test_min_score_through_the_cli(tmp_path, kumar_tiles, capsys):
    """``wsiseg run --min-score``: a PDAM checkpoint keeps fewer nuclei at a higher threshold; the classical
    segmenter refuses it (and ``--tta``) with a one-line error; out-of-range values too; ``--tta`` runs."""
    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.cli import main
    from wsiseg.models.config import to_dict

    model, cfg = _pdam_lite(dets=30)
    ckpt = tmp_path / "lite.safetensors"
    save_checkpoint(ckpt, model, config=to_dict(cfg), mpp=0.25, inference_only=True)
    img = tmp_path / "crop.png"
    cv2 = pytest.importorskip("cv2")
    cv2.imwrite(str(img), np.ascontiguousarray(kumar_tiles[0, :, :, ::-1]))
    scores = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu").predict(kumar_tiles[:1])[0].scores
    cut = round(float(np.median(scores)), 6)  # keeps about half of them
    counts = {}
    for p in (None, cut):
        out = tmp_path / f"n{p}.geojson"
        extra = [] if p is None else ["--min-score", str(p)]
        assert main(["run", str(img), "--out", str(out), "--mpp", "0.25", "--model", str(ckpt), "--quiet", *extra]) == 0
        counts[p] = len(json.loads(out.read_text())["features"])
    assert 0 < counts[cut] < counts[None]
    out = tmp_path / "tta.geojson"  # --tta runs through the CLI and writes a valid file
    assert main(["run", str(img), "--out", str(out), "--mpp", "0.25", "--model", str(ckpt), "--quiet", "--tta",
                 "--semantic-fusion"]) == 0
    assert len(json.loads(out.read_text())["features"]) > 0
    out = tmp_path / "ens.geojson"  # --ensemble with a copy of the model finds what the model alone finds
    assert main(["run", str(img), "--out", str(out), "--mpp", "0.25", "--model", str(ckpt), "--quiet",
                 "--ensemble", str(ckpt)]) == 0
    assert len(json.loads(out.read_text())["features"]) == counts[None]
    capsys.readouterr()
    for args, words in ((["--model", "watershed", "--min-score", "0.5"], "PDAM models"),
                        (["--model", "watershed", "--tta"], "PDAM models"),
                        (["--model", "watershed", "--semantic-fusion"], "PDAM models"),
                        (["--model", "watershed", "--ensemble", str(ckpt)], "PDAM models"),
                        (["--model", "watershed", "--precision", "bf16"], "PDAM models"),
                        (["--model", str(ckpt), "--precision", "fp16", "--device", "cpu"], "CUDA"),
                        (["--model", str(ckpt), "--min-score", "1.5"], "0..1")):
        code = main(["run", str(img), "--out", str(tmp_path / "x.geojson"), "--mpp", "0.25", "--quiet", *args])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    code = main(["run", str(img), "--out", str(tmp_path / "x.geojson"), "--mpp", "0.25", "--quiet", "--model", str(ckpt),
                 "--ensemble", str(tmp_path / "no.safetensors")])
    err = capsys.readouterr().err
    assert code == 6 and "no such model file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.geojson").exists()


def test_bf16_on_the_cpu_finds_the_same_nuclei(kumar_tiles, tmp_path):
    """``--precision bf16`` (autocast on the CPU): the bundled model finds the same nuclei on real H&E tiles as in
    fp32, up to the rounding of bf16 (counts within 5%, matched masks IoU >= 0.8 for 95% of them), through the API
    and through ``wsiseg run`` (whose default, ``auto``, is bf16 on a CPU with native bf16), and a run in fp32 cannot
    resume one in bf16 (the journal records the precision)."""
    from wsiseg.api import bundled_weights, load_model, segment_slide, set_precision
    from wsiseg.cli import main
    from wsiseg.core.errors import ConfigError
    from wsiseg.segmenters.registry import native_bf16

    if bundled_weights() is None:
        pytest.skip("no bundled weights")
    seg = load_model("default", "cpu")
    ref = seg.predict(kumar_tiles[:4])
    set_precision(seg, "bf16")
    assert seg.amp == "bf16"
    got = seg.predict(kumar_tiles[:4])
    set_precision(seg, "fp32")
    assert seg.amp is None
    for r, g in zip(ref, got):
        assert abs(g.count - r.count) <= max(2, r.count // 20)
        ious = []
        for k in range(1, r.count + 1):
            m = r.labels == k
            hit = np.bincount(g.labels[m]).argmax() if m.any() else 0
            if hit:
                o = g.labels == hit
                ious.append((m & o).sum() / (m | o).sum())
            else:
                ious.append(0.0)
        assert np.mean(np.array(ious) >= 0.8) >= 0.95
    with pytest.raises(ConfigError, match="PDAM models"):
        set_precision(load_model("watershed"), "bf16")
    with pytest.raises(ConfigError, match="one of"):
        set_precision(seg, "fp8")
    set_precision(seg, "auto")  # (wsiseg run's default) bf16 where this CPU has it natively
    assert seg.amp == ("bf16" if native_bf16() else None)
    set_precision(seg, "fp32")
    cv2 = pytest.importorskip("cv2")
    img = tmp_path / "tile.png"
    cv2.imwrite(str(img), np.ascontiguousarray(np.concatenate(list(kumar_tiles[:2]), 1)[:, :, ::-1]))
    out = tmp_path / "bf16.geojson"
    assert main(["run", str(img), "--out", str(out), "--mpp", "0.25", "--quiet", "--precision", "bf16"]) == 0
    assert len(json.loads(out.read_text())["features"]) > 20
    assert json.loads(out.read_text())["wsiseg"]["precision"] == "bf16"  # (the header says so)
    auto = tmp_path / "auto.geojson"  # wsiseg run's default
    assert main(["run", str(img), "--out", str(auto), "--mpp", "0.25", "--quiet"]) == 0
    assert json.loads(auto.read_text())["wsiseg"].get("precision") == ("bf16" if native_bf16() else None)
    # an interrupted bf16 run cannot be resumed in fp32: the journal records the precision
    tall = tmp_path / "tall.png"
    cv2.imwrite(str(tall), np.ascontiguousarray(np.concatenate(list(kumar_tiles[:4]), 0)[:, :, ::-1]))
    with pytest.raises(KeyboardInterrupt):
        segment_slide(tall, geojson=tmp_path / "t.geojson", mpp=0.25, tile_size=128, use_tissue_mask=False,
                      precision="bf16", sink=interrupting_sink(calls=6))
    with pytest.raises(ConfigError, match="precision"):
        segment_slide(tall, geojson=tmp_path / "t.geojson", mpp=0.25, tile_size=128, use_tissue_mask=False,
                      resume=True)
    s = segment_slide(tall, geojson=tmp_path / "t.geojson", mpp=0.25, tile_size=128, use_tissue_mask=False,
                      resume=True, precision="bf16")
    assert s.nuclei > 20


def test_flip_boxes_mirror_pixels():
    """A blob's box in a mirrored image is flip_boxes of its box (pixel i of w goes to w - 1 - i), and flipping
    twice gives the box back."""
    img = np.zeros((40, 64), bool)
    img[5:12, 10:30] = True
    box = torch.tensor([[10.0, 5.0, 30.0, 12.0]])  # x0, y0, x1 (exclusive), y1
    for f in ((True, False), (False, True), (True, True)):
        m = img[::-1] if f[1] else img
        m = m[:, ::-1] if f[0] else m
        ys, xs = np.nonzero(m)
        want = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        assert torch.equal(pp.flip_boxes(box, f, (40, 64)), want)
        assert torch.equal(pp.flip_boxes(pp.flip_boxes(box, f, (40, 64)), f, (40, 64)), box)


def test_tta_views_map_boxes_and_masks_back():
    """For each of the 8 views of a square image: a box maps to the box of the same pixels in the viewed image,
    and back; the pixels cropped there, mapped back by unview_masks, are the original crop."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(64, 64, generator=g)
    box = torch.tensor([[9.0, 20.0, 30.0, 27.0]])  # x0, y0, x1, y1: a 21 x 7 asymmetric crop
    crop = img[20:27, 9:30]
    views = pp.tta_views(8)
    assert len(set(views)) == 8 and views[0] == (False, False, False)
    assert pp.tta_views(8, square=False) == pp.tta_views(4)
    for v in views:
        vb = pp.view_boxes(box, v, (64, 64))
        x0, y0, x1, y1 = vb[0].long().tolist()
        seen = pp.view_images(img, v)[y0:y1, x0:x1]
        assert torch.equal(pp.unview_masks(seen, v), crop), v
        assert torch.equal(pp.view_boxes(vb, v, (64, 64), inverse=True), box)


def test_test_time_augmentation(kumar_tiles):
    """TTA (heads averaged over the tile and its mirror images) gives valid tiles with about as many nuclei as
    without, mostly the same pixels (the bundled model on real H&E); it needs the fast path; set_tta refuses models
    without it."""
    from wsiseg.api import bundled_weights, set_min_score, set_semantic_fusion, set_tta
    from wsiseg.core.errors import ConfigError
    from wsiseg.segmenters.watershed import WatershedSegmenter

    if bundled_weights() is None:
        pytest.skip("no bundled weights in this installation")
    seg = PDAMSegmenter.from_checkpoint(bundled_weights(), device="cpu")
    set_min_score(seg, 0.5)
    plain = seg.predict(kumar_tiles)
    set_tta(seg)
    tta = seg.predict(kumar_tiles)
    assert all(p.count >= 10 for p in plain)
    model = seg.model
    set_tta(seg, 8)
    tta8 = seg.predict(kumar_tiles)
    set_tta(seg, 0)
    set_semantic_fusion(seg, True)  # the semantic branch's foreground averaged into every mask
    fused = seg.predict(kumar_tiles)
    for p, t in zip(plain * 3, tta + tta8 + fused):
        assert_valid(t)
        assert abs(t.count - p.count) <= max(3, p.count // 4)
        fg_p, fg_t = p.labels > 0, t.labels > 0
        assert (fg_p & fg_t).sum() >= 0.7 * max(fg_p.sum(), fg_t.sum())
    with pytest.raises(ValueError, match="fast path"):
        PDAMSegmenter(model, seg.mpp, seg.max_nucleus_px, device="cpu", fast=False, tta=True)
    with pytest.raises(ConfigError, match="--tta"):
        set_tta(WatershedSegmenter())
    with pytest.raises(ConfigError, match="--semantic-fusion"):
        set_semantic_fusion(WatershedSegmenter())
    with pytest.raises(ValueError, match="semantic branch"):
        PDAMSegmenter(random_maskrcnn(), 0.25, 40, device="cpu", semantic_fusion=True)  # plain Mask R-CNN
    with pytest.raises(ConfigError, match="4 or 8"):
        set_tta(seg, 3)


def test_an_ensemble_averages_its_models(kumar_tiles, tmp_path):
    """An ensemble (``members``): a model with an exact copy of itself predicts as the model alone (exactly without
    TTA; with TTA and semantic fusion up to the order of the float sums); with another model it predicts
    something else, valid tiles; members must match the model's scale, input and classes; ``set_ensemble`` sets
    the list (the same list twice adds nothing, an empty one drops them), refuses the watershed and missing files."""
    import copy

    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    from wsiseg.api import set_ensemble
    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.config import to_dict
    from wsiseg.core.errors import ConfigError, ModelError
    from wsiseg.segmenters.watershed import WatershedSegmenter

    model, cfg = _pdam_lite(dets=30)
    tiles = kumar_tiles[:2, :160, :160]
    for tta, fusion in ((0, False), (4, True)):
        alone = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", tta=tta, semantic_fusion=fusion)
        twin = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", tta=tta, semantic_fusion=fusion,
                             members=(copy.deepcopy(model),))
        assert twin.members == 1
        ref, got = alone.predict(tiles), twin.predict(tiles)
        if tta:
            assert_same_instances(got, ref)
        else:
            for a, b in zip(got, ref):
                np.testing.assert_array_equal(a.labels, b.labels)
                np.testing.assert_array_equal(a.scores, b.scores)
    torch.manual_seed(5)
    other, _ = _pdam_lite(dets=30)
    torch.manual_seed(5)  # (_pdam_lite seeds itself: perturb the copy instead)
    with torch.no_grad():
        for prm in other.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    pair = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", members=(other,)).predict(tiles)
    alone = PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu").predict(tiles)
    for p in pair:
        assert_valid(p)
    assert any(not np.array_equal(p.labels, a.labels) for p, a in zip(pair, alone))
    with pytest.raises(ValueError, match="normalise and resize"):  # torchvision's own transform
        PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", members=(random_maskrcnn(),))
    three = copy.deepcopy(model)
    three.roi_heads.box_predictor = FastRCNNPredictor(three.roi_heads.box_predictor.cls_score.in_features, 3)
    with pytest.raises(ValueError, match="classes"):
        PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", members=(three,))
    with pytest.raises(ValueError, match="fast path"):
        PDAMSegmenter(model, cfg.mpp, cfg.max_nucleus_px, device="cpu", fast=False, members=(other,))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(a, model, config=to_dict(cfg), mpp=cfg.mpp, inference_only=True)
    save_checkpoint(b, other, config=to_dict(cfg), mpp=cfg.mpp * 2, inference_only=True)  # another scale
    seg = PDAMSegmenter.from_checkpoint(a, device="cpu")
    set_ensemble(seg, [a, a])
    set_ensemble(seg, [a, a])
    assert seg.members == 2 and seg.settings()["members"] == [str(a), str(a)]
    set_ensemble(seg, [])
    assert seg.members == 0
    with pytest.raises(ConfigError, match="scale"):
        set_ensemble(seg, [b])
    assert seg.members == 0
    with pytest.raises(ModelError, match="no such model file"):
        set_ensemble(seg, [tmp_path / "missing.safetensors"])
    with pytest.raises(ConfigError, match="PDAM models"):
        set_ensemble(WatershedSegmenter(), [a])


def test_the_command_line_offers_the_precisions_the_api_takes():
    """``wsiseg run --precision`` lists its choices literally (the parser is built without importing the API, so
    ``--help`` stays quick): they must be ``api.PRECISIONS``, with the same default."""
    from wsiseg.api import PRECISIONS
    from wsiseg.cli import build_parser

    run = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
               if "--precision" in a.option_strings)
    assert tuple(run.choices) == PRECISIONS and run.default == PRECISIONS[0]


def test_the_bundled_vesicular_model_is_an_ensemble_partner(kumar_tiles, tmp_path, capsys):
    """The second bundled model (``vesicular``) loads by name, joins the default as ``--ensemble vesicular`` (the
    member resolved to its bundled file), and the ensemble differs from the default alone on real H&E tiles, with
    valid instances; names that are not bundled PDAM models are one-line errors."""
    import cv2

    from wsiseg.api import bundled_weights, load_model, set_ensemble
    from wsiseg.cli import main
    from wsiseg.core.errors import ConfigError

    if bundled_weights() is None or bundled_weights("vesicular") is None:
        pytest.skip("no bundled weights")
    with pytest.raises(ValueError, match="no bundled model"):
        bundled_weights("nope")
    ves = load_model("vesicular", "cpu")
    assert ves.mpp == load_model("default", "cpu").mpp and ves.source == str(bundled_weights("vesicular"))
    seg = load_model("default", "cpu")
    alone = seg.predict(kumar_tiles[:2])
    set_ensemble(seg, ["vesicular"])
    assert seg.member_sources == [str(bundled_weights("vesicular"))] and seg.settings()["members"] == seg.member_sources
    pair = seg.predict(kumar_tiles[:2])
    for p in pair:
        assert_valid(p)
    assert any(not np.array_equal(p.labels, a.labels) for p, a in zip(pair, alone))
    with pytest.raises(ConfigError, match="watershed"):
        set_ensemble(seg, ["watershed"])
    img = tmp_path / "crop.png"
    cv2.imwrite(str(img), np.ascontiguousarray(kumar_tiles[0, :, :, ::-1]))
    out = tmp_path / "pair.geojson"
    assert main(["run", str(img), "--out", str(out), "--mpp", "0.25", "--quiet", "--ensemble", "vesicular"]) == 0
    assert len(json.loads(out.read_text())["features"]) > 0
    capsys.readouterr()
    assert main(["run", str(img), "--out", str(tmp_path / "x.geojson"), "--mpp", "0.25", "--quiet",
                 "--ensemble", "watershed"]) == 2
    err = capsys.readouterr().err
    assert "watershed" in err and len(err.strip().splitlines()) == 1


def test_cpu_bfloat16_modules_give_the_plain_modules_values(kumar_tiles):
    """On the CPU under bfloat16 the segmenter's ReLUs zero negatives through their int16 view, its GroupNorms
    normalise small channels-last maps in float32, the ResNet stem's max pooling takes its windows' maxima over rows
    then columns, and its convolutions keep their weights converted (``_SignReLU``, ``_SmallMapGroupNorm``,
    ``_PoolAfterReLU``, ``_CastOnceConv2d``): the backbone's features and the instances are exactly those of the
    plain modules, on the bundled model and real H&E tiles. Each module alone equals its plain twin (negative zeros,
    channels-last or not; an odd map and a map needing gradients go through the plain module; a weight changed in
    place is converted again)."""
    import torch.nn.functional as F

    from wsiseg.api import bundled_weights
    from wsiseg.segmenters.rcnn import _CastOnceConv2d, _PoolAfterReLU, _SignReLU, _SmallMapGroupNorm

    if bundled_weights() is None:
        pytest.skip("no bundled weights in this installation")
    seg = PDAMSegmenter.from_checkpoint(bundled_weights(), device="cpu", amp="bf16")
    kinds = {}
    for m in seg.model.modules():
        kinds[type(m)] = kinds.get(type(m), 0) + 1
    assert kinds.get(_PoolAfterReLU) == 1 and min(kinds.get(k, 0) for k in (_SignReLU, _SmallMapGroupNorm,
                                                                            _CastOnceConv2d)) > 10
    assert not {torch.nn.ReLU, torch.nn.GroupNorm, torch.nn.MaxPool2d, torch.nn.Conv2d} & kinds.keys()

    def run():
        with torch.inference_mode():
            return [f.clone() for f in seg._features(kumar_tiles).feats[0].values()], seg.predict(kumar_tiles)

    feats, insts = run()
    plain = {_SignReLU: torch.nn.ReLU, _SmallMapGroupNorm: torch.nn.GroupNorm, _PoolAfterReLU: torch.nn.MaxPool2d,
             _CastOnceConv2d: torch.nn.Conv2d}
    for m in seg.model.modules():
        m.__class__ = plain.get(type(m), type(m))
    ref_feats, ref_insts = run()
    assert all(torch.equal(a, b) for a, b in zip(feats, ref_feats))
    assert sum(len(t.scores) for t in insts) > 20
    for a, b in zip(insts, ref_insts):
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.scores, b.scores)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 32, 32, generator=g).to(torch.bfloat16)
    x[0, 0, :3] = -0.0
    pool = torch.nn.MaxPool2d(3, 2, 1)
    pool.__class__ = _PoolAfterReLU
    relu = torch.nn.ReLU(inplace=True)
    relu.__class__ = _SignReLU
    gn = torch.nn.GroupNorm(32, 64)
    with torch.no_grad():
        gn.weight.normal_(generator=g)
        gn.bias.normal_(generator=g)
    small = copy.deepcopy(gn)
    small.__class__ = _SmallMapGroupNorm
    with torch.inference_mode():
        for t in (x, x.contiguous(memory_format=torch.channels_last), x[..., :31]):
            r = relu(t.clone())
            assert torch.equal(r, F.relu(t)) and not (r.view(torch.int16) < 0).any()
            assert torch.equal(pool(r), F.max_pool2d(r, 3, 2, 1))
        for hw in (4, 8, 16, 32):
            t = (torch.randn(4, 64, hw, hw, generator=g) * 3 + 1).to(torch.bfloat16)
            t = t.contiguous(memory_format=torch.channels_last)
            assert torch.equal(small(t), gn(t))
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    once = copy.deepcopy(conv)
    once.__class__ = _CastOnceConv2d
    for t in (x.float(), x.float().contiguous(memory_format=torch.channels_last)):
        for _ in range(2):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(once(t), conv(t))
            with torch.no_grad():
                conv.weight.mul_(0.5)
                once.weight.mul_(0.5)
    y = torch.randn(1, 64, 8, 8, generator=g).to(torch.bfloat16).requires_grad_()
    relu(y.clone()).float().sum().backward()  # (outside inference mode: the plain ReLU, gradients and all)
    assert torch.equal(y.grad, (y > 0).to(torch.bfloat16))
