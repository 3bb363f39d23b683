"""Whole-slide pipeline throughput per stage and peak RSS on large all-tissue slides (issue 2's benchmark).

Builds pyramidal JPEG TIFFs (0.25 um/px, 512 px tiles, levels /1 /4 /16) that are mosaics of the real Kumar H&E
tiles (random image and flip per 1000 px block), then runs ``segment_slide`` (GeoJSON + OME-Zarr) on each in a
fresh process and prints, per size: tiles, nuclei, tiles/s for each stage (read = time the segmenter waited for
tiles, segment, stitch, write) and end to end, and the process's peak RSS (``os.wait4``).

    python benchmarks/pipeline_stages.py [--sizes 6000 12000] [--model watershed] [--batch 16]

Peak RSS should stay flat as the slide grows: tiles stream in a bounded queue, nuclei stream to disk, and the zarr
writer holds only the chunk rows that tiles can still touch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("WSISEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TILE = 512


def _have_imagecodecs() -> bool:
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True


def mosaic_backend() -> str:
    """The slide backend that reads :func:`make_mosaic`'s file here: tiffslide needs imagecodecs; without it the
    mosaic is deflate-compressed and read with OpenSlide."""
    return "auto" if _have_imagecodecs() else "openslide"


def make_mosaic(path: Path, size: int, seed: int = 0) -> None:
    import cv2
    import tifffile

    imgs = [tifffile.imread(p)[..., :3] for p in sorted((SHARED / "kumar" / "images").glob("*.tif"))]
    if not imgs:
        sys.exit(f"no Kumar images under {SHARED / 'kumar' / 'images'} (set WSISEG_SHARED_DATA)")
    rng = np.random.default_rng(seed)
    nb = (size + 999) // 1000
    choice = rng.integers(0, len(imgs), size=(nb, nb))
    flips = rng.integers(0, 4, size=(nb, nb))

    def block(i: int, j: int, ds: int) -> np.ndarray:
        im = imgs[choice[i, j]]
        if flips[i, j] & 1:
            im = im[:, ::-1]
        if flips[i, j] & 2:
            im = im[::-1]
        if ds > 1:
            im = cv2.resize(np.ascontiguousarray(im), (1000 // ds, 1000 // ds), interpolation=cv2.INTER_AREA)
        return im

    def tiles(ds: int):
        s = size // ds
        b = 1000 // ds
        for y in range(0, s, TILE):
            for x in range(0, s, TILE):
                t = np.full((TILE, TILE, 3), 255, np.uint8)
                # fill from the blocks overlapping this tile
                for bi in range(y // b, min((y + TILE - 1) // b, nb - 1) + 1):
                    for bj in range(x // b, min((x + TILE - 1) // b, nb - 1) + 1):
                        blk = block(bi, bj, ds)
                        y0, x0 = bi * b, bj * b
                        ys0, ys1 = max(y, y0), min(y + TILE, y0 + b, s)
                        xs0, xs1 = max(x, x0), min(x + TILE, x0 + b, s)
                        if ys1 > ys0 and xs1 > xs0:
                            t[ys0 - y:ys1 - y, xs0 - x:xs1 - x] = blk[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0]
                yield t

    # JPEG as scanners write it; deflate where imagecodecs is missing (the device machine, to save the carry)
    comp = dict(compression="jpeg", compressionargs={"level": 90}) if _have_imagecodecs() else dict(compression="zlib")
    kw = dict(tile=(TILE, TILE), photometric="rgb", **comp,
              resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER", dtype=np.uint8)
    # the reduced levels: SubIFDs of level 0 where tiffslide reads the file; top-level pages for OpenSlide, whose
    # generic-TIFF reader sees no SubIFD and would read the whole of level 0 for every overview (5 s at 8000 px)
    sub = dict(subifds=2) if _have_imagecodecs() else {}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(1), shape=(size, size, 3), **sub, **kw)
        for ds in (4, 16):
            tw.write(tiles(ds), shape=(size // ds, size // ds, 3), subfiletype=1, **kw)


CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from wsiseg.api import segment_slide
s = segment_slide(sys.argv[1], geojson=sys.argv[2], zarr=sys.argv[3], model=sys.argv[4], batch_size=int(sys.argv[5]),
                  zoom=1)
print(json.dumps({"tiles": s.tiles_segmented, "nuclei": s.nuclei, "seconds": s.seconds, "stages": s.stage_seconds}))
"""


def run(slide: Path, out: Path, model: str, batch: int) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(slide), str(out / "n.geojson"), str(out / "n.zarr"), model,
                          str(batch)], stdout=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    stdout = p.stdout.read().decode()
    if status != 0:
        raise SystemExit(f"run failed on {slide}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[6000, 12000])
    ap.add_argument("--model", default="watershed")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    if not (SHARED / "kumar" / "images").is_dir():
        raise SystemExit(f"Kumar images not found under {SHARED}")
    print(f"{'size':>7} {'tiles':>6} {'nuclei':>7} {'read/s':>8} {'seg/s':>7} {'stitch/s':>9} {'write/s':>8} "
          f"{'end2end/s':>9} {'peakRSS MB':>10}")
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            slide = Path(d) / f"mosaic_{size}.tif"
            make_mosaic(slide, size)
            out = Path(d) / f"out_{size}"
            out.mkdir()
            r = run(slide, out, args.model, args.batch)
            st = r["stages"]
            n = r["tiles"]

            def rate(k: str) -> str:
                return f"{n / st[k]:.0f}" if st.get(k) else "-"

            print(f"{size:>7} {n:>6} {r['nuclei']:>7} {rate('read_wait'):>8} {rate('segment'):>7} "
                  f"{rate('stitch'):>9} {rate('write'):>8} {n / r['seconds']:>9.1f} {r['peak_rss_mb']:>10.0f}")
    print("read/s counts only the time the segmenter waited for tiles (reads overlap segmentation).")


if __name__ == "__main__":
    main()
