"""How sharp a slide's nuclei are, and how much a blurred slide is sharpened before the model sees it.

A scan made off its focal plane (a failed focus point, a thick or uneven section) blurs its nuclei: the bundled model
then misses many of them. On the Kumar development images blurred by a Gaussian of 4 px at 0.25 um/px (1 um, a region
clearly out of focus) its object recall fell by 0.30 and its AJI from 0.530 to 0.379; sharpened by the rule below it
scores 0.463 (16 of 16 images ahead; on the test images so blurred 0.367 -> 0.441, 13 of 14; docs/precision.md, "Out
of focus").

:func:`edge_widths` measures, without labels, how wide the edges of the nuclei the model outlines are: a nucleus'
contrast with its surround (grey levels) over the steepest gradient across its outline, in the model's pixels (2.5
for the development images as they are; a Gaussian blur of s px adds about :data:`PX_PER_BLUR` s). The zoom probe
(:mod:`wsiseg.wsi.scale`) takes the median over its tiles' nuclei, and :func:`sharpen_px` turns it into the unsharp
mask's width: none below :data:`BLURRED_FROM` (no development image reaches it as it is, re-stained, paler, darker
or scanned at 20x, 3.73 at most; all sixteen do blurred by 4 px), else the blur the width says.

A slide out of focus in parts only (a failed focus point, a fold) is not sharpened as a whole: where the probe finds a
tile out of focus (:data:`TILE_BLURRED_FROM`), the predictor checks every tile's own nuclei
(:func:`tile_sharpening`) and predicts a tile they say is out of focus again, sharpened by the blur they show
(:attr:`wsiseg.segmenters.rcnn.PredictorOptions.refocus`).

Guarantee: the width depends only on the pixels and the outlines given; an image whose nuclei are as sharp as the
development images' is never sharpened, and a tile's sharpening depends on that tile alone (the same for any batch
or number of workers).
"""

from __future__ import annotations

import numpy as np

#: the median edge width of the development images' nuclei as they are, in model pixels (0.25 um/px)
SHARP_PX = 2.5
#: how much wider a nucleus' edge looks per pixel of Gaussian blur (the development images blurred by 2 and 4 px:
#: medians 3.7 and 4.8)
PX_PER_BLUR = 0.59
#: a slide is out of focus, and sharpened, from this median edge width on (model pixels)
BLURRED_FROM = 4.0
#: a probe tile whose own nuclei's median edge width reaches this looks out of focus (model pixels; of the 864 tiles
#: of the development images as they are and under five other shifts none reached 4.0, of those blurred by 1 um 101 of
#: 134 reached 4.5): a slide that is not sharpened but has two such tiles or more is blurred in parts, and the run warns
TILE_BLURRED_FROM = 4.5
#: the fewest measured nuclei for a tile's own median
TILE_NUCLEI = 10
#: nuclei with less contrast than this (grey levels, inside against around) are not measured: a faint edge's width
#: is mostly noise
MIN_STEP = 20.0
#: the smallest nucleus measured (pixels)
MIN_AREA = 40


def edge_widths(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The edge width (pixels) of each instance of ``labels`` in ``rgb`` (uint8 ``(H, W, 3)``) that is whole in it,
    of at least :data:`MIN_AREA` px and :data:`MIN_STEP` grey levels darker than its surround: that contrast over the
    90th percentile of the gradient's magnitude on a band across its outline (an edge blurred by a Gaussian of s px is
    about 2.5 s wide). The surround is a ring 3-4 px out, other instances left out; the inside, the instance eroded
    by 2 px."""
    import cv2
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY).astype(np.float32)
    smooth = cv2.GaussianBlur(grey, (0, 0), 0.7)
    magnitude = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3),
                         cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)) / 8.0
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    h, w = labels.shape
    out = []
    for k, box in enumerate(ndi.find_objects(labels), 1):
        if box is None or box[0].start == 0 or box[1].start == 0 or box[0].stop == h or box[1].stop == w:
            continue  # (absent, or cut by the image's border)
        y0, y1 = max(0, box[0].start - 8), min(h, box[0].stop + 8)
        x0, x1 = max(0, box[1].start - 8), min(w, box[1].stop + 8)
        window = labels[y0:y1, x0:x1]
        mask = (window == k).astype(np.uint8)
        if mask.sum() < MIN_AREA:
            continue
        grown = cv2.dilate(mask, disc)
        inside = cv2.erode(mask, disc).astype(bool)
        ring = cv2.dilate(mask, disc, iterations=2).astype(bool) & ~grown.astype(bool) & (window == 0)
        if inside.sum() < 10 or ring.sum() < 10:
            continue
        g = grey[y0:y1, x0:x1]
        step = _quantile(g[ring], 0.5) - _quantile(g[inside], 0.5)
        if step < MIN_STEP:
            continue
        band = grown.astype(bool) & ~inside
        out.append(step / max(_quantile(magnitude[y0:y1, x0:x1][band], 0.9), 1e-3))
    return np.asarray(out, np.float64)


def _quantile(values: np.ndarray, q: float) -> float:
    """``np.quantile(values, q)`` (linear, as NumPy interpolates) of a small array, by one sort: NumPy's own
    median and percentile took two thirds of :func:`edge_widths`' time on a tile's few hundred pixels a nucleus."""
    v = np.sort(values, axis=None).astype(np.float64)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    t = pos - lo
    a, b = float(v[lo]), float(v[hi])
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def blurred_tiles(widths: list[np.ndarray]) -> int:
    """How many of the tiles whose nuclei's edge widths are ``widths`` (one array a tile) look out of focus: at least
    :data:`TILE_NUCLEI` measured, their median at least :data:`TILE_BLURRED_FROM`."""
    return sum(1 for w in widths if len(w) >= TILE_NUCLEI and float(np.median(w)) >= TILE_BLURRED_FROM)


def tile_sharpening(rgb: np.ndarray, labels: np.ndarray, zoom: float = 1.0) -> float:
    """The unsharp mask's width (model pixels of the tile as shown) for a tile whose own nuclei are ``labels``: the
    slide's rule (:func:`sharpen_px`) applied to their median edge width where at least :data:`TILE_NUCLEI` are
    measured, else 0.0. ``zoom``: how many times larger than the slide's own scale the tile is shown (its edges are
    that much wider, and so is the blur to undo)."""
    widths = edge_widths(rgb, labels)
    if len(widths) < TILE_NUCLEI:
        return 0.0
    return round(sharpen_px(float(np.median(widths)) / zoom) * zoom, 2)


def sharpen_px(edge_px: float | None) -> float:
    """The unsharp mask's width (Gaussian sigma, model pixels) for nuclei whose median edge width is ``edge_px``:
    0.0 (not sharpened) below :data:`BLURRED_FROM` or when not measured, else the blur that widens a sharp edge
    (:data:`SHARP_PX`) that much, rounded to 0.01 px."""
    if edge_px is None or not edge_px >= BLURRED_FROM:
        return 0.0
    return round((edge_px - SHARP_PX) / PX_PER_BLUR, 2)

