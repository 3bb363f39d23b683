"""Merged nuclei on the Kumar development set: how many, what splitting them perfectly would buy, and whether
label-free rules can split them.

``python scripts/merge_dev.py [--model default] [--split dev]`` segments each image (``wsiseg.api.segment_image``, as
``benchmarks/kumar.py`` does) and reports, paired per image against the prediction as it is:

- **merges**: detections that hold at least half of each of two or more true nuclei, and the nuclei they hold;
- **oracle split**: every merge cut between the nuclei it holds (each of its pixels to the nearest of them). It reads
  the labels, so it is an upper bound on what any split rule can buy, not a method;
- **shape split**: a merge seen as a non-convex blob: each detection whose solidity is below S is cut by a
  watershed of its distance transform from its h-maxima (parts of fewer than 20 px refused);
- **stain split** (``--stain H``): a merge seen as two dark nuclei: each detection cut by a watershed of its
  haematoxylin (``skimage.color.rgb2hed``, Gaussian-smoothed by ``--stain-sigma``; plus ``--stain-distance`` times
  the distance to its edge) from the h-maxima of height H inside it (2-4 of them; parts of fewer than
  ``--stain-min-area`` px refused);
- **model's parts** (``--parts``, slower): does the model itself propose the parts? Its detections down to score C
  are kept through its own NMS; a detection above the threshold that holds two or more of them (each at least 80%
  inside it, at most 75% of its area, overlapping each other by under 20%, together covering V of it) is replaced by
  them. Run on each whole image through torchvision's forward (``stock_predict``), baseline likewise;
- **zoomed parts** (``--zoom MPP``): the same question of the image shown larger (segmented as if its pixels were
  MPP um, e.g. 0.3 for 1.2x): a detection holding two or more of the zoomed view's nuclei (each at least 80% inside
  it, at most 75% of its area, together covering at least 80% of it) is cut between them (each pixel to the nearest).

Use the development split (the 16 train images' labels) for choosing; the test split is for a shipped model's report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kumar.py: the image lists

from kumar import DEFAULT_DATA, dev_images, test_images  # noqa: E402

MEASURES = ("aji", "object_f1", "object_precision", "object_recall")


def merges(pred: np.ndarray, truth: np.ndarray) -> dict[int, list[int]]:
    """``{prediction id: [true ids it holds at least half of]}`` for the predictions holding two or more."""
    both = (pred > 0) & (truth > 0)
    base = int(truth.max()) + 1
    codes, inter = np.unique(pred[both].astype(np.int64) * base + truth[both], return_counts=True)
    j, i = codes // base, codes % base
    keep = 2 * inter >= np.bincount(truth.ravel())[i]  # pairs (j, i) where j holds at least half of nucleus i
    out: dict[int, list[int]] = {}
    for jj, ii in zip(j[keep].tolist(), i[keep].tolist()):
        out.setdefault(jj, []).append(ii)
    return {jj: held for jj, held in out.items() if len(held) >= 2}


def oracle_split(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each merge's pixels given to the nearest true nucleus it holds (reads the labels: an upper bound)."""
    out = pred.copy()
    nxt = int(pred.max()) + 1
    for j, held in merges(pred, truth).items():
        m = pred == j
        _, (iy, ix) = ndi.distance_transform_edt(~np.isin(truth, held), return_indices=True)
        nearest = truth[iy, ix]
        for i in held[1:]:
            out[m & (nearest == i)] = nxt
            nxt += 1
    return out


def shape_split(pred: np.ndarray, solidity: float, h: float = 2.0, min_area: int = 20) -> np.ndarray:
    """Detections of solidity below ``solidity`` cut by a distance-transform watershed from their h-maxima."""
    from skimage.measure import regionprops
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    out = pred.copy()
    nxt = int(pred.max()) + 1
    for rp in regionprops(pred):
        if rp.solidity >= solidity:
            continue
        m = np.pad(rp.image, 1)
        d = ndi.distance_transform_edt(m)
        markers, n = ndi.label(h_maxima(d, h) & m)
        if n < 2:
            continue
        parts = watershed(-d, markers, mask=m)[1:-1, 1:-1]
        if np.bincount(parts.ravel())[1:].min() >= min_area:
            nxt = cut_into(out, rp, parts, nxt)
    return out


