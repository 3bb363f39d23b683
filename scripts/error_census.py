"""Where a model's object errors are on the Kumar images: a census of unmatched detections and nuclei.

``python scripts/error_census.py --model default [--split dev|test] [--min-score S]`` segments each image (through
``wsiseg.api.segment_image``, as ``benchmarks/kumar.py`` does) and sorts every detection and every true nucleus,
pooled over the images, by its best IoU with the other side (a match is IoU > 0.5, as in ``wsiseg.eval.metrics``):

- detections: matched; *near* (best IoU 0.3-0.5); *merge* (IoU <= 0.3, covering > 20% of two or more nuclei);
  *fragment* (IoU <= 0.3, more than half inside labelled nuclei); *off* (mostly off any labelled nucleus);
- true nuclei: matched; *near*; *split* (two or more detections each hold > 20% of it); *swallowed* (more than half
  covered, by one detection much larger than it); *missed*;
- matched and near pairs by the true nucleus' area: share matched and the median area ratio (detection / truth);
- AJI's union in parts (pooled pixels, :func:`wsiseg.eval.metrics.aji_parts`): the matched pairs' intersections and the
  rest of their unions, the area of merged detections counted again for each extra nucleus they are the best match of,
  missed nuclei, unused detections; and the per-image mean AJI with merged detections counted once.

Use the development split (the 16 train images' labels) for choosing; the test split is for a shipped model's report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kumar.py: the image lists

from kumar import dev_images, test_images  # noqa: E402

from wsiseg.eval.metrics import (  # noqa: E402
    OverlapTable, aji_parts, best_pair, overlap_table, scores_from_table)

SIZE_BINS = (0, 100, 200, 400, 800, None)


def census(t: OverlapTable) -> tuple[dict[str, int], list[tuple[float, float, float]]]:
    """Counts of each kind (see the module doc) and, for each detection, (best IoU, its area, that nucleus' area;
    0 where it overlaps none), from the overlap table the scores come from (ties: the first nucleus in raster
    order)."""
    counts = {k: 0 for k in ("detections", "matched", "near", "merge", "fragment", "off",
                             "nuclei", "n_matched", "n_near", "split", "swallowed", "missed")}
    counts["detections"], counts["nuclei"] = t.n_pred, t.n_true
    if t.n_pred == 0 or t.n_true == 0:
        counts["off"], counts["missed"] = t.n_pred, t.n_true
        return counts, []
    pp, pt, inter, iou = t.pair_pred, t.pair_true, t.pair_inter, t.pair_iou
    pa, ta = t.pred_area.astype(float), t.true_area.astype(float)

    def per(index: np.ndarray, n: int, weights: np.ndarray) -> np.ndarray:  # sums over each id's pairs, ids 1..n
        return np.bincount(index, weights=weights, minlength=n + 1)[1:]

    best_p, best_t = np.zeros(t.n_pred + 1), np.zeros(t.n_true + 1)
    np.maximum.at(best_p, pp, iou)
    np.maximum.at(best_t, pt, iou)
    best_p, best_t = best_p[1:], best_t[1:]
    many_true = per(pp, t.n_pred, inter / ta[pt] > 0.2) >= 2
    inside = per(pp, t.n_pred, inter) / pa[1:] > 0.5
    low = best_p <= 0.3
    counts["matched"] = int((best_p > 0.5).sum())
    counts["near"] = int(((best_p > 0.3) & (best_p <= 0.5)).sum())
    counts["merge"] = int((low & many_true).sum())
    counts["fragment"] = int((low & ~many_true & inside).sum())
    counts["off"] = int((low & ~many_true & ~inside).sum())
    many_pred = per(pt, t.n_true, inter / pa[pp] > 0.2) >= 2
    covered = per(pt, t.n_true, inter) / ta[1:] > 0.5
    lowt = best_t <= 0.3
    counts["n_matched"] = int((best_t > 0.5).sum())
    counts["n_near"] = int(((best_t > 0.3) & (best_t <= 0.5)).sum())
    counts["split"] = int((lowt & many_pred).sum())
    counts["swallowed"] = int((lowt & ~many_pred & covered).sum())
    counts["missed"] = int((lowt & ~many_pred & ~covered).sum())
    nucleus = np.zeros(t.n_pred + 1, dtype=np.int64)  # each detection's nucleus of highest IoU (0: none)
    best = best_pair(pp, iou, pt)
    nucleus[pp[best]] = pt[best]
    area = np.where(nucleus > 0, ta[nucleus], 0.0)[1:]
    pairs = [(float(b), float(a), float(n)) for b, a, n in zip(best_p, pa[1:], area)]
    return counts, pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model name or checkpoint (wsiseg.api.segment_image)")
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--min-score", type=float, default=None, help="PDAM checkpoints: score threshold (default: its own)")
    ap.add_argument("--set", nargs="*", default=[], metavar="ATTR=VALUE",
                    help="post-processing settings of the loaded segmenter, e.g. mask_threshold=0.6, max_cover=0.9, "
                         "model.roi_heads.nms_thresh=0.4")
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "kumar")
    args = ap.parse_args(argv)
    if not (args.data / "split.csv").is_file():
        print(f"error: {args.data}: no Kumar split.csv here", file=sys.stderr)
        return 3
    import tifffile
    from skimage import io

    from wsiseg.api import load_model, segment_image, set_min_score

    model = load_model(args.model, "cpu")
    if args.min_score is not None:
        set_min_score(model, args.min_score)
    for item in args.set:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        owner = model
        for part in path:
            owner = getattr(owner, part)
        if not hasattr(owner, last):
            print(f"error: --set {item}: the segmenter has no {key}", file=sys.stderr)
            return 2
        setattr(owner, last, float(value))
    ids = [i for i, _ in test_images(args.data)] if args.split == "test" else dev_images(args.data)
    total: dict[str, int] = {}
    pairs: list[tuple[float, float, float]] = []
    scores: list[dict] = []
    parts: list[dict[str, float]] = []
    for k, image_id in enumerate(ids, 1):
        print(f"[{k}/{len(ids)}] {image_id}", file=sys.stderr)
        image = tifffile.imread(args.data / "images" / f"{image_id}.tif")[..., :3]
        pred = np.asarray(segment_image(image, model=model, mpp=args.mpp, device="cpu"))
        truth = io.imread(args.data / "labels" / f"{image_id}.png")
        table = overlap_table(pred, truth)
        c, p = census(table)
        parts.append(aji_parts(table))
        scores.append(scores_from_table(table))
        total = {key: total.get(key, 0) + v for key, v in c.items()}
        pairs += p
    d, n = max(total["detections"], 1), max(total["nuclei"], 1)
    settings = " ".join(args.set) or "shipped settings"
    mean = {m: np.mean([r[m] for r in scores]) for m in ("object_f1", "aji", "object_precision", "object_recall")}
    print(f"{args.model} ({settings}) on the {len(ids)} {args.split} images: per-image mean object F1 "
          f"{mean['object_f1']:.4f}, AJI {mean['aji']:.4f}, precision {mean['object_precision']:.4f}, "
          f"recall {mean['object_recall']:.4f}; pooled census:")
    print(f"detections {total['detections']}: " + ", ".join(
        f"{k} {total[k]} ({total[k] / d:.1%})" for k in ("matched", "near", "merge", "fragment", "off")))
    print(f"true nuclei {total['nuclei']}: " + ", ".join(
        f"{k.removeprefix('n_')} {total[k]} ({total[k] / n:.1%})"
        for k in ("n_matched", "n_near", "split", "swallowed", "missed")))
    arr = np.array(pairs).reshape(-1, 3)
    arr = arr[arr[:, 0] > 0.3]
    print("true area (px) | matched or near pairs | share matched | median area ratio (detection / truth)")
    for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
        sel = arr[(arr[:, 2] >= lo) & ((arr[:, 2] < hi) if hi is not None else True)]
        if len(sel):
            span = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            print(f"{span:>14} | {len(sel):>21} | {np.mean(sel[:, 0] > 0.5):>13.2f} | "
                  f"{np.median(sel[:, 1] / sel[:, 2]):.2f}")
    pooled = {k: sum(r[k] for r in parts) for k in parts[0]}
    whole = pooled["union"] + pooled["missed"] + pooled["unused"]
    print("AJI's union, pooled pixels: " + ", ".join(
        f"{name} {share:.1%}" for name, share in (
            ("matched intersections", pooled["inter"] / whole),
            ("the rest of the matched unions", (pooled["union"] - pooled["inter"] - pooled["merge_extra"]) / whole),
            ("merged detections counted again", pooled["merge_extra"] / whole),
            ("missed nuclei", pooled["missed"] / whole), ("unused detections", pooled["unused"] / whole))))
    once = [r["inter"] / max(r["union"] - r["merge_extra"] + r["missed"] + r["unused"], 1) for r in parts]
    unused = [r["inter"] / max(r["union"] + r["missed"], 1) for r in parts]
    print(f"per-image mean AJI {mean['aji']:.4f} (above); with merged detections counted once {np.mean(once):.4f}; "
          f"without unused detections {np.mean(unused):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
