"""Colour management (wsiseg.io.colour, --icc-profile): a slide's embedded ICC profile read by every reader, its
pixels converted to sRGB only when asked, and the model shown exactly the converted pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsiseg.core.errors import InputError
from wsiseg.io.colour import PRIMARIES, describe, matrix_profile, srgb_converter, stored_as
from wsiseg.io.slide import cached_slide, open_slide

from helpers import DICOM_CROP, dicomize, nuclei_of

#: a scanner storing Adobe RGB (1998) with a gamma of 1.8: its stored colours visibly off sRGB
SCANNER = matrix_profile(PRIMARIES["adobe"], gamma=1.8, description="test scanner")


def _srgb_encode(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.0031308, 12.92 * v, 1.055 * np.clip(v, 0, None) ** (1 / 2.4) - 0.055)


def _rgb_to_xyz(primaries) -> np.ndarray:
    xyz = lambda x, y: np.array([x / y, 1.0, (1 - x - y) / y])  # noqa: E731
    m = np.stack([xyz(*p) for p in primaries], 1)
    return m * np.linalg.solve(m, xyz(0.3127, 0.3290))


def test_a_written_profile_means_its_primaries_and_tone_curve():
    """Converted by LittleCMS, the profile's colours are those its numbers say, computed here independently:
    the tone curve undone, the primaries' matrix to XYZ (both spaces share the D65 white) and sRGB's own back."""
    convert = srgb_converter(SCANNER, "test")
    rng = np.random.default_rng(0)
    stored = rng.integers(40, 216, (64, 64, 3), dtype=np.uint8)
    to_srgb = np.linalg.solve(_rgb_to_xyz(PRIMARIES["srgb"]), _rgb_to_xyz(PRIMARIES["adobe"]))
    linear = (stored / 255.0) ** 1.8 @ to_srgb.T
    inside = np.all((linear > 0.001) & (linear < 0.999), -1)  # (out of sRGB's gamut: clipped, not compared)
    expected = _srgb_encode(linear) * 255
    got = convert(stored).astype(float)
    assert inside.mean() > 0.8
    assert np.abs(got - expected)[inside].max() <= 2.0
    assert np.abs(got.astype(int) - stored).max() > 20  # (a real change: the test would pass an identity otherwise)
    assert describe(SCANNER) == "test scanner"


def test_an_srgb_profile_converts_nothing_and_bad_ones_are_one_line_errors():
    from PIL import ImageCms

    assert srgb_converter(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(), "x") is None
    highdicom = pytest.importorskip("highdicom")
    v4 = Path(highdicom.__file__).parent / "_icc_profiles" / "sRGB_v4_ICC_preference.icc"
    if v4.is_file():  # (the v4 sRGB profile a DICOM converter inserts: relative colorimetric maps it to itself)
        assert srgb_converter(v4.read_bytes(), "x") is None
    with pytest.raises(InputError, match=r"^s\.tif: its ICC profile cannot be read") as e:
        srgb_converter(b"not a profile at all" * 10, "s.tif")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="its ICC profile is for Lab colours, not RGB: --icc-profile apply converts"):
        srgb_converter(ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes(), "s.tif")
    assert describe(None) is None and describe(b"junk") == "unreadable"
    from wsiseg.io.colour import colour_shift

    assert colour_shift(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()) == (0.0, 0)
    assert colour_shift(b"junk") is None and colour_shift(None) is None
    mean, most = colour_shift(SCANNER)
    assert 5 < mean < most


def _sample_crop() -> np.ndarray:
    from wsiseg.api import sample_slide

    with open_slide(sample_slide()) as s:
        return s.read_region(DICOM_CROP[:2], 0, DICOM_CROP[2:])


def _write_tiff(path: Path, rgb: np.ndarray, profile: bytes | None, mpp: float = 0.4990) -> Path:
    extra = [(34675, 7, len(profile), profile, True)] if profile is not None else []
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="zlib", photometric="rgb", resolutionunit="CENTIMETER",
                     resolution=(1e4 / mpp,) * 2, extratags=extra)
    return path


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A crop of the bundled slide as the test scanner stores it, in a tiled TIFF and a PNG that embed its profile,
    and its sRGB conversion in a TIFF that embeds none."""
    d = tmp_path_factory.mktemp("colour")
    crop = _sample_crop()
    raw = stored_as(crop, SCANNER)
    converted = srgb_converter(SCANNER, "test")(raw)
    from PIL import Image

    Image.fromarray(raw).save(d / "scan.png", icc_profile=SCANNER)
    return {"raw": raw, "converted": converted, "tif": _write_tiff(d / "scan.tif", raw, SCANNER),
            "png": d / "scan.png", "plain": _write_tiff(d / "converted.tif", converted, None), "dir": d}