def cut_into(out: np.ndarray, rp, parts: np.ndarray, nxt: int) -> int:
    """Detection ``rp`` of ``out`` cut into ``parts`` (labels 1..n over its box): part 1 keeps its id, the others
    take ``nxt``, ``nxt + 1``...; returns the next free id."""
    y0, x0, y1, x1 = rp.bbox
    window = out[y0:y1, x0:x1]
    window[rp.image] = np.where(parts[rp.image] == 1, rp.label, nxt + parts[rp.image] - 2)
    return nxt + int(parts.max()) - 1


def stain_split(pred: np.ndarray, stain: np.ndarray, h: float, distance: float = 0.0,
                min_area: int = 25) -> tuple[np.ndarray, list[int]]:
    """(labels, the ids cut): each detection cut by a watershed of ``stain + distance * edge distance`` from the
    h-maxima of height ``h`` inside it, when it holds 2-4 of them and every part has ``min_area`` px."""
    from skimage.measure import regionprops
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    out = pred.copy()
    nxt, cut = int(pred.max()) + 1, []
    for rp in regionprops(pred):
        y0, x0, y1, x1 = rp.bbox
        m = np.pad(rp.image, 1)
        f = np.pad(stain[y0:y1, x0:x1], 1) + distance * ndi.distance_transform_edt(m)
        f = np.where(m, f, f[m].min() - 1)
        markers, n = ndi.label(h_maxima(f, h) & m)
        if not 2 <= n <= 4:
            continue
        parts = watershed(-f, markers, mask=m)[1:-1, 1:-1]
        if np.bincount(parts.ravel())[1:].min() >= min_area:
            nxt = cut_into(out, rp, parts, nxt)
            cut.append(rp.label)
    return out, cut


def zoomed_split(pred: np.ndarray, zoomed: np.ndarray, cover: float = 0.8) -> np.ndarray:
    """Detections cut between the zoomed view's nuclei they hold (:data:`__doc__`, ``--zoom``)."""
    from skimage.measure import regionprops

    out = pred.copy()
    nxt = int(pred.max()) + 1
    z_area = np.bincount(zoomed.ravel())
    for rp in regionprops(pred):
        y0, x0, y1, x1 = rp.bbox
        m, zw = rp.image, zoomed[y0:y1, x0:x1]
        ids, counts = np.unique(zw[m], return_counts=True)
        kids = [i for i, c in zip(ids, counts) if i and c >= 0.8 * z_area[i] and z_area[i] <= 0.75 * rp.area]
        covered = np.isin(zw, kids) & m
        if len(kids) < 2 or covered.sum() < cover * rp.area:
            continue
        _, (iy, ix) = ndi.distance_transform_edt(~covered, return_indices=True)
        nearest = zw[iy, ix]
        window = out[y0:y1, x0:x1]
        for k, i in enumerate(kids[1:]):
            window[m & (nearest == i)] = nxt + k
        nxt += len(kids) - 1
    return out


def candidates(seg, image: np.ndarray, min_score: float) -> dict:
    """The model's detections down to ``min_score`` on the whole image (its own NMS), as boolean masks. The model's
    proposal and detection limits are widened for the call and restored after it."""
    import torch

    from wsiseg.segmenters import postprocess as pp

    m = seg.model
    rpn, heads = m.rpn, m.roi_heads
    saved = (dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), heads.detections_per_img, heads.score_thresh)
    rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = 8000, 4000
    heads.detections_per_img, heads.score_thresh = 4000, min_score
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
    try:
        with torch.inference_mode():
            d = pp.stock_predict(m, [x])[0]
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n, heads.detections_per_img, heads.score_thresh = saved
    return {"scores": d["scores"].numpy(), "boxes": d["boxes"].numpy(),
            "masks": (d["masks"][:, 0] > seg.mask_threshold).numpy()}


