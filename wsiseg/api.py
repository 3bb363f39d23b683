"""The public API: one call segments a slide (or an image) and writes the outputs.

    from wsiseg.api import segment_slide, load_model
    summary = segment_slide("slide.svs", geojson="nuclei.geojson", zarr="nuclei.zarr")

Flow: :func:`wsiseg.io.slide.open_slide` -> :func:`wsiseg.wsi.tissue.tissue_mask` -> :class:`wsiseg.wsi.grid.TileGrid`
and :func:`wsiseg.wsi.grid.iter_batches` -> ``segmenter.predict`` -> :class:`wsiseg.wsi.stitch.Stitcher` -> exporters,
run by :class:`wsiseg.wsi.run.SlideRun`; what a run is asked for is :mod:`wsiseg.options` (:class:`RunOptions`,
:class:`Outputs`).
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import closing
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .core.errors import ConfigError, ModelError
from .io.pixels import image_rgb
from .io.slide import Slide
from .options import Outputs, RunOptions, split_keywords
from .segmenters.base import Calibrating, Segmenter, default_batch
from .segmenters.registry import (BUILTIN_MODELS, BUNDLED_MODELS, PRECISIONS, bundled_weights, check_min_score,
                                  configured_model, load_model, model_path, set_ensemble, set_min_score, set_precision,
                                  set_semantic_fusion, set_tta)
from .wsi.grid import TileGrid, iter_batches, plan_grid, read_tile
from .wsi.run import AUTO_MIN_TILES, AUTO_TILE_WORKERS, RunSummary, SlideRun, auto_tile_workers
from .wsi.stains import slide_stain, with_pixels
from .wsi.stitch import Nucleus, Stitcher, paint_polygon

__all__ = ["BUILTIN_MODELS", "BUNDLED_MODELS", "PRECISIONS", "AUTO_MIN_TILES", "AUTO_TILE_WORKERS", "ConfigError",
           "ModelError", "Nucleus", "Outputs", "RunOptions", "RunSummary", "auto_tile_workers", "bundled_weights",
           "check_min_score", "configured_model", "image_nuclei", "load_model", "model_path", "nuclei_labels", "sample_slide",
           "segment_image", "segment_slide", "set_ensemble", "set_min_score", "set_precision", "set_semantic_fusion",
           "set_tta"]

log = logging.getLogger("wsiseg")


def sample_slide() -> Path:
    """The small real Aperio slide bundled with the package (a crop of OpenSlide's CMU-1, CC0)."""
    return Path(str(resources.files("wsiseg") / "data" / "sample.svs"))


def segment_slide(path: str | os.PathLike, outputs: Outputs | str | os.PathLike | None = None,
                  options: RunOptions | None = None, *, model: str | Segmenter = "default",
                  progress: bool | Callable[[int, int], None] = False,
                  sink: Callable[[list[Nucleus]], None] | None = None, **kw: Any) -> RunSummary:
    """Segment every nucleus of the slide/image at ``path`` (a file, or the folder of a DICOM slide:
    :mod:`wsiseg.io.dicom`) and write the requested outputs (atomically).

    What to write is an :class:`~wsiseg.options.Outputs` (``geojson``, ``zarr``, ``preview``, ``zarr_image``; a
    path alone: the GeoJSON), how to segment a :class:`~wsiseg.options.RunOptions` (the model and its settings, the
    scale, the tiling, how the work is spread; each field's ``help`` says what it does). Each field can also be
    given as a keyword argument, as ``wsiseg run``'s options: ``segment_slide(path, geojson="n.geojson",
    min_score=0.9)``; keywords (and ``model``, unless it is ``"default"``) override the fields of ``outputs`` and
    ``options``; an unknown keyword is a TypeError. ``progress``: a bar on stderr (``True``) or a callback
    ``(tiles_done, tiles_total)``; ``sink``, if given, also receives each tile's nuclei (level-0 polygons) as they are
    stitched. Returns the run's :class:`RunSummary`.

    Reliability: outputs appear whole under their names, or not at all. While it runs, a run with file outputs keeps
    a journal of its finished tile rows beside its main output (:mod:`wsiseg.wsi.resume`); ``resume=True``
    continues an interrupted run from it, with outputs identical to an uninterrupted run's (the input and the
    options that decide the outputs must match: else :class:`ConfigError`). Without ``resume`` an old journal is
    discarded. The journal is removed on success and on input/config/model errors, and kept on output errors (disk
    full), interruptions and a dead helper process (:class:`~wsiseg.core.errors.ProcessDied`). GeoJSON ids come from
    ``uuid_seed``, or, when it is ``None`` and there is a file output, from :func:`wsiseg.wsi.resume.run_seed`
    (the same input and options always give the same ids). The options that only spread the work (batch size,
    prefetch, tile workers, paint and predict processes) never change the outputs.

    A slide/image smaller than one tile is padded with white (like glass) and segmented whole, without a tissue
    mask; a slide where the tissue mask finds nothing gives empty, valid outputs and a warning.
    """
    out_kw, opt_kw = split_keywords(kw)
    if not (isinstance(model, str) and model == "default"):
        opt_kw["model"] = model
    if isinstance(outputs, (str, os.PathLike)):
        outputs = Outputs(geojson=outputs)
    elif outputs is not None and not isinstance(outputs, Outputs):
        raise TypeError(f"segment_slide(): outputs must be an Outputs or a GeoJSON path, not {type(outputs).__name__}")
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"segment_slide(): options must be a RunOptions, not {type(options).__name__}")
    outputs = replace(outputs, **out_kw) if outputs is not None else Outputs(**out_kw)
    options = replace(options, **opt_kw) if options is not None else RunOptions(**opt_kw)
    return SlideRun(path, outputs, options, progress=progress, sink=sink).run()


