"""A slide out of focus (:mod:`wsiseg.segmenters.focus`): its nuclei's edges measured on real Kumar images as they are
and blurred, the rule, the unsharp mask, and runs that sharpen (the probe's choice, the warning, the header, the same
outputs with a predicting process of their own); a slide out of focus in parts: its blurred tiles predicted again,
sharpened, its sharp ones as they were."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from wsiseg.segmenters.focus import (BLURRED_FROM, SHARP_PX, TILE_BLURRED_FROM, TILE_NUCLEI, blurred_tiles,
                                     edge_widths, sharpen_px, tile_sharpening)
from wsiseg.segmenters.rcnn import unsharp

from helpers import probe_image

BREAST = "TCGA-A7-A13E-01Z-00-DX1"  # nuclei of the model's usual size
BLUR = 4.0  # px at 0.25 um/px: 1 um, clearly out of focus


def _image(kumar_dir: Path, name: str = BREAST) -> np.ndarray:
    return np.ascontiguousarray(tifffile.imread(kumar_dir / "images" / f"{name}.tif")[..., :3])


def _blurred(img: np.ndarray, sigma: float = BLUR) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def default_model():
    from wsiseg.api import load_model

    return load_model("default", "cpu")


@pytest.fixture(scope="module")
def blurred_tif(tmp_path_factory, kumar_dir) -> Path:
    """A 640 x 640 crop of the breast image blurred by 1 um, as a plain TIFF at 0.25 um/px."""
    p = tmp_path_factory.mktemp("blurred") / "blurred.tif"
    tifffile.imwrite(p, _blurred(_image(kumar_dir))[:640, :640], resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    return p


def test_edges_widen_with_the_blur_on_a_real_image(kumar_dir):
    """Measured on the labelled nuclei: the image as it is lies below the rule's threshold, and the median width
    grows with the blur past it; a nucleus cut by the image's border or paler than its surround is not measured."""
    from skimage import io

    img = _image(kumar_dir)
    labels = io.imread(kumar_dir / "labels" / f"{BREAST}.png").astype(np.int32)
    medians = [float(np.median(edge_widths(_blurred(img, s) if s else img, labels))) for s in (0, 2, 4)]
    assert medians[0] < BLURRED_FROM and medians[0] < medians[1] < medians[2] and medians[2] > BLURRED_FROM
    assert len(edge_widths(img, labels)) > 100
    flat = np.full((64, 64, 3), 200, np.uint8)
    disc = np.zeros((64, 64), np.int32)
    cv2.circle(disc, (32, 32), 8, 1, -1)
    assert len(edge_widths(flat, disc)) == 0  # no contrast: no width
    cut = np.zeros((64, 64), np.int32)
    cut[:10, 20:40] = 1
    img = np.repeat(np.where(cut[..., None] > 0, 60, 220), 3, axis=2).astype(np.uint8)
    assert len(edge_widths(img, cut)) == 0


def test_the_rule_sharpens_only_past_its_threshold():
    assert sharpen_px(None) == 0.0 and sharpen_px(SHARP_PX) == 0.0 and sharpen_px(BLURRED_FROM - 0.01) == 0.0
    assert 0 < sharpen_px(BLURRED_FROM) < sharpen_px(BLURRED_FROM + 1) and sharpen_px(float("nan")) == 0.0


def test_a_tile_looks_out_of_focus_from_its_own_median_with_enough_nuclei():
    wide, sharp = np.full(TILE_NUCLEI, TILE_BLURRED_FROM), np.full(TILE_NUCLEI, SHARP_PX)
    assert blurred_tiles([wide, sharp, wide, wide[:-1], np.zeros(0)]) == 2


def test_the_unsharp_mask_steepens_a_blurred_edge_and_stays_in_range():
    step = np.zeros((1, 3, 40, 48), np.float32)
    step[..., 24:] = 1.0
    soft = torch.from_numpy(cv2.GaussianBlur(step[0].transpose(1, 2, 0), (0, 0), 3.0).transpose(2, 0, 1)[None].copy())
    sharp = unsharp(soft.clone(), 3.0)
    assert sharp.shape == soft.shape and float(sharp.min()) >= 0.0 and float(sharp.max()) <= 1.0
    assert float(sharp[..., 1:].sub(sharp[..., :-1]).max()) > 1.5 * float(soft[..., 1:].sub(soft[..., :-1]).max())
    assert torch.equal(unsharp(soft.clone(), 0.0), soft)
    flat = torch.full((2, 3, 8, 8), 0.4)
    assert torch.allclose(unsharp(flat.clone(), 5.0), flat)  # (a tile narrower than 3 sigma mirrors what it has)


