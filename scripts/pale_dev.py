"""Pale detections on the Kumar development set: are they true nuclei, and which rule tells the false ones apart?

``python scripts/pale_dev.py [--model default] [--geojson SAMPLE.geojson]`` segments each of the 16 development
images (``wsiseg.api.segment_image``, as ``benchmarks/kumar.py`` does) and reports

- the absolute rule of the whole-slide benchmark's ``pale`` column (mean haematoxylin below
  ``wsiseg.eval.background.PALE_HEMATOXYLIN``): how many detections it flags and how many of them match a true
  nucleus (IoU > 0.5), against the other detections;
- the slide-relative rule of ``pseudo.drop_pale`` (mean haematoxylin below a factor times the image's median), for
  each factor: detections flagged and how many are true;
- with ``--geojson`` (a ``wsiseg run`` output, e.g. of the bundled sample): how many of its detections each rule
  flags, from the ``Hematoxylin: Mean`` the GeoJSON carries;
- with ``--gaps``: whether the model outlines the synthetic gaps of ``train.gaps`` (``wsiseg.train.negatives.gaps``,
  20-30 cut into the first 512 x 512 px of each image, seeded by its index): gaps, and gaps of which a detection has
  more than half its pixels.

The development labels are read for choosing a rule, never for training. docs/precision.md quotes its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kumar import DEFAULT_DATA, dev_images  # noqa: E402

FACTORS = (0.15, 0.2, 0.25, 0.3, 0.4)


def best_iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each prediction id's (1..pred.max()) highest IoU with a true nucleus, from one ``np.unique`` of the pairs.
    (``wsiseg.eval.metrics.overlap_table`` renumbers the instances, and the haematoxylin means are per original id.)"""
    n_p, n_t = int(pred.max()), int(truth.max())
    code = pred.ravel().astype(np.int64) * (n_t + 1) + truth.ravel()
    pairs, inter = np.unique(code, return_counts=True)
    p, t = pairs // (n_t + 1), pairs % (n_t + 1)
    area_p = np.bincount(pred.ravel(), minlength=n_p + 1)
    area_t = np.bincount(truth.ravel(), minlength=n_t + 1)
    both = (p > 0) & (t > 0)
    iou = inter[both] / (area_p[p[both]] + area_t[t[both]] - inter[both])
    best = np.zeros(n_p + 1)
    np.maximum.at(best, p[both], iou)
    return best[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model name or checkpoint (wsiseg.api.segment_image)")
    ap.add_argument("--geojson", type=Path, default=None, help="a wsiseg run GeoJSON to count the rules on")
    ap.add_argument("--gaps", action="store_true", help="also count the synthetic gaps the model outlines")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args(argv)
    if not (args.data / "split.csv").is_file():
        print(f"error: {args.data}: no Kumar split.csv here", file=sys.stderr)
        return 3
    import tifffile
    from skimage import io
    from skimage.segmentation import relabel_sequential

    from wsiseg.api import load_model, segment_image
    from wsiseg.eval.background import PALE_HEMATOXYLIN, on_white
    from wsiseg.wsi.stains import stain_stats

    model = load_model(args.model, "cpu")
    rows = []  # (image, mean haematoxylin, best IoU, on white)
    ids = dev_images(args.data)
    for k, image_id in enumerate(ids):
        print(f"[{k + 1}/{len(ids)}] {image_id}", file=sys.stderr)
        image = tifffile.imread(args.data / "images" / f"{image_id}.tif")[..., :3]
        pred = relabel_sequential(np.asarray(segment_image(image, model=model, mpp=0.25, device="cpu")))[0]
        truth = relabel_sequential(io.imread(args.data / "labels" / f"{image_id}.png"))[0]
        h = stain_stats(image, pred, int(pred.max()))[:, 0]
        rows += zip([k] * len(h), h, best_iou(pred, truth), on_white(image, pred)[1:])
    img, h, iou, white = (np.array(c) for c in zip(*rows))
    true = iou > 0.5
    pale = (h < PALE_HEMATOXYLIN) & ~white
    print(f"{args.model} on the {len(ids)} development images: {len(h)} detections, {true.mean():.1%} true")
    print(f"absolute rule (< {PALE_HEMATOXYLIN}): {pale.sum()} flagged, {true[pale].mean():.1%} of them true "
          f"(the others {true[~pale].mean():.1%})")
    median = np.array([np.median(h[img == i]) for i in range(len(ids))])[img]
    sample = None
    if args.geojson:
        feats = json.loads(args.geojson.read_text())["features"]
        sample = np.array([f["properties"]["measurements"]["Hematoxylin: Mean"] for f in feats])
        print(f"{args.geojson.name}: {len(sample)} detections, {(sample < PALE_HEMATOXYLIN).sum()} under "
              f"{PALE_HEMATOXYLIN} (white ones included)")
    print("relative rule: factor | development flagged | of them true | GeoJSON flagged")
    for f in FACTORS:
        flag = h < f * median
        there = f"{(sample < f * np.median(sample)).sum()}" if sample is not None else "-"
        print(f"  {f:.2f} | {flag.sum()} | {true[flag].sum()} | {there}")
    if args.gaps:
        print(f"synthetic gaps outlined: {outlined_gaps(model, args.data, ids)}")
    return 0


def outlined_gaps(model, data: Path, ids: list[str]) -> str:
    """``"N of M"``: of M synthetic gaps (connected changes of at least 30 px) cut into the images' first 512 px,
    N hold more than half of a detection's pixels."""
    import tifffile
    from skimage import io
    from skimage.measure import label as components

    from wsiseg.api import segment_image
    from wsiseg.train.negatives import gaps

    hit = total = 0
    for k, image_id in enumerate(ids):
        image = tifffile.imread(data / "images" / f"{image_id}.tif")[:512, :512, :3]
        truth = io.imread(data / "labels" / f"{image_id}.png")[:512, :512].astype(np.int32)
        cut, _ = gaps(np.random.default_rng(k), image, truth, count=(20, 30))
        comp = components(np.abs(cut.astype(int) - image.astype(int)).sum(2) > 60)
        pred = np.asarray(segment_image(cut, model=model, mpp=0.25, device="cpu"))
        area = np.bincount(pred.ravel())
        for r in range(1, int(comp.max()) + 1):
            inside = pred[comp == r]
            if inside.size < 30:
                continue
            total += 1
            ids_in, n = np.unique(inside[inside > 0], return_counts=True)
            hit += bool((n > 0.5 * area[ids_in]).any())
    return f"{hit} of {total}"


if __name__ == "__main__":
    raise SystemExit(main())
