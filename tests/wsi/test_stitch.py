"""The stitching guarantee: each nucleus once, whole, however the tiles cut it."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from shapely.geometry import Polygon

from helpers import random_layout
from wsiseg.api import segment_image
from wsiseg.segmenters.base import TileInstances
from wsiseg.segmenters.watershed import WatershedSegmenter
from wsiseg.wsi.stitch import Stitcher, mask_polygon, paint_polygon  # noqa: F401
from wsiseg.wsi.grid import ALIGN, TileGrid
from wsiseg.wsi.stains import with_pixels


def _best_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each instance of ``a`` (ids 1..max), the best IoU with an instance of ``b``."""
    p, g = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    na, nb = int(p.max()) + 1, int(g.max()) + 1
    cont = np.bincount(p * nb + g, minlength=na * nb).reshape(na, nb)
    inter = cont[1:, 1:]
    union = cont.sum(1)[1:, None] + cont.sum(0)[None, 1:] - inter
    present = cont.sum(1)[1:] > 0
    return (inter / np.maximum(union, 1)).max(axis=1, initial=0)[present]


@pytest.mark.parametrize("tile,overlap", [(256, 96), (256, 128), (200, 80), (384, 96), (384, 64)])
def test_seam_tiled_equals_whole_on_real_he(kumar_dir, tile, overlap):
    """The guarantee users care about: tiled == whole image (deterministic classical segmenter, real Kumar H&E). The
    whole is one tile reaching as far past the image's edge as the last tiles do (white there, which the watershed
    sees): on these 1,000 px images none (200/80: the last tile starts at 800, a multiple of 32), 24 px (the others:
    their start rounded up to 32 px) or 56 (384/96: held back by the tile two before it)."""
    for name in sorted((kumar_dir / "images").glob("*.tif"))[:2]:
        img = tifffile.imread(name)[..., :3]
        seg = WatershedSegmenter()
        grid = TileGrid(img.shape[1], img.shape[0], tile, overlap, 1.0)
        reach = grid.origin(grid.rows - 1, grid.cols - 1)[0] + tile
        assert reach == grid.origin(grid.rows - 1, grid.cols - 1)[1] + tile
        assert reach - img.shape[1] == {(200, 80): 0, (384, 96): 56}.get((tile, overlap), 24)
        whole = segment_image(img, seg, mpp=0.25, tile_size=reach, overlap=96)  # one tile: no seams at all
        tiled = segment_image(img, seg, mpp=0.25, tile_size=tile, overlap=overlap)
        assert tiled.max() == whole.max() > 300, "nucleus counts differ"
        assert (_best_iou(whole, tiled) >= 0.95).all()
        assert (_best_iou(tiled, whole) >= 0.95).all()


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 3000), tile=st.integers(16, 512), half_overlap=st.integers(0, 128))
def test_tiles_end_at_the_slide_s_edge_and_keep_the_stitcher_s_geometry(size, tile, half_overlap):
    """Along an axis: the tiles start in order from 0; the last ends at the slide's edge, or less than ``ALIGN`` past
    it from a start on a multiple of ``ALIGN``, unless the slide is smaller than a tile or the tile two before it
    holds it back (no pixel in three tiles); the cores partition the axis,
    each at least overlap/2 inside its tile where the tile does not end at the slide's edge; and a tile's unshared
    part is what no other tile covers."""
    overlap = min(2 * half_overlap, tile // 2 // 2 * 2)
    grid = TileGrid(size, 7, tile, overlap, 1.0)
    n = grid.cols
    xs = [grid.origin(0, c)[0] for c in range(n)]
    assert xs[0] == 0 and all(a < b for a, b in zip(xs, xs[1:]))
    assert all(x == c * grid.stride for c, x in enumerate(xs[:-1]))
    end = xs[-1] + tile
    assert end >= size and end - size < grid.stride + (size < tile) * tile
    if n >= 2 and xs[-1] != (n - 1) * grid.stride and (n < 3 or xs[-1] > (n - 3) * grid.stride + tile):
        assert xs[-1] % ALIGN == 0 and 0 <= end - size < ALIGN  # moved back to the edge, on the 32 px grid
    if n >= 2 and size - tile >= max((n - 3) * grid.stride + tile, 0) and (size - tile) % ALIGN == 0:
        assert end == size
    assert all(xs[i + 2] >= xs[i] + tile for i in range(n - 2))
    cores = [grid.core(0, c) for c in range(n)]
    assert cores[0][0] == 0 and cores[-1][2] == np.inf and all(a[2] == b[0] for a, b in zip(cores, cores[1:]))
    for c, (x, (c0, _, c1, _)) in enumerate(zip(xs, cores)):
        assert c == 0 or c0 - x >= overlap / 2
        assert c == n - 1 or x + tile - c1 >= overlap / 2
        u0, _, u1, _ = grid.unshared(0, c)
        covered = [(xs[k], xs[k] + tile) for k in range(n) if k != c]
        inside = [p for p in range(x, x + tile) if not any(a <= p < b for a, b in covered)]
        assert (inside[0], inside[-1] + 1) == (u0, u1) if inside else u0 >= u1


class CropOracle:
    """A perfectly local 'segmenter': returns the instances of a known label image inside each tile."""

    name = "oracle"
    mpp = 0.25
    max_nucleus_px = 40

    def __init__(self, truth: np.ndarray, grid: TileGrid) -> None:
        self.truth = truth
        self.grid = grid
        self.queue: list[tuple[int, int]] = []

    def tile(self, r: int, c: int) -> TileInstances:
        x, y = self.grid.origin(r, c)
        T = self.grid.tile
        crop = np.zeros((T, T), np.int32)
        sub = self.truth[y:y + T, x:x + T]
        crop[:sub.shape[0], :sub.shape[1]] = sub
        # relabel 1..n as a model would (instances cut by the tile edge stay, cut)
        ids = np.unique(crop[crop > 0])
        lut = np.zeros(int(self.truth.max()) + 1, np.int32)
        lut[ids] = np.arange(1, len(ids) + 1)
        return TileInstances(lut[crop], np.ones(len(ids), np.float32))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), tile=st.sampled_from([64, 96, 128]),
       overlap=st.sampled_from([24, 32, 48]), h=st.integers(40, 300), w=st.integers(40, 300))
