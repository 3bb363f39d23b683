"""End to end: `wsiseg run` on real slides and images, outputs read back as QuPath/napari users would."""

from __future__ import annotations

import gzip
import json
import uuid

import cv2
import geojson
import numpy as np
import pytest
import tifffile
from shapely.geometry import shape

from wsiseg.api import sample_slide
from wsiseg.cli import main
from wsiseg.io.regions import read_features
from wsiseg.export.zarr_labels import read_zarr_labels
from wsiseg.wsi.stitch import paint_polygon


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    gj, z, png = d / "nuclei.geojson", d / "nuclei.zarr", d / "preview.png"
    code = main(["run", str(sample_slide()), "--out", str(gj), "--zarr", str(z), "--preview", str(png),
                 "--model", "watershed", "--quiet"])
    assert code == 0
    return gj, z, png


def test_sample_geojson_is_valid_qupath(sample_run):
    gj, _, _ = sample_run
    with open(gj, encoding="utf-8") as f:
        fc = geojson.load(f)
    assert fc["type"] == "FeatureCollection" and fc.is_valid
    feats = fc["features"]
    assert len(feats) > 1000
    ids = [f["id"] for f in feats]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 for i in ids[:50])
    for k, f in enumerate(feats, start=1):
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        m = props["measurements"]
        assert m["Label"] == k  # the zarr label id, as a measurement (QuPath keeps measurements, drops unknown keys)
        assert m["Area µm^2"] > 0 and m["Perimeter µm"] > 0 and 0 <= m["Score"] <= 1
        g = shape(f["geometry"])
        assert g.is_valid and g.area > 0
        x0, y0, x1, y1 = g.bounds
        assert 0 <= x0 and 0 <= y0 and x1 <= 2220 and y1 <= 2967  # level-0 pixels of the 20x slide
        if k <= 300:  # measurements are the polygon's own (a 20x slide, its um/px from the file)
            um = 0.499
            assert m["Area µm^2"] == pytest.approx(g.area * um ** 2, rel=0.01, abs=0.01)
            assert m["Perimeter µm"] == pytest.approx(g.length * um, rel=0.01, abs=0.01)
            assert (m["Centroid X px"], m["Centroid Y px"]) == pytest.approx((g.centroid.x, g.centroid.y), abs=0.01)
            assert m["Solidity"] == pytest.approx(g.area / g.convex_hull.area, abs=2e-4)
            assert m["Circularity"] == pytest.approx(4 * np.pi * g.area / g.length ** 2, abs=2e-4)
            hull = np.asarray(g.convex_hull.exterior.coords)
            dmax = np.sqrt(((hull[:, None] - hull[None]) ** 2).sum(-1)).max()
            assert m["Max diameter µm"] == pytest.approx(dmax * um, rel=0.01, abs=0.01)
            assert 0 < m["Min diameter µm"] <= m["Max diameter µm"]
            assert m["Min diameter µm"] == pytest.approx(min(_width(hull, a) for a in np.linspace(0, np.pi, 721))
                                                         * um, rel=0.02, abs=0.02)


def _width(pts: np.ndarray, angle: float) -> float:
    """The width of ``pts`` across direction ``angle``."""
    proj = pts @ np.array([np.cos(angle), np.sin(angle)])
    return float(proj.max() - proj.min())


def test_geojson_follows_qupaths_reader_rules(sample_run):
    """What QuPath's GeoJSON reader accepts and keeps: a Feature with a Polygon; properties objectType in its set,
    classification {name: str, color: [r, g, b] ints 0..255}, measurements a flat map of finite numbers whose names
    use QuPath's units (µm, never "um") and are unique."""
    import math

    gj, _, _ = sample_run
    feats = json.loads(gj.read_text(encoding="utf-8"))["features"]
    for f in feats[:500]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon" and isinstance(f["id"], str)
        p = f["properties"]
        assert set(p) == {"objectType", "classification", "measurements"}
        assert p["objectType"] in ("annotation", "detection", "cell", "tile")
        c = p["classification"]
        assert isinstance(c["name"], str) and len(c["color"]) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
        for name, value in p["measurements"].items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            assert "um" not in name.replace("µm", "")  # QuPath's unit spelling
        assert len(p["measurements"]) == len(set(p["measurements"]))
        # the stain measurements, as QuPath's "Add intensity features" names a detection's (its region prefix aside)
        assert {"Hematoxylin: Mean", "Hematoxylin: Std.Dev.", "Eosin: Mean"} <= set(p["measurements"])


