"""The public API: one call segments a slide (or an image) and writes the outputs.

    from wsiseg.api import segment_slide, load_model
    summary = segment_slide("slide.svs", geojson="nuclei.geojson", zarr="nuclei.zarr")

Flow: :func:`wsiseg.io.slide.open_slide` -> :func:`wsiseg.wsi.tissue.tissue_mask` -> :class:`wsiseg.wsi.grid.TileGrid` and
:func:`wsiseg.wsi.grid.iter_batches` -> ``segmenter.predict`` -> :class:`wsiseg.wsi.stitch.Stitcher` -> exporters, run by
:class:`wsiseg.wsi.run.SlideRun`; what a run is asked for is :mod:`wsiseg.options` (:class:`RunOptions`,
:class:`Outputs`).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from contextlib import closing
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .core.errors import ConfigError, ModelError
from .options import Outputs, RunOptions, split_keywords
from .segmenters.base import Segmenter
from .io.slide import Slide
from .wsi.run import AUTO_MIN_TILES, AUTO_TILE_WORKERS, RunSummary, SlideRun, _on_gpu, auto_tile_workers
from .wsi.stitch import Nucleus, Stitcher, paint_polygon
from .wsi.grid import TileGrid, iter_batches, read_tile

__all__ = ["BUILTIN_MODELS", "BUNDLED_MODELS", "PRECISIONS", "AUTO_MIN_TILES", "AUTO_TILE_WORKERS", "Nucleus",
           "Outputs", "RunOptions", "RunSummary", "auto_tile_workers", "bundled_weights", "check_min_score",
           "image_nuclei", "load_model", "model_path", "nuclei_labels", "sample_slide", "segment_image",
           "segment_slide", "set_ensemble", "set_min_score", "set_precision", "set_semantic_fusion", "set_tta"]

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
    from .segmenters.watershed import WatershedSegmenter

    if name_or_path == "watershed" or (name_or_path == "default" and bundled_weights() is None):
        return WatershedSegmenter()
    p = model_path(name_or_path)
    try:
        from .segmenters.rcnn import PDAMSegmenter
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
    on their fast path only (ConfigError else; :attr:`wsiseg.segmenters.rcnn.PDAMSegmenter.tta` checks)."""
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


def segment_slide(path: str | os.PathLike, outputs: Outputs | str | os.PathLike | None = None,
                  options: RunOptions | None = None, *, model: str | Segmenter = "default",
                  progress: bool | Callable[[int, int], None] = False,
                  sink: Callable[[list[Nucleus]], None] | None = None, **kw: Any) -> RunSummary:
    """Segment every nucleus of the slide/image at ``path`` and write the requested outputs (atomically).

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
                 tile_size: int = 256, overlap: int | None = None, batch_size: int = 16) -> list[Nucleus]:
    """Segment an in-memory RGB image through the tiled pipeline; returns its nuclei (polygons in the image's pixel
    coordinates, scores, areas) in stitching order, as :func:`segment_slide` would write them. ``mpp``: the image's
    microns per pixel (required: a wrong scale ruins every nucleus; 40x scans are about 0.25, 20x about 0.5)."""
    from .io.slide import Level

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
