"""The README's figure: the bundled sample slide, a level-0 crop, with the outlines ``wsiseg run`` writes.

``python scripts/sample_figure.py [--model default] [--out docs/sample_result.png]``: segments the sample with
the model (as the README's first command does), then draws each nucleus' polygon that meets the crop, in green,
one pixel wide, on the crop read from the slide. Prints the nucleus count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from wsiseg.api import sample_slide, segment_slide
from wsiseg.io.regions import read_features
from wsiseg.io.slide import open_slide

CROP = (1221, 1631, 640, 400)  # x, y, width, height at level 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", type=Path, default=Path("docs/sample_result.png"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        gj = Path(d) / "n.geojson"
        s = segment_slide(sample_slide(), geojson=gj, model=a.model)
        feats = read_features(gj)
    x, y, w, h = CROP
    with open_slide(sample_slide()) as slide:
        img = np.ascontiguousarray(np.asarray(slide.read_region((x, y), 0, (w, h)))[..., :3])
    rings = [np.round(np.asarray(f["geometry"]["coordinates"][0]) - 0.5 - [x, y]).astype(np.int32) for f in feats]
    near = [r for r in rings
            if r[:, 0].max() >= 0 and r[:, 0].min() < w and r[:, 1].max() >= 0 and r[:, 1].min() < h]
    cv2.polylines(img, near, True, (0, 255, 0), 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(a.out), img[..., ::-1])
    print(json.dumps({"model": s.model, "nuclei": s.nuclei, "in_crop": len(near), "out": str(a.out)}))


if __name__ == "__main__":
    main()
