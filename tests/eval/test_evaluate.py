"""wsiseg.eval.evaluate: `wsiseg eval` on label directories, GeoJSON rasterisation, --json, --by, and bad inputs."""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import draw

from wsiseg.eval import evaluate
from wsiseg.core.errors import InputError, OutputError
from wsiseg.eval.evaluate import (
    add_parser,
    evaluate_paths,
    iter_geojson_features,
    rasterize_geojson,
    read_label_image,
    run,
    summarize,
)
from wsiseg.eval.metrics import METRIC_NAMES, evaluate_pair

CROP = 256  # Kumar crops keep the tests fast


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wsiseg")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *map(str, argv)])


def kumar_crops(kumar_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """The 14 test labels' top-left crops: {image_id: (split, labels uint16)}."""
    with open(kumar_dir / "split.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] != "train"]
    out = {}
    for r in rows:
        lab = cv2.imread(str(kumar_dir / "labels" / f"{r['image_id']}.png"), cv2.IMREAD_UNCHANGED)
        out[r["image_id"]] = (r["split"], lab[:CROP, :CROP].copy())
    return out


def shift1(lab: np.ndarray) -> np.ndarray:
    out = np.zeros_like(lab)
    out[1:, 1:] = lab[:-1, :-1]
    return out


def outline_features(labels: np.ndarray) -> list[dict]:
    """One Polygon feature per label (ascending id), vertices at boundary-pixel centres (cv2 contour + 0.5)."""
    feats = []
    for k in np.unique(labels[labels != 0]):
        contours, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        ring = (max(contours, key=len)[:, 0, :].astype(float) + 0.5).tolist()
        ring.append(ring[0])
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}})
    return feats


def write_geojson(path: Path, features: list[dict], *, bare_list: bool = False, indent: int | None = None) -> Path:
    # like wsiseg.export.geojson: extra top-level keys before "features"
    doc = features if bare_list else {"type": "FeatureCollection", "wsiseg": {"model": "test"}, "features": features}
    text = json.dumps(doc, indent=indent)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def convex_blobs(shape=(60, 80)) -> np.ndarray:
    """Simple convex blobs (discs, ellipses, rectangles, a triangle, single pixels) with non-contiguous ids."""
    lab = np.zeros(shape, np.int32)
    items = [
        draw.disk((10, 10), 6, shape=shape),
        draw.ellipse(30, 20, 5, 9, shape=shape, rotation=0.5),
        draw.rectangle((45, 5), (55, 12), shape=shape),
        draw.polygon([40, 55, 55], [40, 60, 45], shape=shape),
        draw.disk((12, 50), 3.5, shape=shape),
        ([5], [70]),  # one pixel
        ([20, 21], [70, 70]),  # two pixels
        draw.ellipse(35, 70, 8, 4, shape=shape),
    ]
    for i, (rr, cc) in enumerate(items):
        lab[rr, cc] = 3 * i + 2
    return lab


# ---------------------------------------------------------------------------------------------------------------
# GeoJSON rasterisation


def test_rasterize_convex_outlines_reproduces_labels(tmp_path):
    src = convex_blobs()
    ids = np.unique(src[src != 0])
    path = write_geojson(tmp_path / "blobs.geojson", outline_features(src))
    got = rasterize_geojson(path, src.shape)
    assert got.dtype == np.int32 and got.shape == src.shape
    # feature k (1-based file order) is label k; features were written in ascending id order
    expected = np.zeros_like(src)
    for k, i in enumerate(ids, start=1):
        expected[src == i] = k
    np.testing.assert_array_equal(got, expected)


def test_rasterize_gz_bare_list_multipolygon_and_skips(tmp_path):
    src = convex_blobs()
    feats = outline_features(src)
    # merge features 1 and 2 into one MultiPolygon; add a Point and a null geometry that leave their labels unused
    multi = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [feats[0]["geometry"]["coordinates"],
                                                             feats[1]["geometry"]["coordinates"]]},
    }
    extra = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [3.5, 3.5]}},
             {"type": "Feature", "geometry": None}]
    doc = [multi] + feats[2:] + extra
    a = rasterize_geojson(write_geojson(tmp_path / "a.geojson.gz", doc, bare_list=True, indent=1), src.shape)
    b = rasterize_geojson(write_geojson(tmp_path / "b.geojson", doc), src.shape)
    np.testing.assert_array_equal(a, b)
    ids = np.unique(src[src != 0])
    assert np.all(a[(src == ids[0]) | (src == ids[1])] == 1)
    # labels 1..n-1 (the MultiPolygon is one label); the Point and null features leave theirs unused
    assert set(np.unique(a).tolist()) == set(range(len(feats)))
    s = evaluate_pair(a, src)
    assert s["pixel_f1"] == 1.0 and s["n_pred"] == len(feats) - 1


