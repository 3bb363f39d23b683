"""One slide through the pipeline: :class:`SlideRun`, what :func:`wsiseg.api.segment_slide` runs.

Flow: :func:`wsiseg.io.slide.open_slide` -> :func:`wsiseg.wsi.tissue.tissue_mask` -> :class:`wsiseg.wsi.grid.TileGrid`
and :func:`wsiseg.wsi.grid.iter_batches` -> ``segmenter.predict`` -> :class:`wsiseg.wsi.stitch.Stitcher` -> exporters.
What the run is asked for is :class:`wsiseg.options.RunOptions` and :class:`wsiseg.options.Outputs`; the helpers below
are the run path's own (tile workers started by themselves, checkpoint pacing, the preview); the model comes from
the registry (:mod:`wsiseg.segmenters.registry`), the interpreter's switch interval from
:func:`wsiseg.core.runtime.quick_gil_handover`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.atomic import path_relation
from ..core.errors import ConfigError, InputError
from ..core.runtime import frozen_heap, quick_gil_handover
from ..core.version import __version__
from ..io.regions import read_regions, regions_file
from ..io.colour import describe as describe_profile
from ..io.slide import Slide, input_fingerprint, open_slide, resolve_mpp, slide_held, slide_file, slide_label
from ..options import PREVIEW_SUFFIXES, Outputs, RunOptions
from ..parallel import predict
from ..parallel.seams import BandStitcher
from ..parallel.tiles import Banded, Outlined, SlabPlaces, TilePool
from ..parallel.tiles import finish as finish_tiles
from ..segmenters.base import Calibrating, Segmenter, default_batch, describe, on_gpu
from ..segmenters.registry import configured_model, model_files, model_label
from .grid import TileGrid, iter_batches, plan_tiles, predict_ahead, tile_reader
from .cells import Cell, CellExpander
from .stains import slide_stain, with_pixels
from ..segmenters.focus import SHARP_PX
from .scale import Zoom, probe, sharpen
from .stitch import Decided, Nucleus, NucleusBlock, Stitcher
from .tissue import TissueMask, tissue_mask


@dataclass
class RunSummary:
    """What a run did: counts, tissue area and density, timings, the outputs written."""

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
    zoom: float = 1.0  # how many times larger than its own scale the model saw the slide (wsiseg.wsi.scale)
    sharpened_um: float = 0.0  # out of focus: the unsharp mask's width in um (segmenters.focus); 0: not sharpened
    refocused_tiles: int = 0  # out of focus in parts: the tiles predicted again, sharpened (segmenters.focus)
    outputs: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def table_row(self) -> dict[str, Any]:
        """The per-slide row of ``--summary-csv`` and cohort manifests: counts, tissue area and density."""
        return {"input": self.input, "nuclei": self.nuclei,
                "tissue_mm2": None if self.tissue_mm2 is None else round(self.tissue_mm2, 4),
                "nuclei_per_mm2": None if self.nuclei_per_mm2 is None else round(self.nuclei_per_mm2, 1),
                "mean_area_um2": None if self.mean_area_um2 is None else round(self.mean_area_um2, 2),
                "tiles_total": self.tiles_total, "tiles_segmented": self.tiles_segmented, "zoom": self.zoom,
                "sharpened_um": self.sharpened_um, "refocused_tiles": self.refocused_tiles,
                "seconds": round(self.seconds, 3)}



#: the run's timings (:attr:`RunSummary.stage_seconds`, after ``tissue``)
STAGES = ("read_wait", "segment", "segment_wait", "stitch", "tiles_wait", "write", "journal")


@dataclass
class _Pending:
    """A tile's decided nuclei waiting to be written: ``out`` (nuclei, encoded parts) once all are outlined, else
    the ``decided`` items (their own ``ready`` list) whose ``todo`` a tile worker outlines under ``ticket``, or the
    decisions of the tile ``rows`` a band's worker makes (:class:`~wsiseg.parallel.seams.BandStitcher`); ``safe``: the
    stitcher's safe row after it."""

    safe: float
    out: tuple | None = None
    decided: Any = None
    todo: list | None = None
    ticket: int | None = None
    rows: list | None = None


