"""Kumar at several model scales: how a model's accuracy on each test image depends on the scale it sees.

    python scripts/kumar_scales.py --model wsiseg/weights/default.safetensors --mpp 0.2 0.25 --out-json s.json

Each image is segmented once per ``--mpp`` value (the microns per pixel the image is *declared* to have: 0.2 shows
the 0.25 um/px Kumar images shrunk to 0.8x at the model's resolution) and scored; then all scales' nuclei are merged
best score first (a nucleus is kept, on its still free pixels, when at least ``--keep`` of its pixels are free) and
scored too. Two label-free ways to use the scales are scored as well: per image, the scale whose nuclei have the
higher mean score; and "fragments joined": the finest scale's nuclei, except that where a nucleus of the coarsest
scale holds two or more of them (each at least 60% inside it) it replaces them (vesicular nuclei cut into chromatin
clumps at the native scale but seen whole when smaller). Printed per image and as means, with the best scale per
image (an oracle: it looks at the labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kumar.py: the image lists
from kumar import DEFAULT_DATA, test_images  # noqa: E402


def merge_by_score(nuclei: list, shape: tuple[int, int], keep: float) -> np.ndarray:
    """Labels of ``nuclei`` (of any scales) painted best score first; one overlapping the painted ones by more than
    ``1 - keep`` of its pixels is dropped, the others take only their free pixels."""
    from wsiseg.wsi.stitch import polygon_window

    out = np.zeros(shape, np.int32)
    k = 0
    for n in sorted(nuclei, key=lambda n: -n.score):
        win = polygon_window([n.polygon], shape)
        if win is None:
            continue
        x0, y0, mask = win
        window = out[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        free = mask & (window == 0)
        area = int(mask.sum())
        if area and free.sum() >= keep * area:
            k += 1
            window[free] = k
    return out


def join_fragments(fine: np.ndarray, coarse: np.ndarray, inside: float = 0.6) -> np.ndarray:
    """``fine`` labels with every ``coarse`` nucleus that holds two or more fine nuclei (each with at least ``inside``
    of its pixels in it) put in their place; the other fine nuclei stay. One contingency table, no per-nucleus loop."""
    from skimage.segmentation import relabel_sequential

    fine, coarse = fine.astype(np.int64), coarse.astype(np.int64)
    nf, nc = int(fine.max()) + 1, int(coarse.max()) + 1
    both = (fine > 0) & (coarse > 0)
    overlap = np.bincount(fine[both] * nc + coarse[both], minlength=nf * nc).reshape(nf, nc)
    area = np.bincount(fine.ravel(), minlength=nf)
    best = overlap.argmax(1)
    held = (overlap[np.arange(nf), best] >= inside * np.maximum(area, 1)) & (np.arange(nf) > 0)
    joins = np.bincount(best[held], minlength=nc) >= 2
    joins[0] = False
    out = np.where((held & joins[best])[fine], 0, fine)
    paint = joins[coarse] & (out == 0)
    out[paint] = nf + coarse[paint]
    return relabel_sequential(out)[0].astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model name or checkpoint")
    ap.add_argument("--mpp", type=float, nargs="+", default=[0.2, 0.25], help="declared image scales to try")
    ap.add_argument("--min-score", type=float, default=0.5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--keep", type=float, default=0.7, help="share of a merged nucleus' pixels that must be free")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)

    import tifffile
    from skimage import io

    from wsiseg.api import image_nuclei, load_model, nuclei_labels, set_min_score, set_precision
    from wsiseg.eval.metrics import evaluate_pair

    model = load_model(args.model, args.device)
    set_min_score(model, args.min_score)
    set_precision(model, args.precision)
    rows = []
    for image_id, group in test_images(args.data):
        truth = io.imread(args.data / "labels" / f"{image_id}.png")
        image = tifffile.imread(args.data / "images" / f"{image_id}.tif")[..., :3]
        row: dict = {"name": image_id, "group": group, "scales": {}}
        every, labels = [], {}
        for mpp in args.mpp:
            nuclei = image_nuclei(image, model, mpp=mpp, device=args.device)
            labels[mpp] = nuclei_labels(nuclei, truth.shape)
            row["scales"][str(mpp)] = evaluate_pair(labels[mpp], truth)  # (with n_pred)
            row["scales"][str(mpp)]["mean_score"] = float(np.mean([n.score for n in nuclei])) if nuclei else 0.0
            every += nuclei
        row["merged"] = evaluate_pair(merge_by_score(every, truth.shape, args.keep), truth)
        fine, coarse = labels[max(args.mpp)], labels[min(args.mpp)]
        row["fragments_joined"] = evaluate_pair(join_fragments(fine, coarse), truth)
        rows.append(row)
        cells = "  ".join(f"{m}: {v['aji']:.4f} ({int(v['n_pred'])}, {v['mean_score']:.3f})"
                          for m, v in row["scales"].items())
        print(f"{image_id}  {group:6s}  AJI (nuclei) at {cells}  merged: {row['merged']['aji']:.4f}"
              f"  fragments joined: {row['fragments_joined']['aji']:.4f}", flush=True)
    means = {m: np.mean([r["scales"][m]["aji"] for r in rows]) for m in rows[0]["scales"]}
    oracle = np.mean([max(v["aji"] for v in r["scales"].values()) for r in rows])
    confident = np.mean([max(r["scales"].values(), key=lambda v: v["mean_score"])["aji"] for r in rows])
    print("mean AJI: " + "  ".join(f"{m}: {v:.4f}" for m, v in means.items())
          + f"  merged: {np.mean([r['merged']['aji'] for r in rows]):.4f}  best scale per image (oracle): {oracle:.4f}"
          + f"  scale of the higher mean score per image: {confident:.4f}"
          + f"  fragments joined: {np.mean([r['fragments_joined']['aji'] for r in rows]):.4f}")
    if args.out_json is not None:
        args.out_json.write_text(json.dumps({"model": args.model, "mpp": args.mpp, "images": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
