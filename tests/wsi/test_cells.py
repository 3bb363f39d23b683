"""Cells (``wsiseg run --objects cells``): each nucleus grown into a QuPath cell object, streamed in the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import tifffile
from shapely.geometry import shape

from wsiseg.cli import main
from wsiseg.wsi.cells import CellExpander, expand_cells
from wsiseg.wsi.stitch import Nucleus, mask_polygon
from helpers import interrupting_sink


def _nucleus(mask: np.ndarray, x0: int = 0, y0: int = 0) -> Nucleus:
    """A nucleus traced from a boolean mask placed at level-0 ``(x0, y0)``, as the stitcher makes them."""
    ring = mask_polygon(mask) + np.array([x0, y0], np.float64)
    poly = shapely.Polygon(ring)
    ys, xs = np.nonzero(mask)
    return Nucleus(ring, 0.9, poly.area, poly.area * 0.25, poly.length * 0.5, (poly.centroid.x, poly.centroid.y),
                   (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1), (0.5, 0.1, 0.2))


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx ** 2 + yy ** 2 <= r * r


def test_cells_of_constructed_nuclei():
    """A lone nucleus' cell is the nucleus grown by the distance (its area within 6% of the buffer's: traced at pixel
    centres, the staircase cuts the curve's corners); two nuclei
    closer than twice the distance split the gap half-way; cells hold their nuclei and do not overlap."""
    d = 10.0
    lone = _nucleus(_disk(6), 100, 100)
    (cell,) = expand_cells([lone], d, 0.5, (300, 300))
    grown = shapely.Polygon(lone.polygon).buffer(d)
    assert cell.nucleus is lone
    assert abs(cell.outline.area_px - grown.area) / grown.area < 0.06
    assert shapely.Polygon(cell.outline.polygon).buffer(0.01).contains(shapely.Polygon(lone.polygon))
    assert cell.outline.area_um2 == pytest.approx(cell.outline.area_px * 0.25)
    assert cell.outline.stains == lone.stains and cell.outline.score == lone.score

    a = _nucleus(np.ones((10, 10), bool), 50, 50)  # columns 50-59
    b = _nucleus(np.ones((10, 10), bool), 72, 50)  # columns 72-81: a gap of 12 px, split at 65.5-66
    ca, cb = (shapely.Polygon(c.outline.polygon) for c in expand_cells([a, b], d, 0.5, (200, 200)))
    assert ca.is_valid and cb.is_valid and ca.intersection(cb).area == 0
    assert ca.bounds[2] == pytest.approx(65.5, abs=0.6) and cb.bounds[0] == pytest.approx(66.5, abs=0.6)
    assert ca.bounds[0] == pytest.approx(50.5 - d, abs=1.0)  # the free side: grown by the distance
    for c, n in ((ca, a), (cb, b)):
        assert c.contains(shapely.Polygon(n.polygon))


def test_streamed_cells_equal_cells_of_the_whole_set():
    """Fed in pieces with the row above which nothing more comes, as a run feeds it, the expander gives every cell
    exactly as for the whole set at once, in the nuclei's order, and forgets nuclei it no longer needs."""
    rng = np.random.default_rng(3)
    nuclei = []
    for _ in range(150):
        x, y, r = int(rng.integers(10, 590)), int(rng.integers(10, 990)), int(rng.integers(3, 9))
        nuclei.append(_nucleus(_disk(r), x - r, y - r))
    nuclei.sort(key=lambda n: n.bbox[1])
    whole = expand_cells(nuclei, 8.0, 0.25, (1000, 600))
    e = CellExpander(8.0, 0.25, (1000, 600))
    streamed, most = [], 0
    for i in range(0, len(nuclei), 7):
        e.add(nuclei[i:i + 7])
        nxt = nuclei[i + 7].bbox[1] if i + 7 < len(nuclei) else None
        streamed += e.finish() if nxt is None else e.settled(nxt)
        most = max(most, len(e._known))
    assert [c.nucleus for c in streamed] == nuclei
    for s, w in zip(streamed, whole):
        assert np.array_equal(s.outline.polygon, w.outline.polygon)
    assert most < len(nuclei) // 2  # a band, not the slide


@pytest.fixture(scope="module")
def crop(tmp_path_factory, kumar_dir) -> object:
    img = sorted((kumar_dir / "images").glob("*.tif"))[0]
    p = tmp_path_factory.mktemp("cells") / "crop.tif"
    tifffile.imwrite(p, tifffile.imread(img)[:600, :600, :3])
    return p