@example(seed=192, tile=128, overlap=48, h=168, w=300)  # a thin blob whose outline covers a neighbour's pixels
def test_stitcher_property_no_duplicate_no_loss_valid(seed, tile, overlap, h, w):
    overlap = min(overlap, tile // 2 // 2 * 2)
    rng = np.random.default_rng(seed)
    rmax = max(3, (overlap - 2) // 2)  # every blob's box is smaller than the overlap
    truth = random_layout(rng, h, w, int(rng.integers(0, 60)), rmax)
    grid = TileGrid(w, h, tile, overlap, 1.0)
    oracle = CropOracle(truth, grid)
    st_ = Stitcher(grid, 0.25)
    nuclei = []
    for r, c in grid.tiles():
        nuclei += st_.add(r, c, oracle.tile(r, c))
    nuclei += st_.finish()
    n_true = len(np.unique(truth[truth > 0]))
    assert len(nuclei) == n_true  # nothing lost, nothing duplicated
    for n in nuclei:
        assert Polygon(n.polygon).is_valid
    # each nucleus comes back whole: exactly the outline of its true blob (found by its bounding box)
    truth_polys = {}
    for k, sl in enumerate(ndi.find_objects(truth), start=1):
        if sl is not None:
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            truth_polys[box] = mask_polygon(truth[sl] == k) + np.array([sl[1].start, sl[0].start])
    seen = set()
    for n in nuclei:
        box = tuple(int(round(v)) for v in n.bbox)
        assert box in truth_polys and box not in seen
        seen.add(box)
        assert np.array_equal(n.polygon, truth_polys[box])


def test_stitcher_drops_duplicates_from_disagreeing_tiles():
    """Two tiles that both claim a seam nucleus (slightly different outlines) yield it once."""
    grid = TileGrid(224, 100, 128, 32, 1.0)  # two columns: tile 0 x[0,128), tile 1 x[96,224); core boundary x=112
    a = np.zeros((128, 128), np.int32)
    a[40:60, 100:119] = 1  # centre x = 109.5 -> primary in tile 0
    b = np.zeros((128, 128), np.int32)
    b[40:60, 103 - 96:124 - 96] = 1  # centre x = 113.5 -> primary in tile 1 too
    st_ = Stitcher(grid, 0.25)
    out = st_.add(0, 0, TileInstances(a, [0.9])) + st_.add(0, 1, TileInstances(b, [0.8])) + st_.finish()
    assert len(out) == 1 and st_.seam_dropped == 1
    assert out[0].score == pytest.approx(0.9)


def test_mask_polygon_round_trip_and_degenerate():
    m = np.zeros((20, 20), bool)
    m[5:15, 3:12] = True
    poly = mask_polygon(m)
    c = np.zeros((20, 20), np.int32)
    paint_polygon(c, poly, 1)
    assert np.array_equal(c > 0, m)
    single = np.zeros((5, 5), bool)
    single[2, 2] = True
    p = mask_polygon(single)
    assert Polygon(p).is_valid and Polygon(p).area > 0
    line = np.zeros((5, 9), bool)
    line[2, 1:8] = True
    assert Polygon(mask_polygon(line)).is_valid
    assert mask_polygon(np.zeros((4, 4), bool)) is None


def test_mask_polygons_batch_equals_one_by_one():
    from shapely.geometry import Polygon

    from wsiseg.wsi.stitch import mask_polygons

    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 5), bool)]  # empty
    for _ in range(40):
        m = ndi.binary_opening(rng.random((30, 30)) > 0.45, iterations=1)
        masks.append(m)
    pinch = np.zeros((6, 6), bool)
    pinch[1:3, 1:3] = pinch[3:5, 3:5] = True  # two squares touching at a corner: a self-touching outline
    masks += [pinch, np.ones((1, 5), bool), np.ones((1, 1), bool)]
    batch = mask_polygons(masks)
    for m, p in zip(masks, batch):
        one = mask_polygon(m)
        assert (p is None) == (one is None) == (not m.any())
        if p is not None:
            assert np.array_equal(p, one)
            assert Polygon(p).is_valid and Polygon(p).area > 0


