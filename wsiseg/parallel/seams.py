"""The seam decisions of a run with tile workers, made by the workers in bands of tile rows.

:class:`BandStitcher` is what :class:`~wsiseg.wsi.run.SlideRun` uses in place of the
:class:`~wsiseg.wsi.stitch.Stitcher` when it has tile workers: the bands of :mod:`wsiseg.wsi.bands` (decided one row
early against a guess, checked against the band before), each decided by a worker
(:func:`~wsiseg.parallel.tiles.decide_band`) from the candidates its tiles' workers packed, which this process never
unpacks.
"""

from __future__ import annotations

from collections import Counter

from ..wsi.stitch import Candidate, NucleusBlock, Proposal, StitcherState
from .tiles import block_of, by_tile, pack_candidates, same_packed, split, unpack_candidates


#: tile rows per band when a run's seam decisions are made by its tile workers (:class:`BandStitcher`): one, so
#: that a band's job (mostly outlining and encoding the nuclei it accepts) holds a worker briefly; the guess row this
#: decides twice costs less than the wait for a longer job (docs/speed.md)
BAND_ROWS = 1


class BandStitcher:
    """The stitcher of a run with tile workers: its seam decisions made by the workers, a band of rows per job,
    the candidates packed by the worker that proposed them (:attr:`Proposal.seam`) and never unpacked here.

    Fed the tiles' proposals in raster order (:meth:`add`), it sends each band to ``decide`` (a job for
    :func:`wsiseg.parallel.tiles.decide_band`, which returns a ticket) once its rows and the row after it are in,
    one row early as a guess (as :func:`~wsiseg.wsi.bands.stitch_bands` does); :meth:`result` takes the decisions
    back in the order asked for, checks each guess against the band before it (:func:`~wsiseg.wsi.stitch.boundary`)
    and asks for the band again from the true boundary where they differ. Guarantee: :meth:`decided` of each row, once
    :meth:`final`, is what :class:`~wsiseg.wsi.stitch.Stitcher` decides for it; :meth:`state` at a row's start is a
    state from which a :class:`Stitcher` continues as this one would (for the resume journal).

    ``tiles``: the tiles still to come, in raster order; ``start``: the state to continue from (a resumed run's).
    """

    def __init__(self, tiles: list[tuple[int, int]], decide, band_rows: int | None = None,
                 start: StitcherState | None = None) -> None:
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
                self.seams[r] = [p.seam for p in split(by_tile(cands)) if p.seam is not None]
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
        """A band's decisions (:func:`~wsiseg.parallel.tiles.decide_band`'s result for ``ticket``)."""
        k, guessed = self.tickets.pop(ticket)
        if guessed:
            self.held[k] = res
        else:
            self._accept(k, res)
        self._check()

    def _check(self) -> None:
        """Accept the held bands whose band before is final and whose guess was right; ask again for the others."""
        for k in sorted(self.held):
            if k - 1 not in self.final_bands:
                return
            res = self.held.pop(k)
            prev = self.bounds[self.bands[k][0] - 1]
            if same_packed(res["guess"], prev):
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

    def decided(self, r: int) -> NucleusBlock:
        """The nuclei of the final row ``r``'s decisions, in the stitcher's order (those with an outline); once
        given, what only the row's decision needed is let go."""
        block = block_of(self.decisions.pop(r)[0])
        self.emitted = max(self.emitted, self.index[r])
        self._let_go()
        return block

    def _let_go(self) -> None:
        """Drop the packed candidates of the given rows (their state is no longer journalled, their band and the one
        before are final) once the band after them has been asked for (its guess reads its band's last row), and the
        boundaries no check or state reads any more."""
        upto = self.rows[self.emitted] if self.emitted >= 0 else None
        if upto is None:
            return
        for r in [r for r in self.seams if r <= upto and self.band_of[r] + 1 < self.asked]:
            del self.seams[r]
        for r in [r for r in self.bounds if r < upto - 1]:
            del self.bounds[r]

    def safe_row(self, r: int) -> int:
        """The stitcher's safe tile row after a tile of row ``r``: the row above when it has seam candidates."""
        return r - 1 if r - 1 in self.index and self.counts.get(r - 1, 0) else r

    def state(self, r: int) -> StitcherState:
        """The state of a :class:`Stitcher` that has been fed every tile of rows up to ``r`` and nothing after
        (rows up to ``r - 2`` must be :meth:`final`): the rows ``r - 1`` and ``r`` pending, as proposed; the nuclei
        accepted in row ``r - 2`` that the next decision reads (its boundary: the decisions are the same)."""
        pending = {x: [c for d in self.seams.get(x, []) for c in unpack_candidates(d)]
                   for x in (r - 1, r) if x in self.index}
        accepted = {r - 2: unpack_candidates(self.bounds[r - 2])} if r - 2 in self.bounds else {}
        dropped = self.seam_dropped - sum(d for x, (_, d) in self.decisions.items() if x > r - 2)
        cut = self.cut_dropped - sum(n for x, n in self.cut_after.items() if x > r)
        return StitcherState(pending, accepted, r, cut, dropped, 0)


__all__ = ["BAND_ROWS", "BandStitcher"]
