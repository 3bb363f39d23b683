"""Optional stage of ``wsiseg adapt``: pseudo-labels for the unlabelled target tiles (self-training).

Entry point: :func:`pseudo_label_dir`. Not part of the paper: an addition that lets the detector see real target
nuclei with (noisy) instance labels next to the synthesised source. The labels come from an annotation-free
segmenter, by default the classical colour-deconvolution watershed of :mod:`wsiseg.segmenters.watershed` (what ``wsiseg
run --model watershed`` does), or from a ``teacher``: any :class:`~wsiseg.segmenters.base.Segmenter`, typically a
model an earlier self-training round produced (a second round with the student as teacher). Target annotations are
never read.

Reads ``target_dir/<slide>_<row>_<col>.png`` (the target stage's tiles) and writes ``out_dir/images/<name>.png``
(a copy of the tile) and ``out_dir/labels/<name>.png`` (uint16 instance labels, ``1..n``), the layout of
:func:`wsiseg.train.trainer.load_pair_dir`. Guarantees:

* Watershed: the haematoxylin threshold is calibrated once per slide, on all of that slide's sampled tiles together,
  as ``wsiseg run`` calibrates it once per slide on its overview; every tile of a slide uses the same threshold.
* Teacher: each tile is predicted alone (tiles are already at the model's resolution), a slide's tiles in one batch;
  only the instances the teacher keeps (its own score threshold) become labels.
* Deterministic (no randomness); files are written atomically and existing pairs are skipped, so it resumes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..core.atomic import write_png, write_text
from ..core.errors import InputError


def _slide_of(name: str) -> str:
    parts = name.rsplit("_", 2)
    return parts[0] if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else name


def drop_ragged(rgb: np.ndarray, labels: np.ndarray, min_solidity: float, radius: int = 3
                ) -> tuple[np.ndarray, np.ndarray]:
    """Drop pseudo-instances less solid (area / convex-hull area) than ``min_solidity`` and inpaint their pixels.

    Ragged instances are mostly fragments of pale, vesicular nuclei that the threshold cut into chromatin clumps.
    Left in the labels they teach the detector to split such nuclei; left in the image without labels they teach it
    that they are background. So, as nuclei inpainting (eq. 1-2) does for the synthesised source, they are removed
    from the image (OpenCV Telea, ``radius``). Returns ``(image, labels relabelled 1..n)``.
    """
    from skimage.measure import regionprops
    from skimage.segmentation import relabel_sequential

    if min_solidity <= 0 or labels.max() == 0:
        return rgb, labels
    bad = [r.label for r in regionprops(labels) if r.solidity < min_solidity]
    if not bad:
        return rgb, labels
    drop = np.isin(labels, bad)
    rgb = cv2.inpaint(np.ascontiguousarray(rgb), cv2.dilate(drop.astype(np.uint8), np.ones((3, 3), np.uint8)),
                      radius, cv2.INPAINT_TELEA)
    labels = relabel_sequential(np.where(drop, 0, labels))[0]
    return rgb, labels


def drop_on_white(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``labels`` without the instances that lie on white (:func:`wsiseg.eval.background.on_white`), relabelled 1..n."""
    from skimage.segmentation import relabel_sequential

    from ..eval.background import on_white

    white = on_white(rgb, labels)
    if not white.any():
        return labels
    return relabel_sequential(np.where(white[labels], 0, labels))[0]


def drop_pale(rgbs: list[np.ndarray], labels: list[np.ndarray], factor: float) -> list[np.ndarray]:
    """One slide's tile ``labels`` without the instances far paler than the slide's typical one: mean haematoxylin
    (:func:`wsiseg.wsi.stains.stain_stats`) below ``factor`` times the median over all the slide's instances;
    relabelled 1..n. New arrays where anything is dropped (the inputs are not changed).

    Relative to the slide, not absolute: a slide of pale, vesicular nuclei (a prostate image of Kumar's, where half
    the labelled nuclei have a mean haematoxylin under 0.15) keeps them, while nucleus-sized white spaces in the
    dense collagen of a darkly stained slide (the bundled sample: the median detection 0.72, its stroma outlines under
    0.15) go. On the 16 Kumar development images, at 0.25, the rule flags 8 of the bundled model's 7,883 detections,
    none of them a true nucleus; on the sample 248 of 2,845 (docs/precision.md).
    """
    from skimage.segmentation import relabel_sequential

    from ..wsi.stains import stain_stats

    means = [stain_stats(rgb[..., :3], lab, int(lab.max()))[:, 0] for rgb, lab in zip(rgbs, labels)]
    pooled = np.concatenate(means) if means else np.zeros(0)
    if factor <= 0 or not pooled.size:
        return list(labels)
    cut = factor * float(np.median(pooled))
    out = []
    for lab, h in zip(labels, means):
        pale = np.zeros(h.size + 1, dtype=bool)
        pale[1:] = h < cut
        out.append(relabel_sequential(np.where(pale[lab], 0, lab))[0] if pale.any() else lab)
    return out