def test_the_probe_sharpens_a_blurred_image_and_not_a_sharp_one(kumar_dir, default_model):
    """The breast image blurred by 1 um: the probe finds its edges wide, the model sharpens its tiles from then on,
    and the run finds more of its nuclei than without; the same image as it is: nothing sharpened (and the model set
    back)."""
    from wsiseg.api import segment_image

    img = _image(kumar_dir)
    blurred = probe_image(default_model, _blurred(img))
    assert blurred.edge_px >= BLURRED_FROM and blurred.sharpen_px == sharpen_px(blurred.edge_px) > 0
    assert blurred.zoom == 1.0 and default_model.sharpen == blurred.sharpen_px
    assert "out of focus" in blurred.describe(0.25)
    sharp = probe_image(default_model, img)
    assert sharp.edge_px < BLURRED_FROM and sharp.sharpen_px == 0.0 and default_model.sharpen == 0.0
    assert "out of focus" not in sharp.describe(0.25)
    found = {z: int(segment_image(_blurred(img), default_model, mpp=0.25, zoom=z).max()) for z in ("auto", 1)}
    assert found["auto"] > 1.1 * found[1] and default_model.sharpen == 0.0  # (zoom 1: shown as it is)


def test_a_run_on_a_blurred_slide_warns_and_records_its_sharpening(tmp_path, blurred_tif, default_model):
    from wsiseg.api import segment_slide

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = segment_slide(blurred_tif, geojson=tmp_path / "b.geojson", model=default_model, batch_size=4)
    said = [str(w.message) for w in caught if "out of focus" in str(w.message)]
    assert len(said) == 1 and "blurred.tif" in said[0] and "sharpened" in said[0] and s.nuclei > 0
    head = json.loads((tmp_path / "b.geojson").read_text())["wsiseg"]
    assert head["zoom_probe"]["sharpen_px"] > 0 and head["zoom_probe"]["edge_px"] >= BLURRED_FROM
    assert s.table_row()["sharpened_um"] == s.sharpened_um == pytest.approx(head["zoom_probe"]["sharpen_px"] * 0.25,
                                                                             abs=1e-3)


