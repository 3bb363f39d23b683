"""What a slide run is asked for, written once: :class:`RunOptions` (the model and how the slide is tiled, predicted
and stitched) and :class:`Outputs` (the files written).

Every other place takes the list from here: :func:`wsiseg.api.segment_slide` maps its keyword arguments onto the two
classes, ``wsiseg run`` builds its options from the fields' metadata (:func:`add_arguments`) and reads them back
(:meth:`RunOptions.from_args`), a cohort sends :meth:`RunOptions.to_dict` to its workers, the resume journal records
the fields marked ``resume`` (:meth:`RunOptions.resume_params`), and the predicting process gets the run's resolved
options (:mod:`wsiseg.parallel.predict`).

A field's metadata: ``help`` (one line; it is also the command line's help), ``resume`` (``True``: a resumed run
must have the same value, recorded as given; ``"resolved"``: it decides the outputs, and the run records the value it
resolved, e.g. the overlap the model asks for, see :meth:`wsiseg.wsi.run.SlideRun.open_journal`; absent: the
outputs are the same whatever its value) and ``cli`` (the ``wsiseg run`` options that set it: argparse arguments,
``dest`` and ``help`` defaulting to the field's).

This module is plain data and the standard library: the command line and a cohort's client import it without the
model's dependencies.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .core.errors import ConfigError


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= ``lo`` (``what`` names it in the error)."""

    def parse(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if i < lo:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return i

    return parse


positive_int = _int_at_least(1, "positive")
nonneg_int = _int_at_least(0, "non-negative")


def positive_float(v: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not f > 0 or f != f or f == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return f


#: the slide readers ``--backend`` names (:func:`wsiseg.io.slide.open_slide`)
BACKENDS = ("auto", "openslide", "tiffslide", "czi", "zarr", "image")

#: what ``--icc-profile`` accepts: a slide's colours read as stored, or converted to sRGB by its ICC profile
#: (:mod:`wsiseg.io.colour`)
ICC_CHOICES = ("ignore", "apply")

#: the zooms a run accepts besides "auto" (:mod:`wsiseg.wsi.scale`): 1/4 to 4 times the slide's own scale
ZOOM_RANGE = (0.25, 4.0)


def zoom_value(v: Any) -> float | str:
    """``"auto"`` or a number in :data:`ZOOM_RANGE` (given as text or a number); ConfigError otherwise."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    try:
        z = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"zoom: expected 'auto' or a number, got {v!r}") from None
    if not ZOOM_RANGE[0] <= z <= ZOOM_RANGE[1]:
        raise ConfigError(f"zoom: expected 'auto' or a number from {ZOOM_RANGE[0]} to {ZOOM_RANGE[1]}, got {v}")
    return z


def _zoom_arg(v: str) -> float | str:
    try:
        return zoom_value(v)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("zoom: ")) from None


def _opt(default: Any, help: str, *, resume: bool | str | None = None, cli: tuple[dict, ...] = ()) -> Any:
    meta: dict[str, Any] = {"help": help, "cli": cli}
    if resume is not None:
        meta["resume"] = resume
    return field(default=default, metadata=meta)


def _flag(*flags: str, **argparse_kw: Any) -> dict[str, Any]:
    return {"flags": flags, **argparse_kw}


@dataclass(frozen=True)
class RunOptions:
    """How a slide is segmented: the model and its settings, the tiling, and how the work is spread (the last group
    never changes the outputs). Defaults are :func:`wsiseg.api.segment_slide`'s; ``wsiseg run`` differs only where a
    field's ``cli`` says so (``--batch-size``: by device, ``--precision``: auto)."""

    # the model
    model: Any = _opt("default", "default | vesicular | watershed | path to a checkpoint (or, in Python, a loaded "
                                 "Segmenter)", resume="resolved",
                      cli=(_flag("--model", help="default | vesicular | watershed | path to a checkpoint (default: "
                                                 "%(default)s)"),))
    device: str = _opt("auto", "where the model runs (auto: a GPU when there is one)",
                       cli=(_flag("--device", choices=["auto", "cpu", "cuda"]),))
    min_score: float | None = _opt(None, "PDAM models: keep detections scoring at least P (0..1; default: the model's "
                                         "own threshold)", resume=True,
                                   cli=(_flag("--min-score", type=float, metavar="P"),))
    tta: bool | int = _opt(False, "PDAM models: test-time augmentation, the heads averaged over each tile and its three "
                                  "mirror images (about 4x slower; 8: and their transposes)", resume="resolved",
                           cli=(_flag("--tta", action="store_const", const=4, default=0,
                                      help="PDAM models: test-time augmentation, the heads averaged over each tile and "
                                           "its three mirror images (about 4x slower)"),
                                _flag("--tta-views", type=int, choices=[4, 8], metavar="N",
                                      help="--tta with N views: 4 (the mirror images) or 8 (and their transposes, "
                                           "about 8x slower)")))
    semantic_fusion: bool = _opt(False, "PDAM models: average each mask with the semantic branch's foreground "
                                        "probability (about 10% slower on a CPU)", resume="resolved",
                                 cli=(_flag("--semantic-fusion", action="store_true"),))
    ensemble: tuple[str, ...] = _opt((), "PDAM models: further checkpoints of the same scale (or bundled models: "
                                         "vesicular) averaged with --model's (box and mask heads, semantic maps; "
                                         "proposals from --model): an ensemble, each model adds the work of one",
                                     resume="resolved", cli=(_flag("--ensemble", nargs="+", default=[],
                                                                   metavar="MODEL"),))
    precision: str | None = _opt(None, "PDAM models: the network's arithmetic: fp32, bf16 (about 1.5-1.8x faster "
                                       "on a CPU with native bf16, such as AVX512-BF16 or AMX; Kumar scores unchanged), "
                                       "fp16 (CUDA only) or auto (bf16 on a CPU with native bf16, else fp32); None: as "
                                       "the model is", resume="resolved",
                                 cli=(_flag("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                                            help="PDAM models: the network's arithmetic: auto (default: bf16 on a CPU "
                                                 "with native bf16, such as AVX512-BF16 or AMX, about 1.5-1.8x faster "
                                                 "with Kumar scores unchanged; else fp32), fp32, bf16 or fp16 (CUDA "
                                                 "only)"),))
    # the slide and its tiles
    mpp: float | None = _opt(None, "microns per pixel of level 0 (overrides the slide's)", resume="resolved",
                             cli=(_flag("--mpp", type=positive_float),))
    zoom: float | str = _opt("auto", "show the slide to the model this many times larger than its scale; auto: "
                                     "1, or larger where its nuclei look much smaller than the model's own (it "
                                     "segments a few tiles first to see)", resume="resolved",
                             cli=(_flag("--zoom", type=_zoom_arg, metavar="auto|Z"),))
    backend: str = _opt("auto", "slide reader (auto: OpenSlide for vendor formats, tiffslide for tiled TIFF, czi "
                                "(pylibCZIrw) for Zeiss CZI, zarr for an OME-Zarr image's folder, else image)",
                        resume=True,
                        cli=(_flag("--backend", choices=list(BACKENDS)),))
    icc_profile: str = _opt("ignore", "the slide's embedded ICC profile: ignore (read its colours as stored, as the "
                                      "bundled models were trained and as QuPath shows them) or apply (convert them "
                                      "to sRGB by the profile before the tissue mask, the model and the preview)",
                            resume=True, cli=(_flag("--icc-profile", choices=list(ICC_CHOICES)),))
    tile_size: int | None = _opt(None, "tile side in model pixels (None: the model's, 256 unless its bundle says "
                                       "otherwise; for an image no larger than two thirds of it, the model's or the "
                                       "one asked for, one tile of about its size; at most 4096; a larger tile than "
                                       "the model's gets proportionally more proposals and detections)",
                                 resume="resolved",
                                 cli=(_flag("--tile-size", type=positive_int,
                                            help="tile side in model pixels (default: the model's: 384 for the "
                                                 "bundled default, else 256, or for an image no larger than two "
                                                 "thirds of it one tile of about its size; at most 4096; a larger "
                                                 "tile than the model's gets proportionally more proposals and "
                                                 "detections)"),))
    overlap: int | None = _opt(None, "tile overlap in model pixels (default: from the model)", resume="resolved",
                               cli=(_flag("--overlap", type=nonneg_int),))
    use_tissue_mask: bool = _opt(True, "segment only the tiles the tissue mask holds (and no nucleus centred on "
                                       "glass)", resume="resolved",
                                 cli=(_flag("--no-tissue-mask", action="store_false",
                                            help="segment background tiles too"),))
    roi: str | os.PathLike | None = _opt(None, "regions of interest: a GeoJSON of polygons in level-0 pixels (QuPath "
                                               "annotations, File > Export objects as GeoJSON), or a folder of one "
                                               "per slide named after it: segment only the tissue inside them, each "
                                               "nucleus kept when its centre lies in one; None: the whole slide",
                                         resume="resolved",
                                         cli=(_flag("--roi", metavar="GEOJSON",
                                                    help="segment only inside the regions of this GeoJSON (QuPath "
                                                         "annotations exported as GeoJSON, level-0 pixels): a "
                                                         "nucleus is kept when its centre lies in one; or a folder "
                                                         "of one per slide, named after it (SLIDE.geojson or "
                                                         "SLIDE.svs.geojson)"),))
    # how the work is spread: the same outputs for any value (on a GPU, for any but the batch size: cuDNN picks its
    # kernels by the batch's shape, so rounding can move a rare nucleus between batch sizes; docs/speed.md)
    batch_size: int | None = _opt(None, "tiles per batch (None: 128 when the model runs on a GPU, 64 on one under 24 "
                                      "GiB, else 16; fewer for larger tiles than 256 px on a GPU, 384 px on a CPU)",
                                  cli=(_flag("--batch-size", type=positive_int,
                                             help="tiles per batch (default 16 on CPU, 128 on CUDA, 64 on a card "
                                                  "under 24 GiB; fewer for larger tiles: as many as hold the same "
                                                  "pixels)"),))
    prefetch: bool | None = _opt(None, "predict the next batch in a thread while this one is stitched (None: when the "
                                       "model runs on a GPU or on fewer torch threads than there are cores)")
    tile_workers: int | None = _opt(None, "processes preparing tiles (candidates, seam decisions, outlines, GeoJSON "
                                          "encoding) beside the main loop, plus one painting the zarr labels and one "
                                          "writing the GeoJSON when N > 0 (default: 4 when the model runs on a GPU "
                                          "of a host with 8+ cores and there are 256+ tiles, else 0; same outputs for "
                                          "any number)",
                                    cli=(_flag("--tile-workers", type=nonneg_int, metavar="N"),))
    paint_process: bool | None = _opt(None, "paint the zarr labels in a process of their own (None: when there are "
                                            "tile workers)")
    geojson_process: bool | None = _opt(None, "write the GeoJSON in a process of its own: ids, labels and the file's "
                                              "bytes off the main thread (None: when there are tile workers)")
    predict_process: bool = _opt(False, "PDAM models: read tiles and run the model in a process of their own, so that "
                                        "stitching and writing have the main one to themselves (same outputs; on an "
                                        "H200 host it was slower than the default predicting thread: docs/speed.md)",
                                 cli=(_flag("--predict-process", action="store_true"),))
    # ids and resuming
    uuid_seed: int | None = _opt(None, "seed of the GeoJSON ids (None: from the input and the options that decide the "
                                       "outputs)", resume=True)
    resume: bool = _opt(False, "continue an interrupted run (same input and options) from its journal beside the "
                               "output", cli=(_flag("--resume", action="store_true"),))

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        ens = self.ensemble
        if isinstance(ens, (str, os.PathLike)):
            raise ConfigError(f"ensemble: expected a list of models, got {ens!r}")
        object.__setattr__(self, "ensemble", tuple(os.fspath(m) for m in ens or ()))
        object.__setattr__(self, "zoom", zoom_value(self.zoom))
        if isinstance(self.roi, os.PathLike):
            object.__setattr__(self, "roi", os.fspath(self.roi))
        if self.icc_profile not in ICC_CHOICES:
            raise ConfigError(f"icc_profile: expected one of {', '.join(ICC_CHOICES)}, got {self.icc_profile!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunOptions":
        """The options of :meth:`to_dict` (or any subset: the rest default); TypeError naming an unknown key."""
        return cls(**_known(cls, d))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (JSON), :meth:`from_dict` gives it back. A loaded Segmenter as ``model`` is no
        plain data: TypeError (send its name or path)."""
        if not isinstance(self.model, str):
            raise TypeError("RunOptions.to_dict: model is a loaded segmenter; give its name or path instead")
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_args(cls, args: Any) -> "RunOptions":
        """The options of parsed ``wsiseg run`` arguments (attributes named as the fields; missing ones default)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def resume_params(self) -> dict[str, Any]:
        """The options a resumed run must share with the interrupted one as given (metadata ``resume=True``); those
        added since (:data:`_SINCE`) only when not at their default, so that a run interrupted before them resumes."""
        return {f.name: v for f in fields(self) if f.metadata.get("resume") is True for v in [getattr(self, f.name)]
                if f.name not in _SINCE or v != f.default}

    def replace(self, **changes: Any) -> "RunOptions":
        return replace(self, **changes)


#: the options marked ``resume`` added after the journal's format was last changed (RunOptions.resume_params)
_SINCE = ("icc_profile",)


#: the names a GeoJSON output may have (``--out``)
GEOJSON_SUFFIXES = (".geojson", ".geojson.gz", ".json")
#: the image formats a preview is written in, by its name's suffix (anything else: PNG)
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
#: the per-nucleus table's names (wsiseg.export.table: the delimiter follows the name; .gz compresses)
TABLE_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")


@dataclass(frozen=True)
class Outputs:
    """What a run writes (each appears whole under its name, or not at all). None of them: the nuclei go to the
    ``sink`` of :func:`wsiseg.api.segment_slide` only."""

    geojson: str | os.PathLike | None = _opt(None, "GeoJSON output (.geojson or .geojson.gz), for a single input",
                                             cli=(_flag("--out"),))
    zarr: str | os.PathLike | None = _opt(None, "OME-Zarr label pyramid output, for a single input",
                                          cli=(_flag("--zarr"),))
    preview: str | os.PathLike | None = _opt(None, "PNG overview with nucleus outlines, for a single input",
                                             cli=(_flag("--preview"),))
    dicom_ann: str | os.PathLike | None = _opt(
        None, "DICOM annotations (.dcm: Microscopy Bulk Simple Annotations) of the nuclei, for a DICOM slide, made "
              "from the GeoJSON (give --out too)", cli=(_flag("--dicom-ann", metavar="PATH"),))
    table: str | os.PathLike | None = _opt(
        None, "a table of the nuclei, one row each (.csv, or .tsv; .gz after either compresses), made from the "
              "GeoJSON (give --out too)", cli=(_flag("--table", metavar="PATH"),))
    zarr_image: bool = _opt(False, "the OME-Zarr's image pyramid holds the slide's pixels (read once more at the end; "
                                   "default: the overview as a stand-in)", cli=(_flag("--zarr-image",
                                                                                      action="store_true"),))
    objects: str = _opt("nuclei", "what the GeoJSON's features are: nuclei (detections), or cells (QuPath cell "
                                  "objects: each nucleus grown by --cell-expansion, with the nucleus as its "
                                  "nucleusGeometry)", cli=(_flag("--objects", choices=["nuclei", "cells"]),))
    cell_expansion: float = _opt(5.0, "cells: how far each nucleus is grown, in micrometres (QuPath's default 5; "
                                      "cells never overlap: a pixel goes to its nearest nucleus)",
                                 cli=(_flag("--cell-expansion", type=positive_float, metavar="UM"),))

    def __post_init__(self) -> None:
        if self.zarr_image and not self.zarr:
            raise ConfigError("zarr_image needs a zarr output")
        for kind, v in (("the DICOM annotations", self.dicom_ann), ("the table", self.table)):
            if v and not self.geojson:
                raise ConfigError(f"{kind} is made from the GeoJSON: give a GeoJSON output too (--out)")
        if self.objects not in ("nuclei", "cells"):
            raise ConfigError(f"objects: expected 'nuclei' or 'cells', got {self.objects!r}")
        if not (isinstance(self.cell_expansion, (int, float)) and 0 < self.cell_expansion < float("inf")):
            raise ConfigError(f"cell_expansion: expected a positive number of micrometres, got {self.cell_expansion!r}")

    @property
    def main(self) -> str | os.PathLike | None:
        """The output the resume journal sits beside: the GeoJSON, else the zarr store, else the preview."""
        return self.geojson or self.zarr or self.preview

    def files(self) -> dict[str, str | os.PathLike]:
        """The requested output files by kind (``geojson``, ``zarr``, ``preview``, ``dicom_ann``, ``table``)."""
        return {k: v for k in ("geojson", "zarr", "preview", "dicom_ann", "table") for v in [getattr(self, k)] if v}

    def resolved(self) -> "Outputs":
        """The same outputs as absolute paths (for workers elsewhere on shared storage)."""
        return replace(self, **{k: str(Path(v).resolve()) for k, v in self.files().items()})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Outputs":
        return cls(**_known(cls, d))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}


def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise TypeError(f"{cls.__name__}: unknown option {bad[0]!r}")
    return dict(d)


def split_keywords(kw: Mapping[str, Any], where: str = "segment_slide") -> tuple[dict, dict]:
    """Keyword arguments -> (those of :class:`Outputs`, those of :class:`RunOptions`); TypeError for any other, as
    Python says it for a function (``where``)."""
    outs = {f.name for f in fields(Outputs)}
    opts = {f.name for f in fields(RunOptions)}
    for k in kw:
        if k not in outs and k not in opts:
            raise TypeError(f"{where}() got an unexpected keyword argument {k!r}")
    return {k: v for k, v in kw.items() if k in outs}, {k: v for k, v in kw.items() if k in opts}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add the command-line options of ``cls``' fields (their ``cli`` metadata) to ``parser``; each stores under the
    field's name, with the field's default and help unless its ``cli`` says otherwise."""
    for f in fields(cls):
        for k, spec in enumerate(f.metadata.get("cli", ())):
            kw = dict(spec)
            flags = kw.pop("flags")
            kw.setdefault("dest", f.name)
            kw.setdefault("help", f.metadata["help"].replace("%", "%%"))
            if k == 0:  # (a second option of the same field keeps the first one's default)
                kw.setdefault("default", f.default)
            parser.add_argument(*flags, **kw)
