"""The fast path on a card, looked into: how fast it is alone and when other Python threads want the interpreter lock
(as the main loop and the reading threads do inside ``wsiseg run``), where a batch's time goes (torch.profiler: the
CUDA kernels, the host's calls), how busy the GPU is, and how many kernel launches and host<->device synchronisations a
batch makes; for variants of the predictor's options.

    python benchmarks/gpu_profile.py --weights wsiseg/weights/default.safetensors --min-score 0.5 --amp fp16
    python benchmarks/gpu_profile.py --config r101 --dets 100 --amp fp16 --variants base,graphs

Variants (comma-separated): ``base`` (the defaults: on CUDA the backbone replayed as a CUDA graph), ``eager`` (no CUDA
graph), ``cudnn`` (cuDNN autotuning on), ``cl`` (channels-last), and ``+``-joined mixes (``eager+cudnn``). Each is
timed alone and with ``--spinners`` pure-Python threads spinning at ``wsiseg run``'s switch interval (on
``--contended-tiles``), and checked
against ``base`` (the same instances per tile). ``--profile-batches N``: the profiler's table for ``base`` (and for
every variant with ``--profile-all``). On a CPU the CUDA-only variants equal ``base`` (a smoke run of the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import build_model, load_tiles, timed  # noqa: E402
from wsiseg.segmenters.rcnn import PDAMSegmenter, resolve_device  # noqa: E402

SWITCH = 0.0005  # wsiseg run's switch interval (core.runtime.quick_gil_handover)


def segmenter(model, device, amp, variant: str) -> PDAMSegmenter:
    parts = set(variant.split("+")) - {"base"}
    unknown = parts - {"eager", "cudnn", "cl"}
    if unknown:
        raise SystemExit(f"unknown variant part(s): {', '.join(sorted(unknown))}")
    return PDAMSegmenter(model, 0.25, 64, device=device, amp=amp, channels_last="cl" in parts,
                         cuda_graphs="eager" not in parts)


def run_all(seg: PDAMSegmenter, tiles: np.ndarray, batch: int, device) -> tuple[float, list]:
    """:func:`throughput.timed` of ``seg.predict`` over ``tiles``, and the instances of the timed pass."""
    out: list = []
    sec = timed(lambda t: out.extend(seg.predict(t)), tiles, batch, device)
    return sec, out[len(out) - len(tiles):]


def contended(fn, spinners: int):
    """``fn()`` while ``spinners`` threads run pure Python (they hold the interpreter lock until the switch interval
    hands it over), at wsiseg run's switch interval."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(2000):
                x += i

    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH)
    threads = [threading.Thread(target=spin, daemon=True) for _ in range(spinners)]
    for t in threads:
        t.start()
    try:
        return fn()
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)


def same(a: list, b: list) -> float:
    """Share of tiles whose label images are identical."""
    return float(np.mean([np.array_equal(x.labels, y.labels) for x, y in zip(a, b)]))


