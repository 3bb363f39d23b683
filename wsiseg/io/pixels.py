"""Pixels as every reader returns them: RGB uint8 ``(h, w, 3)``, contiguous.

A decoder gives greyscale, RGB or RGBA, of 8 bits or more, integer, boolean or floating-point. :func:`rgb8` makes
any of them that: grey repeated over the three channels, alpha composited onto white (a transparent pixel is glass,
as OpenSlide shows it) and other bit depths scaled by their type's range (:func:`to_uint8`). The same conversion for
a plain image loaded whole, a tiled TIFF's regions, an OME-Zarr's and an array given to the Python API, so the same
pixels in any of them give the same nuclei. :func:`image_rgb` also takes an image's layout as files and arrays come
(channels first, a single channel) and says in one line what it cannot take.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import InputError


def to_uint8(a: np.ndarray) -> np.ndarray:
    """``a`` as uint8 (``a`` itself when it is): 16-bit values scaled from their range (``v`` to
    ``round(v * 255 / 65535)``: a 16-bit scan), other integers by their values (0..255 as they are, as
    ``image.astype(int)`` leaves them; else as 16 bits, or the type's range past that), negatives to 0, booleans to 0
    and 255, floating point as 0..1 where no value is above 1, else as 0..255 (NaN as 0)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        hi = 65535.0
    elif np.issubdtype(a.dtype, np.integer):
        top = int(a.max()) if a.size else 0
        hi = 255.0 if top <= 255 else 65535.0 if top <= 65535 else float(np.iinfo(a.dtype).max)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        hi = 1.0 if not a.size or float(a.max()) <= 1.0 else 255.0
    else:
        raise InputError(f"pixels of type {a.dtype}: expected integers or floating point")
    return np.rint(np.clip(a.astype(np.float64) * (255.0 / hi), 0, 255)).astype(np.uint8)


def rgb8(a: np.ndarray) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` of a greyscale ``(h, w)``, grey and alpha ``(h, w, 2)``, RGB or RGBA ``(h, w, 3 | 4)``
    image: alpha composited onto white (transparent = glass), other bit depths by :func:`to_uint8`."""
    a = to_uint8(a)
    if a.ndim == 3 and a.shape[2] == 2:  # grey and alpha
        a = _over_white(a[..., 0], a[..., 1])
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        opaque = not (a.view(np.uint32) < 0xFF000000).any() if a.flags.c_contiguous else a[..., 3].min() == 255
        if opaque:  # as a scan's tissue is: the same bytes, 0.05 instead of 2.3 ms a 256 px tile (OpenCV's copy)
            import cv2

            return cv2.cvtColor(a, cv2.COLOR_RGBA2RGB)
        return _over_white(a[..., :3], a[..., 3:4])
    return np.ascontiguousarray(a[..., :3])


def _over_white(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 ``values`` composited onto white by their uint8 ``alpha`` (straight alpha, floor division)."""
    alpha = alpha.astype(np.uint16)
    return ((values.astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)


def image_rgb(a: np.ndarray, name: str = "<array>") -> np.ndarray:
    """:func:`rgb8` of an image as files and arrays come: ``(h, w)``, ``(h, w, 1 | 3 | 4)``, or channels first
    ``(3 | 4, h, w)``; :class:`InputError` naming ``name`` for any other layout."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[2] not in (3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or 0 in a.shape:
        raise InputError(f"{name}: unsupported image layout {a.shape} (expected greyscale, RGB or RGBA)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return rgb8(a)
