"""Instances from overlapping tiles -> every nucleus once, whole, in level-0 coordinates.

Tiles arrive in raster order (see :class:`wsiseg.wsi.grid.TileGrid` for cores and cut edges). The rule:

1. **Candidates.** A tile proposes each instance that does not touch an edge of the tile cutting through the slide
   and whose bounding-box centre lies in the tile's core grown by ``margin`` pixels (default ``overlap/4``).
   Cores partition the slide, so every position has exactly one owner tile: a candidate is *primary* when its
   centre lies in its own tile's core, *secondary* when it lies in the margin (where two tiles may disagree about
   a nucleus straddling the boundary between their cores, and each might otherwise leave it to the other).
2. **Safe candidates** (their box lies where no other tile reaches) are output at once.
3. **Seam candidates** are decided once every neighbouring tile has proposed its own: in raster order of tiles,
   primary before secondary, a candidate is dropped as a duplicate when it shares more than half of the smaller
   mask with a nucleus already output, or (if secondary) with a primary candidate of a neighbour; a smaller
   overlap is subtracted from it (dropped if less than half remains). So no pixel belongs to two nuclei.

Guarantee: a core lies at least ``overlap/2`` pixels inside its tile, so a nucleus whose bounding box is smaller than
``overlap - 2 * margin`` pixels (model scale) in both directions lies whole, untouched by cut edges, in every tile
whose grown core holds its centre; it is output exactly once, as its owner tile segmented it (with at least
``overlap/2 - margin`` pixels of context around it), provided neighbouring tiles agree to within the margin on where
its centre is. Nuclei up to ``overlap`` pixels are whole in their owner tile unless their centre is near a core
border; a nucleus cut by every tile that proposes it is dropped and counted in :attr:`Stitcher.cut_dropped`
(raise ``--overlap``). Every outline lies within the slide's level-0 extent: a tile's instances are first cut to
the model pixels wholly on the slide (:func:`on_slide`; a last tile's white padding, and a last model pixel partly
off the slide, are never part of a nucleus). Memory: the seam candidates of the last two tile rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..segmenters.base import TileInstances
from .grid import TileGrid
from .stains import SlideStain, drop_dye, drop_faint, drop_holes, measure


#: a decided or safe nucleus before outlining: ``(mask, x0, y0, score, stains)``: the bool mask of its box, the box's
#: top-left on the model grid, its score and its stain measurements (:attr:`Nucleus.stains`, or None)
Item = tuple[np.ndarray, int, int, float, "tuple[float, float, float] | None"]


@dataclass(slots=True)
class Nucleus:
    """One output nucleus. ``polygon``: (n, 2) float64 level-0 (x, y), vertices at boundary pixel centres (of the
    model's grid: the traced outline, simplified within :data:`SIMPLIFY_TOLERANCE` level-0 pixels)."""

    polygon: np.ndarray
    score: float
    area_px: float  # level-0 pixels
    area_um2: float
    perimeter_um: float
    centroid: tuple[float, float]  # level-0 (x, y)
    bbox: tuple[float, float, float, float]  # level-0 (x0, y0, x1, y1)
    #: hematoxylin mean, its standard deviation and eosin mean over the instance's pixels in its tile
    #: (:mod:`wsiseg.wsi.stains`); None where the segmented tiles had none measured
    stains: tuple[float, float, float] | None = None


@dataclass
class NucleusBlock:
    """Nuclei as columns, in order: what a tile worker sends for the nuclei it outlined, handed to the writers as
    it is (no :class:`Nucleus` made per nucleus in the main process). ``poly``: every outline, joined ((V, 2) float64,
    as :attr:`Nucleus.polygon`), ``plen`` the vertices of each; ``meas``: (n, 9) float64 area_px, area_um2,
    perimeter_um, centroid x and y, bbox x0, y0, x1, y1; ``score``; ``stains``: (n, 3) float64 rows, NaN where
    none (:func:`~wsiseg.wsi.stains.stain_rows`); ``blob`` and ``blen``: each nucleus' two encoded GeoJSON parts,
    joined, and their lengths (2n)."""

    poly: np.ndarray
    plen: np.ndarray
    meas: np.ndarray
    score: np.ndarray
    stains: np.ndarray
    blob: bytes
    blen: np.ndarray

    def __len__(self) -> int:
        return len(self.plen)

    def nuclei(self) -> list[Nucleus]:
        """The same nuclei as :class:`Nucleus` objects (bit for bit)."""
        from .stains import stains_of_rows

        starts = np.concatenate([[0], np.cumsum(self.plen)]).tolist()
        stains = stains_of_rows(self.stains)
        return [Nucleus(self.poly[starts[i]:starts[i + 1]], s, a, ar, pe, (cx, cy), (b0, b1, b2, b3), stains[i])
                for i, (s, (a, ar, pe, cx, cy, b0, b1, b2, b3)) in enumerate(zip(self.score.tolist(),
                                                                                   self.meas.tolist()))]

    def polygons(self) -> list[np.ndarray]:
        """Each nucleus' outline (views of :attr:`poly`)."""
        return np.split(self.poly, np.cumsum(self.plen)[:-1]) if len(self) else []


@dataclass(slots=True)
class Candidate:
    """A seam candidate: a nucleus near a tile's border, proposed by that tile and decided by the stitcher against
    its neighbours' (:meth:`Stitcher.add_proposal`). The tile pool rebuilds them from its workers' results and the
    resume journal from its checkpoints."""

    tile: tuple[int, int]
    box: tuple[int, int, int, int]  # model grid x0, y0, x1, y1 (exclusive)
    mask: np.ndarray
    score: float
    primary: bool
    ready: Any = None  # what the outline of ``mask`` gave, when computed ahead (see :class:`Proposal`); not journalled
    area: int = -1  # pixels of ``mask`` (-1: not counted yet; see :func:`_area`)
    stains: tuple[float, float, float] | None = None  # the instance's, as :attr:`Nucleus.stains`


@dataclass
class Proposal:
    """What one tile proposes (:func:`propose`): ``safe`` items (:data:`Item`), final at once, and ``pending`` seam
    candidates, decided later by the stitcher; ``cut_dropped``: primary nuclei cut by the tile's cut edges. Plain
    data, computed from the tile alone, so tiles can be proposed in worker processes (any order) and fed to
    :meth:`Stitcher.add_proposal` in raster order. ``safe_ready``, when set, holds a precomputed result for each
    safe item (the candidates' ``ready`` likewise); the stitcher passes them on untouched in :attr:`Decided.ready`,
    and a candidate's only while its mask is unchanged."""

    row: int
    col: int
    safe: list[Item]
    pending: list[Candidate]
    cut_dropped: int = 0
    safe_ready: list | None = None
    #: with seam decisions in bands (:mod:`wsiseg.wsi.bands`): ``pending`` left empty, the candidates packed
    #: (:func:`wsiseg.parallel.tiles.pack`) for the worker that decides their band, and how many there are
    seam: Any = None
    seam_count: int = 0
    #: with bands, the safe items' nuclei as one :class:`NucleusBlock` (``safe`` and ``safe_ready`` left empty)
    block: "NucleusBlock | None" = None


@dataclass
class StitcherState:
    """What a :class:`Stitcher` has seen so far (the resume journal saves and restores it): the seam candidates not
    decided yet and the decided seam nuclei later tiles are checked against, both by tile row; the last row added;
    the counters."""

    pending: dict[int, list[Candidate]]
    accepted: dict[int, list[Candidate]]
    row: int
    cut_dropped: int
    seam_dropped: int
    count: int


class Stitcher:
    """Feed tiles with :meth:`add` in raster order, then call :meth:`finish`; both return nuclei ready to write.
    :meth:`state` and :meth:`restore` give and take what it has seen (for resuming)."""

    def __init__(self, grid: TileGrid, model_mpp: float, margin: int | None = None,
                 stain: SlideStain = SlideStain()) -> None:
        self.grid = grid
        self.model_mpp = model_mpp
        self.margin = grid.overlap // 4 if margin is None else int(margin)
        self.stain = stain  # the slide's faint cut, dye band and grey level (:func:`propose`)
        self.cut_dropped = 0
        self.seam_dropped = 0
        self.count = 0
        self._pending: dict[int, list[Candidate]] = {}  # tile row -> seam candidates not decided yet
        self._accepted: dict[int, list[Candidate]] = {}  # tile row -> decided seam nuclei (for later conflicts)
        self._row = -1

    #: the attributes that are settings, not state
    _SETTINGS = frozenset({"grid", "model_mpp", "margin", "stain"})

    def state(self) -> StitcherState:
        """The stitcher's state (its own tables, not copies: save them before adding more)."""
        unknown = set(vars(self)) - self._SETTINGS - {"_pending", "_accepted", "_row", "cut_dropped", "seam_dropped",
                                                      "count"}
        if unknown:  # a programming error, caught by the resume tests: StitcherState must learn the new state
            raise RuntimeError(f"StitcherState does not hold the Stitcher's {sorted(unknown)}")
        return StitcherState(self._pending, self._accepted, self._row, self.cut_dropped, self.seam_dropped,
                             self.count)

    def restore(self, state: StitcherState) -> None:
        """Continue from ``state`` (:meth:`state` of a stitcher with the same settings)."""
        self._pending, self._accepted, self._row = state.pending, state.accepted, int(state.row)
        self.cut_dropped, self.seam_dropped, self.count = int(state.cut_dropped), int(state.seam_dropped), \
            int(state.count)

    # ------------------------------------------------------------------ public
    def add(self, row: int, col: int, inst: TileInstances) -> list[Nucleus]:
        """Stitch one tile's instances; returns the nuclei that are final now (from this and earlier tiles)."""
        out = outline(self.add_decided(row, col, inst))
        self.count += len(out)
        return out

    def finish(self) -> list[Nucleus]:
        out = outline(self.finish_decided())
        self.count += len(out)
        return out

    def add_decided(self, row: int, col: int, inst: TileInstances) -> "Decided":
        """:meth:`add` without the outlines: the masks decided now, as plain data for :func:`outline` (which may
        run elsewhere, e.g. in a worker process; ``outline`` of the results in order gives :meth:`add`'s nuclei)."""
        return self.add_proposal(propose(self.grid, self.margin, row, col, inst, self.stain))

    def add_proposal(self, p: Proposal) -> "Decided":
        """:meth:`add_decided` of a tile already proposed (:func:`propose`, possibly in another process). The
        decided items come with their precomputed results in :attr:`Decided.ready` (``None`` where none was
        computed, or where a seam decision trimmed the mask)."""
        if p.row < self._row:
            raise ValueError("tiles must be added in raster order")
        items: list[Item] = []
        ready: list = []
        if p.row != self._row:
            self._row = p.row
            for r in sorted(k for k in self._pending if k <= p.row - 2):
                self._decide(r, items, ready)
            for r in [k for k in self._accepted if k < p.row - 3]:
                del self._accepted[r]
        self.cut_dropped += p.cut_dropped
        self._pending.setdefault(p.row, []).extend(p.pending)
        items.extend(p.safe)
        ready.extend(p.safe_ready if p.safe_ready is not None else [None] * len(p.safe))
        return Decided(items, self.grid.scale, self.model_mpp, ready)

    def finish_decided(self) -> "Decided":
        """:meth:`finish` without the outlines (see :meth:`add_decided`)."""
        items: list[Item] = []
        ready: list = []
        for r in sorted(self._pending):
            self._decide(r, items, ready)
        return Decided(items, self.grid.scale, self.model_mpp, ready)

    @property
    def safe_y(self) -> float:
        """Model-grid row above which no nucleus will be output any more."""
        rows = [r for r in self._pending if self._pending[r]] + [self._row]
        return float(self.grid.origin(min(rows), 0)[1]) if self._row >= 0 else 0.0

    # ------------------------------------------------------------------ internals
    def _decide(self, row: int, out: list[Item], ready: list) -> None:
        """Decide the seam candidates of tile row ``row`` (:func:`decide_row`); appends the accepted ones to ``out``
        (and their precomputed results, or ``None`` where the mask was trimmed, to ``ready``)."""
        d = decide_row(self._pending.pop(row, []), self._accepted.get(row - 1, []), self._pending.get(row + 1, []))
        self._accepted.setdefault(row, []).extend(d.accepted)
        out.extend(d.items)
        ready.extend(d.ready)
        self.seam_dropped += d.dropped


@dataclass
class RowDecision:
    """What :func:`decide_row` decided for one tile row: the ``accepted`` candidates in decision order (masks
    trimmed where a rival took pixels), their ``items`` (:data:`Item`) and precomputed results (``ready``: ``None``
    where trimmed or none was computed), and how many candidates were ``dropped`` as duplicates."""

    accepted: list[Candidate]
    items: list[Item]
    ready: list
    dropped: int


def decide_row(cands: list[Candidate], before: list[Candidate], after: list[Candidate]) -> RowDecision:
    """Rule 3 of the module's doc for one tile row: ``cands``, the row's seam candidates as its tiles proposed them
    (raster order); ``before``, the nuclei accepted in the row above (its :attr:`RowDecision.accepted`, in order);
    ``after``, the next row's seam candidates (its primaries are rivals of this row's secondaries). The candidates
    are changed in place (a trimmed mask replaces theirs).

    Depends on ``before`` only through those of its nuclei whose boxes cross some candidate's, in their order
    (:func:`boundary`): two ``before`` lists that agree there give the same decision."""
    # primaries first, each group in raster order of tiles (candidates are appended in that order)
    cands = sorted(cands, key=lambda c: (not c.primary, c.tile))
    acc: list[Candidate] = []
    items: list[Item] = []
    ready: list = []
    # rivals, in the order they are checked: nuclei accepted in the row above and any accepted here already,
    # those accepted here as they come, then (for secondary candidates only) the next row's undecided
    # primaries. Only rivals whose boxes cross the candidate's can matter (:func:`_resolve`), so they are found
    # for the whole row at once (:func:`_crossing`), and a candidate no box crosses is accepted as it is.
    nxt = [c for c in after if c.primary]
    boxes = [c.box for c in cands]
    r_before = _crossing(boxes, [c.box for c in before])
    r_here = _crossing(boxes, boxes, earlier=True)
    r_next = _crossing(boxes, [c.box for c in nxt])
    taken = [False] * len(cands)
    for i, c in enumerate(cands):
        rivals = [before[j] for j in r_before.get(i, ())] + [cands[j] for j in r_here.get(i, ()) if taken[j]]
        if not c.primary:
            rivals += [nxt[j] for j in r_next.get(i, ())]
        taken[i] = _settle(c, rivals, acc, items, ready)
    return RowDecision(acc, items, ready, len(cands) - len(acc))


def boundary(before: list[Candidate], cands: list[Candidate]) -> list[Candidate]:
    """The nuclei of ``before`` (in order) whose boxes cross some box of ``cands``: all that :func:`decide_row`
    of ``cands`` reads of ``before``."""
    hit = _crossing([c.box for c in before], [c.box for c in cands])
    return [c for i, c in enumerate(before) if i in hit]


def _settle(c: Candidate, rivals: list[Candidate], acc: list[Candidate], out: list[Item], ready: list) -> bool:
    """Decide one seam candidate against its ``rivals`` (:func:`_resolve`; none: accepted as it is): dropped
    (``False``), or accepted, trimmed or whole, into its row's ``acc`` and the ``out`` and ``ready`` of
    :func:`decide_row` (``True``)."""
    if rivals:
        mask = _resolve(c, rivals)
        if mask is None:
            return False
        if mask is not c.mask:
            c.mask, c.ready, c.area = mask, None, -1
    acc.append(c)
    out.append((c.mask, c.box[0], c.box[1], c.score, c.stains))
    ready.append(c.ready)
    c.ready = None  # (kept no longer than needed)
    return True


@dataclass
class Decided:
    """Nuclei the stitcher has decided, before outlining: ``items`` (:data:`Item`), the grid's ``scale`` (level-0
    pixels per model pixel) and the model's ``mpp``. Plain data: it pickles, so :func:`outline` can run in a worker
    process. Where ``ready`` holds an item's result, computed ahead (:mod:`wsiseg.parallel.tiles`), its mask may be
    ``None`` (not shipped back)."""

    items: list[Item]
    scale: float
    mpp: float
    ready: list | None = None  # per item, a precomputed result or None (see Stitcher.add_proposal)


def propose(grid: TileGrid, margin: int, row: int, col: int, inst: TileInstances,
            stain: SlideStain = SlideStain()) -> Proposal:
    """The candidates of one tile (rule 1 of the module's doc), from the tile alone: the nuclei that are final at
    once (``safe``: their box lies where no other tile reaches) and the seam candidates (``pending``); the stain
    measurements made first where the tile came with its pixels (:func:`~wsiseg.wsi.stains.measure`), after its
    holes (:func:`~wsiseg.wsi.stains.drop_holes`) and the instances on marking dye
    (:func:`~wsiseg.wsi.stains.drop_dye`: green to teal up to the slide's ``stain.dye_top``, or grey below its
    ``stain.grey_below``) are left out, and then the instances whose mean haematoxylin is below ``stain.faint``
    (:func:`~wsiseg.wsi.stains.drop_faint`; 0: none)."""
    from scipy import ndimage as ndi

    inst = drop_faint(measure(drop_dye(drop_holes(on_slide(grid, row, col, inst)), stain)), stain.faint)
    g = grid
    m = margin
    lab = inst.labels
    safe: list[Item] = []
    pend: list[Candidate] = []
    cut = 0
    if inst.count == 0 or not lab.any():
        return Proposal(row, col, safe, pend)
    ox, oy = g.origin(row, col)
    cx0, cy0, cx1, cy1 = g.core(row, col)
    cut_l, cut_t, cut_r, cut_b = g.cut_edges(row, col)
    H, W = lab.shape
    sx0, sy0, sx1, sy1 = g.unshared(row, col)  # where no other tile reaches
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        gx0, gy0, gx1, gy1 = ox + x0, oy + y0, ox + x1, oy + y1
        cx, cy = (gx0 + gx1) / 2.0, (gy0 + gy1) / 2.0
        if not (cx0 - m <= cx < cx1 + m and cy0 - m <= cy < cy1 + m):
            continue  # another tile owns it
        primary = cx0 <= cx < cx1 and cy0 <= cy < cy1
        if (cut_l and x0 == 0) or (cut_t and y0 == 0) or (cut_r and x1 == W) or (cut_b and y1 == H):
            if primary:
                cut += 1
            continue
        score = float(inst.scores[k - 1]) if k - 1 < inst.count else 1.0
        stains = inst.stain_row(k)
        mask = lab[sl] == k
        if primary and sx0 <= gx0 and sy0 <= gy0 and gx1 <= sx1 and gy1 <= sy1:
            safe.append((mask, gx0, gy0, score, stains))
        else:
            pend.append(Candidate((row, col), (gx0, gy0, gx1, gy1), mask, score, primary, stains=stains))
    return Proposal(row, col, safe, pend, cut)


def on_slide(grid: TileGrid, row: int, col: int, inst: TileInstances) -> TileInstances:
    """``inst`` less whatever lies past the slide's edge (:attr:`TileGrid.on_slide`: the white padding of a last
    tile, and the last model pixel where it is partly off the slide): an instance whose box's centre lies past the
    edge is left out, one that only reaches past it keeps its part on the slide. ``inst`` itself where the tile
    lies wholly on the slide."""
    from scipy import ndimage as ndi

    ox, oy = grid.origin(row, col)
    cols, rows = grid.on_slide
    h, w = inst.labels.shape
    if ox + w <= cols and oy + h <= rows:
        return inst
    keep = np.zeros(inst.count, bool)
    for k, sl in enumerate(ndi.find_objects(inst.labels, max_label=inst.count)):
        if sl is not None:
            keep[k] = ox + (sl[1].start + sl[1].stop) / 2.0 < cols and oy + (sl[0].start + sl[0].stop) / 2.0 < rows
    lab = inst.labels.copy()
    lab[:, max(cols - ox, 0):] = 0
    lab[max(rows - oy, 0):] = 0
    return TileInstances(lab, inst.scores, inst.stains, inst.pixels).subset(keep)


def outline(decided: Decided) -> list[Nucleus]:
    """Nuclei from decided masks, in order: outlines (:func:`mask_polygons`, all at once) and measurements in
    level-0 coordinates; a mask with no outline (empty) gives no nucleus."""
    return [n for n in outline_items(decided) if n is not None]


def outline_items(decided: Decided) -> list[Nucleus | None]:
    """:func:`outline`, one entry per item: its nucleus, or ``None`` where the mask has no outline. Each item's
    nucleus depends on that item alone (whichever items share the call). The outline is the mask's
    (:func:`mask_polygons`) simplified within :data:`SIMPLIFY_TOLERANCE` level-0 pixels (:func:`simplify_rings`);
    the measurements are those of the simplified polygon, the one written (and painted into the zarr labels)."""
    import cv2

    items = decided.items
    res: list[Nucleus | None] = [None] * len(items)
    if not items:
        return res
    polys = simplify_rings(mask_polygons([it[0] for it in items]), SIMPLIFY_TOLERANCE / decided.scale)
    kept = [i for i, p in enumerate(polys) if p is not None]
    if not kept:
        return res
    lengths, areas, cxs, cys = ring_measures([polys[i] for i in kept])
    s, mpp = decided.scale, decided.mpp
    for i, perim, a, cx, cy in zip(kept, lengths, areas, cxs, cys):
        mask, gx0, gy0, score, stains = items[i]
        if a <= 0:  # (a degenerate outline: the mask's own centre)
            mo = cv2.moments(mask.view(np.uint8), binaryImage=True)
            cx, cy = mo["m10"] / mo["m00"] + 0.5, mo["m01"] / mo["m00"] + 0.5
        res[i] = Nucleus(  # measurements of the polygon as written (what QuPath recomputes), in level-0 pixels
            polygon=(polys[i] + np.array([gx0, gy0], np.float64)) * s,  # vertex at model pixel centre
            score=score,
            area_px=a * s * s,
            area_um2=a * mpp ** 2,
            perimeter_um=perim * mpp,
            centroid=((gx0 + cx) * s, (gy0 + cy) * s),
            bbox=(gx0 * s, gy0 * s, (gx0 + mask.shape[1]) * s, (gy0 + mask.shape[0]) * s),
            stains=stains,
        )
    return res


#: how far (level-0 pixels) a written outline may lie from the traced one (:func:`simplify_rings`)
SIMPLIFY_TOLERANCE = 0.25


def simplify_rings(rings: list[np.ndarray | None], tolerance: float) -> list[np.ndarray | None]:
    """Each (n, 2) ring simplified by GEOS's topology-preserving Douglas-Peucker (``shapely.simplify``, all in one
    vectorised call), as a closed line whose first vertex stays: its vertices are a subset of the ring's, from the
    same start, in the same order and orientation, and the Hausdorff distance between the two outlines is at most
    ``tolerance``. (Simplified as polygons, GEOS 3.12+ also drops a ring's start vertex where it can, a step that
    can move the outline up to twice the tolerance.) A ring is returned as it is (the same array) when its
    simplification encloses the same region (it lost no vertex, or only vertices on a straight run), or is not a
    valid polygon of positive area; ``None`` entries stay ``None``. Each result depends on its ring alone."""
    import shapely

    out = list(rings)
    idx = [i for i, r in enumerate(rings) if r is not None and len(r) >= 4]  # (a triangle has nothing to lose)
    if not idx or tolerance <= 0:
        return out
    src = [rings[i] for i in idx]
    lens = np.array([len(r) for r in src])
    closed = np.concatenate([np.concatenate([r, r[:1]]) for r in src])
    lines = shapely.linestrings(closed, indices=np.repeat(np.arange(len(src)), lens + 1))
    simp = shapely.simplify(lines, tolerance, preserve_topology=True)
    kept = shapely.get_num_coordinates(simp) - 1  # (the closing vertex repeats the first)
    cand = np.flatnonzero((kept >= 3) & (kept < lens))
    if not len(cand):
        return out
    coords, owner = shapely.get_coordinates(simp[cand], return_index=True)
    ends = np.cumsum(np.bincount(owner, minlength=len(cand)))
    new = [coords[e - kept[k] - 1:e - 1] for k, e in zip(cand.tolist(), ends.tolist())]  # (not the closing one)
    after, before = _polygon_array(new), _polygon_array([src[k] for k in cand])
    ok = shapely.is_valid(after) & (shapely.area(after) > 0)
    same = ok & (shapely.area(after) == shapely.area(before))  # (removing a vertex off the line changes the area,
    ok[same] = ~shapely.equals(after[same], before[same])     # unless others compensate: then compare regions)
    for j in np.flatnonzero(ok).tolist():
        out[idx[cand[j]]] = new[j]
    return out


def ring_measures(rings: list[np.ndarray]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Perimeters (the closing edge included), areas and centroids (shoelace; a zero-area ring: centroid 0) of
    closed (n_i, 2) rings, all in one vectorised pass."""
    sizes = np.array([len(r) for r in rings])
    pts = np.concatenate(rings)
    starts = np.cumsum(sizes) - sizes
    nxt = np.arange(1, len(pts) + 1)
    nxt[starts + sizes - 1] = starts  # each ring's last vertex joins its first
    x, y = pts[:, 0], pts[:, 1]
    lengths = np.add.reduceat(np.hypot(x[nxt] - x, y[nxt] - y), starts)
    cross = x * y[nxt] - x[nxt] * y
    a2 = np.add.reduceat(cross, starts)  # twice the signed area
    safe = np.where(a2 != 0, a2, 1.0)
    cx = np.where(a2 != 0, np.add.reduceat((x + x[nxt]) * cross, starts) / (3.0 * safe), 0.0)
    cy = np.where(a2 != 0, np.add.reduceat((y + y[nxt]) * cross, starts) / (3.0 * safe), 0.0)
    return lengths.tolist(), (np.abs(a2) / 2.0).tolist(), cx.tolist(), cy.tolist()


def _polygon_array(rings: list[np.ndarray]) -> np.ndarray:
    """Shapely polygons from (n_i, 2) rings (n_i >= 3), built in one vectorised call."""
    import shapely

    idx = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
    return shapely.polygons(shapely.linearrings(np.concatenate(rings), indices=idx))


def _crossing(boxes: list[tuple[int, int, int, int]], others: list[tuple[int, int, int, int]],
              earlier: bool = False) -> dict[int, list[int]]:
    """For each box ``(x0, y0, x1, y1)`` (exclusive ends) that some of the ``others`` share pixels with, the indices
    of those others, in increasing order (boxes no other crosses are left out: most are); ``earlier``: only others
    of a lower index (``others`` is ``boxes``). Vectorised: the others sorted by ``x0``, each box checks only those
    starting less than the widest other's width to its left, so the work grows with the boxes' neighbours, not with
    the product of the counts (a tile row of a wide slide holds thousands)."""
    out: dict[int, list[int]] = {}
    if not boxes or not others:
        return out
    a, b = np.asarray(boxes, np.int64), np.asarray(others, np.int64)
    order = np.argsort(b[:, 0], kind="stable")
    bx0 = b[order, 0]
    lo = np.searchsorted(bx0, a[:, 0] - int((b[:, 2] - b[:, 0]).max()), side="right")
    hi = np.searchsorted(bx0, a[:, 2], side="left")  # others starting left of each box's right end
    n = np.maximum(hi - lo, 0)
    i = np.repeat(np.arange(len(a)), n)
    j = order[np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()))]
    hit = ((np.maximum(a[i, 0], b[j, 0]) < np.minimum(a[i, 2], b[j, 2]))
           & (np.maximum(a[i, 1], b[j, 1]) < np.minimum(a[i, 3], b[j, 3])))
    if earlier:
        hit &= j < i
    i, j = i[hit], j[hit]
    if not len(i):
        return out
    k = np.lexsort((j, i))
    i, j = i[k], j[k]
    first = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])  # where each box's run of others starts
    for p, q in zip(i[first].tolist(), np.split(j, first[1:])):
        out[p] = q.tolist()
    return out


def _area(c: Candidate) -> int:
    """Pixels of ``c.mask``, counted once."""
    if c.area < 0:
        c.area = int(np.count_nonzero(c.mask))
    return c.area


def _resolve(cand: Candidate, others: list[Candidate]) -> np.ndarray | None:
    """``cand``'s mask minus what ``others`` already hold; ``None`` when it is one of them (shares > half of the
    smaller) or less than half of it remains."""
    mask = cand.mask
    x0, y0, x1, y1 = cand.box
    area = _area(cand)
    out = mask
    removed = 0  # pixels taken out of ``out`` so far (each rival's share counts only pixels still in it)
    for o in others:
        ox0, oy0, ox1, oy1 = o.box
        ix0, iy0, ix1, iy1 = max(x0, ox0), max(y0, oy0), min(x1, ox1), min(y1, oy1)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        a = out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        b = o.mask[iy0 - oy0:iy1 - oy0, ix0 - ox0:ix1 - ox0]
        shared = a & b
        n = int(np.count_nonzero(shared))
        if n == 0:
            continue
        if n > 0.5 * min(area, _area(o)):
            return None
        if out is mask:
            out = mask.copy()
            a = out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        a[shared] = False
        removed += n
    if area - removed < 0.5 * area:
        return None
    return out


def mask_polygon(mask: np.ndarray) -> np.ndarray | None:
    """Outline of the largest part of a boolean mask as a valid simple polygon: (n, 2) (x, y) at pixel centres
    (i.e. ``col + 0.5, row + 0.5``), counter-clockwise in image orientation; ``None`` for an empty mask."""
    return mask_polygons([mask])[0]


def mask_polygons(masks: list[np.ndarray]) -> list[np.ndarray | None]:
    """:func:`mask_polygon` of many masks: one OpenCV contour trace per mask, the validity of all outlines checked
    in one vectorised shapely call; only the rare invalid (self-touching) or degenerate ones take the slow path."""
    import cv2
    import shapely

    out: list[np.ndarray | None] = [None] * len(masks)
    fast: list[int] = []
    for i, mask in enumerate(masks):
        m = np.ascontiguousarray(mask, dtype=np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        c = contours[0] if len(contours) == 1 else max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
        out[i] = c[:, 0, :].astype(np.float64) + 0.5
        if len(out[i]) >= 3:
            fast.append(i)
    ok = np.zeros(len(masks), bool)
    if fast:
        polys = _polygon_array([out[i] for i in fast])
        ok[fast] = shapely.is_valid(polys) & (shapely.area(polys) > 0)
    bad = [i for i, c in enumerate(out) if c is not None and not ok[i]]
    if bad:
        for i, c in zip(bad, _repair_outlines([out[i] for i in bad])):
            out[i] = c
    return out


def _repair_outlines(rings: list[np.ndarray]) -> list[np.ndarray]:
    """Valid polygons for invalid outlines, all in one vectorised call: a self-touching outline (a one-pixel neck or
    spike traced there and back) becomes its largest valid part, by GEOS's "structure" repair (it keeps the area the
    outline encloses: closer to the mask than the "linework" repair, and faster); a line or single pixel,
    or an outline with no part left, becomes the outline of its pixels' squares, shrunk a little to stay inside."""
    import shapely

    out: list[np.ndarray | None] = [None] * len(rings)
    idx = [i for i, r in enumerate(rings) if len(r) >= 3]
    if idx:
        fixed = shapely.make_valid(_polygon_array([rings[i] for i in idx]), method="structure", keep_collapsed=False)
        parts, owner = shapely.get_parts(fixed, return_index=True)
        area = np.where(shapely.get_type_id(parts) == 3, shapely.area(parts), 0.0)  # 3: Polygon
        best: dict[int, int] = {}
        for k, (o, a) in enumerate(zip(owner.tolist(), area.tolist())):
            if a > 0 and (o not in best or a > area[best[o]]):  # the first of equal largest parts
                best[o] = k
        for o, k in best.items():
            out[idx[o]] = shapely.get_coordinates(shapely.get_exterior_ring(parts[k]))[:-1]
    return [c if c is not None else _pixel_hull(r) for c, r in zip(out, rings)]


