"""Images smaller than the model's tile: crops of the Kumar images segmented in the model's own tile (mostly white
padding) against one tile of about the crop's size (the default since ``wsi.grid.fitted_tile``), scored against the
crops of the labels.

Five crops of side ``--side`` a Kumar image (its four corners and its centre), each segmented with every ``--tiles``
side; per image the mean over its crops, then per tile the mean and the paired difference against the first tile
(mean, standard error over images, images ahead), as ``benchmarks/paired.py`` computes them.

    python benchmarks/small_images.py --side 200 --tiles 384 224 384r [--split dev|test]

A tile written ``384`` segments the crop padded with white to 384 px (as one tile was before ``fitted_tile``), one
written ``384r`` the crop mirrored past its bottom and right edges to 384 px (OpenCV's
``BORDER_REFLECT_101``) instead of padded with white, and scores the crop's part.
``--split dev`` (the 16 train images, for choosing) is the default; ``test`` scores the 14 test images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kumar import DEFAULT_DATA, dev_images, test_images  # noqa: E402

METRICS = ("aji", "object_f1", "object_precision", "object_recall")


def main(argv: list[str] | None = None) -> None:
    import cv2
    import tifffile
    from PIL import Image

    from wsiseg.api import load_model, segment_image
    from wsiseg.eval.metrics import evaluate_pair

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", type=int, required=True, help="crop side in pixels (the images are 40x, 0.25 um)")
    ap.add_argument("--tiles", nargs="+", required=True,
                    help="tile sides (N, or Nr: the crop mirrored to N px, not padded); the first is the reference")
    ap.add_argument("--split", choices=["dev", "test"], default="dev")
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    a = ap.parse_args(argv)
    ids = dev_images(a.data) if a.split == "dev" else [i for i, _ in test_images(a.data)]
    seg = load_model(a.model, "cpu")
    s = a.side
    per_image: dict[str, list[dict[str, float]]] = {t: [] for t in a.tiles}

    def segment(crop: np.ndarray, t: str) -> np.ndarray:
        # (a tile asked for is fitted to a small image as the model's own is: the crop is padded to the tile here, with
        # white as the tile's padding was before the fitting, or mirrored for "Nr", so that the tile is as asked)
        p = int(t.rstrip("r")) - s
        if p <= 0:
            return segment_image(crop, seg, mpp=0.25, tile_size=int(t.rstrip("r")))
        big = cv2.copyMakeBorder(crop, 0, p, 0, p, cv2.BORDER_REFLECT_101 if t.endswith("r") else cv2.BORDER_CONSTANT,
                                 value=(255, 255, 255))
        lab = segment_image(big, seg, mpp=0.25, tile_size=int(t.rstrip("r")))[:s, :s]
        return np.unique(lab, return_inverse=True)[1].reshape(s, s)

    for name in ids:
        img = tifffile.imread(a.data / "images" / f"{name}.tif")[..., :3]
        truth = np.asarray(Image.open(a.data / "labels" / f"{name}.png")).astype(np.int64)
        h, w = truth.shape
        crops = {t: [] for t in a.tiles}
        for y, x in ((0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)):
            gt = np.unique(truth[y:y + s, x:x + s], return_inverse=True)[1].reshape(s, s)
            for t in a.tiles:
                pred = segment(np.ascontiguousarray(img[y:y + s, x:x + s]), t)
                crops[t].append(evaluate_pair(pred, gt))
        for t in a.tiles:
            per_image[t].append({m: float(np.mean([c[m] for c in crops[t]])) for m in METRICS})
        print(name, {t: round(per_image[t][-1]["aji"], 3) for t in a.tiles}, file=sys.stderr, flush=True)
    ref = a.tiles[0]
    print(f"{len(ids)} {a.split} images, 5 crops of {s} px each; paired against tile {ref}")
    for t in a.tiles:
        cells = []
        for m in METRICS:
            v = np.array([r[m] for r in per_image[t]])
            d = v - np.array([r[m] for r in per_image[ref]])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            cells.append(f"{m} {v.mean():.4f} ({d.mean():+.4f} +- {se:.4f}, {int((d > 0).sum())}/{len(d)} ahead)")
        print(f"tile {t}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