@pytest.mark.slow
def test_a_predicting_process_sharpens_as_the_run_does(tmp_path, blurred_tif):
    """The predicting process starts before the probe; where the probe sharpens the slide, it is started again
    sharpening: the same outputs as a run without it."""
    from wsiseg.api import segment_slide

    kw = dict(model="default", device="cpu", batch_size=3, uuid_seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = segment_slide(blurred_tif, geojson=tmp_path / "ref.geojson", **kw)
        s = segment_slide(blurred_tif, geojson=tmp_path / "p.geojson", predict_process=True, **kw)
    assert s.nuclei == ref.nuclei > 0
    assert (tmp_path / "p.geojson").read_bytes() == (tmp_path / "ref.geojson").read_bytes()


def test_a_tile_is_sharpened_from_its_own_nuclei_at_the_zoom_it_is_shown(kumar_dir):
    """The breast image's labelled nuclei: sharp as it is, out of focus blurred by 1 um (sharpened by about the blur),
    too few nuclei to tell on a small crop; shown 2x larger its edges are twice as wide, which is not a blur at zoom
    2 but would be one at zoom 1."""
    from skimage import io

    img = _image(kumar_dir)
    labels = io.imread(kumar_dir / "labels" / f"{BREAST}.png").astype(np.int32)
    assert tile_sharpening(img, labels) == 0.0
    assert 0.6 * BLUR < tile_sharpening(_blurred(img), labels) < 1.6 * BLUR
    assert tile_sharpening(_blurred(img)[:60, :60], labels[:60, :60]) == 0.0  # (a handful of nuclei)
    big = cv2.resize(img[:500, :500], None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    big_labels = cv2.resize(labels[:500, :500], None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    assert tile_sharpening(big, big_labels, zoom=2.0) == 0.0 < tile_sharpening(big, big_labels, zoom=1.0)


@pytest.fixture(scope="module")
def half_blurred_tif(tmp_path_factory, kumar_dir) -> Path:
    """The breast image with its right half 1 um out of focus, a plain TIFF at 0.25 um/px."""
    img = _image(kumar_dir)
    img[:, 500:] = _blurred(img)[:, 500:]
    tif = tmp_path_factory.mktemp("half") / "half.tif"
    tifffile.imwrite(tif, img, resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    return tif


def _centres(path: Path) -> np.ndarray:
    feats = json.loads(path.read_text())["features"]
    return np.array([np.asarray(f["geometry"]["coordinates"][0]).mean(0) for f in feats])


def test_a_slide_blurred_in_parts_has_its_blurred_tiles_sharpened(tmp_path, half_blurred_tif, kumar_dir,
                                                                   default_model):
    """The median of its nuclei's edges stays under the slide's threshold, so the slide is not sharpened as a whole,
    but three of its nine tiles look out of focus on their own: every tile is checked, the blurred ones predicted
    again, sharpened. The run finds more nuclei in the blurred half than shown as it is (``--zoom 1``), the same ones
    in the sharp half, and says how many tiles it sharpened; the image as it is has no tile out of focus."""
    from wsiseg.api import segment_slide

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = segment_slide(half_blurred_tif, geojson=tmp_path / "h.geojson", model=default_model, batch_size=4)
        plain = segment_slide(half_blurred_tif, geojson=tmp_path / "p.geojson", model=default_model, batch_size=4,
                              zoom=1)
    assert not [w for w in caught if "out of focus" in str(w.message)]
    probe = json.loads((tmp_path / "h.geojson").read_text())["wsiseg"]["zoom_probe"]
    assert probe["blurred_tiles"] == 3 and probe["sharpen_px"] == 0.0 and probe["edge_px"] < BLURRED_FROM
    assert s.sharpened_um == 0 and s.refocused_tiles >= 2 and plain.refocused_tiles == 0
    assert s.table_row()["refocused_tiles"] == s.refocused_tiles and default_model.refocus == 0.0
    ours, theirs = _centres(tmp_path / "h.geojson"), _centres(tmp_path / "p.geojson")
    assert (ours[:, 0] > 600).sum() > 1.1 * (theirs[:, 0] > 600).sum()
    assert np.array_equal(ours[ours[:, 0] < 300], theirs[theirs[:, 0] < 300])
    assert probe_image(default_model, _image(kumar_dir)).blurred_tiles == 0


@pytest.mark.slow
def test_the_blurred_tiles_are_sharpened_alike_however_the_work_is_spread(tmp_path, half_blurred_tif):
    """The tiles a predicting process, or a predicting thread staging them for tile workers, sharpens come back
    marked so: the same outputs and count as a plain run."""
    from wsiseg.api import segment_slide

    kw = dict(model="default", device="cpu", batch_size=3, uuid_seed=3)
    ref = segment_slide(half_blurred_tif, geojson=tmp_path / "ref.geojson", tile_workers=0, prefetch=False, **kw)
    for name, spread in (("p", dict(predict_process=True)), ("t", dict(tile_workers=2, prefetch=True))):
        s = segment_slide(half_blurred_tif, geojson=tmp_path / f"{name}.geojson", **spread, **kw)
        assert s.refocused_tiles == ref.refocused_tiles > 0, name
        assert (tmp_path / f"{name}.geojson").read_bytes() == (tmp_path / "ref.geojson").read_bytes(), name


def test_a_large_slide_has_more_tiles_looked_at_for_focus(kumar_dir, default_model):
    """A 5 x 5 mosaic of the breast image (225 tiles) with the area of one tile blurred, one that the first look's 16
    tiles miss: that look finds no tile out of focus, the tiles looked at for focus alone (one per 100) find it, and
    every tile's focus is then checked; the mosaic as it is: the same tiles looked at, none out of focus."""
    import functools

    from wsiseg.io.slide import Slide
    from wsiseg.wsi.grid import plan_grid, read_tile
    from wsiseg.wsi.scale import FOCUS_EVERY, measure, probe, probe_tiles

    mosaic = np.tile(_image(kumar_dir), (5, 5, 1))
    grid = plan_grid(default_model, mosaic.shape[1::-1], 0.25)
    tiles = grid.tiles(None)
    first = probe_tiles(tiles)
    extra = probe_tiles([t for t in tiles if t not in set(first)], len(tiles) // FOCUS_EVERY)
    assert len(tiles) >= 2 * FOCUS_EVERY and len(extra) == len(tiles) // FOCUS_EVERY
    r, c = extra[0]
    y0, x0 = r * grid.stride, c * grid.stride
    blurred = mosaic.copy()
    area = np.s_[y0:y0 + grid.tile, x0:x0 + grid.tile]
    blurred[area] = _blurred(mosaic)[area]

    def look(img):
        slide = Slide.from_array(img, 0.25)

        def tiles_at(zoom):
            g = plan_grid(default_model, slide.dimensions, 0.25, zoom=zoom)
            return functools.partial(read_tile, slide, g), g.tiles(None)

        read, ts = tiles_at(1.0)
        return measure(default_model, read, ts, edges=True).blurred_tiles, probe(default_model, tiles_at)

    before, sharp = look(mosaic)
    assert before == 0 and sharp.focus_tiles == len(extra) and sharp.blurred_tiles == 0 and not sharp.refocus
    before, found = look(blurred)
    assert before == 0 and found.focus_tiles == len(extra) and found.blurred_tiles >= 1 and found.refocus
    assert found.sharpen_px == 0.0 and default_model.refocus == 1.0 and "every tile's focus" in found.describe(0.25)