def test_self_touching_outlines_keep_their_larger_part_close_to_the_mask():
    """A blob with a one-pixel spike and two blobs joined by a one-pixel neck trace invalid outlines; the repair keeps
    a valid polygon of the larger part that, painted back, covers that part (not a convex blob around everything)."""
    from shapely.geometry import Polygon

    spike = np.zeros((20, 30), bool)
    spike[4:16, 4:14] = True
    spike[9, 14:26] = True  # a one-pixel line sticking out
    neck = np.zeros((20, 34), bool)
    neck[3:17, 2:14] = True  # 168 px
    neck[9, 14:20] = True  # the neck
    neck[6:12, 20:26] = True  # 36 px
    for m, core in ((spike, spike[4:16, 4:14]), (neck, neck[3:17, 2:14])):
        p = mask_polygon(m)
        assert Polygon(p).is_valid and Polygon(p).area > 0
        c = np.zeros(m.shape, np.int32)
        paint_polygon(c, p, 1)
        painted = c > 0
        assert not (painted & ~m).any()  # nothing outside the mask
        assert painted.sum() >= core.sum()  # the larger part whole


def _compare_prepared_with_serial(grid: TileGrid, tiles: list[tuple[int, int, TileInstances]]) -> int:
    """Stitch ``tiles`` serially (:meth:`Stitcher.add`) and as with tile workers (:func:`wsiseg.parallel.tiles.prepare`,
    eager, packed and unpacked as they travel, then :meth:`Stitcher.add_proposal`); assert the same nuclei and the
    same GeoJSON encodings, and return how many decided items had to be outlined again (their mask trimmed by a seam
    decision)."""
    import pickle

    from wsiseg.export.geojson import feature_parts
    from wsiseg.parallel.tiles import finish, pack, prepare, unpack

    plain = [(r, c, t.labels, t.scores, t.stains, t.pixels) for r, c, t in tiles]  # (before add measures them)
    ref = Stitcher(grid, 0.25)
    want = [n for r, c, t in tiles for n in ref.add(r, c, t)] + ref.finish()
    st_ = Stitcher(grid, 0.25)
    got, redone = [], 0
    sent = pickle.loads(pickle.dumps(pack(prepare(grid, st_.margin, 0.25, plain, eager=True))))
    decided = [st_.add_proposal(p) for p in unpack(sent)]
    decided.append(st_.finish_decided())
    for d in decided:
        redone += sum(r is None for r in d.ready)
        nuclei, parts = finish(d)
        assert parts == [feature_parts(n) for n in nuclei]
        got += nuclei
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert np.array_equal(a.polygon, b.polygon)
        assert (a.score, a.area_px, a.perimeter_um, a.centroid, a.bbox, a.stains) == (
            b.score, b.area_px, b.perimeter_um, b.centroid, b.bbox, b.stains)
    assert (st_.seam_dropped, st_.cut_dropped) == (ref.seam_dropped, ref.cut_dropped)
    assert all(n.stains is not None for n in got) == all(px is not None for *_, px in plain)
    return redone


