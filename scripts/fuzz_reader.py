"""Fuzz the slide reader with mutated real TIFF/SVS bytes: nothing but a clean InputError may come out.

    python scripts/fuzz_reader.py [--n 400] [--seed 0] [--timeout 20]

Seeds: the real Aperio SVS of the shared data (JPEG tiles, OpenSlide) and a small pyramidal tiled TIFF built here
from a Kumar image (deflate tiles, tiffslide). Each input is one mutation (truncate; flip bytes in the header/IFD
region; flip bytes in tile data; overwrite a run with random bytes), written to a temp file and, in a child process
with a timeout (a hang counts as a failure), opened with ``open_slide`` and read: ``info()``, a thumbnail and
three regions. It prints how many inputs were tried and the outcome counts; any other exception or a hang or a
crashed child is listed with its mutation so it can be replayed. Exit status 1 when any failure was seen.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("WSISEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def seeds(tmp: Path) -> dict[str, bytes]:
    out = {}
    svs = SHARED / "slides" / "cmu_small_region.svs"
    if svs.is_file():
        out["svs"] = svs.read_bytes()
    kumar = sorted((SHARED / "kumar" / "images").glob("*.tif"))
    if kumar:
        import tifffile

        img = tifffile.imread(kumar[0])[:512, :512, :3]
        p = tmp / "pyramid.tif"
        with tifffile.TiffWriter(p) as w:
            w.write(img, tile=(128, 128), compression="zlib", subifds=1, resolution=(40000, 40000),
                    resolutionunit="CENTIMETER", photometric="rgb")
            w.write(img[::2, ::2], tile=(128, 128), compression="zlib", subfiletype=1, photometric="rgb")
        out["pyramid"] = p.read_bytes()
    return out


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random mutation of ``data`` and a short description of it."""
    n = len(data)
    kind = rng.choice(["truncate", "header", "tiles", "run", "ifd_cut"])
    b = bytearray(data)
    if kind == "truncate":
        cut = int(rng.integers(0, n))
        return bytes(b[:cut]), f"truncate@{cut}"
    if kind == "ifd_cut":  # keep the header, cut just after the first IFD offset's target start
        cut = int(rng.integers(8, min(n, 4096)))
        return bytes(b[:cut]), f"truncate@{cut}"
    if kind == "header":  # the TIFF header and IFD entries live near the start and the IFD offsets
        k = int(rng.integers(1, 9))
        lo, hi = 0, min(n, 4096)
        pos = rng.integers(lo, hi, size=k)
    else:
        k = int(rng.integers(1, 33)) if kind == "tiles" else 1
        pos = rng.integers(0, n, size=k)
    desc = []
    for p in pos:
        if kind == "run":
            ln = int(rng.integers(1, 4096))
            b[p:p + ln] = rng.bytes(min(ln, n - p))
            desc.append(f"{p}+{ln}")
        else:
            b[p] ^= int(rng.integers(1, 256))
            desc.append(str(p))
    return bytes(b), f"{kind}:" + ",".join(desc[:8])


def exercise(path: str) -> str:
    """Open and read ``path``; returns "ok", "InputError" or raises whatever else escaped."""
    from wsiseg.core.errors import InputError
    from wsiseg.io.slide import open_slide

    try:
        with open_slide(path) as s:
            s.info()
            s.thumbnail(max_size=256)
            w, h = s.dimensions
            for x, y in ((0, 0), (w // 2, h // 2), (max(w - 100, 0), max(h - 100, 0))):
                s.read_region((x, y), 0, (256, 256))
            if len(s.levels) > 1:
                s.read_region((0, 0), len(s.levels) - 1, (128, 128))
        return "ok"
    except InputError:
        return "InputError"


def _child(path: str, q: mp.Queue) -> None:
    import warnings

    warnings.simplefilter("ignore")
    try:
        q.put(exercise(path))
    except BaseException as e:  # noqa: BLE001 - reported as a failure
        q.put("CRASH " + type(e).__name__ + ": " + str(e).splitlines()[0][:150] if str(e) else type(e).__name__)
        q.put(traceback.format_exc())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="mutated inputs to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per input before it counts as a hang")
    a = ap.parse_args(argv)
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    import openslide  # noqa: F401 - import once here: the forked children inherit it
    import tiffslide  # noqa: F401

    import wsiseg.io.slide  # noqa: F401

    rng = np.random.default_rng(a.seed)
    ctx = mp.get_context("fork")
    counts: Counter[str] = Counter()
    failures: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        base = seeds(tmp)
        if not base:
            print("no seed files (shared data absent)")
            return 0
        names = sorted(base)
        for i in range(a.n):
            name = names[i % len(names)]
            data, desc = mutate(base[name], rng)
            p = tmp / f"fuzz{i % 4}{'.svs' if name == 'svs' else '.tif'}"
            p.write_bytes(data)
            q: mp.Queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(str(p), q))
            proc.start()
            proc.join(a.timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
                res = "HANG"
            elif proc.exitcode != 0:
                res = f"CRASH exit {proc.exitcode}"
            else:
                res = q.get(timeout=5)
            counts[f"{name}:{res.split(':')[0] if res.startswith('CRASH ') else res}"] += 1
            if res not in ("ok", "InputError"):
                tb = "" if q.empty() else q.get()
                failures.append(f"{name} {desc}: {res}\n{tb}")
    dt = time.perf_counter() - t0
    print(f"fuzzed {a.n} inputs ({', '.join(names)}) in {dt:.0f} s")
    for k, v in sorted(counts.items()):
        print(f"  {k:40s} {v}")
    for f in failures[:20]:
        print("FAIL", f)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
