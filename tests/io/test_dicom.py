"""DICOM whole-slide images (wsiseg.io.dicom): a slide is a folder of files, one per pyramid level, label and
overview, named by their UIDs. The DICOM slides here are made from the real bundled slide by an independent writer
(wsidicomizer), as a hospital's converter would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import DICOM_CROP as CROP  # (the crop of the bundled slide the DICOM slides hold)
from helpers import crop_tiff, dicomize
from wsiseg.core.errors import InputError
from wsiseg.io.dicom import dicom_series, series_name
from wsiseg.io.slide import expand_inputs, open_slide, slide_label, slide_stem

wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer (the tests' DICOM writer) not installed")


def _not_a_slide(path: Path) -> Path:
    """A DICOM file that is no slide: a Secondary Capture image, as a PACS export holds beside slides."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory, svs_path) -> dict[str, Path]:
    """A lossless single-level DICOM slide and its TIFF source; a pyramidal JPEG one; the real slide itself, with
    its label, overview and thumbnail."""
    root = tmp_path_factory.mktemp("dicom")
    tif = crop_tiff(root / "crop.tif")
    dicomize(tif, root / "S1")
    dicomize(crop_tiff(root / "pyramid.tif", levels=3), root / "S2", lossless=False)
    dicomize(svs_path, root / "S3", lossless=False)
    return {"tif": tif, "lossless": root / "S1", "pyramid": root / "S2", "svs": root / "S3"}


def test_a_dicom_folder_is_one_slide_with_its_sources_pixels(made):
    folder = made["lossless"]
    (only,) = expand_inputs([folder])
    assert only.parent == folder.absolute() and only.suffix == ".dcm"
    assert slide_stem(only) == "S1" and slide_label(only) == "S1 (DICOM)"
    dicom, tif = open_slide(folder), open_slide(made["tif"])  # (the folder itself opens as its slide)
    assert dicom.backend == "openslide" and dicom.format == "dicom"
    assert dicom.dimensions == tif.dimensions == CROP[2:] and dicom.mpp == pytest.approx(tif.mpp)
    np.testing.assert_array_equal(dicom.read_region((100, 200), 0, (700, 500)),
                                  tif.read_region((100, 200), 0, (700, 500)))


