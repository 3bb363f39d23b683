"""Kumar benchmark: score a segmenter on the 14 Kumar test images, beside the paper's Table 3 rows.

    python benchmarks/kumar.py --model watershed --device auto --out-json kumar.json
    python benchmarks/kumar.py --model default --split dev --tile-size 512   # a setting, on the development set
    python benchmarks/kumar.py --oracle truth     # no model: prediction = the truth (every figure must be 1)
    python benchmarks/kumar.py --oracle shift1    # no model: the truth shifted by one pixel down and right
    python benchmarks/kumar.py --table a.json b.json   # one markdown table of saved runs (--out-json) + the paper

Test images are those of ``split.csv`` whose split is not ``train``: 8 ``test_same_organ`` ("seen" organs) and
6 ``test_diff_organ`` ("unseen"). Figures are per-image mean +- population std (ddof=0), as in the paper. Our
labels are the shared-data rasterisation (0-based polygon coordinates); another common rasterisation is offset by one
pixel in x and y, which alone moves AJI by about 0.15 (see ``--oracle shift1``), so compare with published numbers
with that in mind. The model is run through ``wsiseg.api.segment_image`` on each whole 1000x1000 image.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "kumar"
GROUPS = {"test_same_organ": "seen", "test_diff_organ": "unseen"}
METRICS = ("aji", "aji_plus", "pixel_f1", "object_f1", "pq", "object_f1_glas")
#: "object F1" is ours (a match is IoU > 0.5); "object F1 (GlaS)" the lenient criterion of the gland contest
#: (wsiseg.eval.metrics), which the paper's figures may use: its definition is not in the paper (docs/precision.md)
TITLES = ("AJI", "AJI+", "pixel F1", "object F1", "PQ", "object F1 (GlaS)")

#: The paper's Table 3 (BBBC039 -> Kumar, 14 test images, mean +- std), from the shared data README.
PAPER = {
    "CyCADA + Mask R-CNN (paper baseline)": {
        "aji": (0.4447, 0.1069),
        "pixel_f1": (0.7220, 0.0802),
        "object_f1": (0.6567, 0.0837),
    },
    "Hou et al. (paper)": {"aji": (0.4980, 0.1236), "pixel_f1": (0.7500, 0.0849), "object_f1": (0.6890, 0.0990)},
    "CyC-PDAM (paper)": {"aji": (0.5610, 0.0718), "pixel_f1": (0.7882, 0.0533), "object_f1": (0.7483, 0.0525)},
    "Panoptic FPN, supervised (paper upper bound)": {"aji": (0.5735, 0.0855), "pixel_f1": (0.7886, 0.0531)},
}


def test_images(data: Path) -> list[tuple[str, str]]:
    """``[(image_id, group)]`` of the test split, in CSV order; group is "seen" or "unseen"."""
    with open(data / "split.csv", newline="", encoding="utf-8") as f:
        return [(r["image_id"], GROUPS[r["split"]]) for r in csv.DictReader(f) if r["split"] != "train"]


def crowded(seg, at: int, own_tile: int, min_score: float):
    """``seg.predict`` with the tiles it finds crowded predicted again: a tile with at least ``at`` detections gets
    the proposal and detection counts of a model whose own tile is ``own_tile`` px
    (:func:`wsiseg.segmenters.postprocess.cap_scale`) and keeps detections from ``min_score``; the others are as
    ``seg`` predicts them. A lead under study (docs/precision.md, "What it does not reach"), not what ``wsiseg run``
    does; ``seg``'s own settings are as they were after each call."""
    plain = seg.predict

    def predict(tiles):
        result = plain(tiles)
        again = [i for i, r in enumerate(result) if r.count >= at]
        if again:
            saved = seg.tile_size, seg.min_score
            seg.tile_size, seg.min_score = own_tile, min_score
            try:
                for i, r in zip(again, plain(tiles[again])):
                    result[i] = r
            finally:
                seg.tile_size, seg.min_score = saved
        return result

    return predict


def dev_images(data: Path) -> list[str]:
    """The development set: image ids of ``split.csv``'s ``train`` split (their labels choose settings, never train)."""
    with open(data / "split.csv", newline="", encoding="utf-8") as f:
        return [r["image_id"] for r in csv.DictReader(f) if r["split"] == "train"]


def shift1(labels: np.ndarray) -> np.ndarray:
    """The labels moved one pixel down and one right (the vacated row and column are background)."""
    out = np.zeros_like(labels)
    out[1:, 1:] = labels[:-1, :-1]
    return out


