"""Stain measurements of each nucleus: colour-deconvolution optical densities over its pixels, as QuPath names them.

Definition (QuPath's brightfield H&E defaults, ``qupath.lib.color``):

- optical density per RGB channel: ``OD = -log10(max(I, 1) / 255)`` (QuPath's ``ColorDeconvolutionHelper.makeOD``
  with its default background, 255 in every channel);
- unmixing with QuPath's default "H&E" stain vectors (``StainVector``: hematoxylin ``(0.65, 0.70, 0.29)``, eosin
  ``(0.2159, 0.8012, 0.5581)``, each normalised to unit length, so they read 0.651 0.701 0.290 and 0.216 0.801
  0.558; the third, residual vector is their normalised cross product): the rows of the stain matrix ``M``, and a
  pixel's stain amounts are ``OD @ inv(M)`` (hematoxylin, eosin, residual);
- per nucleus, the mean and the population standard deviation (over ``n``, not ``n - 1``) of the hematoxylin amount
  and the mean of the eosin amount over the nucleus' pixels.

GeoJSON names (:data:`MEASUREMENTS`): ``"Hematoxylin: Mean"``, ``"Hematoxylin: Std.Dev."``, ``"Eosin: Mean"``: the
names QuPath's "Add intensity features" (``IntensityFeaturesPlugin``) gives a detection's stain statistics, without
the prefix it adds for its region and resolution, so QuPath's classifiers and measurement tables treat them as its
own intensity features.

Where: a nucleus' pixels are known where a tile's RGB and its instance labels meet, right after the segmenter's
``predict``, so the statistics are those of the instance's mask in the tile the model saw, at the model's
resolution, before the stitcher trims a seam nucleus' overlap with a neighbour (:func:`stain_stats`; a run keeps
each tile's pixels with its instances, :func:`with_pixels`, and :func:`measure` fills them in where the tile is
prepared).

The same pixels guard against *holes* (:func:`drop_holes`): an instance clearly brighter than its surround, a white
gap in collagen or a fat cell that a model outlined, is left out there, before its measurements, as is an instance
on marking dye (:func:`drop_dye`: the green or teal ink painted on a specimen's margins); and, after them,
against outlines far fainter than the slide's nuclei (:func:`drop_faint`, against the slide's level of haematoxylin,
:func:`haematoxylin_level`). What a run knows of its slide's stain before it segments, read from a few of its tiles
(:func:`slide_stain`: that level, and the hue of its haematoxylin, which the dye band stays clear of), travels to
where the tiles are prepared as one :class:`SlideStain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from ..segmenters.base import TileInstances

#: QuPath's default stain vectors (before normalisation): ``StainVector.STAIN_HEMATOXYLIN_DEFAULT`` and
#: ``STAIN_EOSIN_DEFAULT``
HEMATOXYLIN = (0.65, 0.70, 0.29)
EOSIN = (0.2159, 0.8012, 0.5581)
#: QuPath's default background (white) value of every channel
BACKGROUND = 255.0
#: the GeoJSON measurement names of :func:`stain_stats`' columns, in order
MEASUREMENTS = ("Hematoxylin: Mean", "Hematoxylin: Std.Dev.", "Eosin: Mean")


def stain_matrix() -> np.ndarray:
    """(3, 3) float64: the unit stain vectors as rows: hematoxylin, eosin, residual (their normalised cross
    product)."""
    h = np.asarray(HEMATOXYLIN, np.float64)
    e = np.asarray(EOSIN, np.float64)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)])


#: stain amounts from optical densities: ``stains = od @ UNMIX`` (the inverse of :func:`stain_matrix`)
UNMIX = np.linalg.inv(stain_matrix())
#: the optical density of each 8-bit intensity
OD_LUT = -np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / BACKGROUND)
#: ``[channel, intensity, stain]``: what an intensity of a channel adds to each stain amount (:func:`unmix`'s terms)
_TERMS = OD_LUT[None, :, None] * UNMIX[:, None, :]
#: ``_TERMS[channel, :, stain]`` as contiguous tables, ``[stain][channel]``, for hematoxylin and eosin (``np.take`` on a
#: 1-D table is faster than indexing the 3-D one: measured in docs/speed.md)
_H_TERMS, _E_TERMS = ([np.ascontiguousarray(_TERMS[c, :, k]) for c in range(3)] for k in range(2))


def _amount(px: np.ndarray, terms: list[np.ndarray]) -> np.ndarray:
    """One stain's amount in each of the ``(n, 3)`` uint8 pixels ``px``, from its ``terms`` (:data:`_H_TERMS` or
    :data:`_E_TERMS`): ``unmix(optical_density(px))[:, stain]``, by table, summed in that order."""
    amount = terms[0].take(px[:, 0])
    amount += terms[1].take(px[:, 1])
    amount += terms[2].take(px[:, 2])
    return amount


def _haematoxylin(px: np.ndarray) -> np.ndarray:
    """The haematoxylin amount of each of the ``(n, 3)`` uint8 pixels ``px`` (what :func:`stain_stats` and
    :func:`haematoxylin_level` use)."""
    return _amount(px, _H_TERMS)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` float64 optical densities of ``(..., 3)`` uint8 RGB pixels."""
    return OD_LUT[np.asarray(rgb, np.uint8)]


