"""Tissue detection on a low-resolution overview, so background tiles are never read or segmented.

``tissue_mask(slide)`` returns a :class:`TissueMask`: a boolean image where True = tissue, and its downsample
relative to level 0. The rule: on the overview white-balanced by its glass where the glass is tinted
(:func:`glass_colour`: the yellowed mounting medium of an old slide, a scanner's off-white; otherwise untouched), HSV
saturation above a threshold (Otsu's, capped so that an image that is all tissue keeps its pale eosin areas, and
floored so glass noise never counts) and not the green to teal of marking dye and pens, closed, small specks
removed, holes smaller than ``max_hole_um`` across filled (gaps between cells, small vessels; a large lumen, a tear
or glass that the tissue encloses stays out), then dilated by a small margin so nuclei at the tissue edge are kept.

The mask guards twice: tiles that touch no tissue are never read (:meth:`wsiseg.wsi.grid.TileGrid.tiles`), and a
nucleus whose centre lies outside the mask is dropped (:func:`wsiseg.wsi.grid.keep_in_tissue`), so a tile at the
tissue's edge gives no nuclei on the glass beside it. At about 4 um per mask pixel (the default, at most 2048 pixels
on the long side) that second guard works at the scale of nuclei, from a cheap overview. Holes inside the tissue
that a model outlines (white gaps in collagen, fat cells) are left out per tile, at the model's resolution, by
:func:`wsiseg.wsi.stains.drop_holes`.

Regions of interest (``wsiseg run --roi``, QuPath annotations: :func:`wsiseg.io.regions.read_regions`) narrow the
mask: :meth:`TissueMask.within` keeps the tissue inside them, and both guards then also hold exactly, not at the
mask's 4 um: no tile that misses the regions is read, and a nucleus whose centre lies outside them is dropped (the
regions' own polygons decide, by ``shapely``). So a count inside a QuPath annotation is the count of the nuclei
centred in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.slide import Slide
from .stains import dye_coloured

#: Saturation thresholds (0..1): Otsu's threshold is clipped into [SAT_MIN, SAT_MAX].
SAT_MIN = 0.04
SAT_MAX = 0.10
#: the glass (:func:`glass_colour`): the commonest colour (binned 8 levels a channel) of the overview's pixels whose
#: channels average at least GLASS_GREY, taken for glass when at least GLASS_SHARE of the overview lies within GLASS_TOL
#: of it in every channel (on the bundled sample 63%; none of the 30 Kumar images, all tissue, has glass)
GLASS_GREY = 180
GLASS_SHARE = 0.1
GLASS_TOL = 6


@dataclass
class TissueMask:
    mask: np.ndarray  # (h, w) bool, True = tissue
    downsample: float  # level-0 pixels per mask pixel
    #: regions of interest (a shapely (Multi)Polygon, level-0 pixels; :meth:`within`), or None: the whole slide
    roi: Any = None
    #: the share of the mask's pixels whose centre lies in ``roi`` and on tissue (:attr:`fraction`), set by
    #: :meth:`within` (``mask`` itself holds every pixel the regions touch, a superset for the coarse checks)
    roi_fraction: float | None = None

    def any_in(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """True when the level-0 box [x0, x1) x [y0, y1) overlaps tissue (and the regions of interest)."""
        d = self.downsample
        h, w = self.mask.shape
        c0, r0 = max(int(np.floor(x0 / d)), 0), max(int(np.floor(y0 / d)), 0)
        c1, r1 = min(int(np.ceil(x1 / d)), w), min(int(np.ceil(y1 / d)), h)
        if c1 <= c0 or r1 <= r0:
            return False
        if not self.mask[r0:r1, c0:c1].any():
            return False
        return self.roi is None or bool(self.roi.intersects(_box(x0, y0, x1, y1)))

    def all_in(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """True when every mask pixel that the level-0 box [x0, x1) x [y0, y1) overlaps is tissue (a box that
        reaches past the mask: False), and the box lies wholly in the regions of interest."""
        d = self.downsample
        h, w = self.mask.shape
        c0, r0 = int(np.floor(x0 / d)), int(np.floor(y0 / d))
        c1, r1 = int(np.ceil(x1 / d)), int(np.ceil(y1 / d))
        if c0 < 0 or r0 < 0 or c1 > w or r1 > h or c1 <= c0 or r1 <= r0:
            return False
        if not self.mask[r0:r1, c0:c1].all():
            return False
        return self.roi is None or bool(self.roi.contains(_box(x0, y0, x1, y1)))

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bool per level-0 point ``(x, y)``: the mask pixel holding it is tissue (points off the mask: False) and,
        with regions of interest, the point lies in them (on their boundary counts as in)."""
        d = self.downsample
        h, w = self.mask.shape
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        c = np.floor(x / d).astype(np.int64)
        r = np.floor(y / d).astype(np.int64)
        inside = (c >= 0) & (c < w) & (r >= 0) & (r < h)
        out = np.zeros(c.shape, bool)
        out[inside] = self.mask[r[inside], c[inside]]
        if self.roi is not None and out.any():
            import shapely

            out[out] = shapely.intersects_xy(self.roi, x[out], y[out])
        return out

    @property
    def fraction(self) -> float:
        """The share of the slide the mask holds (with regions of interest, of its tissue in them)."""
        if self.roi_fraction is not None:
            return self.roi_fraction
        return float(self.mask.mean()) if self.mask.size else 0.0

    def within(self, roi: Any) -> "TissueMask":
        """This mask narrowed to the regions ``roi`` (a shapely (Multi)Polygon in level-0 pixels,
        :func:`wsiseg.io.regions.read_regions`): its pixels are the tissue pixels the regions touch, the checks
        above also consult the regions themselves, and :attr:`fraction` counts the tissue pixels whose centre
        lies in them."""
        import shapely

        shapely.prepare(roi)
        d = self.downsample
        centres, touched = _raster(roi, self.mask.shape, d)
        inside = self.mask & centres
        return TissueMask(self.mask & touched, d, roi, float(inside.mean()) if inside.size else 0.0)

    @classmethod
    def everything(cls, slide: Slide) -> "TissueMask":
        w, h = slide.dimensions
        return cls(np.ones((1, 1), bool), float(max(w, h)))

    @classmethod
    def blank(cls, slide: Slide, target_mpp: float = 4.0, max_size: int = 2048) -> "TissueMask":
        """All tissue, at the resolution :func:`tissue_mask` would have: what :meth:`within` narrows when a run
        has regions of interest but no tissue mask (``--no-tissue-mask``, or an image of one tile)."""
        w0, h0 = slide.dimensions
        ds = max(target_mpp / (slide.mpp or 0.25), max(w0, h0) / max_size, 1.0)
        return cls(np.ones((max(int(np.ceil(h0 / ds)), 1), max(int(np.ceil(w0 / ds)), 1)), bool), float(ds))


