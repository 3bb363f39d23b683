"""Cohort throughput on a dask.distributed LocalCluster: slides/minute with 1 and 2 worker processes (and the
single-process loop of ``wsiseg run`` for reference), on real Kumar H&E tiles treated as small slides.

    python benchmarks/cohort.py                      # 8 Kumar images (1000x1000), watershed, workers 1 and 2
    python benchmarks/cohort.py --slides 12 --workers 1 2 4 --model path/to/pdam.safetensors

Timings exclude cluster start-up (printed separately): the cluster is started, the model plugin registered (the
model loaded once per worker), then the cohort is timed. Each worker is one process with one thread (and one
BLAS/OpenMP thread), so on a machine with C free cores N <= C workers scale about linearly while slides outnumber
workers; the last slides of a cohort leave workers idle (a tail of at most one slide per worker).

How the design maps to a multi-node cluster
-------------------------------------------
``wsiseg run`` submits one dask task per slide. Per slide, the network carries the slide's path and its output
paths to a worker (a few hundred bytes) and a small summary dict back (tiles, nuclei, seconds, worker); pixels,
polygons and weights never cross it. So slides and the output directory must be on storage every worker sees at the
same path (NFS/Lustre/GPFS, or an object-store mount), and paths are resolved to absolute paths on the client.
The model is loaded once per worker by a dask WorkerPlugin (also on workers that join or restart later); a worker
that dies loses only its in-flight slides, which the scheduler gives to other workers (tasks also have
``retries=2``); outputs appear atomically, and a re-run skips slides whose outputs all exist. GeoJSON ids are
deterministic (seeded from the input and the parameters), so a slide redone anywhere writes the same file, and a
slide whose worker died mid-slide resumes from the journal of finished tile rows its killed attempt left.

Pointing wsiseg at a cluster: start a scheduler and workers any way dask supports, then pass its address:

    # SLURM/PBS/SGE with dask-jobqueue (in Python, on the login node):
    #   from dask_jobqueue import SLURMCluster
    #   cluster = SLURMCluster(cores=1, processes=1, memory="16GB", job_extra_directives=["--gres=gpu:1"])
    #   cluster.scale(jobs=16); print(cluster.scheduler_address)
    # Kubernetes (dask-kubernetes operator / helm chart): use the scheduler service address.
    # By hand: `dask scheduler` on one node, `dask worker tcp://host:8786 --nthreads 1` on each other node
    #   (on GPU nodes: `dask cuda worker tcp://host:8786`, one worker per GPU).
    wsiseg run /shared/slides/ --out-dir /shared/results --scheduler tcp://host:8786 --manifest /shared/run.csv

Workers need wsiseg (same version) installed; one thread per worker is the intended setting (a model serves one
slide at a time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
KUMAR = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "kumar" / "images"


def _args(model: str, out_manifest: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(scheduler=None, cluster="local", workers=None, manifest=out_manifest, model=model,
                              device="cpu", mpp=0.25, zoom=1, tile_size=256, overlap=None, batch_size=None,
                              use_tissue_mask=True, backend="auto", overwrite=True, quiet=True)


def _jobs(images: list[Path], out: Path) -> list:
    return [(p, {"geojson": str(out / f"{p.stem}.geojson"), "zarr": None, "preview": None}) for p in images]


def run_single(images: list[Path], model: str, out: Path) -> tuple[float, int, int]:
    from wsiseg.api import load_model, segment_slide
    seg = load_model(model, "cpu")
    t0 = time.perf_counter()
    tiles = nuclei = 0
    for p, outs in _jobs(images, out):
        s = segment_slide(p, geojson=outs["geojson"], model=seg, mpp=0.25, zoom=1)  # (the images' own scale)
        tiles += s.tiles_segmented
        nuclei += s.nuclei
    return time.perf_counter() - t0, tiles, nuclei


def run_cluster(images: list[Path], model: str, workers: int, out: Path) -> tuple[float, float, int, int]:
    import contextlib
    import io
    import json

    import distributed

    from wsiseg.parallel.cohort import ModelPlugin, run_cohort

    t0 = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=":0", silence_logs=40)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        plugin = ModelPlugin(model, "cpu")
        client.register_plugin(plugin, name=plugin.key)  # what run_cohort does; here outside the timing
        startup = time.perf_counter() - t0
        man = out / "manifest.json"
        t1 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rc = run_cohort(_jobs(images, out), _args(model, str(man)), client=client)
        wall = time.perf_counter() - t1
        if rc != 0:
            raise SystemExit(f"cohort failed with exit code {rc}")
        rows = json.loads(man.read_text())["slides"]
        return startup, wall, sum(r["tiles_segmented"] for r in rows), sum(r["nuclei"] for r in rows)
    finally:
        client.close()
        cluster.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=8, help="how many Kumar images (default 8)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="watershed")
    ap.add_argument("--no-single", action="store_true", help="skip the single-process reference")
    a = ap.parse_args()
    if not KUMAR.exists():
        print(f"benchmark data not present: {KUMAR}", file=sys.stderr)
        return 1
    images = sorted(KUMAR.glob("*.tif"))[: a.slides]
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cohort of {len(images)} Kumar images (1000x1000 px at 0.25 um/px), model {a.model}, CPU; "
          f"{os.cpu_count()} cores, load average {load:.1f} at start (other processes share the cores)")
    print(f"{'run':<22}{'start-up s':>11}{'wall s':>9}{'slides/min':>12}{'tiles/s':>9}{'nuclei':>9}")
    tmp = Path(tempfile.mkdtemp(prefix="wsiseg-cohort-"))
    try:
        if not a.no_single:
            out = tmp / "single"
            out.mkdir()
            wall, tiles, nuclei = run_single(images, a.model, out)
            print(f"{'single process':<22}{'-':>11}{wall:>9.1f}{len(images) / wall * 60:>12.1f}{tiles / wall:>9.1f}"
                  f"{nuclei:>9}")
        for w in a.workers:
            out = tmp / f"w{w}"
            out.mkdir()
            startup, wall, tiles, nuclei = run_cluster(images, a.model, w, out)
            print(f"{f'LocalCluster {w} worker' + ('s' if w > 1 else ''):<22}{startup:>11.1f}{wall:>9.1f}"
                  f"{len(images) / wall * 60:>12.1f}{tiles / wall:>9.1f}{nuclei:>9}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
