"""The classical segmenter: colour deconvolution + threshold + distance-transform watershed.

A deterministic baseline and a test oracle for the pipeline. Each step is *local* (pixel-wise operations, small
filters, per-object operations), so a nucleus segmented inside a tile with enough context around it comes out the
same as in the whole image: that is what the seam test of the stitcher checks.

The only global quantity, the haematoxylin threshold, is fixed per slide: :meth:`WatershedSegmenter.calibrate`
computes it once (Otsu on the haematoxylin channel of the slide's overview) before the tiles are segmented, so
every tile of one slide uses the same threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import SegmenterInfo, TileInstances


@dataclass
class WatershedParams:
    mpp: float = 0.25  # the scale the sizes below are given at
    threshold: float | None = None  # haematoxylin optical density; None = calibrate per slide (default 0.045)
    threshold_floor: float = 0.02
    threshold_ceiling: float = 0.09
    sigma: float = 1.0  # Gaussian smoothing of the H channel, pixels
    min_area: int = 60  # px; smaller objects are dropped
    max_hole: int = 100  # px; holes up to this size are filled
    peak_min_distance: int = 6  # px between two nucleus centres
    max_nucleus_px: int = 96  # sets the default tile overlap (the seam test needs >= 80 on Kumar)


class WatershedSegmenter:
    """Colour-deconvolution watershed nuclei segmenter (``--model watershed``)."""

    name = "watershed"

    def __init__(self, params: WatershedParams | None = None) -> None:
        self.params = params or WatershedParams()
        self.mpp = self.params.mpp
        self.max_nucleus_px = self.params.max_nucleus_px
        self.threshold = self.params.threshold if self.params.threshold is not None else 0.045

    def info(self) -> SegmenterInfo:
        """This segmenter as the pipeline sees it (:func:`wsiseg.segmenters.base.describe`): its name and its
        threshold as it is now (no checkpoint, no device)."""
        return SegmenterInfo(name=self.name, threshold=self.threshold)

    # ------------------------------------------------------------------ per-slide calibration
    def calibrate(self, overview_rgb: np.ndarray) -> float:
        """Fix the haematoxylin threshold for one slide from an RGB overview (any resolution, tissue only)."""
        from skimage.filters import threshold_otsu

        if self.params.threshold is not None:
            return self.threshold
        h = _haematoxylin(overview_rgb)
        tissue = overview_rgb.min(axis=2) < 235  # ignore glass
        vals = h[tissue] if tissue.sum() > 100 else h.ravel()
        if vals.size < 2 or float(vals.max() - vals.min()) < 1e-6:
            return self.threshold
        t = float(threshold_otsu(vals))
        self.threshold = float(np.clip(t, self.params.threshold_floor, self.params.threshold_ceiling))
        return self.threshold

    # ------------------------------------------------------------------ segmenter protocol
    def predict(self, tiles: np.ndarray) -> list[TileInstances]:
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[None]
        return [self._one(t) for t in tiles]

    def _one(self, rgb: np.ndarray) -> TileInstances:
        import cv2
        from scipy import ndimage as ndi
        from skimage.feature import peak_local_max
        from skimage.morphology import remove_small_holes, remove_small_objects
        from skimage.segmentation import watershed

        p = self.params
        h = _haematoxylin(rgb)
        if p.sigma > 0:
            h = cv2.GaussianBlur(h, (0, 0), p.sigma)
        fg = h > self.threshold
        fg = remove_small_holes(fg, max_size=p.max_hole)
        fg = remove_small_objects(fg, max_size=p.min_area - 1)
        if not fg.any():
            return TileInstances.empty(fg.shape)
        dist = ndi.distance_transform_edt(fg).astype(np.float32)
        dist = cv2.GaussianBlur(dist, (0, 0), 1.0)
        comps, _ = ndi.label(fg)
        peaks = peak_local_max(dist, min_distance=p.peak_min_distance, labels=comps, exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        lab = watershed(-dist, markers, mask=fg)
        # drop fragments below min_area, relabel 1..n
        areas = np.bincount(lab.ravel())
        keep = areas >= p.min_area
        keep[0] = False
        lut = np.zeros(areas.shape[0], np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        lab = lut[lab]
        n = int(keep.sum())
        lab = _clean(lab)
        n = int(lab.max())
        return TileInstances(lab, np.ones(n, np.float32))


def _haematoxylin(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed

    return rgb2hed(np.asarray(rgb)[..., :3]).astype(np.float32)[..., 0]


def _clean(lab: np.ndarray) -> np.ndarray:
    """Make each nucleus one solid, smooth blob (what its outline polygon describes): open with a 3x3 cross (cuts
    one-pixel necks and spurs), keep the largest 4-connected part, fill holes; relabel 1..n in raster order of
    the objects' first pixel. Each object is cleaned inside its own bounding box only (local)."""
    from scipy import ndimage as ndi

    cross = ndi.generate_binary_structure(2, 1)
    out = np.zeros_like(lab)
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab[sl] == k
        m = ndi.binary_opening(m, cross)
        if not m.any():
            continue
        cc, n = ndi.label(m, cross)
        if n > 1:
            m = cc == (np.argmax(np.bincount(cc.ravel())[1:]) + 1)
        m = ndi.binary_fill_holes(m)
        dst = out[sl]
        dst[m & (dst == 0)] = k
    areas = np.bincount(out.ravel(), minlength=lab.max() + 1)
    keep = areas > 0
    keep[0] = False
    lut = np.zeros(areas.shape[0], np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[out]
