"""DICOM annotations (wsiseg.export.dicom_ann): a DICOM slide's nuclei written as a Microscopy Bulk Simple
Annotations object, read back by an independent reader (wsidicom, which opens a slide's folder with the annotation
files in it, as a PACS export holds them) and by highdicom's own parser. The DICOM slide is made from the real bundled
slide by wsidicomizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import crop_tiff, dicomize
from wsiseg.core.errors import InputError, OutputError
from wsiseg.export.dicom_ann import check_image, read_groups, volume_image, write_annotations
from wsiseg.io.slide import expand_inputs

pytest.importorskip("wsidicomizer", reason="wsidicomizer (the tests' DICOM writer) not installed")


def _run(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsiseg", "run", *map(str, args), "--quiet"], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A two-level DICOM slide of the bundled slide's dermis (lossless: the same pixels)."""
    root = tmp_path_factory.mktemp("dicom_ann")
    dicomize(crop_tiff(root / "crop.tif", levels=2), root / "S1")
    return root / "S1"


@pytest.fixture(scope="module")
def ran(slide, tmp_path_factory) -> dict[str, Path]:
    """``wsiseg run S1 --out nuclei.geojson --dicom-ann nuclei.dcm``, and the same with ``--objects cells``."""
    out = tmp_path_factory.mktemp("dicom_ann_out")
    r = _run(out, slide, "--out", "nuclei.geojson", "--dicom-ann", "nuclei.dcm")
    c = _run(out, slide, "--out", "cells.geojson", "--dicom-ann", "cells.dcm", "--objects", "cells")
    assert r.returncode == c.returncode == 0, r.stderr + c.stderr
    return {k: out / k for k in ("nuclei.geojson", "nuclei.dcm", "cells.geojson", "cells.dcm")}


def _rings(geojson: Path, key: str = "geometry") -> list[np.ndarray]:
    return [np.asarray(f[key]["coordinates"][0])[:-1] for f in json.loads(geojson.read_text())["features"]]