def unmix(od: np.ndarray) -> np.ndarray:
    """``(..., 3)`` stain amounts (hematoxylin, eosin, residual) of ``(..., 3)`` optical densities: ``od @ UNMIX``,
    summed channel by channel (the order :func:`stain_stats` sums in, so the two agree bit for bit)."""
    od = np.asarray(od, np.float64)
    return od[..., 0, None] * UNMIX[0] + od[..., 1, None] * UNMIX[1] + od[..., 2, None] * UNMIX[2]


def stain_stats(rgb: np.ndarray, labels: np.ndarray, n: int | None = None) -> np.ndarray:
    """``(n, 3)`` float32: row ``k - 1`` holds the hematoxylin mean, its population standard deviation and the eosin
    mean over the pixels of instance ``k`` (``labels == k``) of the ``(H, W, 3)`` uint8 tile ``rgb`` (zeros for an
    instance with no pixel). ``n``: the number of instances (default: the largest label). Vectorised: one
    ``np.bincount`` per statistic over the labelled pixels, whatever the number of instances."""
    lab = np.asarray(labels).ravel()
    n = int(lab.max(initial=0)) if n is None else int(n)
    fg = np.flatnonzero(lab > 0)
    if n == 0 or not len(fg):
        return np.zeros((n, 3), np.float32)
    # (np.take, not fancy indexing: the same values, faster; measured in docs/speed.md)
    lab = lab.take(fg)
    px = np.asarray(rgb, np.uint8).reshape(-1, 3).take(fg, axis=0)
    h = _haematoxylin(px)
    e = _amount(px, _E_TERMS)
    size = np.maximum(np.bincount(lab, minlength=n + 1)[:n + 1], 1)
    h_mean = np.bincount(lab, weights=h, minlength=n + 1)[:n + 1] / size
    e_mean = np.bincount(lab, weights=e, minlength=n + 1)[:n + 1] / size
    d = h - h_mean.take(lab)
    d *= d
    h_var = np.bincount(lab, weights=d, minlength=n + 1)[:n + 1] / size  # (two passes: exact)
    return np.stack([h_mean, np.sqrt(h_var), e_mean], axis=1)[1:].astype(np.float32)


def stain_rows(stains: Sequence[tuple[float, float, float] | None]) -> np.ndarray:
    """``(n, 3)`` float64 rows of items' stain measurements, NaN where an item has none: how they travel in arrays
    (the tile workers' packed results, the resume journal); :func:`stains_of_rows` gives them back exactly."""
    return np.array([(np.nan,) * 3 if s is None else s for s in stains], np.float64).reshape(-1, 3)


def stains_of_rows(rows: np.ndarray) -> list[tuple[float, float, float] | None]:
    """The measurements of :func:`stain_rows`' rows again: a tuple per row, ``None`` for a NaN row."""
    return [None if np.isnan(r[0]) else (r[0], r[1], r[2]) for r in np.asarray(rows, np.float64).tolist()]


