"""The public API: one call segments a slide (or an image) and writes the outputs.

    from wsiseg.api import segment_slide, load_model
    summary = segment_slide("slide.svs", geojson="nuclei.geojson", zarr="nuclei.zarr")

Flow: :func:`wsiseg.slide.open_slide` -> :func:`wsiseg.tissue.tissue_mask` -> :class:`wsiseg.tiling.TileGrid` and
:func:`wsiseg.tiling.iter_batches` -> ``segmenter.predict`` -> :class:`wsiseg.stitch.Stitcher` -> exporters.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
import warnings
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import predictwork
from .errors import ConfigError, ModelError
from .segment.base import Segmenter
from .slide import Slide, open_slide, resolve_mpp
from .stitch import Nucleus, Stitcher, paint_polygon
from .tilework import TilePool
from .tilework import finish as finish_tiles
from .tiling import TileGrid, iter_batches, keep_in_tissue, predict_ahead, read_one, read_tile
from .tissue import TissueMask, tissue_mask

log = logging.getLogger("wsiseg")

#: the bundled PDAM weights, by name: ``default`` (the model of ``wsiseg run``) and ``vesicular`` (the same recipe
#: with pale-interior nuclei in its training crops, ``train.vesicular=0.5``: weaker alone, the partner of
#: ``--ensemble vesicular``)
BUNDLED_MODELS = ("default", "vesicular")
BUILTIN_MODELS = (*BUNDLED_MODELS, "watershed")


def bundled_weights(name: str = "default") -> Path | None:
    """The bundled PDAM weights ``name`` (:data:`BUNDLED_MODELS`), if this installation has them."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"no bundled model {name!r} (bundled: {', '.join(BUNDLED_MODELS)})")
    try:
        p = resources.files("wsiseg") / "weights" / f"{name}.safetensors"
        return Path(str(p)) if p.is_file() else None
    except (FileNotFoundError, ModuleNotFoundError):
        return None


def model_path(name_or_path: str | Path) -> Path:
    """The checkpoint file of a bundled model's name or of a path (a directory: its ``model.safetensors``, else its
    last ``.safetensors``); ModelError when there is none."""
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        w = bundled_weights(name)
        if w is None:
            raise ModelError(f"{name}: this installation has no bundled {name} weights")
        return w
    p = Path(name)
    if not p.exists():
        raise ModelError(f"{p}: no such model file (built-in models: {', '.join(BUILTIN_MODELS)})")
    if p.is_dir():
        cand = sorted(p.glob("*.safetensors"))
        final = [c for c in cand if c.name in ("model.safetensors", "final.safetensors")]
        if not cand:
            raise ModelError(f"{p}: directory holds no .safetensors model")
        p = (final or cand)[-1]
    return p


def sample_slide() -> Path:
    """The small real Aperio slide bundled with the package (a crop of OpenSlide's CMU-1, CC0)."""
    return Path(str(resources.files("wsiseg") / "data" / "sample.svs"))


def load_model(name_or_path: str = "default", device: str = "auto") -> Segmenter:
    """``"watershed"`` (classical), ``"default"`` (bundled PDAM weights, or watershed when none are bundled),
    ``"vesicular"`` (the second bundled PDAM model) or the path of a checkpoint written by ``wsiseg adapt`` / the PDAM
    trainer."""
    from .segment.watershed import WatershedSegmenter

    if name_or_path == "watershed" or (name_or_path == "default" and bundled_weights() is None):
        return WatershedSegmenter()
    p = model_path(name_or_path)
    try:
        from .segment.pdam import PDAMSegmenter
    except ImportError as e:  # pragma: no cover - the PDAM predictor ships with the package
        raise ModelError(f"{p}: the PDAM predictor is not available ({e})") from None
    return PDAMSegmenter.from_checkpoint(p, device=device)


def check_min_score(min_score: float) -> float:
    """``min_score`` as a float in 0..1 (ConfigError otherwise)."""
    if not 0.0 <= float(min_score) <= 1.0:
        raise ConfigError(f"--min-score must lie in 0..1, got {min_score}")
    return float(min_score)


def set_min_score(seg: Segmenter, min_score: float) -> None:
    """Keep only detections scoring at least ``min_score`` (0..1) from now on: PDAM models only (ConfigError else)."""
    roi = getattr(getattr(seg, "model", None), "roi_heads", None)
    if roi is None or not hasattr(roi, "score_thresh"):
        raise ConfigError(f"--min-score applies to PDAM models, not to {getattr(seg, 'name', type(seg).__name__)}")
    roi.score_thresh = check_min_score(min_score)


