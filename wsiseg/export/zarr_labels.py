"""OME-Zarr 0.5 (zarr v3) output: a nuclei label pyramid on the slide's RGB pyramid, written as tiles finish.

Layout of ``nuclei.zarr`` (valid under ome-zarr-models; read by ome-zarr-py's Reader and napari's ome-zarr plugin)::

    nuclei.zarr/            image group: the slide's RGB pyramid, levels exactly as the labels' (same shapes, scales)
      0, 1, ...             (c, y, x) uint8; level k+1 the 2x2 mean of level k ("local_mean"); micrometre scales
      labels/               {"labels": ["nuclei"]}
        nuclei/             multiscale label image with "image-label" metadata (no colour list: viewers' palettes)
          0                 (y, x) uint32 at the slide's level-0 pixel grid; value k = the k-th GeoJSON feature
          1, 2, ...         each level the previous one taken every 2nd pixel ("nearest": values are a subset)

The NGFF rule that a label image has as many levels as its image, on the same grid, is why the image is a full
pyramid. Its pixels: with ``image_reader`` (``wsiseg run --zarr-image``) the slide's level-0 pixels, read from the
slide once the labels are written, and their means above; without it a cheap stand-in: the levels at most 2x finer
than the slide's overview are the overview resampled, the finer ones hold no pixels (no files; read as white).

Every array is sharded (zarr v3 ``sharding_indexed``): a shard is one row of :data:`CHUNK` px chunks,
:data:`SHARD_CHUNKS` wide, one file, so a whole slide is a few thousand files instead of one per chunk. The
painter writes a shard whole, once, as its row of chunks goes out (a chunk painted again after that, never seen in a
run, is written on its own: zarr reads the shard back and rewrites it).

Level 0 is built by rasterising each nucleus' polygon (the same polygon written to GeoJSON) into chunks held in
memory only while tiles can still touch them: chunks are flushed as the raster-ordered tiles move down the slide,
so memory holds about two rows of chunks, not the slide. The levels above are built as level 0's chunks go out:
each flushed chunk, taken every 2nd pixel, is a quarter of a level-1 chunk, written once the level-0 rows below it
are out too, and so on up (:class:`_LabelCanvas`); so the pyramid costs no pass over the store at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..core.atomic import commit, discard, os_error, temp_path
from ..io.ngff import OUR_IMAGE, OUR_STAND_IN, STAND_IN_ABOUT
from ..parallel.workers import Helper
from ..wsi.stitch import Nucleus, raster_vertices

CHUNK = 512
#: chunks per shard along x: a shard is one row of chunks, 16,384 px wide (labels: 32 MB assembled in memory)
SHARD_CHUNKS = 32
#: at most this many nuclei are held for the painter process before they are handed over (they are handed over
#: anyway before each flush_above and at the end): each message costs the main thread a pickling, a poll and a pipe
#: write
PAINT_HANDOVER = 512


def _shard_cols(arr, chunk: int) -> int:
    """Chunks per shard along x of the 2-D array ``arr`` when its shards are one row of chunks; else 1 (no
    sharding, or another shard shape: each chunk is written on its own, which zarr merges into its shard)."""
    shards = getattr(arr, "shards", None)
    if not shards or shards[-2] != chunk:
        return 1
    return max(1, shards[-1] // chunk)


class _LabelCanvas:
    """Level 0 being painted: chunks held in memory while tiles can still touch them, written out when told, and
    the pyramid's ``levels`` (1, 2, ...: arrays of the same chunk size, each half the one before) built from them as
    they go out.

    The one place level 0 is painted, whether in the writer's process or in its painter process
    (:class:`_Painter`): the same operations in the same order, so the same raster either way.

    Chunks go out a row at a time, each shard of the row (:data:`SHARD_CHUNKS` chunks) in one write.

    Pyramid: a flushed chunk, every 2nd pixel, fills a quarter of its level-1 chunk (held in memory); a level-1 row
    of chunks is written once :meth:`flush_above` has passed the level-0 rows it covers, and feeds level 2 the same
    way. A chunk painted again after its pyramid chunks were written (never seen in a run: tiles move down the
    slide) sets :attr:`stale`, and the writer then rebuilds the pyramid from the store at the end, as before."""

    def __init__(self, arr, shape: tuple[int, int], chunk: int, levels: list | tuple = ()) -> None:
        self.arr, self.shape, self.chunk = arr, shape, chunk
        self._buf: dict[tuple[int, int], np.ndarray] = {}
        self.flushed: set[tuple[int, int]] = set()
        self.count = 0  # polygons painted with at least one pixel box inside the image
        self.levels = list(levels)
        self.per = _shard_cols(arr, chunk)  # chunks per shard along x (levels alike)
        self._written: list[set[tuple[int, int]]] = [set() for _ in range(1 + len(self.levels))]  # shards, per level
        self.stale = bool(self.levels) and chunk % 2 == 1  # (an odd chunk has no quarters: rebuilt at the end)
        self._acc: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in self.levels]  # level k+1's open chunks
        self._final = [0] * len(self.levels)  # level k+1's chunk rows written (all above this row)

    def paint(self, pts: np.ndarray, lens: np.ndarray, first_label: int) -> None:
        """Rasterise the polygons ``pts`` (raster vertices, :func:`~wsiseg.wsi.stitch.raster_vertices`, ``lens`` per
        polygon) with labels ``first_label, first_label + 1, ...``; a pixel already labelled keeps its label, and
        of two polygons of the call covering a pixel the first one gets it. Painted per chunk: the call's polygons
        are drawn into one scratch window of each chunk they touch, last to first so that the first one wins, then
        the window fills the chunk's still-empty pixels."""
        import cv2

        C = self.chunk
        starts, x0, y0, x1, y1 = _extents(pts, lens, self.shape)
        inside = np.flatnonzero((x1 > x0) & (y1 > y0))
        self.count += len(inside)
        per_chunk: dict[tuple[int, int], list[int]] = {}
        for i in inside.tolist():
            for cy in range(y0[i] // C, (y1[i] - 1) // C + 1):
                for cx in range(x0[i] // C, (x1[i] - 1) // C + 1):
                    per_chunk.setdefault((cy, cx), []).append(i)
        for (cy, cx), idx in per_chunk.items():
            sel = np.asarray(idx)
            # the window holds its nuclei whole (clipped only by the image, as polygon_window clips): OpenCV's fill
            # of a polygon cut by the canvas edge differs from the uncut fill near that edge
            wx0, wy0, wx1, wy1 = int(x0[sel].min()), int(y0[sel].min()), int(x1[sel].max()), int(y1[sel].max())
            scratch = np.zeros((wy1 - wy0, wx1 - wx0), np.int32)
            shift = np.array([wx0, wy0], np.int32)
            for i in reversed(idx):
                cv2.fillPoly(scratch, [pts[starts[i]:starts[i] + lens[i]] - shift], first_label + i)
            ax0, ay0 = max(wx0, cx * C), max(wy0, cy * C)  # the part of the window in this chunk
            ax1, ay1 = min(wx1, (cx + 1) * C), min(wy1, (cy + 1) * C)
            src = scratch[ay0 - wy0:ay1 - wy0, ax0 - wx0:ax1 - wx0]
            dst = self._chunk(cy, cx)[ay0 - cy * C:ay1 - cy * C, ax0 - cx * C:ax1 - cx * C]
            new = (src > 0) & (dst == 0)
            dst[new] = src[new]

    def _chunk(self, cy: int, cx: int) -> np.ndarray:
        key = (cy, cx)
        buf = self._buf.get(key)
        if buf is None:
            C = self.chunk
            buf = np.zeros((C, C), np.uint32)
            if key in self.flushed:  # touched again after a flush: read it back (rare)
                H, W = self.shape
                part = self.arr[cy * C:min((cy + 1) * C, H), cx * C:min((cx + 1) * C, W)]
                buf[:part.shape[0], :part.shape[1]] = part
            self._buf[key] = buf
        return buf

    def flush_above(self, y: float | None) -> None:
        """Write out every buffered chunk lying entirely above level-0 row ``y`` (all of them when ``None``), and
        the pyramid's chunks that are complete then."""
        C = self.chunk
        rows: dict[int, dict[int, np.ndarray]] = {}
        for key in sorted(self._buf):
            cy, cx = key
            if y is not None and (cy + 1) * C > y:
                continue
            rows.setdefault(cy, {})[cx] = self._buf.pop(key)
        for cy, bufs in sorted(rows.items()):
            self._write_row(0, cy, bufs)
            for cx, buf in sorted(bufs.items()):
                self.flushed.add((cy, cx))
                self._quarter(0, cy, cx, buf)
        for k, arr in enumerate(self.levels):  # level k + 1: its rows wholly above y are complete
            rows = -(-arr.shape[0] // C) if y is None else int(y // (C * 2 ** (k + 1)))
            if rows <= self._final[k]:
                continue
            self._final[k] = rows
            done: dict[int, dict[int, np.ndarray]] = {}
            for key in sorted(key for key in self._acc[k] if key[0] < rows):
                acc = self._acc[k].pop(key)
                if acc.any():
                    done.setdefault(key[0], {})[key[1]] = acc
            for oy, accs in sorted(done.items()):
                self._write_row(k + 1, oy, accs)
                for ox, acc in sorted(accs.items()):
                    self._quarter(k + 1, oy, ox, acc)

    def _write_row(self, level: int, cy: int, bufs: dict[int, np.ndarray]) -> None:
        """Write the chunks ``bufs`` (column: chunk, zero past the array's edge) of chunk row ``cy`` of ``level``:
        one write per shard, the whole shard (its other chunks empty: zarr stores no empty chunk) the first time,
        chunk by chunk after that (zarr then merges them into the shard on disk)."""
        arr = self.arr if level == 0 else self.levels[level - 1]
        H, W = arr.shape
        C, per = self.chunk, self.per
        h = min(C, H - cy * C)
        shards: dict[int, list[int]] = {}
        for cx in sorted(bufs):
            shards.setdefault(cx // per, []).append(cx)
        for s, cols in shards.items():
            if per > 1 and (cy, s) not in self._written[level]:
                self._written[level].add((cy, s))
                x0 = s * per * C
                block = np.zeros((h, min(W, x0 + per * C) - x0), np.uint32)
                for cx in cols:
                    w = min(C, W - cx * C)
                    block[:, cx * C - x0:cx * C - x0 + w] = bufs[cx][:h, :w]
                arr[cy * C:cy * C + h, x0:x0 + block.shape[1]] = block
                continue
            for cx in cols:
                w = min(C, W - cx * C)
                arr[cy * C:cy * C + h, cx * C:cx * C + w] = bufs[cx][:h, :w]

    def _quarter(self, k: int, cy: int, cx: int, buf: np.ndarray) -> None:
        """Chunk ``(cy, cx)`` of level ``k`` (``buf``, zero past the level's edge), every 2nd pixel, into its
        quarter of level ``k + 1``'s chunk."""
        if k >= len(self.levels) or self.stale:
            return
        C, half = self.chunk, self.chunk // 2
        oy, ox = cy // 2, cx // 2
        if oy < self._final[k]:  # that chunk is written already: painted again after its flush
            self.stale = True
            return
        acc = self._acc[k].get((oy, ox))
        if acc is None:
            if not buf.any():
                return
            acc = self._acc[k][oy, ox] = np.zeros((C, C), np.uint32)
        qy, qx = (cy % 2) * half, (cx % 2) * half
        acc[qy:qy + half, qx:qx + half] = buf[::2, ::2]


def _extents(pts: np.ndarray, lens: np.ndarray, shape: tuple[int, int]):
    """``(starts, x0, y0, x1, y1)``: each polygon's first vertex and its pixel box clipped to ``shape``."""
    H, W = shape
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    x0 = np.maximum(np.minimum.reduceat(pts[:, 0], starts), 0)
    y0 = np.maximum(np.minimum.reduceat(pts[:, 1], starts), 0)
    x1 = np.minimum(np.maximum.reduceat(pts[:, 0], starts) + 1, W)
    y1 = np.minimum(np.maximum.reduceat(pts[:, 1], starts) + 1, H)
    return starts, x0, y0, x1, y1


class ZarrLabelWriter:
    """The nuclei label pyramid of one slide (module doc), written as tiles finish: :meth:`write` each stitched
    call's nuclei, :meth:`flush_above` as the tiles move down the slide; leaving the context writes the rest, the
    pyramid, the image pyramid and the metadata, then moves the store into place (or removes it on an error).

    The image pyramid: ``image_reader(x, y, w, h)``, when given, returns the slide's level-0 RGB pixels of that
    region, ``(h, w, 3)`` uint8; they are read a shard at a time after the labels are written (the tiles the model
    saw are at its resolution, not level 0's, and only where there is tissue). Without it, ``overview`` (an RGB
    thumbnail and its downsample, level-0 px per pixel; or a ``concurrent.futures.Future`` of them, waited for when
    the context is left) fills the levels at most 2x finer than it; with a painter process, that process writes
    them once the overview is known, while the run goes on.

    ``paint_process``: paint level 0 and write its chunks and the pyramid's in a process of its own
    (:class:`_Painter`), so that the caller's loop only hands over each call's polygon vertices: the same raster
    (one painting code, the same order), off the caller's thread. When that process cannot
    start, the painting stays here (a warning; the same outputs); when it fails or dies, leaving the context raises
    :class:`OutputError`."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], mpp: float | None,
                 overview: tuple[np.ndarray, float] | Future | None = None, min_size: int = 256,
                 chunk: int = CHUNK, paint_process: bool = False,
                 image_reader: Callable[[int, int, int, int], np.ndarray] | None = None) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.existed = self.path.exists()  # (another run's store appearing meanwhile is never replaced: commit)
        self.shape = (int(shape[0]), int(shape[1]))  # (height, width) level 0
        self.mpp = mpp or 1.0
        self.unit = "micrometer" if mpp else None
        self._overview = overview
        self.min_size = min_size
        self.chunk = chunk
        self.paint_process = paint_process
        self.image_reader = image_reader
        self._arr = None
        self._levels: list = []  # the arrays of levels 0, 1, ...
        #: whether the pyramid was rebuilt from the store at the end (see _LabelCanvas; known once the context is left)
        self.pyramid_rebuilt = False
        self._canvas: _LabelCanvas | None = None
        self._painter: Helper | None = None  # (the painter process: _Painter)
        self._to_paint: list[tuple[np.ndarray, np.ndarray, int]] = []  # write calls held for the painter
        self._to_paint_n = 0  # the nuclei they hold
        self._image_arrays: list | None = None  # the image pyramid's arrays, once made
        self._image_handed = False  # whether the painter process writes the overview stand-in (_hand_over_image)
        #: nuclei painted with a pixel inside the image (with a painter process: known once the context is left)
        self.count = 0

    @property
    def overview(self) -> tuple[np.ndarray | None, float]:
        """The overview and its downsample (``(None, 1.0)`` without one)."""
        ov = self._overview
        if isinstance(ov, Future):
            ov = ov.result()
        return ov if ov is not None else (None, 1.0)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ZarrLabelWriter":
        import zarr

        try:
            self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
            self.labels_grp = self.root.create_group("labels")
            self.label_grp = self.labels_grp.create_group("nuclei")
            self._levels = []
            for i, shape in enumerate(self._shapes()):
                self._levels.append(self.label_grp.create_array(
                    str(i), shape=shape, chunks=(self.chunk, self.chunk),
                    shards=(self.chunk, self.chunk * SHARD_CHUNKS), dtype="uint32", fill_value=0,
                    dimension_names=("y", "x")))
            self._arr = self._levels[0]
        except OSError as e:
            discard(self.tmp)
            raise os_error(e, self.path) from None
        if self.paint_process:
            self._painter = _Painter.start(self.tmp / "labels" / "nuclei", len(self._levels), self.shape,
                                           self.chunk)
        if self._painter is None:
            self._canvas = _LabelCanvas(self._arr, self.shape, self.chunk, self._levels[1:])
        return self

    def _shapes(self) -> list[tuple[int, int]]:
        """The pyramid's level shapes: level 0, then each half the one before (rounded up) while the last one is
        larger than ``min_size``."""
        shapes = [self.shape]
        while max(shapes[-1]) > self.min_size:
            shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
        return shapes

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._painter is not None:
                self._painter.kill()
            discard(self.tmp)
            return
        try:
            flushed, self.pyramid_rebuilt = self._finish_canvas()
            if self.pyramid_rebuilt:  # (see _LabelCanvas)
                self._pyramid(flushed)
            shapes = [tuple(a.shape) for a in self._levels]
            self._image(shapes)
            self._metadata(shapes)
        except OSError as e:
            discard(self.tmp)
            raise os_error(e, self.path) from None
        except BaseException:
            discard(self.tmp)
            raise
        commit(self.tmp, self.path, existed=self.existed)

    def _finish_canvas(self) -> tuple[set[tuple[int, int]], bool]:
        """Write out level 0's remaining chunks and the pyramid's; the level-0 chunks written (the painter's, when
        it painted) and whether the pyramid must be rebuilt (:attr:`_LabelCanvas.stale`)."""
        if self._painter is None:
            self._canvas.flush_above(None)
            self.count = self._canvas.count
            return self._canvas.flushed, self._canvas.stale
        self._paint_out()
        if not self._image_handed:
            self._hand_over_image()
        painter, self._painter = self._painter, None
        _, flushed, self.count, stale = painter.finish(self.path)
        return {tuple(k) for k in flushed}, stale

    # ------------------------------------------------------------------ level 0
    def write(self, nuclei: list[Nucleus], first_label: int) -> None:
        """Rasterise ``nuclei`` with labels ``first_label, first_label + 1, ...``; a pixel already labelled keeps
        its label, and of two nuclei of the call covering a pixel the first one gets it.

        The same raster as :func:`wsiseg.wsi.stitch.polygon_window` (:func:`~wsiseg.wsi.stitch.raster_vertices`,
        OpenCV's ``fillPoly``), painted per chunk (:meth:`_LabelCanvas.paint`)."""
        if not nuclei:
            return
        self.write_polygons(np.concatenate([n.polygon for n in nuclei]),
                            np.fromiter((len(n.polygon) for n in nuclei), np.int64, len(nuclei)), first_label)

    def write_polygons(self, polygons: np.ndarray, lens: np.ndarray, first_label: int) -> None:
        """:meth:`write` of outlines given joined (``polygons``, level-0 (x, y)) with the vertices of each
        (``lens``), as a :class:`~wsiseg.wsi.stitch.NucleusBlock` holds them."""
        if not len(lens):
            return
        pts = raster_vertices(polygons)
        lens = np.asarray(lens, np.int64)
        try:
            if self._painter is not None:
                # calls whose labels follow on are handed over together (one message instead of one per call: the
                # painter paints them as one call, which labels every pixel as the calls one by one would)
                last = self._to_paint[-1] if self._to_paint else None
                if last is not None and last[2] + len(last[1]) != first_label:
                    self._paint_out()
                self._to_paint.append((pts, lens, first_label))
                self._to_paint_n += len(lens)
                if self._to_paint_n >= PAINT_HANDOVER:
                    self._paint_out()
            else:
                self._canvas.paint(pts, lens, first_label)
        except OSError as e:
            raise os_error(e, self.path) from None

    def _paint_out(self) -> None:
        """Hand the calls held for the painter over, as one (:meth:`write`)."""
        calls, self._to_paint, self._to_paint_n = self._to_paint, [], 0
        if calls:
            pts = np.concatenate([c[0] for c in calls]) if len(calls) > 1 else calls[0][0]
            lens = np.concatenate([c[1] for c in calls]) if len(calls) > 1 else calls[0][1]
            self._painter.send(("paint", pts, lens, calls[0][2]), self.path)

    def flush_above(self, y: float | None) -> None:
        """Write out every buffered chunk lying entirely above level-0 row ``y`` (all of them when ``None``)."""
        try:
            if self._painter is not None:
                self._paint_out()
                self._painter.send(("flush", y), self.path)
                ov = self._overview
                if not self._image_handed and (not isinstance(ov, Future) or ov.done()):
                    self._hand_over_image()
            else:
                self._canvas.flush_above(y)
        except OSError as e:
            raise os_error(e, self.path) from None

    def _hand_over_image(self) -> None:
        """Have the painter process write the overview stand-in (:func:`_write_overview`) while the run goes on,
        instead of this thread at the end: once, when the overview is known, without ``image_reader``."""
        self._image_handed = True
        if self.image_reader is not None:
            return
        ov, ds = self.overview
        if ov is None:
            return
        self._image_levels()
        self._painter.send(("image", str(self.tmp), len(self._levels), ov, ds), self.path)

    # ------------------------------------------------------------------ pyramid + metadata
    def _pyramid(self, flushed: set[tuple[int, int]]) -> None:
        """Levels 1.. rebuilt from the store by nearest downsampling (every 2nd pixel), one output shard at a time
        (bounded memory: one shard and one source chunk): the rare fallback of the pyramid built as level 0 goes
        out (:class:`_LabelCanvas`).

        Only output chunks whose source chunks hold labels (level 0's: ``flushed``) are computed: on a huge,
        mostly empty slide the time follows the tissue, not the slide's area. (Labels are only ever added, so every
        chunk written before holds labels again, and each shard holding one is written whole again.)"""
        prev = self._arr
        C = self.chunk
        filled = set(flushed)  # chunks of the previous level that received labels
        for arr in self._levels[1:]:
            h, w = arr.shape
            per = _shard_cols(arr, C)
            filled = {(cy // 2, cx // 2) for cy, cx in filled}  # output chunk (oy, ox) reads (2oy.., 2ox..)
            shards: dict[tuple[int, int], list[int]] = {}
            for oy, ox in sorted(filled):
                shards.setdefault((oy, ox // per), []).append(ox)
            for (oy, sx), cols in sorted(shards.items()):
                y, x0 = oy * C, sx * per * C
                block = np.zeros((min(C, h - y), min(w, x0 + per * C) - x0), np.uint32)
                for ox in cols:
                    x = ox * C
                    sub = prev[2 * y:2 * min(y + C, h), 2 * x:2 * min(x + C, w)][::2, ::2]
                    block[:, x - x0:x - x0 + sub.shape[1]] = sub
                if block.any():
                    try:
                        arr[y:y + block.shape[0], x0:x0 + block.shape[1]] = block
                    except OSError as e:
                        raise os_error(e, self.path) from None
            prev = arr

    # ------------------------------------------------------------------ image pyramid
    def _image(self, shapes: list[tuple[int, int]]) -> None:
        """The image group's RGB pyramid, on the labels' levels (module doc): the slide's pixels read through
        ``image_reader``, or the overview stand-in."""
        C = self.chunk
        arrs = self._image_levels()
        if self.image_reader is None:
            if not self._image_handed:  # (else the painter process wrote it)
                ov, ds = self.overview
                _write_overview(arrs, ov, ds)
            return
        H, W = shapes[0]
        S = C * SHARD_CHUNKS
        for y in range(0, H, C):  # level 0: a shard at a time
            for x in range(0, W, S):
                h, w = min(C, H - y), min(S, W - x)
                arrs[0][:, y:y + h, x:x + w] = np.moveaxis(self.image_reader(x, y, w, h), -1, 0)
        for prev, arr in zip(arrs, arrs[1:]):  # each level the 2x2 mean of the one below, a shard at a time
            _, h, w = arr.shape
            for y in range(0, h, C):
                for x0 in range(0, w, S):
                    hh, ww = min(C, h - y), min(S, w - x0)
                    block = np.empty((3, hh, ww), np.uint8)
                    for x in range(x0, x0 + ww, 8 * C):  # source read 8 output chunks wide (25 MB)
                        xw = min(8 * C, x0 + ww - x)
                        block[:, :, x - x0:x - x0 + xw] = _halve(prev[:, 2 * y:2 * (y + hh), 2 * x:2 * (x + xw)],
                                                                  hh, xw)
                    arr[:, y:y + hh, x0:x0 + ww] = block

    def _image_levels(self) -> list:
        """The image pyramid's arrays (``(3, h, w)`` uint8 on the labels' level shapes, white where unwritten), made
        when first asked for."""
        if self._image_arrays is None:
            C = self.chunk
            self._image_arrays = [
                self.root.create_array(str(i), shape=(3, *a.shape), chunks=(3, C, C), shards=(3, C, C * SHARD_CHUNKS),
                                       dtype="uint8", fill_value=255, dimension_names=("c", "y", "x"))
                for i, a in enumerate(self._levels)]
        return self._image_arrays

    def _axes(self, names: tuple[str, ...]) -> list[dict]:
        out = []
        for n in names:
            ax = {"name": n, "type": "channel" if n == "c" else "space"}
            if n != "c" and self.unit:
                ax["unit"] = self.unit
            out.append(ax)
        return out

    def _metadata(self, shapes: list[tuple[int, int]]) -> None:
        datasets = [{"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [self.mpp * 2 ** i, self.mpp * 2 ** i]}]} for i in range(len(shapes))]
        self.label_grp.attrs["ome"] = {
            "version": "0.5",
            # "type": how each level comes from the one below (every second pixel: nearest, as labels need)
            "multiscales": [{"name": "nuclei", "type": "nearest", "axes": self._axes(("y", "x")),
                             "datasets": datasets}],
            # no "colors": a colour list maps only the labels it names and napari draws every other one transparent;
            # without one, viewers colour each label from their own cycling palette
            "image-label": {"version": "0.5", "source": {"image": "../../"}},
        }
        self.labels_grp.attrs["ome"] = {"version": "0.5", "labels": ["nuclei"]}
        # the image the labels belong to: as many levels, the same scales (NGFF); pixels: see _image
        if self.image_reader is not None:
            name, about = OUR_IMAGE, "the slide's level-0 pixels; each level the 2x2 mean of the one below"
        else:
            ov = self.overview[0]
            held = "no pixels (white)" if ov is None else (
                f"the levels at most 2x finer than the slide's overview ({ov.shape[1]} x {ov.shape[0]} px) are it "
                "resampled, the finer ones hold no pixels (white)")
            name, about = OUR_STAND_IN, (f"{STAND_IN_ABOUT}, not the slide's pixels: {held}; wsiseg run "
                                         "--zarr-image writes the slide's pixels")  # (io.ngff reads both back)
        self.root.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [{"name": name, "type": "local_mean", "axes": self._axes(("c", "y", "x")),
                             "datasets": [{"path": d["path"], "coordinateTransformations": [
                                 {"type": "scale", "scale": [1.0, *d["coordinateTransformations"][0]["scale"]]}]}
                                 for d in datasets],
                             "metadata": {"description": about}}],
            "omero": {"channels": [{"label": c, "color": col, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                                   for c, col in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))],
                      "rdefs": {"model": "color"}},
        }


def _write_overview(arrs: list, ov: np.ndarray | None, ds: float) -> None:
    """The image pyramid's stand-in without the slide's pixels, into ``arrs`` (levels 0, 1, ...): each level at most
    2x finer than the overview ``ov`` (``ds`` level-0 px a pixel) is the overview resampled to it (area mean;
    bilinear when enlarging); the finer levels are left empty (white). Written by :class:`ZarrLabelWriter` or, with
    a painter process, there (:meth:`ZarrLabelWriter._hand_over_image`)."""
    import cv2

    if ov is None:
        return
    for k, arr in enumerate(arrs):
        if 2 ** (k + 1) < ds:
            continue
        _, h, w = arr.shape
        img = cv2.resize(ov, (w, h), interpolation=cv2.INTER_AREA if w <= ov.shape[1] else cv2.INTER_LINEAR)
        arr[...] = np.moveaxis(img.reshape(h, w, 3), -1, 0)


def _halve(src: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(c, h, w)``: the 2x2 means (rounded) of ``src`` ``(c, <= 2h, <= 2w)`` uint8, its last row and column
    repeated where it is short (an odd level's edge)."""
    import cv2

    ph, pw = 2 * h - src.shape[1], 2 * w - src.shape[2]
    if ph or pw:
        src = np.pad(src, ((0, 0), (0, ph), (0, pw)), mode="edge")
    # (OpenCV's area resampling at exactly 1/2 is (a + b + c + d + 2) >> 2, the same bytes as numpy's sums in uint16,
    # and far faster: docs/speed.md)
    out = np.empty((src.shape[0], h, w), np.uint8)
    for ch, o in zip(src, out):  # (a channel at a time, into the level's array: no stacked copy)
        cv2.resize(np.ascontiguousarray(ch), (w, h), dst=o, interpolation=cv2.INTER_AREA)
    return out


class _Painter:
    """Level 0 and the pyramid painted in a process of its own (:class:`ZarrLabelWriter`'s ``paint_process``):
    ``python -m wsiseg.export.zarr_labels`` (a :class:`~wsiseg.parallel.workers.Helper`: a fresh interpreter importing
    numpy, OpenCV and zarr only) opens the level arrays the writer created and runs :class:`_LabelCanvas` on the
    messages it is sent, in order: ``("paint", pts, lens, first_label)``, ``("flush", y)``, ``("image", group path,
    levels, overview, downsample)`` (the image pyramid's stand-in, :func:`_write_overview`), then the end, after which
    it writes the rest and answers ``("ok", level-0 chunks written, polygons painted, stale)``."""

    NAME = "label painter process"

    @staticmethod
    def start(group_path: Path, levels: int, shape: tuple[int, int], chunk: int) -> Helper | None:
        """The :class:`~wsiseg.parallel.workers.Helper` painting arrays ``0`` (level 0) to ``levels - 1`` (the
        pyramid) of the group at ``group_path``; None (and a warning) when it cannot start."""
        import json

        spec = json.dumps({"path": str(group_path), "levels": levels, "shape": list(shape), "chunk": chunk})
        return Helper.start("wsiseg.export.zarr_labels", spec, _Painter.NAME,
                            "painting the labels here (same outputs)")

    @staticmethod
    def begin(spec: dict) -> _LabelCanvas:
        import zarr

        arrays = [zarr.open_array(f"{spec['path']}/{i}", mode="r+") for i in range(int(spec["levels"]))]
        return _LabelCanvas(arrays[0], tuple(spec["shape"]), int(spec["chunk"]), arrays[1:])

    @staticmethod
    def handle(level: _LabelCanvas, msg: tuple) -> None:
        if msg[0] == "paint":
            level.paint(*msg[1:])
        elif msg[0] == "image":
            import zarr

            _, root, levels, ov, ds = msg
            _write_overview([zarr.open_array(f"{root}/{i}", mode="r+") for i in range(levels)], ov, ds)
        else:
            level.flush_above(msg[1])

    @staticmethod
    def end(level: _LabelCanvas) -> tuple:
        level.flush_above(None)
        return sorted(level.flushed), level.count, level.stale


def read_zarr_labels(path: str | os.PathLike, level: int = 0) -> np.ndarray:
    """Level ``level`` of the nuclei label pyramid of an OME-Zarr store written by :class:`ZarrLabelWriter`, as a
    numpy array (label images of other files: :func:`wsiseg.eval.evaluate.read_label_image`)."""
    import zarr

    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["labels"]["nuclei"][str(level)][...])


if __name__ == "__main__":  # a _Painter's process
    import sys

    from ..parallel.workers import serve

    serve(sys.argv[1:], _Painter.begin, _Painter.handle, _Painter.end)