def test_a_dicom_slides_regions_file_is_named_after_its_folder(made, tmp_path):
    """``--roi DIR``: a DICOM slide's regions file in the folder of them is named after the slide's folder, as its
    outputs are."""
    from wsiseg.io.regions import regions_file

    (only,) = expand_inputs([made["lossless"]])
    roi = tmp_path / "rois"
    roi.mkdir()
    (roi / "S1.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    assert regions_file(roi, only) == roi / "S1.geojson"


def test_every_file_of_a_slide_is_the_same_one_slide(made, svs_path):
    folder = made["svs"]
    files = sorted(folder.iterdir())
    assert len(files) == 4  # (its level, label, overview and thumbnail)
    (series,) = dicom_series(folder).values()
    assert series == files
    main = max(files, key=lambda f: f.stat().st_size)  # (its level, opened and fingerprinted for --resume)
    assert expand_inputs([folder]) == [main] and open_slide(folder).path == main
    assert {slide_stem(f) for f in files} == {"S3"}
    for f in files:
        s = open_slide(f)
        assert s.dimensions == open_slide(svs_path).dimensions and "label" in s.associated
    levels = open_slide(made["pyramid"]).levels
    assert [(lv.width, lv.height) for lv in levels] == [(1024, 1024), (512, 512), (256, 256)]


def test_a_folder_of_dicom_slides_and_other_files(made, tmp_path, svs_path):
    """A cohort: one folder per DICOM slide (one of them exported DICOMDIR-style, files without a suffix), a
    non-slide DICOM file, a slide file; and a folder holding two series."""
    cohort = tmp_path / "cohort"
    shutil.copytree(made["pyramid"], cohort / "CMU-1-pyramid")
    export = cohort / "IM-export"
    export.mkdir()
    for k, f in enumerate(sorted(made["lossless"].iterdir())):
        shutil.copy(f, export / f"IM{k:06d}")
    _not_a_slide(export / "IM999999")
    _not_a_slide(cohort / "report.dcm")
    shutil.copy(svs_path, cohort / "CMU-1.svs")
    (cohort / "empty").mkdir()
    cut = cohort / "cut-short"  # (a download that stopped: OpenSlide cannot open its files)
    cut.mkdir()
    for f in sorted(made["pyramid"].iterdir()):
        (cut / f.name).write_bytes(f.read_bytes()[:2000])
    found = expand_inputs([cohort])
    assert [slide_stem(f) for f in found] == ["CMU-1-pyramid", "CMU-1", "IM-export", "cut-short"]  # (by path)
    assert found[2] == export.absolute() / "IM000000"
    with pytest.raises(InputError, match="OpenSlide cannot open it"):  # (one slide, one error)
        open_slide(found[3])
    assert slide_stem(export / "IM999999") == "IM999999"  # (a file of no slide keeps its own name)
    with pytest.raises(InputError, match="no slide or image files"):
        expand_inputs([tmp_path / "cohort" / "empty"])

    two = tmp_path / "two"
    shutil.copytree(made["pyramid"], two)
    for f in made["lossless"].iterdir():
        shutil.copy(f, two / f.name)
    series = dicom_series(two)
    assert len(series) == 2
    assert sorted(slide_stem(f) for f in expand_inputs([two])) == sorted(series)  # named by their series UIDs
    assert {series_name(f) for files in series.values() for f in files} == set(series)
    with pytest.raises(InputError, match="holds 2 DICOM slides"):
        open_slide(two)


def test_slides_nested_as_a_download_lays_them_out(made, tmp_path):
    """The Imaging Data Commons' ``idc download`` puts each slide four folders down (collection, patient, study,
    ``SM_<SeriesInstanceUID>``): every one is found, once, named after its own folder, not after a link to it
    ("by-name/A-alias" sorts before "tcga_skcm/..."). A link back up the tree is followed once; hidden folders and
    zarr stores (a run's outputs beside its inputs) are not searched."""
    root = tmp_path / "idc"
    a = root / "tcga_skcm" / "TCGA-A" / "1.2.3" / "SM_1.2.3.4"
    b = root / "tcga_skcm" / "TCGA-B" / "1.2.5" / "SM_1.2.5.6"
    shutil.copytree(made["lossless"], a)
    shutil.copytree(made["pyramid"], b)
    (root / "tcga_skcm" / "TCGA-A" / "loop").symlink_to(root, target_is_directory=True)
    (root / "by-name").mkdir()
    (root / "by-name" / "A-alias").symlink_to(a, target_is_directory=True)  # (searched after the real folders)
    for hidden in (root / ".cache" / "S", root / "out.zarr" / "S"):
        shutil.copytree(made["pyramid"], hidden)
    found = expand_inputs([root])
    assert [f.parent for f in found] == [a.absolute(), b.absolute()]
    assert [slide_stem(f) for f in found] == ["SM_1.2.3.4", "SM_1.2.5.6"]


@pytest.mark.slow
def test_wsiseg_run_on_a_dicom_folder_gives_the_nuclei_of_its_source(made, tmp_path):
    """`wsiseg run FOLDER`: the nuclei of the same pixels in a TIFF, and outputs and messages named after it."""
    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wsiseg", "run", *map(str, args), "--quiet"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    a = run(made["tif"], "--out", tmp_path / "tif.geojson")
    b = run(made["lossless"], "--out", tmp_path / "dicom.geojson")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert b.stdout.startswith("S1 (DICOM): ")
    fa, fb = (json.loads((tmp_path / f"{n}.geojson").read_text())["features"] for n in ("tif", "dicom"))
    assert len(fa) > 300
    assert [{k: v for k, v in f.items() if k != "id"} for f in fa] == [
        {k: v for k, v in f.items() if k != "id"} for f in fb]

    cohort = tmp_path / "cohort"
    shutil.copytree(made["lossless"], cohort / "S1")
    c = run(cohort, "--out-dir", tmp_path / "out")
    assert c.returncode == 0, c.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["S1.geojson"]
