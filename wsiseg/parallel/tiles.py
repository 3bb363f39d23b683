"""The per-tile CPU work of a run (candidates, outlines, GeoJSON encoding), in worker processes when asked for.

``segment_slide`` hands each predicted tile to a :class:`TilePool` and feeds what comes back, in raster order, to
the :class:`~wsiseg.wsi.stitch.Stitcher`, which then only decides the seam candidates. Everything that needs one tile
alone runs in the pool (:func:`prepare`):

- the tissue mask's second guard (:func:`wsiseg.wsi.grid.keep_in_tissue`: no nucleus centred off the tissue);
- the tile's candidates (:func:`wsiseg.wsi.stitch.propose`): the nuclei final at once and the seam candidates;
- the outline and measurements of each (:func:`wsiseg.wsi.stitch.outline_items`), and its GeoJSON feature, encoded
  but for the id and the label, which only the writer knows (:func:`wsiseg.export.geojson.features_parts`).

With workers in a run (``bands=True``), the seam candidates never pass through the main process: each tile's
travel packed and pickled (:attr:`~wsiseg.wsi.stitch.Proposal.seam`), the main process hands a band of rows' to a
worker (:meth:`TilePool.decide`, :func:`decide_band`), which decides the band's seams, outlines and encodes the
nuclei it accepts, and gives them back in the stitcher's order (:class:`~wsiseg.parallel.seams.BandStitcher`
schedules and checks the bands). Without ``bands``, seam candidates are outlined ahead too ("eager") and decided by the
caller's stitcher, and those whose masks a decision trims are outlined again by a worker (:meth:`TilePool.outline`);
without workers, in the main process (:func:`finish`), where nothing is outlined before it is decided. Outlines and
encodings depend on the mask alone, so the outputs are the same, byte for byte, for any number of workers (tested).
"""

from __future__ import annotations

import pickle
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

from ..segmenters.base import TileInstances
from ..wsi.grid import TileGrid, keep_in_tissue
from ..wsi.stains import SlideStain, stain_rows, stains_of_rows
from ..wsi.stitch import Candidate, Decided, Nucleus, NucleusBlock, Proposal, outline_items, propose
from ..wsi.tissue import TissueMask
from .workers import end_worker, ready_check, remove_slab, slab_file, spawn_worker

#: a prepared item: its nucleus (None: the mask has no outline) and its encoded GeoJSON feature parts
Ready = tuple  # (Nucleus | None, tuple[bytes, bytes] | None)


def _encode(items: list, scale: float, mpp: float) -> list[Ready]:
    from ..export.geojson import features_parts

    nuclei = outline_items(Decided(items, scale, mpp))
    parts = iter(features_parts([n for n in nuclei if n is not None]))
    return [(n, next(parts) if n is not None else None) for n in nuclei]


def prepare(grid: TileGrid, margin: int, mpp: float, tiles: list[tuple], eager: bool,
            tissue: TissueMask | None = None, stain: SlideStain = SlideStain()) -> list[Proposal]:
    """Proposals of ``tiles`` (``(row, col, labels, scores, stains, pixels)`` each, as :class:`TileInstances` holds
    them; :func:`~wsiseg.wsi.stitch.propose` measures the stains from the pixels), the instances centred off
    ``tissue`` left out first, with the results of their safe items (and, when ``eager``, of their seam candidates)
    computed: the job a :class:`TilePool` worker runs."""
    insts = [(r, c, TileInstances(lab, sc, st, px)) for r, c, lab, sc, st, px in tiles]
    if tissue is not None:
        insts = [(r, c, keep_in_tissue(t, tissue, grid, r, c)) for r, c, t in insts]
    props = [propose(grid, margin, r, c, t, stain) for r, c, t in insts]
    items: list = []
    for p in props:
        items.extend(p.safe)
        if eager:
            items.extend((c.mask, c.box[0], c.box[1], c.score, c.stains) for c in p.pending)
    done = _encode(items, grid.scale, mpp)
    k = 0
    for p in props:
        p.safe_ready = done[k:k + len(p.safe)]
        k += len(p.safe)
        if eager:
            for c in p.pending:
                c.ready = done[k]
                k += 1
    return props


def split(props: list[Proposal]) -> list[Proposal]:
    """``props`` with their seam candidates packed (:attr:`Proposal.seam`, for a band's decider: the main process
    never unpacks them) instead of listed, without results (the decider outlines those it accepts)."""
    for p in props:
        if p.pending:
            cands = [replace(c, ready=(None, None)) for c in p.pending]
            d = pack([Proposal(p.row, p.col, [], cands, 0, [])])
            d["masks"] = np.packbits(d["masks"])  # (an eighth of the bytes to hand on: most of them)
            # (one bytes object: the main process hands it on whole, pickling it costs a copy, not an array each)
            p.seam = pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL)
            p.seam_count = len(cands)
            p.pending = []
    return props