def test_the_annotations_are_the_geojsons_nuclei_on_the_slides_full_resolution_image(slide, ran, tmp_path):
    """wsidicom opens the slide's folder with the annotation file in it: one polygon group "Nucleus" on the
    slide's full-resolution image, each polygon the GeoJSON's ring (its closing vertex not repeated), in order, with
    its area, perimeter, score and label."""
    from wsidicom import WsiDicom

    folder = tmp_path / "S1"
    shutil.copytree(slide, folder)
    shutil.copy(ran["nuclei.dcm"], folder / "annotations.dcm")
    assert len(expand_inputs([folder])) == 1  # (the annotation is no slide of its own)

    feats = json.loads(ran["nuclei.geojson"].read_text())["features"]
    rings = _rings(ran["nuclei.geojson"])
    with WsiDicom.open(folder) as w:
        level0 = w.levels.base_level
        (instance,) = w.annotations
        (group,) = instance.groups
        assert group.label == "Nucleus" and group.type_code.meaning == "Nucleus"
        assert len(group.annotations) == len(feats) > 300
        for ann, ring, f in zip(group.annotations, rings, feats):
            pts = np.asarray(ann.geometry.to_coords(), np.float64)
            np.testing.assert_allclose(pts, ring, atol=1e-3)  # (32-bit floats: under 1e-4 px at 1024 px)
            m = {x.code.meaning: x.value for x in ann.measurements}
            props = f["properties"]["measurements"]
            assert m["Area"] == pytest.approx(props["Area µm^2"], rel=1e-6)
            assert m["Perimeter"] == pytest.approx(props["Perimeter µm"], rel=1e-6)
            assert m["Score"] == pytest.approx(props["Score"], rel=1e-6) and m["Label"] == props["Label"]
        units = {x.code.meaning: x.unit.value for x in group.annotations[0].measurements}
        assert units["Area"] == "um2" and units["Perimeter"] == "um" and units["Max diameter"] == "um"
        ref = level0.datasets[0]
    import pydicom

    ds = pydicom.dcmread(ran["nuclei.dcm"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.91.1"  # Microscopy Bulk Simple Annotations Storage
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID
    assert ds.StudyInstanceUID == ref.StudyInstanceUID and ds.SeriesInstanceUID != ref.SeriesInstanceUID
    assert ds.AnnotationCoordinateType == "2D" and ds.PixelOriginInterpretation == "VOLUME"


def test_the_polygons_lie_on_the_dicom_images_own_dark_nuclei(slide, ran):
    """Read against the DICOM image's own pixels (by wsidicom, in the Total Pixel Matrix the coordinates refer to):
    inside the polygons the slide is far darker than in the ring of 3 px around each."""
    import cv2
    import highdicom as hd
    import pydicom
    from wsidicom import WsiDicom

    with WsiDicom.open(slide) as w:
        img = np.asarray(w.read_region((0, 0), 0, (w.size.width, w.size.height)).convert("L"), np.float64)
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(ran["nuclei.dcm"]))
    inside = np.zeros(img.shape, np.uint8)
    for ring in ann.get_annotation_groups()[0].get_graphic_data("2D"):  # (DICOM's (0, 0): the top-left pixel's
        # top-left corner, so x 0.5 is its centre)
        cv2.fillPoly(inside, [np.round((ring - 0.5) * 16).astype(np.int32)], 1, shift=4)
    around = cv2.dilate(inside, np.ones((7, 7), np.uint8)) & (1 - inside)
    assert img[inside > 0].mean() < img[around > 0].mean() - 40


def test_cells_go_to_two_groups(ran):
    """``--objects cells``: the nuclei and the cells' outlines, each group with its own measurements."""
    import highdicom as hd
    import pydicom

    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(ran["cells.dcm"]))
    nuclei, cells = ann.get_annotation_groups()
    assert (nuclei.label, cells.label) == ("Nucleus", "Cell")
    feats = json.loads(ran["cells.geojson"].read_text())["features"]
    for group, key, prefix in ((nuclei, "nucleusGeometry", "Nucleus: "), (cells, "geometry", "Cell: ")):
        data = group.get_graphic_data("2D")
        assert len(data) == len(feats)
        for pts, ring in zip(data, _rings(ran["cells.geojson"], key)):
            np.testing.assert_allclose(pts, ring, atol=1e-3)
        names, values, _ = group.get_measurements()
        area = values[:, [n.meaning for n in names].index("Area")]
        np.testing.assert_allclose(area, [f["properties"]["measurements"][prefix + "Area µm^2"] for f in feats],
                                   rtol=1e-6)


def test_a_slide_cropped_to_its_bounds_has_its_annotations_moved_back(slide, ran):
    """The GeoJSON's coordinates start at the corner of a slide's bounds where OpenSlide crops to them; the DICOM
    image's start at its own corner. An image smaller than what was read from it is refused (before a run's work)."""
    groups = read_groups(ran["nuclei.geojson"], shift=(100, 250))
    rings = _rings(ran["nuclei.geojson"])
    np.testing.assert_allclose(groups["Nucleus"].polygons[0], rings[0] + (100, 250), atol=1e-3)
    image = volume_image(slide)
    check_image(image, (1024, 1024))
    check_image(image, (1000, 1000), (24, 24))
    check_image(image, (900, 1000), (24, 24))
    for dims, origin in (((1024, 1024), (10, 0)), ((512, 512), (0, 0)), ((1024, 1030), (0, 0))):
        with pytest.raises(InputError, match="full-resolution image is 1024 x 1024 px, not the"):
            check_image(image, dims, origin)