def with_pixels(predict: Callable[[np.ndarray], list[TileInstances]]) -> Callable[[np.ndarray], list[TileInstances]]:
    """``predict`` (a segmenter's), each result keeping its tile's pixels (:attr:`TileInstances.pixels`, a view of
    the batch) for :func:`measure`: what a run predicts with, so that the measurements are made where the tile is
    prepared (in a tile worker when there are some), not in the process or thread that drives the model."""

    def run(tiles: np.ndarray) -> list[TileInstances]:
        results = predict(tiles)
        for rgb, inst in zip(tiles, results):
            inst.pixels = rgb
        return results

    return run


#: a hole's ring: the background pixels within this many model pixels of an instance (2 um at the bundled models'
#: 0.25 um), where :func:`drop_holes` compares its optical density with the instance's
HOLE_RING = 8
#: an instance whose mean optical density is below this share of its ring's is a hole (:func:`drop_holes`)
HOLE_RATIO = 0.8
#: the optical density of each 8-bit grey level, in hundredths (0-241: a uint8 table for OpenCV's ``LUT``)
_OD_GREY = np.round(OD_LUT * 100).astype(np.uint8)


def drop_holes(inst: TileInstances) -> TileInstances:
    """``inst`` without its *holes*: instances whose mean optical density (of the tile's grey levels, over their
    pixels) is below :data:`HOLE_RATIO` times that of their ring (the background pixels within :data:`HOLE_RING`
    pixels, along either axis, each counted for the largest label that near), i.e. clearly brighter than what
    surrounds them. A nucleus takes up haematoxylin and is darker than its surround; the white gaps of dermal
    collagen, fat cells, lumens and tears that a model outlines are brighter. Needs the tile's pixels
    (:func:`with_pixels`): ``inst`` itself without them, or when no instance is a hole. Per tile, from the tile alone,
    so a run's outputs are the same for any number of workers. How the rule was chosen (on the Kumar development
    images' labels) and what it removes: docs/precision.md."""
    import cv2

    n = inst.count
    if inst.pixels is None or n == 0:
        return inst
    lab = inst.labels
    side = 2 * HOLE_RING + 1
    # (OpenCV for the per-pixel work, grey levels, their densities and a square dilation of the labels (separable):
    # about 1.5 ms a 384 px tile in all here, against 5 ms with NumPy's per-channel densities and a round kernel;
    # float32 holds labels exactly below 2**24)
    od = cv2.LUT(cv2.cvtColor(np.ascontiguousarray(inst.pixels, np.uint8), cv2.COLOR_RGB2GRAY), _OD_GREY)
    near = cv2.dilate(lab.astype(np.float32), np.ones((side, side), np.uint8)).astype(np.int32)
    ids = np.where(lab > 0, lab, np.where(near > 0, near + n, 0)).ravel()  # instance k: k; its ring: n + k
    size = np.bincount(ids, minlength=2 * n + 1)
    total = np.bincount(ids, weights=od.ravel(), minlength=2 * n + 1)
    mean = total / np.maximum(size, 1)
    inside, around = mean[1:n + 1], mean[n + 1:]
    return inst.subset(~((inside < HOLE_RATIO * around) & (size[1:n + 1] > 0)))


#: marking dye's hues (degrees, HSV): the green to cyan that surgeons' margin inks have and neither stain has
#: (haematoxylin is purple-blue, 230-330 over the Kumar development images' labelled nuclei; eosin and red cells pink
#: to red, 300-30)
DYE_HUE = (90.0, 210.0)
#: ... at a mean HSV saturation of at least this (0..1; grey and white pixels have no hue to speak of)
DYE_SAT = 0.15
#: OpenCV's 8-bit HSV as numbers: saturation 0..1, and the cosine and sine of each hue (OpenCV's is degrees / 2)
_SAT = np.arange(256) / 255.0
_COS, _SIN = np.cos(np.arange(180) * (np.pi / 90.0)), np.sin(np.arange(180) * (np.pi / 90.0))