def by_tile(cands: list[Candidate]) -> list[Proposal]:
    """``cands`` as proposals of their tiles (consecutive runs of one tile), for :func:`pack` or :func:`split`."""
    out: list[Proposal] = []
    for c in cands:
        if not out or (out[-1].row, out[-1].col) != c.tile:
            out.append(Proposal(c.tile[0], c.tile[1], [], [], 0, []))
        out[-1].pending.append(c)
    return out


def pack_candidates(cands: list[Candidate]) -> dict[str, Any]:
    """Decided seam nuclei (masks as trimmed, results left out) packed like :func:`pack`'s candidates, for
    :func:`unpack_candidates`."""
    return pack(by_tile([replace(c, ready=(None, None)) for c in cands]))


def unpack_candidates(d: dict[str, Any] | bytes | None) -> list[Candidate]:
    """The candidates of :func:`pack_candidates` (or of :attr:`Proposal.seam`: pickled), in order."""
    if isinstance(d, bytes):
        d = pickle.loads(d)
        d["masks"] = np.unpackbits(d["masks"], count=int(np.dot(d["shape"][:, 0], d["shape"][:, 1]))).view(bool)
    return [c for p in unpack(d) for c in p.pending] if d is not None else []


def same_packed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`pack_candidates` results hold the same candidates (every array equal: the packing is
    a function of the candidates), without unpacking them."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] if isinstance(a[k], bytes) else np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")
        for k in a)  # (no stains measured: NaN rows, equal)


def decide_band(grid: TileGrid, mpp: float, job: dict[str, Any]) -> dict[str, Any]:
    """A band's seam decisions (:func:`~wsiseg.wsi.bands.decide_rows`), the job a worker runs for
    :class:`~wsiseg.parallel.seams.BandStitcher`: ``job["rows"]`` decided in order from ``job["before"]`` (packed
    candidates; the first row is a guess when ``job["guess"]``), with the packed candidates of every row they read
    (``job["seams"]``). Gives, per decided row but the guess, its items with their outlines and GeoJSON parts
    (made there, packed like a :class:`Proposal`'s safe items) and its dropped count; per row, the boundary of its
    accepted nuclei with the next row's candidates (:func:`~wsiseg.wsi.stitch.boundary`); for a guess, its boundary
    with the band's first row."""
    from ..wsi.bands import decide_rows
    from ..wsi.stitch import boundary

    pending = {int(r): [c for d in ds for c in unpack_candidates(d)] for r, ds in job["seams"].items()}
    rows = job["rows"]
    decs = decide_rows(pending, rows, unpack_candidates(job["before"]))
    out: dict[str, Any] = {"rows": {}, "bounds": {}, "guess": None}
    if job["guess"]:
        out["guess"] = pack_candidates(boundary(decs[rows[0]].accepted, pending.get(rows[1], [])))
        rows = rows[1:]
    for r in rows:
        d = decs[r]
        out["rows"][r] = (pack([Proposal(r, 0, d.items, [], 0, _encode(d.items, grid.scale, mpp))]), d.dropped)
        out["bounds"][r] = pack_candidates(boundary(d.accepted, pending.get(r + 1, [])))
    return out


def finish(decided: Decided) -> tuple[list[Nucleus], list[tuple[bytes, bytes]]]:
    """The nuclei of ``decided`` and their encoded GeoJSON parts, in order: the prepared results where there are
    some (:attr:`Decided.ready`), computed here for the rest; items without an outline are left out."""
    ready = decided.ready if decided.ready is not None else [None] * len(decided.items)
    todo = [i for i, r in enumerate(ready) if r is None]
    if todo:
        ready = list(ready)
        for i, r in zip(todo, _encode([decided.items[i] for i in todo], decided.scale, decided.mpp)):
            ready[i] = r
    nuclei, parts = [], []
    for n, enc in ready:
        if n is not None:
            nuclei.append(n)
            parts.append(enc)
    return nuclei, parts


@dataclass
class Outlined:
    """What :meth:`TilePool.outline` gives back for its ``ticket``: a ``(Nucleus | None, parts | None)`` per item,
    as :func:`finish` would have computed them here."""

    ticket: int
    ready: list


@dataclass
class Banded:
    """What :meth:`TilePool.decide` gives back for its ``ticket``: :func:`decide_band`'s result."""

    ticket: int
    result: dict