def test_missing_and_null_measurements_are_dicoms_no_value(slide, ran, tmp_path):
    """A feature without a measurement, or with null for it (a nucleus whose stain was not measured), has NaN
    there, DICOM's "no value", and every other value stays with its own polygon."""
    import highdicom as hd
    import pydicom

    lines = ran["nuclei.geojson"].read_bytes().split(b"\n")
    f1, f4 = json.loads(lines[1].rstrip(b",")), json.loads(lines[4].rstrip(b","))
    del f1["properties"]["measurements"]["Score"]  # (the first feature lacks one)
    f4["properties"]["measurements"]["Eosin: Mean"] = None
    lines[1], lines[4] = json.dumps(f1).encode() + b",", json.dumps(f4).encode() + b","
    edited = tmp_path / "edited.geojson"
    edited.write_bytes(b"\n".join(lines))
    assert write_annotations(edited, slide, tmp_path / "e.dcm") == len(lines) - 3
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(tmp_path / "e.dcm"))
    names, values, _ = ann.get_annotation_groups()[0].get_measurements()
    col = {n.meaning: values[:, k] for k, n in enumerate(names)}
    assert np.isnan(col["Score"][0]) and np.isnan(col["Eosin: Mean"][3])
    assert np.isnan(col["Score"]).sum() == 1 and np.isnan(col["Eosin: Mean"]).sum() == 1
    feats = json.loads(ran["nuclei.geojson"].read_text())["features"]
    np.testing.assert_allclose(col["Score"][1:], [f["properties"]["measurements"]["Score"] for f in feats[1:]],
                               rtol=1e-6)
    assert ann.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99WSISEG"


def test_a_slide_without_nuclei_has_no_annotations_and_says_so(tmp_path):
    """A blank DICOM slide: the GeoJSON and table are written (empty), the annotations are not (an annotation
    object needs one), a warning says so and the run succeeds."""
    import tifffile

    blank = np.full((512, 512, 3), 240, np.uint8)
    tifffile.imwrite(tmp_path / "blank.tif", blank, tile=(256, 256), photometric="rgb", resolutionunit="CENTIMETER",
                     resolution=(1e4 / 0.5, 1e4 / 0.5))
    dicomize(tmp_path / "blank.tif", tmp_path / "blank")
    r = _run(tmp_path, tmp_path / "blank", "--out", "b.geojson", "--dicom-ann", "b.dcm", "--table", "b.csv")
    assert r.returncode == 0, r.stderr
    assert "no nuclei, so no DICOM annotations were written" in r.stderr
    assert not (tmp_path / "b.dcm").exists() and json.loads((tmp_path / "b.geojson").read_text())["features"] == []
    assert (tmp_path / "b.csv").read_text().count("\n") == 1  # (the header alone)
    assert "b.dcm" not in r.stdout


def test_refusals_leave_nothing_behind(slide, ran, tmp_path, svs_path):
    """Each a one-line error with exit 2 before any work: a slide that is not DICOM (the annotations need a DICOM
    image to refer to), no GeoJSON, a name that is no .dcm, --save-dicom-ann without --out-dir, an existing file."""
    cases = [
        ((svs_path, "--out", "a.geojson", "--dicom-ann", "a.dcm"), "not a DICOM slide"),
        ((slide, "--dicom-ann", "a.dcm"), "give --out"),
        ((slide, "--out", "a.geojson", "--dicom-ann", "a.geojson.dcm.txt"), "expected a .dcm file name"),
        ((slide, "--out", "a.geojson", "--save-dicom-ann"), "--out-dir"),
        ((slide, svs_path, "--out-dir", "o", "--save-dicom-ann"), "not a DICOM slide"),
    ]
    for args, message in cases:
        r = _run(tmp_path, *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "b.dcm").write_bytes(b"kept")
    r = _run(tmp_path, slide, "--out", "b.geojson", "--dicom-ann", "b.dcm")
    assert r.returncode != 0 and "already exists" in r.stderr and (tmp_path / "b.dcm").read_bytes() == b"kept"
    with pytest.raises(InputError, match="not a DICOM slide"):
        write_annotations(ran["nuclei.geojson"], svs_path, tmp_path / "c.dcm")
    data = ran["nuclei.geojson"].read_bytes()
    cut = tmp_path / "cut.geojson"  # (cut short in a feature, then between two: its closing ]} missing)
    for end in (5000, data.index(b"\n", 5000) + 1):
        cut.write_bytes(data[:end])
        with pytest.raises(InputError, match="cut.geojson: not readable as GeoJSON"):
            write_annotations(cut, slide, tmp_path / "c.dcm")
    with pytest.raises(InputError, match="none.geojson: no such file"):
        write_annotations(tmp_path / "none.geojson", slide, tmp_path / "c.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.dcm", "cut.geojson"]
    (tmp_path / "d.dcm").write_bytes(b"appeared")  # (while a run that found no d.dcm was writing it)
    with pytest.raises(OutputError, match="appeared while this run was writing it"):
        write_annotations(ran["nuclei.geojson"], slide, tmp_path / "d.dcm", existed=False)
    assert (tmp_path / "d.dcm").read_bytes() == b"appeared" and len(list(tmp_path.iterdir())) == 3


