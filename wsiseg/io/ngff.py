"""OME-Zarr (OME-NGFF) images as slides: a folder holding a multiscale image (NGFF 0.4 on zarr v2, 0.5 on zarr v3),
or the ``bioformats2raw`` layout of one (its first series, ``0/``), which Glencoe's bioformats2raw and isyntax2raw
write (the route from Philips iSyntax, MIRAX and other formats to OME-TIFF goes through it) and napari and QuPath
(0.6) open.

:class:`NgffHandle` reads it through zarr: the levels are the multiscale's datasets (their downsamples from their
shapes), the scale is level 0's ``scale`` transform on the ``x`` axis in that axis' unit, and a region is sliced from
the level's array (``t`` and ``z`` at 0, the three colour channels of ``c`` moved last), white outside the image.
Colour brightfield only: three or four 8-bit channels; a greyscale or fluorescence image is refused in one line, as
is the OME-Zarr ``wsiseg run --zarr`` writes without ``--zarr-image``, whose image is only a stand-in for the slide
(with ``--zarr-image`` it holds the slide's pixels and reads as the slide).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError

#: micrometres per unit of an NGFF axis (the units OME-NGFF names for space)
UNITS_UM = {"angstrom": 1e-4, "picometer": 1e-6, "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3,
            "centimeter": 1e4, "meter": 1e6}


def _attrs(folder: Path) -> dict[str, Any] | None:
    """The group attributes of a zarr folder (v3's ``zarr.json`` or v2's ``.zattrs``), None when it has none."""
    try:
        if (folder / "zarr.json").is_file():
            meta = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
            return meta.get("attributes") or {} if meta.get("node_type") == "group" else None
        if (folder / ".zattrs").is_file():
            return json.loads((folder / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None


def _image_group(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The folder of the multiscale image at ``folder`` and its ``multiscales[0]``: the folder itself, or a
    bioformats2raw layout's first series; None for any other folder."""
    attrs = _attrs(folder)
    if attrs is None:
        return None
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs  # (NGFF 0.5 nests under "ome")
    if ome.get("multiscales"):
        return folder, ome["multiscales"][0]
    if "bioformats2raw.layout" in ome and (folder / "0").is_dir():
        return _image_group(folder / "0")
    return None


def is_ngff(path: Path) -> bool:
    """Whether ``path`` is a folder holding an OME-Zarr multiscale image (or a bioformats2raw layout of one)."""
    return path.is_dir() and _image_group(path) is not None


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
        if ms.get("name") == "slide overview" and about.startswith("a stand-in"):  # (wsiseg run's own, see below)
            raise InputError(f"{path}: a wsiseg output whose image is a stand-in for the slide, not its pixels "
                             "(written without --zarr-image): segment the slide itself")
        try:
            group = zarr.open_group(str(folder), mode="r")
            self.arrays = [group[d["path"]] for d in ms["datasets"]]
        except Exception as e:  # (a dataset missing or unreadable: the store's own error)
            raise InputError(f"{path}: an OME-Zarr image that cannot be read: {str(e).splitlines()[0][:200]}") from None
        first = self.arrays[0]
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
        self.downsamples = [((self.size[0] / a.shape[axes.index("x")]) + (self.size[1] / a.shape[axes.index("y")])) / 2
                            for a in self.arrays]
        self.mpp = _scale_x(ms, axes)
        self.folder = folder

    def level_size(self, level: int) -> tuple[int, int]:
        a, axes = self.arrays[level], self.axes
        return int(a.shape[axes.index("x")]), int(a.shape[axes.index("y")])

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``level`` from its pixel ``(x, y)``; white outside the image."""
        out = np.full((h, w, 3), 255, np.uint8)
        lw, lh = self.level_size(level)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        index = tuple(slice(y0, y1) if a == "y" else slice(x0, x1) if a == "x" else slice(0, 3) if a == "c" else 0
                      for a in self.axes)
        region = np.asarray(self.arrays[level][index])
        kept = [a for a in self.axes if a in ("c", "y", "x")]
        out[y0 - y:y1 - y, x0 - x:x1 - x] = np.transpose(region, [kept.index(a) for a in ("y", "x", "c")])
        return out


def _scale_x(ms: dict[str, Any], axes: list[str]) -> float | None:
    """Micrometres per pixel of level 0 along x: its dataset's ``scale`` transform in the x axis' unit."""
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes") or []]
    unit = UNITS_UM.get(units[axes.index("x")]) if len(units) == len(axes) else None
    for t in ms["datasets"][0].get("coordinateTransformations") or []:
        if t.get("type") == "scale" and len(t.get("scale") or []) == len(axes) and unit is not None:
            v = float(t["scale"][axes.index("x")]) * unit
            return v if 0 < v < float("inf") else None
    return None
