"""Seam decisions in bands of tile rows (wsiseg.wsi.bands) equal the raster-order stitcher's, item for item."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import tifffile

from helpers import random_layout
from wsiseg.segmenters.base import TileInstances
from wsiseg.segmenters.watershed import WatershedSegmenter
from wsiseg.wsi.bands import stitch_bands
from wsiseg.wsi.grid import TileGrid
from wsiseg.wsi.stains import with_pixels
from wsiseg.wsi.stitch import Decided, Stitcher, outline, propose


def _serial(grid: TileGrid, proposals):
    st = Stitcher(grid, 0.25)
    out = [st.add_proposal(p) for p in _fresh(proposals)]
    out.append(st.finish_decided())
    return out, st


def _fresh(proposals):
    """Copies whose candidates a stitcher may change (the same arrays)."""
    from dataclasses import replace

    return [replace(p, pending=[replace(c) for c in p.pending]) for p in proposals]


def _assert_same(got, want) -> int:
    """Same Decided per tile: items (masks equal, the rest equal) and precomputed results; returns the item count."""
    assert len(got) == len(want)
    n = 0
    for g, w in zip(got, want):
        assert len(g.items) == len(w.items)
        assert (g.scale, g.mpp) == (w.scale, w.mpp)
        for (m1, *r1), (m2, *r2) in zip(g.items, w.items):
            assert r1 == r2 and np.array_equal(m1, m2)
        assert g.ready == w.ready
        n += len(g.items)
    return n


def _disagreeing(seed: int, tile: int = 96, overlap: int = 32, rmax: int = 20, n: int = 80):
    """Tiles that disagree everywhere: each its own random blobs (up to ``2 rmax`` px across), so seam candidates
    cross, are trimmed and dropped all the time; with blobs about as tall as a tile core, chains of crossing nuclei
    reach from one row's seams to the next row's."""
    rng = np.random.default_rng(seed)
    grid = TileGrid(int(rng.integers(300, 520)), int(rng.integers(300, 520)), tile, overlap, 1.0)
    props = []
    for r, c in grid.tiles():
        lab = random_layout(rng, tile, tile, n, rmax)
        props.append(propose(grid, grid.overlap // 4, r, c,
                             TileInstances(lab, rng.uniform(0.5, 1, int(lab.max())).astype(np.float32))))
    return grid, props


#: blobs well under a tile core (96 px tiles, 32 px overlap: a 64 px core), and blobs as tall as a core (64 px
#: tiles, 32 px overlap: a 32 px core, blobs up to 28 px), where many bands guess their first boundary wrong
LAYOUTS = {"small": dict(tile=96, overlap=32, rmax=20, n=80), "core-tall": dict(tile=64, overlap=32, rmax=14, n=40)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", range(3))
def test_bands_equal_the_stitcher_on_disagreeing_tiles(seed, layout):
    """Any band size, bands whose guessed boundary was wrong included: the stitcher's decisions and counts."""
    grid, props = _disagreeing(seed, **LAYOUTS[layout])
    want, st = _serial(grid, props)
    assert st.seam_dropped > 0
    for band_rows in (1, 2, 3, 100):
        got, counts = stitch_bands(grid, 0.25, props, band_rows)
        assert _assert_same(got, want) > 100
        assert (counts.seam_dropped, counts.cut_dropped) == (st.seam_dropped, st.cut_dropped)
        if band_rows == 100:
            assert counts.bands == 1 and counts.redecided == 0


def test_a_wrong_guess_is_redecided():
    """Blobs as tall as a tile core: some bands' guessed boundaries are wrong (a chain of crossing blobs reaches
    from row a-2's seams to row a's), and the result is still the stitcher's: the redecision path is exercised."""
    grid, props = _disagreeing(0, **LAYOUTS["core-tall"])
    want, _ = _serial(grid, props)
    got, counts = stitch_bands(grid, 0.25, props, 1)
    _assert_same(got, want)
    assert 0 < counts.redecided < counts.bands


