"""The tile grid at the model's resolution, and streaming of tile batches with bounded memory.

Coordinates: the *model grid* is the slide resampled to the model's microns per pixel; one model pixel is
``scale`` level-0 pixels (``scale = model_mpp / slide_mpp``). Along each axis tile ``i`` of ``n`` starts at
``i*stride`` (``stride = tile - overlap``), except the last (``i = n-1 >= 1``) where that would reach past the
slide's edge: it is moved back to end there, starting at ``size - tile`` rounded up to a multiple of :data:`ALIGN`,
but never before the end of tile ``i-2`` (so no pixel lies in more than two tiles along an axis). Whatever a tile
reaches past the edge is padded with white: less than :data:`ALIGN` pixels unless the slide is smaller than a tile
or that bound holds the last tile back. The last tile then overlaps its neighbour by more than ``overlap``.

Cores: along each axis the boundaries ``b_i = i*stride + overlap/2`` (i >= 1) split the model grid into disjoint
half-open intervals, ``core_0 = [0, b_1)``, ``core_i = [b_i, b_{i+1})``, the last one open to the slide's end. Every
model pixel lies in exactly one tile's core, and a core lies at least ``overlap/2`` pixels inside its tile on every
side that is not the slide's edge. The stitcher relies on exactly this (see :mod:`wsiseg.wsi.stitch`).

Streaming: :func:`iter_batches` reads each tile in a thread of its own pool (read + resample, slides opened by path
in the thread), gathers a batch of them at a time and keeps at most ``prefetch`` batches in flight, yielding them in
raster order; memory is bounded by ``(prefetch + 1) * batch_size`` tiles whatever the slide's size.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..core.errors import ConfigError
from ..io.slide import Slide, cached_slide
from ..segmenters.base import Segmenter, TileInstances, tile_for
from .tissue import TissueMask


#: a last tile moved back to the slide's edge starts on a multiple of this many model pixels (so it may still reach
#: up to ``ALIGN - 1`` past the edge): the backbones' output stride (ResNet's last stage, the pyramid's P5), on
#: which the other tiles start too when the stride (tile - overlap) is a multiple of it, as the shipped models' are
#: (384 - 64); shared pixels then have the same features in both tiles, away from the tiles' borders
ALIGN = 32


#: an image whose sides at the model's resolution are both at most this share of the model's own tile is segmented
#: in one tile of its own size (:func:`fitted_tile`)
FIT_SHARE = 2 / 3


def fitted_tile(tile: int, slide_dims: tuple[int, int], slide_mpp: float, model_mpp: float,
                overlap: int | None = None) -> int:
    """The tile side for a slide or image: ``tile`` (asked for, or the model's own), or, where the image's
    sides at the model's resolution are both at most :data:`FIT_SHARE` of it, its longer side rounded up to
    :data:`ALIGN` (at least twice an ``overlap`` asked for): one tile of about the image's size instead of one
    that is mostly white padding, which the models' GroupNorm layers would average into every feature (why and how
    it was chosen: docs/precision.md)."""
    g = TileGrid.for_slide(slide_dims, slide_mpp, model_mpp, tile, 0)  # (the image's size at the model's resolution)
    side = max(g.width, g.height)
    if side > FIT_SHARE * tile:
        return tile
    return min(tile, max(-(-side // ALIGN) * ALIGN, 2 * (overlap or 0)))


def plan_tiles(seg: Segmenter, slide_dims: tuple[int, int], slide_mpp: float, tile: int | None = None,
               overlap: int | None = None, zoom: float = 1.0) -> tuple[int, int]:
    """``(tile, overlap)`` for a run of ``seg`` on a slide of ``slide_dims`` level-0 pixels shown ``zoom`` times
    larger than its own scale (:mod:`wsiseg.wsi.scale`): the tile :func:`fitted_tile` gives for the one asked for,
    else for the model's own (:func:`~wsiseg.segmenters.base.tile_for`: a tile far larger than the image, asked
    for or not, is mostly white padding, which lost most nuclei of a small image), and the overlap as asked, else
    the one :meth:`TileGrid.default_overlap` gives for the model's largest nucleus. The one place both are resolved
    (the API and ``wsiseg run``); an overlap asked for is checked against the tile by :class:`TileGrid`."""
    tile = fitted_tile(tile or tile_for(seg), slide_dims, slide_mpp, seg.mpp / zoom, overlap)
    return tile, TileGrid.default_overlap(seg.max_nucleus_px, tile) if overlap is None else overlap


def plan_grid(seg: Segmenter, slide_dims: tuple[int, int], slide_mpp: float, tile: int | None = None,
              overlap: int | None = None, zoom: float = 1.0) -> "TileGrid":
    """The tile grid of a run of ``seg`` on a slide of ``slide_dims`` level-0 pixels at ``slide_mpp``, shown
    ``zoom`` times larger than its own scale: :func:`plan_tiles`' tile and overlap, at the model's view of the slide
    (``seg.mpp / zoom`` microns a pixel)."""
    tile, overlap = plan_tiles(seg, slide_dims, slide_mpp, tile, overlap, zoom)
    return TileGrid.for_slide(slide_dims, slide_mpp, seg.mpp / zoom, tile, overlap)


@dataclass(frozen=True)
class TileGrid:
    width: int  # model-grid size of the slide
    height: int
    tile: int
    overlap: int
    scale: float  # level-0 pixels per model pixel
    #: level-0 size of the slide the grid covers (:meth:`for_slide`); 0: ``width * scale`` (``height * scale``)
    slide_width: int = 0
    slide_height: int = 0

    def __post_init__(self) -> None:
        if self.tile < 16:
            raise ConfigError(f"tile size {self.tile} is too small (>= 16)")
        if not 0 <= self.overlap < self.tile // 2 + 1 or self.overlap % 2:
            raise ConfigError(f"overlap {self.overlap}: must be even and at most half the tile size "
                              f"({self.tile // 2})")

    @staticmethod
    def default_overlap(max_nucleus_px: int, tile: int) -> int:
        """The overlap when none is asked for: the model's largest nucleus (rounded up to even), at most half the
        tile (even)."""
        return min(int(math.ceil(max_nucleus_px / 2.0)) * 2, (tile // 2) // 2 * 2)

    @classmethod
    def for_slide(cls, slide_dims: tuple[int, int], slide_mpp: float, model_mpp: float, tile: int, overlap: int
                  ) -> "TileGrid":
        scale = model_mpp / slide_mpp
        w = max(1, int(math.ceil(slide_dims[0] / scale - 1e-9)))
        h = max(1, int(math.ceil(slide_dims[1] / scale - 1e-9)))
        return cls(w, h, tile, overlap, scale, int(slide_dims[0]), int(slide_dims[1]))

    @property
    def on_slide(self) -> tuple[int, int]:
        """``(columns, rows)``: how many model pixels from the top left lie wholly on the slide (the last one of
        :attr:`width` may reach past its edge, as the tiles' white padding does). Outlines made of these pixels lie
        within the slide's level-0 extent, ``[0, slide_width] x [0, slide_height]``."""
        def n(size: int, level0: int) -> int:
            return size if not level0 else min(size, max(1, int(math.floor(level0 / self.scale + 1e-9))))

        return n(self.width, self.slide_width), n(self.height, self.slide_height)

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def _n(self, size: int) -> int:
        return max(1, int(math.ceil((size - self.overlap) / self.stride)))

    @property
    def cols(self) -> int:
        return self._n(self.width)

    @property
    def rows(self) -> int:
        return self._n(self.height)

    def _start(self, i: int, n: int, size: int) -> int:
        """Where tile ``i`` of ``n`` starts along an axis of ``size`` model pixels (the module's doc)."""
        x = i * self.stride
        if i == n - 1 and i > 0 and x + self.tile > size:
            edge = -(-(size - self.tile) // ALIGN) * ALIGN
            x = min(x, max(edge, (i - 2) * self.stride + self.tile if i >= 2 else 0))
        return x

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Model-grid (x, y) of the tile's top-left pixel."""
        return self._start(col, self.cols, self.width), self._start(row, self.rows, self.height)

    def unshared(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Half-open box (x0, y0, x1, y1), model pixels, of the tile's part that no other tile covers: the tile less
        what its neighbours (left, above, right, below) reach into it."""
        x, y = self.origin(row, col)
        x0 = self.origin(row, col - 1)[0] + self.tile if col > 0 else x
        y0 = self.origin(row - 1, col)[1] + self.tile if row > 0 else y
        x1 = self.origin(row, col + 1)[0] if col < self.cols - 1 else x + self.tile
        y1 = self.origin(row + 1, col)[1] if row < self.rows - 1 else y + self.tile
        return x0, y0, x1, y1

    def core(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Half-open core box (x0, y0, x1, y1) in model pixels; +inf towards the slide's far edges."""
        half = self.overlap / 2
        x0 = 0.0 if col == 0 else col * self.stride + half
        y0 = 0.0 if row == 0 else row * self.stride + half
        x1 = math.inf if col == self.cols - 1 else (col + 1) * self.stride + half
        y1 = math.inf if row == self.rows - 1 else (row + 1) * self.stride + half
        return x0, y0, x1, y1

    def cut_edges(self, row: int, col: int) -> tuple[bool, bool, bool, bool]:
        """(left, top, right, bottom): True where the tile's edge cuts through the slide (not the slide's border)."""
        x, y = self.origin(row, col)
        return x > 0, y > 0, x + self.tile < self.width, y + self.tile < self.height

    def level0_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        x, y = self.origin(row, col)
        s = self.scale
        return x * s, y * s, (x + self.tile) * s, (y + self.tile) * s

    def tiles(self, tissue: TissueMask | None = None) -> list[tuple[int, int]]:
        """(row, col) of every tile to segment, in raster order; with ``tissue``, only tiles over tissue."""
        out = []
        for r in range(self.rows):
            for c in range(self.cols):
                if tissue is None or tissue.any_in(*self.level0_box(r, c)):
                    out.append((r, c))
        return out


def keep_in_tissue(inst: TileInstances, tissue: TissueMask, grid: TileGrid, row: int, col: int) -> TileInstances:
    """The tile's instances whose centre (the mean of its pixels, in level-0 coordinates) lies on ``tissue``,
    relabelled ``1..n`` in their order, with their scores and stain measurements; ``inst`` itself when the tile lies
    wholly on tissue (most tiles: no per-pixel work). Applied to each tile before stitching, it only removes
    instances, so the stitcher still outputs each nucleus at most once; a nucleus cut by a tile's edge is judged in
    that tile by its visible part, which can differ from its owner tile's verdict only within a few pixels of the
    mask's edge, and the owner's verdict is the one that counts."""
    n = inst.count
    if n == 0 or tissue.all_in(*grid.level0_box(row, col)):
        return inst
    lab = inst.labels
    count = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    ys, xs = np.indices(lab.shape, dtype=np.float64)
    cy = np.bincount(lab.ravel(), weights=ys.ravel(), minlength=n + 1) / np.maximum(count, 1)
    cx = np.bincount(lab.ravel(), weights=xs.ravel(), minlength=n + 1) / np.maximum(count, 1)
    x0, y0 = grid.origin(row, col)
    keep = tissue.contains((x0 + cx + 0.5) * grid.scale, (y0 + cy + 0.5) * grid.scale)
    return inst.subset(keep[1:])


def read_tile(slide: Slide, grid: TileGrid, row: int, col: int) -> np.ndarray:
    """The tile at model resolution, ``(tile, tile, 3)`` uint8, read from the best pyramid level."""
    import cv2

    T, s = grid.tile, grid.scale
    x, y = grid.origin(row, col)
    level = slide.best_level_for_downsample(s)
    d = slide.levels[level].downsample
    r = s / d  # level pixels per model pixel
    if abs(r - 1.0) < 1e-6:
        return slide.read_region((int(round(x * s)), int(round(y * s))), level, (T, T))
    # read the level region covering the tile (with 1 px of margin), then resample exactly: model pixel centre
    # u maps to level coordinate (x + u + 0.5) * r - 0.5
    lx0 = (x + 0.5) * r - 0.5
    ly0 = (y + 0.5) * r - 0.5
    ix0, iy0 = int(math.floor(lx0)) - 1, int(math.floor(ly0)) - 1
    n = int(math.ceil(T * r)) + 3
    region = slide.read_region((int(round(ix0 * d)), int(round(iy0 * d))), level, (n, n))
    if r > 1.0:  # shrinking: area-average first to avoid aliasing, then exact placement
        k = int(math.floor(r))
        if k >= 2:
            region = cv2.resize(region, (region.shape[1] // k, region.shape[0] // k), interpolation=cv2.INTER_AREA)
            # after averaging k x k blocks, level coordinate L maps to (L + 0.5) / k - 0.5
            lx0, ly0 = (lx0 - ix0 + 0.5) / k - 0.5, (ly0 - iy0 + 0.5) / k - 0.5
            r = r / k
            ix0 = iy0 = 0
        else:
            lx0, ly0 = lx0 - ix0, ly0 - iy0
    else:
        lx0, ly0 = lx0 - ix0, ly0 - iy0
    M = np.array([[r, 0.0, lx0], [0.0, r, ly0]], np.float64)
    return cv2.warpAffine(region, M, (T, T), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))


def read_one(path: str, backend: str, grid: TileGrid, row: int, col: int, icc: str = "ignore") -> np.ndarray:
    """One tile read by path (the slide's handle cached per process; ``icc`` as :func:`~wsiseg.io.slide.open_slide`
    takes it): what a reading thread runs."""
    return read_tile(cached_slide(path, backend, icc), grid, row, col)


def tile_reader(slide: Slide, path: str, backend: str, grid: TileGrid) -> Callable[[int, int], np.ndarray]:
    """``(row, col)`` -> the tile's pixels, for :func:`iter_batches`: from ``slide`` itself when it is an image
    already in memory, else by path, a slide handle per reading thread (:func:`read_one`), its colours managed as
    ``slide``'s are."""
    if slide.backend == "image":  # already in memory: read from this handle
        return functools.partial(read_tile, slide, grid)
    return functools.partial(read_one, path, backend, grid, icc="apply" if slide.icc_applied else "ignore")


def iter_batches(read: Callable[[int, int], np.ndarray], tiles: list[tuple[int, int]], batch_size: int,
                 prefetch: int = 2, workers: int = 2) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """Yield ``(tile_ids, pixels (B, T, T, 3))`` batches in the order of ``tiles``, reading ahead in threads.

    ``read(row, col)`` returns one tile (e.g. ``functools.partial(read_one, path, backend, grid)``). A batch is
    gathered in a background thread from ``workers`` reading threads per batch in flight, and at most ``prefetch``
    batches are in flight, so memory does not grow with the slide. An error reading a tile is raised at its batch
    (the first failing tile in order).

    The reading threads live as long as the generator: exhaust it or ``close()`` it (``contextlib.closing``), which
    waits for the reads in flight. A generator left for the garbage collector would shut them down from whichever
    thread happens to collect it, which can deadlock with a thread being started there.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    groups = [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]
    if not groups:
        return
    # A plain thread pool, not a dask.delayed task per tile computed on dask's threaded scheduler (as before): building
    # and running a batch's graph cost 0.75 ms of interpreter time a tile on a 2-core CPU (0.03 with this pool), under
    # the interpreter lock that the predicting thread and the main loop wait for (docs/speed.md).
    readers = ThreadPoolExecutor(max_workers=max(1, workers) * max(1, prefetch),
                                 thread_name_prefix="wsiseg-read-tile")  # (named so the tests see none left)

    def compute(group: list[tuple[int, int]]) -> np.ndarray:
        return np.stack(list(readers.map(read, *zip(*group))))

    pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="wsiseg-read")
    pending: deque[tuple[list[tuple[int, int]], Future]] = deque()
    it = iter(groups)
    try:
        for _ in range(max(1, prefetch)):
            g = next(it, None)
            if g is None:
                break
            pending.append((g, pool.submit(compute, g)))
        while pending:
            g, fut = pending.popleft()
            pixels = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(compute, nxt)))
            yield g, pixels
    finally:
        for _, f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        readers.shutdown(wait=True, cancel_futures=True)


def predict_ahead(batches: Iterator[tuple[list[tuple[int, int]], np.ndarray]], predict: Callable[[np.ndarray], list],
                  depth: int = 1) -> Iterator[tuple[list[tuple[int, int]], list, float, float, float]]:
    """Run ``predict`` on each batch in a background thread, ``depth`` batches ahead of the consumer.

    Yields ``(tile_ids, predict(pixels), read_wait_s, predict_s, predict_wait_s)`` in the order of ``batches``:
    the seconds this call waited for the batch to be read, the seconds ``predict`` ran (in its thread), and the
    seconds the consumer then waited for the prediction. While the caller stitches and writes batch ``k``,
    batch ``k + 1`` is on the GPU, so the slide costs about ``max(predict, stitch + write)`` per batch instead of
    their sum. Results are the same as calling ``predict`` in order: there is one predicting thread. An exception
    in ``predict`` is raised here, at its batch; leaving the loop early waits for the batch in flight, then drops
    the rest. ``batches`` is closed when this generator ends, however it ends (its reading threads stop here, not
    in the garbage collector). ``depth=0``: no thread, predict then hand over, for a predictor that keeps every CPU core busy
    already, where a thread beside torch's only competes for the cores (docs/speed.md).
    """

    def run(pixels: np.ndarray) -> tuple[list, float]:
        t0 = time.perf_counter()
        out = predict(pixels)
        return out, time.perf_counter() - t0

    def run_here(pixels: np.ndarray) -> Future:  # depth 0: in this thread, as a finished future
        done: Future = Future()
        done.set_result(run(pixels))
        return done

    depth = max(0, depth)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsiseg-predict") if depth else None
    pending: deque[tuple[list[tuple[int, int]], Future, float]] = deque()
    try:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            nxt = next(it, None)
            t_read = time.perf_counter() - t0
            if nxt is not None:
                ids, pixels = nxt
                pending.append((ids, pool.submit(run, pixels) if pool else run_here(pixels), t_read))
                if len(pending) <= depth:
                    continue
            if not pending:
                break
            ids0, fut, t_read0 = pending.popleft()
            t0 = time.perf_counter()
            out, t_pred = fut.result()
            yield ids0, out, t_read0, t_pred, time.perf_counter() - t0
    finally:
        for _, f, _ in pending:
            f.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(batches, "close", None)
        if close is not None:
            close()