@pytest.mark.parametrize("kind,backend", [("tif", "auto"), ("tif", "openslide"), ("png", "auto")])
def test_every_reader_finds_the_profile_and_converts_only_when_asked(scan, kind, backend):
    path = scan[kind]
    with open_slide(path, backend) as s:
        assert s.icc_profile == SCANNER and not s.icc_applied
        assert s.info()["icc_profile"] == "test scanner"
        assert np.array_equal(s.read_region((100, 200), 0, (300, 250)), scan["raw"][200:450, 100:400])
    with open_slide(path, backend, icc="apply") as s:
        assert s.icc_applied and s.backend == {"tif": "tiffslide", "png": "image"}.get(kind) if backend == "auto" \
            else s.backend == backend
        assert np.array_equal(s.read_region((100, 200), 0, (300, 250)), scan["converted"][200:450, 100:400])
        # (past the edge: white glass stays white, as sRGB's white is the profile's)
        assert (s.read_region((-20, -20), 0, (20, 20)) == 255).all()
    assert cached_slide(path, backend, "apply") is not cached_slide(path, backend, "ignore")
    assert cached_slide(path, backend, "apply").icc_applied


def test_apply_on_a_slide_without_a_profile_reads_it_as_stored(scan):
    with open_slide(scan["plain"], icc="apply") as s:
        assert s.icc_profile is None and not s.icc_applied and s.info()["icc_profile"] is None
        assert np.array_equal(s.read_region((0, 0), 0, (64, 64)), scan["converted"][:64, :64])
    with pytest.raises(Exception, match="icc_profile: expected one of ignore, apply"):
        open_slide(scan["plain"], icc="srgb")


def _features(path: Path) -> tuple[dict, list]:
    from wsiseg.export.geojson import read_header

    return read_header(path), nuclei_of(path)


def test_the_model_sees_exactly_the_converted_pixels(scan):
    """``--icc-profile apply`` on the stored slide gives the nuclei of its sRGB conversion, feature for feature, in
    the run's own thread and in a predicting process; read as stored they differ."""
    from wsiseg.api import segment_slide

    d = scan["dir"]
    segment_slide(scan["plain"], geojson=d / "plain.geojson", progress=False)
    segment_slide(scan["tif"], geojson=d / "apply.geojson", icc_profile="apply", progress=False)
    segment_slide(scan["tif"], geojson=d / "apply_pp.geojson", icc_profile="apply", predict_process=True,
                  progress=False)
    segment_slide(scan["tif"], geojson=d / "ignore.geojson", progress=False)
    head, plain = _features(d / "plain.geojson")
    assert len(plain) > 100 and "icc_profile" not in head
    for name in ("apply", "apply_pp"):
        head, feats = _features(d / f"{name}.geojson")
        assert feats == plain, name
        assert head["icc_profile"] == "test scanner"
    head, ignored = _features(d / "ignore.geojson")
    assert ignored != plain and "icc_profile" not in head


