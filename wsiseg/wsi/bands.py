"""Seam decisions in bands of tile rows, decided side by side, equal to the raster-order stitcher's.

:class:`~wsiseg.wsi.stitch.Stitcher` decides tile rows one after another: row r against the nuclei accepted in row
r-1, a chain through the whole slide. But a row's decision reads the row above only at their boundary
(:func:`~wsiseg.wsi.stitch.boundary`: the accepted nuclei whose boxes cross one of the row's candidates), and that
boundary lies at the bottom of row r-1, a tile core's height below where row r-2 reaches. So a band of rows
``a..b`` is decided on its own, one row early: row a-1 against nothing (a guess), then rows a..b each against the
row before it. Where the guess's boundary with row a equals the true one (row a-1 as the band before decided it),
every row of the band is decided exactly as the stitcher decides it (:func:`~wsiseg.wsi.stitch.decide_row`'s
guarantee, row by row). Where it does not (a nucleus, or a chain of crossing ones, reaching from row a-2's seams
to row a's), the band is decided again from the true boundary.

Guarantee: :func:`stitch_bands` gives the :class:`~wsiseg.wsi.stitch.Decided` of every tile that
:meth:`Stitcher.add_proposal <wsiseg.wsi.stitch.Stitcher.add_proposal>` gives (the same items, in the same order,
the same precomputed results), then :meth:`~wsiseg.wsi.stitch.Stitcher.finish_decided`'s, and the same counts, for
any band size and worker count. Only the check of each band's first boundary, the rare redecisions and the merge
stay in the calling process.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, replace

import numpy as np

from .grid import TileGrid
from .stitch import Candidate, Decided, Item, Proposal, RowDecision, boundary, decide_row


@dataclass
class BandCounts:
    """What :func:`stitch_bands` counted: the stitcher's ``seam_dropped`` and ``cut_dropped``; ``bands``, and how
    many of them were ``redecided`` (their guessed boundary was not the true one)."""

    seam_dropped: int
    cut_dropped: int
    bands: int
    redecided: int


def decide_rows(pending: dict[int, list[Candidate]], rows: list[int],
                before: list[Candidate]) -> dict[int, RowDecision]:
    """:func:`~wsiseg.wsi.stitch.decide_row` of ``rows`` (increasing tile rows), in order, as the stitcher decides
    them: the first against ``before``, each next one against the previous row's accepted nuclei (none when the row
    above it had no tile). ``pending``: the seam candidates of each row, as proposed (those of the row after the
    last are read, not decided); they are changed in place."""
    out: dict[int, RowDecision] = {}
    last, acc = rows[0] - 1, before
    for r in rows:
        d = decide_row(pending.get(r, []), acc if last == r - 1 else [], pending.get(r + 1, []))
        out[r] = d
        last, acc = r, d.accepted
    return out


def _band(pending: dict[int, list[Candidate]], rows: list[int]) -> dict[int, RowDecision]:
    """One band's job: ``rows``, the first of them the guessed row (decided against nothing)."""
    return decide_rows(pending, rows, [])


def _same(a: list[Candidate], b: list[Candidate]) -> bool:
    """The same nuclei in the same order (a tile's instances are disjoint, so tile, box and mask name one)."""
    return len(a) == len(b) and all(
        x.tile == y.tile and x.box == y.box and x.primary == y.primary and x.score == y.score
        and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))


def stitch_bands(grid: TileGrid, mpp: float, proposals: list[Proposal], band_rows: int = 8,
                 pool: Executor | None = None) -> tuple[list[Decided], BandCounts]:
    """The stitcher's decisions for ``proposals`` (every tile's :func:`~wsiseg.wsi.stitch.propose`, in raster
    order), made in bands of ``band_rows`` tile rows (the bands decided in ``pool`` when given, else here): one
    :class:`~wsiseg.wsi.stitch.Decided` per proposal, then the last one (``finish_decided``'s), and the counts.
    The proposals' candidates are not changed (each band decides copies)."""
    if band_rows < 1:
        raise ValueError("band_rows must be >= 1")
    rows: list[int] = []
    pending: dict[int, list[Candidate]] = {}
    for p in proposals:
        if rows and p.row < rows[-1]:
            raise ValueError("tiles must be added in raster order")
        if not rows or p.row != rows[-1]:
            rows.append(p.row)
        pending.setdefault(p.row, []).extend(p.pending)
    bands = [rows[i:i + band_rows] for i in range(0, len(rows), band_rows)]

    def copies(band_rows_: list[int], copy: bool = True) -> dict[int, list[Candidate]]:
        # (a band decided here changes its candidates; one sent to a worker travels as a copy)
        return {r: [replace(c) for c in pending[r]] if copy else pending[r]
                for r in band_rows_ + [band_rows_[-1] + 1] if r in pending}

    jobs = []
    for k, band in enumerate(bands):
        guess = [band[0] - 1] if k and band[0] - 1 in pending else []
        args = (copies(guess + band, pool is None), guess + band)
        jobs.append((guess, pool.submit(_band, *args) if pool is not None else _band(*args)))
    decisions: dict[int, RowDecision] = {}
    redecided = 0
    for band, (guess, job) in zip(bands, jobs):
        got = job.result() if pool is not None else job
        if guess:
            true = decisions[guess[0]].accepted
            first = pending.get(band[0], [])
            if not _same(boundary(true, first), boundary(got[guess[0]].accepted, first)):
                got = decide_rows(copies(band), band, true)
                redecided += 1
        decisions.update((r, got[r]) for r in band)
    return _merge(grid, mpp, proposals, decisions), BandCounts(
        sum(d.dropped for d in decisions.values()), sum(p.cut_dropped for p in proposals), len(bands), redecided)


def _merge(grid: TileGrid, mpp: float, proposals: list[Proposal],
           decisions: dict[int, RowDecision]) -> list[Decided]:
    """Each tile's :class:`Decided` in the stitcher's order: on a tile of a new row, the decisions of the rows two
    or more above it not given yet, then the tile's safe nuclei; at the end, the rest."""
    out: list[Decided] = []
    open_rows: list[int] = []  # rows seen, not given yet (increasing)
    row = -1

    def give(upto: float, items: list[Item], ready: list) -> None:
        while open_rows and open_rows[0] <= upto:
            d = decisions[open_rows.pop(0)]
            items.extend(d.items)
            ready.extend(d.ready)

    for p in proposals:
        items: list[Item] = []
        ready: list = []
        if p.row != row:
            row = p.row
            give(p.row - 2, items, ready)
            open_rows.append(p.row)
        items.extend(p.safe)
        ready.extend(p.safe_ready if p.safe_ready is not None else [None] * len(p.safe))
        out.append(Decided(items, grid.scale, mpp, ready))
    items, ready = [], []
    give(float("inf"), items, ready)
    out.append(Decided(items, grid.scale, mpp, ready))
    return out


__all__ = ["BandCounts", "decide_rows", "stitch_bands"]
