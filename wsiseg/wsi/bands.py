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
from .stitch import Candidate, Decided, Item, Proposal, RowDecision, StitcherState, boundary, decide_row


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





#: tile rows per band when a run's seam decisions are made by its tile workers (:class:`BandStitcher`)
BAND_ROWS = 4


class BandStitcher:
    """The stitcher of a run with tile workers: its seam decisions made by the workers, a band of rows per job,
    the candidates packed by the worker that proposed them (:attr:`Proposal.seam`) and never unpacked here.

    Fed the tiles' proposals in raster order (:meth:`add`), it sends each band to ``decide`` (a job for
    :func:`wsiseg.parallel.tiles.decide_band`, which returns a ticket) once its rows and the row after it are in,
    one row early as a guess (as :func:`stitch_bands` does); :meth:`result` takes the decisions back in the order
    asked for, checks each guess against the band before it (:func:`~wsiseg.wsi.stitch.boundary`) and asks for the
    band again from the true boundary where they differ. Guarantee: :meth:`decided` of each row, once
    :meth:`final`, is what :class:`~wsiseg.wsi.stitch.Stitcher` decides for it; :meth:`state` at a row's start is a
    state from which a :class:`Stitcher` continues as this one would (for the resume journal).

    ``tiles``: the tiles still to come, in raster order; ``start``: the state to continue from (a resumed run's).
    """

    def __init__(self, tiles: list[tuple[int, int]], decide, band_rows: int | None = None, start: "StitcherState | None" = None) -> None:
        from collections import Counter

        from ..parallel.tiles import pack_candidates, split

        self.decide = decide
        self.expect = Counter(r for r, _ in tiles)
        self.got: Counter = Counter()
        self.seams: dict[int, list] = {}  # row -> packed candidates, per tile
        self.counts: dict[int, int] = {}  # row -> candidates
        self.cut_dropped = self.seam_dropped = 0
        self.cut_after: dict[int, int] = {}  # row -> its tiles' cut_dropped (for state)
        before: list[Candidate] = []
        done_rows: list[int] = []
        if start is not None:
            self.cut_dropped, self.seam_dropped = start.cut_dropped, start.seam_dropped
            for r, cands in start.pending.items():
                self.seams[r] = [p.seam for p in split(_by_tile(r, cands)) if p.seam is not None]
                self.counts[r] = len(cands)
                done_rows.append(r)
            first = min(start.pending) if start.pending else None
            if first is not None:
                before = start.accepted.get(first - 1, [])
        rows = sorted(set(self.expect) | set(done_rows))
        band_rows = BAND_ROWS if band_rows is None else int(band_rows)
        self.rows = rows
        self.index = {r: i for i, r in enumerate(rows)}
        self.bands = [rows[i:i + band_rows] for i in range(0, len(rows), band_rows)]
        self.band_of = {r: k for k, b in enumerate(self.bands) for r in b}
        self.first_before = pack_candidates(before)
        self.asked = 0  # bands asked for
        self.emitted = -1  # index of the last row whose decisions were given (decided)
        self.tickets: dict[int, tuple[int, bool]] = {}  # ticket -> (band, guessed)
        self.held: dict[int, dict] = {}  # band -> its guessed decisions, until the band before it is final
        self.decisions: dict[int, tuple[dict, int]] = {}  # row -> (packed items, dropped), final
        self.bounds: dict[int, dict] = {}  # row -> its accepted nuclei's boundary with the next row, final
        self.final_bands: set[int] = set()
        self._ask_ready()

    def complete(self, r: int) -> bool:
        return self.got[r] >= self.expect[r]

    def add(self, p: Proposal) -> None:
        """A tile's proposal (its seam candidates packed, :attr:`Proposal.seam`), in raster order."""
        self.got[p.row] += 1
        self.cut_dropped += p.cut_dropped
        if p.cut_dropped:
            self.cut_after[p.row] = self.cut_after.get(p.row, 0) + p.cut_dropped
        if p.seam is not None:
            self.seams.setdefault(p.row, []).append(p.seam)
            self.counts[p.row] = self.counts.get(p.row, 0) + p.seam_count
        if self.complete(p.row):
            self._ask_ready()

    def _ask_ready(self) -> None:
        """Ask for every band, in order, whose rows and the row after it are all in."""
        while self.asked < len(self.bands):
            band = self.bands[self.asked]
            nxt = band[-1] + 1
            if not all(self.complete(r) for r in band) or (nxt in self.index and not self.complete(nxt)):
                return
            k = self.asked
            guess = k > 0 and band[0] - 1 in self.index
            self._ask(k, guess, None if guess else self.first_before if k == 0 else None)
            self.asked += 1
        self._let_go()

    def _ask(self, k: int, guess: bool, before: dict | None) -> None:
        band = self.bands[k]
        rows = ([band[0] - 1] if guess else []) + band
        read = rows + ([band[-1] + 1] if band[-1] + 1 in self.index else [])
        job = {"rows": rows, "guess": guess, "before": before,
               "seams": {r: self.seams.get(r, []) for r in read}}
        self.tickets[self.decide(job)] = (k, guess)

    def result(self, ticket: int, res: dict) -> None:
        """A band's decisions (:func:`~wsiseg.wsi.parallel.tiles.decide_band`'s result for ``ticket``)."""
        k, guessed = self.tickets.pop(ticket)
        if guessed:
            self.held[k] = res
        else:
            self._accept(k, res)
        self._check()

    def _check(self) -> None:
        """Accept the held bands whose band before is final and whose guess was right; ask again for the others."""
        from ..parallel.tiles import unpack_candidates

        for k in sorted(self.held):
            if k - 1 not in self.final_bands:
                return
            res = self.held.pop(k)
            prev = self.bounds[self.bands[k][0] - 1]
            if _same(unpack_candidates(res["guess"]), unpack_candidates(prev)):
                self._accept(k, res)
            else:
                self._ask(k, False, prev)

    def _accept(self, k: int, res: dict) -> None:
        for r, (packed, dropped) in res["rows"].items():
            self.decisions[int(r)] = (packed, dropped)
            self.seam_dropped += dropped
        self.bounds.update((int(r), b) for r, b in res["bounds"].items())
        self.final_bands.add(k)

    def final(self, r: int) -> bool:
        return self.band_of[r] in self.final_bands

    def asked_for(self, r: int) -> bool:
        """Whether the band of row ``r`` has been sent to be decided."""
        return self.band_of[r] < self.asked

    def decided(self, r: int) -> tuple[list, list]:
        """The final row ``r``'s decided items (masks not shipped) and their results, in the stitcher's order; once
        given, what only the row's decision needed is let go."""
        from ..parallel.tiles import unpack

        (p,) = unpack(self.decisions.pop(r)[0])
        self.emitted = max(self.emitted, self.index[r])
        self._let_go()
        return p.safe, p.safe_ready

    def _let_go(self) -> None:
        """Drop the packed candidates of the given rows (their state is no longer journalled, their band and the one
        before are final) once the band after them has been asked for (its guess reads its band's last row), and the
        boundaries no check or state reads any more."""
        upto = self.rows[self.emitted] if self.emitted >= 0 else None
        if upto is None:
            return
        for r in [r for r in self.seams if r <= upto and self.band_of[r] + 1 <= self.asked]:
            del self.seams[r]
        for r in [r for r in self.bounds if r < upto - 1]:
            del self.bounds[r]

    def safe_row(self, r: int) -> int:
        """The stitcher's safe tile row after a tile of row ``r``: the row above when it has seam candidates."""
        return r - 1 if r - 1 in self.index and self.counts.get(r - 1, 0) else r

    def state(self, r: int) -> "StitcherState":
        """The state of a :class:`Stitcher` that has been fed every tile of rows up to ``r`` and nothing after
        (rows up to ``r - 2`` must be :meth:`final`): the rows ``r - 1`` and ``r`` pending, as proposed; the nuclei
        accepted in row ``r - 2`` that the next decision reads (its boundary: the decisions are the same)."""
        from ..parallel.tiles import unpack_candidates

        from .stitch import StitcherState

        pending = {x: [c for d in self.seams.get(x, []) for c in unpack_candidates(d)]
                   for x in (r - 1, r) if x in self.index}
        accepted = {r - 2: unpack_candidates(self.bounds[r - 2])} if r - 2 in self.bounds else {}
        dropped = self.seam_dropped - sum(d for x, (_, d) in self.decisions.items() if x > r - 2)
        cut = self.cut_dropped - sum(n for x, n in self.cut_after.items() if x > r)
        return StitcherState(pending, accepted, r, cut, dropped, 0)


def _by_tile(row: int, cands: list[Candidate]) -> list[Proposal]:
    """``cands`` as proposals of their tiles (consecutive runs of one tile), for :func:`split`."""
    out: list[Proposal] = []
    for c in cands:
        if not out or (out[-1].row, out[-1].col) != c.tile:
            out.append(Proposal(c.tile[0], c.tile[1], [], [], 0, []))
        out[-1].pending.append(c)
    return out


__all__ = ["BAND_ROWS", "BandCounts", "BandStitcher", "decide_rows", "stitch_bands"]