class SlideRun:
    """One run of :func:`wsiseg.api.segment_slide`, a method per phase, in this order (:meth:`run`):

    :meth:`configure_model` (load ``options.model``, apply the model options) -> :meth:`plan` (the slide's scale, the
    tile grid, the resolved options, the predicting process if asked for) -> :meth:`find_tissue` (tissue mask, tiles)
    -> :meth:`rescale` (``--zoom auto``: the scale the model sees the slide at; the stitcher) -> :meth:`open_journal`
    (resume or start over; the GeoJSON id seed) -> :meth:`open_writers` ->
    :meth:`stitch_all` (replay a journal, then predict, stitch and write every tile in raster order, checkpointing
    finished tile rows) -> :meth:`finish` (the preview, the journal removed, the summary). The writers commit their
    outputs when they close, between the last two.

    :attr:`given` holds the options as asked; :attr:`opts` the same with what the phases resolved (the zoom, overlap,
    batch size, slide reader, prefetch, tissue mask, tile workers and paint process).
    """

    def __init__(self, path: str | os.PathLike, outputs: Outputs, options: RunOptions,
                 progress: bool | Callable[[int, int], None] = False,
                 sink: Callable[[list[Nucleus]], None] | None = None) -> None:
        self.path = slide_file(Path(path))  # (a DICOM slide's folder: its main file)
        self.name = slide_label(self.path)  # (how messages name the slide)
        self.outputs = outputs
        self.given = self.opts = options
        self.progress = progress
        self.sink = sink
        self.journal: Any = None
        self.times = dict.fromkeys(STAGES, 0.0)
        self.label = 1  # the next nucleus' label: 1 + the nuclei emitted so far
        self.area = [0.0, 0]  # sum of the areas (um^2) and count of the nuclei emitted by this call

    def run(self) -> RunSummary:
        """All phases; outputs whole under their names or not at all. On a wsiseg error the journal is removed if
        resuming cannot help (bad input/config/model) and kept otherwise (output errors, a dead helper process)."""
        from ..core.errors import OutputError, ProcessDied, WsisegError

        try:
            return self._run()
        except WsisegError as e:
            journal = self.journal
            if journal is None:
                raise
            if not isinstance(e, (OutputError, ProcessDied)):
                journal.remove()  # bad input/config/model: resuming cannot help
                raise
            if journal.checkpoints:
                raise type(e)(f"{e}; the progress is kept: rerun with --resume to continue") from None
            raise

    def _run(self) -> RunSummary:
        t_start = time.perf_counter()
        self.share = _checkpoint_share()  # (a bad setting fails before anything is loaded or opened)
        self.roi_file, self.roi = _regions(self.given.roi, self.path)  # (so does a bad --roi)
        _outputs_apart(Path(self.path), self.outputs, self.roi_file)
        self.annotated = _annotated_image(self.path) if self.outputs.dicom_ann else None  # (and a slide no DICOM's)
        self.seg = self.configure_model()
        slide = open_slide(self.path, self.given.backend, self.given.icc_profile)
        with slide, ExitStack() as early:
            early.enter_context(slide_held(self.path))  # (its cached handles closed last, once all reads are done)
            if self.given.icc_profile == "apply" and slide.icc_profile is None:
                warnings.warn(f"{self.name}: --icc-profile apply: the slide embeds no ICC profile; its colours are "
                              "read as stored", stacklevel=2)
            self.plan(slide, early)
            self.find_tissue(early)
            self.rescale()
            self.open_journal()
            with ExitStack() as stack:
                self.open_writers(stack)
                self.stitch_all(stack)
                tf = time.perf_counter()
            self.times["write"] += time.perf_counter() - tf  # the writers' commits
            self.finish()
        self.stats.seconds = time.perf_counter() - t_start
        return self.stats

    # ------------------------------------------------------------------ phases
    def configure_model(self) -> Segmenter:
        """``options.model`` loaded (a name or path) or as given (a Segmenter), with the model options applied
        (:func:`~wsiseg.segmenters.registry.configured_model`)."""
        seg = configured_model(self.given)
        if self.given.predict_process:
            predict.check(seg)
        return seg

    def plan(self, slide: Slide, early: ExitStack) -> None:
        """The slide's scale, the tile grid (at ``options.zoom``, or at the slide's own scale until :meth:`rescale`
        decides an automatic one) and the resolved options; the predicting process, if asked for, starts now (on
        ``early``) and loads the model while the tissue mask is found."""
        self.slide = slide
        self.early = early
        self.slide_mpp = resolve_mpp(slide, self.given.mpp, self.seg.mpp)
        self.zoom = 1.0 if self.given.zoom == "auto" else float(self.given.zoom)
        self.zoom_probe = Zoom()
        self.predictor = None
        self._grid()
        self.read_workers = max(2, min(8, (os.cpu_count() or 2) // 2))  # tile decoding releases the GIL
        self._start_predictor()
        self.stats = RunSummary(input=str(self.path), model=describe(self.seg).name, zoom=self.zoom)

    def _grid_at(self, zoom: float) -> TileGrid:
        """The tile grid of the slide shown ``zoom`` times larger than its own scale."""
        seg, o, slide = self.seg, self.given, self.slide
        tile, overlap = plan_tiles(seg, slide.dimensions, self.slide_mpp, o.tile_size, o.overlap, zoom)
        if overlap > tile // 2:  # (the CLI checks a tile size it was given; the model's is known only now: the
            # flag's name in the message, as the CLI's, which TileGrid, knowing no flags, cannot give)
            raise ConfigError(f"--overlap {overlap}: must be even and at most half the tile size ({tile // 2})")
        return TileGrid.for_slide(slide.dimensions, self.slide_mpp, seg.mpp / zoom, tile, overlap)

    def _grid(self) -> None:
        """The tile grid at :attr:`zoom` and the options it resolves (tile, overlap, batch size, reader...)."""
        seg, o, slide = self.seg, self.given, self.slide
        self.grid = self._grid_at(self.zoom)
        tile, overlap = self.grid.tile, self.grid.overlap
        self.view_mpp = seg.mpp / self.zoom  # (micrometres per pixel of the model's view of the slide)
        self.opts = replace(o, tile_size=tile, overlap=overlap, zoom=self.zoom,
                            backend=slide.backend if o.backend == "auto" else o.backend,
                            batch_size=default_batch(seg, tile) if o.batch_size is None else o.batch_size,
                            prefetch=_prefetch_pays(seg) if o.prefetch is None else o.prefetch,
                            use_tissue_mask=o.use_tissue_mask and self.grid.rows * self.grid.cols != 1)

    def _start_predictor(self) -> None:
        if self.given.predict_process:
            if self.predictor is not None:  # (a grid of another zoom: the process reads by its grid)
                self.predictor.close()
            self.predictor = self.early.enter_context(
                predict.PredictProcess(self.seg, str(self.path), self.grid, self.opts, self.read_workers))

    def find_tissue(self, early: ExitStack) -> None:
        """The tissue mask (none for a one-tile slide: it is segmented whole) and the tiles to segment; the overview
        (:attr:`overview`) is read in a thread of its own meanwhile (awaited on ``early``)."""
        seg, slide, stats = self.seg, self.slide, self.stats
        t0 = time.perf_counter()
        use_mask = self.opts.use_tissue_mask
        if self.progress is True and use_mask:
            print(f"{self.name}: tissue mask ...", file=sys.stderr, flush=True)
        self.tissue = self.slide_tissue = tissue_mask(slide) if use_mask else None
        if self.roi is not None:  # (the regions narrow the mask; without one, the slide's whole area)
            import shapely

            w0, h0 = slide.dimensions
            if not self.roi.intersects(shapely.box(0, 0, w0, h0)):
                x0, y0, x1, y1 = (round(v) for v in self.roi.bounds)
                raise InputError(f"--roi {self.given.roi}: its regions ({x0}..{x1} x {y0}..{y1}) lie outside "
                                 f"{self.name} (0..{w0} x 0..{h0} level-0 pixels)")
            self.tissue = (self.tissue or TissueMask.blank(slide)).within(self.roi)
        # (after the mask: the slide handle is the thread's alone from now until the overview is in; tiles are read
        # through handles of their own, :func:`~wsiseg.wsi.grid.tile_reader`)
        reader = ThreadPoolExecutor(1, thread_name_prefix="wsiseg-overview")
        self._overview = reader.submit(slide.thumbnail, 2048)
        reader.shutdown(wait=False)  # (its thread ends with the read)
        early.callback(reader.shutdown)  # (waits for the read: the slide is closed after ``early``)
        stats.stage_seconds["tissue"] = time.perf_counter() - t0
        stats.tissue_fraction = self.tissue.fraction if self.tissue is not None else 1.0
        if isinstance(seg, Calibrating):
            seg.calibrate(_calibration_view(self.overview[0], self.slide_tissue))
        self._list_tiles()
        stats.tiles_total = self.grid.rows * self.grid.cols
        if self.tissue is not None and not self.tiles:
            where = " in the regions of interest" if self.roi is not None else ""
            warnings.warn(f"{self.name}: no tissue found{where}; writing empty outputs", stacklevel=2)

    def _list_tiles(self, slide_tiles: list[tuple[int, int]] | None = None) -> None:
        """The grid's tiles to segment (:attr:`tiles`: those on tissue, in the regions of interest if any) and the
        slide's tissue tiles (:attr:`slide_tiles`: what the scale probe and the haematoxylin level read, so that the
        nuclei inside regions of interest are the whole slide's run's: the same zoom, faint cut and dye band);
        ``slide_tiles`` if listed already."""
        if slide_tiles is None:
            slide_tiles = self.grid.tiles(self.slide_tissue)
        self.slide_tiles = slide_tiles
        self.tiles = slide_tiles if self.tissue is self.slide_tissue else self.grid.tiles(self.tissue)

    def rescale(self) -> None:
        """The stitcher, after ``--zoom auto`` chose the scale: the model segments a few tissue tiles at the slide's
        own scale (:func:`wsiseg.wsi.scale.probe`); where the slide's nuclei look much smaller than the model's own,
        the grid, tiles and predicting process are made again at the zoom it chose. The same slide, options and
        model always choose the same zoom (a resumed run checks it against its journal)."""
        self._choose_zoom()
        # the slide's haematoxylin level and hue, from a few of its tiles read ahead: far fainter outlines are left
        # out, and the dye band stays clear of its haematoxylin
        read = tile_reader(self.slide, str(self.path), self.opts.backend, self.grid)
        self.stitcher = Stitcher(self.grid, self.view_mpp, stain=slide_stain(read, self.slide_tiles))

    def _choose_zoom(self) -> None:
        if self.given.zoom != "auto" or not self.tiles:
            sharpen(self.seg, 0.0)  # (the probe decides the sharpening; without it the slide is shown as it is)
            return
        t0 = time.perf_counter()
        looked = {self.zoom: (self.grid, self.slide_tiles)}  # (each zoom's grid and tissue tiles, listed once)

        def tiles_at(zoom: float):
            if zoom not in looked:
                grid = self._grid_at(zoom)
                looked[zoom] = grid, grid.tiles(self.slide_tissue)
            grid, tiles = looked[zoom]
            return tile_reader(self.slide, str(self.path), self.opts.backend, grid), tiles

        self.zoom_probe = probe(self.seg, tiles_at)
        self.stats.stage_seconds["zoom"] = time.perf_counter() - t0
        if self.progress is True and self.zoom_probe.median_px is not None:
            print(f"{self.name}: {self.zoom_probe.describe(self.seg.mpp)}", file=sys.stderr, flush=True)
        if self.zoom_probe.sharpen_px:
            p = self.zoom_probe
            self.stats.sharpened_um = round(p.sharpen_px * self.seg.mpp, 3)
            warnings.warn(f"{self.name}: out of focus (its nuclei's edges {p.edge_px * self.seg.mpp:.2f} um "
                          f"wide, a sharp scan's about {SHARP_PX * self.seg.mpp:.2f}): sharpened before the model; "
                          "nuclei there may still be missed", stacklevel=2)
        if self.zoom_probe.zoom == 1.0:
            if self.zoom_probe.sharpen_px or self.zoom_probe.refocus:
                self._start_predictor()  # (a predicting process of its own sharpens too)
            return
        self.zoom = self.stats.zoom = self.zoom_probe.zoom
        self._grid()
        self._list_tiles(looked[self.zoom][1] if self.zoom in looked else None)
        self.stats.tiles_total = self.grid.rows * self.grid.cols
        self._start_predictor()

    @property
    def overview(self) -> tuple[np.ndarray, float]:
        """The slide's RGB overview (at most 2048 px on its long side) and its downsample from level 0, waited for:
        it is decoded in a thread while the first tiles are read and segmented, off the main thread, whose CPU
        bounds a run (a fixed cost per slide, measured in docs/speed.md). Raises the reading's error."""
        return self._overview.result()

    def open_journal(self) -> None:
        """With file outputs: the resume journal beside the main one (:mod:`wsiseg.wsi.resume`), resumed or
        started over as ``options.resume`` says, and the GeoJSON id seed (``uuid_seed``, else
        :func:`~wsiseg.wsi.resume.run_seed` of the parameters, the slide and the model: the same input and options
        always give the same ids, and runs whose nuclei differ never share them)."""
        from .resume import ResumeJournal, run_seed

        self.seed = self.given.uuid_seed
        target = self.outputs.main
        if not target:
            return
        params = self.resume_params()
        self.journal = ResumeJournal(target, params, self.given.resume)
        if self.journal.checkpoints:  # resuming: the killed run's temp files are garbage now
            _remove_stale_partials(*self.outputs.files().values())
        if self.seed is None:
            # (not by --objects: a cell keeps its nucleus' id, so the two runs' tables join nucleus to cell)
            self.seed = run_seed({**params, "wsiseg_version": __version__}, slide_file(Path(self.path)))

    def resume_params(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one: the input file, the options marked ``resume``
        as given (:meth:`RunOptions.resume_params`), what the run resolved from those marked ``"resolved"`` (the
        model and its settings, the scale, the overlap, the tissue mask, the tiles) and the outputs."""
        from .resume import file_digest

        seg, path = self.seg, Path(self.path)
        info, weights = describe(seg), model_files(seg)  # (the weights by content: two bundles share a name)
        size, mtime_ns = input_fingerprint(path)  # (an OME-Zarr folder's over its files)
        return {"input": str(path.resolve()), "input_name": path.name, "input_size": size,
                "input_mtime_ns": mtime_ns, **self.given.resume_params(),
                "model": self.stats.model, "model_mpp": seg.mpp, "model_threshold": info.threshold,
                **({"model_weights": [file_digest(f) for f in weights]} if weights else {}),
                **({"tta": info.tta} if info.tta else {}),  # (else: ids as before)
                **({"semantic_fusion": True} if info.semantic_fusion else {}),
                **({"ensemble": [str(Path(m).resolve()) if m else None for m in info.member_sources]}
                   if info.member_sources else {}),
                **({"precision": info.precision} if info.precision else {}),
                "slide_mpp": self.slide_mpp, "tile_size": self.opts.tile_size, "overlap": self.opts.overlap,
                **({"zoom": self.zoom} if self.zoom != 1.0 else {}),  # (else: ids as before)
                "tissue_mask": self.tissue is not None,
                **({"roi_sha1": hashlib.sha1(self.roi.wkb).hexdigest()} if self.roi is not None else {}),
                "tiles": len(self.tiles),
                "tiles_sha1": hashlib.sha1(np.asarray(self.tiles, np.int64).tobytes()).hexdigest(),
                "outputs": [str(Path(v).resolve()) if v else None
                            for v in (self.outputs.geojson, self.outputs.zarr, self.outputs.preview)]}

    def open_writers(self, stack: ExitStack) -> None:
        """The GeoJSON and zarr writers and the preview's canvas (on ``stack``: leaving it commits or discards
        them), the tile workers, paint process and GeoJSON writing process resolved, the progress bar."""
        from ..export.geojson import GeoJSONWriter
        from ..export.zarr_labels import ZarrLabelWriter

        stack.enter_context(quick_gil_handover())
        stack.enter_context(frozen_heap())
        out, o, seg = self.outputs, self.opts, self.seg
        self.preview_img = None  # (drawn on a copy of the overview from the first nuclei on: _emit, finish)
        self.preview_existed = bool(out.preview) and Path(out.preview).exists()
        self.derived_existed = {k: bool(v) and Path(v).exists() for k, v in (("table", out.table),
                                                                              ("dicom_ann", out.dicom_ann))}
        workers = auto_tile_workers(seg, len(self.tiles)) if o.tile_workers is None else o.tile_workers
        paint = workers > 0 if o.paint_process is None else o.paint_process
        write = workers > 0 if o.geojson_process is None else o.geojson_process
        self.opts = replace(o, tile_workers=workers, paint_process=paint, geojson_process=write)
        self.gj = stack.enter_context(GeoJSONWriter(out.geojson, self.header(), seed=self.seed, process=write)) \
            if out.geojson else None
        w0, h0 = self.slide.dimensions
        self.zw = stack.enter_context(
            ZarrLabelWriter(out.zarr, (h0, w0), self.slide_mpp, self._overview, paint_process=paint,
                            image_reader=_level0_reader(self.slide) if out.zarr_image else None)) if out.zarr else None
        self.cells = CellExpander(out.cell_expansion / self.slide_mpp, self.slide_mpp, (h0, w0)) \
            if out.objects == "cells" and self.gj is not None else None
        self.bar = _progress(self.progress, len(self.tiles), self.name)

    def header(self) -> dict[str, Any]:
        """The GeoJSON's provenance header: input, wsiseg version, model and its settings, scales, tiling; what the
        features are when they are cells; the bounds' corner of a slide cropped to them (:mod:`wsiseg.io.slide`)."""

        seg, o, out = self.seg, self.opts, self.outputs
        info = describe(seg)
        return {"input": str(self.path), "wsiseg_version": __version__, "model": self.stats.model,
                "model_source": model_label(info.source),
                "min_score": None if info.min_score is None else round(info.min_score, 4),
                "tta": info.tta, "semantic_fusion": info.semantic_fusion,
                **({"ensemble": [model_label(m) or m for m in info.member_sources]} if info.member_sources else {}),
                **({"precision": info.precision} if info.precision else {}),  # (reduced arithmetic only)
                "slide_mpp": self.slide_mpp,
                "mpp_source": "--mpp" if o.mpp is not None else "file" if self.slide.mpp is not None
                else "assumed (model's)", "model_mpp": seg.mpp, "zoom": self.zoom,
                **({"zoom_probe": asdict(self.zoom_probe)} if self.zoom_probe.median_px is not None else {}),
                "tile_size": o.tile_size, "overlap": o.overlap,
                **({"tissue_mask": False} if not self.given.use_tissue_mask else {}),
                # (mean haematoxylin; the hue in degrees and the saturation: wsiseg.wsi.stains.drop_faint, drop_dye)
                "faint_below": round(self.stitcher.stain.faint, 4), "dye_hue_top": self.stitcher.stain.dye_top,
                "grey_below": self.stitcher.stain.grey_below,
                **({"roi": _roi_header(self.roi_file, self.roi)} if self.roi is not None else {}),
                **({"objects": "cells", "cell_expansion_um": out.cell_expansion} if out.objects == "cells" else {}),
                **({"bounds_origin": list(self.slide.origin)} if self.slide.origin != (0, 0) else {}),
                # (a CZI's scenes, each an image of its own in QuPath: x, y, width, height here)
                **({"czi_scenes": self.slide.properties["czi.scenes"]} if "czi.scenes" in self.slide.properties
                   else {}),
                # (the colours the model saw: converted to sRGB by the slide's profile, named here)
                **({"icc_profile": describe_profile(self.slide.icc_profile)} if self.slide.icc_applied else {})}

    def stitch_all(self, stack: ExitStack) -> None:
        """The stitch loop: replay the journal (resuming), then predict the remaining tiles, stitch each (its own
        share in the tile pool; the seams here in raster order, or, with tile workers, by the workers in bands of
        rows) and write its nuclei in the stitcher's order; the last undecided ones at the end."""
        self.done = 0
        journal = self.journal
        if journal is not None and journal.checkpoints:  # resume: replay, then continue after the last row
            for nuclei, safe in journal.replay():
                self._emit(nuclei)
                self._flush(safe)
            self.done = journal.restore(self.stitcher)
            self.bar(self.done)
        # (the tissue mask's second guard, no nucleus centred on glass, is applied there: wsiseg.wsi.tissue)
        workers = self.opts.tile_workers
        # (a predicting thread, or the predicting process' results, go into the workers' slab a batch ahead of the
        # jobs in flight: _predictions)
        ahead = self.opts.batch_size if self.predictor is not None or self.opts.prefetch else 0
        self.pool = stack.enter_context(TilePool(self.grid, self.stitcher.margin, self.view_mpp, workers,
                                                 tissue=self.tissue, bands=workers > 0, places=SlabPlaces(ahead=ahead),
                                                 stain=self.stitcher.stain))
        # with tile workers, they decide the seams too, in bands of rows (the same decisions: wsiseg.wsi.bands)
        self.bands = BandStitcher(self.tiles[self.done:], self.pool.decide,
                                  start=self.stitcher.state() if self.done else None) if workers > 0 else None
        self.next_rows = 0  # with bands: the index of the next row whose decisions are to be written
        self.last_row = self.tiles[self.done - 1][0] if self.done else -1  # the row of the last tile added
        self.deferred: deque = deque()  # tiles' results taken while waiting for a band (_pump), to add next
        self.since: list = []  # emitted since the last checkpoint: lists of nuclei, or blocks
        self.ckpt = (0.0, 0.0)  # when the last checkpoint ended, and what it cost
        self.row = self.tiles[self.done][0] if self.done < len(self.tiles) else -1
        self.safe_y0 = 0.0  # the stitcher's safe row (level 0) after the tiles decided so far
        self.pending: deque[_Pending] = deque()  # decided tiles not written yet, in order (_queue, _emit_ready)
        self.emitted_safe = 0.0  # the safe row after the last tile written
        t = self.times
        with closing(self._predictions()) as predicted:
            for ids, results, tr, tp, tpw in predicted:
                t["read_wait"], t["segment"], t["segment_wait"] = t["read_wait"] + tr, t["segment"] + tp, \
                    t["segment_wait"] + tpw
                self.stats.refocused_tiles += sum(1 for inst in results if inst.sharpened)
                ts = time.perf_counter()
                self.pool.submit([(r, c, inst) for (r, c), inst in zip(ids, results)])
                t["stitch"] += time.perf_counter() - ts
                self._drain(wait=False)
        self._drain(wait=True)
        self._emit_ready(wait=True)
        self.bar(None)
        ts = time.perf_counter()
        if self.bands is not None:
            rows = self.bands.rows[self.next_rows:]
            while not all(self.bands.final(r) for r in rows):
                self._pump()
            self.stitcher.cut_dropped, self.stitcher.seam_dropped = self.bands.cut_dropped, self.bands.seam_dropped
            for block in self._band_rows(rows):
                self._emit(block)
        else:
            nuclei, encoded = finish_tiles(self.stitcher.finish_decided())
            self._emit(nuclei, encoded)
        t["stitch"] += time.perf_counter() - ts
        if self.cells is not None:
            self._write_cells(self.cells.finish())
        self.overview  # (its reading's error, if any, before the writers commit)

    def finish(self) -> None:
        """After the writers committed: the preview, the journal removed, the summary's figures and warnings."""
        out, stats, stitcher = self.outputs, self.stats, self.stitcher
        if out.preview:
            _write_png(out.preview, self._preview(), existed=self.preview_existed)
        self._write_derived()
        if self.journal is not None:
            self.journal.remove()
        stats.tiles_segmented = len(self.tiles)
        stats.nuclei = self.label - 1
        if self.slide_mpp:
            w0, h0 = self.slide.dimensions
            stats.tissue_mm2 = stats.tissue_fraction * w0 * h0 * self.slide_mpp ** 2 / 1e6
            stats.nuclei_per_mm2 = stats.nuclei / stats.tissue_mm2 if stats.tissue_mm2 > 0 else 0.0
        stats.mean_area_um2 = self.area[0] / self.area[1] if self.area[1] else None
        stats.cut_dropped = stitcher.cut_dropped
        stats.seam_dropped = stitcher.seam_dropped
        stats.stage_seconds.update(self.times)
        stats.outputs.update({k: str(v) for k, v in out.files().items() if Path(v).exists()})  # (no annotations of
        # a slide without nuclei: _write_derived)
        if stitcher.cut_dropped:
            warnings.warn(f"{stitcher.cut_dropped} nuclei larger than the overlap ({self.opts.overlap} px) were cut "
                          f"by tile borders and dropped; raise --overlap", stacklevel=2)

    def _write_derived(self) -> None:
        """The outputs made from the committed GeoJSON, read back a feature at a time: the table, then the DICOM
        annotations (none for a slide without nuclei: an annotation object needs one; a warning says so)."""
        out, existed = self.outputs, self.derived_existed
        if out.table:
            from ..export.table import write_table

            write_table(out.geojson, out.table, mpp=self.slide_mpp, existed=existed["table"])  # (named as the
            # header's input: self.path)
        if out.dicom_ann:
            from ..export.dicom_ann import write_annotations

            if not write_annotations(out.geojson, self.path, out.dicom_ann, origin=self.slide.origin,
                                     header=self.header(), image=self.annotated, existed=existed["dicom_ann"]):
                warnings.warn(f"{self.name}: no nuclei, so no DICOM annotations were written ({out.dicom_ann})",
                              stacklevel=2)

    # ------------------------------------------------------------------ the stitch loop's steps
    def _predictions(self) -> Iterator[tuple]:
        """``(tile_ids, [TileInstances], read_wait_s, predict_s, predict_wait_s)`` per batch of the remaining tiles:
        from the predicting process, or read and predicted here (a batch ahead in a thread when ``prefetch``); either
        way each result keeps its tile's pixels (:func:`~wsiseg.wsi.stains.with_pixels`) for the tile pool to measure
        the stains from."""
        rest, o = self.tiles[self.done:], self.opts
        if self.predictor is not None:  # (its results copied from its ring straight into the workers' slab)
            return self.predictor.predict(rest, stage=self.pool.stage if self.pool.live else None)
        read = tile_reader(self.slide, str(self.path), o.backend, self.grid)
        batches = iter_batches(read, rest, o.batch_size, workers=self.read_workers)
        predict = with_pixels(self.seg.predict)
        if o.prefetch and self.pool.live:  # (the tiles copied into the workers' slab in the predicting thread)
            predict = self.pool.staging(predict)
        return predict_ahead(batches, predict, depth=int(o.prefetch))

    def _drain(self, wait: bool) -> None:
        """Stitch and write the tiles the pool has prepared, in raster order (``wait``: all of them); a new tile
        row first checkpoints the finished ones (:meth:`_checkpoint`)."""
        n0 = self.done
        t = self.times
        it = self.pool.results(wait)
        while True:
            to = time.perf_counter()
            p = self.deferred.popleft() if self.deferred else next(it, None)
            t["tiles_wait"] += time.perf_counter() - to
            if p is None:
                break
            if self._take(p):
                self._emit_ready()
                continue
            if p.row != self.row:  # every tile of the previous row is in
                self.row = p.row
                if self._overview.done():  # (a slide whose overview cannot be read fails now, not at the end)
                    self.overview
                self._checkpoint()
            ts = time.perf_counter()
            if self.bands is not None:
                self._add_banded(p)
            else:
                decided = self.stitcher.add_proposal(p)
                self.safe_y0 = self.stitcher.safe_y * self.grid.scale - 2
                self._queue(decided)
            self.done += 1
            t["stitch"] += time.perf_counter() - ts
            self._emit_ready()
        if self.done > n0:
            self._flush(self.emitted_safe)
            self.bar(self.done - n0)

    def _add_banded(self, p) -> None:
        """A tile's proposal with bands (:class:`BandStitcher`): queued for writing after the decisions of the rows
        two or more above it not queued yet (the stitcher's order), which its band's worker makes."""
        bands = self.bands
        bands.add(p)
        self.last_row = p.row
        rows = []
        while self.next_rows < len(bands.rows) and bands.rows[self.next_rows] <= p.row - 2:
            rows.append(bands.rows[self.next_rows])
            self.next_rows += 1
        self.safe_y0 = self.grid.origin(bands.safe_row(p.row), 0)[1] * self.grid.scale - 2
        if rows:
            self.pending.append(_Pending(self.safe_y0, rows=rows))
        self.pending.append(_Pending(self.safe_y0, out=[p.block]))

    def _band_rows(self, rows: list[int]) -> list[NucleusBlock]:
        """The nuclei of final ``rows``' decisions, a block per row, in order."""
        return [self.bands.decided(r) for r in rows]

    def _pump(self) -> None:
        """Wait for the pool's next result and take it: a band's decisions, or trimmed outlines; a tile's proposal
        is kept for :meth:`_drain` to add in order (a checkpoint waiting here journals the state before it)."""
        p = next(self.pool.results(wait=True), None)
        if p is None:
            raise RuntimeError("waiting for a band's seam decisions that were never asked for")
        if not self._take(p):
            self.deferred.append(p)

    def _take(self, p) -> bool:
        """Take the pool's result ``p`` if it is trimmed seam nuclei outlined by a tile worker or a band's seam
        decisions (True); a tile's proposal is not taken here (False)."""
        if isinstance(p, Outlined):
            self._outlined(p.ticket, p.ready)
        elif isinstance(p, Banded):
            self.bands.result(p.ticket, p.result)
        else:
            return False
        return True

    def _queue(self, decided: Decided) -> None:
        """Queue a tile's decided nuclei for writing: outlined now, or, where a seam decision trimmed some masks and
        there are tile workers, once a worker has outlined those (:meth:`TilePool.outline`), so that the main
        process only decides seams. Written in order either way (:meth:`_emit_ready`): the same outputs."""
        ready = list(decided.ready) if decided.ready is not None else [None] * len(decided.items)
        todo = [i for i, r in enumerate(ready) if r is None]
        if todo and self.pool.live:
            ticket = self.pool.outline([decided.items[i] for i in todo])
            self.pending.append(_Pending(self.safe_y0, decided=replace(decided, ready=ready), todo=todo,
                                         ticket=ticket))
        else:
            self.pending.append(_Pending(self.safe_y0, out=finish_tiles(decided)))

    def _outlined(self, ticket: int, results: list) -> None:
        """A worker's outlines for ``ticket``: the tile waiting for them can be written."""
        for e in self.pending:
            if e.ticket == ticket and e.out is None:
                for i, r in zip(e.todo, results):
                    e.decided.ready[i] = r
                e.out = finish_tiles(e.decided)
                return

    def _emit_ready(self, wait: bool = False) -> None:
        """Write the queued tiles whose nuclei are all outlined, in order (``wait``: all, waiting for workers)."""
        while self.pending:
            e = self.pending[0]
            if e.rows is not None and e.out is None:
                while not all(self.bands.final(r) for r in e.rows):
                    if not wait:
                        return
                    self._pump()
                e.out = self._band_rows(e.rows)
            if e.out is None:
                if not wait:
                    return
                self._outlined(e.ticket, self.pool.wait_outline(e.ticket))
            self.pending.popleft()
            if isinstance(e.out, list):  # (blocks of nuclei, with bands)
                for block in e.out:
                    self._emit(block)
                self.since.extend(e.out)
            else:
                self._emit(*e.out)
                self.since.append(e.out[0])
            self.emitted_safe = e.safe

    def _checkpoint(self) -> None:
        """Journal the finished tile rows, unless the last checkpoint ended less than its own cost / share ago
        (:data:`CHECKPOINT_SHARE`)."""
        journal, (last, cost) = self.journal, self.ckpt
        if journal is None or time.perf_counter() - last < cost / self.share:
            return
        stitcher, bands, r = self.stitcher, self.bands, self.last_row
        if bands is not None:  # (the rows the stitcher would have decided must have been asked for)
            decided = [x for x in bands.rows if x <= r - 2]
            if decided and not bands.asked_for(decided[-1]):
                return
        self._emit_ready(wait=True)  # (the journal holds the stitcher as it is: every decided tile written)
        self._flush(self.safe_y0)
        tj = time.perf_counter()
        if bands is not None:
            stitcher = Stitcher(self.grid, self.view_mpp, self.stitcher.margin, self.stitcher.stain)
            stitcher.restore(bands.state(r))
        journal.checkpoint(self.since, stitcher, self.done, self.safe_y0)
        now = time.perf_counter()
        self.ckpt = (now, now - tj)
        self.times["journal"] += now - tj
        self.since = []

    def _emit(self, nuclei: list[Nucleus] | NucleusBlock, encoded: list | None = None) -> None:
        """Write ``nuclei`` (labels from :attr:`label` on) to every output and the sink, and keep them for the next
        checkpoint. A :class:`NucleusBlock` (with bands) goes to the writers as columns; :class:`Nucleus` objects
        are made of it only for the sink or the cells."""
        if not len(nuclei):
            return
        tw = time.perf_counter()
        block = nuclei if isinstance(nuclei, NucleusBlock) else None
        objects = (lambda: block.nuclei()) if block is not None else (lambda: nuclei)
        if self.cells is not None:  # (written once final: _flush)
            self.cells.add(objects())
        elif self.gj is not None:
            self.gj.write(nuclei, encoded) if block is None else self.gj.write_block(block)
        if self.zw is not None:
            if block is None:
                self.zw.write(nuclei, self.label)
            else:
                self.zw.write_polygons(block.poly, block.plen, self.label)
        if self.outputs.preview:
            _draw(self._preview(), [n.polygon for n in nuclei] if block is None else block.polygons(),
                  self.overview[1])
        if self.sink is not None:
            self.sink(objects())
        self.area[0] += sum(n.area_um2 for n in nuclei) if block is None else sum(block.meas[:, 1].tolist())
        self.area[1] += len(nuclei)
        self.times["write"] += time.perf_counter() - tw
        self.label += len(nuclei)

    def _preview(self) -> np.ndarray:
        """The preview's canvas: a copy of the overview, made when first asked for, with the regions of interest
        outlined in yellow (2 px) when there are some."""
        if self.preview_img is None:
            self.preview_img = self.overview[0].copy()
            if self.roi is not None:
                import shapely

                _draw(self.preview_img, [np.asarray(r.coords)[:, :2] for p in shapely.get_parts(self.roi)
                                         for r in (p.exterior, *p.interiors)], self.overview[1], (255, 210, 0), 2)
        return self.preview_img

    def _write_cells(self, cells: list[Cell]) -> None:
        if cells:
            tw = time.perf_counter()
            self.gj.write(cells)
            self.times["write"] += time.perf_counter() - tw

    def _flush(self, safe: float) -> None:
        """Let the zarr writer write the label rows above level-0 row ``safe`` (no later tile paints there), and
        write the cells now final."""
        if self.cells is not None:
            self._write_cells(self.cells.settled(safe))
        if self.zw is not None:
            tw = time.perf_counter()
            self.zw.flush_above(safe)
            self.times["write"] += time.perf_counter() - tw


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
    return AUTO_TILE_WORKERS if on_gpu(seg) and (os.cpu_count() or 1) >= 2 * AUTO_TILE_WORKERS else 0


def _outputs_apart(slide: Path, outputs: Outputs, roi: Path | None = None) -> None:
    """ConfigError for an output that is the input, lies inside it or holds it: writing it would replace the slide
    (an OME-Zarr slide is a folder, and ``--zarr`` writes one); or that is the regions file ``roi`` (QuPath's
    annotations, which ``--overwrite`` would have replaced by the nuclei)."""
    for kind, v in outputs.files().items():
        out = Path(v).resolve()
        where = path_relation(out, slide)
        if where:
            raise ConfigError(f"the {kind} output {out} {where} the input {slide.resolve()}: name another")
        if roi is not None and out == roi.resolve():
            raise ConfigError(f"the {kind} output {out} is the --roi regions file: name another")


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
    """Delete the temp files an interrupted run left beside ``outputs`` (see :func:`wsiseg.core.atomic.temp_path`)."""
    import glob

    from ..core.atomic import discard

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
    if on_gpu(seg):
        return True
    if not describe(seg).device:
        return False
    import torch

    return torch.get_num_threads() < (os.cpu_count() or 1)


def _annotated_image(path: Path):
    """The DICOM image a run's ``--dicom-ann`` will refer to, found and checked against the slide before any work
    (:func:`~wsiseg.export.dicom_ann.annotated_slide`)."""
    from ..export.dicom_ann import annotated_slide

    return annotated_slide(path)[2]


def _level0_reader(slide: Slide) -> Callable[[int, int, int, int], np.ndarray]:
    """``(x, y, w, h)`` -> the slide's level-0 RGB pixels there (the zarr image pyramid's source)."""
    return lambda x, y, w, h: slide.read_region((x, y), 0, (w, h))


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


def _regions(roi: str | os.PathLike | None, slide: str | os.PathLike) -> tuple[Path | None, Any]:
    """The file and the regions of interest of ``--roi`` for ``slide`` (the file given, or the slide's own file in
    that folder: :func:`~wsiseg.io.regions.regions_file`, :func:`~wsiseg.io.regions.read_regions`), or ``(None,
    None)``; an error names the flag."""
    if roi is None:
        return None, None
    try:
        path = regions_file(roi, slide)
        return path, read_regions(path)
    except InputError as e:
        raise InputError(f"--roi {e}") from None


def _roi_header(path: Path, roi: Any) -> dict[str, Any]:
    """The GeoJSON header's record of the regions of interest: their file, how many polygons, their area."""
    import shapely

    return {"file": str(path), "polygons": int(shapely.get_num_geometries(roi)), "area_px": round(roi.area, 1)}


def _draw(img: np.ndarray, polygons: list[np.ndarray], ds: float, colour: tuple[int, int, int] | None = None,
          width: int = 1) -> None:
    import cv2

    polys = [np.round(p / ds - 0.5).astype(np.int32) for p in polygons]
    cv2.polylines(img, polys, True, colour or ((0, 200, 0) if ds > 2 else (0, 255, 0)), width)


def _write_png(path: str | Path, rgb: np.ndarray, existed: bool = True) -> None:
    import cv2

    from ..core.atomic import commit, os_error, temp_path

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

