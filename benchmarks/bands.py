"""Seam decisions in bands of tile rows (``wsiseg.wsi.bands``) against the raster-order stitcher, on a replayed slide.

Runs ``segment_slide`` once on the synthetic all-tissue slide of ``cpu_side.py`` (replayed real Kumar predictions of
the bundled model), recording every tile's proposal as the stitcher received it; then decides those proposals
(each timing on fresh copies, best of ``--repeat``):

- ``serial``: ``Stitcher.add_proposal`` per tile and ``finish_decided``, as ``wsiseg run`` does on its main thread;
- ``bands, here``: ``stitch_bands`` in this process (every band decided here: the algorithm's own overhead);
- ``bands, N workers``: the bands decided in N worker processes; the calling thread's CPU is what stays central
  (the first-boundary checks, redecisions and the merge; the pickling of each band's candidates runs in the
  executor's feeder thread and is shown apart, as the process's CPU beyond the calling thread's).

Checks that every variant gives the serial decisions (items, masks, counts) and prints ms per tile.
``python benchmarks/bands.py --size 6000 --workers 2`` (961 tiles).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline_stages import make_mosaic, mosaic_backend  # noqa: E402
from throughput import Replay, load_tiles  # noqa: E402

import wsiseg.wsi.stitch as S  # noqa: E402
from wsiseg.api import segment_slide, set_min_score  # noqa: E402
from wsiseg.segmenters.rcnn import PDAMSegmenter  # noqa: E402
from wsiseg.wsi.bands import stitch_bands  # noqa: E402


def record(size: int, tiles: int, batch: int, weights: str) -> tuple[list[S.Proposal], S.TileGrid, float]:
    """The proposals a run of the replayed slide hands its stitcher, as they arrive (pickled before any decision)."""
    torch.set_num_threads(1)
    seg = PDAMSegmenter.from_checkpoint(weights, device="cpu")
    set_min_score(seg, 0.5)
    replay = Replay(seg, load_tiles(tiles)[0], batch)
    got: list[bytes] = []
    seen: dict = {}
    add = S.Stitcher.add_proposal

    def spy(self, p):
        got.append(pickle.dumps(p))
        seen["grid"], seen["mpp"] = self.grid, self.model_mpp
        return add(self, p)

    S.Stitcher.add_proposal = spy
    try:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_mosaic(Path(d) / "slide.tif", size)
            segment_slide(Path(d) / "slide.tif", geojson=Path(d) / "n.geojson", model=replay, batch_size=batch,
                          backend=mosaic_backend(), prefetch=False, tile_workers=0, resume=False)
    finally:
        S.Stitcher.add_proposal = add
    return [pickle.loads(b) for b in got], seen["grid"], seen["mpp"]


def fresh(props: list[S.Proposal]) -> list[S.Proposal]:
    return [replace(p, pending=[replace(c) for c in p.pending]) for p in props]


def serial(grid, mpp, props):
    st = S.Stitcher(grid, mpp)
    out = [st.add_proposal(p) for p in props]
    out.append(st.finish_decided())
    return out, st.seam_dropped


def same(a: list[S.Decided], b: list[S.Decided]) -> bool:
    return len(a) == len(b) and all(
        len(x.items) == len(y.items) and all(i[1:] == j[1:] and np.array_equal(i[0], j[0]) for i, j in
                                             zip(x.items, y.items)) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=3000, help="slide side in pixels (default 3000: 256 tiles)")
    ap.add_argument("--tiles", type=int, default=32, help="real tiles predicted once, then replayed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--band-rows", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--weights", default=str(Path(__file__).resolve().parents[1] / "wsiseg/weights/default.safetensors"))
    a = ap.parse_args(argv)
    props, grid, mpp = record(a.size, a.tiles, a.batch, a.weights)
    n = len(props)
    want, dropped = serial(grid, mpp, fresh(props))
    cands = sum(len(p.pending) for p in props)
    print(f"{a.size} px slide: {n} tiles in {grid.rows} rows, {cands} seam candidates, {dropped} dropped; bands of "
          f"{a.band_rows} rows", file=sys.stderr)
    res: dict[str, dict] = {}

    def run(name: str, f) -> None:
        best = None
        for _ in range(a.repeat):
            copies = fresh(props)
            w0, t0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            out, extra = f(copies)
            w, t, p = time.perf_counter() - w0, time.thread_time() - t0, time.process_time() - p0
            assert same(out, want), f"{name}: decisions differ from the stitcher's"
            if best is None or t < best["thread"]:
                best = {"wall": w, "thread": t, "process": p, **extra}
        res[name] = best
        more = "".join(f", {k} {v}" for k, v in best.items() if k not in ("wall", "thread", "process"))
        print(f"  {name:<22} calling thread {1000 * best['thread'] / n:6.3f} ms/tile, this process "
              f"{1000 * best['process'] / n:6.3f} ms/tile, wall {1000 * best['wall'] / n:6.3f} ms/tile{more}")

    run("serial", lambda c: (serial(grid, mpp, c)[0], {}))

    def banded(c, pool=None):
        out, counts = stitch_bands(grid, mpp, c, a.band_rows, pool)
        return out, {"bands": counts.bands, "redecided": counts.redecided}

    run("bands, here", banded)
    if a.workers:
        with ProcessPoolExecutor(a.workers) as pool:
            list(pool.map(abs, range(a.workers)))  # (started before timing)
            run(f"bands, {a.workers} workers", lambda c: banded(c, pool))
    return res


if __name__ == "__main__":
    main()