def _pixel_hull(c: np.ndarray) -> np.ndarray:
    """The outline of the squares of a line's or single pixel's pixels, shrunk a little to stay inside them."""
    from shapely.geometry import MultiPoint

    hull = MultiPoint([tuple(pt) for pt in c]).buffer(0.45, cap_style="square", join_style="mitre")
    if hull.geom_type != "Polygon":
        hull = hull.convex_hull
    return np.asarray(hull.exterior.coords, np.float64)[:-1]


def raster_vertices(ring: np.ndarray) -> np.ndarray:
    """(n, 2) int32 pixel indices of polygon vertices given at pixel centres (``col + 0.5, row + 0.5``), as OpenCV's
    ``fillPoly`` takes them: the vertex rule of every rasterisation in the package (:func:`polygon_window` and the
    zarr writer's batched painting), so they agree pixel for pixel."""
    return np.round(np.asarray(ring, np.float64)[:, :2] - 0.5).astype(np.int32)


def polygon_window(rings: list[np.ndarray], shape: tuple[int, int]) -> tuple[int, int, np.ndarray] | None:
    """Rasterise polygons given in level-0 coordinates (vertices at pixel centres, the convention above) inside
    their bounding box clipped to ``shape`` (rows, cols): ``(x0, y0, mask bool)``, or ``None`` when outside.
    Several rings (the parts of a MultiPolygon) fill one mask. ``wsiseg eval`` and :func:`paint_polygon` use it;
    the zarr writer paints many polygons at once with the same vertices (:func:`raster_vertices`) and the same
    clipping, so all agree pixel for pixel (tested)."""
    import cv2

    pts = [raster_vertices(r) for r in rings]
    allp = np.concatenate(pts)
    H, W = int(shape[0]), int(shape[1])
    x0, y0 = max(int(allp[:, 0].min()), 0), max(int(allp[:, 1].min()), 0)
    x1, y1 = min(int(allp[:, 0].max()) + 1, W), min(int(allp[:, 1].max()) + 1, H)
    if x1 <= x0 or y1 <= y0:
        return None
    m = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(m, [p - np.array([x0, y0], np.int32) for p in pts], 1)
    return x0, y0, m.astype(bool)


def paint_polygon(canvas: np.ndarray, polygon: np.ndarray | list[np.ndarray], label: int) -> bool:
    """Rasterise a polygon (or a list of rings) into ``canvas`` as ``label``, only where the canvas is still 0;
    exact inverse of :func:`mask_polygon` for simple shapes. False when the polygon lies wholly outside ``canvas``."""
    rings = polygon if isinstance(polygon, list) else [polygon]
    win = polygon_window(rings, canvas.shape[:2])
    if win is None:
        return False
    x0, y0, m = win
    dst = canvas[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
    dst[m & (dst == 0)] = label
    return True