def image_nuclei(image: np.ndarray, model: str | Segmenter = "default", *, mpp: float, device: str = "auto",
                 tile_size: int | None = None, overlap: int | None = None,
                 batch_size: int | None = None, zoom: float | str = "auto") -> list[Nucleus]:
    """Segment an in-memory image through the tiled pipeline; returns its nuclei (polygons in the image's pixel
    coordinates, scores, areas) in stitching order, as :func:`segment_slide` would write them without a tissue mask
    (``use_tissue_mask=False``: every tile read; with its mask a slide's run reads only the tiles on tissue and takes
    its stain level from them, so a few nuclei by the tissue's edges differ: 9 of the bundled sample's 2,461).
    ``image``: RGB
    ``(H, W, 3)``, RGBA (composited onto white), greyscale ``(H, W)`` or channels first; uint8, other integers
    (scaled from their range: 16-bit as a 16-bit file is read) or floats (0..1, or 0..255 where a value is above 1),
    read as a file of these pixels would be (:mod:`wsiseg.io.pixels`). ``mpp``: the image's
    microns per pixel (required: a wrong scale ruins every nucleus; 40x scans are about 0.25, 20x about 0.5).
    ``tile_size``: None, the model's; ``batch_size``: None, as ``wsiseg run`` chooses it; ``zoom``: as ``wsiseg
    run --zoom`` (:mod:`wsiseg.wsi.scale`)."""
    from .options import zoom_value
    from .wsi.scale import probe, sharpen

    zoom = zoom_value(zoom)
    slide = Slide.from_array(image_rgb(image), mpp)  # (as a file of these pixels is read: io.pixels)
    seg = load_model(model, device) if isinstance(model, str) else model
    nuclei: list[Nucleus] = []

    @functools.cache  # (each zoom's grid made once: the probe's looks and the run share them)
    def grid_at(z: float) -> TileGrid:
        return plan_grid(seg, slide.dimensions, mpp, tile_size, overlap, z)

    def tiles_at(z: float):
        grid = grid_at(z)
        return functools.partial(read_tile, slide, grid), grid.tiles(None)

    if zoom == "auto":
        zoom = probe(seg, tiles_at).zoom  # (and the sharpening of a slide out of focus)
    else:
        sharpen(seg, 0.0)
    grid = grid_at(zoom)
    _segment_open_slide(slide, seg, grid, default_batch(seg, grid.tile) if batch_size is None else batch_size,
                        nuclei.extend, zoom)
    return nuclei


def nuclei_labels(nuclei: list[Nucleus], shape: tuple[int, int]) -> np.ndarray:
    """int32 labels of ``shape`` (rows, cols): label k = the k-th nucleus' polygon (of two covering a pixel, the
    first one keeps it)."""
    out = np.zeros(shape, np.int32)
    for k, n in enumerate(nuclei, 1):
        paint_polygon(out, n.polygon, k)
    return out


def segment_image(image: np.ndarray, model: str | Segmenter = "default", *, mpp: float, device: str = "auto",
                  tile_size: int | None = None, overlap: int | None = None,
                  batch_size: int | None = None, zoom: float | str = "auto") -> np.ndarray:
    """Segment an in-memory RGB image through the tiled pipeline; returns int32 labels of the image's shape
    (label k = the k-th nucleus in stitching order), rasterised from the output polygons (:func:`image_nuclei`).
    ``model`` and the rest default as ``wsiseg run`` does; ``mpp`` (microns per pixel) must be given."""
    rgb = image_rgb(image)  # (its shape: channels first come last)
    nuclei = image_nuclei(rgb, model, mpp=mpp, device=device, tile_size=tile_size, overlap=overlap,
                          batch_size=batch_size, zoom=zoom)
    return nuclei_labels(nuclei, rgb.shape[:2])


def _segment_open_slide(slide: Slide, seg: Segmenter, grid: TileGrid, batch_size: int,
                        sink: Callable[[list[Nucleus]], None], zoom: float = 1.0) -> int:
    if isinstance(seg, Calibrating):
        seg.calibrate(slide.thumbnail(max_size=2048)[0])
    tiles = grid.tiles(None)
    read = functools.partial(read_tile, slide, grid)
    stitcher = Stitcher(grid, seg.mpp / zoom, stain=slide_stain(read, tiles))
    predict = with_pixels(seg.predict)  # (the tiles' pixels for the stitcher's hole guard and stain measurements)
    with closing(iter_batches(read, tiles, batch_size)) as batches:
        for ids, pixels in batches:
            for (r, c), inst in zip(ids, predict(pixels)):
                nuclei = stitcher.add(r, c, inst)
                if nuclei:
                    sink(nuclei)
    last = stitcher.finish()
    if last:
        sink(last)
    return stitcher.count
