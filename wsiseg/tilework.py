"""The per-tile CPU work of a run (candidates, outlines, GeoJSON encoding), in worker processes when asked for.

``segment_slide`` hands each predicted tile to a :class:`TilePool` and feeds what comes back, in raster order, to
the :class:`~wsiseg.stitch.Stitcher`, which then only decides the seam candidates. Everything that needs one tile
alone runs in the pool (:func:`prepare`):

- the tile's candidates (:func:`wsiseg.stitch.propose`): the nuclei final at once and the seam candidates;
- the outline and measurements of each (:func:`wsiseg.stitch.outline_items`), and its GeoJSON feature, encoded
  but for the id and the label, which only the writer knows (:func:`wsiseg.export.geojson.feature_parts`).

With workers, seam candidates are outlined ahead too ("eager"): most keep their mask through the seam decision,
and those results are used as they are; a candidate whose mask a decision trims is outlined again, in the main
process (:func:`finish`). Without workers nothing is outlined before it is decided, so no work is wasted on
duplicates. Outlines and encodings depend on the mask alone, so the outputs are the same, byte for byte, for any
number of workers (tested).
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np

from .segment.base import TileInstances
from .stitch import Decided, Nucleus, Proposal, outline_items, propose
from .tiling import TileGrid

#: a prepared item: its nucleus (None: the mask has no outline) and its encoded GeoJSON feature parts
Ready = tuple  # (Nucleus | None, tuple[bytes, bytes] | None)


def _encode(items: list, scale: float, mpp: float) -> list[Ready]:
    from .export.geojson import feature_parts

    return [(n, feature_parts(n) if n is not None else None) for n in outline_items(Decided(items, scale, mpp))]


def prepare(grid: TileGrid, margin: int, mpp: float, tiles: list[tuple[int, int, np.ndarray, np.ndarray]],
            eager: bool) -> list[Proposal]:
    """Proposals of ``tiles`` (``(row, col, labels, scores)`` each), with the results of their safe items (and,
    when ``eager``, of their seam candidates) computed: the job a :class:`TilePool` worker runs."""
    props = [propose(grid, margin, r, c, TileInstances(lab, sc)) for r, c, lab, sc in tiles]
    items: list = []
    for p in props:
        items.extend(p.safe)
        if eager:
            items.extend((c.mask, c.box[0], c.box[1], c.score) for c in p.pending)
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


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which then stops the pool


class TilePool:
    """:func:`prepare` of predicted tiles, in ``workers`` processes (0: here, at once, not eager), results in the
    order submitted.

    ``submit(tiles)`` queues ``(row, col, TileInstances)`` tiles (split into jobs of at most ``chunk`` tiles);
    :meth:`results` yields the :class:`~wsiseg.stitch.Proposal` of each, oldest first, stopping at the first job
    still running (``wait=True``: waits for all). At most ``depth`` jobs are in flight: beyond that
    :meth:`results` waits for the oldest. Label images travel as uint16 where their ids fit (half the bytes). Use
    as a context manager: leaving it stops the workers and drops unfinished jobs.

    Workers are spawned processes, so they import the caller's main script again: a script that runs a slide at
    its top level, outside ``if __name__ == "__main__":``, breaks them. When the workers cannot start or die (that,
    or a process killed from outside), the pool warns once and prepares every tile here from then on, the lost
    jobs included: the outputs stay the same. Inside a daemonic process (where no children may be started) it runs
    without workers.
    """

    def __init__(self, grid: TileGrid, margin: int, mpp: float, workers: int = 0, chunk: int = 8,
                 depth: int | None = None) -> None:
        import multiprocessing

        self.grid, self.margin, self.mpp = grid, int(margin), float(mpp)
        self.workers = max(0, int(workers)) if not multiprocessing.current_process().daemon else 0
        self.chunk = max(1, int(chunk))
        self.depth = depth if depth is not None else 4 * max(1, self.workers)
        self._q: deque = deque()
        self._pool = None
        if self.workers:
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the parent may hold CUDA and threads, which fork would copy half-alive
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init)

    def submit(self, tiles: list[tuple[int, int, TileInstances]]) -> None:
        if self._pool is None:
            plain = [(r, c, t.labels, t.scores) for r, c, t in tiles]
            self._q.append((None, prepare(self.grid, self.margin, self.mpp, plain, eager=False), None))
            return
        plain = [(r, c, _compact(t.labels, t.count), t.scores) for r, c, t in tiles]
        n = -(-len(plain) // self.workers)  # spread one batch over every worker, in jobs of <= chunk tiles
        step = max(1, min(self.chunk, n))
        for i in range(0, len(plain), step):
            job = plain[i:i + step]
            try:
                fut = self._pool.submit(prepare, self.grid, self.margin, self.mpp, job, True)
            except RuntimeError as e:  # BrokenProcessPool (a RuntimeError): the workers are gone
                self._lost(e)
                fut = None
            self._q.append((fut, None if fut is not None else self._here(job), job))

    def results(self, wait: bool = False) -> Iterator[Proposal]:
        from concurrent.futures.process import BrokenProcessPool

        while self._q:
            fut, props, job = self._q[0]
            if fut is not None:
                if not (wait or fut.done() or len(self._q) > self.depth):
                    return
                try:
                    props = fut.result()
                except BrokenProcessPool as e:
                    self._lost(e)
                    props = self._here(job)
            self._q.popleft()
            yield from props

    def _here(self, job: list) -> list[Proposal]:
        return prepare(self.grid, self.margin, self.mpp, job, eager=False)

    def _lost(self, e: BaseException) -> None:
        import warnings

        if self._pool is not None:
            warnings.warn(f"tile workers failed ({type(e).__name__}: {str(e).strip() or 'a worker died'}); preparing "
                          "tiles in the main process from now on (same outputs, slower). A script that calls "
                          "wsiseg must run it under `if __name__ == \"__main__\":`", RuntimeWarning, stacklevel=3)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        self._q.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "TilePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _compact(labels: np.ndarray, count: int) -> np.ndarray:
    return labels.astype(np.uint16) if count < 65536 else labels


#: fewer tiles than this are not worth starting workers for (a few seconds to spawn; ~150 tiles/s without them)
MIN_TILES = 512


def auto_workers(device: str, tiles: int) -> int:
    """``segment_slide``'s default number of tile workers for ``tiles`` tiles: on a GPU, all but two of the cores (at
    most 8; none below 6 cores or for fewer than :data:`MIN_TILES` tiles), since the main process then only feeds
    the GPU, decides seams and writes; on a CPU none, as torch keeps every core busy with the model."""
    import multiprocessing
    import os

    cores = os.cpu_count() or 1
    if (not str(device).startswith("cuda") or cores < 6 or tiles < MIN_TILES
            or multiprocessing.current_process().daemon):
        return 0
    return min(8, cores - 2)


def check_not_bootstrapping() -> None:
    """Refuse to run a slide while this process is a spawned worker still importing its parent's main script (one
    that runs a slide at its top level, unguarded): it would open the parent's outputs and journal. The worker
    exits here with one line, and the parent's :class:`TilePool` goes on without workers (with a warning)."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit("wsiseg: a worker process is importing the main script, which runs a slide at its top "
                         "level; put that under `if __name__ == \"__main__\":`")
