"""Zeiss CZI slides (Axioscan and other ZEN brightfield scans), read through Zeiss's own library, pylibCZIrw (the
optional extra ``wsiseg[czi]``; OpenSlide and tiffslide do not read CZI).

A CZI slide is a mosaic of tiles, in one or more scenes (an Axioscan slide has a scene per tissue region), placed in
a plane whose origin is not (0, 0). :class:`CziHandle` shows it as :mod:`wsiseg.io.slide` shows every slide: level 0
is the rectangle that bounds all scenes, its top-left corner (0, 0), and what lies between the scenes reads white,
like glass. QuPath (through Bio-Formats) opens each scene as an image of its own, whose (0, 0) is the scene's own
corner: :attr:`CziHandle.scenes` gives each scene's rectangle in level 0, which a run writes into its GeoJSON header
(``czi_scenes``); a single-scene slide's frame is its scene's, QuPath's. Levels of 4, 16, 64... times fewer pixels
are read by libCZI's zoom, from the file's own pyramid (ZEN writes one); in a file without, libCZI picks pixels
rather than averaging them, which is good enough for the overview and the tissue mask, the only readers of those
levels when the model's scale is finer than 4 times the slide's. Pixels: ``Bgr24`` (ZEN's brightfield), ``Bgra32``,
``Bgr48`` (to 8 bits); a greyscale or fluorescence scan (one grey channel or several) is refused in one line, since
the models are for H&E's colours.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from .pixels import to_uint8

#: the first bytes of a CZI file: its file header segment's id
MAGIC = b"ZISRAWFILE"
#: the pixel types read, and what becomes of them
PIXEL_TYPES = ("Bgr24", "Bgra32", "Bgr48")
#: levels are made down to this many pixels on the long side (the overview reads the smallest)
SMALLEST_LEVEL_PX = 512


def is_czi(head: bytes) -> bool:
    return head.startswith(MAGIC)


class CziHandle:
    """One open CZI file: :attr:`size` (level 0, the scenes' bounding rectangle), :attr:`scenes` (each scene's
    ``(x, y, width, height)`` in level 0), :attr:`downsamples`, :attr:`mpp` and :attr:`objective_power` (from its
    metadata; None when it says none), and :meth:`read`. Reads and closing are serialised by a lock (libCZI's reader
    is shared by the run's reading threads)."""

    def __init__(self, path: Path) -> None:
        try:
            from pylibCZIrw import czi as pyczi
        except ImportError:
            raise InputError(f"{path}: a Zeiss CZI slide: install the reader it needs with "
                             "pip install 'wsiseg[czi]' (Zeiss's pylibCZIrw)") from None
        self.path = path
        self._lock = threading.Lock()
        self._reader = pyczi.CziReader(str(path))
        try:
            self._describe()
        except BaseException:
            self.close()
            raise
        long_side, self.downsamples = max(self.size), [1.0]
        while long_side / (self.downsamples[-1] * 4) >= SMALLEST_LEVEL_PX:
            self.downsamples.append(self.downsamples[-1] * 4)

    def _describe(self) -> None:
        """Size, scenes, pixel type, scale and objective, from the file; InputError for what wsiseg cannot read."""
        path, reader = self.path, self._reader
        rect = reader.total_bounding_rectangle
        self.origin = (int(rect.x), int(rect.y))
        self.size = (int(rect.w), int(rect.h))
        if self.size[0] < 1 or self.size[1] < 1:
            raise InputError(f"{path}: a CZI without image data")
        self.scenes = [(int(r.x) - self.origin[0], int(r.y) - self.origin[1], int(r.w), int(r.h))
                       for _, r in sorted((reader.scenes_bounding_rectangle or {}).items())]
        c0, c1 = reader.total_bounding_box.get("C", (0, 1))
        types = reader.pixel_types
        self.pixel_type = types.get(0) if isinstance(types, dict) else None
        if c1 - c0 > 1 or str(self.pixel_type).startswith("Gray"):
            kind, n = ("fluorescence", f"{c1 - c0} channels") if c1 - c0 > 1 else ("greyscale", "one channel")
            raise InputError(f"{path}: a {kind} CZI ({n} of {self.pixel_type}); wsiseg segments colour brightfield "
                             "(H&E) slides")
        if self.pixel_type not in PIXEL_TYPES:
            raise InputError(f"{path}: CZI pixels of type {self.pixel_type}: wsiseg reads {', '.join(PIXEL_TYPES)}")
        self.mpp, self.objective_power, self.properties = _metadata(reader.metadata or {})
        if len(self.scenes) > 1:
            self.properties["czi.scenes"] = [list(r) for r in self.scenes]

    def read(self, x: int, y: int, downsample: float, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)``: the level of ``downsample`` from level-0 pixel ``(x, y)`` (its own frame:
        (0, 0) is the scenes' bounding rectangle's corner); outside the scenes, white."""
        import cv2

        roi = (self.origin[0] + x, self.origin[1] + y, max(1, round(w * downsample)), max(1, round(h * downsample)))
        with self._lock:
            a = self._reader.read(roi=roi, zoom=1.0 / downsample if downsample != 1 else None,
                                  background_pixel=(1.0, 1.0, 1.0))
        a = np.asarray(a)
        a = to_uint8(a[..., 2::-1])  # (BGR, or BGRA: its alpha left out; Bgr48 scaled as every 16-bit reader does)
        if a.shape[:2] != (h, w):  # (libCZI's zoom rounds the size its own way)
            a = cv2.resize(np.ascontiguousarray(a), (w, h), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(a, dtype=np.uint8)

    def close(self) -> None:
        with self._lock:  # (not under a read in flight)
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()


def _metadata(meta: dict[str, Any]) -> tuple[float | None, float | None, dict[str, Any]]:
    """``(mpp, objective power, properties)`` from a CZI's metadata (pylibCZIrw's dict of its XML): the X distance
    of ``Scaling/Items/Distance`` (metres per pixel) and the first objective's ``NominalMagnification``."""
    md = (meta.get("ImageDocument") or {}).get("Metadata") or {}
    mpp = obj = None
    distances = ((md.get("Scaling") or {}).get("Items") or {}).get("Distance") or []
    for d in distances if isinstance(distances, list) else [distances]:
        if isinstance(d, dict) and d.get("@Id") == "X":
            try:
                v = float(d.get("Value")) * 1e6
            except (TypeError, ValueError):
                v = None
            mpp = v if v is not None and 0 < v < float("inf") else None
    objectives = (((md.get("Information") or {}).get("Instrument") or {}).get("Objectives") or {}).get("Objective")
    first = objectives[0] if isinstance(objectives, list) and objectives else objectives
    if isinstance(first, dict):
        try:
            obj = float(first.get("NominalMagnification")) or None
        except (TypeError, ValueError):
            obj = None
    image = (md.get("Information") or {}).get("Image") or {}
    props = {f"czi.{k}": v for k, v in image.items() if isinstance(v, str)}
    return mpp, obj, {**props, **({"czi.mpp": mpp} if mpp else {})}
