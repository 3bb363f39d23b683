"""GeoJSON features encoded many at once are those encoded one by one, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

import wsiseg.export.geojson as G
from wsiseg.api import image_nuclei
from wsiseg.segmenters.watershed import WatershedSegmenter
from wsiseg.wsi.stitch import Nucleus


def _constructed() -> list[Nucleus]:
    """Outlines of every awkward kind: triangles, a single repeated point, two points, long and self-crossing
    rings, squares whose hull has collinear vertices; with and without stain measurements."""
    rng = np.random.default_rng(0)
    out = []
    for i, k in enumerate([3, 1, 2, 4, 300, 5, 2, 80, 3, 9] * 12):
        p = rng.random((k, 2)) * 50 + 0.5
        if k == 2 and i % 20 == 6:
            p = np.array([[1.5, 1.5], [1.5, 1.5]])
        if k == 9:
            p = np.array([[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [1, 2], [0, 2], [0, 1], [0, 0.5]], np.float64) + 0.5
        out.append(Nucleus(p, float(rng.random()), float(k) + 3.0, (float(k) + 3.0) * 0.0625, 4.0 * k, (1.0, 2.0),
                           (0.0, 0.0, 1.0, 1.0), None if i % 3 else (0.1, 0.2, 0.3)))
    return out


@pytest.mark.parametrize("pairs,run", [(G.HULL_PAIRS, G.HULL_RUN), (5000, G.HULL_RUN), (G.HULL_PAIRS, 3)])
def test_features_parts_equal_feature_parts_on_constructed_outlines(monkeypatch, pairs, run):
    """(5000 pairs: many short runs, the 300-vertex hull alone; runs of 3 hulls: most runs of one vertex count.)"""
    monkeypatch.setattr(G, "HULL_PAIRS", pairs)
    monkeypatch.setattr(G, "HULL_RUN", run)
    nuclei = _constructed()
    assert G.features_parts(nuclei) == [G.feature_parts(n) for n in nuclei]
    assert G.features_parts([]) == []


def test_features_parts_equal_feature_parts_on_real_nuclei(kumar_dir):
    """Real outlines (a Kumar image segmented whole by the watershed, then written): the same bytes; outlines of
    another type than float64 go one by one (their numbers print as their own type)."""
    import tifffile

    img = tifffile.imread(sorted(kumar_dir.glob("images/*.tif"))[0])[..., :3]
    nuclei = image_nuclei(img, WatershedSegmenter(), mpp=0.25)
    assert len(nuclei) > 100
    assert G.features_parts(nuclei) == [G.feature_parts(n) for n in nuclei]
    ints = [Nucleus(np.array([[1, 1], [4, 1], [4, 5]]), 0.5, 6.0, 0.4, 3.0, (3.0, 2.3), (1, 1, 5, 6))]
    assert G.features_parts(ints) == [G.feature_parts(ints[0])]


def _block(nuclei: list[Nucleus]):
    """``nuclei`` as a :class:`~wsiseg.wsi.stitch.NucleusBlock` with their encoded parts, as a tile worker sends it."""
    from wsiseg.wsi.stains import stain_rows
    from wsiseg.wsi.stitch import NucleusBlock

    parts = G.features_parts(nuclei)
    return NucleusBlock(np.concatenate([n.polygon for n in nuclei]), np.array([len(n.polygon) for n in nuclei]),
                        np.array([[n.area_px, n.area_um2, n.perimeter_um, *n.centroid, *n.bbox] for n in nuclei]),
                        np.array([n.score for n in nuclei]), stain_rows([n.stains for n in nuclei]),
                        b"".join(a + b for a, b in parts), np.array([len(x) for p in parts for x in p]))


@pytest.mark.parametrize("handover", [G.GEOJSON_HANDOVER, 7])
def test_blocks_held_for_the_writing_process_keep_their_order(tmp_path, monkeypatch, handover):
    """Blocks handed to the writing process together (:data:`GEOJSON_HANDOVER` nuclei a message), plain writes
    between them and blocks still held at the end: the file is the one written here, byte for byte."""
    monkeypatch.setattr(G, "GEOJSON_HANDOVER", handover)
    nuclei = _constructed()
    cuts = [0, 5, 6, 30, 31, 50, 90, 120]
    files = []
    for process in (False, True):
        out = tmp_path / f"{process}.geojson"
        with G.GeoJSONWriter(out, {"k": 1}, seed=3, process=process) as w:
            assert (w._proc is not None) == process
            for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
                w.write_block(_block(nuclei[a:b])) if k % 3 != 1 else w.write(nuclei[a:b])
            assert w.count == 120
        files.append(out.read_bytes())
    assert files[0] == files[1] and files[0].count(b'"Feature"') == 120
