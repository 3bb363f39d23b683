"""Whether a nucleus lies on white (glass, fat, lumen), measured per instance from the RGB image.

Used by the whole-slide precision benchmark (``benchmarks/precision.py``: the share of detections on white) and by
the pseudo stage of ``wsiseg adapt`` (a teacher's detections on white are not made labels). Everything is vectorised over the instances
(``np.bincount`` on the label image), so a 1000x1000 image with a thousand instances takes milliseconds.

The white rule (the precision issue's): an instance is on white when the mean grey level of its pixels is at least
:data:`WHITE_GREY` and their mean HSV saturation below :data:`WHITE_SAT`. Blank glass is about grey 235-250 with
saturation under 0.05; the palest nuclei are far below grey 215.

The dye rule: an instance is on marking dye (the green or teal ink surgeons paint on margins) when the circular
mean HSV hue of its pixels (weighted by their saturation) lies in :data:`wsiseg.wsi.stains.DYE_HUE` degrees, a green
to cyan that neither stain has (haematoxylin is purple-blue, eosin and red cells pink to red), and their mean
saturation is at least :data:`wsiseg.wsi.stains.DYE_SAT`. It is defined once, in :mod:`wsiseg.wsi.stains`, where
``wsiseg run`` leaves such outlines out, judged at the model's resolution (so a run's own outputs hold hardly any
by this count, made on the image as given: 2 of the bundled sample's 2,461).

The pale rule: an instance is pale when the mean haematoxylin of its pixels (colour deconvolution,
:func:`wsiseg.wsi.stains.stain_stats`: the ``Hematoxylin: Mean`` of the GeoJSON's measurements) is below
:data:`PALE_HEMATOXYLIN`. Not white, not dye, yet hardly stained by haematoxylin: on the bundled sample nearly all
such detections are nucleus-sized gaps in the stroma (docs/precision.md, "What it draws that round 8 does not"),
where the white rule sees nothing. Real pale (vesicular) nuclei can fall under it too, so it is a count to compare
models by, not a verdict on each.
"""

from __future__ import annotations

import cv2
import numpy as np

WHITE_GREY = 215.0  # 0..255
WHITE_SAT = 0.1  # 0..1
PALE_HEMATOXYLIN = 0.15  # optical density units


def _grey_sat(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255.0
    return grey, sat


def white_mask(rgb: np.ndarray) -> np.ndarray:
    """True where a pixel is white by the rule above (grey >= WHITE_GREY and saturation < WHITE_SAT)."""
    grey, sat = _grey_sat(rgb)
    return (grey >= WHITE_GREY) & (sat < WHITE_SAT)


def _means(labels: np.ndarray, n: int, *values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pixel count and mean of each of ``values`` per label id ``0..n``."""
    lab = np.ascontiguousarray(labels).ravel().astype(np.int64)
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)
    out = [np.bincount(lab, weights=v.ravel().astype(np.float64), minlength=n + 1) / np.maximum(count, 1)
           for v in values]
    return count, out


def on_white(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Bool per label id ``0..labels.max()`` (index 0, the background, is False): the instance lies on white."""
    grey, sat = _grey_sat(rgb)
    count, (g, s) = _means(labels, int(labels.max()) if labels.size else 0, grey, sat)
    white = (g >= WHITE_GREY) & (s < WHITE_SAT) & (count > 0)
    white[0] = False
    return white


def on_dye(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Bool per label id ``0..labels.max()`` (index 0, the background, is False): the instance lies on marking dye
    (the dye rule above: :func:`wsiseg.wsi.stains.dye_instances`, the rule ``wsiseg run`` leaves such outlines out
    by)."""
    from ..wsi.stains import dye_instances

    lab = np.ascontiguousarray(labels)
    return np.concatenate([[False], dye_instances(rgb, lab)])


def on_pale(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Bool per label id ``0..labels.max()`` (index 0, the background, is False): the instance is pale (the pale
    rule above)."""
    from ..wsi.stains import stain_stats

    lab = np.ascontiguousarray(labels)
    n = int(lab.max()) if lab.size else 0
    count = np.bincount(lab.ravel().astype(np.int64), minlength=n + 1)
    pale = np.zeros(n + 1, dtype=bool)
    pale[1:] = (stain_stats(rgb[..., :3], lab, n)[:, 0] < PALE_HEMATOXYLIN) & (count[1:] > 0)
    return pale


def white_report(rgb: np.ndarray, labels: np.ndarray, mpp: float, tile_px: int) -> dict[str, float]:
    """How a segmentation of ``rgb`` (labels 1..n of its shape; ``mpp`` um/px) treats white, for a benchmark table.

    ``detections``, ``on_white`` (instances on white by :func:`on_white`) and ``share_on_white``, ``on_dye``
    (:func:`on_dye`) and ``share_on_dye``, ``pale`` (:func:`on_pale`, white ones left out) and ``share_pale``;
    ``white_mm2`` (the area of white pixels) and ``on_white_per_mm2``; ``glass_tiles``: the ``tile_px``-square cells
    of a grid from the origin that are at least 99% white (blank glass, wholly), and ``on_glass_tiles``: instances
    whose centroid lies in one of them.
    """
    lab = np.ascontiguousarray(labels).astype(np.int64)
    n = int(lab.max()) if lab.size else 0
    count, (ys, xs) = _means(lab, n, *np.indices(lab.shape, dtype=np.float32))
    present = count > 0
    present[0] = False
    white_px = white_mask(rgb)
    white = on_white(rgb, lab) & present
    h, w = lab.shape
    th, tw = h // tile_px, w // tile_px
    cells = white_px[:th * tile_px, :tw * tile_px].reshape(th, tile_px, tw, tile_px).mean((1, 3)) >= 0.99
    r = np.minimum((ys / tile_px).astype(np.int64), max(th - 1, 0))
    c = np.minimum((xs / tile_px).astype(np.int64), max(tw - 1, 0))
    inside = present & (ys < th * tile_px) & (xs < tw * tile_px)
    on_glass = int(cells[r[inside], c[inside]].sum()) if cells.size else 0
    white_mm2 = float(white_px.sum()) * mpp * mpp / 1e6
    n_det = int(present.sum())
    dye = int((on_dye(rgb, lab) & present).sum())
    pale = int((on_pale(rgb, lab) & present & ~white).sum())
    return {"detections": n_det, "on_white": int(white.sum()),
            "share_on_white": float(white.sum()) / n_det if n_det else 0.0,
            "on_dye": dye, "share_on_dye": dye / n_det if n_det else 0.0,
            "pale": pale, "share_pale": pale / n_det if n_det else 0.0,
            "white_mm2": white_mm2, "on_white_per_mm2": float(white.sum()) / white_mm2 if white_mm2 else 0.0,
            "glass_tiles": int(cells.sum()), "on_glass_tiles": on_glass}


__all__ = ["white_report", "WHITE_GREY", "WHITE_SAT", "PALE_HEMATOXYLIN", "white_mask", "on_white", "on_dye",
           "on_pale"]
