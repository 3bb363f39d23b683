"""The scale a slide is shown to the model at (``--zoom``, :mod:`wsiseg.wsi.scale`): the rule, the probe on real
Kumar images with the bundled model, and runs at a zoom (coordinates and micrometres the slide's own, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsiseg.core.errors import ConfigError
from wsiseg.options import RunOptions
from wsiseg.wsi.scale import MAX_ZOOM, MIN_NUCLEI, ZOOM_FROM, Zoom, choose, diameters, probe, probe_tiles

from helpers import probe_image

KIDNEY = "TCGA-HE-7129-01Z-00-DX1"  # small crowded nuclei: the bundled model finds a third of them at 1x
BREAST = "TCGA-A7-A13E-01Z-00-DX1"  # nuclei of the model's usual size


def test_choose_shows_larger_only_where_the_nuclei_look_much_smaller():
    assert choose(23.0, 23.0) == 1.0
    assert choose(30.0, 23.0) == 1.0  # larger nuclei: never shown smaller
    assert choose(23.0 / (ZOOM_FROM - 0.01), 23.0) == 1.0  # within the dead zone
    assert choose(23.0 / ZOOM_FROM, 23.0) == pytest.approx(ZOOM_FROM)
    assert choose(15.0, 24.0) == 1.6
    assert choose(5.0, 24.0) == MAX_ZOOM
    assert choose(0.0, 24.0) == 1.0 and choose(15.0, 0.0) == 1.0


def test_diameters_and_whole_objects():
    lab = np.zeros((40, 40), np.int32)
    lab[10:20, 10:20] = 1  # 100 px inside
    lab[0:6, 30:36] = 2  # touches the top border
    lab[25:40, 0:3] = 3  # touches the left and bottom borders
    lab[30:32, 20:22] = 5  # (label 4 absent)
    assert diameters(lab).tolist() == pytest.approx(np.sqrt(4 * np.array([100, 36, 45, 4]) / np.pi).tolist())
    assert diameters(lab, whole=True).tolist() == pytest.approx(np.sqrt(4 * np.array([100, 4]) / np.pi).tolist())
    assert diameters(np.zeros((8, 8), np.int32), whole=True).size == 0


def test_probe_tiles_spread_over_the_tissue():
    tiles = [(r, c) for r in range(10) for c in range(10)]
    chosen = probe_tiles(tiles)
    assert len(chosen) == 16 and chosen[0] == (0, 0) and chosen[-1] == (9, 9)
    assert len(set(chosen)) == 16 and chosen == sorted(chosen)
    assert probe_tiles(tiles[:5]) == tiles[:5]


def test_options_take_auto_or_a_zoom_in_range():
    assert RunOptions().zoom == "auto" and RunOptions(zoom="AUTO").zoom == "auto"
    assert RunOptions(zoom="1.5").zoom == 1.5 and RunOptions(zoom=2).zoom == 2.0
    for bad in ("big", 0.1, 5, None):
        with pytest.raises(ConfigError, match="zoom"):
            RunOptions(zoom=bad)


def test_a_model_without_its_nucleus_size_keeps_the_slides_scale():
    """The watershed (no ``nucleus_px``): zoom 1 and nothing predicted (a reader that fails if called)."""
    from wsiseg.api import load_model

    def tiles_at(zoom):
        raise AssertionError("the probe asked for tiles")

    assert probe(load_model("watershed"), tiles_at) == Zoom()


@pytest.fixture(scope="module")
def default_model():
    from wsiseg.api import load_model

    seg = load_model("default", "cpu")
    assert seg.nucleus_px > 0  # the bundle carries its own nucleus size (scripts/nucleus_size.py)
    return seg


def _image(kumar_dir: Path, name: str) -> np.ndarray:
    return tifffile.imread(kumar_dir / "images" / f"{name}.tif")[..., :3]


def test_the_probe_on_real_images(kumar_dir, default_model):
    """The kidney image's nuclei look about 1.6x smaller than the model's own, and smaller still at that zoom: shown
    about 1.7x larger; the breast image's look their usual size: its own scale. The same image always gives the
    same zoom."""
    kidney = probe_image(default_model, _image(kumar_dir, KIDNEY))
    assert 1.5 <= kidney.zoom <= 1.9 and kidney.nuclei >= MIN_NUCLEI and kidney.tiles == 9
    assert kidney.median_px < default_model.nucleus_px / ZOOM_FROM and kidney.refined_px < kidney.median_px
    assert kidney.zoom == choose(kidney.refined_px, default_model.nucleus_px) > choose(kidney.median_px,
                                                                                       default_model.nucleus_px)
    assert probe_image(default_model, _image(kumar_dir, KIDNEY)) == kidney
    breast = probe_image(default_model, _image(kumar_dir, BREAST))
    assert breast.zoom == 1.0 and breast.refined_px is None and breast.median_px == pytest.approx(default_model.nucleus_px, rel=0.1)
    # a crop of glass: too few nuclei to measure
    glass = probe_image(default_model, np.full((600, 600, 3), 240, np.uint8))
    assert glass.zoom == 1.0 and glass.median_px is None and glass.nuclei < MIN_NUCLEI
    assert "not measured" in glass.describe(0.25) and "shown 1." in kidney.describe(0.25)


@pytest.fixture(scope="module")
def kidney_tif(tmp_path_factory, kumar_dir) -> Path:
    """A 640 x 640 crop of the kidney image as a plain TIFF at 0.25 um/px."""
    p = tmp_path_factory.mktemp("kidney") / "kidney.tif"
    tifffile.imwrite(p, _image(kumar_dir, KIDNEY)[:640, :640], resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    return p


def test_a_run_at_a_zoom_writes_in_the_slides_own_coordinates(tmp_path, kidney_tif, default_model):
    """``zoom="auto"`` shows the crop larger and finds more nuclei than at 1x; the outputs are those of the same run
    asked for that zoom (same bytes); polygons stay inside the image, and areas are the polygons' own, in um^2 at the
    slide's 0.25 um/px (not at the model's view of it)."""
    from wsiseg.api import segment_slide

    kw = dict(model=default_model, batch_size=4)
    auto = segment_slide(kidney_tif, geojson=tmp_path / "auto.geojson", **kw)
    assert auto.zoom > 1.3
    one = segment_slide(kidney_tif, geojson=tmp_path / "one.geojson", zoom=1, **kw)
    assert one.zoom == 1.0 and auto.nuclei > 1.3 * one.nuclei
    fixed = segment_slide(kidney_tif, geojson=tmp_path / "fixed.geojson", zoom=auto.zoom, **kw)
    a, f = (json.loads((tmp_path / n).read_text()) for n in ("auto.geojson", "fixed.geojson"))
    assert a["features"] == f["features"] and fixed.nuclei == auto.nuclei
    head = a["wsiseg"]
    assert head["zoom"] == auto.zoom and head["zoom_probe"]["zoom"] == auto.zoom and head["slide_mpp"] == 0.25
    assert f["wsiseg"]["zoom"] == auto.zoom and "zoom_probe" not in f["wsiseg"]
    for feat in a["features"]:
        ring = np.asarray(feat["geometry"]["coordinates"][0], float)
        assert ring.min() >= 0 and ring.max() <= 640 + 1 / auto.zoom  # (an outline traced on the last model pixels
        # may reach past the image's edge by up to one of them, as at any scale)
        x, y = ring[:, 0], ring[:, 1]
        area_px = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
        um2 = feat["properties"]["measurements"]["Area µm^2"]
        assert um2 == pytest.approx(area_px * 0.25 ** 2, rel=0.25, abs=2.0)
    # the nuclei are about as large at both scales (the same tissue): mean areas within a third of each other
    assert 0.67 < auto.mean_area_um2 / one.mean_area_um2 < 1.5


def test_an_interrupted_run_at_an_automatic_zoom_resumes(tmp_path, monkeypatch, kidney_tif, default_model):
    """Killed after two of its three tile rows, ``resume=True`` continues at the zoom the journal holds: the outputs
    are an uninterrupted run's."""
    from wsiseg.api import segment_slide
    from wsiseg.wsi.resume import journal_dir

    from helpers import StopAfter

    monkeypatch.setenv("WSISEG_CHECKPOINT_SHARE", "1")  # (a checkpoint every tile row)
    kw = dict(batch_size=3, uuid_seed=7)
    ref = segment_slide(kidney_tif, geojson=tmp_path / "ref.geojson", model=default_model, **kw)
    assert ref.tiles_total == 16
    out = tmp_path / "n.geojson"
    with pytest.raises(KeyboardInterrupt):
        # the probe's 4 tiles at the slide's own scale and 16 at the zoom, then 9 of the run's 16 (4 rows of 4)
        segment_slide(kidney_tif, geojson=out, model=StopAfter(default_model, 4 + 16 + 9), **kw)
    assert list(journal_dir(out).glob("ckpt-*.npz")) and not out.exists()
    s = segment_slide(kidney_tif, geojson=out, model=default_model, resume=True, **kw)
    assert s.zoom == ref.zoom > 1 and out.read_bytes() == (tmp_path / "ref.geojson").read_bytes()