def test_the_command_line_takes_the_option_and_refuses_a_corrupt_profile_in_one_line(scan, tmp_path):
    bad = _write_tiff(tmp_path / "bad.tif", scan["raw"][:512, :512], b"\0" * 200)
    out = tmp_path / "bad.geojson"
    run = [sys.executable, "-m", "wsiseg", "run", str(bad), "--out", str(out), "--model", "watershed"]
    r = subprocess.run(run + ["--icc-profile", "apply"], capture_output=True, text=True)
    assert r.returncode != 0 and not out.exists()
    assert r.stderr.strip().splitlines() == [f"wsiseg: error: {bad}: its ICC profile cannot be read "
                                             f"({r.stderr.split('cannot be read (')[1].split(')')[0]})"]
    r = subprocess.run(run, capture_output=True, text=True)  # (read as stored, the profile is never parsed)
    assert r.returncode == 0 and out.exists(), r.stderr
    r = subprocess.run([sys.executable, "-m", "wsiseg", "info", str(scan["tif"])], capture_output=True, text=True)
    assert "ICC profile: test scanner" in " ".join(r.stdout.split())
    assert "applied, it moves colours by" in " ".join(r.stdout.split())  # (how much it matters, before a run)
    r = subprocess.run([sys.executable, "-m", "wsiseg", "info", str(scan["tif"]), "--json"], capture_output=True,
                       text=True)
    import json

    shift = json.loads(r.stdout)["icc_profile_shift"]
    assert 5 < shift["mean_levels"] < shift["max_levels"] <= 255
    r = subprocess.run([sys.executable, "-m", "wsiseg", "run", str(scan["plain"]), "--out", str(tmp_path / "p.geojson"),
                        "--model", "watershed", "--icc-profile", "apply"], capture_output=True, text=True)
    assert r.returncode == 0 and "embeds no ICC profile; its colours are read as stored" in r.stderr


def test_the_option_joins_the_runs_ids_only_when_set():
    from wsiseg.options import RunOptions

    assert "icc_profile" not in RunOptions().resume_params()
    assert RunOptions(icc_profile="apply").resume_params()["icc_profile"] == "apply"
    assert RunOptions.from_dict(RunOptions(icc_profile="apply").to_dict()).icc_profile == "apply"


def test_a_dicom_slides_profile_is_read_from_its_optical_path(scan, tmp_path):
    pytest.importorskip("wsidicomizer")
    dicomize(scan["tif"], tmp_path / "dcm")
    with open_slide(tmp_path / "dcm", icc="apply") as s:
        assert s.format == "dicom" and s.icc_profile == SCANNER and s.icc_applied
        assert np.array_equal(s.read_region((0, 0), 0, (256, 256)), scan["converted"][:256, :256])


def test_one_conversion_serves_many_reading_threads():
    from concurrent.futures import ThreadPoolExecutor

    convert = srgb_converter(SCANNER, "test")
    rng = np.random.default_rng(1)
    tiles = [rng.integers(0, 256, (384, 384, 3), dtype=np.uint8) for _ in range(24)]
    serial = [convert(t) for t in tiles]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert all(np.array_equal(a, b) for a, b in zip(pool.map(convert, tiles), serial))


def test_a_png_over_pillows_pixel_limit_keeps_its_profile(scan, monkeypatch):
    """wsiseg reads plain images whole up to 1 Gpx; Pillow's decompression-bomb check (179 Mpx) must not make the
    profile of a large one vanish (here the limit is lowered to below the test image's size)."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with open_slide(scan["png"], icc="apply") as s:
        assert s.icc_profile == SCANNER and s.icc_applied
        assert np.array_equal(s.read_region((0, 0), 0, (64, 64)), scan["converted"][:64, :64])


def test_a_run_resumes_only_with_the_same_choice(scan, tmp_path, monkeypatch):
    from wsiseg.api import segment_slide
    from wsiseg.core.errors import ConfigError

    from helpers import interrupting_sink

    monkeypatch.setenv("WSISEG_CHECKPOINT_SHARE", "1")  # (a checkpoint every tile row)
    kw = dict(model="watershed", tile_size=256)
    ref, out = tmp_path / "ref.geojson", tmp_path / "cut.geojson"
    segment_slide(scan["tif"], geojson=ref, icc_profile="apply", **kw)
    with pytest.raises(KeyboardInterrupt):
        segment_slide(scan["tif"], geojson=out, icc_profile="apply", sink=interrupting_sink(calls=12), **kw)
    assert (tmp_path / ".cut.geojson.wsiseg-resume" / "state.npz").is_file()  # (rows journalled)
    with pytest.raises(ConfigError, match="the interrupted run had icc_profile = 'apply', this one the default"):
        segment_slide(scan["tif"], geojson=out, resume=True, **kw)
    segment_slide(scan["tif"], geojson=out, icc_profile="apply", resume=True, **kw)
    assert out.read_bytes() == ref.read_bytes()