def test_tiles_prepared_ahead_give_the_same_nuclei(kumar_dir):
    """What tile workers compute ahead (every candidate outlined and encoded before any seam decision) is used only
    where the decision keeps the mask as it is: a nucleus trimmed by a neighbour's is outlined again; the nuclei
    are those of the serial stitcher, on a constructed trim and on real H&E."""
    grid = TileGrid(224, 100, 128, 32, 1.0)  # two columns: tile 0 x[0,128), tile 1 x[96,224); core boundary x=112
    a = np.zeros((128, 128), np.int32)
    a[40:60, 100:119] = 1  # primary in tile 0
    b = np.zeros((128, 128), np.int32)
    b[40:60, 112 - 96:130 - 96] = 1  # primary in tile 1, sharing 7 of its 18 columns with a: trimmed, kept
    b[80:90, 40:50] = 2  # a nucleus only tile 1 sees
    assert _compare_prepared_with_serial(grid, [(0, 0, TileInstances(a, [0.9])),
                                                (0, 1, TileInstances(b, [0.8, 0.7]))]) == 1
    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:600, :700, :3]
    grid = TileGrid(700, 600, 256, 64, 1.0)
    padded = np.full((grid.rows * grid.stride + grid.overlap, grid.cols * grid.stride + grid.overlap, 3), 255,
                     np.uint8)
    padded[:600, :700] = img
    predict = with_pixels(WatershedSegmenter().predict)  # (as a run predicts: the pixels travel for the stains)
    tiles = []
    for r, c in grid.tiles():
        x, y = grid.origin(r, c)
        tiles.append((r, c, predict(padded[None, y:y + 256, x:x + 256])[0]))
    _compare_prepared_with_serial(grid, tiles)


class _PlainStitcher(Stitcher):
    """The seam rule with no shortcut: every candidate checked against every accepted nucleus of its row and the
    row above, and (if secondary) every primary of the next row, in the rule's order (the reference for the rivals
    :func:`~wsiseg.wsi.stitch.decide_row` picks: only those whose boxes cross the candidate's; each decision is the
    same ``_settle``)."""

    def _decide(self, row, out, ready):
        from wsiseg.wsi.stitch import _settle

        cands = sorted(self._pending.pop(row, []), key=lambda c: (not c.primary, c.tile))
        acc = self._accepted.setdefault(row, [])
        nxt = [c for c in self._pending.get(row + 1, []) if c.primary]
        for c in cands:
            rivals = list(self._accepted.get(row - 1, [])) + list(acc) + ([] if c.primary else nxt)
            self.seam_dropped += not _settle(c, rivals, acc, out, ready)