def test_the_command_line_refuses_a_bad_zoom(tmp_path, capsys, kidney_tif):
    from wsiseg.cli.main import main

    for bad in ("big", "9"):
        assert main(["run", str(kidney_tif), "--out", str(tmp_path / "x.geojson"), "--zoom", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--zoom" in err and bad in err and "Traceback" not in err
    assert not (tmp_path / "x.geojson").exists()


@pytest.mark.slow
def test_a_predicting_process_started_before_the_zoom_is_started_again_at_it(tmp_path, kidney_tif):
    """With ``predict_process=True`` the process starts (at the slide's own scale) while the tissue mask is found;
    the zoom chosen after it starts it again at the zoom's grid: the same outputs as a run without it."""
    from wsiseg.api import segment_slide

    kw = dict(model="default", device="cpu", batch_size=3, uuid_seed=3)
    ref = segment_slide(kidney_tif, geojson=tmp_path / "ref.geojson", **kw)
    s = segment_slide(kidney_tif, geojson=tmp_path / "p.geojson", predict_process=True, **kw)
    assert s.zoom == ref.zoom > 1 and s.nuclei == ref.nuclei
    assert (tmp_path / "p.geojson").read_bytes() == (tmp_path / "ref.geojson").read_bytes()


def test_adapt_samples_a_target_at_its_zoom(tmp_path, kidney_tif, default_model):
    """``target.zoom``: ``wsiseg adapt``'s target stage reads each slide at the zoom its teacher's probe gives, so
    the kidney crop's tiles come from a grid as much larger; without it, at the slide's own scale. It needs a model
    teacher."""
    from wsiseg.adapt.config import load_config
    from wsiseg.adapt.target import TargetConfig, sample_target

    cfg = TargetConfig(tile=256, tiles_per_slide=100)
    plain = sample_target([kidney_tif], tmp_path / "plain", cfg, 0.25, progress=False)
    zoomed = sample_target([kidney_tif], tmp_path / "zoomed", cfg, 0.25, progress=False, zoom_model=default_model)
    grids = [{tuple(int(v) for v in p.stem.split("_")[-2:]) for p in (d / "images").glob("*.png")}
             for d in (plain, zoomed)]
    assert max(r for r, _ in grids[0]) == 2 and max(r for r, _ in grids[1]) >= 3  # 640 px; about 1,100 px at ~1.7x
    assert len(grids[1]) > 1.5 * len(grids[0])
    with pytest.raises(ConfigError, match="target.zoom"):
        load_config(None, ["target.zoom=true"])
