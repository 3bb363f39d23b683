"""Kumar at several model scales: how a model's accuracy on each test image depends on the scale it sees.

    python benchmarks/kumar_scales.py --model wsiseg/weights/default.safetensors --mpp 0.2 0.25 --out-json s.json

Each image is segmented once per ``--mpp`` value (the microns per pixel the image is *declared* to have: 0.2 shows
the 0.25 um/px Kumar images shrunk to 0.8x at the model's resolution) and scored; then all scales' nuclei are merged
best score first (a nucleus is kept, on its still free pixels, when at least ``--keep`` of its pixels are free) and
scored too. Printed per image and as means, with the best scale per image (an oracle: it looks at the labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kumar import DEFAULT_DATA, test_images  # noqa: E402


def merge_by_score(nuclei: list, shape: tuple[int, int], keep: float) -> np.ndarray:
    """Labels of ``nuclei`` (of any scales) painted best score first; one overlapping the painted ones by more than
    ``1 - keep`` of its pixels is dropped, the others take only their free pixels."""
    from wsiseg.stitch import polygon_window

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
    from wsiseg.metrics import evaluate_pair

    model = load_model(args.model, args.device)
    set_min_score(model, args.min_score)
    set_precision(model, args.precision)
    rows = []
    for image_id, group in test_images(args.data):
        truth = io.imread(args.data / "labels" / f"{image_id}.png")
        image = tifffile.imread(args.data / "images" / f"{image_id}.tif")[..., :3]
        row: dict = {"name": image_id, "group": group, "scales": {}}
        every = []
        for mpp in args.mpp:
            nuclei = image_nuclei(image, model, mpp=mpp, device=args.device)
            row["scales"][str(mpp)] = evaluate_pair(nuclei_labels(nuclei, truth.shape), truth)  # (with n_pred)
            every += nuclei
        row["merged"] = evaluate_pair(merge_by_score(every, truth.shape, args.keep), truth)
        rows.append(row)
        cells = "  ".join(f"{m}: {v['aji']:.4f} ({int(v['n_pred'])})" for m, v in row["scales"].items())
        print(f"{image_id}  {group:6s}  AJI (nuclei) at {cells}  merged: {row['merged']['aji']:.4f}", flush=True)
    means = {m: np.mean([r["scales"][m]["aji"] for r in rows]) for m in rows[0]["scales"]}
    oracle = np.mean([max(v["aji"] for v in r["scales"].values()) for r in rows])
    print("mean AJI: " + "  ".join(f"{m}: {v:.4f}" for m, v in means.items())
          + f"  merged: {np.mean([r['merged']['aji'] for r in rows]):.4f}  best scale per image (oracle): {oracle:.4f}")
    if args.out_json is not None:
        args.out_json.write_text(json.dumps({"model": args.model, "mpp": args.mpp, "images": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