def set_tta(seg: Segmenter, views: bool | int = True) -> None:
    """Test-time augmentation from now on: the heads averaged over ``views`` views of each tile (``True`` or 4: the
    tile and its three mirror images, about 4x the work; 8: and their transposes; ``False``/0/1: off). PDAM models
    on their fast path only (ConfigError else; :attr:`wsiseg.segment.pdam.PDAMSegmenter.tta` checks)."""
    _set_pdam_option(seg, "tta", "--tta", views)


def set_semantic_fusion(seg: Segmenter, on: bool = True) -> None:
    """Average each mask with the semantic branch's foreground probability from now on (PDAM models with a
    semantic branch, fast path; ConfigError else)."""
    _set_pdam_option(seg, "semantic_fusion", "--semantic-fusion", on)


def set_ensemble(seg: Segmenter, paths: Sequence[str | Path]) -> None:
    """From now on ``seg`` is an ensemble with the PDAM checkpoints ``paths`` (``wsiseg run --ensemble``; bundled
    models by name, e.g. ``"vesicular"``; none: a single model again; the same list again: nothing to do): every
    model sees every tile (and view, with ``--tta``), and their box-head outputs, masks and semantic maps are
    averaged; ``len(paths) + 1`` times the work. PDAM models of one scale and input, on the fast path (ModelError
    for a missing file, ConfigError else)."""
    if not hasattr(seg, "add_member_checkpoint"):
        if not paths:
            return
        raise ConfigError(f"--ensemble applies to PDAM models, not to {getattr(seg, 'name', type(seg).__name__)}")
    for p in paths:
        if str(p) == "watershed":
            raise ConfigError("--ensemble takes PDAM models, not the watershed")
    paths = [str(model_path(p)) for p in paths]
    if list(seg.member_sources) == paths:
        return
    seg.clear_members()
    for path in paths:
        try:
            seg.add_member_checkpoint(path)
        except ValueError as e:
            seg.clear_members()
            raise ConfigError(f"--ensemble: {e}") from None


#: ``--precision`` choices: the network's arithmetic (post-processing is always float32)
PRECISIONS = ("fp32", "bf16", "fp16")


