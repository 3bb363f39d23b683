"""A model's own nucleus size: the median diameter of the nuclei it draws on the images it was chosen on, measured as
``wsiseg run --zoom auto`` measures a slide's (:func:`wsiseg.wsi.scale.measure`), without labels.

    python scripts/nucleus_size.py --model default                  # the 16 Kumar development images
    python scripts/nucleus_size.py --model M --images DIR --mpp 0.25  # any folder of images

Prints each image's median (model pixels) and their median, the value ``scripts/bundle_model.py --nucleus-px``
writes into a bundle.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kumar import DEFAULT_DATA, dev_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--images", type=Path, default=None, help="a folder of images (default: the Kumar dev images)")
    ap.add_argument("--mpp", type=float, default=0.25, help="the images' microns per pixel")
    a = ap.parse_args(argv)
    from skimage import io

    from wsiseg.api import load_model
    from wsiseg.io.slide import Slide
    from wsiseg.wsi.grid import plan_grid, read_tile
    from wsiseg.wsi.scale import measure

    paths = sorted(p for p in a.images.iterdir() if p.is_file()) if a.images else \
        [DEFAULT_DATA / "images" / f"{n}.tif" for n in dev_images(DEFAULT_DATA)]
    seg = load_model(a.model)
    medians = []
    for p in paths:
        slide = Slide.from_array(np.ascontiguousarray(io.imread(p)[..., :3]), a.mpp, p)
        grid = plan_grid(seg, slide.dimensions, a.mpp)
        look = measure(seg, functools.partial(read_tile, slide, grid), grid.tiles(None))
        median = look.median_px
        print(f"{p.stem}\t{'-' if median is None else f'{median:.2f}'}\t{look.nuclei} nuclei in {look.tiles} tiles")
        if median is not None:
            medians.append(median)
    if not medians:
        print("no image had enough nuclei to measure", file=sys.stderr)
        return 1
    print(f"median of {len(medians)} images: {np.median(medians):.2f} px ({np.median(medians) * seg.mpp:.2f} um)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
