"""Regions of interest (``wsiseg run --roi``): QuPath annotations read as one geometry (wsiseg.io.regions), the
tissue mask narrowed to them (TissueMask.within), and real runs on the bundled sample that keep exactly the nuclei
centred in them."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import shapely

from wsiseg.api import sample_slide, segment_slide
from wsiseg.cli import main
from wsiseg.core.errors import InputError
from wsiseg.io.regions import read_features, read_regions
from wsiseg.wsi.tissue import TissueMask

#: a QuPath annotation with a hole (level-0 pixels of the sample: dermis, epidermis and the follicle's edge), as
#: QuPath's "Export objects as GeoJSON" writes it, with a point annotation and a detection that are no regions
QUPATH = {"type": "FeatureCollection", "features": [
    {"type": "Feature", "id": "5b0c6c1e-1", "geometry": {"type": "Polygon", "coordinates": [
        [[900, 1300], [1700, 1300], [1700, 2300], [900, 2300], [900, 1300]],
        [[1100, 1600], [1400, 1600], [1400, 1900], [1100, 1900], [1100, 1600]]]},
     "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
    {"type": "Feature", "id": "5b0c6c1e-2", "geometry": {"type": "Point", "coordinates": [100, 100]},
     "properties": {"objectType": "annotation"}},
    {"type": "Feature", "id": "5b0c6c1e-3", "geometry": {"type": "Polygon", "coordinates": [
        [[0, 0], [2000, 0], [2000, 2000], [0, 0]]]}, "properties": {"objectType": "detection"}}]}


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_qupath_annotations_are_read_as_their_union_with_holes(tmp_path):
    """Every form QuPath and GeoJSON give regions in: a FeatureCollection (its point annotation and detection
    passed over), a bare list of features (QuPath's older export), a Feature, a geometry, gzip; MultiPolygons; a
    self-touching hand-drawn outline repaired."""
    roi = read_regions(_write(tmp_path / "a.geojson", QUPATH))
    assert roi.geom_type == "Polygon" and roi.area == 800 * 1000 - 300 * 300
    assert not roi.contains(shapely.Point(1250, 1750)) and roi.contains(shapely.Point(1000, 1400))
    feats = QUPATH["features"]
    assert read_regions(_write(tmp_path / "b.json", feats)).equals(roi)
    assert read_regions(_write(tmp_path / "c.geojson", feats[0])).equals(roi)
    assert read_regions(_write(tmp_path / "d.geojson", feats[0]["geometry"])).equals(roi)
    with gzip.open(tmp_path / "e.geojson.gz", "wt") as f:
        json.dump(QUPATH, f)
    assert read_regions(tmp_path / "e.geojson.gz").equals(roi)
    multi = {"type": "MultiPolygon", "coordinates": [[[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]],
                                                     [[[5, 5], [20, 5], [20, 20], [5, 20], [5, 5]]]]}
    assert read_regions(_write(tmp_path / "f.geojson", multi)).area == 100 + 225 - 25  # (overlaps joined)
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    fixed = read_regions(_write(tmp_path / "g.geojson", bowtie))
    assert fixed.is_valid and fixed.area == pytest.approx(50)
    assert read_features(tmp_path / "b.json") == feats


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("not json", "not a GeoJSON file"),
    ({"type": "FeatureCollection", "features": [QUPATH["features"][1], QUPATH["features"][2]]}, "outlines no region"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [10, 0]]]}, "region 0: not a valid Polygon"),
    ({"hello": 1}, "not GeoJSON"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [3e9, 0], [3e9, 3e9], [0, 3e9], [0, 0]]]}, "lie past"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [float("nan"), 0], [9, 9], [0, 9], [0, 0]]]}, "not numbers"),
])
def test_a_file_that_outlines_no_region_is_an_input_error_naming_it(tmp_path, content, message):
    path = tmp_path / "r.geojson"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputError, match=message) as e:
        read_regions(path)
    assert str(path) in str(e.value)
    with pytest.raises(InputError, match="is a directory"):
        read_regions(tmp_path)


def test_the_mask_narrowed_to_regions_decides_by_the_regions_themselves():
    """Pixels whose centre lies in the regions (holes out, an island inside a hole in) are counted exactly as a
    brute-force test of every centre counts them; the coarse mask holds every pixel the regions touch; points and
    boxes are judged by the polygons, finer than the mask's pixels."""
    ring = shapely.Polygon([(0, 0), (400, 0), (400, 400), (0, 400)], [[(100, 100), (300, 100), (300, 300), (100, 300)]])
    roi = shapely.union_all([ring, shapely.box(150, 150, 250, 250), shapely.Point(500, 130).buffer(47, 64)])
    tissue = np.ones((30, 30), bool)
    tissue[:, 27:] = False  # glass on the right
    m = TissueMask(tissue, 20.0).within(roi)
    yy, xx = np.mgrid[0:30, 0:30]
    centres = shapely.intersects_xy(roi, (xx + 0.5) * 20, (yy + 0.5) * 20)
    assert m.fraction == (centres & tissue).mean()
    touched = shapely.intersects(roi, shapely.box(xx * 20, yy * 20, xx * 20 + 20, yy * 20 + 20))
    assert not (touched & tissue & ~m.mask).any() and not (m.mask & ~tissue).any()
    assert m.contains(np.array([50, 200, 120, 500, 401, 560]), np.array([50, 200, 120, 130, 50, 130])).tolist() == \
        [True, True, False, True, False, False]  # ring, island, hole, disc, a pixel touched but outside, glass
    assert m.all_in(0, 0, 90, 90) and not m.all_in(0, 0, 120, 120) and not m.any_in(420, 420, 460, 460)
    assert m.any_in(390, 390, 420, 420) and not m.any_in(105, 105, 145, 145)  # a corner of the ring; inside the hole
    whole = TissueMask(tissue, 20.0)
    assert whole.roi is None and whole.fraction == tissue.mean()


def _centres(feats):
    m = [f["properties"]["measurements"] for f in feats]
    return np.array([[v["Centroid X px"], v["Centroid Y px"]] for v in m]).reshape(-1, 2)


def test_a_run_with_regions_keeps_exactly_the_nuclei_centred_in_them(tmp_path):
    """The bundled model on the sample, with a QuPath annotation with a hole: every nucleus is centred in it, and
    they are the whole slide's run's nuclei centred in it, outline for outline (the zoom and the faint cut come from
    the slide's tissue either way); only tiles that meet the region are segmented."""
    roi_path = _write(tmp_path / "roi.geojson", QUPATH)
    roi = read_regions(roi_path)
    whole, part = [], []
    full = segment_slide(sample_slide(), sink=whole.extend)
    run = segment_slide(sample_slide(), roi=roi_path, sink=part.extend)
    assert run.tiles_segmented < full.tiles_segmented / 2 and run.nuclei > 400
    inside = shapely.intersects_xy(roi, *np.array([n.centroid for n in whole]).T)
    assert shapely.intersects_xy(roi, *np.array([n.centroid for n in part]).T).all()
    key = lambda n: n.polygon.round(3).tobytes()  # noqa: E731
    assert sorted(map(key, part)) == sorted(key(n) for n, i in zip(whole, inside) if i)
    assert run.tissue_mm2 < full.tissue_mm2 * 0.5


def test_regions_on_the_command_line_outputs_and_errors(tmp_path, capsys):
    """``wsiseg run --roi``: the same GeoJSON bytes for 0 and 2 tile workers, the regions in the header and outlined
    in the preview (yellow), nuclei only inside; regions off the slide, a file of no regions and regions for two
    inputs are one-line errors that leave an existing output alone; regions on glass give empty outputs."""
    import cv2

    roi_path = _write(tmp_path / "roi.geojson", QUPATH)
    a, b, png = tmp_path / "a.geojson", tmp_path / "b.geojson", tmp_path / "p.png"
    base = ["run", str(sample_slide()), "--model", "watershed", "--quiet", "--roi", roi_path]
    assert main(base + ["--out", str(a), "--preview", str(png)]) == 0
    assert main(base + ["--out", str(b), "--tile-workers", "2"]) == 0
    assert a.read_bytes() == b.read_bytes()
    doc = json.loads(a.read_text())
    assert doc["wsiseg"]["roi"] == {"file": roi_path, "polygons": 1, "area_px": 800 * 1000 - 300 * 300}
    assert shapely.intersects_xy(read_regions(roi_path), *_centres(doc["features"]).T).all()
    img = cv2.imread(str(png))[..., ::-1]
    assert ((img[..., 0] == 255) & (img[..., 1] == 210) & (img[..., 2] == 0)).sum() > 1000
    before = a.read_bytes()
    far = _write(tmp_path / "far.geojson", {"type": "Polygon", "coordinates": [
        [[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]]})
    points = _write(tmp_path / "pts.geojson", QUPATH["features"][1])
    for roi, what in ((far, "lie outside sample.svs"), (points, "outlines no region")):
        capsys.readouterr()
        assert main(["run", str(sample_slide()), "--model", "watershed", "--quiet", "--roi", roi, "--out", str(a),
                     "--overwrite"]) == 3
        err = capsys.readouterr().err
        assert err.startswith(f"wsiseg: error: --roi {roi}") and what in err and err.count("\n") == 1
        assert a.read_bytes() == before
    assert main(["run", str(sample_slide()), str(sample_slide()), "--roi", roi_path, "--out-dir",
                 str(tmp_path / "o")]) == 2
    glass = _write(tmp_path / "glass.geojson", {"type": "Polygon", "coordinates": [
        [[2100, 50], [2200, 50], [2200, 150], [2100, 150], [2100, 50]]]})
    capsys.readouterr()
    assert main(["run", str(sample_slide()), "--model", "watershed", "--quiet", "--roi", glass, "--out",
                 str(tmp_path / "g.geojson")]) == 0
    assert "no tissue found in the regions of interest" in capsys.readouterr().err
    assert json.loads((tmp_path / "g.geojson").read_text())["features"] == []


def test_a_folder_of_regions_gives_each_slide_its_own(tmp_path, capsys):
    """``--roi DIR`` with several inputs: each slide takes the file named after it (``a.geojson`` for ``a.svs``,
    ``b.svs.geojson`` for ``b.svs``); its nuclei are the ones its own file's regions hold. A slide with no file there
    is a one-line error naming the names looked for; a single file for several inputs is refused."""
    import shutil

    from wsiseg.io.regions import regions_file

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.svs", "b.svs"):
        shutil.copy(sample_slide(), slides / name)
    rois = tmp_path / "rois"
    rois.mkdir()
    left = {"type": "Polygon", "coordinates": [[[900, 1300], [1300, 1300], [1300, 2300], [900, 2300], [900, 1300]]]}
    right = {"type": "Polygon", "coordinates": [[[1300, 1300], [1700, 1300], [1700, 2300], [1300, 2300], [1300, 1300]]]}
    _write(rois / "a.geojson", left)
    _write(rois / "b.svs.geojson", {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": right, "properties": {"objectType": "annotation"}}]})
    assert regions_file(rois, slides / "a.svs") == rois / "a.geojson"
    assert regions_file(rois, slides / "b.svs") == rois / "b.svs.geojson"
    assert regions_file(rois / "a.geojson", slides / "b.svs") == rois / "a.geojson"
    out = tmp_path / "out"
    assert main(["run", str(slides), "--model", "watershed", "--quiet", "--roi", str(rois), "--out-dir", str(out)]) == 0
    for name, region in (("a", left), ("b", right)):
        doc = json.loads((out / f"{name}.geojson").read_text())
        assert doc["wsiseg"]["roi"]["file"].endswith(("a.geojson", "b.svs.geojson"))
        centres = _centres(doc["features"])
        assert len(centres) > 100 and shapely.intersects_xy(shapely.geometry.shape(region), *centres.T).all()
    (rois / "b.svs.geojson").unlink()
    capsys.readouterr()
    code = main(["run", str(slides / "b.svs"), "--model", "watershed", "--quiet", "--roi", str(rois), "--out",
                 str(tmp_path / "b.geojson")])
    err = capsys.readouterr().err
    assert code == 3 and "no regions file for b.svs (looked for b.geojson" in err and err.count("\n") == 1
    assert main(["run", str(slides), "--roi", str(rois / "a.geojson"), "--out-dir", str(out), "--overwrite"]) == 2


def test_an_interrupted_run_with_regions_resumes_only_with_the_same_regions(tmp_path, kumar_dir):
    """A run with regions stopped mid-way (Ctrl-C: its journal kept) and resumed with the same regions writes what
    an uninterrupted one does; with other regions the journal is not resumed into them."""
    import tifffile

    from helpers import StopAfter
    from wsiseg.core.errors import ConfigError
    from wsiseg.segmenters.registry import load_model
    from wsiseg.wsi.resume import journal_dir

    crop = tmp_path / "crop.tif"
    tifffile.imwrite(crop, tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:600, :600, :3])
    roi = _write(tmp_path / "roi.geojson", {"type": "Polygon", "coordinates": [
        [[50, 40], [560, 90], [480, 570], [60, 420], [50, 40]]]})
    other = _write(tmp_path / "other.geojson", {"type": "Polygon", "coordinates": [
        [[0, 0], [300, 0], [300, 300], [0, 300], [0, 0]]]})
    kw = dict(mpp=0.25, tile_size=128, batch_size=3, roi=roi)
    ref = segment_slide(crop, geojson=tmp_path / "ref.geojson", model="watershed", **kw)
    out = tmp_path / "n.geojson"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(crop, geojson=out, model=StopAfter(load_model("watershed"), 30), **kw)
    assert len(list(journal_dir(out).glob("ckpt-*.npz"))) >= 2 and not out.exists()
    with pytest.raises(ConfigError):
        segment_slide(crop, geojson=out, model="watershed", resume=True, **{**kw, "roi": other})
    s = segment_slide(crop, geojson=out, model="watershed", resume=True, **kw)
    assert out.read_bytes() == (tmp_path / "ref.geojson").read_bytes() and s.nuclei == ref.nuclei > 50