def test_bands_in_worker_processes_equal_the_stitcher_on_real_he(kumar_dir):
    """Real Kumar H&E, the watershed's tiles (256 px, overlap 64, as a run cuts them, with their pixels for the
    stains), bands decided in two worker processes: the stitcher's decisions; and no band needed redeciding (real
    nuclei are far smaller than a tile core)."""
    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[1])[..., :3]
    h, w = img.shape[:2]
    grid = TileGrid(w, h, 256, 64, 1.0)
    padded = np.full((grid.rows * grid.stride + grid.overlap, grid.cols * grid.stride + grid.overlap, 3), 255,
                     np.uint8)
    padded[:h, :w] = img
    predict = with_pixels(WatershedSegmenter().predict)
    props = []
    for r, c in grid.tiles():
        x, y = grid.origin(r, c)
        props.append(propose(grid, grid.overlap // 4, r, c, predict(padded[None, y:y + 256, x:x + 256])[0]))
    want, st = _serial(grid, props)
    with ProcessPoolExecutor(2) as pool:
        got, counts = stitch_bands(grid, 0.25, props, 2, pool)
    assert _assert_same(got, want) > 300
    assert counts.bands == -(-grid.rows // 2) > 1 and counts.redecided == 0
    assert counts.seam_dropped == st.seam_dropped > 0


def test_tiles_out_of_raster_order_are_refused():
    grid = TileGrid(300, 300, 96, 32, 1.0)
    empty = TileInstances(np.zeros((96, 96), np.int32), np.zeros(0, np.float32))
    props = [propose(grid, 8, 1, 0, empty), propose(grid, 8, 0, 0, empty)]
    with pytest.raises(ValueError, match="raster order"):
        stitch_bands(grid, 0.25, props)
    with pytest.raises(ValueError, match="band_rows"):
        stitch_bands(grid, 0.25, props[:1], 0)


def _stream(grid: TileGrid, props, band_rows: int, start=None, order=None):
    """``props`` through a :class:`BandStitcher` whose bands are decided here (``decide_band``), their results
    taken back in the order asked for, ``order`` shuffling nothing but when they come (all at the end, or at once):
    the band stitcher, its ``asked_total`` the jobs it asked for."""
    from collections import deque

    from wsiseg.parallel.seams import BandStitcher
    from wsiseg.parallel.tiles import decide_band, split

    asked: deque = deque()
    tickets = iter(range(10 ** 6))
    count = [0]  # jobs asked for

    def decide(job):
        t = next(tickets)
        asked.append((t, job))
        count[0] += 1
        return t

    bs = BandStitcher([(p.row, p.col) for p in props], decide, band_rows, start=start)
    for p in split(_fresh(props)):
        bs.add(p)
        while order == "at once" and asked:
            t, job = asked.popleft()
            bs.result(t, decide_band(grid, 0.25, job))
    while asked:
        t, job = asked.popleft()
        bs.result(t, decide_band(grid, 0.25, job))
    bs.asked_total = count[0]
    return bs


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_band_stitcher_decides_as_the_stitcher_and_its_state_resumes_it(layout):
    """The run's band stitcher (decisions made by ``decide_band`` jobs, the candidates packed throughout): every
    row's decided items are the stitcher's, in order, with the same dropped counts; and its :meth:`state` at any
    row's start restores a :class:`Stitcher` that decides the rest as the uninterrupted one does."""
    grid, props = _disagreeing(1, **LAYOUTS[layout])
    st = Stitcher(grid, 0.25)
    rows_items: dict[int, list] = {}
    for p in _fresh(props):
        st.add_proposal(p)
    st.finish_decided()
    want_dropped = st.seam_dropped
    # the stitcher's decisions row by row (decide_rows is its row decision: test_bands_equal_the_stitcher...)
    from wsiseg.wsi.bands import decide_rows

    pend: dict[int, list] = {}
    for p in _fresh(props):
        pend.setdefault(p.row, []).extend(p.pending)
    rows = sorted(pend)
    for r, dec in decide_rows(pend, rows, []).items():
        rows_items[r] = [(n.bbox, n.score, n.polygon.tolist()) for n in outline(Decided(dec.items, grid.scale, 0.25))]
    asked_again = 0
    for band_rows in (1, 2, 3):
        for order in ("at once", "at the end"):
            bs = _stream(grid, props, band_rows, order=order)
            assert all(bs.final(r) for r in rows)
            asked_again += bs.asked_total - len(bs.bands)
            for r in rows:  # (the nuclei, outlined where the band was decided)
                got = [(n.bbox, n.score, n.polygon.tolist()) for n in bs.decided(r).nuclei()]
                assert got == rows_items[r], (band_rows, r)
            assert bs.seam_dropped == want_dropped and bs.cut_dropped == st.cut_dropped
    if layout == "core-tall":
        assert asked_again > 0  # guesses found wrong, and those bands decided again from the true boundary
    # state at a row's start: a Stitcher restored from it decides the rest as the uninterrupted one does
    bs = _stream(grid, props, 2, order="at once")
    checked = 0
    for k in range(2, len(rows)):
        r = rows[k]
        if not all(bs.final(x) for x in rows if x <= r - 2):
            continue
        state = bs.state(r)
        rest = [p for p in props if p.row > r]
        st2 = Stitcher(grid, 0.25)
        st2.restore(state)
        got = [st2.add_proposal(p) for p in _fresh(rest)] + [st2.finish_decided()]
        st3 = Stitcher(grid, 0.25)
        whole = [st3.add_proposal(p) for p in _fresh(props)] + [st3.finish_decided()]
        tail = whole[len(props) - len(rest):]
        first = [x for i in whole[:len(props) - len(rest)] for x in i.items]
        # everything from the restored state on is what the uninterrupted stitcher gives from there
        assert [(x, y, s) for d in got for _, x, y, s, _ in d.items] == \
            [(x, y, s) for d in tail for _, x, y, s, _ in d.items], r
        assert st2.seam_dropped == st3.seam_dropped and st2.cut_dropped == st3.cut_dropped
        assert first
        checked += 1
    assert checked > 3
