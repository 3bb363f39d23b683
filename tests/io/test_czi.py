"""Zeiss CZI slides (wsiseg.io.czi): written here by Zeiss's own library from the bundled slide's pixels, read as
every other slide is (its scenes' bounding rectangle as level 0, glass between them), and segmented into the
nuclei of the same pixels in a TIFF."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from wsiseg.io.slide import expand_inputs, open_slide

from helpers import crop_in, nuclei_of

pyczi = pytest.importorskip("pylibCZIrw.czi", reason="pylibCZIrw (wsiseg[czi]) absent")

#: where the crop lies in the CZI's plane (a ZEN mosaic's origin is anywhere), and a second scene's corner
ORIGIN, SCENE2 = (-1234, 567), (1800, 900)


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    return crop_in(tmp_path_factory.mktemp("czi"))


def _czi(path, rgb, mpp, scenes=((ORIGIN, None),), channels=1, grey=False):
    """``rgb`` written as a CZI (BGR, as ZEN writes brightfield) at each scene's corner (a scene's own pixels, or
    ``rgb``), ``mpp`` in its scaling; ``grey``: a scan of ``channels`` grey channels instead."""
    with pyczi.create_czi(str(path), exist_ok=True) as w:
        for k, (corner, pixels) in enumerate(scenes):
            data = rgb if pixels is None else pixels
            if grey:
                for c in range(channels):
                    w.write(np.ascontiguousarray(data[..., c]), location=corner, plane={"C": c}, scene=k)
            else:
                w.write(np.ascontiguousarray(data[..., ::-1]), location=corner, scene=k)
        w.write_metadata(document_name="test", scale_x=mpp * 1e-6, scale_y=mpp * 1e-6)
    return path


def test_a_czi_reads_as_a_slide_its_scenes_bounded_and_glass_between(crop):
    rgb, (h, w) = crop["rgb"], crop["rgb"].shape[:2]
    small = rgb[:200, :300]
    path = _czi(crop["dir"] / "two.czi", rgb, crop["mpp"], ((ORIGIN, None), (SCENE2, small)))
    assert [p.name for p in expand_inputs([crop["dir"]]) if p.suffix == ".czi"] == ["two.czi"]
    with open_slide(path) as s:
        assert (s.backend, s.format) == ("czi", "czi") and s.mpp == pytest.approx(crop["mpp"])
        assert s.dimensions == (SCENE2[0] + 300 - ORIGIN[0], max(h, SCENE2[1] + 200 - ORIGIN[1]))
        assert np.array_equal(s.read_region((0, 0), 0, (w, h)), rgb)
        dx, dy = SCENE2[0] - ORIGIN[0], SCENE2[1] - ORIGIN[1]
        assert np.array_equal(s.read_region((dx, dy), 0, (300, 200)), small)
        assert (s.read_region((w + 10, 10), 0, (100, 100)) == 255).all()  # (between the scenes: glass)
        assert s.properties["czi.scenes"] == [[0, 0, w, h], [dx, dy, 300, 200]]
        assert len(s.levels) >= 2 and s.levels[1].downsample == 4
        # (this file has no pyramid of its own: libCZI's zoom picks pixels, so the level has the slide's colours,
        # not the same pixels as an average)
        level1 = s.read_region((0, 0), 1, (w // 4, h // 4))
        assert level1.shape == (h // 4, w // 4, 3)
        assert np.abs(level1.reshape(-1, 3).mean(0) - rgb.reshape(-1, 3).mean(0)).max() < 3
        thumb, down = s.thumbnail(256)
        assert max(thumb.shape[:2]) == 256 and down == pytest.approx(max(s.dimensions) / 256)


def test_wsiseg_run_on_a_czi_finds_the_nuclei_of_its_pixels(crop):
    from wsiseg.api import segment_slide

    path = _czi(crop["dir"] / "one.czi", crop["rgb"], crop["mpp"])
    d = crop["dir"]
    segment_slide(path, geojson=d / "czi.geojson", progress=False)
    segment_slide(crop["tif"], geojson=d / "tif.geojson", progress=False)
    shapes = [nuclei_of(d / f"{n}.geojson") for n in ("czi", "tif")]
    assert len(shapes[0]) > 100 and shapes[0] == shapes[1]
    r = subprocess.run([sys.executable, "-m", "wsiseg", "info", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "format: czi" in r.stdout and f"microns per pixel: {crop['mpp']}"[:24] in r.stdout


@pytest.mark.parametrize("channels,says", [(2, "a fluorescence CZI (2 channels of Gray8)"),
                                           (1, "a greyscale CZI (one channel of Gray8)")])
def test_a_fluorescence_or_grey_czi_is_refused_in_one_line(crop, tmp_path, channels, says):
    """Grey pixels (a DAPI scan, say) are not H&E: the model would see them inverted."""
    path = _czi(tmp_path / "fl.czi", crop["rgb"][:256, :256], crop["mpp"], channels=channels, grey=True)
    r = subprocess.run([sys.executable, "-m", "wsiseg", "run", str(path), "--out", str(tmp_path / "o.geojson")],
                       capture_output=True, text=True)
    assert r.returncode == 3 and r.stderr.strip().splitlines() == [
        f"wsiseg: error: {path}: {says}; wsiseg segments colour brightfield (H&E) slides"]
    assert not (tmp_path / "o.geojson").exists()


def test_without_the_reader_a_czi_says_what_to_install(crop, tmp_path, monkeypatch):
    path = _czi(tmp_path / "x.czi", crop["rgb"][:256, :256], crop["mpp"])
    monkeypatch.setitem(sys.modules, "pylibCZIrw", None)  # (as on an installation without wsiseg[czi])
    from wsiseg.core.errors import InputError

    with pytest.raises(InputError, match=r"a Zeiss CZI slide: install the reader it needs with pip install "
                                         r"'wsiseg\[czi\]'"):
        open_slide(path)


def test_a_runs_header_gives_each_scene_where_qupath_puts_its_corner(crop):
    """QuPath opens each scene of a CZI as an image of its own: the header says where each lies in the run's frame,
    so a nucleus's outline less its scene's corner is where QuPath draws it in that scene."""
    from wsiseg.api import segment_slide
    from wsiseg.export.geojson import read_header

    rgb = crop["rgb"]
    path = _czi(crop["dir"] / "scenes.czi", rgb, crop["mpp"], ((ORIGIN, rgb[:512, :512]), (SCENE2, rgb[512:, 512:])))
    out = crop["dir"] / "scenes.geojson"
    segment_slide(path, geojson=out, model="watershed", progress=False)
    dx, dy = SCENE2[0] - ORIGIN[0], SCENE2[1] - ORIGIN[1]
    assert read_header(out)["czi_scenes"] == [[0, 0, 512, 512], [dx, dy, 512, 512]]