#: the dye band's top stays at least this many degrees below the hue of a slide's haematoxylin (its pixels at or
#: above the level, :func:`slide_stain`): a slide whose nuclei are bluer than the bundled sample's keeps its
#: darkest, bluest ones (docs/precision.md, "A dye band that follows the slide's haematoxylin")
DYE_MARGIN = 45.0
#: an instance whose mean saturation is below this share of the slide's haematoxylin's (its pixels at or above the
#: level) is grey: black marking dye, carbon pigment; no labelled nucleus of the Kumar development images comes
#: under 0.32 of it, as they are or shifted (docs/precision.md, "Black dye")
GREY_SHARE = 0.25


@dataclass(frozen=True)
class SlideStain:
    """What a run knows of its slide's stain before it segments (:func:`slide_stain`), as the tiles' preparation
    (:func:`~wsiseg.wsi.stitch.propose`) uses it: ``faint``, the mean haematoxylin below which an instance is far
    fainter than the slide's nuclei (:func:`drop_faint`; 0: none); ``dye_top``, the top of the hues an instance on
    marking dye has on this slide (:func:`drop_dye`; :data:`DYE_HUE`'s unless the slide's haematoxylin is blue
    enough to come within :data:`DYE_MARGIN` of it); and ``grey_below``, the mean saturation below which an instance
    is grey, as black dye is and no nucleus of the slide (:data:`GREY_SHARE` of its haematoxylin's; 0: none)."""

    faint: float = 0.0
    dye_top: float = DYE_HUE[1]
    grey_below: float = 0.0


