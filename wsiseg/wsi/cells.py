"""Cells: each nucleus grown by a fixed distance into the tissue around it, as QuPath's cell expansion does.

Definition (:func:`expand_cells`): the cell of nucleus ``i`` is the set of level-0 pixels whose nearest nucleus
pixel belongs to ``i`` and lies at most ``distance`` pixels away (OpenCV's 5x5 approximation of the Euclidean
distance, within 0.6 px of it): a Voronoi partition of the tissue by distance to the nuclei, cut off at
``distance``, plus all of the nucleus' own pixels. Nuclei are rasterised as the zarr labels are
(:func:`~wsiseg.wsi.stitch.raster_vertices`, the earlier nucleus winning a shared pixel), so a cell holds its
nucleus, two cells share a pixel only where their nuclei do, and two touching nuclei's cells meet half-way between
them. The outline is
traced and simplified as nuclei's are (within :data:`~wsiseg.wsi.stitch.SIMPLIFY_TOLERANCE` pixels).

Streaming (:class:`CellExpander`): a run emits nuclei in its output order and, as it goes, a level-0 row above which
no later nucleus will lie (the row the zarr writer flushes above). A cell depends only on the nuclei within
``2 * distance`` of its nucleus (a pixel of the cell is within ``distance`` of it, and only a nucleus nearer than
that can take the pixel), so the cell of a nucleus is final once that row is ``2 * distance`` below it; the
expander gives the cells in the nuclei's order, each computed in a window of the slide around its nucleus, and
forgets a nucleus once no waiting or future cell can reach it. So memory holds a band of nuclei a few tile rows
high, and the cells are the same whatever the tiling or the number of workers (the nuclei are).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .stitch import SIMPLIFY_TOLERANCE, Nucleus, mask_polygons, raster_vertices, ring_measures, simplify_rings

#: QuPath's default cell expansion (its cell detection's ``cellExpansionMicrons``), in micrometres
DEFAULT_EXPANSION_UM = 5.0
#: side of the buckets the expander finds a nucleus' neighbours by, in level-0 pixels
_BUCKET = 256


@dataclass
class Cell:
    """A nucleus and its cell. ``outline``: the cell's polygon and its measurements, held as a :class:`Nucleus`
    is (level-0 pixels, vertices at pixel centres; ``score`` and ``stains`` are the nucleus')."""

    nucleus: Nucleus
    outline: Nucleus


def expand_cells(nuclei: list[Nucleus], distance: float, mpp: float, shape: tuple[int, int]) -> list[Cell]:
    """The cells of ``nuclei`` (in output order), each grown by ``distance`` level-0 pixels (module docstring);
    ``mpp``: level-0 microns per pixel, ``shape``: the slide's (rows, cols). What :class:`CellExpander` streams."""
    e = CellExpander(distance, mpp, shape)
    e.add(nuclei)
    return e.finish()


class CellExpander:
    """Cells of a run's nuclei, streamed (module docstring): :meth:`add` the nuclei in output order,
    :meth:`settled` ``(row)`` once no later nucleus reaches above level-0 row ``row``, :meth:`finish` at the end;
    each returns the cells now final, in the nuclei's order. ``distance``: the expansion in level-0 pixels;
    ``mpp``: level-0 microns per pixel; ``shape``: the slide's (rows, cols)."""

    def __init__(self, distance: float, mpp: float, shape: tuple[int, int]) -> None:
        self.distance, self.mpp, self.shape = float(distance), float(mpp), (int(shape[0]), int(shape[1]))
        self._reach = 2.0 * self.distance + 2.0
        self._known: dict[int, tuple[Nucleus, np.ndarray]] = {}  # number -> nucleus and its raster vertices
        self._buckets: dict[tuple[int, int], list[int]] = {}
        self._waiting: deque[int] = deque()
        self._next = 0

    def add(self, nuclei: list[Nucleus]) -> None:
        for n in nuclei:
            k = self._next
            self._next += 1
            self._known[k] = (n, raster_vertices(n.polygon))
            self._waiting.append(k)
            for key in self._keys(n.bbox, 0.0):
                self._buckets.setdefault(key, []).append(k)

    def settled(self, row: float | None) -> list[Cell]:
        """The cells final once no later nucleus has a pixel above level-0 row ``row`` (None: the run is over)."""
        ready = []
        while self._waiting:
            k = self._waiting[0]
            if row is not None and self._known[k][0].bbox[3] + self._reach > row:
                break
            ready.append(self._waiting.popleft())
        out = self._cells(ready)
        self._forget(row)
        return out

    def finish(self) -> list[Cell]:
        return self.settled(None)

    def _keys(self, bbox: tuple[float, float, float, float], pad: float) -> list[tuple[int, int]]:
        x0, y0, x1, y1 = bbox
        return [(by, bx) for by in range(int((y0 - pad) // _BUCKET), int((y1 + pad) // _BUCKET) + 1)
                for bx in range(int((x0 - pad) // _BUCKET), int((x1 + pad) // _BUCKET) + 1)]

    def _mask(self, k: int) -> tuple[np.ndarray, int, int] | None:
        """Nucleus ``k``'s cell as a mask and its window's level-0 origin (None: the window is off the slide). The
        window is the nucleus' box grown by twice the distance (all that can reach the cell), so it
        depends on the nucleus alone, and the result on the nuclei near it alone."""
        import cv2

        n, _ = self._known[k]
        x0, y0, x1, y1 = n.bbox
        H, W = self.shape
        wx0, wy0 = max(int(math.floor(x0 - self._reach)), 0), max(int(math.floor(y0 - self._reach)), 0)
        wx1, wy1 = min(int(math.ceil(x1 + self._reach)) + 1, W), min(int(math.ceil(y1 + self._reach)) + 1, H)
        if wx1 <= wx0 or wy1 <= wy0:
            return None
        near = sorted({j for key in self._keys((wx0, wy0, wx1, wy1), 0.0) for j in self._buckets.get(key, ())
                       if self._overlaps(j, wx0, wy0, wx1, wy1)}, reverse=True)
        raster = np.zeros((wy1 - wy0, wx1 - wx0), np.int32)
        origin = np.array([wx0, wy0], np.int32)
        for j in near:  # the earliest painted last: it wins a shared pixel, as in the zarr labels
            cv2.fillPoly(raster, [self._known[j][1] - origin], j + 1)
        fg = raster != 0
        own = np.zeros(raster.shape, np.uint8)  # all of the nucleus' pixels, those an earlier one took too
        cv2.fillPoly(own, [self._known[k][1] - origin], 1)
        # the nearest nucleus pixel of every pixel: OpenCV's 5x5 L2 distance transform (within 0.6 px of the
        # Euclidean distance; 2.6x faster than scipy's exact one, measured on the sample's windows)
        dist, near_px = cv2.distanceTransformWithLabels((~fg).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5,
                                                        labelType=cv2.DIST_LABEL_PIXEL)
        owner = np.concatenate([np.zeros(1, np.int32), raster[fg]])[near_px]  # (labels number them in raster order)
        return ((owner == k + 1) & (dist <= self.distance)) | own.view(bool), wx0, wy0

    def _overlaps(self, j: int, x0: float, y0: float, x1: float, y1: float) -> bool:
        b = self._known[j][0].bbox
        return b[0] <= x1 and b[2] >= x0 and b[1] <= y1 and b[3] >= y0

    def _cells(self, ks: list[int]) -> list[Cell]:
        """The cells of nuclei ``ks``, their outlines traced, simplified and measured in one batch each."""
        masks = [self._mask(k) for k in ks]
        rings = mask_polygons([m[0] for m in masks if m is not None])
        it = iter(rings)
        rings = [None if m is None else next(it) for m in masks]
        rings = simplify_rings(rings, SIMPLIFY_TOLERANCE)
        kept = [i for i, r in enumerate(rings) if r is not None]
        out = [Cell(self._known[k][0], self._known[k][0]) for k in ks]  # (a nucleus without pixels: its own cell)
        if not kept:
            return out
        shifted = [rings[i] + np.array(masks[i][1:], np.float64) for i in kept]
        lengths, areas, cxs, cys = ring_measures(shifted)
        mpp = self.mpp
        for i, ring, perim, area, cx, cy in zip(kept, shifted, lengths, areas, cxs, cys):
            if area <= 0:
                continue
            n = out[i].nucleus
            mask, wx0, wy0 = masks[i]
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            out[i] = Cell(n, Nucleus(polygon=ring, score=n.score, area_px=area, area_um2=area * mpp * mpp,
                                     perimeter_um=perim * mpp, centroid=(cx, cy),
                                     bbox=(float(wx0 + cols[0]), float(wy0 + rows[0]), float(wx0 + cols[-1] + 1),
                                           float(wy0 + rows[-1] + 1)), stains=n.stains))
        return out

    def _forget(self, row: float | None) -> None:
        """Drop the nuclei no waiting or later cell can reach: those ending ``reach`` above both ``row`` and the
        top of every waiting nucleus."""
        if row is None and not self._waiting:
            self._known.clear()
            self._buckets.clear()
            return
        top = min([self._known[k][0].bbox[1] for k in self._waiting] + ([row] if row is not None else []))
        first = self._waiting[0] if self._waiting else self._next  # (numbers from it on are waiting)
        gone = [k for k, (m, _) in self._known.items() if k < first and m.bbox[3] + self._reach < top]
        for k in gone:
            m, _ = self._known.pop(k)
            for key in self._keys(m.bbox, 0.0):
                lst = self._buckets.get(key)
                if lst is not None:
                    lst.remove(k)
                    if not lst:
                        del self._buckets[key]
