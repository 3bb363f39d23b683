"""The scale the model sees an image at, on the development set (the 16 Kumar train images' labels, for choosing):
how accuracy moves with it, and what ``--zoom auto`` wins back on images whose nuclei look small.

    python scripts/scale_dev.py sweep --zooms 0.8 1 1.2 1.4 1.6 1.8 --out-json sweep.json
    python scripts/scale_dev.py shrunk --factors 1.5 2 --out-json shrunk.json

``sweep``: each image shown at each zoom (``segment_image(..., zoom=z)``): per image and zoom the Kumar figures and
the median equivalent diameter (image pixels) of the detections; the truth's median is recorded once per image, for
reading the table, never for choosing. ``shrunk``: each image shrunk by a factor F (as a scanner of F times coarser
pixels gives it) but declared at 0.25 um/px, the scale of the original (a slide whose stated scale is wrong, or
tissue whose nuclei are F times smaller than usual), run at ``--zoom 1`` and ``--zoom auto``, and, for reference,
declared at its true scale (0.25 F um/px); predictions are brought back to the original's size (nearest) and scored
against its labels. Prints a paired table per factor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kumar import DEFAULT_DATA, dev_images  # noqa: E402


def _load(data: Path, name: str):
    import tifffile
    from skimage import io

    return tifffile.imread(data / "images" / f"{name}.tif")[..., :3], io.imread(data / "labels" / f"{name}.png")


def sweep(a, seg) -> dict:
    from wsiseg.api import segment_image
    from wsiseg.eval.metrics import evaluate_pair
    from wsiseg.wsi.scale import diameters

    rows = []
    for name in dev_images(a.data):
        image, truth = _load(a.data, name)
        row = {"name": name, "truth_diameter": float(np.median(diameters(truth))), "zooms": {}}
        for z in a.zooms:
            pred = np.asarray(segment_image(image, model=seg, mpp=0.25, zoom=z))
            d = diameters(pred)
            row["zooms"][str(z)] = {**{k: float(v) for k, v in evaluate_pair(pred, truth).items()},
                                    "diameter": float(np.median(d)) if len(d) else 0.0}
            print(name, z, f"aji {row['zooms'][str(z)]['aji']:.4f}", file=sys.stderr, flush=True)
        rows.append(row)
    return {"mode": "sweep", "zooms": a.zooms, "images": rows}


def shrunk(a, seg) -> dict:
    import cv2

    from wsiseg.api import image_nuclei, nuclei_labels
    from wsiseg.eval.metrics import evaluate_pair

    out = {"mode": "shrunk", "factors": a.factors, "runs": {}}
    for f in a.factors:
        runs: dict[str, list] = {"declared right": [], "zoom 1": [], "zoom auto": []}
        for name in dev_images(a.data):
            image, truth = _load(a.data, name)
            h, w = truth.shape
            small = cv2.resize(image, (round(w / f), round(h / f)), interpolation=cv2.INTER_AREA)
            for run, mpp, zoom in (("declared right", 0.25 * f, 1), ("zoom 1", 0.25, 1), ("zoom auto", 0.25, "auto")):
                nuclei = image_nuclei(small, model=seg, mpp=mpp, zoom=zoom)
                pred = cv2.resize(nuclei_labels(nuclei, small.shape[:2]), (w, h), interpolation=cv2.INTER_NEAREST)
                runs[run].append({"name": name, **{k: float(v) for k, v in evaluate_pair(pred, truth).items()}})
            print(f, name, {k: round(v[-1]["aji"], 4) for k, v in runs.items()}, file=sys.stderr, flush=True)
        out["runs"][str(f)] = runs
        base = np.array([r["aji"] for r in runs["zoom 1"]])
        print(f"shrunk {f}x, declared at 0.25 um/px: AJI (mean; difference to zoom 1 +- se, images ahead)")
        for run, rs in runs.items():
            v = np.array([r["aji"] for r in rs])
            d = v - base
            print(f"  {run:15s} {v.mean():.4f}  {d.mean():+.4f} +- {d.std(ddof=1) / np.sqrt(len(d)):.4f}  "
                  f"{int((d > 0).sum())}/{len(d)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("sweep", "shrunk"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--zooms", type=float, nargs="+", default=[0.8, 1.0, 1.2, 1.4, 1.6, 1.8])
    ap.add_argument("--factors", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out-json", type=Path, required=True)
    a = ap.parse_args(argv)
    from wsiseg.api import load_model

    seg = load_model(a.model)
    result = (sweep if a.mode == "sweep" else shrunk)(a, seg)
    a.out_json.write_text(json.dumps({"model": a.model, **result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
