"""The scale a slide is shown to the model at: its own, or larger where its nuclei look small (``--zoom auto``).

A model finds nuclei of about the size it was made on. Shown a slide whose nuclei look much smaller (tissue of small
crowded nuclei, or a slide whose stated scale is wrong), it misses most of them: on the three Kumar kidney
development images whose nuclei are 11-12 px across at 0.25 um/px the bundled model found a third to a half of them
(object recall 0.33-0.54), and shown the same images 1.6-1.9x larger, 62-84% (docs/precision.md, "Small nuclei:
the slide shown larger").

:func:`probe` measures it as Cellpose's size estimate does, without labels: the model segments a few of the slide's
tissue tiles at the slide's own scale, and the median diameter of what it finds is compared with its own
(:attr:`~wsiseg.models.pdam.PDAMConfig.nucleus_px`, the median diameter of what it draws on the images it was
chosen on). Where the slide's nuclei look at least :data:`ZOOM_FROM` times smaller, it looks once more at that zoom
(the first look misses the smallest nuclei, so it takes them for larger than they are), and the run shows the slide
as much larger as the second look says, if that is more (at most :data:`MAX_ZOOM`): its tiles are read at ``model mpp
/ zoom`` microns a pixel, and there are zoom^2 times as many. Everything a run writes stays in the slide's own
coordinates and micrometres.

The same look measures how sharp the nuclei are (:mod:`wsiseg.segmenters.focus`): a slide out of focus is sharpened
before the model sees it, from the probe on; one out of focus in parts has each tile's focus checked.

Guarantee: the zoom and the sharpening depend only on the slide's pixels, the tiles and the model (the same run
always picks the same, so a resumed run and a cohort's worker agree); a slide whose nuclei look their usual size, a
model that does not know its nuclei's size, and a slide with fewer than :data:`MIN_NUCLEI` nuclei in its probe tiles
keep zoom 1; only a slide whose nuclei's edges look blurred is sharpened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..segmenters.base import Segmenter, Sharpening, describe
from ..segmenters.focus import SHARP_PX, blurred_tiles, edge_widths, sharpen_px

#: the slide is shown larger only when its nuclei look at least this many times smaller than the model's own (chosen
#: on the development set: its images at 1.00-1.07 lost AJI shown 1.2x larger, those at 1.38-1.62 gained; none lies
#: between; docs/precision.md)
ZOOM_FROM = 1.2
#: the largest zoom (4x the tiles)
MAX_ZOOM = 2.0
#: tiles the model segments to measure the slide's nuclei (spread evenly over its tissue tiles)
PROBE_TILES = 16
#: fewer nuclei than this in the probe tiles: too few to measure, zoom 1
MIN_NUCLEI = 50
#: a slide neither sharpened nor with a probe tile out of focus has one more tile looked at for focus alone for every
#: FOCUS_EVERY of its tissue tiles, at most FOCUS_TILES (spread evenly over the rest): a region out of focus in a large
#: slide is then missed less often (a region of 2% of 5,000 tiles, were the tiles looked at placed at random: by the
#: 16 probe tiles 72% of the time, with 48 more 27%), while a small slide pays next to nothing (the sample: one tile)
FOCUS_EVERY = 100
FOCUS_TILES = 48


@dataclass(frozen=True)
class Zoom:
    """What :func:`probe` found: ``zoom`` (1.0: the slide's own scale), the median diameter of the probe's nuclei at
    the slide's own scale, the same measured again at the first zoom it chose (``refined_px``, divided by that zoom:
    model pixels at the slide's own scale) and the model's own (``None`` where not measured or unknown), how many
    nuclei and tiles the first look saw, the median edge width of its nuclei and the sharpening chosen from it, and
    how many tiles looked out of focus on their own, of those and of the ``focus_tiles`` looked at for focus alone."""

    zoom: float = 1.0
    median_px: float | None = None
    reference_px: float | None = None
    nuclei: int = 0
    tiles: int = 0
    refined_px: float | None = None
    edge_px: float | None = None
    sharpen_px: float = 0.0
    blurred_tiles: int = 0
    focus_tiles: int = 0

    @property
    def refocus(self) -> bool:
        """Whether the run checks each tile's focus (:attr:`~wsiseg.segmenters.rcnn.PredictorOptions.refocus`): the
        slide is not sharpened as a whole, but a tile looked at here was out of focus on its own."""
        return not self.sharpen_px and self.blurred_tiles >= 1

    def describe(self, mpp: float) -> str:
        """One line for the log: what was measured (in micrometres, ``mpp`` the model's) and what was chosen."""
        if self.median_px is None or self.reference_px is None:
            return "zoom 1 (the nuclei's size was not measured)"
        size = self.median_px if self.refined_px is None else self.refined_px
        seen = f"median nucleus {size * mpp:.1f} um across, the model's {self.reference_px * mpp:.1f} um"
        if self.sharpen_px:
            seen += (f"; out of focus (the nuclei's edges {self.edge_px * mpp:.2f} um wide, sharp scans' "
                     f"{SHARP_PX * mpp:.2f}): sharpened by {self.sharpen_px * mpp:.2f} um")
        elif self.refocus:
            seen += (f"; {self.blurred_tiles} of {self.tiles + self.focus_tiles} tiles out of focus: every tile's "
                     "focus is checked and a blurred one sharpened")
        if self.zoom == 1.0:
            return f"{seen} ({self.nuclei} nuclei in {self.tiles} tiles): the slide's own scale"
        return (f"{seen} ({self.nuclei} nuclei in {self.tiles} tiles): shown {self.zoom:.2f}x larger "
                f"({self.zoom ** 2:.1f}x the tiles; --zoom 1 keeps the slide's scale)")


def diameters(labels: np.ndarray, whole: bool = False) -> np.ndarray:
    """Equivalent diameters (pixels: the diameter of a disc of the same area) of the objects of ``labels``;
    ``whole``: only those that do not touch its border (a tile's, cut there, look smaller than they are)."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    if whole:
        areas[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = 0
    return np.sqrt(4.0 * areas[areas > 0] / np.pi)


def choose(median_px: float, reference_px: float) -> float:
    """The zoom for nuclei of ``median_px`` when the model's own are ``reference_px``: their ratio where it reaches
    :data:`ZOOM_FROM` (at most :data:`MAX_ZOOM`), else 1.0 (never smaller: shown smaller, large nuclei were not found
    better, docs/precision.md). Rounded to 0.01 so that the grid does not hang on the last digit."""
    if not (median_px > 0 and reference_px > 0):
        return 1.0
    ratio = reference_px / median_px
    return round(min(ratio, MAX_ZOOM), 2) if ratio >= ZOOM_FROM else 1.0


def probe_tiles(tiles: Sequence[tuple[int, int]], n: int = PROBE_TILES) -> list[tuple[int, int]]:
    """At most ``n`` of ``tiles`` (in their order), spread evenly over them."""
    if len(tiles) <= n:
        return list(tiles)
    return [tiles[int(i)] for i in np.linspace(0, len(tiles) - 1, n).round()]


@dataclass(frozen=True)
class Look:
    """What :func:`measure` saw: the median diameter of the nuclei whole in their tile (model pixels; ``None`` with
    fewer than :data:`MIN_NUCLEI`), how many nuclei and tiles, and, where asked for, the median edge width of those
    nuclei (:func:`wsiseg.segmenters.focus.edge_widths`; ``None`` when not measured) and how many tiles look out of
    focus on their own (:func:`wsiseg.segmenters.focus.blurred_tiles`)."""

    median_px: float | None
    nuclei: int
    tiles: int
    edge_px: float | None = None
    blurred_tiles: int = 0


def measure(seg: Segmenter, read: Callable[[int, int], np.ndarray], tiles: Sequence[tuple[int, int]],
            edges: bool = False) -> Look:
    """What ``seg`` finds in :func:`probe_tiles` of ``tiles`` (each read by ``read(row, col)``): the median diameter
    of its nuclei that are whole in their tile and, with ``edges``, how sharp they are (a :class:`Look`)."""
    chosen = probe_tiles(tiles)
    found: list[np.ndarray] = []
    widths: list[np.ndarray] = []
    for tile, inst in _predicted(seg, read, chosen):
        found.append(diameters(inst.labels, whole=True))
        if edges:
            widths.append(edge_widths(tile, inst.labels))
    d = np.concatenate(found) if found else np.zeros(0)
    if len(d) < MIN_NUCLEI:
        return Look(None, len(d), len(chosen), blurred_tiles=blurred_tiles(widths))
    e = np.concatenate(widths) if widths else np.zeros(0)
    return Look(float(np.median(d)), len(d), len(chosen), float(np.median(e)) if len(e) else None,
                blurred_tiles(widths))


def _predicted(seg: Segmenter, read: Callable[[int, int], np.ndarray], tiles: Sequence[tuple[int, int]]):
    """``(tile, its instances)`` for each of ``tiles``, predicted in small batches (the probe's memory stays a
    run's)."""
    for i in range(0, len(tiles), 8):
        batch = np.stack([read(r, c) for r, c in tiles[i:i + 8]])
        yield from zip(batch, seg.predict(batch))


def look_for_focus(seg: Segmenter, read: Callable[[int, int], np.ndarray],
                   tiles: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(looked at, out of focus)``: one tile of ``tiles`` for every :data:`FOCUS_EVERY`, at most
    :data:`FOCUS_TILES`, spread evenly over those :func:`measure` did not look at, and how many of them look out of
    focus on their own (:func:`wsiseg.segmenters.focus.blurred_tiles`)."""
    n = min(FOCUS_TILES, len(tiles) // FOCUS_EVERY)
    if n == 0:
        return 0, 0
    seen = set(probe_tiles(tiles))
    chosen = probe_tiles([t for t in tiles if t not in seen], n)
    return len(chosen), blurred_tiles([edge_widths(tile, inst.labels) for tile, inst in _predicted(seg, read, chosen)])


def probe(seg: Segmenter, tiles_at: Callable[[float], tuple[Callable[[int, int], np.ndarray],
                                                             Sequence[tuple[int, int]]]]) -> Zoom:
    """The zoom for a slide, and its sharpening: ``tiles_at(zoom)`` gives a reader ``read(row, col)`` of its tiles
    shown ``zoom`` times larger and the tissue tiles to read. :func:`measure` measures ``seg``'s nuclei at the slide's
    own scale. Where their edges say the slide is out of focus (:func:`wsiseg.segmenters.focus.sharpen_px`), ``seg``
    sharpens its tiles from then on (:class:`~wsiseg.segmenters.base.Sharpening`; else it is set not to) and they
    are measured again so. :func:`choose` compares their median with ``seg``'s own
    (:attr:`~wsiseg.segmenters.base.SegmenterInfo.nucleus_px`). Where that shows the slide larger, the nuclei are
    measured once more at that zoom, as Cellpose refines its size estimate: at the slide's own scale the model misses
    the smallest nuclei, so the first median is too large; the zoom is the larger of the two choices, and the
    sharpening's width grows with it. A slide not sharpened as a whole of which a tile looked at was out of focus on
    its own (:attr:`Zoom.refocus`: out of focus in parts; where none of the first look's was, a few more are looked at
    for focus alone on a large slide, :func:`look_for_focus`) has ``seg`` check every tile's focus from then on. A
    segmenter without a nucleus size keeps zoom 1 and predicts nothing."""
    reference = float(describe(seg).nucleus_px or 0.0)
    if reference <= 0:
        return Zoom()
    sharpen(seg, 0.0)  # (each slide decides anew)
    read, tiles = tiles_at(1.0)
    if not tiles:
        return Zoom()
    first = measure(seg, read, tiles, edges=True)
    median, n, t, edge, blurred = first.median_px, first.nuclei, first.tiles, first.edge_px, first.blurred_tiles
    if median is None:
        return Zoom(reference_px=reference, nuclei=n, tiles=t, edge_px=edge, blurred_tiles=blurred)
    sigma = sharpen_px(edge) if isinstance(seg, Sharpening) else 0.0
    more = 0
    if not sigma and not blurred and isinstance(seg, Sharpening):  # (a region out of focus the first look missed?)
        more, blurred = look_for_focus(seg, read, tiles)
    if sigma:
        sharpen(seg, sigma)
        median = measure(seg, read, tiles).median_px or median
    zoom = choose(median, reference)
    refined = None
    if zoom != 1.0:
        sharpen(seg, sigma * zoom)
        again = measure(seg, *tiles_at(zoom)).median_px
        refined = None if again is None else again / zoom
        if refined is not None:
            zoom = max(zoom, choose(refined, reference))
    found = Zoom(zoom, median, reference, n, t, refined, edge, sigma, blurred, more)
    sharpen(seg, sigma * zoom, zoom if found.refocus else 0.0)
    return found


def sharpen(seg: Segmenter, px: float, refocus: float = 0.0) -> None:
    """``seg`` sharpens its tiles by an unsharp mask of ``px`` model pixels from now on (0.0: not at all), and with
    ``refocus`` (the tiles' zoom; 0.0: off) predicts again, sharpened, each tile whose own nuclei look out of focus,
    where it can (:class:`~wsiseg.segmenters.base.Sharpening`)."""
    if isinstance(seg, Sharpening):
        seg.sharpen = float(px)
        seg.refocus = float(refocus)