@dataclass
class _DecideJob:
    """A job of :meth:`TilePool.decide`: its ``ticket`` and what :func:`decide_band` is given."""

    ticket: int
    job: dict


@dataclass
class _OutlineJob:
    """A job of :meth:`TilePool.outline`: its ``ticket`` and the items to outline."""

    ticket: int
    items: list


# ---------------------------------------------------------------------------------------------- packed results
def pack(props: list[Proposal]) -> dict[str, Any]:
    """Eagerly prepared proposals as a few flat arrays and one bytes blob (what a worker sends back): unpickling
    them costs the main process a few array copies instead of thousands of small objects. Safe items travel
    without their masks (their results are there); seam candidates with theirs. Stain measurements travel as
    float64 rows (NaN: none), exactly."""
    rows, cols, cut, nsafe, npend = [], [], [], [], []
    x0, y0, score, stains, prim, shapes, masks = [], [], [], [], [], [], []
    has, polys, plen, meas, blob, blen, area = [], [], [], [], [], [], []
    for p in props:
        rows.append(p.row)
        cols.append(p.col)
        cut.append(p.cut_dropped)
        nsafe.append(len(p.safe))
        npend.append(len(p.pending))
        entries = [(m, gx, gy, sc, st, True, r) for (m, gx, gy, sc, st), r in zip(p.safe, p.safe_ready)]
        entries += [(c.mask, c.box[0], c.box[1], c.score, c.stains, c.primary, c.ready) for c in p.pending]
        for k, (m, gx, gy, sc, st, pr, (n, enc)) in enumerate(entries):
            x0.append(gx)
            y0.append(gy)
            score.append(sc)
            stains.append(st)
            prim.append(pr)
            shapes.append(m.shape)
            if k >= len(p.safe):
                masks.append(m.ravel())
                area.append(int(np.count_nonzero(m)))  # (what a seam decision counts first, counted here)
            has.append(n is not None)
            if n is not None:
                polys.append(n.polygon)
                plen.append(len(n.polygon))
                meas.append((n.area_px, n.area_um2, n.perimeter_um, *n.centroid, *n.bbox))
                blob += enc
                blen += (len(enc[0]), len(enc[1]))
    return {
        "tiles": np.array([rows, cols, cut, nsafe, npend], np.int64).reshape(5, -1),
        "x0": np.array(x0, np.int64), "y0": np.array(y0, np.int64), "score": np.array(score, np.float64),
        "stains": stain_rows(stains),
        "primary": np.array(prim, bool), "shape": np.array(shapes, np.int64).reshape(-1, 2),
        "masks": np.concatenate(masks) if masks else np.zeros(0, bool), "area": np.array(area, np.int64),
        "has": np.array(has, bool), "plen": np.array(plen, np.int64),
        "poly": np.concatenate(polys) if polys else np.zeros((0, 2)),
        "meas": np.array(meas, np.float64).reshape(-1, 9), "blob": b"".join(blob), "blen": np.array(blen, np.int64),
        **({"seam": [(p.seam, p.seam_count) for p in props]} if any(p.seam is not None for p in props) else {}),
    }


def unpack_blocks(d: dict[str, Any]) -> list[Proposal]:
    """:func:`pack`'s proposals with their safe nuclei as one :class:`~wsiseg.wsi.stitch.NucleusBlock` each (slices
    of the packed columns: nothing made per nucleus) and their seam candidates packed (:func:`split`); the safe
    items' masks are not shipped, so ``safe`` stays empty."""
    rows, cols, cut, nsafe, npend = d["tiles"].tolist()
    has = d["has"]
    hcum = np.concatenate([[0], np.cumsum(has)]).tolist()  # nuclei before each item
    pstart = np.concatenate([[0], np.cumsum(d["plen"])]).tolist()
    bstart = np.concatenate([[0], np.cumsum(d["blen"])]).tolist()
    poly, plen, meas, blob, blen = d["poly"], d["plen"], d["meas"], d["blob"], d["blen"]
    score, stains = d["score"], d["stains"]
    out = []
    i = 0  # item cursor
    for r, c, cd, ns, npd in zip(rows, cols, cut, nsafe, npend):
        j0, j1 = hcum[i], hcum[i + ns]
        keep = has[i:i + ns]
        block = NucleusBlock(poly[pstart[j0]:pstart[j1]], plen[j0:j1], meas[j0:j1], score[i:i + ns][keep],
                             stains[i:i + ns][keep], blob[bstart[2 * j0]:bstart[2 * j1]], blen[2 * j0:2 * j1])
        out.append(Proposal(r, c, [], [], cd, [], block=block))
        i += ns + npd
    for p, (seam, count) in zip(out, d.get("seam", ())):
        p.seam, p.seam_count = seam, count
    return out


