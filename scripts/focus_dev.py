"""How sharp the zoom probe finds the Kumar images' nuclei under each shift, and how many it would sharpen
(:mod:`wsiseg.segmenters.focus`); no labels are read.

    python scripts/focus_dev.py --shifts none,x20,x20svs,lab,pale,dark,blur,blurry      # the development images
    python scripts/focus_dev.py --split test --shifts none,blur,blurry                  # the test images
    python scripts/focus_dev.py --part 0.5 --shifts blurry                               # the right half blurred

Per shift (``benchmarks/shift.py``'s; with ``--part F`` only the image's right F of its width is shifted): the
smallest and largest median edge width over the images (model pixels), how many the rule sharpens, how many of the
probe's tiles look out of focus on their own and how many images a run would check tile by tile (out of focus in parts:
:attr:`wsiseg.wsi.scale.Zoom.refocus`).
``--off`` is for the scoring scripts' controls: ``python scripts/focus_dev.py --off --run benchmarks/shift.py
ARGS...`` runs that script with the rule off (nothing sharpened); ``--tiles-off`` with only the tiles' own rule off
(a slide out of focus in parts not checked tile by tile, :func:`wsiseg.segmenters.focus.tile_sharpening`).
"""

from __future__ import annotations

import argparse
import functools
import runpy
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kumar import DEFAULT_DATA, dev_images, test_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--shifts", default="none,blur,blurry", help="comma-separated shifts of benchmarks/shift.py")
    ap.add_argument("--part", type=float, default=1.0, help="shift only the right PART of each image (0..1]")
    ap.add_argument("--off", action="store_true", help="the rule off: no slide is sharpened")
    ap.add_argument("--tiles-off", action="store_true", help="the tiles' own rule off: no tile sharpened on its own")
    ap.add_argument("--run", nargs=argparse.REMAINDER, default=None, metavar="SCRIPT ARGS",
                    help="run SCRIPT with ARGS (with --off: the rule off) instead of measuring")
    a = ap.parse_args(argv)
    import tifffile

    import wsiseg.segmenters.focus as focus
    from shift import macenko, parts, sample_tissue, shifted
    from wsiseg.api import load_model
    from wsiseg.io.slide import Slide
    from wsiseg.wsi.grid import plan_grid, read_tile
    from wsiseg.wsi.scale import probe

    if a.off:
        focus.BLURRED_FROM = float("inf")
    if a.tiles_off:
        focus.TILE_NUCLEI = 1 << 62
    if a.run:
        sys.argv = list(a.run)
        runpy.run_path(a.run[0], run_name="__main__")
        return 0
    seg = load_model(a.model, "cpu")
    names = dev_images(DEFAULT_DATA) if a.split == "dev" else [i for i, _ in test_images(DEFAULT_DATA)]
    shifts = [s for s in a.shifts.split(",") if s]
    lab = macenko(sample_tissue()) if any("lab" in parts(s) for s in shifts) else None
    for s in shifts:
        found = []
        for n in names:
            rgb = np.ascontiguousarray(tifffile.imread(DEFAULT_DATA / "images" / f"{n}.tif")[..., :3])
            rgb = shifted(rgb, s if a.part >= 1 else f"{s}@{a.part:g}", lab)  # (shift.py's S@F: the right part)
            slide = Slide.from_array(rgb, 0.25)

            def tiles_at(zoom, slide=slide):
                grid = plan_grid(seg, slide.dimensions, 0.25, zoom=zoom)
                return functools.partial(read_tile, slide, grid), grid.tiles(None)

            found.append(probe(seg, tiles_at))
        edges = [z.edge_px for z in found if z.edge_px is not None]
        checked = sum(z.refocus for z in found)
        print(f"{s} ({a.split}, part {a.part:g}): median edge width {min(edges):.2f} - {max(edges):.2f} px over "
              f"{len(edges)} images; sharpened {sum(z.sharpen_px > 0 for z in found)} of {len(found)}; tiles out of "
              f"focus on their own {sum(z.blurred_tiles for z in found)} of {sum(z.tiles for z in found)}, "
              f"checked tile by tile {checked}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
