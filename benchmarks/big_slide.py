"""Bounded memory on huge slides: peak RSS and time of ``wsiseg run --model watershed`` on synthetic pyramidal TIFFs
that are huge but mostly glass, with the same few islands of real H&E (Kumar tiles) whatever the size.

    python benchmarks/big_slide.py [--sizes 50000 200000] [--islands 2] [--keep DIR]
    python benchmarks/big_slide.py --sizes 40000 --single-level    # no pyramid: a stitching program's export

Each slide is a tiled (512 px, deflate) pyramidal TIFF at 0.25 um/px with SubIFD levels down to < 4096 px, written
from pre-encoded tiles (the one glass tile is compressed once), so a 200k x 200k slide is ~100 MB and takes seconds
to make. Each run is a separate ``python -m wsiseg.cli run`` process (GeoJSON + OME-Zarr outputs); its peak RSS comes
from ``os.wait4``. With the same tissue in every slide, peak RSS should not grow with the slide's area; the time
that does grow is the per-tile bookkeeping over the empty grid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("WSISEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TILE = 512
MPP = 0.25


def make_slide(path: Path, size: int, islands: list[tuple[int, int, np.ndarray]], single_level: bool = False) -> None:
    """A ``size`` x ``size`` RGB glass slide with ``islands`` (x, y, rgb) pasted on it, as a tiled pyramid (or, with
    ``single_level``, level 0 alone: a stitching program's export)."""
    import tifffile

    levels = []
    s = size
    while True:
        levels.append(s)
        if s < 4096 or single_level:
            break
        s = (s + 3) // 4
    white = np.full((TILE, TILE, 3), 255, np.uint8)
    glass = zlib.compress(white.tobytes(), 9)

    def tiles(level: int):
        ds = 4 ** level
        n = -(-levels[level] // TILE)
        for ty in range(n):
            for tx in range(n):
                x0, y0 = tx * TILE * ds, ty * TILE * ds
                hit = [(x, y, img) for x, y, img in islands
                       if x < x0 + TILE * ds and x + img.shape[1] > x0 and y < y0 + TILE * ds and y + img.shape[0] > y0]
                if not hit:
                    yield glass
                    continue
                t = white.copy()
                for x, y, img in hit:
                    small = img[::ds, ::ds]
                    ix, iy = x // ds - tx * TILE, y // ds - ty * TILE
                    a0, b0 = max(ix, 0), max(iy, 0)
                    a1, b1 = min(ix + small.shape[1], TILE), min(iy + small.shape[0], TILE)
                    t[b0:b1, a0:a1] = small[b0 - iy:b1 - iy, a0 - ix:a1 - ix]
                yield zlib.compress(t.tobytes(), 6)

    with tifffile.TiffWriter(path, bigtiff=True) as w:
        for i, s in enumerate(levels):
            kw = dict(subifds=len(levels) - 1 or None, resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER") \
                if i == 0 else dict(subfiletype=1)
            w.write(tiles(i), shape=(s, s, 3), dtype=np.uint8, tile=(TILE, TILE), compression="zlib",
                    photometric="rgb", **kw)


def run(slide: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "wsiseg.cli", "run", str(slide), "--model", "watershed",
                          "--out", str(out / "n.geojson"), "--zarr", str(out / "n.zarr"), "--quiet", "--overwrite"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    stdout, stderr = p.stdout.read().decode(), p.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"run failed ({code}): {stderr}")
    with open(out / "n.geojson") as f:
        n = len(json.load(f)["features"])
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": dt, "nuclei": n, "summary": stdout.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--islands", type=int, default=2, help="Kumar tiles pasted on each slide (1000 x 1000 each)")
    ap.add_argument("--single-level", action="store_true",
                    help="level 0 only, no pyramid (the overview and tissue mask must then stream: peak RSS < 1 GB)")
    ap.add_argument("--keep", help="directory to keep the slides and outputs in (default: a temp dir)")
    a = ap.parse_args(argv)
    kumar = sorted((SHARED / "kumar" / "images").glob("*.tif"))
    if not kumar:
        print("no Kumar images (shared data absent)")
        return 0
    import tifffile

    imgs = [tifffile.imread(k)[..., :3] for k in kumar[:a.islands]]
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="wsiseg-big-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"{'size':>9} {'file MB':>8} {'make s':>7} {'run s':>7} {'peak RSS MB':>12} {'nuclei':>7}")
        for size in a.sizes:
            # the same islands, placed at fixed fractions of the slide
            islands = [(int(size * f) // 16 * 16, int(size * g) // 16 * 16, img)
                       for (f, g), img in zip([(0.3, 0.4), (0.7, 0.6), (0.5, 0.2), (0.2, 0.8)], imgs)]
            slide = work / f"big{size}.tif"
            t0 = time.perf_counter()
            make_slide(slide, size, islands, single_level=a.single_level)
            t_make = time.perf_counter() - t0
            out = work / f"out{size}"
            out.mkdir(exist_ok=True)
            r = run(slide, out)
            print(f"{size:>9} {slide.stat().st_size / 1e6:>8.1f} {t_make:>7.1f} {r['seconds']:>7.1f} "
                  f"{r['peak_rss_mb']:>12.0f} {r['nuclei']:>7}", flush=True)
            if not a.keep:
                slide.unlink()
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