def profile(seg: PDAMSegmenter, tiles: np.ndarray, batch: int, device, batches: int, trace: Path | None) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    seg.predict(tiles[:batch])
    with tprofile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(batches):
            s = (i * batch) % max(1, len(tiles) - batch + 1)
            seg.predict(tiles[s : s + batch])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    ev = prof.key_averages()

    def dev_self(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    calls = {name: 0 for name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaStreamSynchronize",
                                  "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize",
                                  "cudaGraphLaunch")}
    kernel_us = 0.0
    for e in ev:
        if e.key in calls:
            calls[e.key] += e.count
    for e in prof.events():
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
            kernel_us += e.time_range.elapsed_us()
    ops = sum(e.count for e in ev if e.key.startswith("aten::"))
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = ev.table(sort_by=sort, row_limit=30, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):
        table = ev.table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                         row_limit=30, max_name_column_width=60)
    cpu_table = ev.table(sort_by="count", row_limit=25, max_name_column_width=60)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    res = {"batches": batches, "wall_ms_per_batch": 1000 * wall / batches,
           "gpu_kernel_ms_per_batch": kernel_us / 1000 / batches,
           "aten_ops_per_batch": ops / batches,
           "calls_per_batch": {k: v / batches for k, v in calls.items() if v},
           "top_device": table, "top_count": cpu_table, "top_self_device": [
               (e.key, dev_self(e) / 1000 / batches, e.count / batches)
               for e in sorted(ev, key=dev_self, reverse=True)[:40]]}
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["lite", "r101"], default="lite")
    ap.add_argument("--dets", type=int, default=50)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--min-score", type=float, default=None)
    ap.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=None, help="tiles per batch (default 8 CPU, 128 CUDA)")
    ap.add_argument("--tiles", type=int, default=None, help="tiles timed (default 16 CPU, 1024 CUDA)")
    ap.add_argument("--variants", default="base,eager")
    ap.add_argument("--contended-tiles", type=int, default=None,
                    help="tiles of the contended timing (default: a batch)")
    ap.add_argument("--spinners", type=int, default=2, help="pure-Python threads in the contended timing")
    ap.add_argument("--profile-batches", type=int, default=2)
    ap.add_argument("--profile-all", action="store_true")
    ap.add_argument("--trace", type=Path, default=None, help="base's chrome trace (json) here")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    batch, ntiles = a.batch or (128 if cuda else 8), a.tiles or (1024 if cuda else 16)
    amp = None if a.amp == "none" else a.amp
    model, desc, _ = build_model(a.config, a.dets, a.weights, a.min_score)
    tiles, src = load_tiles(ntiles)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"{desc} | {name} | amp {a.amp} | batch {batch} | {ntiles} tiles ({src})", flush=True)
    res: dict = {"model": desc, "device": name, "amp": a.amp, "batch": batch, "tiles": ntiles, "variants": {}}
    base_out = None
    for variant in [v for v in a.variants.split(",") if v]:
        bench = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = "cudnn" in variant.split("+")
        try:
            seg = segmenter(model, device, amp, variant)
            sec, out = run_all(seg, tiles, batch, device)
            few = tiles[: a.contended_tiles or batch]
            csec, cout = contended(lambda: run_all(seg, few, batch, device), a.spinners)
            seg.profile, seg.timings = True, {}
            for s in range(0, ntiles, batch):
                seg.predict(tiles[s : s + batch])
            seg.profile = False
            r = {"tiles_per_s": ntiles / sec, "ms_per_tile": 1000 * sec / ntiles,
                 "contended_tiles_per_s": len(few) / csec, "contended_ms_per_tile": 1000 * csec / len(few),
                 "stages_ms_per_tile": {k: 1000 * v / ntiles for k, v in seg.timings.items()},
                 "instances_per_tile": float(np.mean([o.count for o in out])),
                 "same_as_contended": same(out, cout)}
            if base_out is None:
                base_out = out
            r["same_as_base"] = same(out, base_out)
            print(f"{variant}: {r['tiles_per_s']:.1f} tiles/s ({r['ms_per_tile']:.3f} ms/tile) alone, "
                  f"{r['contended_tiles_per_s']:.1f} ({r['contended_ms_per_tile']:.3f}) with {a.spinners} spinning "
                  f"threads; {r['instances_per_tile']:.1f} instances/tile; identical tiles vs base "
                  f"{100 * r['same_as_base']:.1f}%; stages "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["stages_ms_per_tile"].items()), flush=True)
            if a.profile_batches and (base_out is out or a.profile_all):
                p = profile(seg, tiles, batch, device, a.profile_batches,
                            a.trace if base_out is out else None)
                print(f"{variant} profiled over {p['batches']} batches: wall {p['wall_ms_per_batch']:.1f} ms/batch, "
                      f"GPU kernels {p['gpu_kernel_ms_per_batch']:.1f} ms/batch, aten ops "
                      f"{p['aten_ops_per_batch']:.0f}/batch, calls/batch {p['calls_per_batch']}", flush=True)
                print(p["top_device"], flush=True)
                print(p["top_count"], flush=True)
                r["profile"] = {k: v for k, v in p.items() if k not in ("top_device", "top_count")}
            res["variants"][variant] = r
        except Exception as e:  # one variant failing must not cost the others' figures
            print(f"{variant} FAILED: {type(e).__name__}: {e}", flush=True)
            res["variants"][variant] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            torch.backends.cudnn.benchmark = bench
    if cuda:
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
