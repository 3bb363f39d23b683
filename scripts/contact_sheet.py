"""A contact sheet of outlines, to look at what a change removed or what a rule flags, one small window each.

``python scripts/contact_sheet.py SLIDE A.geojson [B.geojson] --out sheet.png [--dye] [--hue LO:HI]``:

- with ``B``: the outlines of ``A`` that ``B`` does not have (the same polygon, vertex for vertex), e.g. what a guard
  removed (``A`` before it, ``B`` after);
- with ``--dye``: the outlines of ``A`` on marking dye by :func:`wsiseg.wsi.stains.dye_instances` (at level 0);
- with ``--hue LO:HI``: those whose :func:`wsiseg.wsi.stains.hue_saturation` gives a hue in [LO, HI) degrees at
  the dye rule's saturation (>= 0.15).

Each is shown in a 48 px level-0 window around its centre, 3x, its outline in yellow and its level-0 centre written
above it, ten to a row. Prints how many were drawn. (How the dye guard's removals were looked at:
docs/precision.md, "A dye guard per outline, shipped".)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from wsiseg.io.regions import read_features
from wsiseg.io.slide import open_slide

WINDOW = 48  # level-0 pixels
ZOOM = 3
COLUMNS = 10


def _rings(feats: list[dict]) -> list[np.ndarray]:
    return [np.asarray(f["geometry"]["coordinates"][0], np.float64) for f in feats]


def _labels(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    for k, ring in enumerate(rings, 1):
        cv2.fillPoly(lab, [np.round(ring - 0.5).astype(np.int32)], k)
    return lab


def _cell(rgb: np.ndarray, ring: np.ndarray) -> np.ndarray:
    cx, cy = ring.mean(axis=0)
    x0, y0 = max(int(cx) - WINDOW // 2, 0), max(int(cy) - WINDOW // 2, 0)
    crop = np.full((WINDOW, WINDOW, 3), 255, np.uint8)
    part = rgb[y0:y0 + WINDOW, x0:x0 + WINDOW]
    crop[:part.shape[0], :part.shape[1]] = part
    big = cv2.resize(crop, (WINDOW * ZOOM, WINDOW * ZOOM), interpolation=cv2.INTER_NEAREST)
    cv2.polylines(big, [np.round((ring - (x0, y0)) * ZOOM).astype(np.int32)], True, (255, 255, 0), 1)
    cv2.putText(big, f"{int(cx)},{int(cy)}", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    return cv2.copyMakeBorder(big, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(0, 0, 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide")
    ap.add_argument("a", help="GeoJSON of the outlines to show")
    ap.add_argument("b", nargs="?", help="GeoJSON: show only the outlines of A that it does not have")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dye", action="store_true", help="only the outlines on marking dye")
    ap.add_argument("--hue", help="LO:HI: only the outlines whose mean hue lies in [LO, HI) degrees")
    args = ap.parse_args(argv)
    feats = read_features(args.a)
    if args.b:
        have = {json.dumps(f["geometry"]["coordinates"]) for f in read_features(args.b)}
        feats = [f for f in feats if json.dumps(f["geometry"]["coordinates"]) not in have]
    with open_slide(args.slide) as slide:
        rgb = np.ascontiguousarray(np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3])
    rings = _rings(feats)
    if args.dye or args.hue:
        from wsiseg.wsi.stains import DYE_SAT, dye_instances, hue_saturation

        lab = _labels(rings, rgb.shape[:2])
        keep = np.ones(len(rings), bool)
        if args.dye:
            keep &= dye_instances(rgb, lab, len(rings))
        if args.hue:
            lo, hi = (float(v) for v in args.hue.split(":"))
            hue, sat = hue_saturation(rgb, lab, len(rings))
            keep &= (hue >= lo) & (hue < hi) & (sat >= DYE_SAT)
        rings = [r for r, k in zip(rings, keep) if k]
    cells = [_cell(rgb, r) for r in rings]
    if not cells:
        print("0 outlines")
        return 0
    blank = np.full_like(cells[0], 255)
    cells += [blank] * (-len(cells) % COLUMNS)
    sheet = np.vstack([np.hstack(cells[i:i + COLUMNS]) for i in range(0, len(cells), COLUMNS)])
    cv2.imwrite(str(args.out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"{len(rings)} outlines -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