def block_of(d: dict[str, Any]) -> NucleusBlock:
    """The nuclei of one packed proposal's safe items (:func:`decide_band`'s rows) as a block."""
    (p,) = unpack_blocks(d)
    return p.block


def unpack(d: dict[str, Any]) -> list[Proposal]:
    """:func:`pack`'s proposals again (the same nuclei and masks, values bit for bit)."""
    from ..wsi.stitch import Candidate

    rows, cols, cut, nsafe, npend = d["tiles"].tolist()
    x0, y0, score, prim = d["x0"].tolist(), d["y0"].tolist(), d["score"].tolist(), d["primary"].tolist()
    stains = stains_of_rows(d["stains"])
    shapes, has = d["shape"].tolist(), d["has"].tolist()
    masks, poly, meas, blob, area = d["masks"], d["poly"], d["meas"].tolist(), d["blob"], d["area"].tolist()
    pstart = np.concatenate([[0], np.cumsum(d["plen"])]).tolist()
    bstart = np.concatenate([[0], np.cumsum(d["blen"])]).tolist()
    out = []
    i = j = m = q = 0  # item, nucleus, mask-bit, seam candidate cursors
    for r, c, cd, ns, npd in zip(rows, cols, cut, nsafe, npend):
        safe, ready, pend = [], [], []
        for k in range(ns + npd):
            if has[i]:
                a, ar, pe, cx, cy, b0, b1, b2, b3 = meas[j]
                n = Nucleus(poly[pstart[j]:pstart[j + 1]], score[i], a, ar, pe, (cx, cy), (b0, b1, b2, b3),
                            stains[i])
                res = (n, (blob[bstart[2 * j]:bstart[2 * j + 1]], blob[bstart[2 * j + 1]:bstart[2 * j + 2]]))
                j += 1
            else:
                res = (None, None)
            h, w = shapes[i]
            if k < ns:
                safe.append((None, x0[i], y0[i], score[i], stains[i]))
                ready.append(res)
            else:
                mask = masks[m:m + h * w].reshape(h, w)
                m += h * w
                pend.append(Candidate((r, c), (x0[i], y0[i], x0[i] + w, y0[i] + h), mask, score[i], prim[i], res,
                                      area[q], stains[i]))
                q += 1
            i += 1
        out.append(Proposal(r, c, safe, pend, cd, ready))
    return out


# ------------------------------------------------------------------------------------------------------ the pool
def slab_bytes(shape: tuple[int, ...]) -> int:
    """The size of a slab: ``shape`` (``(..., tile, tile)``: a pool's tile places, a predicting process' slots of a
    batch) of int32 labels, then as many tiles' RGB (then, in a pool whose run has one, the tissue mask:
    :func:`map_tissue`)."""
    return int(np.prod(shape)) * (4 + 3)