@pytest.mark.parametrize("seed", range(6))
def test_seam_decisions_equal_the_plain_rule_on_disagreeing_tiles(seed):
    """Tiles that disagree everywhere (each its own random blobs, so seam candidates overlap, get trimmed and
    dropped all the time): the stitcher decides exactly what the plain rule decides, item for item."""
    rng = np.random.default_rng(seed)
    tile, overlap = 96, 32
    grid = TileGrid(int(rng.integers(200, 420)), int(rng.integers(200, 420)), tile, overlap, 1.0)
    tiles = {(r, c): random_layout(rng, tile, tile, 80, 20) for r, c in grid.tiles()}
    fast, plain = Stitcher(grid, 0.25), _PlainStitcher(grid, 0.25)
    got, want = [], []
    for (r, c), lab in tiles.items():
        inst = TileInstances(lab, rng.uniform(0.5, 1, int(lab.max())).astype(np.float32))
        got += fast.add_decided(r, c, inst).items
        want += plain.add_decided(r, c, inst).items
    got += fast.finish_decided().items
    want += plain.finish_decided().items
    assert fast.seam_dropped == plain.seam_dropped > 0
    assert len(got) == len(want) > 50
    for (m1, *rest1), (m2, *rest2) in zip(got, want):
        assert rest1 == rest2 and np.array_equal(m1, m2)


def test_crossing_boxes_equal_brute_force():
    from wsiseg.wsi.stitch import _crossing

    rng = np.random.default_rng(3)
    for n, m in ((0, 5), (5, 0), (1, 1), (200, 300)):
        def boxes(k):
            x0, y0 = rng.integers(0, 500, k), rng.integers(0, 60, k)
            return list(zip(x0.tolist(), y0.tolist(), (x0 + rng.integers(1, 70, k)).tolist(),
                            (y0 + rng.integers(1, 40, k)).tolist()))
        a, b = boxes(n), boxes(m)
        def cross(p, q):
            return max(p[0], q[0]) < min(p[2], q[2]) and max(p[1], q[1]) < min(p[3], q[3])

        want = {i: [j for j, q in enumerate(b) if cross(p, q)] for i, p in enumerate(a)}
        assert _crossing(a, b) == {i: js for i, js in want.items() if js}
        earlier = {i: [j for j, q in enumerate(a[:i]) if cross(p, q)] for i, p in enumerate(a)}
        assert _crossing(a, a, earlier=True) == {i: js for i, js in earlier.items() if js}


