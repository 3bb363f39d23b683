"""Reading tiles as a run's reading threads do (``wsi.grid.read_one``: a cached handle by path, one 256 px tile at
the slide's full resolution), one thread, so the figure is the CPU a tile's read costs; then a profile of the reads.

    python benchmarks/read_tiles.py [SLIDE] [--backend openslide|tiffslide] [--tiles 400] [--profile 12]

SLIDE defaults to the bundled sample. Prints ms per tile and the functions that took the most time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from wsiseg.io.slide import cached_slide
from wsiseg.wsi.grid import TileGrid, read_one


def main() -> None:
    from wsiseg.api import sample_slide

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide", nargs="?", default=None)
    ap.add_argument("--backend", default="openslide", choices=["openslide", "tiffslide"])
    ap.add_argument("--tiles", type=int, default=400)
    ap.add_argument("--profile", type=int, default=12, metavar="N", help="functions listed (0: no profile)")
    a = ap.parse_args()
    path = str(a.slide or sample_slide())
    s = cached_slide(path, a.backend)
    grid = TileGrid(s.levels[0].width, s.levels[0].height, 256, 32, 1.0)
    tiles = [(r, c) for r in range(grid.rows) for c in range(grid.cols)][:a.tiles]
    for r, c in tiles[:20]:  # warm: the handle, the decoder's caches
        read_one(path, a.backend, grid, r, c)
    t = time.perf_counter()
    for r, c in tiles:
        read_one(path, a.backend, grid, r, c)
    print(f"{path} ({a.backend}): {1000 * (time.perf_counter() - t) / len(tiles):.3f} ms per tile read, "
          f"{len(tiles)} tiles, one thread")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for r, c in tiles:
            read_one(path, a.backend, grid, r, c)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