def test_sample_stain_measurements(sample_run):
    """Every nucleus has its stain measurements, finite, the deviation non-negative; nuclei darker in haematoxylin
    have larger "Hematoxylin: Mean": it ranks them as the mean darkness of the red channel (haematoxylin absorbs red
    most) under the written polygon, read from the slide's level 0, does."""
    from scipy.stats import spearmanr

    from wsiseg.io.slide import open_slide
    from wsiseg.wsi.stitch import polygon_window

    gj, _, _ = sample_run
    feats = read_features(gj)
    with open_slide(str(sample_slide())) as s:
        img = s.read_region((0, 0), 0, s.dimensions)
    h, dark = [], []
    for f in feats:
        m = f["properties"]["measurements"]
        vals = [m["Hematoxylin: Mean"], m["Hematoxylin: Std.Dev."], m["Eosin: Mean"]]
        assert all(np.isfinite(vals)) and vals[1] >= 0 and vals == [round(v, 4) for v in vals]
        x0, y0, mask = polygon_window([np.asarray(f["geometry"]["coordinates"][0][:-1])], img.shape[:2])
        h.append(vals[0])
        dark.append(255 - img[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1], 0][mask].mean())
    assert len(h) > 1000 and np.mean(h) > 0
    assert spearmanr(h, dark).correlation > 0.8


