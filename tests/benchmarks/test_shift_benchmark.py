"""``benchmarks/shift.py``: the shifts do what their names say on a real Kumar image, and the script scores them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data"))
KUMAR = SHARED / "kumar"

pytestmark = pytest.mark.skipif(not (KUMAR / "split.csv").is_file(), reason="Kumar data absent (../shared/data)")


@pytest.fixture(scope="module")
def shift():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import shift as module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.fixture(scope="module")
def crop():
    import tifffile

    name = sorted((KUMAR / "images").glob("*.tif"))[0]
    return np.ascontiguousarray(tifffile.imread(name)[:256, :256, :3])


def _haematoxylin(rgb):
    from wsiseg.wsi.stains import _haematoxylin as h

    return float(h(np.ascontiguousarray(rgb).reshape(-1, 3)).mean())


def test_stain_scaling_moves_the_stain_it_names(shift, crop):
    same = shift.hed_scaled(crop, 1.0, 1.0)
    assert same.dtype == np.uint8 and float(np.abs(same.astype(int) - crop).mean()) < 0.5  # round trip: nearly exact
    pale, dark = shift.hed_scaled(crop, 0.6, 1.0), shift.hed_scaled(crop, 1.5, 1.5)
    assert _haematoxylin(pale) < 0.8 * _haematoxylin(crop) < _haematoxylin(crop) < _haematoxylin(dark)


def test_a_20x_scan_is_the_image_blurred_and_compressed_at_its_own_size(shift, crop):
    from wsiseg.train.trainer import scanned_at_20x

    raw, jpeg = scanned_at_20x(crop, None), scanned_at_20x(crop, shift.JPEG_QUALITY)
    assert raw.shape == jpeg.shape == crop.shape and raw.dtype == np.uint8
    err_raw, err_jpeg = (float(np.abs(x.astype(int) - crop).mean()) for x in (raw, jpeg))
    assert 0 < err_raw < err_jpeg < 20  # detail lost, more with the compression; still the same image
    # Aperio's RGB JPEG (each plane at full resolution) at the same quality keeps the colour closer than YCbCr 4:2:0
    svs = scanned_at_20x(crop, shift.JPEG_QUALITY, rgb_jpeg=True)
    assert svs.shape == crop.shape and svs.dtype == np.uint8
    assert err_raw < float(np.abs(svs.astype(int) - crop).mean()) < err_jpeg


def test_restaining_as_the_sample_moves_the_image_to_the_sample_s_stain(shift, crop):
    lab = shift.macenko(shift.sample_tissue())
    out = shift.restain(crop, lab)
    assert out.shape == crop.shape and out.dtype == np.uint8
    assert not np.array_equal(out, crop)
    # normalising to the image's own stain keeps it close (what "none+norm" measures the cost of)
    back = shift.restain(crop, shift.macenko(crop))
    assert float(np.abs(back.astype(int) - crop).mean()) < float(np.abs(out.astype(int) - crop).mean())


def test_blue_turns_hues_and_a_tint_is_undone_by_balancing_it_with_its_glass(shift, crop):
    """``blue`` turns every hue 20 degrees towards blue, keeping saturation and brightness near; ``yellowed`` and
    ``bluish`` tint the image; ``S+wb`` (the image beside glass, balanced by it) brings a tint back to within a
    few grey levels of the image, and the untinted image beside glass is left as it is."""
    import cv2

    from wsiseg.wsi.stains import hue_saturation

    lab = np.ones(crop.shape[:2], np.int32)
    hue, _ = hue_saturation(crop, lab)
    bhue, _ = hue_saturation(shift.shifted(crop, "blue"), lab)
    assert float((hue[0] - bhue[0]) % 360) == pytest.approx(shift.BLUE_TURN, abs=2)
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(int)
    assert np.abs(cv2.cvtColor(shift.shifted(crop, "blue"), cv2.COLOR_RGB2GRAY).astype(int) - grey).mean() < 20
    for tint, channel in (("yellowed", 2), ("bluish", 0)):
        out = shift.shifted(crop, tint)
        assert out[..., channel].mean() < crop[..., channel].mean() - 5
        back = shift.shifted(crop, f"{tint}+wb")
        assert back.shape == crop.shape and np.abs(back.astype(int) - crop).mean() < 1.5
    np.testing.assert_array_equal(shift.shifted(crop, "none+wb"), crop)


def test_a_scanner_space_darkens_or_pales_the_image_and_its_profile_takes_it_back(shift, crop):
    linear, adobe = shift.shifted(crop, "linear"), shift.shifted(crop, "adobe")
    assert linear.mean() < crop.mean() - 20  # (linear values: mid-tones far darker)
    sat = lambda rgb: float((rgb.max(-1).astype(int) - rgb.min(-1)).mean())  # noqa: E731
    assert sat(adobe) < sat(crop) - 5  # (a wider gamut: the same colours less saturated in its numbers)
    for s in ("linear", "adobe"):
        back = shift.shifted(crop, s + "+icc")
        assert np.abs(back.astype(int) - crop).mean() < 1.0, s  # (a round trip through 8 bits)
    assert shift.parts("lab>linear+icc") == ["lab", "linear"]


def test_the_script_scores_each_shift_paired_against_the_image_as_it_is(tmp_path):
    out = tmp_path / "shift.json"
    r = subprocess.run([sys.executable, "benchmarks/shift.py", "--model", "watershed", "--images", "2", "--shifts",
                        "x20,lab+norm", "--out-json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert list(res["runs"]) == ["none", "x20", "lab+norm"]
    assert all(len(run["images"]) == 2 for run in res["runs"].values())
    for s in ("x20", "lab+norm"):
        p = res["paired"][s]["aji"]
        a = np.mean([row["aji"] for row in res["runs"]["none"]["images"]])
        b = np.mean([row["aji"] for row in res["runs"][s]["images"]])
        assert p["n"] == 2 and p["a"] == pytest.approx(a) and p["diff"] == pytest.approx(b - a)
    assert "| x20 |" in r.stdout and "| none |" in r.stdout
    long = sum(row["long_true"] for row in res["runs"]["none"]["images"])  # (the elongated nuclei found, per shift)
    assert long > 0 and f"of {long} |" in r.stdout
    # two models' runs compared on one shift (here a run with itself: no difference, no wins)
    r = subprocess.run([sys.executable, "benchmarks/paired.py", str(out), str(out), "--shift", "x20"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "aji" in r.stdout and "+0.0000" in r.stdout and "0/2" in r.stdout
    r = subprocess.run([sys.executable, "benchmarks/paired.py", str(out), str(out), "--shift", "pale"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no shift 'pale' here (it has: none, x20, lab+norm)" in r.stderr
    r = subprocess.run([sys.executable, "benchmarks/shift.py", "--shifts", "sepia"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown shift 'sepia'" in r.stderr
    r = subprocess.run([sys.executable, "benchmarks/shift.py", "--shifts", "lab>sepia"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown shift 'lab>sepia'" in r.stderr


def test_the_script_writes_another_lab_s_images_for_adapt(tmp_path, shift):
    """``--write DIR``: the shifted images as PNG files (what ``wsiseg adapt --target`` reads), the same pixels the
    scoring runs on, and nothing scored."""
    import tifffile
    from skimage import io

    r = subprocess.run([sys.executable, "benchmarks/shift.py", "--images", "1", "--shifts", "x20raw,pale,pale>x20raw",
                        "--write", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| none |" not in r.stdout  # nothing scored
    name = shift.dev_images(KUMAR)[0]
    rgb = tifffile.imread(KUMAR / "images" / f"{name}.tif")[..., :3]
    for s in ("none", "x20raw", "pale"):
        files = sorted((tmp_path / s).glob("*.png"))
        assert [f.stem for f in files] == [name]
        np.testing.assert_array_equal(io.imread(files[0]), shift.shifted(rgb, s))
    # one shift after another: another lab's stain, then its scanner
    both = io.imread(tmp_path / "pale>x20raw" / f"{name}.png")
    np.testing.assert_array_equal(both, shift.shifted(shift.shifted(rgb, "pale"), "x20raw"))
    assert not np.array_equal(both, shift.shifted(rgb, "x20raw"))