def aggregate(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{"seen"|"unseen"|"all": {metric: (mean, population std)}}`` over the rows' ``group``."""
    out = {}
    for name in ("seen", "unseen", "all"):
        members = [r for r in rows if name == "all" or r["group"] == name]
        if members:
            out[name] = {
                k: (float(np.mean([r[k] for r in members])), float(np.std([r[k] for r in members], ddof=0)))
                for k in METRICS
            }
            out[name]["n_images"] = len(members)
    return out


def print_tables(rows: list[dict], summary: dict, label: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if console.width < 150:  # the comparison table needs ~150 columns; logs and pipes get that width
        console = Console(width=150)
    per = Table(title=f"Kumar test images: {label}")
    for c in ("image", "group", "n true", "n pred", *TITLES, "s"):
        per.add_column(c, justify="left" if c in ("image", "group") else "right")
    for r in rows:
        per.add_row(
            r["name"],
            r["group"],
            str(int(r["n_true"])),
            str(int(r["n_pred"])),
            *[f"{r[k]:.4f}" for k in METRICS],
            f"{r['seconds']:.1f}",
        )
    console.print(per)

    cmp = Table(title="Kumar test set: ours vs the paper (mean ± std over images)", caption="std: population (ddof=0)")
    cmp.add_column("method / subset")
    cmp.add_column("images", justify="right")
    for t in TITLES:
        cmp.add_column(t, justify="right")
    for method, figs in PAPER.items():
        cells = [f"{figs[k][0]:.4f} ± {figs[k][1]:.4f}" if k in figs else "-" for k in METRICS]
        cmp.add_row(method, "14", *cells)
    for name, subset in (("seen", "seen organs"), ("unseen", "unseen organs"), ("all", "all")):
        if name in summary:
            s = summary[name]
            cmp.add_row(
                f"ours: {label}, {subset}", str(s["n_images"]), *[f"{s[k][0]:.4f} ± {s[k][1]:.4f}" for k in METRICS]
            )
    console.print(cmp)


def markdown_table(paths: list[Path]) -> str:
    """The paper's rows and saved runs (``--out-json`` files, named by their ``subject``) as one markdown table."""
    head = "| method | AJI | pixel F1 | object F1 | PQ | AJI seen / unseen |\n|---|---|---|---|---|---|"
    lines = [head]
    for method, figs in PAPER.items():
        cells = [f"{figs[k][0]:.4f} ± {figs[k][1]:.4f}" if k in figs else "-" for k in ("aji", "pixel_f1", "object_f1")]
        lines.append(f"| {method} | " + " | ".join(cells) + " | - | - |")
    for p in paths:
        run = json.loads(Path(p).read_text(encoding="utf-8"))
        a, seen, unseen = run["summary"]["all"], run["summary"]["seen"], run["summary"]["unseen"]
        cells = [f"{a[k][0]:.4f} ± {a[k][1]:.4f}" for k in ("aji", "pixel_f1", "object_f1", "pq")]
        lines.append(f"| ours: {run['subject']} | " + " | ".join(cells)
                     + f" | {seen['aji'][0]:.4f} / {unseen['aji'][0]:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="watershed", help="model name or checkpoint for wsiseg.api.segment_image")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0, ...")
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="test: the 14 test images (score a shipped model once); dev: the 16 train images, whose labels "
                         "are for choosing settings only")
    ap.add_argument("--mpp", type=float, default=0.25, help="microns per pixel of the Kumar images (40x: 0.25)")
    ap.add_argument("--oracle", choices=("truth", "shift1"), default=None, help="score the truth itself (no model)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"Kumar folder (default {DEFAULT_DATA})")
    ap.add_argument("--out-json", type=Path, default=None, help="write per-image and summary figures here")
    ap.add_argument("--min-score", type=float, default=None,
                    help="PDAM checkpoints: keep detections scoring at least this (default: the model's own threshold)")
    ap.add_argument("--tta", type=int, nargs="?", const=4, default=0, choices=[4, 8], metavar="N",
                    help="PDAM checkpoints: test-time augmentation, box and mask heads averaged over N views (4: the "
                         "mirror images, the default; 8: and their transposes)")
    ap.add_argument("--semantic-fusion", action="store_true",
                    help="PDAM checkpoints: each mask averaged with the semantic branch's foreground probability")
    ap.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL",
                    help="PDAM checkpoints averaged with --model (wsiseg run --ensemble)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="PDAM checkpoints: the network's arithmetic (wsiseg run --precision)")
    ap.add_argument("--tile-size", type=int, default=None,
                    help="tile side in model pixels (default: the model's own, as wsiseg run)")
    ap.add_argument("--own-tile", type=int, default=None,
                    help="PDAM checkpoints: the tile side the model's per-tile counts (proposals, detections) are "
                         "taken as set for (default: its bundle's): a larger --tile-size gets them times the area "
                         "ratio (wsiseg.segmenters.postprocess.cap_scale)")
    ap.add_argument("--crowded", default=None, metavar="AT:OWN:SCORE",
                    help="PDAM checkpoints, a lead under study: a tile with at least AT detections is predicted again "
                         "with the counts of a model whose own tile is OWN px and detections kept from SCORE "
                         "(e.g. 90:256:0.6; not what wsiseg run does)")
    ap.add_argument("--zoom", default="auto", metavar="auto|Z",
                    help="as wsiseg run --zoom: auto (default), or the scale the images are shown at (1: their own)")
    ap.add_argument("--name", default=None, help="how the run is named in tables (default: the model)")
    ap.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                    help="print saved runs (--out-json files) as one markdown table beside the paper, and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return 0

    from skimage import io
    import tifffile

    from wsiseg.eval.metrics import ELONGATED, elongated_recall, evaluate_pair

    if not (args.data / "split.csv").is_file():
        print(f"error: {args.data}: no Kumar split.csv here", file=sys.stderr)
        return 3
    segment_image = None
    if args.oracle is None:
        from wsiseg.api import segment_image  # the lead's API; imported only when a model is scored
    label = f"oracle {args.oracle}" if args.oracle else (args.name or f"model {args.model}")
    model = args.model
    if args.oracle is None and (args.min_score is not None or args.tta or args.semantic_fusion
                                or args.precision != "fp32" or args.ensemble or args.own_tile or args.crowded):
        from wsiseg.api import RunOptions, configured_model
        from wsiseg.core.errors import WsisegError

        try:
            model = configured_model(RunOptions(model=args.model, device=args.device, ensemble=args.ensemble or (),
                                                min_score=args.min_score, tta=args.tta,
                                                semantic_fusion=args.semantic_fusion, precision=args.precision))
        except WsisegError as e:
            raise SystemExit(f"error: {e}") from None
        if args.own_tile:
            if not hasattr(model, "tile_size"):
                raise SystemExit("error: --own-tile needs a PDAM checkpoint")
            model.tile_size = args.own_tile
        if args.crowded:
            try:
                at, own, score = args.crowded.split(":")
                at, own, score = int(at), int(own), float(score)
            except ValueError:
                raise SystemExit(f"error: --crowded {args.crowded!r}: expected AT:OWN:SCORE, e.g. 90:256:0.6") from None
            if not hasattr(model, "tile_size"):
                raise SystemExit("error: --crowded needs a PDAM checkpoint")
            model.predict = crowded(model, at, own, score)

    rows = []
    images = test_images(args.data) if args.split == "test" else [(i, "dev") for i in dev_images(args.data)]
    for image_id, group in images:
        truth = io.imread(args.data / "labels" / f"{image_id}.png")
        t0 = time.perf_counter()
        if args.oracle == "truth":
            pred = truth.copy()
        elif args.oracle == "shift1":
            pred = shift1(truth)
        else:
            image = tifffile.imread(args.data / "images" / f"{image_id}.tif")
            pred = np.asarray(segment_image(image[..., :3], model=model, mpp=args.mpp, device=args.device,
                                            tile_size=args.tile_size, zoom=args.zoom))
            if pred.shape != truth.shape:
                raise SystemExit(f"error: {image_id}: prediction shape {pred.shape} != truth shape {truth.shape}")
        seconds = time.perf_counter() - t0
        rows.append({"name": image_id, "group": group, **evaluate_pair(pred, truth),
                     **elongated_recall(pred, truth), "seconds": seconds})

    summary = aggregate(rows)
    print_tables(rows, summary, label)
    long_true, long_found = (sum(r[k] for r in rows) for k in ("long_true", "long_found"))
    print(f"elongated nuclei (at least {ELONGATED}x as long as wide): {long_found} of {long_true} found "
          f"(recall {long_found / max(long_true, 1):.3f}, pooled over the images)")
    if args.out_json is not None:
        payload = {
            "subject": label,
            "model": None if args.oracle else args.model,
            "min_score": args.min_score,
            "tta": args.tta,
            "semantic_fusion": args.semantic_fusion,
            "ensemble": args.ensemble,
            "tile_size": args.tile_size,
            "own_tile": args.own_tile,
            "crowded": args.crowded,
            "device": args.device,
            "mpp": args.mpp,
            "zoom": args.zoom,
            "std": "population std over images (ddof=0)",
            "images": rows,
            "summary": {g: {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()} for g, s in summary.items()},
            "paper": {m: {k: list(v) for k, v in figs.items()} for m, figs in PAPER.items()},
        }
        args.out_json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
