"""The per-nucleus table (wsiseg.export.table): ``wsiseg run --table`` on a crop of the real bundled slide, read
back with the standard csv reader and checked row by row against the GeoJSON it is made from."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import crop_tiff
from wsiseg.core.errors import InputError, OutputError
from wsiseg.export.table import FIRST, write_table


def _run(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsiseg", "run", *map(str, args), "--quiet"], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    return crop_tiff(tmp_path_factory.mktemp("table") / "crop.tif")


def _read(path: Path) -> list[dict]:
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text), delimiter="\t" if ".tsv" in path.name else ","))


def test_a_row_per_nucleus_in_the_geojsons_order(crop, tmp_path):
    r = _run(tmp_path, crop, "--out", "n.geojson", "--table", "n.csv")
    assert r.returncode == 0, r.stderr
    gj = json.loads((tmp_path / "n.geojson").read_text())
    feats, mpp = gj["features"], gj["wsiseg"]["slide_mpp"]
    rows = _read(tmp_path / "n.csv")
    assert len(rows) == len(feats) > 300
    assert list(rows[0]) == FIRST + list(feats[0]["properties"]["measurements"])
    for row, f in zip(rows, feats):
        m = f["properties"]["measurements"]
        assert (row["Image"], row["Object ID"], row["Object type"], row["Classification"]) == (
            "crop.tif", f["id"], "Detection", "Nucleus")
        assert float(row["Centroid X µm"]) == pytest.approx(m["Centroid X px"] * mpp, abs=1e-3)
        assert float(row["Centroid Y µm"]) == pytest.approx(m["Centroid Y px"] * mpp, abs=1e-3)
        assert {k: float(row[k]) for k in m} == m


def test_wsiseg_export_makes_the_same_table_afterwards(crop, tmp_path):
    """``wsiseg export GEOJSON --table``: the table ``wsiseg run --table`` writes, byte for byte, from the GeoJSON
    alone; an existing table is kept without ``--overwrite``."""
    r = _run(tmp_path, crop, "--out", "n.geojson", "--table", "n.csv")
    assert r.returncode == 0, r.stderr

    def export(*args):
        return subprocess.run([sys.executable, "-m", "wsiseg", "export", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    e = export("n.geojson", "--table", "e.csv")
    assert e.returncode == 0 and e.stdout.startswith("n.geojson: ") and " rows -> e.csv" in e.stdout, e.stderr
    assert (tmp_path / "e.csv").read_bytes() == (tmp_path / "n.csv").read_bytes()
    again = export("n.geojson", "--table", "e.csv")
    assert again.returncode != 0 and "already exists" in again.stderr
    (tmp_path / "qupath.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"objectType": "annotation"}, "geometry": {
            "type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}}]}))  # (QuPath's, not ours)
    for args, message in ((("n.geojson",), "nothing to make"), (("n.geojson", "--table", "e.txt"), ".csv or .tsv"),
                          (("none.geojson", "--table", "x.csv"), "no such file"),
                          (("qupath.geojson", "--table", "q.csv"), "not a GeoJSON that wsiseg run wrote")):
        bad = export(*args)
        assert bad.returncode != 0 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def test_cells_tab_separated_and_compressed(crop, tmp_path):
    """``--objects cells`` and ``.tsv.gz``: a row a cell, its centroid the cell's, every nucleus and cell
    measurement."""
    r = _run(tmp_path, crop, "--out", "c.geojson", "--table", "c.tsv.gz", "--objects", "cells")
    assert r.returncode == 0, r.stderr
    gj = json.loads((tmp_path / "c.geojson").read_text())
    rows = _read(tmp_path / "c.tsv.gz")
    assert len(rows) == len(gj["features"])
    for row, f in zip(rows, gj["features"]):
        m = f["properties"]["measurements"]
        assert row["Object type"] == "Cell" and row["Object ID"] == f["id"]
        assert float(row["Centroid X µm"]) == pytest.approx(m["Cell: Centroid X px"] * gj["wsiseg"]["slide_mpp"],
                                                             abs=1e-3)
        assert float(row["Nucleus: Area µm^2"]) == m["Nucleus: Area µm^2"]


def test_refusals_and_a_geojson_cut_short(crop, tmp_path):
    cases = [((crop, "--table", "a.csv"), "give --out"),
             ((crop, "--out", "a.geojson", "--table", "a.txt"), "expected a .csv or .tsv file name"),
             ((crop, "--out", "a.geojson", "--save-table"), "--out-dir")]
    for args, message in cases:
        r = _run(tmp_path, *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert list(tmp_path.iterdir()) == []
    r = _run(tmp_path, crop, "--out", "n.geojson")
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "n.geojson").read_bytes()
    cut = tmp_path / "cut.geojson"  # (cut short in a feature, then between two: its closing ]} missing)
    for end in (5000, data.index(b"\n", 5000) + 1):
        cut.write_bytes(data[:end])
        with pytest.raises(InputError, match="cut.geojson: not readable as GeoJSON"):
            write_table(cut, tmp_path / "t.csv")
    with pytest.raises(InputError, match="none.geojson: no such file"):
        write_table(tmp_path / "none.geojson", tmp_path / "t.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.geojson", "n.geojson"]
    assert write_table(tmp_path / "n.geojson", tmp_path / "t.csv") == len(_read(tmp_path / "t.csv")) > 300
    (tmp_path / "u.csv").write_text("appeared")  # (while a run that found no u.csv was writing it)
    with pytest.raises(OutputError, match="appeared while this run was writing it"):
        write_table(tmp_path / "n.geojson", tmp_path / "u.csv", existed=False)
    assert (tmp_path / "u.csv").read_text() == "appeared" and len(list(tmp_path.iterdir())) == 4


def test_a_measurement_some_features_lack_has_its_column(crop, tmp_path):
    """The columns are every measurement any feature has, in the order they first appear: a first feature without
    one (a nucleus whose stain was not measured) leaves its cell empty, not the column out."""
    r = _run(tmp_path, crop, "--out", "n.geojson")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "n.geojson").read_bytes().split(b"\n")
    f1 = json.loads(lines[1].rstrip(b","))
    m = f1["properties"]["measurements"]
    names = list(m)
    del m["Eosin: Mean"]
    m["Score"] = None
    lines[1] = json.dumps(f1).encode() + b","
    (tmp_path / "e.geojson").write_bytes(b"\n".join(lines))
    write_table(tmp_path / "e.geojson", tmp_path / "e.csv")
    rows = _read(tmp_path / "e.csv")
    assert list(rows[0]) == FIRST + names  # ("Eosin: Mean" from the second feature on, where the first had it)
    assert rows[0]["Eosin: Mean"] == rows[0]["Score"] == "" and float(rows[1]["Eosin: Mean"]) > 0