def test_rasterize_clips_outside_and_earlier_features_keep_overlaps(tmp_path):
    square = lambda x0, y0, x1, y1: {  # noqa: E731 - pixel-centre vertices of a filled rectangle
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[x0 + .5, y0 + .5], [x1 + .5, y0 + .5], [x1 + .5, y1 + .5],
                                                         [x0 + .5, y1 + .5], [x0 + .5, y0 + .5]]]},
    }
    path = write_geojson(tmp_path / "sq.geojson", [square(-5, -5, 3, 3), square(2, 2, 5, 5)])
    got = rasterize_geojson(path, (8, 10))
    expected = np.zeros((8, 10), np.int32)
    expected[2:6, 2:6] = 2
    expected[0:4, 0:4] = 1  # the earlier feature keeps the overlap
    np.testing.assert_array_equal(got, expected)
    # a prediction wholly outside the labels (another image or level) is an error, not silently dropped
    path = write_geojson(tmp_path / "out.geojson", [square(2, 2, 5, 5), square(50, 50, 60, 60), square(70, 1, 80, 3)])
    with pytest.raises(InputError, match="2 predicted nuclei lie wholly outside the 10 x 8 label image"):
        rasterize_geojson(path, (8, 10))
    nan = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [float("nan"), 2], [3, 3]]]}}
    path = tmp_path / "nan.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [nan]}))
    with pytest.raises(InputError, match="non-finite"):
        rasterize_geojson(path, (8, 10))


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(1, 64), indent=st.sampled_from([None, 0, 2]), tail=st.booleans())
def test_streaming_reader_handles_any_chunking(tmp_path_factory, chunk, indent, tail):
    feats = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [i, 12345.5 + i]},
         "properties": {"s": "a]}\"{"}}
        for i in range(5)
    ]
    doc = {"type": "FeatureCollection", "bbox": [0, 1, 2, 3], "features": feats}
    if tail:
        doc["count"] = 123456789
    path = tmp_path_factory.mktemp("stream") / "s.geojson"
    path.write_text(json.dumps(doc, indent=indent))
    assert list(iter_geojson_features(path, chunk_chars=chunk)) == feats


@pytest.mark.parametrize(
    "text",
    ['{"type": "FeatureCollection", "features": [{"type": "Feature"}',  # truncated
     '{"type": "FeatureCollection"}',  # no features
     '{"features": 3}',
     "hello",
     ""],
)
def test_malformed_geojson_raises_input_error(tmp_path, text):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(InputError, match="bad.geojson"):
        rasterize_geojson(path, (4, 4))


