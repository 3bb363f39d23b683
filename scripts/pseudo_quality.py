"""How good a ``wsiseg adapt`` run's pseudo-labels are, against the Kumar labels of the images it was run on.

``python scripts/pseudo_quality.py RUN/pseudo [OTHER_RUN/pseudo]``: for each target tile of the pseudo stage
(``labels/<image>_<row>_<col>.png``, 256 px tiles at 0.25 um/px, the target stage's grid), the metrics of
``wsiseg.eval.metrics.evaluate_pair`` against the same window of the image's Kumar label, averaged over each image's
tiles; prints their means over the images and, with a second folder, its paired difference from the first (mean +-
standard error, images ahead). For development images only (their labels are for choosing; docs/adapt.md, "The
teacher sees the stain it knows"); the run's target must be Kumar images at their own 0.25 um/px (or their shifted
copies, ``benchmarks/shift.py --write``), named as the Kumar images are.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from skimage import io

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from kumar import DEFAULT_DATA  # noqa: E402

METRICS = ("aji", "object_f1", "object_precision", "object_recall")


def per_image(pseudo: Path, data: Path, tile: int = 256) -> dict[str, np.ndarray]:
    """Each image's mean of :data:`METRICS` over its pseudo-labelled tiles."""
    from wsiseg.eval.metrics import evaluate_pair
    from wsiseg.wsi.grid import TileGrid

    rows: dict[str, list] = defaultdict(list)
    labels: dict[str, tuple] = {}  # each image's label and tile grid, read once for all of its tiles
    for p in sorted((pseudo / "labels").glob("*.png")):
        name, r, c = p.stem.rsplit("_", 2)
        if name not in labels:
            full = io.imread(data / "labels" / f"{name}.png").astype(np.int32)
            labels[name] = full, TileGrid.for_slide(full.shape[::-1], 0.25, 0.25, tile, 0)
        full, grid = labels[name]
        x, y = grid.origin(int(r), int(c))
        gt = full[y:y + tile, x:x + tile]
        pred = cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(np.int32)[:gt.shape[0], :gt.shape[1]]
        m = evaluate_pair(pred, gt)
        rows[name].append([m[k] for k in METRICS])
    return {n: np.mean(v, axis=0) for n, v in rows.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pseudo", type=Path, nargs="+", help="a run's pseudo/ folder (one or two)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"Kumar folder (default {DEFAULT_DATA})")
    a = ap.parse_args(argv)
    runs = [per_image(p, a.data) for p in a.pseudo[:2]]
    names = sorted(set(runs[0]).intersection(*runs[1:]))
    for p, run in zip(a.pseudo, runs):
        mean = np.mean([run[n] for n in names], axis=0)
        print(f"{p}: " + "  ".join(f"{k} {v:.4f}" for k, v in zip(METRICS, mean)) + f"  ({len(names)} images)")
    if len(runs) == 2:
        d = np.array([runs[1][n] - runs[0][n] for n in names])
        se = d.std(axis=0, ddof=1) / np.sqrt(len(d))
        print("second minus first: " + "  ".join(f"{k} {m:+.4f} +- {s:.4f}" for k, m, s in zip(METRICS, d.mean(0), se))
              + f"  (AJI ahead on {(d[:, 0] > 0).sum()}/{len(d)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
