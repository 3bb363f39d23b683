"""Stain measurements (wsiseg.wsi.stains): QuPath's colour deconvolution, per nucleus, from the pixels the model saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

import wsiseg
from wsiseg.segmenters.base import TileInstances
from wsiseg.wsi.stains import (EOSIN, HEMATOXYLIN, MEASUREMENTS, UNMIX, drop_holes, measure, optical_density,
                               stain_matrix, stain_stats, unmix, with_pixels)


def test_stain_matrix_is_qupaths_default_he():
    m = stain_matrix()
    assert np.allclose(np.linalg.norm(m, axis=1), 1.0)
    assert np.round(m[0], 3).tolist() == [0.651, 0.701, 0.290]  # as QuPath shows its "H&E default" vectors
    assert np.round(m[1], 3).tolist() == [0.216, 0.801, 0.558]
    assert np.allclose(m[2], np.cross(m[0], m[1]) / np.linalg.norm(np.cross(m[0], m[1])))
    assert np.allclose(m @ UNMIX, np.eye(3))
    assert (HEMATOXYLIN, EOSIN) == ((0.65, 0.70, 0.29), (0.2159, 0.8012, 0.5581))
    assert MEASUREMENTS == ("Hematoxylin: Mean", "Hematoxylin: Std.Dev.", "Eosin: Mean")


def test_unmixing_of_pixels_of_known_optical_density():
    """Pixels made of a known amount of one stain unmix to that amount of it and none of the other; white is no
    stain; optical density is QuPath's (-log10 of the intensity over 255, 0 taken as 1), and unmixing inverts
    mixing."""
    m = stain_matrix()
    assert optical_density(np.array([255, 0, 1], np.uint8)).tolist() == pytest.approx([0.0, np.log10(255),
                                                                                      np.log10(255)])
    amounts = np.array([0.2, 0.5, 0.9])
    for stain, other in ((0, 1), (1, 0)):
        od = amounts[:, None] * m[stain]  # pure hematoxylin (or eosin) of each amount
        rgb = np.clip(np.round(255 * 10.0 ** -od), 0, 255).astype(np.uint8)
        got = unmix(optical_density(rgb))
        assert got[:, stain] == pytest.approx(amounts, abs=0.03)  # (the pixel's 8-bit rounding)
        assert np.abs(got[:, other]).max() < 0.03
        assert (got[:, stain] > 0.15).all()
    assert np.abs(unmix(optical_density(np.full((2, 3), 255, np.uint8)))).max() == 0.0
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 2, (50, 3))
    assert unmix(s @ m) == pytest.approx(s)  # the inverse round-trips
    # a haematoxylin-blue pixel: more haematoxylin than eosin; an eosin-pink one: the other way round
    blue, pink = unmix(optical_density(np.array([[90, 60, 160], [240, 140, 200]], np.uint8)))
    assert blue[0] > 2 * max(blue[1], 0.1) and pink[1] > 2 * max(pink[0], 0.1)


def _reference(rgb: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The definition, one instance at a time."""
    out = np.zeros((n, 3))
    for k in range(1, n + 1):
        px = rgb[labels == k].astype(np.float64)
        if not len(px):
            continue
        od = -np.log10(np.maximum(px, 1) / 255.0)
        st = od @ np.linalg.inv(stain_matrix())
        out[k - 1] = st[:, 0].mean(), st[:, 0].std(), st[:, 1].mean()
    return out


def test_stats_per_instance_equal_the_definition_on_real_he(kumar_dir):
    """On a real Kumar tile with the bundled model's labels: the vectorised statistics equal the definition applied
    instance by instance; a run's prediction keeps the tile's pixels (:func:`with_pixels`) and :func:`measure` fills
    them in, row ``k - 1`` for instance ``k``."""
    from wsiseg.api import load_model

    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:256, :256, :3]
    inst = with_pixels(load_model("default", "cpu").predict)(img[None])[0]
    n = inst.count
    assert n > 20 and inst.stains.shape == (0, 3)  # (a segmenter need not measure them)
    want = _reference(img, inst.labels, n)
    got = stain_stats(img, inst.labels, n)
    assert got.shape == (n, 3) and got.dtype == np.float32
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert (got[:, 0] > 0).all() and (got[:, 1] >= 0).all()
    assert measure(inst) is inst and inst.pixels is None
    assert np.array_equal(inst.stains, got)
    assert inst.stain_row(1) == tuple(got[0].tolist()) and inst.stain_row(n + 1) is None
    # an instance with no pixel left (ids past the largest label) and a tile with none
    assert stain_stats(img, inst.labels, n + 2)[n:].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert stain_stats(img, np.zeros((256, 256), np.int32)).shape == (0, 3)
    assert TileInstances(inst.labels, inst.scores).stain_row(1) is None


