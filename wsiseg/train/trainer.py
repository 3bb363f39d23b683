"""Training PDAM: one labelled source crop + one unlabelled target crop per iteration (paper section 3.5).

Entry point: :func:`train`. Data in: ``source`` = a sequence of ``(image uint8 (H, W, 3), labels int (H, W))`` pairs
(instance labels, 0 = background), ``target`` = a sequence of uint8 ``(H, W, 3)`` images or ``None`` for
supervised-only training (no discriminators: baselines and table 5's upper bound).

Guarantees:

* SGD (momentum, weight decay) with linear warm-up and a step decay at ``decay_at`` of the run (or AdamW);
  gradient clipping; augmentation by random crops, flips and 90-degree rotations.
* Deterministic on the CPU for a given seed; a resumed run gives the same weights as an uninterrupted one.
* ``out_dir/last.safetensors`` (a loadable checkpoint) + ``last.state.safetensors`` (optimizer tensors and RNG
  states) + ``last.state.json`` (iteration, scalars, configs) every ``checkpoint_every`` iterations - no pickle.
* ``out_dir/final.safetensors``: :func:`wsiseg.models.checkpoint.save_checkpoint` with the full model config, its mpp
  and a meta record (command, seed, data digest, train config, last validation scores); ``out_dir/log.jsonl``: losses
  and validation scores.
* bf16 autocast on CUDA when ``amp`` is set, and on the CPU when ``cpu_bf16`` is.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError, InputError, ModelError
from ..core.runtime import resolve_device
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.config import load_yaml, to_dict
from ..models.pdam import PDAM, PDAMConfig, build_pdam
from ..segmenters.postprocess import stock_predict
from .negatives import gaps, glass, ink, white_out, without_haematoxylin


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    iterations: int = 24000
    optimizer: str = "sgd"  # "sgd" (the paper) or "adamw"
    lr: float = 0.002  # the paper; the authors' code used 0.001
    momentum: float = 0.9
    weight_decay: float = 0.001  # the paper; the authors' code used 0.0001
    warmup_iters: int = 500
    warmup_factor: float = 0.001  # lr multiplier at iteration 0, rising linearly to 1 at warmup_iters
    decay_at: float = 0.75  # fraction of the run at which the lr is multiplied by decay_factor
    decay_factor: float = 0.1
    grad_clip: float = 10.0  # max global gradient norm; 0 = off
    checkpoint_every: int = 1000
    val_every: int = 1000
    log_every: int = 20
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (no effect on the CPU)
    cpu_bf16: bool = False  # bf16 autocast on the CPU too (native bf16 CPUs: 1.35x faster, Kumar level; docs/speed.md)
    source_batch: int = 1  # source crops per iteration
    target_batch: int = 1  # target crops per iteration
    crop_size: int = 256
    flips: bool = True
    rot90: bool = True
    min_instance_px: int = 4  # instances with fewer pixels after cropping are left out of the targets
    stain_jitter: float = 0.0  # HED colour augmentation of labelled crops (Tellez et al. 2018); 0 = off
    scale_jitter: float = 0.0  # s > 0: labelled images zoomed by a log-uniform factor in [1/(1+s), 1+s]; 0 = off
    vesicular: float = 0.0  # p > 0: each labelled nucleus (>= 150 px) given a pale interior with probability p
    touching: float = 0.0  # p > 0: a labelled crop gets copies of its nuclei pasted against others with probability p
    touching_copies: int = 3  # with touching: pastes tried per crop
    pseudo_fraction: float = 0.0  # share of labelled crops drawn from the pseudo-labelled target tiles, if given
    negative_fraction: float = 0.0  # share of labelled crops that hold no nucleus: glass (train.negatives); 0 = off
    white_out: float = 0.0  # p > 0: a labelled crop gets holes of glass (lumen, fat) with probability p; 0 = off
    gaps: float = 0.0  # p > 0: a labelled crop gets nucleus-sized pale gaps away from its nuclei with probability p
    negative_eosin: float = 0.0  # share of the negative crops that are tissue with its haematoxylin taken out
    ink: float = 0.0  # p > 0: a labelled or negative crop gets a deposit of marking dye with probability p; 0 = off
    scan20: float = 0.0  # p > 0: a labelled or negative crop seen as a 20x scanner's JPEG (rescan) with probability p
    stretch: float = 0.0  # p > 0: a labelled crop stretched along one axis (spindle-shaped nuclei) with probability p
    init: str = ""  # a checkpoint of the same architecture whose weights start the run (fine-tuning); "" = random

    def validate(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ConfigError(f"train.{key}: {msg}")

        if self.optimizer not in ("sgd", "adamw"):
            bad("optimizer", f"must be 'sgd' or 'adamw', got {self.optimizer!r}")
        for key in ("iterations", "checkpoint_every", "val_every", "log_every", "source_batch", "crop_size"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.target_batch < 0 or self.warmup_iters < 0 or self.min_instance_px < 1:
            bad("target_batch/warmup_iters/min_instance_px", "must be >= 0 (min_instance_px >= 1)")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1 or self.grad_clip < 0:
            bad("lr/momentum/weight_decay/grad_clip", "need lr > 0, 0 <= momentum < 1, weight_decay >= 0, grad_clip >= 0")
        if not 0 < self.warmup_factor <= 1 or not 0 < self.decay_at <= 1 or not 0 < self.decay_factor <= 1:
            bad("warmup_factor/decay_at/decay_factor", "must be in (0, 1]")
        if self.crop_size % 32:
            bad("crop_size", f"must be a multiple of 32, got {self.crop_size}")
        if not 0 <= self.stain_jitter <= 0.9:  # a density scaled by at least 0.1
            bad("stain_jitter", f"must be in [0, 0.9], got {self.stain_jitter}")
        if not 0 <= self.scale_jitter <= 1:  # zoomed by at most 2x either way
            bad("scale_jitter", f"must be in [0, 1], got {self.scale_jitter}")
        if not 0 <= self.vesicular <= 1:
            bad("vesicular", f"must be in [0, 1], got {self.vesicular}")
        if self.touching_copies < 1:
            bad("touching_copies", f"must be at least 1, got {self.touching_copies}")
        for key in ("pseudo_fraction", "negative_fraction", "white_out", "gaps", "negative_eosin", "ink", "touching",
                    "scan20", "stretch"):
            if not 0 <= getattr(self, key) <= 1:
                bad(key, f"must be in [0, 1], got {getattr(self, key)}")


@dataclass
class RunConfig:
    """A ``configs/*.yaml`` file: ``model:`` (:class:`PDAMConfig`) and ``train:`` (:class:`TrainConfig`)."""

    model: PDAMConfig = field(default_factory=PDAMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Read a run config YAML strictly (unknown keys, wrong types, bad values: ConfigError naming the file)."""
    return load_yaml(RunConfig, path)


def lr_at(cfg: TrainConfig, it: int) -> float:
    """Learning rate at (0-based) iteration ``it``: linear warm-up, then a step decay at ``decay_at``."""
    lr = cfg.lr
    if it >= int(cfg.decay_at * cfg.iterations):
        lr *= cfg.decay_factor
    if it < cfg.warmup_iters:
        f = it / cfg.warmup_iters
        lr *= cfg.warmup_factor * (1 - f) + f
    return lr


# ------------------------------------------------------------------------------------------------------- data
def to_rgb_uint8(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Grey / grey+alpha / RGB / RGBA, uint8 or wider -> ``(H, W, 3)`` uint8 (wider types min-max scaled)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (2, 4):
        a = a[..., :-1]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise InputError(f"{where}: expected a grey or RGB image, got shape {np.asarray(image).shape}")
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = np.round((a - lo) * (255.0 / (hi - lo if hi > lo else 1.0))).astype(np.uint8)
    return np.ascontiguousarray(a)


def _read(path: Path) -> np.ndarray:
    import cv2

    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise InputError(f"{path}: cannot read image")
    if a.ndim == 3 and a.shape[2] == 3:
        a = a[..., ::-1]
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(a)


_IMAGE_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def _listing(d: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    if not d.is_dir():
        raise InputError(f"{d}: directory not found")
    return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in exts}


def load_image_dir(directory: str | os.PathLike) -> list[np.ndarray]:
    """All images (png/tif/jpg) of ``directory`` in name order, as uint8 RGB."""
    files = _listing(Path(directory), _IMAGE_EXT)
    if not files:
        raise InputError(f"{directory}: no images found")
    return [to_rgb_uint8(_read(p), str(p)) for p in files.values()]


def load_pair_dir(directory: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """``directory/images/<stem>.png`` with ``directory/labels/<stem>.png`` (uint16 instance labels) -> pairs."""
    d = Path(directory)
    images = _listing(d / "images", _IMAGE_EXT)
    labels = _listing(d / "labels", (".png", ".tif", ".tiff"))
    if not images:
        raise InputError(f"{d / 'images'}: no images found")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise InputError(f"{d / 'labels'}: no label image for {len(missing)} image(s), e.g. {missing[0]}")
    pairs = []
    for stem, p in images.items():
        img = to_rgb_uint8(_read(p), str(p))
        lab = _read(labels[stem])
        if lab.ndim != 2:
            raise InputError(f"{labels[stem]}: label image must be single-channel, got shape {lab.shape}")
        if lab.shape != img.shape[:2]:
            raise InputError(f"{labels[stem]}: size {lab.shape} differs from its image {img.shape[:2]}")
        pairs.append((img, lab.astype(np.int32)))
    return pairs


def random_crop(rng: np.random.Generator, size: int, *arrays: np.ndarray) -> list[np.ndarray]:
    """The same random ``size x size`` window of every array (zero-padded first when smaller)."""
    h, w = arrays[0].shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        arrays = tuple(np.pad(a, ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2)) for a in arrays)
        h, w = h + ph, w + pw
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return [a[y:y + size, x:x + size] for a in arrays]


def augment(rng: np.random.Generator, flips: bool, rot90: bool, *arrays: np.ndarray) -> list[np.ndarray]:
    """The same random flips / 90-degree rotation applied to every ``(H, W, ...)`` array."""
    out = list(arrays)
    if flips:
        if rng.random() < 0.5:
            out = [a[:, ::-1] for a in out]
        if rng.random() < 0.5:
            out = [a[::-1] for a in out]
    if rot90:
        k = int(rng.integers(0, 4))
        out = [np.rot90(a, k) for a in out]
    return [np.ascontiguousarray(a) for a in out]


def scale_jitter(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, s: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance labels zoomed by one factor drawn log-uniformly from ``[1/(1+s), 1+s]``.

    Nuclei of one hospital's slides differ in size from organ to organ (large vesicular prostate nuclei, small dense
    lymphocytes) more than one scanner's microns per pixel say; the zoom shows the detector each labelled image at
    other sizes. The image is resampled with area averaging when shrunk and bilinearly when enlarged, the labels by
    nearest neighbour (an instance too small to survive is dropped later by ``min_instance_px``). ``s`` 0 returns the
    inputs unchanged and draws nothing from ``rng``.
    """
    if s <= 0:
        return image, labels
    import cv2

    f = float(np.exp(rng.uniform(-np.log1p(s), np.log1p(s))))
    h, w = labels.shape
    size = (max(1, round(w * f)), max(1, round(h * f)))
    image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    labels = cv2.resize(np.ascontiguousarray(labels, np.int32), size, interpolation=cv2.INTER_NEAREST)
    return image, labels


#: the elongations :func:`stretch` draws from (log-uniformly): a round nucleus comes out 1.5-3 times as long as wide
STRETCH_RANGE = (1.5, 3.0)


def stretch(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, p: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """With probability ``p``, an image and its instance labels made ``e`` times as long as wide (``e`` drawn
    log-uniformly from :data:`STRETCH_RANGE`) at the same area: along a random axis a window ``1/sqrt(e)`` of the
    length is stretched back to the full length, and the other axis is squeezed to ``1/sqrt(e)`` of its own, so
    the crop comes out smaller along that axis (as a shrinking ``scale_jitter`` gives; the batch pads it) and every
    pixel of it comes from the input (no border to fill). Else (and always at ``p`` 0, drawing nothing from
    ``rng``) the inputs unchanged.

    The labelled nuclei the detector learns from are mostly round (BBBC039's, and the Kumar images' own: about one
    in fifteen is 2.5 times as long as wide, and it finds half of those); the long thin nuclei of fibroblasts and
    smooth muscle in stroma it misses (docs/precision.md, "Spindle nuclei"). A stretched crop shows it round nuclei
    made long and thin, in either direction once the 90-degree rotations of :func:`augment` follow; the image is
    resampled with area averaging where squeezed and linearly where stretched, the labels by nearest neighbour.
    """
    if p <= 0 or rng.random() >= p:
        return image, labels
    import cv2

    lo, hi = STRETCH_RANGE
    k = float(np.sqrt(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    axis = int(rng.integers(2))
    if axis == 1:  # work along the rows; transposed back at the end
        image, labels = image.swapaxes(0, 1), labels.swapaxes(0, 1)
    n, m = labels.shape
    keep = max(1, int(round(n / k)))
    start = int(rng.integers(0, n - keep + 1))
    image, labels = image[start:start + keep], labels[start:start + keep]
    width = max(1, int(round(m / k)))
    image = cv2.resize(cv2.resize(np.ascontiguousarray(image), (width, keep), interpolation=cv2.INTER_AREA),
                       (width, n), interpolation=cv2.INTER_LINEAR)
    labels = cv2.resize(np.ascontiguousarray(labels, np.int32), (width, n), interpolation=cv2.INTER_NEAREST)
    if axis == 1:
        image, labels = image.swapaxes(0, 1), labels.swapaxes(0, 1)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def stain_jitter(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """HED colour augmentation (Tellez et al. 2018) of an RGB uint8 image.

    The image is unmixed into haematoxylin, eosin and DAB optical densities (``skimage.color.rgb2hed``); each
    stain's density is scaled by a factor drawn from ``U(1 - sigma, 1 + sigma)`` and shifted by ``U(-sigma, sigma)``
    times 0.05 (about a fifth of a typical nucleus's haematoxylin density), then the image is mixed back. ``sigma``
    0 returns the image unchanged (and draws nothing from ``rng``).
    """
    if sigma <= 0:
        return image
    from skimage.color import hed2rgb, rgb2hed

    scale = rng.uniform(1 - sigma, 1 + sigma, 3)
    shift = rng.uniform(-sigma, sigma, 3) * 0.05
    hed = rgb2hed(image)
    rgb = hed2rgb(hed * scale + shift)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


#: :func:`rescan`'s JPEG qualities: drawn uniformly from this range (scanners write SVS tiles at about 70-90)
RESCAN_QUALITY = (60, 95)


def scanned_at_20x(image: np.ndarray, quality: int | None, rgb_jpeg: bool = False) -> np.ndarray:
    """An RGB uint8 image of a 40x scan as a 20x scanner gives it to ``wsiseg run``: area-averaged to half its size,
    JPEG-compressed at ``quality`` (None: not compressed), and brought back to its size bilinearly, as the reader
    brings a 20x slide to the model's scale. The JPEG is the usual one (YCbCr, chroma at half resolution each way:
    what most encoders write), or with ``rgb_jpeg`` the R, G and B planes each at full resolution, as Aperio's SVS
    tiles are stored (their SOF lists three components sampled 1x1, no YCbCr conversion)."""
    import cv2

    h, w = image.shape[:2]
    small = cv2.resize(np.ascontiguousarray(image), (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    if quality is not None and rgb_jpeg:
        import imagecodecs

        enc = imagecodecs.jpeg8_encode(np.ascontiguousarray(small), level=int(quality), colorspace="RGB",
                                       outcolorspace="RGB", subsampling="444")
        small = imagecodecs.jpeg8_decode(enc, colorspace="RGB", outcolorspace="RGB")
    elif quality is not None:
        _, enc = cv2.imencode(".jpg", np.ascontiguousarray(small[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        small = cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1]
    return cv2.resize(np.ascontiguousarray(small), (w, h), interpolation=cv2.INTER_LINEAR)


def rescan(rng: np.random.Generator, image: np.ndarray, p: float) -> np.ndarray:
    """With probability ``p``, an RGB uint8 image :func:`scanned_at_20x` at a JPEG quality drawn from
    :data:`RESCAN_QUALITY`; the labels are unchanged. The Kumar images are 40x scans, and a 20x scanner's JPEG
    blocks are 16 px at the model's scale (what they cost the bundled model: docs/precision.md, "Another lab's stain
    and scanner"). ``p`` 0 returns the image unchanged and draws nothing from ``rng``."""
    if p <= 0 or rng.random() >= p:
        return image
    return scanned_at_20x(image, int(rng.integers(RESCAN_QUALITY[0], RESCAN_QUALITY[1] + 1)))


def vesicular(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, p: float, min_px: int = 150
              ) -> np.ndarray:
    """Some labelled nuclei redrawn as vesicular ones: a pale interior inside a dark rim, the label unchanged.

    Large vesicular nuclei (prostate, many carcinomas) show their chromatin as a thin dark rim around a pale
    interior; a detector that has only seen solid nuclei (BBBC039's, translated, and the watershed's labels) cuts
    them into their dark clumps. Each nucleus of at least ``min_px`` pixels is chosen with probability ``p``; inside
    it, the optical density (``-log`` of the RGB transmission, all three channels alike, so that hue and chromatin
    texture stay) is scaled down by a factor drawn from ``U(0.25, 0.5)``, fully from a rim of ``U(2, 4)`` px inward
    (a 2 px ramp), measured from the nucleus' own border (``cv2.distanceTransform``; a touching neighbour's border
    counts). Vectorised over the nuclei. ``p`` 0 returns the image unchanged and draws nothing from ``rng``.
    """
    if p <= 0:
        return image
    import cv2

    n = int(labels.max())
    if n == 0:
        return image
    area = np.bincount(labels.ravel(), minlength=n + 1)
    chosen = (rng.random(n + 1) < p) & (area >= min_px)
    chosen[0] = False
    thin = rng.uniform(0.25, 0.5, n + 1)  # the interior's density factor, per nucleus
    rim = float(rng.uniform(2.0, 4.0))
    if not chosen.any():
        return image
    from skimage.segmentation import find_boundaries

    inside = chosen[labels]
    border = find_boundaries(labels, connectivity=1, mode="thick")  # pixels whose 4-neighbour has another label
    dist = cv2.distanceTransform((inside & ~border).astype(np.uint8), cv2.DIST_L2, 3)
    ramp = np.clip((dist - rim) / 2.0, 0.0, 1.0)  # 0 on the rim, 1 two pixels further in
    factor = 1.0 - ramp * (1.0 - thin[labels])
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    out = 256.0 * np.exp(-od * factor[..., None]) - 1.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def touching(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, p: float, copies: int = 3,
             min_px: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """With probability ``p``, copies of the crop's own single-looking nuclei pasted against others: touching
    nuclei with the boundary between them labelled (a copy-paste augmentation, Ghiasi et al. 2021).

    On dense H&E the network draws one outline over two or three touching nuclei (docs/precision.md, "the merged
    nuclei"), and neither BBBC039's sparse nuclei nor a teacher that merges them shows it where one nucleus ends.
    Donors are the crop's nuclei of at least ``min_px`` pixels that look like one nucleus (solidity >= 0.9, area
    within 0.5-2x the crop's median) and lie wholly inside it; each of up to ``copies`` pastes takes a donor (its
    pixels, mirrored at random), and an anchor nucleus, and places the copy's centroid at 0.8-1x the sum of their
    equivalent radii from the anchor's, in a random direction, on top (its border pixels blended half and half with
    what is under them). A paste that would leave the crop, or cover more than 30% of any nucleus, is skipped.
    The labels gain one instance per paste. ``p`` 0 returns the crop unchanged and draws nothing from ``rng``.
    """
    if p <= 0 or rng.random() >= p:
        return image, labels
    from scipy.ndimage import binary_erosion
    from skimage.measure import regionprops

    labels = np.asarray(labels).astype(np.int32)
    props = [r for r in regionprops(labels) if r.area >= min_px]
    if len(props) < 2:
        return image, labels
    h, w = labels.shape
    median = float(np.median([r.area for r in props]))
    donors = [r for r in props if r.solidity >= 0.9 and 0.5 * median <= r.area <= 2 * median
              and r.bbox[0] > 0 and r.bbox[1] > 0 and r.bbox[2] < h and r.bbox[3] < w]
    if not donors:
        return image, labels
    src, image = image, image.copy()
    for _ in range(copies):
        d, a = donors[int(rng.integers(len(donors)))], props[int(rng.integers(len(props)))]
        flip = rng.random(2) < 0.5
        angle = rng.uniform(0, 2 * np.pi)
        reach = (np.sqrt(a.area / np.pi) + np.sqrt(d.area / np.pi)) * rng.uniform(0.8, 1.0)
        if a.label == d.label:
            continue
        mask, rgb = d.image, src[d.slice]
        cy, cx = d.centroid_local
        if flip[0]:
            mask, rgb, cy = mask[::-1], rgb[::-1], mask.shape[0] - 1 - cy
        if flip[1]:
            mask, rgb, cx = mask[:, ::-1], rgb[:, ::-1], mask.shape[1] - 1 - cx
        y0 = int(round(a.centroid[0] + reach * np.sin(angle) - cy))
        x0 = int(round(a.centroid[1] + reach * np.cos(angle) - cx))
        if y0 < 0 or x0 < 0 or y0 + mask.shape[0] > h or x0 + mask.shape[1] > w:
            continue
        win = np.s_[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        under = labels[win][mask]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        if ids.size and np.any(counts > 0.3 * np.bincount(labels.ravel())[ids]):
            continue
        alpha = np.where(binary_erosion(mask), 1.0, np.where(mask, 0.5, 0.0)).astype(np.float32)[..., None]
        image[win] = (alpha * rgb + (1 - alpha) * image[win] + 0.5).astype(np.uint8)
        labels[win] = np.where(mask, labels.max() + 1, labels[win])
    return image, labels


def targets_from_labels(labels: np.ndarray, min_px: int = 1) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets from an instance label image, vectorised (no per-instance Python loop).

    ``boxes``: float ``(n, 4)`` xyxy in pixel-edge coordinates (``x2 = last column + 1``), ``labels``: int64 ones,
    ``masks``: uint8 ``(n, H, W)``; instances with fewer than ``min_px`` pixels are left out.
    """
    lab = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
    ids, counts = torch.unique(lab, return_counts=True)
    ids = ids[(ids > 0) & (counts >= min_px)]
    h, w = lab.shape
    if ids.numel() == 0:
        return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros((0, h, w), dtype=torch.uint8)}
    masks = lab[None] == ids[:, None, None]
    rows, cols = masks.any(2), masks.any(1)  # (n, H), (n, W)
    y1 = rows.float().argmax(1)
    y2 = h - rows.flip(1).float().argmax(1)
    x1 = cols.float().argmax(1)
    x2 = w - cols.flip(1).float().argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return {"boxes": boxes, "labels": torch.ones(len(ids), dtype=torch.int64), "masks": masks.to(torch.uint8)}


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float().div_(255.0)


def _digest(items: Sequence, pairs: bool) -> str:
    h = hashlib.sha1()
    for it in items:
        for a in (it if pairs else (it,)):
            a = np.ascontiguousarray(a)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def predict_labels(model: PDAM, image: np.ndarray, device: torch.device, mask_thresh: float | None = None,
                   chunk: int = 64) -> np.ndarray:
    """The model's stock eval output (:func:`~wsiseg.segmenters.postprocess.stock_predict`) on one uint8 RGB image as an
    int32 label image (higher scores win overlaps)."""
    was_training = model.training
    model.eval()
    thr = model.cfg.roi.mask_thresh if mask_thresh is None else mask_thresh
    out = stock_predict(model, [_to_tensor(image, device)])[0]
    model.train(was_training)
    masks = out["masks"]  # (N, 1, H, W), sorted by decreasing score
    h, w = image.shape[:2]
    best = torch.zeros((h, w), dtype=torch.int64, device=masks.device)
    n = masks.shape[0]
    for s in range(0, n, chunk):  # rank n - i for instance i: the max rank is the highest score
        m = masks[s:s + chunk, 0] > thr
        rank = torch.arange(n - s, n - s - m.shape[0], -1, device=m.device)[:, None, None]
        best = torch.maximum(best, (m * rank).amax(0))
    labels = torch.where(best > 0, n - best + 1, torch.zeros_like(best))
    return labels.to(torch.int32).cpu().numpy()


def evaluate(model: PDAM, val: Sequence[tuple[np.ndarray, np.ndarray]], device: torch.device) -> dict[str, float]:
    """Mean object F1, pixel F1 and AJI (``wsiseg.eval.metrics``) of whole-image predictions on ``val`` pairs."""
    from ..eval.metrics import evaluate_pair

    keys = ("object_f1", "pixel_f1", "aji")
    sums = dict.fromkeys(keys, 0.0)
    for img, lab in val:
        s = evaluate_pair(predict_labels(model, to_rgb_uint8(img), device), np.asarray(lab).astype(np.int32))
        for k in keys:
            sums[k] += float(s[k])
    return {k: v / max(len(val), 1) for k, v in sums.items()}


def _negative_crop(rng: np.random.Generator, cfg: TrainConfig, negatives: Sequence[np.ndarray],
                   tissue: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One crop that holds no nucleus and its empty labels: with probability ``negative_eosin`` a crop of
    ``tissue`` with its haematoxylin taken out, else a crop of ``negatives`` (half the time, when there are any)
    or synthetic glass."""
    if cfg.negative_eosin > 0 and rng.random() < cfg.negative_eosin:
        (img,) = random_crop(rng, cfg.crop_size, tissue[int(rng.integers(len(tissue)))][0])
        (img,) = augment(rng, cfg.flips, cfg.rot90, img)
        img = without_haematoxylin(img)
    elif negatives and rng.random() < 0.5:
        (img,) = random_crop(rng, cfg.crop_size, negatives[int(rng.integers(len(negatives)))])
        (img,) = augment(rng, cfg.flips, cfg.rot90, img)
    else:
        img = glass(rng, cfg.crop_size)
    return img, np.zeros(img.shape[:2], np.int32)


# ---------------------------------------------------------------------------------------------- resume state
def _save_state(out: Path, model: PDAM, model_cfg: PDAMConfig, cfg: TrainConfig, opt: torch.optim.Optimizer,
                rng: np.random.Generator, it: int, meta: dict) -> None:
    from safetensors.torch import save_file

    from ..core.atomic import replacing

    save_checkpoint(out / "last.safetensors", model, config=to_dict(model_cfg), mpp=model_cfg.mpp,
                    meta={**meta, "iteration": it})
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    state = {"iteration": it, "model": to_dict(model_cfg), "train": to_dict(cfg), "param_groups": sd["param_groups"],
             "opt_scalars": scalars, "rng_numpy": rng.bit_generator.state}
    with replacing(out / "last.state.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with replacing(out / "last.state.json") as tmp:
        tmp.write_text(json.dumps(state))


def _load_state(out: Path, model: PDAM, model_cfg: PDAMConfig, cfg: TrainConfig, opt: torch.optim.Optimizer,
                rng: np.random.Generator) -> int:
    from safetensors.torch import load_file

    sp = out / "last.state.json"
    state = json.loads(sp.read_text())
    # a train setting added since the run started (e.g. cpu_bf16) counts as its default
    state["train"] = {**to_dict(TrainConfig()), **state.get("train", {})}
    for key, now in (("model", to_dict(model_cfg)), ("train", to_dict(cfg))):
        if state.get(key) != now:
            raise ConfigError(f"{sp}: this run was started with a different {key} config; "
                              "use another output directory or resume=False")
    ck = load_checkpoint(out / "last.safetensors", arch=model.arch)
    try:
        model.load_state_dict(ck.state_dict, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{out / 'last.safetensors'}: does not fit the model ({str(e).splitlines()[0]})") from None
    tensors = load_file(str(out / "last.state.safetensors"))
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for idx, d in state["opt_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(d)
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    rng.bit_generator.state = state["rng_numpy"]
    return int(state["iteration"])


# ------------------------------------------------------------------------------------------------------ train
@dataclass
class TrainData:
    """The images a PDAM training run learns from (see :func:`train`).

    ``source``: labelled images ``(image, labels)``; ``target``: unlabelled target images (None or empty:
    supervised-only); ``val``: labelled images scored during training; ``pseudo``: pseudo-labelled target tiles;
    ``negatives``: images that hold no nucleus."""

    source: Sequence[tuple[np.ndarray, np.ndarray]]
    target: Sequence[np.ndarray] | None = None
    val: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
    pseudo: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
    negatives: Sequence[np.ndarray] | None = None


def train(model_cfg: PDAMConfig, train_cfg: TrainConfig, data: TrainData, out_dir: str | os.PathLike, *,
          resume: bool = True, device: str | torch.device = "auto", progress: bool = True,
          stop_at: int | None = None) -> Path:
    """Train PDAM on ``data`` and return the path of ``out_dir/final.safetensors``.

    ``resume``: continue from ``out_dir/last.*`` when present (same configs required). ``stop_at``: stop (with a
    resume checkpoint) after that many iterations and return ``out_dir/last.safetensors`` instead - for time-boxed
    jobs; a later call finishes the run. ``data.target`` None or empty: supervised-only. ``data.pseudo``:
    pseudo-labelled target tiles (image, labels); each labelled crop is drawn from them with probability
    ``pseudo_fraction`` (and from ``source`` otherwise), and is trained on exactly like a source crop.
    ``data.negatives``: images that hold no nucleus (the target slides' glass); with ``negative_fraction`` > 0 that share
    of labelled crops is empty: ``negative_eosin`` of them tissue crops (pseudo-labelled tiles when used, else
    source) without haematoxylin (:func:`wsiseg.train.negatives.without_haematoxylin`), the rest glass, half of it from
    ``negatives`` when given and the rest synthetic (:func:`wsiseg.train.negatives.glass`); ``white_out`` cuts glass
    holes into labelled crops (:func:`wsiseg.train.negatives.white_out`), ``gaps`` nucleus-sized pale gaps away from
    their nuclei (:func:`wsiseg.train.negatives.gaps`); ``ink`` paints marking dye on labelled and negative crops
    (:func:`wsiseg.train.negatives.ink`). Each draws nothing from the run's generator when 0.
    """
    model_cfg.validate()
    train_cfg.validate()
    if not data.source:
        raise InputError("train: no source images")
    cfg = train_cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    crops = _Crops.of(data, cfg)
    torch.manual_seed(cfg.seed)
    model = _initial_model(model_cfg, cfg, dev, crops.adapt)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(cfg, params)
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    meta = _run_meta(cfg, dev, crops, data.val)
    start = 0
    if resume and (out / "last.state.json").is_file():
        start = _load_state(out, model, model_cfg, cfg, opt, rng)
    log = open(out / "log.jsonl", "a")
    autocast = (dev.type == "cuda" and cfg.amp) or (dev.type == "cpu" and cfg.cpu_bf16)
    val, val_scores = data.val, {}
    end = cfg.iterations if stop_at is None else min(cfg.iterations, stop_at)
    bar = _TrainBar(cfg.iterations, start) if progress and start < end else None
    try:
        t0 = time.perf_counter()
        for it in range(start, end):
            lr = lr_at(cfg, it)
            for g in opt.param_groups:
                g["lr"] = lr
            src_imgs, src_tgts = crops.labelled(rng, cfg, dev)
            tgt_imgs = crops.unlabelled(rng, cfg, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                losses = model.forward_train(src_imgs, src_tgts, tgt_imgs, progress=it / cfg.iterations)
            finite = _step(losses["loss"], opt, params, cfg.grad_clip)
            done = it + 1
            if done % cfg.log_every == 0 or done == end or not finite:
                rec = {"iter": done, "lr": lr, "finite": finite, "s_per_it": (time.perf_counter() - t0) / (done - start)}
                rec.update({k: round(float(v.detach()), 5) for k, v in losses.items()})
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if bar is not None:
                bar.update(done, losses)
            if val and done % cfg.val_every == 0:
                val_scores = evaluate(model, val, dev)
                log.write(json.dumps({"iter": done, "val": val_scores}) + "\n")
                log.flush()
            if done % cfg.checkpoint_every == 0 or done == end:
                _save_state(out, model, model_cfg, cfg, opt, rng, done, meta)
    finally:
        if bar is not None:
            bar.stop()
    if end < cfg.iterations:
        log.close()
        return out / "last.safetensors"
    if val and not val_scores:
        val_scores = evaluate(model, val, dev)
        log.write(json.dumps({"iter": cfg.iterations, "val": val_scores}) + "\n")
    log.close()
    final = out / "final.safetensors"
    save_checkpoint(final, model, config=to_dict(model_cfg), mpp=model_cfg.mpp,
                    meta={**meta, "iteration": cfg.iterations, "val": val_scores})
    return final


@dataclass
class _Crops:
    """What a training run draws its crops from (:func:`train`): the data as RGB uint8, and whether the
    pseudo-labelled tiles and the target images are used."""

    source: list[tuple[np.ndarray, np.ndarray]]
    target: list[np.ndarray]
    pseudo: list[tuple[np.ndarray, np.ndarray]]
    negatives: list[np.ndarray]
    use_pseudo: bool
    adapt: bool

    @classmethod
    def of(cls, data: "TrainData", cfg: TrainConfig) -> "_Crops":
        source = [(to_rgb_uint8(img, f"source[{i}]"), np.asarray(lab)) for i, (img, lab) in enumerate(data.source)]
        target = [to_rgb_uint8(t, f"target[{i}]") for i, t in enumerate(data.target or [])]
        pseudo = [(to_rgb_uint8(img, f"pseudo[{i}]"), np.asarray(lab))
                  for i, (img, lab) in enumerate(data.pseudo or [])]
        negatives = [to_rgb_uint8(img, f"negatives[{i}]") for i, img in enumerate(data.negatives or [])]
        return cls(source, target, pseudo, negatives, bool(pseudo) and cfg.pseudo_fraction > 0,
                   bool(target) and cfg.target_batch > 0)

    def labelled(self, rng: np.random.Generator, cfg: TrainConfig,
                 dev: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
        """One batch of labelled crops (``source_batch``) and their targets: empty ones (``negative_fraction``),
        else a source or pseudo-labelled crop, scaled, cropped, stretched, flipped, given pale interiors, touching
        copies of its nuclei, glass holes and pale gaps as ``cfg`` says; all stain-jittered, then given marking dye
        and seen as a 20x scanner's JPEG (:func:`rescan`) as ``cfg`` says."""
        imgs, tgts = [], []
        for _ in range(cfg.source_batch):
            if cfg.negative_fraction > 0 and rng.random() < cfg.negative_fraction:
                img, lab = _negative_crop(rng, cfg, self.negatives, self.pseudo if self.use_pseudo else self.source)
            else:
                pool = self.pseudo if self.use_pseudo and rng.random() < cfg.pseudo_fraction else self.source
                img, lab = pool[int(rng.integers(len(pool)))]
                img, lab = scale_jitter(rng, img, lab, cfg.scale_jitter)
                # a shrunk image smaller than the crop is used whole (not zero-padded: the batch pads it)
                img, lab = random_crop(rng, min(cfg.crop_size, *lab.shape) if cfg.scale_jitter else cfg.crop_size,
                                       img, lab)
                img, lab = stretch(rng, img, lab, cfg.stretch)
                img, lab = augment(rng, cfg.flips, cfg.rot90, img, lab)
                img = vesicular(rng, img, lab, cfg.vesicular)
                img, lab = touching(rng, img, lab, cfg.touching, cfg.touching_copies)
                if cfg.white_out > 0 and rng.random() < cfg.white_out:
                    img, lab = white_out(rng, img, lab)
                if cfg.gaps > 0 and rng.random() < cfg.gaps:
                    img, lab = gaps(rng, img, lab)
            img = stain_jitter(rng, img, cfg.stain_jitter)
            if cfg.ink > 0 and rng.random() < cfg.ink:  # after the stain jitter, which would turn dye stain-coloured
                img, lab = ink(rng, img, lab)
            img = rescan(rng, img, cfg.scan20)  # last: the scanner sees the stained, inked slide
            imgs.append(_to_tensor(img, dev))
            tgts.append({k: v.to(dev) for k, v in targets_from_labels(lab, cfg.min_instance_px).items()})
        return imgs, tgts

    def unlabelled(self, rng: np.random.Generator, cfg: TrainConfig, dev: torch.device) -> list[torch.Tensor] | None:
        """One batch of target crops (``target_batch``) for the domain discriminators; None without adaptation."""
        if not self.adapt:
            return None
        imgs = []
        for _ in range(cfg.target_batch):
            (img,) = random_crop(rng, cfg.crop_size, self.target[int(rng.integers(len(self.target)))])
            (img,) = augment(rng, cfg.flips, cfg.rot90, img)
            imgs.append(_to_tensor(img, dev))
        return imgs


def _initial_model(model_cfg: PDAMConfig, cfg: TrainConfig, dev: torch.device, adapt: bool) -> PDAM:
    """The model to train, on ``dev``: built from ``model_cfg``, then ``cfg.init``'s weights when given."""
    model = build_pdam(model_cfg).to(dev)
    if cfg.init:  # every tensor of the model, training-only modules included (an inference-only export is refused
        # when they are trained: without target images the discriminators are unused, so an export will do)
        from ..models.checkpoint import load_weights
        from ..models.pdam import ARCH

        init = load_checkpoint(cfg.init, arch=ARCH)
        if adapt:
            init.excluded = []
        load_weights(model, init, cfg.init, "the model of this run (train.init)")
        del init
    return model


def _optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _run_meta(cfg: TrainConfig, dev: torch.device, crops: _Crops, val: Sequence | None) -> dict:
    """The checkpoints' record of the run: command, seed, settings, device, torch, and what the data was."""
    meta = {"command": " ".join(sys.argv), "seed": cfg.seed, "train": to_dict(cfg), "device": str(dev),
            "torch": torch.__version__,
            "data": {"source_images": len(crops.source), "target_images": len(crops.target),
                     "val_images": len(val or []), "source_sha1": _digest(crops.source, True),
                     "target_sha1": _digest(crops.target, False)}}
    if crops.use_pseudo:
        meta["data"].update(pseudo_images=len(crops.pseudo), pseudo_sha1=_digest(crops.pseudo, True))
    if crops.negatives and cfg.negative_fraction > 0:
        meta["data"].update(negative_images=len(crops.negatives), negative_sha1=_digest(crops.negatives, False))
    return meta


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grad_clip: float) -> bool:
    """One optimiser step on ``loss`` (gradients clipped to ``grad_clip`` when > 0); skipped, and False returned,
    when the loss is not finite."""
    opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if finite:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
    return finite


class _TrainBar:
    """The training progress bar on stderr: iterations done of ``total``, the loss and the adaptation's terms."""

    def __init__(self, total: int, start: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]PDAM"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), transient=False, console=Console(stderr=True))
        self.bar.start()
        self.task = self.bar.add_task("", total=total, completed=start)

    def update(self, done: int, losses: dict[str, torch.Tensor]) -> None:
        self.bar.update(self.task, completed=done, description=" ".join(
            f"{k.replace('loss_', '')}={float(v.detach()):.3f}" for k, v in losses.items()
            if k == "loss" or k.startswith("loss_da") or k.startswith("w_")))

    def stop(self) -> None:
        self.bar.stop()


__all__ = ["TrainConfig", "RunConfig", "load_run_config", "lr_at", "train", "evaluate", "predict_labels",
           "targets_from_labels", "stain_jitter", "scale_jitter", "rescan", "scanned_at_20x", "vesicular", "touching",
           "load_pair_dir", "load_image_dir", "to_rgb_uint8", "random_crop", "augment"]