def test_wsiseg_export_makes_the_annotations_afterwards(slide, ran, tmp_path):
    """``wsiseg export GEOJSON --dicom-ann A --slide S``: the run's annotations from its GeoJSON alone (a slide
    converted to DICOM after it was segmented); refused without ``--slide``, and for a GeoJSON whose outlines reach
    past the slide's image (another slide's)."""
    import highdicom as hd
    import pydicom

    def export(*args):
        return subprocess.run([sys.executable, "-m", "wsiseg", "export", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    e = export(ran["nuclei.geojson"], "--dicom-ann", "e.dcm", "--slide", slide)
    assert e.returncode == 0 and "annotations -> e.dcm" in e.stdout, e.stderr
    a, b = (hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(p)).get_annotation_groups()[0]
            for p in (ran["nuclei.dcm"], tmp_path / "e.dcm"))
    for pa, pb in zip(a.get_graphic_data("2D"), b.get_graphic_data("2D"), strict=True):
        np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(a.get_measurements()[1], b.get_measurements()[1])
    assert export(ran["nuclei.geojson"], "--dicom-ann", "f.dcm").returncode == 2
    feats = json.loads(ran["nuclei.geojson"].read_text())
    feats["features"][0]["geometry"]["coordinates"][0][0] = [1500.5, 20.5]  # (past the 1024 px image)
    (tmp_path / "other.geojson").write_text(json.dumps(feats))
    o = export("other.geojson", "--dicom-ann", "o.dcm", "--slide", slide)
    assert o.returncode == 3 and "outside the DICOM slide's 1024 x 1024 px image" in o.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.dcm", "other.geojson"]


def test_a_cohort_writes_one_annotation_file_per_slide(slide, tmp_path):
    """``--out-dir --save-dicom-ann``; and a finished cohort run again with ``--save-dicom-ann --save-table`` on a
    cluster: its slides are not segmented again (no cluster is even started), their new outputs are made from
    their GeoJSONs."""
    cohort = tmp_path / "cohort"
    shutil.copytree(slide, cohort / "A")
    shutil.copytree(slide, cohort / "B")
    out = tmp_path / "out"
    r = _run(tmp_path, cohort / "A", "--out-dir", out, "--save-dicom-ann", "--gzip")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["A.ann.dcm", "A.geojson.gz"]
    groups = read_groups(out / "A.geojson.gz")  # (read back from the gzipped GeoJSON)
    assert len(groups["Nucleus"].polygons) > 300
    assert volume_image(cohort / "A").SOPInstanceUID == volume_image(slide).SOPInstanceUID

    r = _run(tmp_path, cohort / "B", "--out-dir", out, "--gzip")
    assert r.returncode == 0, r.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = _run(tmp_path, cohort, "--out-dir", out, "--gzip", "--save-dicom-ann", "--save-table", "--cluster", "local",
             "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "0 done, 2 skipped, 0 failed" in r.stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(after) == ["A.ann.dcm", "A.csv", "A.geojson.gz", "B.ann.dcm", "B.csv", "B.geojson.gz"]
    assert all(after[k] == v for k, v in before.items())  # (the GeoJSONs and A's annotations as they were)
    assert len(read_groups(out / "B.geojson.gz")["Nucleus"].polygons) == (out / "B.csv").read_text().count("\n") - 1