def map_slab(path: str, shape: tuple[int, ...], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The label and pixel arrays of a slab (plain ndarray views: a memmap subclass' views cost a Python call
    each)."""
    labels = np.memmap(path, np.int32, mode=mode, shape=shape).view(np.ndarray)
    pixels = np.memmap(path, np.uint8, mode=mode, offset=int(np.prod(shape)) * 4, shape=(*shape, 3)).view(np.ndarray)
    return labels, pixels


def map_tissue(path: str, shape: tuple[int, ...], tissue: tuple, mode: str) -> TissueMask:
    """The tissue mask stored after a slab's tiles: ``tissue`` is its ``(height, width, downsample[, roi_bytes])``;
    with ``roi_bytes`` > 0 its regions of interest follow the mask, as that many bytes of WKB, and are read back
    (mode ``"r"``; written by :meth:`TilePool._start`)."""
    h, w, ds, roi_bytes = (*tissue, 0)[:4]
    offset = slab_bytes(shape)
    mask = np.memmap(path, np.bool_, mode=mode, offset=offset, shape=(int(h), int(w))).view(np.ndarray)
    roi = None
    if roi_bytes and mode == "r":
        import shapely

        wkb = np.memmap(path, np.uint8, mode="r", offset=offset + int(h) * int(w), shape=(int(roi_bytes),))
        roi = shapely.from_wkb(wkb.tobytes())
        shapely.prepare(roi)
    return TissueMask(mask, float(ds), roi)


def _serve(jobs: Any, results: Any, slab_path: str, slab_shape: tuple[int, ...], grid: TileGrid, margin: int,
           mpp: float, tissue: tuple | None, bands: bool = False, stain: SlideStain = SlideStain()) -> None:
    """A worker: map the input slab (and the tissue mask after it, if any), then prepare each job it is sent, until
    ``None`` (or its parent is gone)."""
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which then stops the workers
    slab, pixels = map_slab(slab_path, slab_shape, "r")
    mask = map_tissue(slab_path, slab_shape, tissue, "r") if tissue is not None else None
    while True:
        try:
            job = jobs.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        at, tiles = job
        try:
            if at == "outline":  # seam nuclei whose masks a decision trimmed (TilePool.outline)
                out = ("ok", _encode(tiles, grid.scale, mpp))
            elif at == "decide":  # a band of seam decisions (TilePool.decide), in a file (TilePool._job_file)
                out = ("ok", decide_band(grid, mpp, _read_job(tiles)))
            else:
                plain = [(r, c, np.array(slab[p]), sc, st, np.array(pixels[p]) if px else None)
                         for p, (r, c, sc, st, px) in zip(at, tiles)]
                out = ("ok", pack(split(prepare(grid, margin, mpp, plain, False, mask, stain)) if bands
                                  else prepare(grid, margin, mpp, plain, True, mask, stain)))
        except Exception:  # a bug: reported by the main process
            out = ("error", traceback.format_exc())
        try:
            results.send(out)
        except (BrokenPipeError, OSError):
            return


def _read_job(path: str) -> dict:
    """A job :meth:`TilePool._job_file` wrote; the file is removed."""
    import os
    import pickle

    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    finally:
        os.unlink(path)


class _NoRoom(Exception):
    """No free slab place for a tile and no result in flight to free one (:meth:`TilePool._fill`)."""


@dataclass
class _Staged(TileInstances):
    """A tile's instances whose labels and pixels are a :class:`TilePool`'s slab ``place`` (:meth:`TilePool.stage`)."""

    place: int = -1
    pool: Any = None


@dataclass(frozen=True)
class SlabPlaces:
    """How many tiles a :class:`TilePool`'s slab holds: ``depth`` jobs of at most ``chunk`` tiles in flight per
    worker, plus ``ahead`` places for tiles a predicting thread puts there before they are sent
    (:meth:`TilePool.stage`)."""

    chunk: int = 8
    depth: int = 4
    ahead: int = 0


class TilePool:
    """:func:`prepare` of predicted tiles, in ``workers`` processes (0: here, at once, not eager), results in the
    order submitted; with ``tissue``, the tissue mask's second guard applied there too.

    ``submit(tiles)`` queues ``(row, col, TileInstances)`` tiles, split into jobs of at most ``places.chunk`` tiles,
    each sent to the worker with the fewest jobs in flight; :meth:`results` yields the
    :class:`~wsiseg.wsi.stitch.Proposal` of each, oldest first, stopping at the first job still running
    (``wait=True``: waits for all). At most ``places.depth`` jobs per worker are in flight (``submit`` collects the
    oldest results first when they would be more).

    All the traffic is the main thread's own (no helper threads, whose every hand-over of the GIL can wait for a
    busy main thread's switch interval: a ``ProcessPoolExecutor`` here was slower than no workers at all).
    Label images and the tiles' pixels (for the stain measurements) go through a shared memory-mapped slab of tile
    places (:class:`SlabPlaces`), jobs and results through pipes (results packed by
    :func:`pack`, pipes enlarged to hold one whole where Linux allows). A place is free again once its job's result
    is in. :meth:`staging` lets the predicting thread copy its tiles into free places itself (``ahead`` of the jobs
    in flight), so that the main thread only sends their places; it copies the other tiles.

    Workers are fresh interpreters running ``python -m wsiseg.parallel.tiles``: they import numpy, OpenCV, shapely and
    this package's stitching, never the caller's main script or torch (spawned ``multiprocessing`` workers import
    the main script again, torch and all: slower to start than a whole slide takes; docs/speed.md). When the workers
    cannot start or die (killed from outside), the pool warns once and prepares every tile here from then on, the
    lost jobs included: the outputs stay the same. Use as a context manager: leaving it stops the workers and
    removes the slab.
    """

    def __init__(self, grid: TileGrid, margin: int, mpp: float, workers: int = 0, tissue: TissueMask | None = None,
                 bands: bool = False, places: SlabPlaces = SlabPlaces(), stain: SlideStain = SlideStain()) -> None:
        self.grid, self.margin, self.mpp, self.tissue = grid, int(margin), float(mpp), tissue
        self.stain = stain  # (:func:`prepare`'s)
        self.bands = bool(bands)
        self.workers = max(0, int(workers))
        self.chunk, self.depth, self.ahead = max(1, places.chunk), max(1, places.depth), max(0, places.ahead)
        self._free: deque[int] = deque()  # the slab's free tile places
        self._held: dict[int, list[int]] = {}  # job number -> the places its tiles are in
        self._lock = threading.Lock()  # (the free places are taken by the predicting thread too: stage)
        self._q: deque = deque()  # (job number, tiles, proposals once known)
        self._items: deque = deque()  # the results of the oldest job taken from the queue, not given out yet
        self._files: set[str] = set()  # job files written (_job_file): removed when the pool stops
        self._busy = [0] * self.workers  # jobs in flight, per worker
        self._worker_of: dict[int, int] = {}  # job number -> the worker it was sent to
        self._sent = 0  # jobs sent to workers
        self._tickets = 0  # outline and decide jobs asked for
        self._procs: list = []
        self._jobs: list = []
        self._results: list = []
        self._ready: list = []  # per worker: whether a result is in (ready_check)
        self._slab = self._pixels = None
        self._slab_path: str | None = None
        if self.workers:
            self._start()

    def _start(self) -> None:
        import dataclasses
        import json

        T = self.grid.tile
        shape = (self.workers * self.depth * self.chunk + self.ahead, T, T)
        tissue = self.tissue
        roi = b""  # (the regions of interest, as WKB after the mask: a spec on the command line could not hold them)
        if tissue is not None and tissue.roi is not None:
            import shapely

            roi = shapely.to_wkb(tissue.roi)
        size = slab_bytes(shape) + (tissue.mask.size if tissue is not None else 0) + len(roi)
        self._slab_path = slab_file(size)
        if self._slab_path is None:
            import warnings

            warnings.warn(f"no room for the tile workers' {size / 2**20:.0f} MB slab in /dev/shm or the "
                          "temp directory; preparing tiles in the main process (same outputs)", RuntimeWarning,
                          stacklevel=3)
            return
        self._slab, self._pixels = map_slab(self._slab_path, shape, "r+")
        self._free.extend(range(shape[0]))
        tissue_spec = None  # (height, width, downsample, regions' bytes) of the mask stored after the tiles
        if tissue is not None:
            tissue_spec = (*tissue.mask.shape, tissue.downsample, len(roi))
            map_tissue(self._slab_path, shape, tissue_spec, "r+").mask[...] = tissue.mask
            if roi:
                at = slab_bytes(shape) + tissue.mask.size
                np.memmap(self._slab_path, np.uint8, mode="r+", offset=at, shape=(len(roi),))[:] = \
                    np.frombuffer(roi, np.uint8)
        spec = json.dumps({"slab": self._slab_path, "shape": shape, "grid": dataclasses.asdict(self.grid),
                           "margin": self.margin, "mpp": self.mpp, "tissue": tissue_spec, "bands": self.bands,
                           "stain": dataclasses.asdict(self.stain)})
        for _ in range(self.workers):
            proc, jobs, results = spawn_worker("wsiseg.parallel.tiles", spec, grow="results")
            self._procs.append(proc)
            self._jobs.append(jobs)
            self._results.append(results)
            self._ready.append(ready_check(results))

    @property
    def live(self) -> bool:
        """Whether the workers are running (else everything is prepared here, at once)."""
        return bool(self._procs)

    def staging(self, predict: Callable[[np.ndarray], list[TileInstances]]) -> Callable[[np.ndarray], list]:
        """``predict``, its results then put into the slab by :meth:`stage`: what a predicting thread runs."""

        def run(tiles: np.ndarray) -> list[TileInstances]:
            return self.stage(predict(tiles))

        return run

    def stage(self, results: list[TileInstances]) -> list[TileInstances]:
        """``results`` copied into free places of the slab, in the calling thread, as instances whose labels and
        pixels are those places (the same values), which :meth:`submit` then sends by place alone; ``results``
        themselves where there are no workers, too few free places for them all, or a tile not the grid's size
        (:meth:`submit` copies those). Not before a job's result is in is its place given out again."""
        slab, pixels, T = self._slab, self._pixels, self.grid.tile
        if slab is None or not results or any(
                r.labels.shape != (T, T) or (r.pixels is not None and r.pixels.shape != (T, T, 3)) for r in results):
            return results
        with self._lock:
            if len(self._free) < len(results):
                return results
            at = [self._free.popleft() for _ in results]
        out = []
        for p, r in zip(at, results):
            slab[p] = r.labels
            if r.pixels is not None:
                pixels[p] = r.pixels
            out.append(_Staged(slab[p], r.scores, r.stains, None if r.pixels is None else pixels[p], r.sharpened,
                               place=p, pool=self))
        return out

    def submit(self, tiles: list[tuple[int, int, TileInstances]]) -> None:
        plain = [(r, c, t.labels, t.scores, t.stains, t.pixels) for r, c, t in tiles]
        at = [t.place if isinstance(t, _Staged) and t.pool is self else None for _, _, t in tiles]
        if not self.live:
            self._q.append((None, None, self._here(plain)))
            self._release(at)
            return
        n = -(-len(plain) // self.workers)  # spread one batch over every worker, in jobs of <= chunk tiles
        step = max(1, min(self.chunk, n))
        for i in range(0, len(plain), step):
            job, places = plain[i:i + step], at[i:i + step]
            self._dispatch(job, lambda job=job, places=places: self._fill(job, places), places)

    def outline(self, items: list) -> int:
        """Outline and encode ``items`` (:data:`~wsiseg.wsi.stitch.Item` tuples: the seam nuclei whose masks a
        decision trimmed) in a worker: returns a ticket whose :class:`Outlined` comes out of :meth:`results` after
        the tiles submitted before it, or at once from :meth:`wait_outline`. The results are :func:`finish`'s."""
        job = _OutlineJob(self._tickets, items)
        self._tickets += 1
        self._dispatch(job, lambda: ("outline", items))
        return job.ticket

    def decide(self, job: dict) -> int:
        """:func:`decide_band` of ``job`` in a worker: returns a ticket whose :class:`Banded` comes out of
        :meth:`results` after the tiles submitted before it."""
        d = _DecideJob(self._tickets, job)
        self._tickets += 1
        self._dispatch(d, lambda: ("decide", self._job_file(job)))
        return d.ticket

    def _job_file(self, job: dict) -> str:
        """``job`` pickled into a file beside the slab, for a worker to read (and remove): a band's candidates can
        be megabytes, and a worker busy sending its result to this process, which is blocked sending it more than
        the pipe holds, would wait for ever. Named like the slab, so a killed run's are removed by the next."""
        import os
        import pickle
        import tempfile

        from .workers import SLAB_PREFIX

        fd, path = tempfile.mkstemp(prefix=f"{SLAB_PREFIX}{os.getpid()}-band-",
                                    dir=os.path.dirname(self._slab_path or "") or None)
        self._files.add(path)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def wait_outline(self, ticket: int) -> list:
        """:class:`Outlined.ready` of ``ticket``, collecting the queue in order up to it (waiting for it); KeyError
        when :meth:`results` has given it out already."""
        for i in range(len(self._q)):
            if self._q[i][2] is None:
                self._collect(i)
            props = self._q[i][2]
            if props and isinstance(props[0], Outlined) and props[0].ticket == ticket:
                return props[0].ready
        raise KeyError(ticket)

    def _dispatch(self, job: Any, message: Callable[[], Any], places: list | None = None) -> None:
        """Send ``job`` to the next worker (``message()`` puts the job's tiles into the slab, if it has tiles, and
        gives what the worker is sent), after collecting the oldest results while too many are in flight; or
        prepare it here when the workers are gone. Its result joins the queue in order either way. ``places``: the
        slab places of a tile job's tiles (None where not in the slab yet: ``message`` fills them in), free again
        once its result is in."""
        while self.live and sum(1 for e in self._q if e[2] is None) >= self.workers * self.depth:
            self._collect(self._oldest_pending())
        if self.live:  # (still: a worker found dead while collecting stops them all)
            k = self._sent
            # (to the worker with the fewest jobs in flight: a band's decisions take a worker a while)
            w = min(range(self.workers), key=lambda i: (self._busy[i], (i - k) % self.workers))
            try:
                self._jobs[w].send(message())
            except (OSError, ValueError) as e:  # the worker is gone, or a tile is not the grid's size
                self._lost(e)
            except _NoRoom:
                pass
            else:
                self._sent += 1
                self._busy[w] += 1
                self._worker_of[k] = w
                if places:
                    self._held[k] = places
                self._q.append((k, job, None))
                return
        self._q.append((None, None, self._here(job)))
        self._release(places or [])

    def _fill(self, job: list, places: list) -> tuple:
        """Put ``job``'s tiles whose ``places`` are None (not staged: :meth:`stage`) into free places of the slab,
        collecting the oldest results while there are too few (_NoRoom: none in flight either); the message that
        sends the job."""
        need = [t for t, p in enumerate(places) if p is None]
        while need:
            with self._lock:
                if len(self._free) >= len(need):
                    for t in need:
                        places[t] = self._free.popleft()
                    break
            if not self.live or not any(e[2] is None for e in self._q):
                raise _NoRoom
            self._collect(self._oldest_pending())
        for t in need:
            _, _, lab, _, _, px = job[t]
            self._slab[places[t]] = lab
            if px is not None:
                self._pixels[places[t]] = px
        return places, [(r, c, sc, st, px is not None) for r, c, _, sc, st, px in job]

    def _release(self, places: list) -> None:
        """Give slab ``places`` back (None: not in the slab)."""
        with self._lock:
            self._free.extend(p for p in places if p is not None)

    def _here(self, job: Any) -> list:
        """:func:`prepare` of ``job`` in this process (without workers, or for the jobs of lost ones); an outline
        job's :class:`Outlined`."""
        if isinstance(job, _OutlineJob):
            return [Outlined(job.ticket, _encode(job.items, self.grid.scale, self.mpp))]
        if isinstance(job, _DecideJob):
            return [Banded(job.ticket, decide_band(self.grid, self.mpp, job.job))]
        if self.bands:  # (the same results as a worker's: the safe nuclei as blocks, the candidates packed)
            return unpack_blocks(pack(split(prepare(self.grid, self.margin, self.mpp, job, False, self.tissue,
                                                    self.stain))))
        return prepare(self.grid, self.margin, self.mpp, job, False, self.tissue, self.stain)

    def _oldest_pending(self) -> int:
        return next(i for i, e in enumerate(self._q) if e[2] is None)

    def _collect(self, i: int) -> None:
        """Receive the result of queue entry ``i`` (waiting for it), or prepare it here if the workers are gone."""
        k, job, _ = self._q[i]
        props = None
        if self.live:
            try:
                w = self._worker_of.pop(k)
                self._busy[w] -= 1
                status, payload = self._results[w].recv()
            except (EOFError, OSError) as e:
                self._lost(e)
            else:
                if status != "ok":
                    raise RuntimeError(f"a tile worker failed:\n{payload}")
                props = [Outlined(job.ticket, payload)] if isinstance(job, _OutlineJob) else \
                    [Banded(job.ticket, payload)] if isinstance(job, _DecideJob) else \
                    unpack_blocks(payload) if self.bands else unpack(payload)
        if props is None:
            props = self._here(job)
        self._release(self._held.pop(k, []))
        self._q[i] = (k, None, props)

    def results(self, wait: bool = False) -> Iterator[Proposal | Outlined | Banded]:
        """The results in order, one at a time: a job's results not taken yet stay for the next call (so a caller
        may stop after any of them, e.g. to wait for a later one)."""
        while True:
            if self._items:
                yield self._items.popleft()
                continue
            if not self._q:
                return
            k, job, props = self._q[0]
            if props is None:
                if not (wait or not self.live or self._ready[self._worker_of[k]]()):
                    return
                self._collect(0)
                props = self._q[0][2]
            self._q.popleft()
            self._items.extend(props)

    def _lost(self, e: BaseException) -> None:
        import warnings

        if self.live:
            warnings.warn(f"tile workers failed ({type(e).__name__}: {str(e).strip() or 'a worker died'}); preparing "
                          "tiles in the main process from now on (same outputs, slower)", RuntimeWarning, stacklevel=4)
            self._stop(kill=True)

    def _stop(self, kill: bool) -> None:
        for c in self._jobs:
            try:
                if not kill:
                    c.send(None)
                c.close()
            except OSError:
                pass
        for p in self._procs:
            end_worker(p, kill)
        for c in self._results:
            c.close()
        self._procs, self._jobs, self._results, self._ready = [], [], [], []
        self._slab = self._pixels = None  # (a staged tile's views keep their mapping: stage)
        with self._lock:  # (the predicting thread may be taking places)
            self._free.clear()
        self._held.clear()
        remove_slab(self._slab_path)
        self._slab_path = None
        for path in self._files:  # (those a worker did not read)
            remove_slab(path)
        self._files = set()

    def close(self) -> None:
        self._q.clear()
        self._items.clear()
        self._stop(kill=False)

    def __enter__(self) -> "TilePool":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._q.clear()
        self._items.clear()
        self._stop(kill=exc_type is not None)


def _worker_main(argv: list[str]) -> None:
    """``python -m wsiseg.parallel.tiles JOBS_FD RESULTS_FD SPEC``: one :class:`TilePool` worker (see
    :func:`_serve`)."""
    import json
    from multiprocessing.connection import Connection

    spec = json.loads(argv[2])
    _serve(Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False), spec["slab"],
           tuple(spec["shape"]), TileGrid(**spec["grid"]), spec["margin"], spec["mpp"], spec["tissue"],
           spec.get("bands", False), SlideStain(**spec.get("stain", {})))


if __name__ == "__main__":
    import sys

    _worker_main(sys.argv[1:])