def hue_saturation(rgb: np.ndarray, labels: np.ndarray, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(hue, saturation)``, each ``(n,)``: entry ``k - 1`` holds the circular mean HSV hue (degrees, 0-360) of the
    pixels of instance ``k`` of ``labels`` in the ``(H, W, 3)`` uint8 RGB ``rgb``, each pixel weighted by its
    saturation, and their mean saturation (0..1; 0 for an instance with no pixel). ``n``: the number of instances
    (default: the largest label). One ``np.bincount`` per sum over the labelled pixels, whatever the number of
    instances."""
    import cv2

    lab = np.asarray(labels).ravel()
    n = int(lab.max(initial=0)) if n is None else int(n)
    fg = np.flatnonzero(lab > 0)
    if n == 0 or not len(fg):
        return np.zeros(n), np.zeros(n)
    lab = lab.take(fg)
    px = np.ascontiguousarray(np.asarray(rgb)[..., :3], np.uint8).reshape(-1, 3).take(fg, axis=0)
    hsv = cv2.cvtColor(px[None], cv2.COLOR_RGB2HSV)[0]  # (the labelled pixels only: a tenth to a third of a tile)
    sat = _SAT.take(hsv[:, 1])
    size = np.maximum(np.bincount(lab, minlength=n + 1)[1:n + 1], 1)
    c, s, total = (np.bincount(lab, weights=w, minlength=n + 1)[1:n + 1]
                   for w in (sat * _COS.take(hsv[:, 0]), sat * _SIN.take(hsv[:, 0]), sat))
    return np.degrees(np.arctan2(s, c)) % 360.0, total / size


def dye_coloured(hue: np.ndarray, sat: np.ndarray, top: float = DYE_HUE[1]) -> np.ndarray:
    """Whether each colour (``hue`` in degrees, ``sat`` 0..1: of an instance, or of an overview's pixel) is marking
    dye's: a hue in :data:`DYE_HUE` up to ``top`` where that is lower, at a saturation of at least :data:`DYE_SAT`.
    The one dye rule, for the outlines (:func:`dye_instances`) and for the tissue mask
    (:func:`wsiseg.wsi.tissue.tissue_mask`)."""
    return (hue >= DYE_HUE[0]) & (hue <= min(DYE_HUE[1], top)) & (sat >= DYE_SAT)


def dye_instances(rgb: np.ndarray, labels: np.ndarray, n: int | None = None,
                  stain: SlideStain = SlideStain()) -> np.ndarray:
    """``(n,)`` bool: entry ``k - 1`` tells whether instance ``k`` of ``labels`` lies on marking dye in the
    ``(H, W, 3)`` uint8 RGB ``rgb``: its :func:`hue_saturation` is :func:`dye_coloured` (up to the slide's
    ``stain.dye_top``), or its saturation is below the slide's ``stain.grey_below`` (black dye; False for an
    instance with no pixel). ``n``: the number of instances (default: the largest label)."""
    hue, sat = hue_saturation(rgb, labels, n)
    grey = sat < stain.grey_below
    if grey.any():  # (an instance with no pixel has saturation 0 but is not grey; counted only when needed)
        grey &= np.bincount(np.asarray(labels).ravel(), minlength=len(sat) + 1)[1:len(sat) + 1] > 0
    return dye_coloured(hue, sat, stain.dye_top) | grey


def drop_dye(inst: TileInstances, stain: SlideStain = SlideStain()) -> TileInstances:
    """``inst`` without the instances that lie on marking dye (:func:`dye_instances`): the specks and films of green
    or teal ink painted on a specimen's margins, which a model trained on H&E alone outlines as dark blobs. A nucleus
    under a film of dye goes with them: its stain measurements would be the dye's. Needs the tile's pixels
    (:func:`with_pixels`): ``inst`` itself without them, or when none is on dye. Per tile, from the tile alone, so a
    run's outputs are the same for any number of workers. ``stain``: the slide's band and grey level
    (:class:`SlideStain`). What it removes on the bundled sample and what it leaves on the Kumar images:
    docs/precision.md, "Marking dye at the tissue's edges" and "Black dye"."""
    if inst.pixels is None or inst.count == 0:
        return inst
    return inst.subset(~dye_instances(inst.pixels, inst.labels, inst.count, stain))


#: a slide's haematoxylin level (:func:`haematoxylin_level`): this percentile over its tissue's pixels
LEVEL_PERCENTILE = 90.0
#: the tiles a run reads for the level: at most this many, spread evenly over its tiles (:func:`level_tiles`)
LEVEL_TILES = 64
#: grey levels at or above this are white (glass, and the gaps in the tissue), left out of the level
LEVEL_WHITE = 220
#: a pixel whose brightest channel is below this holds no tissue: a scanner's black fill outside its scan, an
#: OME-Zarr's missing chunks; left out of the level, whose percentile black would take (no pixel of the 30 Kumar
#: images is that dark: their darkest nuclei's brightest channel is 17 or more)
LEVEL_BLACK = 12
#: an instance whose mean haematoxylin is below this share of its slide's level is far fainter than the slide's
#: nuclei (:func:`drop_faint`)
FAINT_SHARE = 0.2


def level_tiles(tiles: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """At most :data:`LEVEL_TILES` of a run's ``tiles`` (in their order), spread evenly over them: the ones whose
    pixels give the slide's haematoxylin level."""
    n = len(tiles)
    if n <= LEVEL_TILES:
        return list(tiles)
    return [tiles[int(i)] for i in np.linspace(0, n - 1, LEVEL_TILES).round()]


def _tissue_pixels(tiles: Iterable[np.ndarray]) -> np.ndarray:
    """The ``(n, 3)`` uint8 pixels of ``tiles`` (``(H, W, 3)`` uint8 RGB; every second row and column) whose grey
    level is below :data:`LEVEL_WHITE` and whose brightest channel is not below :data:`LEVEL_BLACK`."""
    import cv2

    values = [np.zeros((0, 3), np.uint8)]
    for rgb in tiles:
        px = np.ascontiguousarray(np.asarray(rgb, np.uint8)[::2, ::2, :3])
        grey = cv2.cvtColor(px, cv2.COLOR_RGB2GRAY).ravel()
        flat = px.reshape(-1, 3)
        values.append(flat[(grey < LEVEL_WHITE) & (flat.max(axis=1) >= LEVEL_BLACK)])
    return np.concatenate(values)


def haematoxylin_level(tiles: Iterable[np.ndarray]) -> float:
    """A slide's haematoxylin level: the :data:`LEVEL_PERCENTILE` th percentile of the haematoxylin amount over the
    pixels of ``tiles`` (``(H, W, 3)`` uint8 RGB at the model's resolution; every second row and column) that
    :func:`_tissue_pixels` keeps (neither white nor black); 0.0 where there are none. In tissue dense with nuclei it
    is a nucleus' level; in sparse stroma a lower one (so the rule that uses it, :func:`drop_faint`, drops less
    there)."""
    values = _haematoxylin(_tissue_pixels(tiles))
    return float(np.percentile(values, LEVEL_PERCENTILE)) if values.size else 0.0


def haematoxylin_colour(px: np.ndarray) -> tuple[float | None, float]:
    """The colour of a slide's haematoxylin from its most haematoxylin-stained ``(n, 3)`` uint8 pixels ``px``
    (:func:`slide_stain`'s: those at or above its level): ``(hue, saturation)``, the saturation-weighted circular
    mean HSV hue (degrees, 90-450: reds just past 360 read as such) of the pixels whose hue is not in
    :data:`DYE_HUE` (so that marking dye on the slide does not pull it towards the dye; None where none is left),
    and the mean HSV saturation of them all (0..1; 0.0 for no pixel). One colour conversion for both."""
    import cv2

    if not px.size:
        return None, 0.0
    hsv = cv2.cvtColor(np.ascontiguousarray(px)[None], cv2.COLOR_RGB2HSV)[0]
    hue = hsv[:, 0].astype(np.float64) * 2.0
    sat = _SAT.take(hsv[:, 1])
    mean_sat = float(sat.mean())
    sat = sat * ~((hue >= DYE_HUE[0]) & (hue <= DYE_HUE[1]))
    c, s = float((sat * _COS.take(hsv[:, 0])).sum()), float((sat * _SIN.take(hsv[:, 0])).sum())
    if c == 0.0 and s == 0.0:
        return None, mean_sat
    return (np.degrees(np.arctan2(s, c)) - DYE_HUE[0]) % 360.0 + DYE_HUE[0], mean_sat


def slide_stain(read: Callable[[int, int], np.ndarray], tiles: Sequence[tuple[int, int]]) -> SlideStain:
    """A run's :class:`SlideStain`, from its :func:`level_tiles`, each read by ``read(row, col)`` (``wsiseg run``
    and the API alike): the faint cut, :data:`FAINT_SHARE` times their :func:`haematoxylin_level`; the dye band's
    top, :data:`DYE_MARGIN` below the hue of their :func:`haematoxylin_colour` where that is below :data:`DYE_HUE`'s
    top; and the grey level, :data:`GREY_SHARE` times its saturation."""
    px = _tissue_pixels(read(r, c) for r, c in level_tiles(tiles))
    h = _haematoxylin(px)
    level = float(np.percentile(h, LEVEL_PERCENTILE)) if h.size else 0.0
    hue, sat = haematoxylin_colour(px[h >= level])
    top = DYE_HUE[1] if hue is None else min(DYE_HUE[1], round(float(hue) - DYE_MARGIN, 2))
    return SlideStain(FAINT_SHARE * level, top, round(GREY_SHARE * sat, 4))


def drop_faint(inst: TileInstances, below: float) -> TileInstances:
    """``inst`` without the instances whose mean haematoxylin (their stain measurements: :func:`measure` first) is
    below ``below`` (a run's: :data:`FAINT_SHARE` times its slide's :func:`haematoxylin_level`); ``inst`` itself
    when ``below`` is 0, it has no measurements or none is that faint. Nucleus-sized gaps in dense collagen that a
    model outlines hold almost no haematoxylin, and no darker than the collagen around them, :func:`drop_holes`
    keeps them; relative to the slide, a slide of pale nuclei keeps its own (docs/precision.md)."""
    if below <= 0 or inst.count == 0 or inst.stains.shape[0] != inst.count:
        return inst
    return inst.subset(~(inst.stains[:, 0] < below))


def measure(inst: TileInstances) -> TileInstances:
    """``inst`` with its stain measurements made from its pixels, which it then lets go (:func:`with_pixels`);
    unchanged when it has no pixels. The same figures right after ``predict`` as after
    :func:`~wsiseg.wsi.grid.keep_in_tissue` dropped some instances (each instance's figures are sums over its own
    pixels, in the same order)."""
    if inst.pixels is not None:
        inst.stains = stain_stats(inst.pixels, inst.labels, inst.count)
        inst.pixels = None
    return inst
