"""Choose a PDAM model's score threshold on the development set (the 16 Kumar *train* images' labels).

    python benchmarks/threshold_sweep.py --model default --out-json sweep.json
    python benchmarks/threshold_sweep.py --model run/model.safetensors --thresholds 0.3 0.5 0.7 0.9

The model runs once per image at the lowest threshold; each threshold then keeps the nuclei scoring at least it
(an approximation of a run at that threshold: the overlaps a dropped nucleus resolved are not undone). Prints AJI,
object precision / recall / F1 and PQ per threshold (mean over images, with the standard error), and the chosen
threshold: the highest mean object F1 among the thresholds whose mean AJI is within ``--aji-slack`` (0.005) of the
best (a model that over-detects gains precision without losing segmentation quality). Only development images are
read: the test images are never scored here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kumar import DEFAULT_DATA, dev_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--thresholds", type=float, nargs="+",
                    default=[0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    ap.add_argument("--tta", type=int, default=0, choices=[0, 4, 8])
    ap.add_argument("--semantic-fusion", action="store_true")
    ap.add_argument("--aji-slack", type=float, default=0.005)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)

    import tifffile
    from skimage import io

    from wsiseg.api import image_nuclei, load_model, nuclei_labels, set_min_score, set_semantic_fusion, set_tta
    from wsiseg.eval.metrics import evaluate_pair

    if not (args.data / "split.csv").is_file():
        print(f"error: {args.data}: no Kumar split.csv here", file=sys.stderr)
        return 3
    seg = load_model(args.model, args.device)
    set_min_score(seg, min(args.thresholds))
    if args.tta:
        set_tta(seg, args.tta)
    if args.semantic_fusion:
        set_semantic_fusion(seg, True)
    keys = ("aji", "object_precision", "object_recall", "object_f1", "pq", "n_pred", "n_true")
    table = {t: [] for t in args.thresholds}
    for i, name in enumerate(dev_images(args.data)):
        print(f"[{i + 1}] {name}", file=sys.stderr, flush=True)
        image = tifffile.imread(args.data / "images" / f"{name}.tif")[..., :3]
        truth = io.imread(args.data / "labels" / f"{name}.png")
        nuclei = image_nuclei(image, seg, mpp=0.25)
        for t in args.thresholds:
            pred = nuclei_labels([n for n in nuclei if n.score >= t], truth.shape)
            s = evaluate_pair(pred, truth)
            table[t].append({k: float(s[k]) for k in keys})
    print(f"{'threshold':>9} " + " ".join(f"{k:>16}" for k in keys[:5]) + "   n_pred/n_true")
    summary = {}
    for t, rows in table.items():
        m = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        se = {k: float(np.std([r[k] for r in rows], ddof=1) / np.sqrt(len(rows))) for k in keys}
        summary[t] = {"mean": m, "se": se}
        print(f"{t:9.2f} " + " ".join(f"{m[k]:.4f} +- {se[k]:.4f}" for k in keys[:5])
              + f"   {m['n_pred'] / m['n_true']:.2f}")
    top = max(v["mean"]["aji"] for v in summary.values())
    ok = [t for t in summary if summary[t]["mean"]["aji"] >= top - args.aji_slack]
    best = max(ok, key=lambda t: summary[t]["mean"]["object_f1"])
    m = summary[best]["mean"]
    print(f"chosen on the development set: threshold {best} (object F1 {m['object_f1']:.4f}, AJI {m['aji']:.4f}; "
          f"best AJI {top:.4f})")
    if args.out_json:
        args.out_json.write_text(json.dumps({"model": args.model, "tta": args.tta, "semantic_fusion":
                                             args.semantic_fusion, "per_threshold": summary, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