def _box(x0: float, y0: float, x1: float, y1: float) -> Any:
    import shapely

    return shapely.box(x0, y0, x1, y1)


def _raster(geom: Any, shape: tuple[int, int], d: float) -> tuple[np.ndarray, np.ndarray]:
    """Two (h, w) bool images of the level-0 (Multi)Polygon ``geom`` on a mask of ``d`` level-0 pixels a pixel: the
    pixels whose centre lies in it (holes left out; on the boundary counts as in), and the pixels it touches (a
    superset). OpenCV fills each polygon (its outer ring, then its holes cleared, in the polygon's own box, so an
    island inside another's hole stays) and draws every ring 3 pixels wide; the pixels under those lines, where a
    fill's edge rule could differ from the centre's, are decided by their centres (``shapely``). (Hand-written: a
    point-in-polygon test of every pixel took 25 s for a 2048 px mask and one round region here.)"""
    import cv2
    import shapely

    h, w = shape
    out = np.zeros(shape, bool)
    edge = np.zeros(shape, np.uint8)

    def ring(r: Any, c0: int = 0, r0: int = 0) -> np.ndarray:  # (level-0 -> pixels: a centre at ((c, r) + 0.5) * d)
        return np.round((np.asarray(r.coords)[:, :2] / d - 0.5 - (c0, r0)) * 16).astype(np.int32)  # (4 bits)

    for p in shapely.get_parts(geom):
        if p.geom_type != "Polygon" or p.is_empty:
            continue
        x0, y0, x1, y1 = p.bounds
        c0, r0 = max(int(np.floor(x0 / d)) - 1, 0), max(int(np.floor(y0 / d)) - 1, 0)
        c1, r1 = min(int(np.ceil(x1 / d)) + 1, w), min(int(np.ceil(y1 / d)) + 1, h)
        rings = [p.exterior, *p.interiors]
        cv2.polylines(edge, [ring(r) for r in rings], True, 1, thickness=3, lineType=cv2.LINE_8, shift=4)
        if c1 <= c0 or r1 <= r0:
            continue
        win = np.zeros((r1 - r0, c1 - c0), np.uint8)
        cv2.fillPoly(win, [ring(p.exterior, c0, r0)], 1, lineType=cv2.LINE_8, shift=4)
        if p.interiors:
            cv2.fillPoly(win, [ring(r, c0, r0) for r in p.interiors], 0, lineType=cv2.LINE_8, shift=4)
        out[r0:r1, c0:c1] |= win.astype(bool)
    rr, cc = np.nonzero(edge)
    out[rr, cc] = shapely.intersects_xy(geom, (cc + 0.5) * d, (rr + 0.5) * d)
    return out, out | edge.astype(bool)


