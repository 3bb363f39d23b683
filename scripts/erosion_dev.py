"""Does eroding the predicted masks fit the Kumar labels better? (The error census found small nuclei drawn too large.)

``python scripts/erosion_dev.py --model default --min-score 0.85 [--cache DIR]`` segments the development images
(the 16 Kumar train images, whose labels are for choosing only) through ``wsiseg.api.segment_image`` as
``benchmarks/kumar.py`` does (``--cache``: keep/reuse the label images as ``.npy``), then scores each variant with
``wsiseg.eval.metrics.evaluate_pair`` and prints per-image means: the predictions as they are; every instance eroded by
one pixel (4- or 8-connected: a pixel next to another label or the background is dropped); only instances under 400
px eroded (4-connected). Figures: docs/precision.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kumar.py: the image lists

from kumar import DEFAULT_DATA, dev_images  # noqa: E402

KEYS = ("aji", "object_f1", "object_precision", "object_recall", "pq", "pixel_f1")


def erode(labels: np.ndarray, connectivity: int) -> np.ndarray:
    """Each instance less its boundary pixels (those with a differently labelled neighbour, background included)."""
    from scipy import ndimage as ndi

    st = ndi.generate_binary_structure(2, connectivity)
    lo, hi = ndi.grey_erosion(labels, footprint=st), ndi.grey_dilation(labels, footprint=st)
    out = labels.copy()
    out[(lo != labels) | (hi != labels)] = 0
    return out


def variants(p: np.ndarray) -> dict[str, np.ndarray]:
    small = np.bincount(p.ravel())[p] < 400
    return {"as predicted": p, "eroded, 4-connected": erode(p, 1), "eroded, 8-connected": erode(p, 2),
            "small (< 400 px) eroded, 4-connected": np.where(small, erode(p, 1), p)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--min-score", type=float, default=None)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=None, help="directory of <image>.npy predictions to reuse/keep")
    a = ap.parse_args(argv)
    import skimage.io as io
    import tifffile

    from wsiseg.api import RunOptions, configured_model, segment_image
    from wsiseg.eval.metrics import evaluate_pair

    seg = None
    rows: dict[str, list[dict]] = {}
    for image_id in dev_images(a.data):
        cached = a.cache / f"{image_id}.npy" if a.cache else None
        if cached is not None and cached.exists():
            pred = np.load(cached)
        else:
            seg = seg or configured_model(RunOptions(model=a.model, device="cpu", min_score=a.min_score))
            img = tifffile.imread(a.data / "images" / f"{image_id}.tif")[..., :3]
            pred = np.asarray(segment_image(img, model=seg, mpp=0.25, device="cpu"))
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.save(cached, pred)
        truth = io.imread(a.data / "labels" / f"{image_id}.png")
        for name, p in variants(pred).items():
            rows.setdefault(name, []).append(evaluate_pair(p, truth))
        print(f"{image_id} done", file=sys.stderr, flush=True)
    for name, rs in rows.items():
        print(f"{name:40s} " + " ".join(f"{k}={np.mean([r[k] for r in rs]):.4f}" for k in KEYS))


if __name__ == "__main__":
    main()