def test_sample_zarr_is_ome_zarr_labels(sample_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    gj, z, _ = sample_run
    nodes = list(Reader(parse_url(str(z)))())
    label_nodes = [n for n in nodes if "image-label" in json.dumps(n.zarr.root_attrs)]
    assert label_nodes, "no label image found by ome-zarr's Reader"
    levels = [np.asarray(d) for d in label_nodes[0].data]
    assert levels[0].shape == (2967, 2220) and levels[0].dtype == np.uint32
    # level 0 equals the GeoJSON polygons rasterised, in feature order
    canvas = np.zeros((2967, 2220), np.int32)
    feats = read_features(gj)
    for k, f in enumerate(feats, start=1):
        paint_polygon(canvas, np.asarray(f["geometry"]["coordinates"][0][:-1]), k)
    assert np.array_equal(canvas, levels[0].astype(np.int32))
    assert levels[0].max() == len(feats)
    # nearest downsampling: each level is the previous one taken every 2nd pixel
    for a, b in zip(levels, levels[1:]):
        assert np.array_equal(a[::2, ::2], b)
        assert set(np.unique(b)) <= set(np.unique(a))
    meta = z / "labels" / "nuclei" / "zarr.json"
    attrs = json.loads(meta.read_text())["attributes"]["ome"]
    assert attrs["version"] == "0.5" and "image-label" in attrs and attrs["multiscales"][0]["type"] == "nearest"
    # no colour list: napari-ome-zarr would map only the listed labels and draw every other one transparent
    assert "colors" not in attrs["image-label"] and label_nodes[0].metadata["color"] == {}
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx(
        [0.499, 0.499])
    assert np.array_equal(read_zarr_labels(z, 0), levels[0])


def test_sample_preview(sample_run):
    _, _, png = sample_run
    img = cv2.imread(str(png))
    assert img is not None and max(img.shape[:2]) == 2048
    assert (img[..., 1] > 150).sum() > 1000  # green outlines drawn


def _write_pyramid(path, img, mpp):
    with tifffile.TiffWriter(path) as tw:
        kw = dict(tile=(128, 128), photometric="rgb", compression="zlib",
                  resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        tw.write(img, **kw)
        tw.write(img[::2, ::2], subfiletype=1, **kw)


def test_level0_coordinates_on_a_20x_slide(tmp_path, kumar_dir):
    """A Kumar 40x image scanned 'at 20x': nuclei found on it sit where the 40x truth has them (scaled by 1/2)."""
    from skimage.io import imread

    name = sorted((kumar_dir / "images").glob("*.tif"))[0]
    img40 = tifffile.imread(name)[..., :3]
    truth = imread(kumar_dir / "labels" / (name.stem + ".png"))
    img20 = cv2.resize(img40, (500, 500), interpolation=cv2.INTER_AREA)
    p = tmp_path / "s20.tif"
    _write_pyramid(p, img20, 0.5)
    out = tmp_path / "n.geojson.gz"
    assert main(["run", str(p), "--out", str(out), "--model", "watershed", "--quiet"]) == 0
    with gzip.open(out, "rt") as f:
        feats = json.load(f)["features"]
    assert len(feats) > 200
    cents = np.array([[f["properties"]["measurements"]["Centroid X px"],
                       f["properties"]["measurements"]["Centroid Y px"]] for f in feats])
    assert cents.max() <= 500
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    # against the truth: detections lie on true nuclei (the classical segmenter over-splits some, so: median)
    ids = np.unique(truth[truth > 0])
    tc = np.array(ndi.center_of_mass(np.ones_like(truth), truth, ids))[:, ::-1] + 0.5  # (x, y) at 40x
    d, _ = cKDTree(tc / 2.0).query(cents)
    assert np.median(d) < 3.0  # 1.5 um
    # against the same image segmented at its own 40x: same nuclei, coordinates halved, no offset
    img_path = tmp_path / "s40.png"
    cv2.imwrite(str(img_path), img40[..., ::-1])
    out40 = tmp_path / "n40.geojson"
    assert main(["run", str(img_path), "--out", str(out40), "--mpp", "0.25", "--model", "watershed", "--quiet"]) == 0
    c40 = np.array([[f["properties"]["measurements"]["Centroid X px"], f["properties"]["measurements"]["Centroid Y px"]]
                    for f in read_features(out40)]) / 2.0
    d, j = cKDTree(c40).query(cents)
    close = d < 2.0
    assert close.mean() > 0.6
    off = (cents[close] - c40[j[close]]).mean(axis=0)
    assert np.abs(off).max() < 0.3, off  # no half-pixel shift between scales


def test_geojson_gz_and_eval_end_to_end(tmp_path, kumar_dir):
    import shutil

    name = sorted((kumar_dir / "images").glob("*.tif"))[1]
    img = tmp_path / (name.stem + ".tif")
    shutil.copy(name, img)
    gt = kumar_dir / "labels" / (name.stem + ".png")
    out = tmp_path / (name.stem + ".geojson.gz")
    assert main(["run", str(img), "--out", str(out), "--mpp", "0.25", "--model", "watershed", "--quiet"]) == 0
    res = tmp_path / "res.json"
    assert main(["eval", str(out), str(gt), "--json", str(res)]) == 0
    data = json.loads(res.read_text())
    text = json.dumps(data)
    assert "aji" in text
    aji = _find(data, "aji")
    assert 0.3 < aji < 1.0


def _find(d, key):
    if isinstance(d, dict):
        if key in d and isinstance(d[key], (int, float)):
            return d[key]
        if key in d and isinstance(d[key], dict) and "mean" in d[key]:
            return d[key]["mean"]
        for v in d.values():
            r = _find(v, key)
            if r is not None:
                return r
    if isinstance(d, list):
        for v in d:
            r = _find(v, key)
            if r is not None:
                return r
    return None


def test_existing_output_is_kept(tmp_path, capsys):
    out = tmp_path / "n.geojson"
    out.write_text("precious")
    code = main(["run", str(sample_slide()), "--out", str(out), "--model", "watershed", "--quiet"])
    assert code == 5
    assert out.read_text() == "precious"
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err


def test_info_json(capsys):
    assert main(["info", str(sample_slide()), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimensions"] == [2220, 2967] and info["mpp"] == pytest.approx(0.499)
    assert info["backend"] == "openslide" and "thumbnail" in info["associated_images"]


def test_no_tissue_gives_empty_valid_output(tmp_path, capsys):
    blank = np.full((600, 600, 3), 250, np.uint8)
    p = tmp_path / "glass.png"
    cv2.imwrite(str(p), blank)
    out = tmp_path / "g.geojson"
    assert main(["run", str(p), "--out", str(out), "--mpp", "0.25", "--model", "watershed", "--quiet"]) == 0
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"] == []
    assert "no tissue" in capsys.readouterr().err


def test_default_model(kumar_dir):
    """`--model default` is the bundled PDAM weights when the package has them (else the classical segmenter)."""
    from wsiseg.api import bundled_weights, load_model

    m = load_model("default", "cpu")
    w = bundled_weights()
    if w is None:
        assert m.name == "watershed"
        return
    assert w.stat().st_size <= 25 * 2**20
    from wsiseg.models.checkpoint import load_checkpoint

    recipe = load_checkpoint(w).meta["recipe"]  # the commands that trained it travel with the weights
    assert recipe and all(c.startswith("wsiseg adapt ") for c in recipe)
    assert type(m).__name__ == "PDAMSegmenter" and m.mpp == pytest.approx(0.25)
    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[2])[:256, :256, :3]
    out = m.predict(img[None])[0]
    assert out.count > 10 and out.labels.max() == out.count


@pytest.mark.slow
def test_prefetch_and_tile_workers_give_the_same_outputs(tmp_path, kumar_dir):
    """Predicting a batch ahead in a thread (on by default on a GPU) and preparing tiles (candidates, outlines,
    GeoJSON encoding) in worker processes (on by default on a GPU host; 1, 2 and 4 of them; with the thread too, it
    puts its tiles into the workers' slab itself) change nothing in the outputs: the same GeoJSON, byte for byte,
    and the same OME-Zarr store (every label and image level, painted and written in a process of its own with
    workers), with the bundled PDAM model on a real H&E image."""
    import zarr

    from wsiseg.api import bundled_weights, segment_slide

    if bundled_weights() is None:
        pytest.skip("no bundled weights in this installation")
    img = sorted((kumar_dir / "images").glob("*.tif"))[2]
    outs = {}
    for prefetch, workers in ((False, 0), (True, 0), (True, 2), (False, 1), (True, 4)):
        gj, z = tmp_path / f"{prefetch}{workers}.geojson", tmp_path / f"{prefetch}{workers}.zarr"
        s = segment_slide(img, geojson=gj, zarr=z, model="default", device="cpu", mpp=0.25, batch_size=4,
                          prefetch=prefetch, uuid_seed=7, tile_workers=workers)
        assert s.nuclei > 100 and s.tiles_segmented > 8  # several batches, so the thread really runs ahead
        g, arrays = zarr.open_group(str(z), mode="r"), {}
        for grp in (g, g["labels/nuclei"]):
            arrays.update({f"{grp.path}/{k}": np.asarray(grp[k][...]) for k in grp.array_keys()})
        outs[prefetch, workers] = (gj.read_bytes(), arrays)
    ref = outs[False, 0]
    assert len(ref[1]) >= 4 and not np.all(ref[1]["/1"] == 255)  # (label and image levels; the image not empty)
    for k, (gj_bytes, arrays) in outs.items():
        assert gj_bytes == ref[0], k
        assert arrays.keys() == ref[1].keys(), k
        assert all(np.array_equal(arrays[a], ref[1][a]) for a in arrays), k


@pytest.mark.slow
def test_tile_workers_never_import_the_callers_script_and_survive_a_dead_worker(tmp_path, kumar_dir):
    """Tile workers are fresh ``python -m wsiseg.parallel.tiles`` interpreters: a script that runs a slide at its top
    level (no ``if __name__ == "__main__":``) runs once and writes what a run without workers writes. A worker killed
    mid-run makes the pool warn and prepare the rest (its lost jobs included) in the main process, the tiles the
    predicting thread had put into the workers' slab too: same outputs."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    from wsiseg.api import bundled_weights, segment_slide
    from wsiseg.parallel.tiles import TilePool

    if bundled_weights() is None:
        pytest.skip("no bundled weights in this installation")
    img = sorted((kumar_dir / "images").glob("*.tif"))[2]
    ref = tmp_path / "ref.geojson"
    segment_slide(img, geojson=ref, model="default", device="cpu", mpp=0.25, batch_size=4, uuid_seed=7)
    script = tmp_path / "unguarded.py"
    out = tmp_path / "out.geojson"
    script.write_text("from wsiseg.api import segment_slide\n"
                      f"segment_slide({str(img)!r}, geojson={str(out)!r}, model='default', device='cpu', mpp=0.25, "
                      "batch_size=4, uuid_seed=7, tile_workers=2)\nprint('finished')\n")
    # the script's model runs on as many threads as the reference's (conftest), so that float sums, and with them
    # the written scores, are the same whatever thread settings the test runner has (a dask LocalCluster started
    # earlier in the session leaves OMP_, MKL_ and OPENBLAS_NUM_THREADS=1 in os.environ)
    n = str(torch.get_num_threads())
    env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", str(script)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("finished") == 1
    assert out.read_bytes() == ref.read_bytes()

    # a worker killed while the run goes on
    started = TilePool.__init__

    def init_then_kill(self, *a, **k):
        started(self, *a, **k)
        if self._procs:
            self._procs[0].send_signal(signal.SIGKILL)

    out2 = tmp_path / "out2.geojson"
    try:
        TilePool.__init__ = init_then_kill
        with pytest.warns(RuntimeWarning, match="tile workers failed"):
            segment_slide(img, geojson=out2, model="default", device="cpu", mpp=0.25, batch_size=4, uuid_seed=7,
                          tile_workers=2, prefetch=True)
    finally:
        TilePool.__init__ = started
    assert out2.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson", "out2.geojson", "ref.geojson",
                                                          "unguarded.py"]


@pytest.mark.parametrize("process", [False, True])
def test_geojson_ids_and_encoding(tmp_path, process):
    """Seeded ids are the version-4 UUIDs of the seed's byte stream, 16 bytes per nucleus whatever the batches; the
    fast encoder writes the same JSON as the standard library; unseeded ids are distinct version-4 UUIDs. Written
    in a process of its own (``process``), the file is the same, byte for byte, as written here."""
    from wsiseg.export.geojson import GeoJSONWriter, feature
    from wsiseg.wsi.stitch import Nucleus

    rng = np.random.default_rng(1)
    nuclei = [Nucleus(np.round(rng.random((int(rng.integers(3, 40)), 2)) * 9e4, 3), float(rng.random()), 120.5,
                      7.53, 11.25, (10.5, 20.25), (0.0, 0.0, 1.0, 1.0)) for _ in range(50)]
    for seed in (7, None):
        out = tmp_path / f"n{seed}.geojson"
        with GeoJSONWriter(out, {"k": 1}, seed=seed, process=process) as w:
            assert (w._proc is not None) == process
            for s in (0, 1, 4, 20, 50):  # uneven batches, one empty
                w.write(nuclei[s:{0: 1, 1: 4, 4: 20, 20: 50, 50: 50}[s]])
            assert w.count == 50
        if seed is not None and process:  # the same bytes as written here, in one batch; gzipped too
            here = tmp_path / "here.geojson"
            with GeoJSONWriter(here, {"k": 1}, seed=seed) as w:
                w.write(nuclei)
            assert out.read_bytes() == here.read_bytes()
            with GeoJSONWriter(tmp_path / "n.geojson.gz", {"k": 1}, seed=seed, process=True) as w:
                w.write(nuclei)
            with gzip.open(tmp_path / "n.geojson.gz", "rb") as f:
                assert f.read() == here.read_bytes()
        feats = read_features(out)
        ids = [f["id"] for f in feats]
        assert len(set(ids)) == 50 and all(uuid.UUID(i).version == 4 for i in ids)
        if seed is not None:
            r = np.random.default_rng(seed)
            assert ids == [str(uuid.UUID(bytes=r.bytes(16), version=4)) for _ in range(50)]
        assert feats == [json.loads(json.dumps(feature(n, k + 1, i))) for k, (n, i) in enumerate(zip(nuclei, ids))]


@pytest.mark.parametrize("paint_process", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_zarr_painting_equals_painting_polygons_one_by_one(tmp_path, paint_process):
    """The zarr writer paints a call's nuclei per chunk, last to first, into one window: the labels must equal the
    polygons painted one by one in label order (first one wins), across chunk borders, overlapping nuclei, nuclei
    cut by the image edge and nuclei wholly outside it, for uneven batches; the same in a painter process of its
    own, the pyramid included."""
    from wsiseg.export.zarr_labels import ZarrLabelWriter
    from wsiseg.wsi.stitch import Nucleus

    rng = np.random.default_rng(4)
    shape = (300, 250)
    polys = []
    for _ in range(400):
        c = rng.uniform([-20, -20], [270, 320])
        n = int(rng.integers(3, 24))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(2, 14, n)
        polys.append(np.round((c + np.stack([np.cos(ang), np.sin(ang)], 1) * r[:, None]) * 2) / 2)
    polys.append(np.array([[-30.5, -30.5], [-10.5, -30.5], [-10.5, -10.5]]))  # wholly outside: not counted
    ref = np.zeros(shape, np.int32)
    for k, p in enumerate(polys, start=1):
        paint_polygon(ref, p, k)
    nuclei = [Nucleus(p, 1.0, 1.0, 1.0, 1.0, (0.0, 0.0), (0.0, 0.0, 1.0, 1.0)) for p in polys]
    z = tmp_path / "t.zarr"
    with ZarrLabelWriter(z, shape, 0.5, chunk=64, min_size=32, paint_process=paint_process) as zw:
        assert (zw._painter is not None) == paint_process
        s = 0
        for n in (1, 5, 0, 60, 200, 135):
            zw.write(nuclei[s:s + n], s + 1)
            s += n
            zw.flush_above(s / len(polys) * 300)  # some chunks go out early and are read back when touched again
    assert s == len(polys)
    assert np.array_equal(read_zarr_labels(z, 0).astype(np.int32), ref)
    for level in (1, 2, 3):  # each level every 2nd pixel of the one before
        assert np.array_equal(read_zarr_labels(z, level).astype(np.int32), ref[::2 ** level, ::2 ** level])
    assert zw.pyramid_rebuilt  # (chunks painted again after the pyramid had them: rebuilt from the store)
    from wsiseg.wsi.stitch import polygon_window

    assert zw.count == sum(polygon_window([p], shape) is not None for p in polys) < len(polys)  # some outside
    # as a run paints: nuclei in raster order of their tops, the flush line just above the next call's nuclei;
    # the pyramid is built as level 0 goes out, nothing is rebuilt, and every level is the same
    order = sorted(range(len(polys)), key=lambda i: polys[i][:, 1].min())
    ref = np.zeros(shape, np.int32)
    for k, i in enumerate(order, start=1):
        paint_polygon(ref, polys[i], k)
    z = tmp_path / "rows.zarr"
    with ZarrLabelWriter(z, shape, 0.5, chunk=64, min_size=32, paint_process=paint_process) as zw:
        s = 0
        for n in (1, 5, 0, 60, 100, 100, 135):
            zw.write([nuclei[i] for i in order[s:s + n]], s + 1)
            s += n
            if s < len(order):
                zw.flush_above(polys[order[s]][:, 1].min() - 1)
    assert not zw.pyramid_rebuilt
    for level in range(4):
        assert np.array_equal(read_zarr_labels(z, level).astype(np.int32), ref[::2 ** level, ::2 ** level]), level


def test_tile_workers_start_by_themselves_only_for_a_gpu_model(monkeypatch):
    """``segment_slide``'s default tile workers: 4 for a model on a GPU of a host with 8 cores or more, none on a
    CPU (they would take the model's cores), on a smaller host or for a run of fewer than 256 tiles."""
    import os
    import types

    from wsiseg.api import AUTO_MIN_TILES, AUTO_TILE_WORKERS, auto_tile_workers, load_model
    from wsiseg.segmenters.base import SegmenterInfo

    assert auto_tile_workers(load_model("watershed", "cpu")) == 0
    assert auto_tile_workers(load_model("default", "cpu")) == 0
    # (the rule alone: this machine has no GPU) a segmenter that says it runs on one
    on_gpu = types.SimpleNamespace(info=lambda: SegmenterInfo(name="on-gpu", device="cuda"))
    for cores, want in ((16, AUTO_TILE_WORKERS), (8, AUTO_TILE_WORKERS), (6, 0), (None, 0)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert auto_tile_workers(on_gpu) == want
        assert auto_tile_workers(on_gpu, AUTO_MIN_TILES) == want
        assert auto_tile_workers(on_gpu, AUTO_MIN_TILES - 1) == 0  # a small run would not gain: start-up costs


@pytest.mark.slow
def test_dead_label_painter_is_a_clear_error_and_leaves_nothing(tmp_path):
    """A painter process killed from outside: the writer raises a one-line :class:`ProcessDied` (a dead helper: exit
    1, the run's progress kept), and neither the store nor its temp folder is left behind."""
    from wsiseg.core.errors import ProcessDied
    from wsiseg.export.zarr_labels import ZarrLabelWriter
    from wsiseg.wsi.stitch import Nucleus

    sq = np.array([[10.5, 10.5], [30.5, 10.5], [30.5, 30.5], [10.5, 30.5]])
    nuclei = [Nucleus(sq + 40 * k, 1.0, 1.0, 1.0, 1.0, (0.0, 0.0), (0.0, 0.0, 1.0, 1.0)) for k in range(3)]
    z = tmp_path / "t.zarr"
    with pytest.raises(ProcessDied, match="painter process died") as e:
        with ZarrLabelWriter(z, (200, 200), 0.5, chunk=64, paint_process=True) as zw:
            zw.write(nuclei, 1)
            zw._painter.proc.kill()
            zw._painter.proc.wait()
            for _ in range(3):  # (a write may still fit in the pipe: the next one, or the end, fails)
                zw.write(nuclei, 1)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_geojson_writer_process_that_dies_fails_cleanly(tmp_path):
    """A GeoJSON writer process killed from outside: a one-line ProcessDied at the next write or on leaving, the
    partial file removed, an existing output at the path left as it was."""
    from wsiseg.core.errors import ProcessDied
    from wsiseg.export.geojson import GeoJSONWriter
    from wsiseg.wsi.stitch import Nucleus

    sq = np.array([[10.5, 10.5], [30.5, 10.5], [30.5, 30.5], [10.5, 30.5]])
    nuclei = [Nucleus(sq + 40 * k, 1.0, 1.0, 1.0, 1.0, (0.0, 0.0), (0.0, 0.0, 1.0, 1.0)) for k in range(3)]
    out = tmp_path / "n.geojson"
    out.write_text("precious")
    with pytest.raises(ProcessDied, match="GeoJSON writer process died") as e:
        with GeoJSONWriter(out, process=True) as w:
            w.write(nuclei)
            w._proc.proc.kill()
            w._proc.proc.wait()
            for _ in range(3):  # (a write may still fit in the pipe: the next one, or the end, fails)
                w.write(nuclei)
    assert "\n" not in str(e.value)
    assert out.read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["n.geojson"]


def test_tile_slab_is_reserved_or_refused():
    """The tile workers' input slab is reserved up front (a full /dev/shm fails there, not as SIGBUS mid-run): a
    size no disk holds gives no slab (the pool then runs without workers), a small one a file of that size."""
    import os

    from wsiseg.parallel.tiles import TilePool
    from wsiseg.parallel.workers import slab_file
    from wsiseg.wsi.grid import TileGrid

    assert slab_file(1 << 60) is None
    path = slab_file(1 << 20)
    try:
        assert path is not None and os.path.getsize(path) == 1 << 20
    finally:
        os.unlink(path)
    with pytest.warns(RuntimeWarning, match="no room"):
        pool = TilePool(TileGrid(4000, 4000, 1 << 21, 64, 1.0), 16, 0.25, workers=2)  # a 2M-pixel tile: 16 PB
    with pool:
        assert pool.workers == 2 and not pool._procs