def tissue_mask(slide: Slide, target_mpp: float = 4.0, max_size: int = 2048, margin_um: float = 12.0,
                max_hole_um: float = 100.0) -> TissueMask:
    """Tissue mask of ``slide`` at about ``target_mpp`` microns per pixel (at most ``max_size`` on the long side)."""
    import cv2

    w0, h0 = slide.dimensions
    mpp0 = slide.mpp or 0.25
    ds = max(target_mpp / mpp0, max(w0, h0) / max_size, 1.0)
    size = max(int(round(max(w0, h0) / ds)), 1)
    img, ds = slide.thumbnail(max_size=size)
    hsv = cv2.cvtColor(neutral_glass(img), cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1].astype(np.float32) / 255.0
    val = hsv[..., 2].astype(np.float32) / 255.0
    if float(sat.max() - sat.min()) < 1e-3:
        thr = SAT_MAX
    else:
        thr = float(np.clip(otsu(sat), SAT_MIN, SAT_MAX))
    # tissue is saturated; very dark pixels (pen, folds, scanner borders) count as tissue only if saturated too
    mask = (sat > thr) & (val > 0.08)
    # nor is the green to teal of marking dye and pens, which neither stain has (wsi.stains' dye band): a pen stroke
    # on the glass stays out of the tissue and its area; a speck inside the tissue is closed over below
    mask &= ~dye_coloured(hsv[..., 0].astype(np.float32) * 2.0, sat)
    k = max(3, int(round(20.0 / (mpp0 * ds))) | 1)  # ~20 um closing
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = max(1, int((50.0 / (mpp0 * ds)) ** 2))  # drop specks smaller than ~50x50 um
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    mask = keep[lab]
    mask = _fill_holes(mask, int((max_hole_um / (mpp0 * ds)) ** 2))
    r = max(1, int(np.ceil(margin_um / (mpp0 * ds))))
    mask = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) > 0
    return TissueMask(mask, float(ds))


def glass_colour(img: np.ndarray) -> np.ndarray | None:
    """The colour of the glass in an ``(h, w, 3)`` uint8 RGB overview, ``(3,)`` float (the per-channel median of
    the pixels within :data:`GLASS_TOL` of the commonest bright colour), or None where the overview holds no such
    expanse of one bright colour (:data:`GLASS_SHARE`): an image that is all tissue. From every fourth row and
    column of a larger overview (about 30 ms for 2048 px here, against a second for every pixel)."""
    img = np.asarray(img, np.uint8)
    step = 4 if min(img.shape[:2]) >= 256 else 1
    px = np.ascontiguousarray(img[::step, ::step, :3]).reshape(-1, 3)
    if not len(px):
        return None
    bright = px[px.astype(np.uint16).sum(1) >= 3 * GLASS_GREY]
    if len(bright) < GLASS_SHARE * len(px):
        return None
    q = (bright >> 3).astype(np.int32)
    key = (q[:, 0] << 10) | (q[:, 1] << 5) | q[:, 2]  # (32 bins a channel)
    centre = bright[key == np.bincount(key, minlength=1 << 15).argmax()].mean(0)
    near = np.abs(px.astype(np.float32) - centre).max(1) <= GLASS_TOL
    if near.sum() < GLASS_SHARE * len(px):
        return None
    return np.median(px[near], axis=0).astype(np.float64)


def neutral_glass(img: np.ndarray) -> np.ndarray:
    """``img`` (an overview, ``(h, w, 3)`` uint8 RGB) white-balanced so that its glass (:func:`glass_colour`) is grey:
    each channel scaled by the glass' brightest channel over its own. ``img`` itself where there is no glass or it
    is grey already (its saturation below :data:`SAT_MIN`), so an untinted slide's mask is unchanged. Tinted glass
    is otherwise as saturated as pale tissue: a yellowed slide's mask would take the glass as tissue (twice the
    bundled sample's tissue area at a saturation of 0.15), its density per mm^2 half what it is, and its glass tiles
    segmented (docs/precision.md, "Tinted glass")."""
    glass = glass_colour(img)
    if glass is None or glass.min() <= 0 or (glass.max() - glass.min()) / glass.max() < SAT_MIN:
        return img
    import cv2

    gain = glass.max() / glass
    lut = np.clip(np.round(np.arange(256)[:, None] * gain[None, :]), 0, 255).astype(np.uint8)  # (256, 3)
    return cv2.LUT(np.ascontiguousarray(img[..., :3]), lut[None])


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of float ``values`` (not all equal), exactly as ``skimage.filters.threshold_otsu`` computes
    it (256 bins between the values' extremes, counts as float32; tested against it). Written here because
    importing scikit-image (and SciPy with it) for it was the largest fixed cost of a run's main process before
    its first tile (measured in docs/speed.md), and nothing else there needs them."""
    counts, edges = np.histogram(values.reshape(-1), bins=256)
    centers = (edges[:-1] + edges[1:]) / 2.0
    counts = counts.astype(np.float32)
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / w1
    m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
    return float(centers[np.argmax(w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2)])


def _fill_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """``mask`` with its holes (background components that do not touch the border) of at most ``max_area``
    pixels filled."""
    import cv2

    n, lab, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    x, y, w, h, area = (stats[:, k] for k in range(5))
    inner = (x > 0) & (y > 0) & (x + w < mask.shape[1]) & (y + h < mask.shape[0])
    fill = inner & (area <= max_area)
    fill[0] = False  # label 0: the mask itself
    return mask | fill[lab]
