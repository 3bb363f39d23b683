"""Stage 1 of ``wsiseg adapt``: labelled source crops from BBBC039 (paper section 4.2).

Entry point: :func:`prepare_source`. It reads BBBC039 in its original layout (``images/<stem>.tif`` uint16 12-bit,
``masks/<stem>.png`` RGBA colour-coded, ``splits/<split>.txt``) and writes

* ``out_dir/images/<iiiii>.png``: RGB uint8, the grey value repeated in the three channels, **inverted** (bright
  background, dark nuclei, as in H&E), 256x256 by default;
* ``out_dir/labels/<iiiii>.png``: uint16 instance labels, contiguous ``1..n`` (0 = background), pixel-aligned;
* ``out_dir/source.yaml``: the config, the split and the stems used.

Guarantees:

* Normalisation to 0..255 is **per image**: the ``norm_percentiles`` (default 0.1 and 99.9) of the raw 12-bit
  values are mapped to 0 and 255 and the rest clipped. (Fixed 12-bit scaling would leave most images below 80/255,
  as their nuclei rarely exceed ~1,300 of 4,095.) ``normalise="12bit"`` uses ``x * 255 / 4095`` instead.
* Each training crop is an affine warp of one image (uniform rotation in [0, 360) degrees when ``rotation``, a zoom
  drawn log-uniformly from ``scale_range``, then a random horizontal and vertical flip when ``flips``), applied
  identically to the image (bilinear) and to the labels (nearest). The crop's footprint always lies inside the image
  (no padding); if a zoom is too small for that, it is raised to the smallest that fits.
* After warping, fragments smaller than ``min_area`` pixels are dropped and the labels relabelled ``1..n``; a crop is
  kept only if ``n >= min_nuclei`` (otherwise another is drawn, up to ``max_tries`` times for the same index).
* Crop ``i`` depends only on ``(seed, split, i)`` and the data, so a run is resumable: indices whose two files exist
  are skipped, and a rerun yields byte-identical files. Files are written atomically (temporary name + rename).
* With ``val_crops == 0`` (the default) any split other than ``train`` is written as whole images (no augmentation,
  no nuclei filter), as the paper transfers the 50 validation images whole; ``val_crops > 0`` writes that many crops
  with the training rules instead.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from skimage.measure import label as cc_label
from skimage.segmentation import relabel_sequential

from ..core.atomic import write_png
from ..core.errors import ConfigError, InputError, OutputError
from ..models.config import save_yaml


@dataclass
class SourceConfig:
    """Every knob of the source preparation (section 4.2 of the paper)."""

    n_crops: int = 10000  # crops kept for the train split (after the nuclei filter)
    val_crops: int = 0  # 0: other splits are written as whole images; > 0: that many crops
    crop: int = 256
    scale_range: tuple[float, float] = (0.8, 1.25)  # zoom (output px per source px), drawn log-uniformly
    rotation: bool = True  # uniform angle in [0, 360)
    flips: bool = True  # random horizontal and vertical flips
    min_nuclei: int = 3
    min_area: int = 8  # fragments smaller than this (px, after warping) are dropped
    normalise: str = "percentile"  # "percentile" (per image) or "12bit"
    norm_percentiles: tuple[float, float] = (0.1, 99.9)
    invert: bool = True
    seed: int = 0
    max_tries: int = 100

    def validate(self) -> None:
        if self.n_crops < 1 or self.val_crops < 0:
            raise ConfigError(f"source: n_crops must be >= 1 and val_crops >= 0 (got {self.n_crops}, {self.val_crops})")
        if self.crop < 16 or self.crop % 4:
            raise ConfigError(f"source.crop: must be a multiple of 4 and >= 16 (got {self.crop})")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"source.scale_range: need 0 < low <= high (got {self.scale_range})")
        if self.normalise not in ("percentile", "12bit"):
            raise ConfigError(f"source.normalise: 'percentile' or '12bit' (got {self.normalise!r})")
        plo, phi = self.norm_percentiles
        if not 0 <= plo < phi <= 100:
            raise ConfigError(f"source.norm_percentiles: need 0 <= low < high <= 100 (got {self.norm_percentiles})")
        if self.min_nuclei < 0 or self.min_area < 0 or self.max_tries < 1:
            raise ConfigError("source: min_nuclei, min_area must be >= 0 and max_tries >= 1")

    def __post_init__(self) -> None:
        self.validate()


# --------------------------------------------------------------------------------------------------- reading


def decode_bbbc_mask(path: str | Path) -> np.ndarray:
    """BBBC039 colour-coded mask -> int32 instance labels ``1..n`` (0 = background).

    The red channel holds 0..3; instances are the 4-connected components of ``R == v`` for v in 1..3 (this gives
    the dataset's published total of 23,617 nuclei).
    """
    p = Path(path)
    m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise InputError(f"{p}: not a readable PNG mask")
    red = m if m.ndim == 2 else m[..., 2]  # OpenCV gives BGR(A)
    out = np.zeros(red.shape, np.int32)
    n = 0
    for v in (1, 2, 3):
        lab, k = cc_label(red == v, connectivity=1, return_num=True)
        if k:
            out[lab > 0] = lab[lab > 0] + n
            n += k
    return out


def read_bbbc_image(path: str | Path, cfg: SourceConfig) -> np.ndarray:
    """A BBBC039 uint16 TIFF normalised to float32 0..255 (not inverted), as documented in the module."""
    p = Path(path)
    try:
        im = tifffile.imread(p).astype(np.float32)
    except Exception as e:  # noqa: BLE001 - any reader failure is a user-facing input problem
        raise InputError(f"{p}: not a readable TIFF ({e})") from None
    if im.ndim != 2:
        raise InputError(f"{p}: expected a single-channel image, got shape {im.shape}")
    if cfg.normalise == "12bit":
        lo, hi = 0.0, 4095.0
    else:
        lo, hi = (float(v) for v in np.percentile(im, cfg.norm_percentiles))
        if hi <= lo:
            hi = lo + 1.0
    return np.clip((im - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.float32)


def split_stems(bbbc_dir: Path, split: str) -> list[str]:
    """Stems listed in ``splits/<split>.txt`` (``.png``/``.tif`` suffixes stripped), checked to exist."""
    f = bbbc_dir / "splits" / f"{split}.txt"
    if not f.is_file():
        raise InputError(f"{f}: split file not found (BBBC039 layout: images/, masks/, splits/)")
    stems = [Path(s.strip()).stem for s in f.read_text().splitlines() if s.strip()]
    if not stems:
        raise InputError(f"{f}: lists no image")
    for s in stems:
        for sub, ext in (("images", ".tif"), ("masks", ".png")):
            if not (bbbc_dir / sub / f"{s}{ext}").is_file():
                raise InputError(f"{bbbc_dir / sub / (s + ext)}: listed in {f.name} but missing")
    return stems


# --------------------------------------------------------------------------------------------------- cropping


def _rng(seed: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), i])


def _finish(img: np.ndarray, lab: np.ndarray, cfg: SourceConfig) -> tuple[np.ndarray, np.ndarray, int]:
    if cfg.min_area > 1 and lab.max() > 0:
        area = np.bincount(lab.ravel())
        small = area < cfg.min_area
        small[0] = False
        if small.any():
            lab = np.where(small[lab], 0, lab)
    lab, _, _ = relabel_sequential(lab)
    n = int(lab.max())
    g = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if cfg.invert:
        g = 255 - g
    return np.repeat(g[..., None], 3, axis=2), lab.astype(np.uint16), n


def random_crop(
    img: np.ndarray, lab: np.ndarray, cfg: SourceConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """One augmented crop: (RGB uint8 inverted, uint16 labels 1..n, n). See the module docstring for the rules."""
    h, w = img.shape
    c = cfg.crop
    lo, hi = cfg.scale_range
    zoom = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    theta = rng.uniform(0.0, 2 * math.pi) if cfg.rotation else 0.0
    ca, sa = abs(math.cos(theta)), abs(math.sin(theta))
    foot_w, foot_h = c * (ca + sa), c * (sa + ca)  # square crop: the rotated footprint's bounding box, in output px
    zoom = max(zoom, foot_w / (w - 2), foot_h / (h - 2))
    half_w, half_h = foot_w / zoom / 2, foot_h / zoom / 2
    # whole-pixel centres: without rotation and zoom the crop is then an exact window of the image
    cx = float(np.clip(round(rng.uniform(half_w, w - half_w)), math.ceil(half_w), math.floor(w - half_w)))
    cy = float(np.clip(round(rng.uniform(half_h, h - half_h)), math.ceil(half_h), math.floor(h - half_h)))
    # Forward map source -> output: rotate by theta and scale by zoom about (cx, cy), centre at (c/2, c/2).
    m = cv2.getRotationMatrix2D((cx, cy), math.degrees(theta), zoom)
    m[0, 2] += c / 2 - cx
    m[1, 2] += c / 2 - cy
    out_img = cv2.warpAffine(img, m, (c, c), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    out_lab = cv2.warpAffine(
        lab.astype(np.float32), m, (c, c), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    ).astype(np.int32)
    if cfg.flips:
        if rng.random() < 0.5:
            out_img, out_lab = out_img[:, ::-1], out_lab[:, ::-1]
        if rng.random() < 0.5:
            out_img, out_lab = out_img[::-1], out_lab[::-1]
    return _finish(np.ascontiguousarray(out_img), np.ascontiguousarray(out_lab), cfg)


_write_png = write_png


def prepare_source(
    bbbc_dir: str | Path,
    out_dir: str | Path,
    cfg: SourceConfig | None = None,
    split: str = "train",
    progress: bool = True,
) -> Path:
    """Write the source crops (or whole images) of ``split`` to ``out_dir``; returns ``out_dir``.

    Resumable and idempotent: existing outputs are kept, missing ones written. See the module docstring.
    """
    cfg = cfg or SourceConfig()
    bbbc_dir, out_dir = Path(bbbc_dir), Path(out_dir)
    if not bbbc_dir.is_dir():
        raise InputError(f"{bbbc_dir}: BBBC039 directory not found")
    stems = split_stems(bbbc_dir, split)
    whole = split != "train" and cfg.val_crops == 0
    n_out = len(stems) if whole else (cfg.n_crops if split == "train" else cfg.val_crops)
    try:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create ({e.strerror})") from None
    save_yaml(cfg, out_dir / "source.yaml")
    with open(out_dir / "source.yaml", "a") as f:
        f.write(f"# split: {split} ({'whole images' if whole else f'{n_out} crops'})\n")
        f.write("".join(f"# stem: {s}\n" for s in stems))

    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def load(stem: str) -> tuple[np.ndarray, np.ndarray]:
        if stem not in cache:
            cache[stem] = (
                read_bbbc_image(bbbc_dir / "images" / f"{stem}.tif", cfg),
                decode_bbbc_mask(bbbc_dir / "masks" / f"{stem}.png"),
            )
        return cache[stem]

    todo = [
        i
        for i in range(n_out)
        if not ((out_dir / "images" / f"{i:05d}.png").is_file() and (out_dir / "labels" / f"{i:05d}.png").is_file())
    ]
    it = todo
    if progress:
        from rich.progress import track

        it = track(todo, description=f"source {split}", total=len(todo))
    for i in it:
        if whole:
            img, lab = load(stems[i])
            rgb, lab16, _ = _finish(img, lab, cfg)
        else:
            rng = _rng(cfg.seed, split, i)
            for _ in range(cfg.max_tries):
                img, lab = load(stems[int(rng.integers(len(stems)))])
                rgb, lab16, n = random_crop(img, lab, cfg, rng)
                if n >= cfg.min_nuclei:
                    break
            else:
                raise InputError(
                    f"{bbbc_dir}: no crop with >= {cfg.min_nuclei} nuclei in {cfg.max_tries} tries (index {i})"
                )
        _write_png(out_dir / "images" / f"{i:05d}.png", rgb)
        _write_png(out_dir / "labels" / f"{i:05d}.png", lab16)
    return out_dir


def read_pair(images_png: Path, labels_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image and its int32 labels (same stem under ``labels_dir``), as written by this stage."""
    im = cv2.imread(str(images_png), cv2.IMREAD_COLOR)
    if im is None:
        raise InputError(f"{images_png}: not a readable image")
    lp = labels_dir / images_png.name
    lab = cv2.imread(str(lp), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise InputError(f"{lp}: labels missing or unreadable")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB), lab.astype(np.int32)
