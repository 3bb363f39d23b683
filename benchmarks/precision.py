"""Whole-slide precision: how often a model draws nuclei on white (glass, fat, lumen), with and without the
tissue mask, and its per-image precision / recall where labels exist.

    python benchmarks/precision.py                                  # default and watershed: sample + Kumar dev
    python benchmarks/precision.py --models default PATH.safetensors watershed --kumar test --out-json p.json
    python benchmarks/precision.py --slides my.svs other.ndpi --kumar none

Slides (the bundled sample, and any given with ``--slides``) are segmented twice through ``wsiseg.api.segment_slide``,
with the tissue mask and without it (``--no-tissue-mask``: the model's own behaviour on glass). Per run: detections,
those on white (:func:`wsiseg.eval.background.on_white`: mean grey >= 215 and saturation < 0.1 under the polygon), their
share, per mm^2 of white, those on wholly blank model tiles (``glass tiles``) and those on marking dye
(:func:`wsiseg.eval.background.on_dye`: a green to cyan mean hue, 90-210 degrees, that neither stain has), and
pale ones (:func:`wsiseg.eval.background.on_pale`: mean haematoxylin < 0.15, not white; on the sample, mostly gaps in
the stroma). Kumar images (``--kumar dev``: the
16 train images, the development set; ``test``: the 14 test images, for a final report only) are scored whole:
object precision and recall at IoU > 0.5, object F1, AJI and the share on white, per-image mean with its standard
error. Slides must fit in memory at level 0 (they are rasterised there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kumar import DEFAULT_DATA, dev_images, test_images  # noqa: E402

MAX_PIXELS = 200_000_000


def slide_rows(model, path: Path, device: str, tile_size: int | None = None) -> list[dict]:
    from wsiseg.api import load_model, nuclei_labels, segment_slide
    from wsiseg.eval.background import white_report
    from wsiseg.io.slide import open_slide

    with open_slide(path) as slide:
        w, h = slide.dimensions
        if w * h > MAX_PIXELS:
            print(f"skipped {path.name}: {w}x{h} is too large to rasterise at level 0", file=sys.stderr)
            return []
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)))[..., :3]
        mpp = slide.mpp or 0.25
    seg = load_model(model, device) if isinstance(model, str) else model
    rows = []
    for mask in (True, False):
        nuclei: list = []
        t0 = time.perf_counter()
        segment_slide(path, model=seg, use_tissue_mask=mask, sink=nuclei.extend, tile_size=tile_size)
        seconds = time.perf_counter() - t0
        tile_px = max(1, int(round(256 * seg.mpp / mpp)))
        rep = white_report(rgb, nuclei_labels(nuclei, (h, w)), mpp, tile_px)
        rows.append({"input": path.name, "tissue_mask": mask, "seconds": round(seconds, 1), **rep})
    return rows


def kumar_rows(model, data: Path, split: str, device: str) -> list[dict]:
    import tifffile
    from skimage import io

    from wsiseg.api import image_nuclei, load_model, nuclei_labels
    from wsiseg.eval.background import white_report
    from wsiseg.eval.metrics import evaluate_pair

    names = dev_images(data) if split == "dev" else [name for name, _ in test_images(data)]
    seg = load_model(model, device) if isinstance(model, str) else model
    rows = []
    for name in names:
        image = tifffile.imread(data / "images" / f"{name}.tif")[..., :3]
        truth = io.imread(data / "labels" / f"{name}.png")
        pred = nuclei_labels(image_nuclei(image, seg, mpp=0.25), truth.shape)
        s = evaluate_pair(pred, truth)
        rep = white_report(image, pred, 0.25, 256)
        rows.append({"image": name, **{k: float(s[k]) for k in ("object_precision", "object_recall", "object_f1",
                                                                  "aji", "n_pred", "n_true")},
                     "share_on_white": rep["share_on_white"], "on_white": rep["on_white"]})
    return rows


def mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", "watershed"])
    ap.add_argument("--slides", nargs="*", type=Path, default=None, help="slides (default: the bundled sample)")
    ap.add_argument("--kumar", choices=("dev", "test", "none"), default="dev")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tile-size", type=int, default=None,
                    help="the slides' tile side in model pixels (default: the model's own, as wsiseg run)")
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)

    from wsiseg.api import sample_slide

    slides = args.slides if args.slides is not None else [sample_slide()]
    kumar = args.kumar != "none" and (args.data / "split.csv").is_file()
    if args.kumar != "none" and not kumar:
        print(f"Kumar skipped: no split.csv under {args.data}", file=sys.stderr)
    report: dict = {"slides": [], "kumar": {}, "kumar_split": args.kumar}
    print("| model | input | tissue mask | detections | on white | share on white | on white per mm^2 of white "
          "| glass tiles | on glass tiles | on marking dye | pale | s |\n" + "|---" * 12 + "|")
    for m in args.models:
        for p in slides:
            for r in slide_rows(m, Path(p), args.device, args.tile_size):
                r["model"] = m
                report["slides"].append(r)
                print(f"| {m} | {r['input']} | {'yes' if r['tissue_mask'] else 'no'} | {r['detections']} | "
                      f"{r['on_white']} | {100 * r['share_on_white']:.2f}% | {r['on_white_per_mm2']:.1f} | "
                      f"{r['glass_tiles']} | {r['on_glass_tiles']} | {r['on_dye']} | {r['pale']} | {r['seconds']} |",
                      flush=True)
    if kumar:
        print(f"\nKumar {args.kumar} images, per-image mean +- standard error\n"
              "| model | object precision | object recall | object F1 | AJI | predicted / true | share on white |\n"
              "|---|---|---|---|---|---|---|")
        for m in args.models:
            rows = kumar_rows(m, args.data, args.kumar, args.device)
            report["kumar"][m] = rows
            cells = [mean_se([r[k] for r in rows]) for k in ("object_precision", "object_recall", "object_f1", "aji")]
            ratio = sum(r["n_pred"] for r in rows) / max(sum(r["n_true"] for r in rows), 1)
            white = mean_se([r["share_on_white"] for r in rows])
            print(f"| {m} | " + " | ".join(f"{a:.4f} ± {b:.4f}" for a, b in cells)
                  + f" | {ratio:.2f} | {100 * white[0]:.2f}% |", flush=True)
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
