"""The CPU side of ``wsiseg run`` alone (reading, stitching, writing), split by function.

Runs ``segment_slide`` on a synthetic all-tissue slide (``pipeline_stages.make_mosaic``) with a segmenter that replays
the bundled model's predictions of real Kumar tiles at no cost (``throughput.Replay``), in a predicting thread as a
run on a GPU makes them, so the figures are what a GPU fast enough to be free would leave: the pipeline's own
ceiling. Prints the main thread's CPU time per tile (the figure to compare versions by on a shared machine: other
processes move it less than the wall clock), the stage seconds of ``RunSummary`` and the seconds spent in the main
functions of the stitcher and the writers (inclusive; some nest), as shares of the wall clock.
``python benchmarks/cpu_side.py --size 8000`` (1764 tiles, about 40 s here); ``--warm``: a small slide first, so that
the figures are those of a cohort's later slide (no first imports).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from pipeline_stages import make_mosaic, mosaic_backend  # noqa: E402
from throughput import Replay, load_tiles  # noqa: E402

import wsiseg.export.geojson as G  # noqa: E402
import wsiseg.wsi.resume as J  # noqa: E402
import wsiseg.wsi.run as R  # noqa: E402
import wsiseg.export.zarr_labels as Z  # noqa: E402
import wsiseg.wsi.stitch as S  # noqa: E402
import wsiseg.parallel.tiles as T  # noqa: E402
from wsiseg.api import segment_slide, set_min_score  # noqa: E402
from wsiseg.segmenters.rcnn import PDAMSegmenter  # noqa: E402

SECONDS: dict[str, float] = {}  # wall seconds by function
CPU: dict[str, float] = {}  # the calling thread's CPU seconds by function


def timed(owner, name: str, key: str, clock=time.perf_counter, into: dict[str, float] = SECONDS) -> None:
    """``owner.name`` wrapped to add the ``clock`` seconds of each call to ``into[key]``."""
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapper(*a, **k):
        t0 = clock()
        try:
            return f(*a, **k)
        finally:
            into[key] = into.get(key, 0.0) + clock() - t0

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=3000, help="slide side in pixels (default 3000: 256 tiles)")
    ap.add_argument("--tiles", type=int, default=32, help="real tiles predicted once, then replayed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tile-workers", type=int, default=0,
                    help="processes preparing tiles: candidates, outlines, GeoJSON encoding (default: 0, all in the "
                         "main process, so that the functions below are timed; with workers they run there, untimed)")
    ap.add_argument("--paint-process", choices=("auto", "on", "off"), default="auto",
                    help="paint the zarr labels in a process of their own (auto: segment_slide's, on with tile "
                         "workers); then 'zarr painting' and 'zarr chunks out' time only the hand-over")
    ap.add_argument("--geojson-process", choices=("auto", "on", "off"), default="auto",
                    help="write the GeoJSON in a process of its own (auto: segment_slide's, on with tile workers); "
                         "then 'write: GeoJSON' times only the hand-over")
    ap.add_argument("--prefetch", choices=("on", "off"), default="on",
                    help="replay the predictions in a predicting thread (on, the default: as a run with tile workers "
                         "predicts, on a GPU, where both are on by default) or in the main thread between its "
                         "batches (off: as the figures before the twentieth session were measured)")
    ap.add_argument("--warm", action="store_true",
                    help="segment a small slide first, as a cohort's earlier slide would, so that what a process pays "
                         "once (importing the slide reader and the writers' libraries, first calls) is out of the "
                         "figures: the main thread's cost per slide in a cohort")
    ap.add_argument("--weights", default=str(Path(__file__).resolve().parents[1] / "wsiseg/weights/default.safetensors"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    seg = PDAMSegmenter.from_checkpoint(a.weights, device="cpu")
    set_min_score(seg, 0.5)  # below the bundled threshold (more nuclei to stitch); as in earlier sessions' figures
    tiles, _ = load_tiles(a.tiles)
    replay = Replay(seg, tiles, a.batch)
    for owner, name, key in ((T, "propose", "stitch: tile candidates (tile workers' share)"),
                             (S.Stitcher, "_decide", "stitch: seam decisions"),
                             (T, "outline_items", "outlines + measurements (tile workers' share)"),
                             (G, "features_parts", "GeoJSON encoding (tile workers' share)"),
                             (G.GeoJSONWriter, "write", "write: GeoJSON (all but the encoding)"),
                             (Z.ZarrLabelWriter, "write", "write: zarr painting"),
                             (Z.ZarrLabelWriter, "flush_above", "write: zarr chunks out (all levels)"),
                             (Z.ZarrLabelWriter, "_finish_canvas", "write: zarr last chunks (at the end)"),
                             (Z.ZarrLabelWriter, "_pyramid", "write: zarr pyramid rebuilt (at the end; rare)"),
                             (Z.ZarrLabelWriter, "_metadata", "write: zarr metadata + overview (at the end)"),
                             (G.GeoJSONWriter, "__exit__", "write: GeoJSON closing (at the end)"),
                             (J.ResumeJournal, "checkpoint", "journal checkpoints")):
        timed(owner, name, key)
    timed(R.SlideRun, "stitch_all", "stitch loop", time.thread_time, CPU)  # (the main thread's CPU in the loop)
    for owner, name, key in ((T.TilePool, "submit", "handing tiles to the workers (TilePool.submit)"),
                             (T.TilePool, "_collect", "receiving their results (TilePool._collect)"),
                             (T, "unpack_blocks", "unpacking those (unpack_blocks)"),
                             (R.SlideRun, "_checkpoint", "journal checkpoints (SlideRun._checkpoint)"),
                             (T.TilePool, "stage", "predicting thread: tiles into the slab (TilePool.stage)")):
        timed(owner, name, key, time.thread_time, CPU)  # (each in the thread that calls it)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slide = Path(d) / "slide.tif"
        make_mosaic(slide, a.size)
        if a.warm:  # (its times are not kept: the timed functions' sums start again below)
            make_mosaic(Path(d) / "warm.tif", 1000)
            segment_slide(Path(d) / "warm.tif", geojson=Path(d) / "w.geojson", zarr=Path(d) / "w.zarr", model=replay,
                          batch_size=a.batch, backend=mosaic_backend(), prefetch=a.prefetch == "on",
                          tile_workers=a.tile_workers)
            SECONDS.clear()
            CPU.clear()
            replay.i = 0  # (the same predictions as without the warm-up)
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        s = segment_slide(slide, geojson=Path(d) / "n.geojson", zarr=Path(d) / "n.zarr", model=replay,
                          batch_size=a.batch, backend=mosaic_backend(), prefetch=a.prefetch == "on",
                          tile_workers=a.tile_workers,
                          paint_process={"auto": None, "on": True, "off": False}[a.paint_process],
                          geojson_process={"auto": None, "on": True, "off": False}[a.geojson_process])
        wall, main_cpu, proc_cpu = time.perf_counter() - t0, time.thread_time() - c0, time.process_time() - p0
    n = s.tiles_segmented
    steady = wall - s.stage_seconds["tissue"]  # without the per-slide tissue mask and overview
    print(f"{a.size} px slide{' (after a warm-up slide)' if a.warm else ''}, {n} tiles, {s.nuclei} nuclei (replayed), "
          f"{a.tile_workers} tile workers, paint process "
          f"{a.paint_process}, GeoJSON process {a.geojson_process}: {wall:.2f} s, {n / wall:.1f} tiles/s; "
          f"{n / steady:.1f} tiles/s without the tissue mask and overview (a fixed cost per slide)")
    print(f"main thread CPU {1000 * main_cpu / n:.2f} ms/tile (tissue mask included; what bounds a run whose predictor "
          "and helpers keep up; other load on the machine moves it less than the wall clock)")
    print(f"main process CPU {1000 * proc_cpu / n:.2f} ms/tile (all its threads: the main thread, the reading "
          "threads, the replayed predictor's thread; not the tile workers, the painter or the GeoJSON writer)")
    loop_cpu = CPU.get("stitch loop", 0.0)
    print(f"  of which the stitch loop {1000 * loop_cpu / n:.2f} ms/tile (grows with the tiles); before and after it "
          f"{1000 * (main_cpu - loop_cpu) / n:.2f} ms/tile (model, slide, tissue mask, writers' commits: fixed per "
          "slide)")
    print("stages (ms/tile): " + ", ".join(f"{k} {1000 * v / n:.2f}" for k, v in s.stage_seconds.items()
                                          if k not in ("segment", "segment_wait")))
    for k, v in SECONDS.items():
        print(f"  {k:<48}{v:7.2f} s {100 * v / wall:5.1f}%")
    print("thread CPU by function (ms/tile, inclusive: collecting happens inside handing too, unpacking inside "
          "collecting):")
    for k, v in CPU.items():
        if k != "stitch loop":
            print(f"  {k:<64}{1000 * v / n:6.3f}")
    return {"wall": wall, "main_thread_cpu": main_cpu, "main_process_cpu": proc_cpu, "loop_cpu": loop_cpu,
            "steady_tiles_per_s": n / steady,
            "tiles": n, "nuclei": s.nuclei, "stages": s.stage_seconds, "functions": dict(SECONDS)}


if __name__ == "__main__":
    main()