def test_outlines_are_simplified_within_a_quarter_level0_pixel(kumar_dir):
    """Written outlines (:func:`outline_items`) are the traced ones (:func:`mask_polygons`) simplified within 0.25
    level-0 pixels: on real H&E nuclei at 20x (0.5 level-0 px per model px) every outline is valid, its vertices a
    subset of the traced ones from the same start vertex, at Hausdorff distance <= 0.25 px, with fewer vertices
    overall, and its measurements are its own; at 40x (1 px per model px) nothing moves."""
    import shapely

    from wsiseg.wsi.stitch import Decided, ring_measures, mask_polygons, outline_items

    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[1])[:512, :512, :3]
    lab = WatershedSegmenter().predict(img[None])[0].labels
    items = [(lab[sl] == k, sl[1].start, sl[0].start, 1.0, None)
             for k, sl in enumerate(ndi.find_objects(lab), start=1) if sl is not None]
    assert len(items) > 100
    traced = mask_polygons([it[0] for it in items])
    for s in (0.5, 0.501, 1.0):
        nuclei = outline_items(Decided(items, s, 0.25))
        assert all(n is not None for n in nuclei)
        full = [(p + np.array([x0, y0], np.float64)) * s for p, (_, x0, y0, _, _) in zip(traced, items)]
        written = [n.polygon for n in nuclei]
        if s == 1.0:  # a quarter pixel removes no vertex of a staircase outline: the same rings, bit for bit
            assert all(np.array_equal(a, b) for a, b in zip(written, full))
            continue
        a, b = (np.array([shapely.Polygon(r) for r in rings]) for rings in (written, full))
        assert shapely.is_valid(a).all() and (shapely.area(a) > 0).all()
        assert (shapely.hausdorff_distance(a, b, densify=0.02) <= 0.25 + 1e-9).all()
        assert sum(map(len, written)) < 0.8 * sum(map(len, full))
        for w, f in zip(written, full):
            assert np.array_equal(w[0], f[0]) and len(w) <= len(f)
            assert {tuple(v) for v in w} <= {tuple(v) for v in f}
        perim, area, _, _ = ring_measures(written)
        assert [n.area_px for n in nuclei] == pytest.approx(area)  # (the written ring's own)
        assert [n.perimeter_um for n in nuclei] == pytest.approx([p / s * 0.25 for p in perim])


def test_nothing_is_outlined_past_the_slide_s_edge(kumar_dir):
    """Constructed: a last tile reaching 40 model pixels past a slide whose edge cuts its last model pixel; a nucleus
    across the edge keeps its part on the slide, one whose box's centre lies past it is left out. Real: a kidney crop
    of 555 x 777 level-0 pixels at 0.37 um/px (its last model pixels partly off it, its last tiles padded) gives
    outlines that all lie within [0, 555] x [0, 777]."""
    from wsiseg.wsi.stitch import on_slide

    grid = TileGrid.for_slide((300, 200), 0.5, 0.25, 128, 32)  # scale 0.5: 600 x 400 model px, 300 x 200 level 0
    assert grid.on_slide == (600, 400) and (grid.slide_width, grid.slide_height) == (300, 200)
    cut = TileGrid.for_slide((301, 200), 0.37, 0.25, 128, 32)  # 445.48 model px: the 446th is partly off the slide
    assert cut.width == 446 and cut.on_slide == (445, 296) and TileGrid(446, 296, 128, 32, 0.5).on_slide == (446, 296)
    row, col = grid.rows - 1, grid.cols - 1
    ox, oy = grid.origin(row, col)
    lab = np.zeros((128, 128), np.int32)
    edge = 600 - ox  # 120: the tile's last 8 columns are white padding
    lab[10:30, edge - 12:edge + 4] = 1   # across the slide's right edge, centre on the slide
    lab[50:70, edge - 2:edge + 8] = 2    # centre past the edge
    lab[90:110, 20:40] = 3               # on the slide
    inst = TileInstances(lab, np.array([0.9, 0.8, 0.7], np.float32))
    out = on_slide(grid, row, col, inst)
    assert out.count == 2 and out.scores.tolist() == pytest.approx([0.9, 0.7])
    assert not out.labels[:, edge:].any() and (out.labels == 1).sum() == 20 * 12
    assert on_slide(grid, 0, 0, TileInstances(lab, inst.scores)).labels is lab  # wholly on the slide: as it is

    image = tifffile.imread(kumar_dir / "images" / "TCGA-HE-7129-01Z-00-DX1.tif")[:777, :555, :3]
    from wsiseg.api import image_nuclei

    nuclei = image_nuclei(np.ascontiguousarray(image), "default", mpp=0.37, zoom=1)
    pts = np.concatenate([n.polygon for n in nuclei])
    assert len(nuclei) > 300 and pts.min() >= 0 and pts[:, 0].max() <= 555 and pts[:, 1].max() <= 777
    assert pts[:, 1].max() > 776  # (nuclei reach the bottom edge)