def set_precision(seg: Segmenter, precision: str = "fp32") -> None:
    """The network's arithmetic from now on: ``"fp32"`` (default, the reference), ``"bf16"`` (autocast; on a CPU
    with native bf16, such as AVX512-BF16 or AMX, about 1.7x faster with Kumar scores unchanged, see docs/speed.md) or
    ``"fp16"`` (autocast, CUDA only). Post-processing stays float32. PDAM models only (ConfigError else, except
    for ``"fp32"``). A CPU without native bf16 runs it emulated, slower: a warning says so."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        if hasattr(seg, "amp"):
            seg.amp = None
        return
    if not hasattr(seg, "amp"):
        raise ConfigError(f"--precision {precision} applies to PDAM models, not to "
                          f"{getattr(seg, 'name', type(seg).__name__)}")
    if precision == "fp16" and not _on_gpu(seg):
        raise ConfigError("--precision fp16 needs a CUDA device; on the CPU use bf16")
    if precision == "bf16" and not _on_gpu(seg):
        import torch

        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        if not native:
            warnings.warn("--precision bf16: this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX); it is "
                          "emulated, slower than fp32", stacklevel=2)
    seg.amp = precision


def _set_pdam_option(seg: Segmenter, attr: str, flag: str, value: Any) -> None:
    """``seg.<attr> = value`` for a PDAM segmenter, whose setter checks it; ConfigError naming ``flag`` else."""
    if not hasattr(seg, attr):
        raise ConfigError(f"{flag} applies to PDAM models, not to {getattr(seg, 'name', type(seg).__name__)}")
    try:
        setattr(seg, attr, value)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None




def _model_label(source: str | None) -> str | None:
    """A model file as provenance: the bundled model's name, else the file's path."""
    if source is None:
        return None
    for name in BUNDLED_MODELS:
        w = bundled_weights(name)
        if w is not None and Path(source).resolve() == w.resolve():
            return name
    return str(Path(source).resolve())




@dataclass
class RunSummary:
    input: str
    model: str
    tiles_total: int = 0
    tiles_segmented: int = 0
    nuclei: int = 0
    cut_dropped: int = 0
    seam_dropped: int = 0
    seconds: float = 0.0
    tissue_fraction: float = 1.0
    tissue_mm2: float | None = None  # area the tissue mask holds (the whole slide without a mask); None: no MPP
    nuclei_per_mm2: float | None = None
    mean_area_um2: float | None = None  # of the nuclei written by this call (after --resume: those since resuming)
    outputs: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def table_row(self) -> dict[str, Any]:
        """The per-slide row of ``--summary-csv`` and cohort manifests: counts, tissue area and density."""
        return {"input": self.input, "nuclei": self.nuclei,
                "tissue_mm2": None if self.tissue_mm2 is None else round(self.tissue_mm2, 4),
                "nuclei_per_mm2": None if self.nuclei_per_mm2 is None else round(self.nuclei_per_mm2, 1),
                "mean_area_um2": None if self.mean_area_um2 is None else round(self.mean_area_um2, 2),
                "tiles_total": self.tiles_total, "tiles_segmented": self.tiles_segmented,
                "seconds": round(self.seconds, 3)}


def segment_slide(path: str | Path, geojson: str | Path | None = None, zarr: str | Path | None = None,
                  preview: str | Path | None = None, model: str | Segmenter = "default", device: str = "auto",
                  mpp: float | None = None, tile_size: int = 256, overlap: int | None = None,
                  batch_size: int = 16, use_tissue_mask: bool = True, backend: str = "auto",
                  progress: bool | Callable[[int, int], None] = False, sink: Callable[[list[Nucleus]], None] | None = None,
                  uuid_seed: int | None = None, resume: bool = False, min_score: float | None = None,
                  prefetch: bool | None = None, tile_workers: int | None = None, tta: bool | int = False,
                  semantic_fusion: bool = False, precision: str | None = None,
                  paint_process: bool | None = None, predict_process: bool = False,
                  ensemble: Sequence[str | Path] = (), zarr_image: bool = False) -> RunSummary:
    """Segment every nucleus of the slide/image at ``path`` and write the requested outputs (atomically).

    ``overlap`` defaults to the smallest even number >= the model's ``max_nucleus_px`` (and at most half a tile).
    ``sink``, if given, also receives each tile's nuclei (level-0 polygons) as they are stitched.
    ``min_score`` (PDAM models): keep detections scoring at least this (default: the model's own threshold).
    ``prefetch``: predict the next batch in a background thread while this one is stitched and written
    (:func:`wsiseg.tiling.predict_ahead`; same outputs); ``None``: when the model runs on a GPU or on fewer torch
    threads than there are cores.
    ``tta`` (PDAM models): test-time augmentation, the heads averaged over views of each tile (:func:`set_tta`:
    ``True`` or 4, the tile and its three mirror images, about 4x the work; 8: and their transposes).
    ``semantic_fusion`` (PDAM models): each mask averaged with the semantic branch's foreground probability
    (:func:`set_semantic_fusion`).
    ``ensemble`` (PDAM models): further checkpoints averaged with the model (:func:`set_ensemble`).
    ``precision`` (PDAM models): the network's arithmetic, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:func:`set_precision`;
    ``None``: as the segmenter is, fp32 for a model loaded by name).
    ``tile_workers``: processes that do each tile's own share of stitching, outlining and GeoJSON encoding while
    the main loop feeds the model, decides seams and writes (:class:`wsiseg.tilework.TilePool`; same outputs for
    any number); 0: all in the main loop; ``None`` (default): :func:`auto_tile_workers`, 4 when the model runs on
    a GPU of a host with 8 cores or more and there are 256 tiles or more to segment, else 0.
    ``paint_process``: paint the zarr labels and write their chunks in a process of their own
    (:class:`wsiseg.export.zarr_labels.ZarrLabelWriter`; the same labels); ``None`` (default): when there are
    tile workers.
    ``predict_process``: read tiles and run the model in a process of their own, so that the main loop, which
    stitches and writes, has the interpreter to itself (:class:`wsiseg.predictwork.PredictProcess`; the same
    outputs). PDAM models loaded from a file only (ConfigError else).
    ``zarr_image``: the ``zarr`` store's image pyramid holds the slide's level-0 RGB pixels (read from the slide once
    the labels are written; :class:`wsiseg.export.zarr_labels.ZarrLabelWriter`), not the overview stand-in.

    Reliability: outputs appear whole under their names, or not at all. While it runs, a run with file outputs keeps
    a journal of its finished tile rows beside its main output (:mod:`wsiseg.export.journal`); ``resume=True``
    continues an interrupted run from it, with outputs identical to an uninterrupted run's (parameters must match:
    else :class:`ConfigError`). Without ``resume`` an old journal is discarded. The journal is removed on success
    and on input/config/model errors, and kept on output errors (disk full), interruptions and a dead helper
    process (:class:`~wsiseg.errors.ProcessDied`). GeoJSON ids come from
    ``uuid_seed``, or, when it is ``None`` and there is a file output, from :func:`wsiseg.export.journal.run_seed`
    (the same input and parameters always give the same ids).

    A slide/image smaller than one tile is padded with white (like glass) and segmented whole, without a tissue
    mask; a slide where the tissue mask finds nothing gives empty, valid outputs and a warning.
    """
    from .errors import OutputError, ProcessDied, WsisegError

    target = geojson or zarr or preview
    if zarr_image and not zarr:
        raise ConfigError("zarr_image needs a zarr output")
    state: dict[str, Any] = {}
    try:
        return _segment_slide(path, geojson, zarr, preview, model, device, mpp, tile_size, overlap, batch_size,
                              use_tissue_mask, backend, progress, sink, uuid_seed, resume, target, state, min_score,
                              prefetch, tile_workers, tta, semantic_fusion, precision, paint_process,
                              predict_process, ensemble, zarr_image=zarr_image)
    except WsisegError as e:
        journal = state.get("journal")
        if journal is None:
            raise
        if not isinstance(e, (OutputError, ProcessDied)):
            journal.remove()  # bad input/config/model: resuming cannot help
            raise
        if journal.checkpoints:
            raise type(e)(f"{e}; the progress is kept: rerun with --resume to continue") from None
        raise


def _segment_slide(path, geojson, zarr, preview, model, device, mpp, tile_size, overlap, batch_size,
                   use_tissue_mask, backend, progress, sink, uuid_seed, resume, target, state,
                   min_score=None, prefetch=None, tile_workers=None, tta=False,
                   semantic_fusion=False, precision=None, paint_process=None,
                   predict_process=False, ensemble=(), zarr_image=False) -> RunSummary:
    from .export.geojson import GeoJSONWriter
    from .export.journal import ResumeJournal, run_seed
    from .export.zarr_labels import ZarrLabelWriter

    t_start = time.perf_counter()
    share = _checkpoint_share()  # (a bad setting fails before anything is loaded or opened)
    seg = load_model(model, device) if isinstance(model, str) else model
    if ensemble:
        set_ensemble(seg, ensemble)
    if min_score is not None:
        set_min_score(seg, min_score)
    if tta:
        set_tta(seg, tta)
    if semantic_fusion:
        set_semantic_fusion(seg, True)
    if precision is not None:
        set_precision(seg, precision)
    if predict_process:
        predictwork.check(seg)
    slide = open_slide(path, backend)
    with slide, ExitStack() as early:
        slide_mpp = resolve_mpp(slide, mpp, seg.mpp)
        if overlap is None:
            overlap = min(int(np.ceil(seg.max_nucleus_px / 2.0)) * 2, (tile_size // 2) // 2 * 2)
        grid = TileGrid.for_slide(slide.dimensions, slide_mpp, seg.mpp, tile_size, overlap)
        read_backend = slide.backend if backend == "auto" else backend
        read_workers = max(2, min(8, (os.cpu_count() or 2) // 2))  # tile decoding releases the GIL
        ahead = _prefetch_pays(seg) if prefetch is None else prefetch
        predictor = None
        if predict_process:  # started now: it loads the model while the tissue mask is found
            predictor = early.enter_context(predictwork.PredictProcess(seg, str(path), read_backend, grid, batch_size,
                                                                       read_workers, depth=int(ahead)))
        stats = RunSummary(input=str(path), model=getattr(seg, "name", type(seg).__name__))
        t0 = time.perf_counter()
        if grid.rows * grid.cols == 1:
            use_tissue_mask = False  # one tile: segment it whole (a tissue mask of a tiny image means nothing)
        if progress is True and use_tissue_mask:
            print(f"{Path(path).name}: tissue mask ...", file=sys.stderr, flush=True)
        tissue = tissue_mask(slide) if use_tissue_mask else None
        overview, ov_ds = slide.thumbnail(max_size=2048)
        stats.stage_seconds["tissue"] = time.perf_counter() - t0
        stats.tissue_fraction = tissue.fraction if tissue is not None else 1.0
        if hasattr(seg, "calibrate"):
            seg.calibrate(_calibration_view(overview, tissue))
        tiles = grid.tiles(tissue)
        stats.tiles_total = grid.rows * grid.cols
        if tissue is not None and not tiles:
            warnings.warn(f"{Path(path).name}: no tissue found; writing empty outputs", stacklevel=2)
        stitcher = Stitcher(grid, seg.mpp)
        w0, h0 = slide.dimensions
        from . import __version__

        roi = getattr(getattr(seg, "model", None), "roi_heads", None)
        meta = {"input": str(path), "wsiseg_version": __version__, "model": stats.model,
                "model_source": _model_label(getattr(seg, "source", None)),
                "min_score": None if roi is None else round(float(roi.score_thresh), 4),
                "tta": int(getattr(seg, "tta", 0) or 0), "semantic_fusion": bool(getattr(seg, "semantic_fusion", False)),
                "slide_mpp": slide_mpp,
                "mpp_source": "--mpp" if mpp is not None else "file" if slide.mpp is not None else "assumed (model's)",
                "model_mpp": seg.mpp, "tile_size": tile_size, "overlap": overlap}
        preview_img = overview.copy() if preview else None
        journal = None
        if target:
            st = Path(path).stat()
            params = {"input": str(Path(path).resolve()), "input_name": Path(path).name, "input_size": st.st_size,
                      "input_mtime_ns": st.st_mtime_ns, "model": stats.model, "model_mpp": seg.mpp,
                      "model_threshold": getattr(seg, "threshold", None), "min_score": min_score,
                      **({"tta": seg.tta} if getattr(seg, "tta", 0) else {}),  # (else: ids as before)
                      **({"semantic_fusion": True} if getattr(seg, "semantic_fusion", False) else {}),
                      **({"ensemble": [str(Path(m).resolve()) if m else None for m in seg.member_sources]}
                         if getattr(seg, "member_sources", None) else {}),
                      **({"precision": seg.amp} if getattr(seg, "amp", None) else {}),
                      "slide_mpp": slide_mpp,
                      "tile_size": tile_size, "overlap": overlap, "tissue_mask": tissue is not None,
                      "backend": backend, "tiles": len(tiles),
                      "tiles_sha1": hashlib.sha1(np.asarray(tiles, np.int64).tobytes()).hexdigest(),
                      "outputs": [str(Path(v).resolve()) if v else None for v in (geojson, zarr, preview)]}
            journal = state["journal"] = ResumeJournal(target, params, resume)
            if journal.checkpoints:  # resuming: the killed run's temp files are garbage now
                _remove_stale_partials(geojson, zarr, preview)
            if uuid_seed is None:
                uuid_seed = run_seed(params)
        t_seg = t_stitch = t_write = t_journal = 0.0
        with ExitStack() as stack:
            stack.enter_context(_quick_gil_handover())
            preview_existed = bool(preview) and Path(preview).exists()
            gj = stack.enter_context(GeoJSONWriter(geojson, meta, seed=uuid_seed)) if geojson else None
            if tile_workers is None:
                tile_workers = auto_tile_workers(seg, len(tiles))
            if paint_process is None:
                paint_process = tile_workers > 0
            zw = stack.enter_context(ZarrLabelWriter(zarr, (h0, w0), slide_mpp, overview, ov_ds,
                                                     paint_process=paint_process,
                                                     image_reader=_level0_reader(slide) if zarr_image else None)
                                     ) if zarr else None
            bar = _progress(progress, len(tiles), Path(path).name)
            label = 1
            area = [0.0, 0]  # sum of the areas (um^2) and count of the nuclei emitted by this call

            def emit(nuclei: list[Nucleus], label: int, encoded: list | None = None) -> int:
                nonlocal t_write
                if not nuclei:
                    return label
                tw = time.perf_counter()
                if gj is not None:
                    gj.write(nuclei, encoded)
                if zw is not None:
                    zw.write(nuclei, label)
                if preview_img is not None:
                    _draw(preview_img, nuclei, ov_ds)
                if sink is not None:
                    sink(nuclei)
                area[0] += sum(n.area_um2 for n in nuclei)
                area[1] += len(nuclei)
                t_write += time.perf_counter() - tw
                return label + len(nuclei)

            def flush(safe: float) -> None:
                nonlocal t_write
                if zw is not None:
                    tw = time.perf_counter()
                    zw.flush_above(safe)
                    t_write += time.perf_counter() - tw

            done = 0
            if journal is not None and journal.checkpoints:  # resume: replay, then continue after the last row
                for nuclei, safe in journal.replay():
                    label = emit(nuclei, label)
                    flush(safe)
                done = journal.restore(stitcher)
                bar(done)
            pool = stack.enter_context(TilePool(grid, stitcher.margin, seg.mpp, tile_workers))
            since: list[Nucleus] = []  # emitted since the last checkpoint
            ckpt = [0.0, 0.0]  # when the last checkpoint ended, and what it cost
            row = tiles[done][0] if done < len(tiles) else -1
            safe_y0 = 0.0
            t_wait = t_pwait = t_tiles = 0.0

            def stitch(wait: bool) -> None:  # stitch and write the tiles the pool has prepared, in raster order
                nonlocal label, done, row, since, safe_y0, t_stitch, t_journal, t_tiles
                n0 = done
                it = pool.results(wait)
                while True:
                    to = time.perf_counter()
                    p = next(it, None)
                    t_tiles += time.perf_counter() - to
                    if p is None:
                        break
                    if p.row != row:  # every tile of the previous row is in: checkpoint (see CHECKPOINT_SHARE)
                        row = p.row
                        if journal is not None and time.perf_counter() - ckpt[0] >= ckpt[1] / share:
                            flush(safe_y0)
                            tj = time.perf_counter()
                            journal.checkpoint(since, stitcher, done, safe_y0)
                            now = time.perf_counter()
                            ckpt[:] = [now, now - tj]
                            t_journal += ckpt[1]
                            since = []
                    ts = time.perf_counter()
                    nuclei, encoded = finish_tiles(stitcher.add_proposal(p))
                    done += 1
                    safe_y0 = stitcher.safe_y * grid.scale - 2
                    t_stitch += time.perf_counter() - ts
                    label = emit(nuclei, label, encoded)
                    since.extend(nuclei)
                if done > n0:
                    flush(safe_y0)
                    bar(done - n0)

            if predictor is not None:
                predicting: Any = closing(predictor.predict(tiles[done:]))
            else:  # reading and the model in this process
                read = _reader(slide, str(path), read_backend, grid)
                batches = iter_batches(read, tiles[done:], batch_size, workers=read_workers)
                predicting = closing(predict_ahead(batches, seg.predict, depth=int(ahead)))
            with predicting as predicted:
                for ids, results, tr, tp, tpw in predicted:
                    t_wait, t_seg, t_pwait = t_wait + tr, t_seg + tp, t_pwait + tpw
                    ts = time.perf_counter()
                    if tissue is not None:  # the second guard: no nucleus centred on glass (wsiseg.tissue)
                        results = [keep_in_tissue(inst, tissue, grid, r, c) for (r, c), inst in zip(ids, results)]
                    pool.submit([(r, c, inst) for (r, c), inst in zip(ids, results)])
                    t_stitch += time.perf_counter() - ts
                    stitch(wait=False)
            stitch(wait=True)
            bar(None)
            ts = time.perf_counter()
            nuclei, encoded = finish_tiles(stitcher.finish_decided())
            t_stitch += time.perf_counter() - ts
            label = emit(nuclei, label, encoded)
            tf = time.perf_counter()
        t_write += time.perf_counter() - tf
        if preview_img is not None:
            _write_png(preview, preview_img, existed=preview_existed)
        if journal is not None:
            journal.remove()
        stats.tiles_segmented = len(tiles)
        stats.nuclei = label - 1
        if slide_mpp:
            stats.tissue_mm2 = stats.tissue_fraction * w0 * h0 * slide_mpp ** 2 / 1e6
            stats.nuclei_per_mm2 = stats.nuclei / stats.tissue_mm2 if stats.tissue_mm2 > 0 else 0.0
        stats.mean_area_um2 = area[0] / area[1] if area[1] else None
        stats.cut_dropped = stitcher.cut_dropped
        stats.seam_dropped = stitcher.seam_dropped
        stats.stage_seconds.update(read_wait=t_wait, segment=t_seg, segment_wait=t_pwait, stitch=t_stitch,
                                   tiles_wait=t_tiles, write=t_write, journal=t_journal)
        for k, v in (("geojson", geojson), ("zarr", zarr), ("preview", preview)):
            if v:
                stats.outputs[k] = str(v)
        if stitcher.cut_dropped:
            warnings.warn(f"{stitcher.cut_dropped} nuclei larger than the overlap ({overlap} px) were cut by tile "
                          f"borders and dropped; raise --overlap", stacklevel=2)
    stats.seconds = time.perf_counter() - t_start
    return stats


#: the tile workers :func:`segment_slide` starts by itself for a model on a GPU (:func:`auto_tile_workers`)
AUTO_TILE_WORKERS = 4
#: ... for a run of at least this many tiles
AUTO_MIN_TILES = 256


def auto_tile_workers(seg: Segmenter, tiles: int | None = None) -> int:
    """The tile workers :func:`segment_slide` uses when none are asked for: :data:`AUTO_TILE_WORKERS` when ``seg``
    runs on a GPU, the host has at least twice as many cores and the run has at least :data:`AUTO_MIN_TILES` tiles
    to segment (``None``: not known, enough), else 0. Workers save the main process a few ms a tile on a GPU host
    (docs/speed.md) but take a few tenths of a second to start, so a smaller run would not gain; on a CPU they would
    take cores from the model, which already uses them all."""
    if tiles is not None and tiles < AUTO_MIN_TILES:
        return 0
    return AUTO_TILE_WORKERS if _on_gpu(seg) and (os.cpu_count() or 1) >= 2 * AUTO_TILE_WORKERS else 0


def _on_gpu(seg: Segmenter) -> bool:
    """Whether ``seg`` runs on a CUDA device (a classical segmenter has no device: no)."""
    return str(getattr(seg, "device", "")).startswith("cuda")


#: the longest a thread waits for the GIL held by a busy one while a slide runs (Python's default: 5 ms;
#: environment: ``WSISEG_SWITCH_INTERVAL``, in seconds, to measure others)
SWITCH_INTERVAL = 0.0005


@contextmanager
def _quick_gil_handover() -> Iterator[None]:
    """Lower the interpreter's switch interval to :data:`SWITCH_INTERVAL` while a slide runs, then restore it.

    The predicting thread releases the GIL in every torch call and must get it back after each; with the default
    5 ms, a busy main loop (stitching, writing) held it that long each time, and the GPU work of a 128-tile batch,
    0.9 ms/tile alone, took 3.6-3.9 ms/tile on an H200 host. The reading threads wait the same way."""
    import sys

    old = sys.getswitchinterval()
    try:
        want = float(os.environ.get("WSISEG_SWITCH_INTERVAL", SWITCH_INTERVAL))
    except ValueError:
        want = SWITCH_INTERVAL
    sys.setswitchinterval(min(old, want) if want > 0 else old)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


#: the most of a run's time journal checkpoints may take (environment: ``WSISEG_CHECKPOINT_SHARE``; 1 or more:
#: every row): a finished tile row is checkpointed unless the last checkpoint ended less than its own cost / share
#: ago. On a CPU every row is; on a fast GPU a few rows a second are (a resumed run redoes at most those).
CHECKPOINT_SHARE = 0.05


def _checkpoint_share() -> float:
    v = os.environ.get("WSISEG_CHECKPOINT_SHARE", "")
    try:
        share = float(v) if v else CHECKPOINT_SHARE
    except ValueError:
        share = -1.0
    if not share > 0:
        raise ConfigError(f"WSISEG_CHECKPOINT_SHARE={v!r}: must be a number > 0 (1: a checkpoint every tile row)")
    return share


def _remove_stale_partials(*outputs: str | Path | None) -> None:
    """Delete the temp files an interrupted run left beside ``outputs`` (see :func:`wsiseg.atomic.temp_path`)."""
    import glob

    from .atomic import discard

    for out in outputs:
        if out:
            p = Path(out)
            # the preview's temp name ends in its image suffix (see _write_png)
            for pattern in (".{}.*.partial", *(".{}.*" + x for x in PREVIEW_SUFFIXES)):
                for tmp in p.parent.glob(pattern.format(glob.escape(p.name))):
                    discard(tmp)


def _prefetch_pays(seg: Segmenter) -> bool:
    """Whether to predict a batch ahead in a thread: yes when the model runs on a GPU (the CPU stitches and writes
    meanwhile) or on fewer torch threads than there are cores; no when torch keeps every core busy already (a
    thread beside it only competes) or for a classical model (no torch: it holds the GIL)."""
    if _on_gpu(seg):
        return True
    if not str(getattr(seg, "device", "")):
        return False
    import torch

    return torch.get_num_threads() < (os.cpu_count() or 1)


def _level0_reader(slide: Slide) -> Callable[[int, int, int, int], np.ndarray]:
    """``(x, y, w, h)`` -> the slide's level-0 RGB pixels there (the zarr image pyramid's source)."""
    return lambda x, y, w, h: slide.read_region((x, y), 0, (w, h))


def _reader(slide: Slide, path: str, backend: str, grid: TileGrid) -> Callable[[int, int], np.ndarray]:
    if slide.backend == "image":  # already in memory: read from this handle
        return functools.partial(read_tile, slide, grid)
    return functools.partial(read_one, path, backend, grid)


def _calibration_view(overview: np.ndarray, tissue: TissueMask | None) -> np.ndarray:
    if tissue is None:
        return overview
    import cv2

    m = cv2.resize(tissue.mask.astype(np.uint8), (overview.shape[1], overview.shape[0]),
                   interpolation=cv2.INTER_NEAREST).astype(bool)
    if m.sum() < 100:
        return overview
    out = overview.copy()
    out[~m] = 255
    return out


def _draw(img: np.ndarray, nuclei: list[Nucleus], ds: float) -> None:
    import cv2

    polys = [np.round(n.polygon / ds - 0.5).astype(np.int32) for n in nuclei]
    cv2.polylines(img, polys, True, (0, 200, 0) if ds > 2 else (0, 255, 0), 1)


#: the image formats a preview is written in, by its name's suffix (anything else: PNG)
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def _write_png(path: str | Path, rgb: np.ndarray, existed: bool = True) -> None:
    import cv2

    from .atomic import commit, os_error, temp_path

    suffix = Path(path).suffix.lower()  # encoded as the name says (PNG unless JPEG, TIFF or WebP is asked for)
    tmp = temp_path(path).with_suffix(suffix if suffix in PREVIEW_SUFFIXES else ".png")
    try:
        ok = cv2.imwrite(str(tmp), rgb[..., ::-1])
    except cv2.error:
        ok = False
    if not ok:
        tmp.unlink(missing_ok=True)
        raise os_error(OSError("cannot write PNG"), path)
    commit(tmp, path, existed=existed)  # existed: whether ``path`` was there when the run began


def _progress(progress: Any, total: int, name: str) -> Callable[[int | None], None]:
    if callable(progress):
        done = [0]

        def cb(n: int | None) -> None:
            if n is not None:
                done[0] += n
                progress(done[0], total)

        return cb
    if not progress:
        return lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tiles"),
                 TimeRemainingColumn(), transient=False, console=Console(stderr=True))  # stdout: results only
    p.start()
    task = p.add_task(name, total=total)

    def update(n: int | None) -> None:
        if n is None:
            p.stop()
        else:
            p.advance(task, n)

    return update


def image_nuclei(image: np.ndarray, model: str | Segmenter = "default", *, mpp: float, device: str = "auto",
                 tile_size: int = 256, overlap: int | None = None, batch_size: int = 16) -> list[Nucleus]:
    """Segment an in-memory RGB image through the tiled pipeline; returns its nuclei (polygons in the image's pixel
    coordinates, scores, areas) in stitching order, as :func:`segment_slide` would write them. ``mpp``: the image's
    microns per pixel (required: a wrong scale ruins every nucleus; 40x scans are about 0.25, 20x about 0.5)."""
    from .slide import Level

    img = np.ascontiguousarray(np.asarray(image)[..., :3], dtype=np.uint8)
    h, w = img.shape[:2]
    slide = Slide(Path("<array>"), "image", "array", [Level(w, h, 1.0)], mpp, None, {}, {}, img)
    seg = load_model(model, device) if isinstance(model, str) else model
    nuclei: list[Nucleus] = []
    _segment_open_slide(slide, seg, mpp, tile_size, overlap, batch_size, nuclei.extend)
    return nuclei


def nuclei_labels(nuclei: list[Nucleus], shape: tuple[int, int]) -> np.ndarray:
    """int32 labels of ``shape`` (rows, cols): label k = the k-th nucleus' polygon (of two covering a pixel, the
    first one keeps it)."""
    out = np.zeros(shape, np.int32)
    for k, n in enumerate(nuclei, 1):
        paint_polygon(out, n.polygon, k)
    return out


def segment_image(image: np.ndarray, model: str | Segmenter = "default", *, mpp: float, device: str = "auto",
                  tile_size: int = 256, overlap: int | None = None, batch_size: int = 16) -> np.ndarray:
    """Segment an in-memory RGB image through the tiled pipeline; returns int32 labels of the image's shape
    (label k = the k-th nucleus in stitching order), rasterised from the output polygons (:func:`image_nuclei`).
    ``model`` and the rest default as ``wsiseg run`` does; ``mpp`` (microns per pixel) must be given."""
    nuclei = image_nuclei(image, model, mpp=mpp, device=device, tile_size=tile_size, overlap=overlap,
                          batch_size=batch_size)
    return nuclei_labels(nuclei, np.asarray(image).shape[:2])


def _segment_open_slide(slide: Slide, seg: Segmenter, mpp: float, tile_size: int, overlap: int | None,
                        batch_size: int, sink: Callable[[list[Nucleus]], None]) -> int:
    if overlap is None:
        overlap = min(int(np.ceil(seg.max_nucleus_px / 2.0)) * 2, (tile_size // 2) // 2 * 2)
    grid = TileGrid.for_slide(slide.dimensions, mpp, seg.mpp, tile_size, overlap)
    if hasattr(seg, "calibrate"):
        seg.calibrate(slide.thumbnail(max_size=2048)[0])
    stitcher = Stitcher(grid, seg.mpp)
    tiles = grid.tiles(None)
    with closing(iter_batches(functools.partial(read_tile, slide, grid), tiles, batch_size)) as batches:
        for ids, pixels in batches:
            for (r, c), inst in zip(ids, seg.predict(pixels)):
                nuclei = stitcher.add(r, c, inst)
                if nuclei:
                    sink(nuclei)
    last = stitcher.finish()
    if last:
        sink(last)
    return stitcher.count
