"""OME-Zarr (OME-NGFF) images as slides: a folder holding a multiscale image (NGFF 0.4 on zarr v2, 0.5 on zarr v3),
or the ``bioformats2raw`` layout of one (its series of most pixels), which Glencoe's bioformats2raw and isyntax2raw
write (the route from Philips iSyntax, MIRAX and other formats to OME-TIFF goes through it) and napari and QuPath
(0.6) open.

:class:`NgffHandle` reads it through zarr: the levels are the multiscale's datasets (their downsamples from their
scale transforms, else their shapes), the scale is level 0's ``scale`` transform on the ``x`` axis in that axis'
unit, and a region is sliced from the level's array (``t`` and ``z`` at 0, the colour channels of ``c`` moved last,
a fourth one taken as alpha: transparent is white), white outside the image. Colour brightfield only: three or four
8-bit channels; a greyscale image (one channel) or one of other bit depths is refused in one line (an 8-bit
fluorescence image of three channels would be read as RGB: nothing in NGFF says which it is), as is the OME-Zarr
``wsiseg run --zarr`` writes without ``--zarr-image``, whose image is only a stand-in for the slide (with
``--zarr-image`` it holds the slide's pixels and reads as the slide).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from .pixels import rgb8

#: the names ``wsiseg run --zarr`` gives its image pyramid (:mod:`wsiseg.export.zarr_labels` writes them): the
#: slide's pixels (``--zarr-image``), or a stand-in overview whose description begins with :data:`STAND_IN_ABOUT`
OUR_IMAGE, OUR_STAND_IN, STAND_IN_ABOUT = "slide", "slide overview", "a stand-in"

#: micrometres per unit of an NGFF axis (the units OME-NGFF names for space)
UNITS_UM = {"angstrom": 1e-4, "picometer": 1e-6, "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3,
            "centimeter": 1e4, "meter": 1e6}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        v = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def _attrs(folder: Path) -> dict[str, Any] | None:
    """The group attributes of a zarr folder (v3's ``zarr.json`` or v2's ``.zattrs``), None when it has none."""
    if (folder / "zarr.json").is_file():
        meta = _json(folder / "zarr.json") or {}
        attrs = meta.get("attributes") if meta.get("node_type") == "group" else None
        return attrs if isinstance(attrs, dict) else None
    return _json(folder / ".zattrs")


def _ome(folder: Path) -> dict[str, Any]:
    """The OME attributes of a zarr folder (NGFF 0.5 nests them under "ome", 0.4 has them at the top)."""
    attrs = _attrs(folder) or {}
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def _multiscale(folder: Path) -> dict[str, Any] | None:
    """``multiscales[0]`` of the image group at ``folder``, None for none."""
    ms = _ome(folder).get("multiscales")
    first = ms[0] if isinstance(ms, list) and ms else None
    ok = isinstance(first, dict) and isinstance(first.get("datasets"), list) and first["datasets"]
    return first if ok and all(isinstance(d, dict) and "path" in d for d in first["datasets"]) else None


def _pixels(folder: Path, ms: dict[str, Any]) -> int:
    """How many pixels level 0 of the image at ``folder`` has (its array's metadata; 0 when unreadable)."""
    arr = folder / str(ms["datasets"][0]["path"])
    meta = _json(arr / "zarr.json") or _json(arr / ".zarray") or {}
    shape = meta.get("shape")
    return int(np.prod(shape[-2:], dtype=np.int64)) if isinstance(shape, list) and len(shape) >= 2 else 0


def _image_group(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The folder of the multiscale image at ``folder`` and its ``multiscales[0]``: the folder itself, or in a
    bioformats2raw layout the series of most pixels (Bio-Formats may put a macro image first); None for any other
    folder."""
    ms = _multiscale(folder)
    if ms is not None:
        return folder, ms
    if "bioformats2raw.layout" not in _ome(folder):
        return None
    series = [(folder / c.name, m) for c in sorted(folder.iterdir(), key=lambda c: c.name)
              if c.name.isdigit() and c.is_dir() for m in [_multiscale(c)] if m is not None]
    return max(series, key=lambda s: _pixels(*s)) if series else None


def is_ngff(path: Path) -> bool:
    """Whether ``path`` is a folder holding an OME-Zarr multiscale image (or a bioformats2raw layout of one)."""
    try:
        return path.is_dir() and _image_group(path) is not None
    except OSError:  # (a folder that cannot be listed: not one to read as an image)
        return False


def images_in(folder: Path) -> list[Path]:
    """The OME-Zarr images in ``folder`` or in any folder below it, sorted, leaving out those ``wsiseg run --zarr``
    wrote (:func:`is_wsiseg_output`): an image's folder is not searched further, nor is any other zarr store (its
    chunk folders) or a hidden folder; links are followed, each real folder once."""
    found: list[Path] = []
    seen: set[str] = set()
    for top, dirs, _ in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirs):
            sub = Path(top) / d
            if d.startswith("."):
                continue
            if is_ngff(sub):
                found += [] if is_wsiseg_output(sub) else [sub]
            elif not any((sub / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray")):
                keep.append(d)
        dirs[:] = keep
    return sorted(found)


def is_wsiseg_output(path: Path) -> bool:
    """Whether the OME-Zarr at ``path`` is one ``wsiseg run --zarr`` wrote (its multiscale named as the writer
    names it, with the nuclei's labels): a folder of slides searched for inputs leaves it out."""
    ms = _multiscale(path)
    return ms is not None and ms.get("name") in (OUR_IMAGE, OUR_STAND_IN) and (path / "labels" / "nuclei").is_dir()


class NgffHandle:
    """One OME-Zarr image: :attr:`size` (level 0: width, height), :attr:`downsamples`, :attr:`mpp` (None when its
    axes give no spatial unit) and :meth:`read`. zarr's reads are safe from the run's reading threads."""

    def __init__(self, path: Path) -> None:
        import zarr

        found = _image_group(path)
        if found is None:
            raise InputError(f"{path}: not an OME-Zarr image (no multiscales)")
        folder, ms = found
        about = str((ms.get("metadata") or {}).get("description", ""))
        if ms.get("name") == OUR_STAND_IN and about.startswith(STAND_IN_ABOUT):  # (wsiseg run's own)
            raise InputError(f"{path}: a wsiseg output whose image is a stand-in for the slide, not its pixels "
                             "(written without --zarr-image): segment the slide itself")
        try:
            group = zarr.open_group(str(folder), mode="r")
            self.arrays = [group[d["path"]] for d in ms["datasets"]]
        except Exception as e:  # (a dataset missing or unreadable: the store's own error)
            raise InputError(f"{path}: an OME-Zarr image that cannot be read: {str(e).splitlines()[0][:200]}") from None
        first = self.arrays[0]
        if first.ndim < 2 or 0 in first.shape:
            raise InputError(f"{path}: an OME-Zarr image without pixels (shape {first.shape})")
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes") or []]
        axes = axes or ["t", "c", "z", "y", "x"][-first.ndim:]  # (NGFF 0.1-0.3: always these, trailing)
        if len(axes) != first.ndim or "y" not in axes or "x" not in axes:
            raise InputError(f"{path}: OME-Zarr axes {axes} do not fit its {first.ndim}-d array")
        self.axes = axes
        channels = first.shape[axes.index("c")] if "c" in axes else 1
        if channels not in (3, 4) or first.dtype != np.uint8:
            kind = "greyscale" if channels == 1 else f"{channels}-channel"
            raise InputError(f"{path}: a {kind} OME-Zarr image of {first.dtype}; wsiseg segments colour brightfield "
                             "(H&E) slides: three 8-bit channels")
        self.size = (int(first.shape[axes.index("x")]), int(first.shape[axes.index("y")]))
        if any(0 in a.shape for a in self.arrays):
            raise InputError(f"{path}: an OME-Zarr image with an empty level")
        scales = [_scale(d, axes) for d in ms["datasets"]]
        by_shape = [((self.size[0] / a.shape[axes.index("x")]) + (self.size[1] / a.shape[axes.index("y")])) / 2
                    for a in self.arrays]  # (the levels' own scales where they give them: 1497 -> 748 px is 2)
        self.downsamples = [s / scales[0] if s and scales[0] else d for s, d in zip(scales, by_shape)]
        self.mpp = _mpp(ms, axes, scales[0])

    def level_size(self, level: int) -> tuple[int, int]:
        a, axes = self.arrays[level], self.axes
        return int(a.shape[axes.index("x")]), int(a.shape[axes.index("y")])

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``level`` from its pixel ``(x, y)``; white outside the image, a fourth channel
        taken as alpha (transparent: white). Missing chunks read as the array's fill value (black for 0; left out of
        the slide's stain level: :data:`wsiseg.wsi.stains.LEVEL_BLACK`)."""
        out = np.full((h, w, 3), 255, np.uint8)
        lw, lh = self.level_size(level)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        index = tuple(slice(y0, y1) if a == "y" else slice(x0, x1) if a == "x" else slice(0, 4) if a == "c" else 0
                      for a in self.axes)
        region = np.asarray(self.arrays[level][index])
        kept = [a for a in self.axes if a in ("c", "y", "x")]
        out[y0 - y:y1 - y, x0 - x:x1 - x] = rgb8(np.transpose(region, [kept.index(a) for a in ("y", "x", "c")]))
        return out


def _scale(item: dict[str, Any], axes: list[str]) -> float | None:
    """The x scale of a dataset's (or a multiscale's) ``scale`` transform, None without one."""
    for t in item.get("coordinateTransformations") or []:
        if isinstance(t, dict) and t.get("type") == "scale" and len(t.get("scale") or []) == len(axes):
            try:
                v = float(t["scale"][axes.index("x")])
            except (TypeError, ValueError):
                return None
            return v if 0 < v < float("inf") else None
    return None


def _mpp(ms: dict[str, Any], axes: list[str], scale0: float | None) -> float | None:
    """Micrometres per pixel of level 0 along x: its dataset's scale, times the multiscale's own where it has one,
    in the x axis' unit; None without a unit or a scale."""
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes") or []]
    unit = UNITS_UM.get(units[axes.index("x")]) if len(units) == len(axes) else None
    if unit is None or scale0 is None:
        return None
    return scale0 * (_scale(ms, axes) or 1.0) * unit