def test_run_writes_qupath_cells(tmp_path, crop):
    """``--objects cells`` on a real H&E image: every feature is a QuPath cell whose nucleusGeometry is the nucleus
    the nuclei run writes (same order, label and id), its cell valid and around it; measurements prefixed as QuPath
    prefixes a cell's compartments; the same bytes with tile workers."""
    nuc, cells = tmp_path / "n.geojson", tmp_path / "c.geojson"
    common = ["--model", "watershed", "--mpp", "0.25", "--tile-size", "128", "--quiet"]
    assert main(["run", str(crop), "--out", str(nuc), *common]) == 0
    assert main(["run", str(crop), "--out", str(cells), "--objects", "cells", "--cell-expansion", "4", *common]) == 0
    n_doc, c_doc = json.loads(nuc.read_text(encoding="utf-8")), json.loads(cells.read_text(encoding="utf-8"))
    assert c_doc["wsiseg"]["objects"] == "cells" and c_doc["wsiseg"]["cell_expansion_um"] == 4.0
    nf, cf = n_doc["features"], c_doc["features"]
    assert len(cf) == len(nf) > 50
    polys = []
    for n, c in zip(nf, cf):
        assert c["id"] == n["id"] and c["nucleusGeometry"] == n["geometry"]
        assert c["properties"]["objectType"] == "cell" and "classification" not in c["properties"]
        m, nm = c["properties"]["measurements"], n["properties"]["measurements"]
        assert m["Label"] == nm["Label"] and m["Score"] == nm["Score"]
        assert m["Nucleus: Area µm^2"] == nm["Area µm^2"] and m["Nucleus: Hematoxylin: Mean"] == nm["Hematoxylin: Mean"]
        assert m["Cell: Area µm^2"] >= m["Nucleus: Area µm^2"] * 0.95
        assert 0 < m["Nucleus/Cell area ratio"] <= 1
        cell, nucleus = shape(c["geometry"]), shape(c["nucleusGeometry"])
        assert cell.is_valid and cell.buffer(1.7).contains(nucleus)  # (both traced at pixel centres)
        assert m["Cell: Area µm^2"] == pytest.approx(cell.area * 0.25 ** 2, abs=1e-3)
        assert cell.bounds[0] >= nucleus.bounds[0] - 4 / 0.25 - 1.5  # grown by 4 um at most
        polys.append(cell)
    tree = shapely.STRtree(polys)
    a, b = tree.query(polys, predicate="intersects")
    overlap = shapely.area(shapely.intersection(np.array(polys)[a[a < b]], np.array(polys)[b[a < b]]))
    assert overlap.max(initial=0) < 4  # cells meet, overlapping only where their nuclei share pixels
    again = tmp_path / "w.geojson"
    assert main(["run", str(crop), "--out", str(again), "--objects", "cells", "--cell-expansion", "4",
                 "--tile-workers", "2", *common]) == 0
    assert again.read_bytes() == cells.read_bytes()


def test_resumed_cells_equal_uninterrupted(tmp_path, crop):
    """A run stopped midway (its journal kept) and resumed writes the same cells, byte for byte: the journal
    replays the nuclei, and the cells are made from them again."""
    from wsiseg.api import segment_slide

    kw = dict(model="watershed", mpp=0.25, tile_size=128, objects="cells", uuid_seed=5)
    ref = tmp_path / "ref.geojson"
    segment_slide(crop, geojson=ref, **kw)
    out = tmp_path / "cut.geojson"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(crop, geojson=out, sink=interrupting_sink(nuclei=60), **kw)
    assert not out.exists() and (tmp_path / ".cut.geojson.wsiseg-resume").is_dir()  # (the journal beside it)
    segment_slide(crop, geojson=out, resume=True, **kw)
    assert out.read_bytes() == ref.read_bytes()


def test_cells_need_a_geojson_and_a_positive_distance(tmp_path, crop, capsys):
    assert main(["run", str(crop), "--zarr", str(tmp_path / "z.zarr"), "--objects", "cells", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--objects cells" in err[0]
    assert main(["run", str(crop), "--out", str(tmp_path / "o.geojson"), "--objects", "cells",
                 "--cell-expansion", "-1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cell-expansion" in err[0] and "positive" in err[0]
    assert not (tmp_path / "o.geojson").exists() and not (tmp_path / "z.zarr").exists()