def paint(masks: np.ndarray, order, max_cover: float) -> np.ndarray:
    """Masks painted in ``order`` with the predictor's overlap rule (``resolve_overlaps_reference``)."""
    from wsiseg.segmenters.postprocess import resolve_overlaps_reference

    order = list(order)
    return resolve_overlaps_reference(masks[order], np.zeros(len(order), np.float32), max_cover)[0]


def parts_rule(c: dict, threshold: float, cover: float, max_cover: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(baseline labels, labels with the parts rule, detections replaced) from :func:`candidates`' output."""
    s, boxes, masks = c["scores"], c["boxes"], c["masks"]
    area = masks.sum((1, 2))
    by_score = np.argsort(-s, kind="stable")
    top = [k for k in by_score if s[k] >= threshold]
    replaced, added = set(), []
    for p in top:
        x0, y0, x1, y1 = boxes[p]
        near = [k for k in by_score if k != p and area[k] and area[k] <= 0.75 * area[p] and boxes[k][0] < x1
                and boxes[k][2] > x0 and boxes[k][1] < y1 and boxes[k][3] > y0]
        if len(near) < 2:
            continue
        # every test on the parent's box (a part lies at least 80% inside the parent, so little is left out)
        win = np.s_[int(y0):int(np.ceil(y1)) + 1, int(x0):int(np.ceil(x1)) + 1]
        mp, kids = masks[p][win], []
        for k in near:
            mk = masks[k][win]
            if (mk & mp).sum() >= 0.8 * area[k] and all(
                    (mk & masks[o][win]).sum() <= 0.2 * min(area[k], area[o]) for o in kids):
                kids.append(k)
        if len(kids) >= 2 and (np.any(masks[kids][(slice(None), *win)], 0) & mp).sum() >= cover * area[p]:
            replaced.add(p)
            added.extend(kids)
    order = sorted((set(top) - replaced) | set(added), key=lambda k: -s[k])
    return paint(masks, top, max_cover), paint(masks, order, max_cover), len(replaced)


def describe(preds: list[np.ndarray], found: list[dict[int, list[int]]]) -> None:
    """What tells the merges from the other detections, label-free: their solidity and their area."""
    from skimage.measure import regionprops

    rows = []  # (is a merge, solidity, area / the image's median detection area)
    for p, f in zip(preds, found):
        props = regionprops(p)
        median = np.median([r.area for r in props])
        rows += [(r.label in f, r.solidity, r.area / median) for r in props]
    a = np.array(rows, float)
    m = a[:, 0] > 0
    big = a[:, 2] > 2
    print(f"median solidity: merges {np.median(a[m, 1]):.3f}, the others {np.median(a[~m, 1]):.3f}; detections over "
          f"twice their image's median area: {int(big.sum())}, of which {m[big].mean():.0%} merges "
          f"({m[big].sum() / max(m.sum(), 1):.0%} of the merges)")


def report(name: str, base: list[dict], rows: list[dict]) -> None:
    cells = []
    for m in MEASURES:
        d = np.array([r[m] - b[m] for r, b in zip(rows, base)])
        se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
        mean = np.mean([r[m] for r in rows])
        cells.append(f"{m} {mean:.4f} ({d.mean():+.4f} +- {se:.4f}, {int((d > 0).sum())}/{d.size})")
    print(f"{name:34s} " + "  ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--solidity", type=float, nargs="*", default=[0.9, 1.0], help="shape split: solidity bounds")
    ap.add_argument("--zoom", type=float, nargs="*", default=[], metavar="MPP",
                    help="zoomed parts: the um/px to show the images at (e.g. 0.3: 1.2x larger)")
    ap.add_argument("--stain", type=float, nargs="*", default=[], metavar="H",
                    help="stain split: h-maxima heights of the smoothed haematoxylin to try (e.g. 0.005 0.01 0.02)")
    ap.add_argument("--stain-sigma", type=float, default=1.5, help="stain split: Gaussian sigma, px")
    ap.add_argument("--stain-distance", type=float, default=0.0, help="stain split: weight of the edge distance")
    ap.add_argument("--stain-min-area", type=int, default=25, help="stain split: smallest part, px")
    ap.add_argument("--parts", type=float, nargs="*", default=[], metavar="C",
                    help="model's parts: lowest part scores to try (e.g. 0.3 0.5 0.7; slower)")
    args = ap.parse_args(argv)
    if not (args.data / "split.csv").is_file():
        print(f"error: {args.data}: no Kumar split.csv here", file=sys.stderr)
        return 2
    import tifffile
    from skimage import io

    from wsiseg.api import segment_image
    from wsiseg.eval.metrics import evaluate_pair
    from wsiseg.segmenters.registry import load_model

    ids = dev_images(args.data) if args.split == "dev" else [i for i, _ in test_images(args.data)]
    seg = load_model(args.model, "cpu")
    images, truths, preds = [], [], []
    for n, i in enumerate(ids, 1):
        images.append(tifffile.imread(args.data / "images" / f"{i}.tif")[..., :3])
        truths.append(io.imread(args.data / "labels" / f"{i}.png").astype(np.int64))
        preds.append(np.asarray(segment_image(images[-1], model=seg, mpp=0.25)).astype(np.int64))
        print(f"[{n}/{len(ids)}] {i}", file=sys.stderr, flush=True)
    found = [merges(p, t) for p, t in zip(preds, truths)]
    n_pred = sum(np.unique(p).size - 1 for p in preds)
    print(f"merges: {sum(map(len, found))} of {n_pred} detections hold at least half of two or more true nuclei "
          f"({sum(len(h) for f in found for h in f.values())} nuclei)")
    describe(preds, found)
    base = [evaluate_pair(p, t) for p, t in zip(preds, truths)]
    report("as predicted", base, base)
    pairs = list(zip(preds, truths))
    report("oracle split (reads the labels)", base, [evaluate_pair(oracle_split(p, t), t) for p, t in pairs])
    for s in args.solidity:
        report(f"shape split, solidity < {s}", base, [evaluate_pair(shape_split(p, s), t) for p, t in pairs])
    if args.stain:
        from skimage.color import rgb2hed

        stains = [ndi.gaussian_filter(rgb2hed(image)[..., 0], args.stain_sigma) for image in images]
    for h in args.stain:
        rows, n_cut, n_hit = [], 0, 0
        for (p, t), st, f in zip(pairs, stains, found):
            cut_labels, cut = stain_split(p, st, h, args.stain_distance, args.stain_min_area)
            rows.append(evaluate_pair(cut_labels, t))
            n_cut, n_hit = n_cut + len(cut), n_hit + len(set(cut) & set(f))
        report(f"stain split h {h} ({n_cut} cut, {n_hit} merges)", base, rows)
    for mpp in args.zoom:
        zoomed = [np.asarray(segment_image(image, model=seg, mpp=mpp)).astype(np.int64) for image in images]
        print(f"the view at {mpp} um/px alone: {sum(np.unique(z).size - 1 for z in zoomed)} detections, "
              f"{sum(len(merges(z, t)) for z, t in zip(zoomed, truths))} merges")
        report(f"zoomed parts at {mpp} um/px", base,
               [evaluate_pair(zoomed_split(p, z), t) for (p, t), z in zip(pairs, zoomed)])
    if args.parts:
        threshold, max_cover = seg.min_score, seg.max_cover
        for c in args.parts:
            b, r, n_rep = [], [], 0
            for image, t in zip(images, truths):
                lb, lr, k = parts_rule(candidates(seg, image, c), threshold, 0.6, max_cover)
                b.append(evaluate_pair(lb, t))
                r.append(evaluate_pair(lr, t))
                n_rep += k
            report(f"model's parts >= {c} ({n_rep} replaced)", b, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