def test_corrupt_gzip_raises_input_error(tmp_path):
    good = gzip.compress(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature"}] * 50}).encode())
    for name, data in [("hdr.geojson.gz", b"not gzip at all"), ("body.geojson.gz", good[:12] + b"\0" * 40)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=name):
            rasterize_geojson(tmp_path / name, (4, 4))


def test_kumar_outlines_rasterise_close_to_truth(kumar_dir, tmp_path):
    """Real nuclei are not convex: their outlines' rasterisation is close, not identical."""
    _, lab = kumar_crops(kumar_dir)["TCGA-A7-A13F-01Z-00-DX1"]
    path = write_geojson(tmp_path / "k.geojson.gz", outline_features(lab))
    s = evaluate_pair(rasterize_geojson(path, lab.shape), lab)
    assert s["object_f1"] > 0.99
    assert s["aji"] > 0.95
    assert s["pixel_f1"] > 0.98


# ---------------------------------------------------------------------------------------------------------------
# the command on directories, --json, --by


@pytest.fixture()
def kumar_dirs(kumar_dir, tmp_path):
    """GT dir: 14 test crops as uint16 PNG; PRED dir: 13 of them shifted by 1 px (one missing) plus one stray."""
    crops = kumar_crops(kumar_dir)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    names = sorted(crops)
    for name in names:
        cv2.imwrite(str(gt_dir / f"{name}.png"), crops[name][1])
    for name in names[1:]:
        cv2.imwrite(str(pred_dir / f"{name}.png"), shift1(crops[name][1]))
    cv2.imwrite(str(pred_dir / "stray.png"), crops[names[0]][1])
    return crops, names, gt_dir, pred_dir


def test_eval_directories_json_and_grouping(kumar_dir, kumar_dirs, tmp_path, capsys):
    crops, names, gt_dir, pred_dir = kumar_dirs
    out = tmp_path / "report.json"
    assert run(parse(pred_dir, gt_dir, "--json", out, "--by", kumar_dir / "split.csv", "--column", "split")) == 0
    printed = capsys.readouterr().out
    assert "stray" in printed and names[0] in printed  # unmatched names are reported
    assert "ddof=0" in printed

    report = json.loads(out.read_text())
    assert report["unmatched"] == {"pred_only": ["stray"], "gt_only": [names[0]]}
    rows = {r["name"]: r for r in report["images"]}
    assert sorted(rows) == names[1:]
    for name, r in rows.items():
        want = evaluate_pair(shift1(crops[name][1]), crops[name][1])
        for k in METRIC_NAMES:
            assert r[k] == pytest.approx(want[k], abs=1e-12)
        assert r["group"] == crops[name][0]
    summary = report["summary"]
    assert set(summary) == {"test_same_organ", "test_diff_organ", "all"}
    assert summary["all"]["n"] == 13
    assert summary["test_same_organ"]["n"] + summary["test_diff_organ"]["n"] == 13
    for group, s in summary.items():
        members = [r for r in rows.values() if group == "all" or r["group"] == group]
        for k in METRIC_NAMES:
            vals = np.array([r[k] for r in members])
            assert s["mean"][k] == pytest.approx(vals.mean(), abs=1e-12)
            assert s["std"][k] == pytest.approx(vals.std(ddof=0), abs=1e-12)
    # shifting by one pixel loses a little, never everything
    assert 0.7 < summary["all"]["mean"]["aji"] < 0.95
    assert summary["all"]["mean"]["object_f1"] > 0.95


def test_eval_geojson_directory_against_labels(kumar_dir, tmp_path, capsys):
    """PRED: a directory of .geojson(.gz) files named like the GT PNGs, convex blobs -> every metric 1.0."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    src = convex_blobs()
    for i, suffix in enumerate([".geojson", ".geojson.gz"]):
        lab = (src if i == 0 else src[::-1, ::-1]).astype(np.uint16)
        cv2.imwrite(str(gt_dir / f"img{i}.png"), lab)
        write_geojson(pred_dir / f"img{i}{suffix}", outline_features(lab))
    out = tmp_path / "r.json"
    assert run(parse(pred_dir, gt_dir, "--json", out)) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["images"]] == ["img0", "img1"]
    for r in report["images"]:
        for k in METRIC_NAMES:
            assert r[k] == 1.0, (r["name"], k)
    assert set(report["summary"]) == {"all"}
    # and a single GeoJSON file against a single TIFF label image
    import tifffile

    tifffile.imwrite(tmp_path / "one.tif", src)
    single = evaluate_paths(pred_dir / "img0.geojson", tmp_path / "one.tif")
    assert single["summary"]["all"]["mean"]["aji"] == 1.0


def test_summarize_population_std_and_groups():
    rows = [{"name": str(i), "group": g, **{k: v for k in evaluate.REPORT_KEYS}}
            for i, (g, v) in enumerate([("a", 0.2), ("a", 0.4), ("b", 1.0)])]
    s = summarize(rows)
    assert list(s) == ["a", "b", "all"]
    assert s["a"]["mean"]["aji"] == pytest.approx(0.3)
    assert s["a"]["std"]["aji"] == pytest.approx(0.1)  # ddof=0 (ddof=1 would give 0.1414)
    assert s["b"]["std"]["aji"] == 0.0
    assert s["all"]["n"] == 3 and s["all"]["mean"]["pq"] == pytest.approx(1.6 / 3)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_input_error(kumar_dirs, tmp_path):
    crops, names, gt_dir, pred_dir = kumar_dirs
    with pytest.raises(InputError, match="does not exist"):
        run(parse(tmp_path / "missing", gt_dir))
    with pytest.raises(InputError, match="does not exist"):
        run(parse(pred_dir, tmp_path / "missing"))
    with pytest.raises(InputError, match="both be files or both be directories"):
        run(parse(pred_dir / f"{names[1]}.png", gt_dir))
    with pytest.raises(InputError, match="unmatched names"):
        run(parse(pred_dir, gt_dir, "--strict"))
    with pytest.raises(InputError, match="no column 'fold'"):
        run(parse(pred_dir, gt_dir, "--by", SPLIT_CSV(tmp_path), "--column", "fold"))
    with pytest.raises(InputError, match="no such CSV"):
        run(parse(pred_dir, gt_dir, "--by", tmp_path / "nope.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="matches"):
        run(parse(empty, gt_dir))

    # shape mismatch: one prediction of the wrong size
    cv2.imwrite(str(pred_dir / f"{names[1]}.png"), crops[names[1]][1][:100, :120])
    with pytest.raises(InputError, match=r"shape \(100, 120\) differs"):
        run(parse(pred_dir, gt_dir))


def SPLIT_CSV(tmp_path: Path) -> Path:  # noqa: N802 - a tiny CSV with the Kumar header
    p = tmp_path / "split.csv"
    p.write_text("image_id,split\nx,train\n")
    return p


def test_unreadable_label_images_raise_input_error(tmp_path):
    rgb = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb), np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(InputError, match="2-D"):
        read_label_image(rgb)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match="junk.tif"):
        read_label_image(junk)
    floats = tmp_path / "f.npy"
    np.save(floats, np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="integers"):
        read_label_image(floats)
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(b"")
    with pytest.raises(InputError, match="unsupported"):
        read_label_image(jpg)
    negative = tmp_path / "neg.npy"
    np.save(negative, np.full((4, 4), -1, np.int32))  # (-1 for background: it would be scored as one nucleus)
    with pytest.raises(InputError, match="0 for background"):
        read_label_image(negative)


def test_unwritable_json_raises_output_error(tmp_path):
    lab = convex_blobs().astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), lab)
    with pytest.raises(OutputError, match="cannot write JSON"):
        run(parse(tmp_path / "a.png", tmp_path / "a.png", "--json", tmp_path / "no" / "dir" / "r.json"))


def test_stream_class_reads_values_split_across_chunks():
    s = evaluate._Stream(io.StringIO('  [1, 22, {"a": [3]}, 4444]'), Path("mem"), chunk=2)
    assert list(evaluate._iter_array(s)) == [1, 22, {"a": [3]}, 4444]


def test_end_to_end_wsiseg_run_geojson_against_kumar(kumar_dir, tmp_path):
    """A GeoJSON written by the pipeline (classical watershed segmenter) scores exactly like the in-memory labels."""
    import tifffile

    api = pytest.importorskip("wsiseg.api")
    name = "TCGA-A7-A13F-01Z-00-DX1"
    image = tifffile.imread(kumar_dir / "images" / f"{name}.tif")[:400, :400, :3]
    truth = cv2.imread(str(kumar_dir / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED)[:400, :400]
    tifffile.imwrite(tmp_path / f"{name}.tif", image, photometric="rgb")
    cv2.imwrite(str(tmp_path / f"{name}.png"), truth)
    geojson = tmp_path / f"{name}.geojson.gz"
    api.segment_slide(tmp_path / f"{name}.tif", geojson=geojson, model="watershed", mpp=0.25, uuid_seed=0)
    report = evaluate_paths(geojson, tmp_path / f"{name}.png")
    row = report["images"][0]
    labels = api.segment_image(image, model="watershed", mpp=0.25)
    np.testing.assert_array_equal(rasterize_geojson(geojson, truth.shape), labels)
    nuclei = api.image_nuclei(image, model="watershed", mpp=0.25)  # the same nuclei, with their measurements
    with gzip.open(geojson, "rt", encoding="utf-8") as f:
        features = json.load(f)["features"]
    assert len(nuclei) == len(features) == labels.max()
    for n, feat in zip(nuclei, features):
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        assert np.allclose(ring[:-1], n.polygon, atol=0.01)  # GeoJSON closes its ring (repeats the first vertex)
    direct = evaluate_pair(labels, truth)
    for k in METRIC_NAMES:
        assert row[k] == pytest.approx(direct[k], abs=1e-12), k
    assert row["n_pred"] > 20
    cells = tmp_path / "cells" / f"{name}.geojson"  # QuPath cells: scored by their nuclei, not the grown cells
    cells.parent.mkdir()
    api.segment_slide(tmp_path / f"{name}.tif", geojson=cells, model="watershed", mpp=0.25, objects="cells")
    np.testing.assert_array_equal(rasterize_geojson(cells, truth.shape), labels)
    assert 0.2 < row["aji"] < 0.9 and row["pixel_f1"] > 0.5


def test_an_empty_truth_image_is_refused_and_json_is_not_overwritten(tmp_path):
    """A 0x0 label image scored any prediction 1.0; now it is an input error. An existing --json file is kept
    unless --overwrite (checked before scoring)."""
    np.save(tmp_path / "empty.npy", np.zeros((0, 0), np.int32))
    with pytest.raises(InputError, match="empty"):
        read_label_image(tmp_path / "empty.npy")
    lab = np.zeros((20, 20), np.uint16)
    lab[5:10, 5:10] = 1
    cv2.imwrite(str(tmp_path / "a.png"), lab)
    out = tmp_path / "r.json"
    out.write_text("keep")
    with pytest.raises(OutputError, match="already exists"):
        run(parse(tmp_path / "a.png", tmp_path / "a.png", "--json", out))
    assert out.read_text() == "keep"
    assert run(parse(tmp_path / "a.png", tmp_path / "a.png", "--json", out, "--overwrite")) == 0
    assert json.loads(out.read_text())["images"][0]["aji"] == 1.0
