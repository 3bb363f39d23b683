"""Predictor throughput: backbone ceiling vs stock torchvision vs the fast batched path, per stage, in one run.

    python benchmarks/throughput.py --config lite --tiles 16 --batch 8 --dets 50 --threads 2          # CPU
    python benchmarks/throughput.py --config r101 --amp fp16 --tiles 2048 --batch 128 --dets 100     # GPU
    python benchmarks/throughput.py --weights runs/kumar_lite/model.safetensors --threads 1 --e2e 4000  # + slide

Prints tiles/s for: the backbone + FPN alone (the compute ceiling), the stock torchvision path (``model(images)``,
incl. its per-image post-processing and per-instance mask pasting), the simple segmenter (stock + the overlap
rule in plain code), and the fast path (``PDAMSegmenter``), the fast path per stage (backbone, rpn, roi box, mask
head, postprocess), the ratios (fast/stock, fast overhead over the backbone), peak RSS and peak GPU memory.
Models are random-initialised PDAMs built from ``configs/pdam_{lite,r101}.yaml`` (a torchvision ResNet-FPN of that
depth if the PDAM builder is missing), with the RoI score threshold at 0 and ``--dets`` detections kept per tile
so that the heads see a realistic (or heavier) load; or, with ``--weights``, a trained checkpoint at its own test
settings. Inputs: 256x256 crops of the Kumar images when present.

``--e2e SIZE`` also runs ``wsiseg run``'s whole pipeline (``segment_slide``: read -> segment -> stitch -> GeoJSON +
OME-Zarr) with the same segmenter on a SIZE x SIZE px all-tissue pyramidal TIFF of Kumar tiles (0.25 um/px; built
as in ``benchmarks/pipeline_stages.py``) and prints end-to-end tiles/s, each stage's ms/tile and the overhead of
everything after the backbone (heads, post-processing, stitching, writing) over the backbone alone, all wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsiseg.wsi.run import _prefetch_pays  # noqa: E402
from wsiseg.segmenters.rcnn import PDAMSegmenter, resolve_device  # noqa: E402

KUMAR = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "kumar" / "images"


def build_model(config: str, dets: int, weights: Path | None = None,
                min_score: float | None = None) -> tuple[torch.nn.Module, str, object]:
    """A random-init model that keeps ``dets`` detections per tile (or the trained ``weights`` at their own test
    settings, or keeping detections scoring >= ``min_score``); returns (model, description, its PDAMConfig or None
    for the stand-in torchvision model)."""
    cfg = None
    if weights is not None:
        from wsiseg.models.checkpoint import load_pdam

        model, cfg = load_pdam(weights)
        if min_score is not None:
            model.roi_heads.score_thresh = min_score
        return model.eval(), f"trained {cfg.name} ({weights}, score >= {model.roi_heads.score_thresh})", cfg
    try:
        from wsiseg.models.pdam import build_pdam
        from wsiseg.train.trainer import load_run_config

        cfg = load_run_config(ROOT / "configs" / f"pdam_{config}.yaml").model
        cfg.roi.score_thresh, cfg.roi.detections_per_img = 0.0, dets
        torch.manual_seed(0)
        model, desc = build_pdam(cfg), f"PDAM {cfg.name} (configs/pdam_{config}.yaml)"
    except ImportError:
        from functools import partial

        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        depth = {"lite": 18, "r101": 101}[config]
        torch.manual_seed(0)
        gn = partial(torch.nn.GroupNorm, 32)
        bb = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, trainable_layers=5, norm_layer=gn)
        anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
        model = MaskRCNN(bb, num_classes=2, min_size=256, max_size=256, rpn_anchor_generator=anchors,
                         box_score_thresh=0.0, box_detections_per_img=dets)
        desc = f"torchvision ResNet-{depth}-FPN-GN Mask R-CNN (PDAM builder missing)"
    with torch.no_grad():  # saturate the random mask logits so masks are blobs, not noise around 0.5
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(100)
    return model.eval(), desc, cfg


def as_file(seg: PDAMSegmenter, model: torch.nn.Module, cfg, folder: str) -> bool:
    """Save ``model`` (random init included) as a checkpoint in ``folder`` and make it ``seg``'s source, so that
    ``segment_slide(predict_process=True)`` can load it in its process; False for the stand-in torchvision model."""
    if cfg is None:
        return False
    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.config import to_dict

    path = Path(folder) / "model.safetensors"
    save_checkpoint(path, model, config=to_dict(cfg), mpp=seg.mpp)
    seg.source = str(path)
    return True


def load_tiles(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(seed)
    paths = sorted(KUMAR.glob("*.tif")) if KUMAR.is_dir() else []
    if not paths:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "random uint8"
    import tifffile

    imgs = [tifffile.imread(p)[..., :3] for p in paths[: min(len(paths), 8)]]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = imgs[i % len(imgs)]
        y, x = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        out[i] = im[y : y + size, x : x + size]
    return out, f"Kumar crops ({len(imgs)} images)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter


def timed(fn, tiles: np.ndarray, batch: int, device: torch.device) -> float:
    """Seconds (of ``CLOCK``) for ``fn`` over all tiles in batches (after one warm-up batch)."""
    fn(tiles[:batch])
    sync(device)
    t0 = CLOCK()
    for s in range(0, len(tiles), batch):
        fn(tiles[s : s + batch])
    sync(device)
    return CLOCK() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["lite", "r101"], default="lite")
    ap.add_argument("--batch", type=int, default=None, help="tiles per batch (default 8 CPU, 128 CUDA)")
    ap.add_argument("--tiles", type=int, default=None, help="tiles timed per path (default 16 CPU, 1024 CUDA)")
    ap.add_argument("--dets", type=int, default=50, help="detections kept per tile (score threshold 0)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", choices=["none", "fp16", "bf16"], default="none")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--stock-tiles", type=int, default=None, help="tiles for the (slow) stock paths (default --tiles)")
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="the backbone run eagerly, not as a CUDA graph")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU seconds (robust on a shared CPU; divide by --threads for ideal wall)")
    ap.add_argument("--malloc", choices=["tuned", "system"], default="tuned",
                    help="tuned: glibc heap reuse as the wsiseg command line sets it (wsiseg.core.runtime); "
                         "system: as is")
    ap.add_argument("--weights", type=Path, default=None, help="a trained checkpoint instead of a random-init model")
    ap.add_argument("--min-score", type=float, default=None, help="with --weights: detection score threshold")
    ap.add_argument("--e2e", type=int, default=0, metavar="SIZE",
                    help="also time the whole pipeline on a SIZE x SIZE px slide (0: skip)")
    ap.add_argument("--e2e-tile", type=int, default=256, metavar="T",
                    help="with --e2e: the run's tile side in model pixels (default 256, whatever the model's own: the "
                         "tiles/s figures are of 256 px tiles); a larger tile holds more nuclei and gets more "
                         "proposals; compare runs of different tiles by mpx_per_s, the slide's megapixels a second")
    ap.add_argument("--e2e-both", action="store_true",
                    help="with --e2e: also time the pipeline with segment_slide's prefetch (predicting a batch ahead "
                         "in a thread: by default on CUDA, or with fewer torch threads than cores) the other way")
    ap.add_argument("--tile-workers", type=int, default=0, metavar="N",
                    help="with --e2e: processes preparing tiles (candidates, outlines, encoding; default 0, where "
                         "segment_slide itself starts 4 for a GPU model on an 8+ core host); --e2e-workers-sweep "
                         "times several")
    ap.add_argument("--e2e-workers-sweep", default="", metavar="N,N,...",
                    help="with --e2e: also run the end to end with each of these numbers of tile workers (N+ / N-: "
                         "with the zarr painter process on / off; plain N: segment_slide's default, on when N > 0; "
                         "a final p: reading and predicting in a process of their own, segment_slide's "
                         "predict_process, e.g. 4+p)")
    ap.add_argument("--e2e-batch-sweep", default="", metavar="N,N,...",
                    help="with --e2e: also run the end to end with these batch sizes (--tile-workers workers; a fresh "
                         "segmenter each, so that each batch size gets its own CUDA graphs)")
    ap.add_argument("--e2e-replay", action="store_true",
                    help="with --e2e: also run the pipeline with a segmenter that replays the fast path's predictions "
                         "of the sample tiles at no cost: the ceiling of reading + stitching + writing (the CPU side), "
                         "whatever the accelerator")
    ap.add_argument("--nms-chunk", type=int, default=None, help="boxes per nms call (default: the segmenter's)")
    ap.add_argument("--nms-method", choices=["matrix", "sequential"], default=None,
                    help="NMS of the fast path (default: the segmenter's: matrix on CUDA, sequential on CPU)")
    ap.add_argument("--tta", type=int, default=0, choices=[0, 4, 8],
                    help="time the fast path with test-time augmentation over this many views (0: off)")
    ap.add_argument("--semantic-fusion", action="store_true",
                    help="time the fast path with semantic fusion (masks averaged with the semantic branch)")
    ap.add_argument("--nms-sweep", default="", metavar="N,N,...",
                    help="also time the fast path with each of these NMS settings: 'matrix', or a number (sequential "
                         "torchvision nms calls with at most that many boxes each); the result is the same for any; "
                         "prints the RPN and box-head stages")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    if a.malloc == "tuned":
        from wsiseg.core.runtime import keep_freed_memory

        a.malloc = "tuned" if keep_freed_memory() else "system (tuning unavailable)"
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    global CLOCK
    clock = "wall" if cuda else a.clock
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter
    batch = a.batch or (128 if cuda else 8)
    ntiles = a.tiles or (1024 if cuda else 16)
    amp = None if a.amp == "none" else a.amp
    model, desc, cfg = build_model(a.config, a.dets, a.weights, a.min_score)
    tiles, src = load_tiles(ntiles)
    def make_fast() -> PDAMSegmenter:
        return PDAMSegmenter(model, 0.25, 64, device=device, amp=amp, channels_last=a.channels_last, compile=a.compile,
                             cuda_graphs=not a.no_cuda_graphs, nms_chunk=a.nms_chunk, nms_method=a.nms_method,
                             tta=a.tta, semantic_fusion=a.semantic_fusion)

    fast = make_fast()
    simple = PDAMSegmenter(model, 0.25, 64, device=device, amp=amp, fast=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    res: dict = {"model": desc, "inputs": src, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                 "threads": a.threads, "malloc": a.malloc, "clock": clock, "amp": a.amp, "batch": batch, "tiles": ntiles, "dets_requested": a.dets,
                 "nms_chunk": fast.nms_chunk, "nms_method": fast.nms_method, "tta": a.tta,
                 "semantic_fusion": a.semantic_fusion, "cuda_graphs": fast.cuda_graphs}

    def backbone(t: np.ndarray) -> None:
        fast.backbone_features(t)

    def report(what: str, sec: float, n: int = ntiles) -> None:  # figures as they come: a killed run keeps them
        print(f"[partial] {what}: {n / sec:.1f} tiles/s ({1000 * sec / n:.2f} ms/tile)", flush=True)

    seconds = {"backbone": timed(backbone, tiles, batch, device)}
    report("backbone+FPN", seconds["backbone"])

    counts: list[int] = []

    def run_fast(t: np.ndarray) -> None:
        counts.extend(o.count for o in fast.predict(t))

    seconds["fast"] = timed(run_fast, tiles, batch, device)
    report(f"fast path ({np.mean(counts[-ntiles:]):.1f} instances/tile)", seconds["fast"])
    # both are best cases: time the backbone and the fast path again now that every path is warm, keep the faster
    # run of each (the first fast run after one warm-up batch can carry the allocator's and kernels' first calls)
    seconds["backbone"] = min(seconds["backbone"], timed(backbone, tiles, batch, device))
    seconds["fast"] = min(seconds["fast"], timed(run_fast, tiles, batch, device))
    res["instances_per_tile_fast"] = float(np.mean(counts[-ntiles:]))
    fast.profile, fast.timings, fast.clock = True, {}, CLOCK
    for s in range(0, ntiles, batch):
        fast.predict(tiles[s : s + batch])
    stages = dict(fast.timings)
    fast.profile = False
    print("[partial] fast path per stage (ms/tile): "
          + ", ".join(f"{k} {1000 * v / ntiles:.2f}" for k, v in stages.items()), flush=True)
    if a.nms_sweep:
        res["nms_sweep"] = nms_sweep(fast, tiles, batch, device, a.nms_sweep.split(","))

    if not a.skip_stock:
        st = tiles[: a.stock_tiles or ntiles]
        dets: list[int] = []

        def stock(t: np.ndarray) -> None:
            dets.extend(len(o["scores"]) for o in fast.stock_predict(t))

        seconds["stock"] = timed(stock, st, batch, device) * ntiles / len(st)
        report("stock torchvision", seconds["stock"])
        res["detections_per_tile"] = float(np.mean(dets[-len(st):]))
        seconds["simple"] = timed(simple.predict, st, batch, device) * ntiles / len(st)
        report("simple segmenter", seconds["simple"])

    tps = {k: ntiles / v for k, v in seconds.items()}
    res["tiles_per_s"] = tps
    res["ms_per_tile"] = {k: 1000 * v / ntiles for k, v in seconds.items()}
    res["fast_stage_ms_per_tile"] = {k: 1000 * v / ntiles for k, v in stages.items()}
    res["ratios"] = {"fast_overhead_over_backbone": seconds["fast"] / seconds["backbone"] - 1.0}
    if "stock" in seconds:
        res["ratios"]["fast_speedup_over_stock"] = seconds["stock"] / seconds["fast"]
        res["ratios"]["stock_overhead_over_backbone"] = seconds["stock"] / seconds["backbone"] - 1.0
    if a.e2e:
        def e2e(*args, **kw) -> dict:  # end_to_end at the run's tile side
            return end_to_end(*args, tile=a.e2e_tile, **kw)

        res["e2e"] = e2e(fast, backbone, tiles, batch, device, a.e2e, tile_workers=a.tile_workers)
        folder = tempfile.TemporaryDirectory()
        for v in [v for v in a.e2e_workers_sweep.split(",") if v]:  # N, N+ / N- (paint process on / off), ...p
            pred = v.endswith("p")
            v = v.rstrip("p")
            w, paint = int(v.rstrip("+-")), {"+": True, "-": False}.get(v[-1])
            if pred and fast.source is None and not as_file(fast, model, cfg, folder.name):
                print(f"[partial] {v}p skipped: the stand-in model cannot run in a predict process", flush=True)
                continue
            key = (f"e2e_tile_workers_{w}" + {True: "_paint", False: "_nopaint", None: ""}[paint]
                   + ("_predict_process" if pred else ""))
            res[key] = e2e(fast, None, tiles, batch, device, a.e2e, tile_workers=w, paint_process=paint,
                           predict_process=pred)
        folder.cleanup()
        for b in [int(v) for v in a.e2e_batch_sweep.split(",") if v]:
            res[f"e2e_batch_{b}"] = e2e(make_fast(), None, tiles, b, device, a.e2e, tile_workers=a.tile_workers)
            res[f"e2e_batch_{b}"]["batch"] = b
        runs = {k: v for k, v in res.items() if k.startswith("e2e")}
        if len(runs) > 1:
            same = len({v["geojson_sha1"] for v in runs.values()}) == 1
            res["e2e_same_geojson"] = same
            print(f"end to end: {'the same GeoJSON bytes in every run' if same else 'GeoJSON DIFFERS between runs'}: "
                  + ", ".join(f"{k} {v['tiles_per_s']:.1f} ({v['steady_tiles_per_s']:.1f}) tiles/s"
                              for k, v in runs.items()), flush=True)
        if a.e2e_replay:
            res["e2e_replay"] = e2e(Replay(fast, tiles, batch), None, tiles, batch, device, a.e2e,
                                           tile_workers=a.tile_workers)
        if a.e2e_both:
            other = not _prefetch_pays(fast)
            res["e2e_prefetch_" + ("on" if other else "off")] = e2e(fast, backbone, tiles, batch, device,
                                                                          a.e2e, prefetch=other)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None

    print(f"{desc} | {res['device']} | threads {a.threads} | malloc {a.malloc} | {clock} clock | amp {a.amp} | batch {batch} | "
          f"nms {fast.nms_method} (chunk {fast.nms_chunk}) | {ntiles} tiles ({src})")
    if "detections_per_tile" in res:
        print(f"detections/tile (stock) {res['detections_per_tile']:.1f}, instances/tile after overlap rule "
              f"{res['instances_per_tile_fast']:.1f}")
    print(f"{'path':<28}{'tiles/s':>10}{'ms/tile':>10}")
    names = {"backbone": "backbone+FPN (ceiling)", "stock": "stock torchvision", "simple": "simple segmenter",
             "fast": "fast path (PDAMSegmenter)"}
    for k in ("backbone", "stock", "simple", "fast"):
        if k in tps:
            print(f"{names[k]:<28}{tps[k]:>10.2f}{res['ms_per_tile'][k]:>10.1f}")
    print("fast path per stage (ms/tile): " + ", ".join(f"{k} {v:.1f}" for k, v in res["fast_stage_ms_per_tile"].items()))
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    if "e2e" in res:
        e = res["e2e"]
        print(f"end to end (wsiseg run on a {a.e2e} px slide, {e['tiles']} tiles of {e['tile']} px, {e['nuclei']} "
              f"nuclei, wall clock): {e['tiles_per_s']:.2f} tiles/s ({e['steady_tiles_per_s']:.2f} without the tissue "
              f"mask and overview), {e['mpx_per_s']:.2f} Mpx/s; "
              "ms/tile: " + ", ".join(f"{k} {v:.1f}" for k, v in e["ms_per_tile"].items()))
        for k in ("e2e_prefetch_on", "e2e_prefetch_off"):
            if k in res:
                print(f"end to end, prefetch {k.rsplit('_', 1)[1]} (the other setting): {res[k]['tiles_per_s']:.2f} "
                      f"tiles/s, overhead {res[k]['overhead_over_backbone']:.2f}")
        if "e2e_replay" in res:
            r = res["e2e_replay"]
            print(f"end to end, predictions replayed (the CPU side alone: read + stitch + write): "
                  f"{r['tiles_per_s']:.2f} tiles/s, {r['nuclei']} nuclei; ms/tile: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_tile"].items()))
        print(f"end to end: overhead of the whole run (wall clock per 256 px tile: reading, heads, post-processing, "
              f"stitching, writing) over the backbone alone {e['overhead_over_backbone']:.2f} "
              f"({e['wall_ms_per_tile']:.1f} vs backbone {e['backbone_ms_per_tile']:.1f} ms/tile)")
    gpu = f", peak GPU {res['peak_gpu_mib']:.0f} MiB" if cuda else ""
    print(f"peak RSS {res['peak_rss_mib']:.0f} MiB{gpu}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


def nms_sweep(seg: PDAMSegmenter, tiles: np.ndarray, batch: int, device: torch.device, chunks: list[str]) -> dict:
    """The fast path with each NMS setting ("matrix", or a chunk size of sequential nms calls): tiles/s, its RPN and
    box-head stages, and whether the instances are the same as with the first setting (they must be: exact NMS)."""
    default, out, ref = (seg.nms_chunk, seg.nms_method), {}, None
    n = len(tiles)
    for c in chunks:
        if c == "matrix":
            seg.nms_method = "matrix"
        else:
            seg.nms_method, seg.nms_chunk = "sequential", int(c)
        got: list = []
        sec = timed(lambda t: got.extend(seg.predict(t)), tiles, batch, device)
        seg.profile, seg.timings = True, {}
        for s in range(0, n, batch):
            seg.predict(tiles[s : s + batch])
        seg.profile = False
        got = got[-n:]
        same = ref is None or all(np.array_equal(a.labels, b.labels) for a, b in zip(got, ref))
        ref = ref or got
        out[c] = {"tiles_per_s": n / sec, "rpn_ms": 1000 * seg.timings["rpn"] / n,
                  "roi_box_ms": 1000 * seg.timings["roi_box"] / n, "same_instances": bool(same)}
        print(f"[partial] nms {c}: fast path {n / sec:.1f} tiles/s, rpn {out[c]['rpn_ms']:.2f} ms/tile, "
              f"box head {out[c]['roi_box_ms']:.2f} ms/tile, same instances {same}", flush=True)
    seg.nms_chunk, seg.nms_method = default
    return out


class Replay:
    """A segmenter that returns ``seg``'s predictions of the sample ``tiles`` again and again, in turn, at no cost:
    the pipeline around it then measures how fast the CPU side (reading, stitching, writing) can go."""

    def __init__(self, seg: PDAMSegmenter, tiles: np.ndarray, batch: int) -> None:
        self.name, self.mpp, self.max_nucleus_px = "replay", seg.mpp, seg.max_nucleus_px
        self.cache = [r for s in range(0, len(tiles), batch) for r in seg.predict(tiles[s:s + batch])]
        self.i = 0

    def predict(self, tiles: np.ndarray) -> list:
        out = []
        for _ in range(len(tiles)):
            out.append(self.cache[self.i % len(self.cache)])
            self.i += 1
        return out


def end_to_end(seg: PDAMSegmenter, backbone, tiles: np.ndarray, batch: int, device: torch.device, size: int,
               prefetch: bool | None = None, tile_workers: int = 0, paint_process: bool | None = None,
               predict_process: bool = False, tile: int = 256) -> dict:
    """``segment_slide`` on a synthetic all-tissue slide with ``seg``, timed per stage (wall clock), next to the
    backbone alone timed on the same number of tiles just after (wall clock too; skipped when ``backbone`` is None).
    ``prefetch``: predict a batch ahead in a thread (``segment_slide``'s; None: its default). ``tile_workers``:
    processes preparing tiles (``segment_slide``'s; default 0 here). ``paint_process`` and ``predict_process``:
    ``segment_slide``'s (the latter needs ``seg.source``: :func:`as_file`). ``tile``: the run's tile side (the
    backbone alone is timed on 256 px tiles, so the overhead compares the two per 256 x 256 px of tile).
    ``steady_tiles_per_s``: the rate without the tissue mask and overview, a cost per slide that a 100k-tile slide
    spreads thin (an 8000 px one does not)."""
    import hashlib
    import tempfile
    import warnings

    from pipeline_stages import make_mosaic, mosaic_backend

    from wsiseg.api import segment_slide

    with tempfile.TemporaryDirectory() as d:
        slide = Path(d) / "slide.tif"
        make_mosaic(slide, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = segment_slide(slide, geojson=Path(d) / "n.geojson", zarr=Path(d) / "n.zarr", model=seg,
                              batch_size=batch, backend=mosaic_backend(), prefetch=prefetch,
                              tile_workers=tile_workers, paint_process=paint_process,
                              predict_process=predict_process, uuid_seed=1,  # (ids: not from the temp path)
                              tile_size=tile,  # (256 by default: tiles/s of 256 px tiles, whatever the model's own)
                              zoom=1)  # (the mosaic's own scale: the same tiles whatever --zoom auto would pick)
            text = (Path(d) / "n.geojson").read_bytes()  # the features' bytes (the header names the temp path)
            digest = hashlib.sha1(text[text.index(b'"features": ['):]).hexdigest()[:16]
    n = s.tiles_segmented
    bb_ms = float("nan")
    if backbone is not None:
        reps = max(1, n // len(tiles))
        t0 = time.perf_counter()
        for _ in range(reps):
            for i in range(0, len(tiles), batch):
                backbone(tiles[i:i + batch])
        sync(device)
        bb_ms = 1000 * (time.perf_counter() - t0) / (reps * len(tiles))
    st = s.stage_seconds
    ms = {k: 1000 * st[k] / n for k in ("tissue", "read_wait", "segment", "segment_wait", "stitch", "tiles_wait",
                                        "write", "journal")}
    ahead = predict_process or (_prefetch_pays(seg) if prefetch is None else prefetch)
    # the rest of the main thread's wall clock: opening, the tile list, the loop itself, progress, closing
    ms["other"] = 1000 * s.seconds / n - sum(v for k, v in ms.items() if k != "segment" or not ahead)
    # with prefetch, prediction runs a batch ahead of stitching and writing, so the stages overlap: the overhead is
    # the whole run's wall clock per tile over the backbone alone
    wall_ms = 1000 * s.seconds / n * (256 / tile) ** 2  # per 256 x 256 px of tile, as the backbone's
    out = {"tile": tile, "mpx_per_s": size * size / 1e6 / s.seconds, "tiles": n, "nuclei": s.nuclei,
           "geojson_sha1": digest, "tile_workers": tile_workers, "seconds": s.seconds, "tiles_per_s": n / s.seconds,
           "steady_tiles_per_s": n / (s.seconds - st["tissue"]), "paint_process": paint_process,
           "predict_process": predict_process, "ms_per_tile": ms,
           "backbone_ms_per_tile": bb_ms, "wall_ms_per_tile": wall_ms, "overhead_over_backbone": wall_ms / bb_ms - 1.0}
    print(f"[partial] end to end: {out['tiles_per_s']:.1f} tiles/s ({out['steady_tiles_per_s']:.1f} without the tissue "
          f"mask and overview; {out['mpx_per_s']:.1f} Mpx/s), {n} tiles of {tile} px, {s.nuclei} nuclei (GeoJSON sha1 "
          f"{digest}), {tile_workers} tile workers, "
          f"paint process {paint_process}, predict process {predict_process}; ms/tile "
          + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()) + f"; backbone alone {bb_ms:.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()