def _labelled_tiles(kumar_dir, paths):
    """Every 384 px tile (stride 308) of the Kumar images ``paths`` with its human labels as the instances, each
    with the tile's pixels, as a run's tile comes to the stitcher."""
    from PIL import Image

    for path in paths:
        img = tifffile.imread(path)[..., :3]
        truth = np.asarray(Image.open(kumar_dir / "labels" / f"{path.stem}.png"))
        for y in range(0, 1000 - 384 + 1, 308):
            for x in range(0, 1000 - 384 + 1, 308):
                lab = np.unique(truth[y:y + 384, x:x + 384], return_inverse=True)[1].reshape(384, 384)
                yield TileInstances(lab, np.ones(int(lab.max()), np.float32), pixels=img[y:y + 384, x:x + 384])


def test_holes_are_dropped_and_every_labelled_nucleus_kept_on_real_he(kumar_dir):
    """:func:`drop_holes` on real H&E with the human labels as instances: in every 384 px tile of two Kumar images no
    labelled nucleus is a hole; a white disc cut into the tissue (a fat cell, a gap in collagen) and outlined as an
    instance is one, and the other instances keep their ids in order, their scores and stain rows."""
    from PIL import Image

    tiles = list(_labelled_tiles(kumar_dir, sorted((kumar_dir / "images").glob("*.tif"))[:2]))
    assert all(drop_holes(inst) is inst for inst in tiles)
    assert sum(inst.count for inst in tiles) > 1000
    # a white hole in the first tile's tissue, outlined between two labelled nuclei
    first = sorted((kumar_dir / "images").glob("*.tif"))[0]
    img = tifffile.imread(first)[:384, :384, :3].copy()
    truth = np.asarray(Image.open(kumar_dir / "labels" / f"{first.stem}.png"))
    lab = np.unique(truth[:384, :384], return_inverse=True)[1].reshape(384, 384).astype(np.int32)
    yy, xx = np.nonzero(lab == 0)
    cy, cx = yy[len(yy) // 2], xx[len(xx) // 2]
    disc = (np.hypot(*np.indices((384, 384)) - np.array([cy, cx])[:, None, None]) < 7) & (lab == 0)
    n = int(lab.max())
    k = int(lab[:cy].max())  # the hole's id lies among the others: ids after it move down by one
    lab = np.where(lab > k, lab + 1, lab)
    lab[disc] = k + 1
    img[disc] = 245
    scores = np.arange(1, n + 2, dtype=np.float32)
    stains = stain_stats(img, lab, n + 1)
    out = drop_holes(TileInstances(lab, scores, stains, img))
    assert out.count == n and out.labels.max() == n and not out.labels[disc].any()
    assert np.array_equal(out.labels > 0, (lab > 0) & ~disc)
    assert out.scores.tolist() == [s for s in scores.tolist() if s != k + 1]
    assert np.array_equal(out.stains, np.delete(stains, k, axis=0)) and out.pixels is img
    # without the tile's pixels (a segmenter's own result) nothing is judged
    bare = TileInstances(lab, scores)
    assert drop_holes(bare) is bare


def test_the_slides_level_and_its_faint_outlines_on_real_he(kumar_dir):
    """:func:`haematoxylin_level` leaves white out (a white tile adds nothing; only white: 0.0) and
    :func:`level_tiles` spreads at most ``LEVEL_TILES`` over a run's tiles. :func:`drop_faint` at ``FAINT_SHARE``
    times an image's level, on real H&E with the human labels as instances: on a dark image and on the palest
    development image (pale vesicular nuclei; its level under half the other's), at most 2% of the labelled nuclei
    are that faint; those dropped are exactly the ones under the cut, the rest keep their order, scores and stains."""
    from PIL import Image

    from wsiseg.wsi.stains import FAINT_SHARE, LEVEL_TILES, drop_faint, haematoxylin_level, level_tiles

    tiles = [(r, c) for r in range(30) for c in range(10)]
    picked = level_tiles(tiles)
    assert len(picked) == LEVEL_TILES and picked[0] == tiles[0] and picked[-1] == tiles[-1]
    assert picked == sorted(set(picked)) and level_tiles(tiles[:5]) == tiles[:5]
    white = np.full((64, 64, 3), 255, np.uint8)
    assert haematoxylin_level([white]) == 0.0 and haematoxylin_level([]) == 0.0
    levels = {}
    for name in ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-G9-6363-01Z-00-DX1"):
        path = kumar_dir / "images" / f"{name}.tif"
        if not path.is_file():
            pytest.skip(f"{path.name} absent")
        img = np.ascontiguousarray(tifffile.imread(path)[..., :3])
        levels[name] = level = haematoxylin_level([img[:500, :500], img[500:, 500:]])
        assert haematoxylin_level([img[:500, :500], white, img[500:, 500:]]) == level
        truth = np.asarray(Image.open(kumar_dir / "labels" / f"{name}.png"))
        lab = np.unique(truth, return_inverse=True)[1].reshape(truth.shape).astype(np.int32)
        n = int(lab.max())
        stains = stain_stats(img, lab, n)
        inst = TileInstances(lab, np.arange(1, n + 1, dtype=np.float32), stains)
        cut = FAINT_SHARE * level
        faint = stains[:, 0] < cut
        out = drop_faint(inst, cut)
        assert faint.sum() <= 0.02 * n and out.count == n - faint.sum()
        assert np.array_equal(out.scores, inst.scores[~faint]) and np.array_equal(out.stains, stains[~faint])
        assert drop_faint(inst, 0.0) is inst and drop_faint(TileInstances(lab, inst.scores), 1.0).count == n
    assert levels["TCGA-G9-6363-01Z-00-DX1"] < 0.5 * levels["TCGA-A7-A13E-01Z-00-DX1"]


def test_instances_on_marking_dye_are_dropped_and_every_labelled_nucleus_kept_on_real_he(kumar_dir):
    """:func:`drop_dye`: on real H&E with the human labels as instances (every 384 px tile of four Kumar images, the
    bluest nuclei of the development set among them) no labelled nucleus lies on dye; teal and green ink painted over
    two of them (a speck each, as a model outlines) are dropped, and the others keep their order, scores and stain
    rows. Without the tile's pixels nothing is judged."""
    from PIL import Image

    from wsiseg.wsi.stains import DYE_HUE, drop_dye, dye_instances

    names = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1", "TCGA-G9-6363-01Z-00-DX1"]
    paths = [kumar_dir / "images" / f"{name}.tif" for name in names]
    for path in paths:
        if not path.is_file():
            pytest.skip(f"{path.name} absent")
    tiles = list(_labelled_tiles(kumar_dir, paths))
    assert all(drop_dye(inst) is inst for inst in tiles)
    assert sum(inst.count for inst in tiles) > 2000
    img = tifffile.imread(kumar_dir / "images" / f"{names[0]}.tif")[:384, :384, :3].copy()
    truth = np.asarray(Image.open(kumar_dir / "labels" / f"{names[0]}.png"))
    lab = np.unique(truth[:384, :384], return_inverse=True)[1].reshape(384, 384).astype(np.int32)
    n = int(lab.max())
    inked = [3, n - 1]
    for k, ink in zip(inked, [(30, 140, 140), (40, 140, 80)]):  # teal, green (wsiseg.train.negatives.INKS)
        img[lab == k] = ink
    assert np.flatnonzero(dye_instances(img, lab, n)).tolist() == [k - 1 for k in inked]
    assert DYE_HUE[1] < 230  # haematoxylin's purple-blue lies above
    scores = np.arange(1, n + 1, dtype=np.float32)
    stains = stain_stats(img, lab, n)
    out = drop_dye(TileInstances(lab, scores, stains, img))
    kept = [k for k in range(1, n + 1) if k not in inked]
    assert out.count == n - 2 and out.scores.tolist() == [float(k) for k in kept]
    assert np.array_equal(out.labels > 0, np.isin(lab, kept)) and np.array_equal(out.stains, stains[np.array(kept) - 1])
    bare = TileInstances(lab, scores)
    assert drop_dye(bare) is bare


def test_the_dye_band_stays_clear_of_a_blue_slides_haematoxylin(kumar_dir):
    """:func:`slide_stain`'s dye band (:attr:`SlideStain.dye_top`) follows the slide's haematoxylin: on a Kumar image
    as it is, and on the bundled sample with its teal marking dye, it is the fixed band, to 210 degrees (within a
    degree); on the same Kumar image made bluer (every hue turned 45 and 60 degrees towards blue: nuclei as blue as
    the bluest labs'), the fixed band would take 20-100% of its labelled nuclei for dye and the slide's takes none,
    while it still takes green ink for dye (teal ink, hue 180, is then as close to its haematoxylin as the margin)."""
    from PIL import Image

    from wsiseg.io.slide import open_slide
    from wsiseg.wsi.stains import DYE_HUE, DYE_MARGIN, SlideStain, dye_instances, slide_stain

    name = "TCGA-A7-A13E-01Z-00-DX1"
    path = kumar_dir / "images" / f"{name}.tif"
    if not path.is_file():
        pytest.skip(f"{path.name} absent")
    img = np.ascontiguousarray(tifffile.imread(path)[..., :3])
    truth = np.asarray(Image.open(kumar_dir / "labels" / f"{name}.png"))
    lab = np.unique(truth, return_inverse=True)[1].reshape(truth.shape).astype(np.int32)
    n = int(lab.max())
    grid = [(r, c) for r in range(3) for c in range(3)]

    def stain(rgb, size=333):
        return slide_stain(lambda r, c: rgb[r * size:(r + 1) * size, c * size:(c + 1) * size], grid)

    assert DYE_HUE[1] - 1 <= stain(img).dye_top <= DYE_HUE[1] and DYE_MARGIN == 45
    assert not dye_instances(img, lab, n).any()
    for turn in (45, 60):
        bluer = _shift().hue_turned(img, -turn)  # (benchmarks/shift.py's blue shift, turned further)
        top = stain(bluer).dye_top
        assert 165 < top < DYE_HUE[1] - 20
        assert dye_instances(bluer, lab, n).sum() >= 0.2 * n
        assert not dye_instances(bluer, lab, n, SlideStain(dye_top=top)).any()
        inked = bluer.copy()
        inked[lab == 3] = (40, 140, 80)  # green (wsiseg.train.negatives.INKS), hue 144
        assert np.flatnonzero(dye_instances(inked, lab, n, SlideStain(dye_top=top))).tolist() == [2]
    with open_slide(str(Path(wsiseg.__file__).parent / "data" / "sample.svs")) as slide:
        rgb = np.ascontiguousarray(np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3])
    grid = [(r, c) for r in range(rgb.shape[0] // 384) for c in range(rgb.shape[1] // 384)]
    assert stain(rgb, 384).dye_top == DYE_HUE[1]


def test_grey_outlines_are_black_dye_and_no_labelled_nucleus_is_grey(kumar_dir):
    """:attr:`SlideStain.grey_below` (``GREY_SHARE`` of the slide's haematoxylin saturation): on three development
    images, as they are and with their haematoxylin at 0.6 of its amount (a pale lab), no labelled nucleus is that
    grey; black dye painted over two of them (a speck each) is, and those two alone are taken."""
    from PIL import Image

    from wsiseg.wsi.stains import GREY_SHARE, dye_instances, slide_stain

    hed_scaled = _shift().hed_scaled
    assert GREY_SHARE == 0.25
    grid = [(r, c) for r in range(3) for c in range(3)]
    for name in ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-G9-6363-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1"):
        path = kumar_dir / "images" / f"{name}.tif"
        if not path.is_file():
            pytest.skip(f"{path.name} absent")
        truth = np.asarray(Image.open(kumar_dir / "labels" / f"{name}.png"))
        lab = np.unique(truth, return_inverse=True)[1].reshape(truth.shape).astype(np.int32)
        n = int(lab.max())
        img = np.ascontiguousarray(tifffile.imread(path)[..., :3])
        stains = []
        for rgb in (img, hed_scaled(img, 0.6, 1.0)):
            stains.append(slide_stain(lambda r, c: rgb[r * 333:(r + 1) * 333, c * 333:(c + 1) * 333], grid))
            assert 0.05 < stains[-1].grey_below < 0.25
            assert not dye_instances(rgb, lab, n, stains[-1]).any()
        inked = img.copy()
        for k in (4, n - 2):
            inked[lab == k] = (32, 32, 34)  # black dye: near grey (saturation 0.06)
        assert np.flatnonzero(dye_instances(inked, lab, n, stains[0])).tolist() == [3, n - 3]


def _shift():
    """``benchmarks/shift.py`` as a module: its stain and hue shifts, the ones its benchmark scores."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import shift
    finally:
        sys.path.pop(0)
    return shift
