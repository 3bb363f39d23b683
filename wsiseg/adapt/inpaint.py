"""Stage 4 of ``wsiseg adapt``: nuclei inpainting (paper section 3.2, eq. 1-2).

CycleGAN sometimes paints nuclei where the source has none; trained on as background they would teach the model to
miss real nuclei. :func:`inpaint` finds them and paints them over:

* ``S_raw`` = the haematoxylin channel (``skimage.color.rgb2hed``) of the synthesised image;
  ``otsu(S_raw)`` = ``S_raw > threshold_otsu(S_raw)`` (dark-blue = nucleus-like); ``M = labels > 0``.
* ``M_aux`` = (otsu(S_raw) OR M) - M (eq. 1), refined by ``mode``:

  - ``"pixels"`` (default): every Otsu pixel outside M **farther than ``margin`` pixels** from M (8-connected
    distance, ``margin=0`` is eq. 1 literally), minus leftover specks smaller than ``min_area`` pixels. We keep a
    margin of 2 px by default because a synthesised nucleus usually renders a little larger than its (nearest-
    neighbour warped) mask: with ``margin=0`` its rim is inpainted too and Telea smears that ring with the nucleus'
    own dark border values, blurring the edge the segmentation model must learn. An unannotated nucleus touching an
    annotated one is still removed, except for the ``margin``-wide strip next to the annotated one.
  - ``"components"``: only whole connected components of otsu(S_raw) that touch no annotated pixel (nor come within
    ``margin``). It never alters the surroundings of annotated nuclei, but keeps an unannotated nucleus (or stroma)
    that merges with an annotated one into one Otsu blob; kept for comparison.

* ``S_inp = inp(S_raw, M_aux)`` (eq. 2): OpenCV's fast-marching inpainting (``cv2.INPAINT_TELEA``, radius 3).

Guaranteed: ``M_aux`` never contains an annotated pixel, and pixels outside ``M_aux`` (annotated nuclei above all)
are returned unchanged. A flat image (no Otsu threshold) gives an empty ``M_aux``.

:func:`inpaint_dir` applies it to a translated directory, writing a separate ``out_dir`` so that the raw synthesised
images (for the "w/o NI" ablation) stay where they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label as cc_label

from ..core.atomic import write_png
from ..core.errors import ConfigError, InputError, OutputError

MODES = ("pixels", "components")


def haematoxylin_otsu(rgb: np.ndarray) -> np.ndarray:
    """Boolean Otsu foreground of the haematoxylin channel of an RGB uint8 image (all False if it is flat)."""
    h = rgb2hed(rgb)[..., 0]
    if float(h.max() - h.min()) < 1e-6:
        return np.zeros(h.shape, bool)
    return h > threshold_otsu(h)


def auxiliary_mask(
    rgb: np.ndarray, labels: np.ndarray, mode: str = "pixels", margin: int = 2, min_area: int = 4
) -> np.ndarray:
    """``M_aux`` (bool HxW) for a synthesised image and its annotation; see the module docstring."""
    if mode not in MODES:
        raise ConfigError(f"inpaint.mode: one of {', '.join(MODES)} (got {mode!r})")
    if margin < 0 or min_area < 0:
        raise ConfigError("inpaint: margin and min_area must be >= 0")
    fg = haematoxylin_otsu(rgb)
    m = labels > 0
    near = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=margin).astype(bool) if margin else m
    if mode == "pixels":
        aux = fg & ~near
    else:
        comp = cc_label(fg, connectivity=2)
        touching = np.unique(comp[near & fg])
        aux = fg & ~np.isin(comp, touching[touching > 0])
    if min_area > 1 and aux.any():
        comp = cc_label(aux, connectivity=2)
        area = np.bincount(comp.ravel())
        keep = area >= min_area
        keep[0] = False
        aux = keep[comp]
    return aux


def inpaint(
    synth_rgb: np.ndarray,
    labels: np.ndarray,
    radius: int = 3,
    mode: str = "pixels",
    margin: int = 2,
    min_area: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Remove unannotated nuclei from a synthesised image: returns ``(inpainted uint8 HxWx3, m_aux bool HxW)``."""
    if synth_rgb.dtype != np.uint8 or synth_rgb.ndim != 3 or synth_rgb.shape[2] != 3:
        raise InputError(f"inpaint: expected an RGB uint8 image, got {synth_rgb.dtype} {synth_rgb.shape}")
    if labels.shape != synth_rgb.shape[:2]:
        raise InputError(f"inpaint: labels {labels.shape} do not match the image {synth_rgb.shape[:2]}")
    aux = auxiliary_mask(synth_rgb, labels, mode, margin, min_area)
    if not aux.any():
        return synth_rgb.copy(), aux
    out = cv2.inpaint(np.ascontiguousarray(synth_rgb), aux.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    return out, aux


_write_png = write_png


def inpaint_dir(
    src_dir: str | Path,
    out_dir: str | Path,
    radius: int = 3,
    mode: str = "pixels",
    margin: int = 2,
    min_area: int = 4,
    save_masks: bool = True,
    progress: bool = True,
) -> Path:
    """Inpaint every ``src_dir/images/*.png`` (labels from ``src_dir/labels``) into ``out_dir/images``, copy the
    labels to ``out_dir/labels`` and (``save_masks``) write ``M_aux`` to ``out_dir/m_aux`` (0/255 PNG). ``src_dir`` is
    left untouched; images already done are skipped. ``out_dir/inpaint.json`` records the settings and the mean
    fraction of pixels inpainted in this run. Returns ``out_dir``."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if src_dir.resolve() == out_dir.resolve():
        raise ConfigError(f"{out_dir}: inpainting must write a new directory (the raw images are kept for ablation)")
    paths = sorted((src_dir / "images").glob("*.png"))
    if not paths:
        raise InputError(f"{src_dir / 'images'}: no synthesised PNG images found")
    subs = ("images", "labels") + (("m_aux",) if save_masks else ())
    for sub in subs:
        try:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out_dir / sub}: cannot create ({e.strerror})") from None
    todo = [p for p in paths if not all((out_dir / s / p.name).is_file() for s in subs)]
    it = todo
    if progress:
        from rich.progress import track

        it = track(todo, description="inpaint", total=len(todo))
    fractions = []
    for p in it:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        lp = src_dir / "labels" / p.name
        lab = cv2.imread(str(lp), cv2.IMREAD_UNCHANGED)
        if bgr is None:
            raise InputError(f"{p}: not a readable image")
        if lab is None:
            raise InputError(f"{lp}: labels missing or unreadable")
        out, aux = inpaint(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), lab.astype(np.int32), radius, mode, margin, min_area)
        fractions.append(float(aux.mean()))
        if save_masks:
            _write_png(out_dir / "m_aux" / p.name, aux.astype(np.uint8) * 255)
        _write_png(out_dir / "labels" / p.name, lab)
        _write_png(out_dir / "images" / p.name, out)
    record = {
        "radius": radius,
        "mode": mode,
        "margin": margin,
        "min_area": min_area,
        "images_done_this_run": len(todo),
        "mean_fraction_inpainted_this_run": float(np.mean(fractions)) if fractions else None,
    }
    (out_dir / "inpaint.json").write_text(json.dumps(record, indent=2) + "\n")
    return out_dir