#: The stain of the Kumar train images (the 16 development images, pooled, every fourth pixel each way): Macenko's
#: haematoxylin and eosin optical-density vectors (columns) and the 99th percentile of each stain's amount, as
#: torchstain's ``NumpyMacenkoNormalizer.fit`` gives them (``python scripts/stain_reference.py`` prints them): the
#: stain the bundled models were adapted to, what :func:`normalise_stain` maps a target slide onto
KUMAR_HE = np.array([[0.6039, 0.1481], [0.7120, 0.8243], [0.3583, 0.5465]])
KUMAR_MAX = np.array([2.2661, 1.4349])
_IO = 240.0  # Macenko's transmitted light (torchstain's default)
_BETA = 0.15  # the optical density below which a pixel is transparent, left out of the estimate (torchstain's)
#: fewer stained pixels than this on a slide's tiles (every second row and column): no estimate, the tiles as they are
MIN_STAINED_PX = 1000


def _macenko_od(px: np.ndarray) -> np.ndarray:
    """Macenko's optical densities of uint8 pixels (torchstain's: ``-ln((I + 1) / 240)``), float64."""
    return -np.log((px.astype(np.float64) + 1) / _IO)


def normalise_stain(rgbs: list[np.ndarray], step: int = 2) -> list[np.ndarray]:
    """One slide's tiles (uint8 ``(H, W, 3)``) with their stain mapped onto the Kumar train images'
    (:data:`KUMAR_HE`, :data:`KUMAR_MAX`), by Macenko's method: the slide's two stain vectors and amounts estimated
    once, on all of its tiles' pixels together (every ``step``-th row and column; torchstain's estimate), then each
    pixel's amounts re-drawn with the reference's vectors. Every tile of a slide is mapped the same way, so a pale
    tile stays paler than a dark one. Background (glass) comes out at Macenko's light level, 240 in each channel.
    Tiles with too little stain to estimate from (fewer than :data:`MIN_STAINED_PX` stained pixels, or an estimate
    that fails) are returned as they are.

    The mapping is written here rather than with torchstain's ``normalize``, which estimates the stain of the one
    image it maps: given a slide's tiles one by one it would give each tile its own estimate, and given them as one
    image it holds all of their pixels in float64 several times over (500 MB for 64 tiles)."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    if not rgbs:
        return []
    pooled = np.concatenate([r[::step, ::step, :3].reshape(-1, 3) for r in rgbs])
    stained = np.all(_macenko_od(pooled) >= _BETA, axis=1)  # the pixels Macenko estimates on
    if np.count_nonzero(stained) < MIN_STAINED_PX:
        return list(rgbs)  # too little stain to estimate (a slide of glass, or barely stained): seen as it is
    slide = NumpyMacenkoNormalizer()
    try:
        with np.errstate(all="ignore"):
            slide.fit(np.ascontiguousarray(pooled[:, None, :]), Io=_IO, beta=_BETA)  # the slide's HERef, maxCRef
            unmix = np.linalg.pinv(slide.HERef)  # least squares: what torchstain solves for each pixel
    except np.linalg.LinAlgError:
        return list(rgbs)
    if not (np.isfinite(unmix).all() and np.all(slide.maxCRef > 0)):
        return list(rgbs)
    scale = KUMAR_MAX / slide.maxCRef
    out = []
    for rgb in rgbs:
        amounts = (_macenko_od(rgb[..., :3].reshape(-1, 3)) @ unmix.T) * scale
        mapped = np.minimum(_IO * np.exp(-amounts @ KUMAR_HE.T), 255)
        out.append(mapped.astype(np.uint8).reshape(rgb.shape[:2] + (3,)))
    return out


@dataclass(frozen=True)
class LabelRules:
    """What the pseudo stage leaves out of the labels; each rule off by default."""

    min_solidity: float = 0.0  # > 0: ragged instances dropped and inpainted (drop_ragged)
    radius: int = 3  # drop_ragged's inpainting radius
    drop_white: bool = False  # instances on white (drop_on_white)
    drop_pale: float = 0.0  # f > 0: instances far paler than their slide's typical one (drop_pale)


def pseudo_label_dir(target_dir: str | Path, out_dir: str | Path, teacher=None, rules: LabelRules = LabelRules(),
                     progress: bool = True, batch_size: int = 8, stain_norm: bool = False) -> Path:
    """Pseudo-labels for every tile of ``target_dir``; returns ``out_dir``. ``teacher``: a Segmenter whose
    predictions are the labels (None: the per-slide-calibrated watershed). ``rules``: ``min_solidity`` > 0: ragged
    instances are dropped and inpainted (:func:`drop_ragged`); ``drop_white``: instances on white (glass, fat, lumen;
    :func:`wsiseg.eval.background.on_white`) are left out of the labels but kept in the image, so the student learns
    them as background: a teacher's false positives there do not become the student's; ``drop_pale`` > 0: instances
    far paler than their slide's typical one (:func:`drop_pale`, over the slide's tiles labelled in this call) are
    left out the same way. ``stain_norm``: the labeller (teacher or watershed) and the rules see each slide's tiles
    mapped onto the Kumar train images' stain (:func:`normalise_stain`); the images written are the tiles as they are,
    so the student learns the target's own stain with the labels its teacher gives in the stain it knows.
    ``out_dir/left_out.json``: how many instances each rule left out (``on_white``, ``pale``, ``ragged``) and how many
    labels were written (``labels``)."""
    from ..segmenters.watershed import WatershedSegmenter

    tiles = sorted(Path(target_dir).glob("*.png"))
    if not tiles:
        raise InputError(f"{target_dir}: no target tiles; run the 'target' stage first")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    by_slide: dict[str, list[Path]] = defaultdict(list)
    for t in tiles:
        by_slide[_slide_of(t.stem)].append(t)

    # what the rules left out and the labels written, over every call that wrote into out_dir (a slide's counts are
    # saved once its tiles are written: after an interruption, its tiles written before it are not counted)
    tally_path = out / "left_out.json"
    tally = {"labels": 0, "on_white": 0, "pale": 0, "ragged": 0}
    if tally_path.is_file():
        tally.update(json.loads(tally_path.read_text()))
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(transient=False, console=Console(stderr=True))
        bar.start()
        task = bar.add_task("pseudo-labels", total=len(tiles))
    try:
        for paths in by_slide.values():
            todo = {p for p in paths if not ((out / "images" / p.name).exists() and (out / "labels" / p.name).exists())}
            if not todo:
                if bar is not None:
                    bar.advance(task, len(paths))
                continue
            rgbs = [cv2.imread(str(p), cv2.IMREAD_COLOR)[..., ::-1] for p in paths]
            seen = normalise_stain(rgbs) if stain_norm else rgbs  # what the labeller and the rules see
            if teacher is None:
                seg = WatershedSegmenter()
                seg.calibrate(np.concatenate(seen, axis=1))
                labels = [seg.predict(rgb)[0].labels if p in todo else None for p, rgb in zip(paths, seen)]
            else:
                labels = [None] * len(paths)
                idx = [i for i, p in enumerate(paths) if p in todo]
                for k in range(0, len(idx), batch_size):
                    chunk = idx[k:k + batch_size]
                    shapes = {rgbs[i].shape for i in chunk}
                    if len(shapes) != 1:
                        raise InputError(f"{target_dir}: target tiles differ in size ({sorted(shapes)})")
                    for i, inst in zip(chunk, teacher.predict(np.stack([seen[i] for i in chunk]))):
                        labels[i] = inst.labels
            idx = [i for i, p in enumerate(paths) if p in todo]
            for i, lab in zip(idx, _left_out(tally, [seen[i] for i in idx], [labels[i] for i in idx], rules)):
                labels[i] = lab
            for p, rgb, lab in zip(paths, rgbs, labels):
                if p in todo:
                    before = _count(lab)
                    rgb, lab = drop_ragged(rgb, lab, rules.min_solidity, rules.radius)
                    kept = _count(lab)
                    tally["ragged"] += before - kept
                    tally["labels"] += kept
                    if lab.max() > np.iinfo(np.uint16).max:
                        raise InputError(f"{p}: more than 65535 pseudo-labelled nuclei in one tile")
                    write_png(out / "labels" / p.name, lab.astype(np.uint16))
                    write_png(out / "images" / p.name, np.ascontiguousarray(rgb))
                if bar is not None:
                    bar.advance(task)
            write_text(tally_path, json.dumps(tally))
        if not tally_path.is_file():  # every tile was labelled before (a resumed, older out_dir): nothing counted
            write_text(tally_path, json.dumps(tally))
    finally:
        if bar is not None:
            bar.stop()
    return out


def _count(labels: np.ndarray) -> int:
    """The number of instances (distinct non-zero ids) of ``labels``."""
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


def _left_out(tally: dict[str, int], rgbs: list[np.ndarray], labels: list[np.ndarray], rules: LabelRules
              ) -> list[np.ndarray]:
    """One slide's ``labels`` less what ``rules.drop_white`` and ``rules.drop_pale`` leave out, each one's count of
    instances added to ``tally`` (``on_white``, ``pale``)."""
    if rules.drop_white:
        kept = [drop_on_white(rgb, lab) for rgb, lab in zip(rgbs, labels)]
        tally["on_white"] += sum(_count(a) - _count(b) for a, b in zip(labels, kept))
        labels = kept
    if rules.drop_pale > 0:
        kept = drop_pale(rgbs, labels, rules.drop_pale)
        tally["pale"] += sum(_count(a) - _count(b) for a, b in zip(labels, kept))
        labels = kept
    return labels


__all__ = ["pseudo_label_dir", "LabelRules", "drop_ragged", "drop_on_white", "drop_pale", "normalise_stain",
           "KUMAR_HE", "KUMAR_MAX"]
