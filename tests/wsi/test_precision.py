"""Precision on real slides: the white measures, the negatives the detector trains on, and the tissue mask's two
guards (no tile of glass read, no nucleus centred on glass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsiseg.eval.background import WHITE_GREY, WHITE_SAT, on_dye, on_pale, on_white, white_mask, white_report
from wsiseg.train.negatives import INKS, gaps, glass, ink, white_out
from wsiseg.segmenters.base import TileInstances
from wsiseg.wsi.grid import TileGrid, keep_in_tissue
from wsiseg.wsi.tissue import TissueMask


def _half_tissue(size: int = 512) -> np.ndarray:
    rgb = np.full((size, size, 3), 244, np.uint8)  # glass
    rgb[:, : size // 2] = (150, 80, 160)  # purple tissue on the left half
    return rgb


def test_on_white_and_the_report_on_a_constructed_image():
    rgb = _half_tissue()
    rgb[300:310, 400:410] = (200, 200, 200)  # a grey speck on the glass: grey < 215, not white
    lab = np.zeros((512, 512), np.int32)
    lab[10:20, 10:20] = 1  # on tissue
    lab[100:110, 300:310] = 2  # on glass
    lab[300:310, 400:410] = 3  # on the grey speck
    lab[200:220, 250:262] = 4  # straddling the edge: half of it on tissue, so its mean is not white
    white = on_white(rgb, lab)
    assert white.tolist() == [False, False, True, False, False]
    rep = white_report(rgb, lab, mpp=0.5, tile_px=128)
    assert rep["detections"] == 4 and rep["on_white"] == 1 and rep["share_on_white"] == 0.25
    # white pixels: the right half less the speck; mm^2 at 0.5 um/px
    assert rep["white_mm2"] == pytest.approx((512 * 256 - 100) * 0.25 / 1e6)
    assert rep["on_white_per_mm2"] == pytest.approx(1 / rep["white_mm2"])
    # 4 x 2 cells of 128 px on the right half are glass, less the one holding the speck (>= 99% white still: 100 px)
    assert rep["glass_tiles"] == 8
    assert rep["on_glass_tiles"] == 2  # the glass nucleus and the speck (its centre lies in a glass cell)
    assert white_report(rgb, np.zeros((512, 512), np.int32), 0.5, 128)["share_on_white"] == 0.0


def test_pale_detections_on_a_constructed_image():
    """Haematoxylin-stained instances are not pale; eosin-pink and a pale pink-grey gap are; glass is pale too but
    the report counts it as white, not pale; the measure is the GeoJSON's haematoxylin mean."""
    from wsiseg.wsi.stains import stain_stats

    colours = [(120, 60, 150), (70, 60, 140), (180, 150, 200), (230, 120, 170), (225, 200, 215), (244, 244, 244)]
    rgb = np.full((32, 20 * len(colours), 3), 244, np.uint8)  # haematoxylin x3; eosin; a pale stroma gap; glass
    lab = np.zeros(rgb.shape[:2], np.int32)
    for k, c in enumerate(colours):
        rgb[8:24, k * 20:k * 20 + 16] = c
        lab[8:24, k * 20:k * 20 + 16] = k + 1
    assert on_pale(rgb, lab).tolist() == [False, False, False, False, True, True, True]
    assert (stain_stats(rgb, lab)[:, 0] < 0.15).tolist() == on_pale(rgb, lab)[1:].tolist()
    rep = white_report(rgb, lab, mpp=0.5, tile_px=32)
    assert (rep["on_white"], rep["pale"]) == (1, 2) and rep["share_pale"] == pytest.approx(2 / 6)
    assert on_pale(rgb, np.zeros_like(lab)).tolist() == [False]


def test_on_marking_dye_on_a_constructed_image(shared_data):
    """Teal and green dye are dye; haematoxylin, eosin, red cells, glass and a grey speck are not; the measure is
    per instance (mean over its pixels) and counted by the report. No nucleus of a real Kumar image is on dye."""
    from skimage import io
    import tifffile

    rgb = np.full((64, 160, 3), 244, np.uint8)
    colours = [(30, 140, 140), (40, 140, 80), (120, 60, 150), (70, 60, 140), (230, 120, 170), (200, 40, 50),
               (244, 244, 244), (120, 120, 120)]  # teal, green ink; haematoxylin x2; eosin; red cell; glass; grey
    lab = np.zeros((64, 160), np.int32)
    for k, c in enumerate(colours):
        rgb[10:30, k * 20:k * 20 + 16] = c
        lab[10:30, k * 20:k * 20 + 16] = k + 1
    lab[40:60, 0:16] = 9  # half teal, half glass: mean still cyan (glass adds no hue), saturation lower
    rgb[40:50, 0:16] = (30, 140, 140)
    assert on_dye(rgb, lab).tolist() == [False, True, True, False, False, False, False, False, False, True]
    rep = white_report(rgb, lab, mpp=0.5, tile_px=32)
    assert rep["on_dye"] == 3 and rep["share_on_dye"] == pytest.approx(3 / 9)
    name = "TCGA-A7-A13E-01Z-00-DX1"
    img = tifffile.imread(shared_data / "kumar" / "images" / f"{name}.tif")[..., :3]
    truth = io.imread(shared_data / "kumar" / "labels" / f"{name}.png").astype(np.int32)
    assert not on_dye(img, truth).any()


def test_pseudo_labels_on_white_are_dropped_but_stay_in_the_image():
    from wsiseg.adapt.pseudo import drop_on_white

    rgb = _half_tissue()
    lab = np.zeros((512, 512), np.int32)
    lab[10:20, 10:20] = 1  # tissue
    lab[100:110, 300:310] = 2  # glass: dropped
    lab[50:60, 50:60] = 3  # tissue: becomes 2
    out = drop_on_white(rgb, lab)
    assert out.max() == 2 and np.array_equal(out == 1, lab == 1) and np.array_equal(out == 2, lab == 3)
    assert drop_on_white(rgb, out) is out  # nothing on white: unchanged


def test_pseudo_labels_far_paler_than_their_slide_are_dropped():
    """A slide of dark nuclei loses the pale blob (relative to the slide, across its tiles); a slide whose nuclei are
    all that pale keeps them; 0 is off."""
    from wsiseg.adapt.pseudo import drop_pale
    from wsiseg.wsi.stains import stain_stats

    def tile(colours):
        rgb = np.full((64, 64, 3), (230, 170, 200), np.uint8)  # pink stroma
        lab = np.zeros((64, 64), np.int32)
        for k, c in enumerate(colours, 1):
            rgb[4 + 12 * (k - 1):12 + 12 * (k - 1), 10:18] = c
            lab[4 + 12 * (k - 1):12 + 12 * (k - 1), 10:18] = k
        return rgb, lab

    dark, pale = (70, 40, 120), (225, 215, 228)
    rgbs, labs = zip(tile([dark, pale, dark]), tile([dark, dark]))
    before = [lab.copy() for lab in labs]
    h = stain_stats(rgbs[0], labs[0])[:, 0]
    assert h[1] < 0.25 * h[0]  # the blob is far paler than the nuclei
    out = drop_pale(list(rgbs), list(labs), 0.25)
    assert out[0].max() == 2 and np.array_equal(out[0] == 2, labs[0] == 3) and not (out[0][labs[0] == 2]).any()
    assert out[1] is labs[1]  # nothing pale there: unchanged
    assert all(np.array_equal(a, b) for a, b in zip(labs, before))  # the inputs are not changed
    pale_slide = tile([pale, pale, pale])
    assert drop_pale([pale_slide[0]], [pale_slide[1]], 0.25)[0] is pale_slide[1]
    assert drop_pale(list(rgbs), list(labs), 0.0)[0] is labs[0]


def test_pale_rule_keeps_a_real_slide_of_pale_nuclei(shared_data):
    """Kumar's pale prostate image (over half its labelled nuclei have a mean haematoxylin under 0.15): its labels,
    taken as a teacher's detections on its four 500-px quarters as one slide, lose almost none."""
    import tifffile
    from skimage import io

    from wsiseg.adapt.pseudo import drop_pale
    from wsiseg.eval.background import on_pale

    name = "TCGA-G9-6363-01Z-00-DX1"
    img = tifffile.imread(shared_data / "kumar" / "images" / f"{name}.tif")[..., :3]
    lab = io.imread(shared_data / "kumar" / "labels" / f"{name}.png").astype(np.int32)
    assert on_pale(img, lab)[1:].mean() > 0.5
    quarters = [(slice(y, y + 500), slice(x, x + 500)) for y in (0, 500) for x in (0, 500)]
    rgbs = [img[q] for q in quarters]
    labs = [lab[q] for q in quarters]
    before = sum(len(np.unique(t[t > 0])) for t in labs)
    after = sum(len(np.unique(t[t > 0])) for t in drop_pale(rgbs, labs, 0.25))
    assert after >= 0.98 * before


def test_white_mask_thresholds():
    rgb = np.array([[[WHITE_GREY + 1] * 3, [WHITE_GREY - 2] * 3, [250, 200, 250]]], np.uint8)
    assert white_mask(rgb).tolist() == [[True, False, False]]  # the last is bright but saturated (> WHITE_SAT)
    assert WHITE_SAT == 0.1


def test_glass_is_seeded_white_and_varied():
    a = glass(np.random.default_rng(3), 256)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, glass(np.random.default_rng(3), 256))
    crops = [glass(np.random.default_rng(s), 128) for s in range(40)]
    shares = [white_mask(c).mean() for c in crops]
    assert np.median(shares) > 0.9  # mostly white pixels: membranes, fibres and specks are thin
    means = [c.mean() for c in crops]
    assert max(means) - min(means) > 10  # tint and brightness vary from crop to crop


def test_white_out_removes_covered_nuclei_and_spares_the_rest(shared_data):
    import tifffile
    from skimage import io

    name = "TCGA-A7-A13E-01Z-00-DX1"
    img = tifffile.imread(shared_data / "kumar" / "images" / f"{name}.tif")[:256, :256, :3]
    lab = io.imread(shared_data / "kumar" / "labels" / f"{name}.png")[:256, :256].astype(np.int32)
    removed_any = False
    for seed in range(8):
        out, new = white_out(np.random.default_rng(seed), img, lab)
        assert out.shape == img.shape and new.shape == lab.shape
        kept = np.unique(new[new > 0])
        assert set(kept) <= set(np.unique(lab[lab > 0]))
        for k in kept:  # a nucleus that stays is whole, and its pixels are untouched
            assert np.array_equal(new == k, lab == k)
            assert np.array_equal(out[lab == k], img[lab == k])
        gone = set(np.unique(lab[lab > 0])) - set(kept)
        removed_any |= bool(gone)
        changed = np.abs(out.astype(int) - img.astype(int)).sum(2) > 30
        assert changed.any()  # glass was cut in
        assert white_mask(out)[changed].mean() > 0.5
    assert removed_any


def test_gaps_are_pale_nucleus_sized_and_leave_the_nuclei_and_labels_alone(shared_data):
    """Pale gaps on a real Kumar crop: the labels come back unchanged, no labelled nucleus or its 3 px margin is
    touched, what changed got paler, the gaps are nucleus-sized (no changed component wider than 2 x 14 px plus its
    blended edge), and a seed gives the same crop."""
    import tifffile
    from skimage import io
    from skimage.measure import label as components, regionprops

    name = "TCGA-A7-A13E-01Z-00-DX1"
    img = tifffile.imread(shared_data / "kumar" / "images" / f"{name}.tif")[256:512, 256:512, :3]
    lab = io.imread(shared_data / "kumar" / "labels" / f"{name}.png")[256:512, 256:512].astype(np.int32)
    before = img.copy()
    margin = np.zeros(lab.shape, bool)
    ys, xs = np.nonzero(lab)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            margin[np.clip(ys + dy, 0, 255), np.clip(xs + dx, 0, 255)] = True
    grey = lambda x: x.astype(float).mean(2)  # noqa: E731
    for seed in range(6):
        out, new = gaps(np.random.default_rng(seed), img, lab)
        assert np.array_equal(img, before) and np.array_equal(new, lab)
        again, _ = gaps(np.random.default_rng(seed), img, lab)
        assert np.array_equal(again, out) and out.dtype == np.uint8 and out.shape == img.shape
        assert np.array_equal(out[margin], img[margin])
        changed = np.abs(out.astype(int) - img.astype(int)).sum(2) > 30
        assert changed.any()
        assert (grey(out)[changed] > grey(img)[changed]).mean() > 0.95  # paler where cut in
        for region in regionprops(components(changed)):
            assert region.axis_major_length < 2 * 14 + 6


def test_ink_removes_covered_nuclei_keeps_the_rest_whole_and_is_seeded(shared_data):
    """Marking dye on a real Kumar crop: the labels only lose nuclei (those under the specks), each one that stays
    keeps its pixels, no speck lies on it (only the faint tint does), the dye is of an ink colour, and a seed gives
    the same crop."""
    import tifffile
    from skimage import io

    name = "TCGA-A7-A13E-01Z-00-DX1"
    img = tifffile.imread(shared_data / "kumar" / "images" / f"{name}.tif")[:256, :256, :3]
    lab = io.imread(shared_data / "kumar" / "labels" / f"{name}.png")[:256, :256].astype(np.int32)
    before = (img.copy(), lab.copy())
    removed_any = False
    inks = np.array(INKS, float)
    for seed in range(8):
        out, new = ink(np.random.default_rng(seed), img, lab)
        assert np.array_equal(img, before[0]) and np.array_equal(lab, before[1])  # inputs untouched
        again = ink(np.random.default_rng(seed), img, lab)
        assert np.array_equal(again[0], out) and np.array_equal(again[1], new)
        assert out.shape == img.shape and out.dtype == np.uint8 and new.shape == lab.shape
        kept = np.unique(new[new > 0])
        assert set(kept) <= set(np.unique(lab[lab > 0]))
        for k in kept:  # a nucleus that stays is whole and under no speck: at most the tint (opacity <= 0.3)
            assert np.array_equal(new == k, lab == k)
            assert np.abs(out[lab == k].astype(int) - img[lab == k].astype(int)).max() <= 0.3 * 255 + 1
        removed_any |= len(kept) < len(np.unique(lab[lab > 0]))
        changed = np.abs(out.astype(int) - img.astype(int)).sum(2) > 60
        assert changed.any()
        # the strongly changed pixels (specks) are nearer in colour to one of the inks than the pixels they replaced
        px, was = out[changed].astype(float), img[changed].astype(float)
        near = lambda x: np.min(np.linalg.norm(x[:, None] - inks[None], axis=2), 1)  # noqa: E731
        assert np.median(near(px)) < np.median(near(was))
    assert removed_any


def test_negative_crops_are_drawn_at_their_fraction(tmp_path, shared_data):
    """negative_fraction 1: every crop is empty glass, so the source does not matter; white_out and ink change the
    run; off they draw nothing (the run equals one without the settings)."""
    import tifffile

    from helpers import tiny_config
    from wsiseg.models.checkpoint import load_checkpoint
    from wsiseg.train.trainer import TrainConfig, TrainData, to_rgb_uint8, train

    img = to_rgb_uint8(tifffile.imread(shared_data / "samples" / "dsb2018_img2d.tif"))
    lab = tifffile.imread(shared_data / "samples" / "dsb2018_mask2d.tif").astype(np.int32)
    s1, s2 = (img[:256, :256], lab[:256, :256]), (img[256:, 256:], lab[256:, 256:])

    def run(name, src, **kw):
        cfg = TrainConfig(iterations=2, checkpoint_every=2, log_every=1, warmup_iters=0, optimizer="adamw", lr=1e-3,
                          **kw)
        return load_checkpoint(train(tiny_config(), cfg, TrainData([src]), tmp_path / name, device="cpu",
                                     progress=False)).state_dict

    equal = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert equal(run("n1", s1, negative_fraction=1.0), run("n2", s2, negative_fraction=1.0))
    base = run("base", s1)
    assert equal(base, run("off", s1, negative_fraction=0.0, white_out=0.0))
    assert not equal(base, run("wo", s1, white_out=1.0))
    assert not equal(base, run("gaps", s1, gaps=1.0))
    assert equal(base, run("ink0", s1, ink=0.0))
    assert not equal(base, run("ink", s1, ink=1.0))
    from wsiseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.ink"):
        TrainConfig(ink=1.5).validate()


def test_keep_in_tissue_drops_nuclei_centred_on_glass():
    grid = TileGrid(width=512, height=512, tile=256, overlap=64, scale=2.0)  # level 0 is 1024 px
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True  # tissue on the left half of level 0 (x < 512), 16 level-0 px per mask pixel
    tissue = TissueMask(mask, 16.0)
    lab = np.zeros((256, 256), np.int32)
    lab[10:20, 10:20] = 1  # tile (0, 1) starts at model x 192: level-0 x ~ 414, tissue
    lab[10:20, 100:110] = 2  # level-0 x ~ 594: glass
    lab[50:60, 60:70] = 3  # level-0 x ~ 514: glass, just
    lab[100:110, 40:50] = 4  # level-0 x ~ 474: tissue
    inst = TileInstances(lab, np.array([0.9, 0.8, 0.7, 0.6], np.float32))
    out = keep_in_tissue(inst, tissue, grid, 0, 1)
    assert out.count == 2 and out.scores.tolist() == pytest.approx([0.9, 0.6])
    assert np.array_equal(out.labels == 1, lab == 1) and np.array_equal(out.labels == 2, lab == 4)
    assert keep_in_tissue(inst, tissue, grid, 0, 0) is inst  # the left tile lies wholly on tissue: untouched
    empty = TileInstances.empty((256, 256))
    assert keep_in_tissue(empty, tissue, grid, 0, 1) is empty


def test_the_sample_has_no_nucleus_on_glass(tmp_path):
    """The bundled model on the bundled sample: fewer than 0.5% of its nuclei on white and none on a wholly blank
    tile; every nucleus is centred in the tissue mask (which excludes the glass around the tissue); the gaps in its
    dermal collagen hardly outlined (:func:`wsiseg.wsi.stains.drop_holes` and ``drop_faint``: 156 pale outlines
    without them, 9 with them); the teal marking dye at its torn edges hardly outlined (``drop_dye``: 50 outlines on
    dye without it, 2 with it, by the level-0 measure)."""
    from wsiseg.api import nuclei_labels, sample_slide, segment_slide
    from wsiseg.io.slide import open_slide
    from wsiseg.wsi.tissue import tissue_mask

    nuclei: list = []
    segment_slide(sample_slide(), model="default", sink=nuclei.extend)
    with open_slide(sample_slide()) as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)))[..., :3]
        mask = tissue_mask(slide)
    assert 0.3 < mask.fraction < 0.6
    assert not mask.contains(np.array([2100.0]), np.array([100.0]))[0]  # the blank glass at the top right
    centres = np.array([n.centroid for n in nuclei])
    assert mask.contains(centres[:, 0], centres[:, 1]).all()
    rep = white_report(rgb, nuclei_labels(nuclei, (h, w)), slide.mpp, int(round(256 * 0.25 / slide.mpp)))
    assert rep["detections"] > 2400  # not clean by finding little: the bundled model draws 2,461 (looked at)
    assert rep["share_on_white"] < 0.005 and rep["on_glass_tiles"] == 0 and rep["pale"] < 30, rep
    assert rep["on_dye"] <= 3, rep


def test_the_negatives_stage_takes_glass_tiles_from_outside_the_tissue(tmp_path):
    import cv2

    from wsiseg.adapt.target import TargetConfig, sample_background

    rng = np.random.default_rng(0)
    rgb = np.full((1024, 1024, 3), 244, np.uint8)
    rgb[:, :400] = rng.integers(60, 200, (1024, 400, 3))  # saturated, textured tissue on the left
    rgb[:, :400, 1] //= 2
    cv2.imwrite(str(tmp_path / "half.png"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "full.png"), np.ascontiguousarray(rgb[:, :400][..., ::-1]))
    cfg = TargetConfig(tile=128, mpp=0.25)
    n = sample_background([tmp_path / "half.png", tmp_path / "full.png"], tmp_path / "neg", cfg, 0.25, per_slide=5)
    files = sorted((tmp_path / "neg").glob("*.png"))
    assert n == len(files) == 5 and all(f.name.startswith("half_") for f in files)  # the all-tissue image has none
    for f in files:
        assert white_mask(cv2.imread(str(f))[..., ::-1]).mean() >= 0.95
    again = sample_background([tmp_path / "half.png"], tmp_path / "neg", cfg, 0.25, per_slide=5)
    assert again == 5 and sorted((tmp_path / "neg").glob("*.png")) == files  # deterministic, resumable


def test_the_tissue_mask_fills_small_holes_but_not_a_large_lumen(tmp_path):
    import cv2

    from wsiseg.io.slide import open_slide
    from wsiseg.wsi.tissue import tissue_mask

    rng = np.random.default_rng(1)
    rgb = np.full((2400, 2400, 3), 244, np.uint8)  # 600 um of glass at 0.25 um/px
    tissue = rng.integers(60, 200, (2000, 2000, 3)).astype(np.uint8)
    tissue[..., 1] //= 2
    rgb[200:2200, 200:2200] = tissue
    cv2.circle(rgb, (700, 700), 120, (244, 244, 244), -1)  # a 60 um gap: filled
    cv2.circle(rgb, (1500, 1500), 400, (244, 244, 244), -1)  # a 200 um lumen: stays out
    cv2.imwrite(str(tmp_path / "t.png"), rgb[..., ::-1])
    with open_slide(tmp_path / "t.png") as slide:
        mask = tissue_mask(slide)
    inside = mask.contains(np.array([700.0, 1500.0, 400.0, 50.0]), np.array([700.0, 1500.0, 1800.0, 50.0]))
    assert inside.tolist() == [True, False, True, False]  # gap, lumen, tissue, glass
    # the margin: 12 um (48 px) past the tissue's edge is in, 40 um (160 px) is out
    assert mask.contains(np.array([200.0 - 40, 200.0 - 160]), np.array([1000.0, 1000.0])).tolist() == [True, False]


def test_the_tissue_masks_otsu_is_scikit_images(shared_data):
    """The tissue mask's own Otsu threshold (no scikit-image import in a run's main process) is
    ``skimage.filters.threshold_otsu``'s, bit for bit: on the saturation of real H&E images and on random values."""
    import glob

    import cv2
    import tifffile
    from skimage.filters import threshold_otsu

    from wsiseg.wsi.tissue import otsu

    rng = np.random.default_rng(0)
    arrays = [rng.random((50, 70)).astype(np.float32), rng.integers(0, 256, (90, 100)).astype(np.float32) / 255,
              rng.integers(0, 7, (30, 30)).astype(np.float32) / 255,
              np.concatenate([rng.normal(0.05, 0.02, 500), rng.normal(0.4, 0.1, 300)]).astype(np.float32)]
    for p in sorted(glob.glob(str(shared_data / "kumar" / "images" / "*.tif")))[:4]:
        rgb = np.ascontiguousarray(tifffile.imread(p)[..., :3])
        arrays.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255.0)
    for a in arrays:
        assert otsu(a) == float(threshold_otsu(a))


def test_another_lab_s_image_gets_outlines_on_its_nuclei_only(shared_data):
    """An H&E image from another lab and scanner (the StarDist sample, 20x by its nuclei's size, unlabelled): nearly
    every outline of the bundled `default` lies mostly on a haematoxylin-dark blob (an object of the `watershed`, which
    takes every such blob), and it outlines most of the blobs the watershed finds (docs/precision.md, "Another lab's
    stain and scanner")."""
    import cv2

    from wsiseg.api import segment_image
    from wsiseg.segmenters.registry import load_model

    path = shared_data / "samples" / "he_histo.jpg"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    model = load_model("default")
    if not hasattr(model, "tile_size"):
        pytest.skip("the bundled default weights are absent (watershed fallback)")
    rgb = np.ascontiguousarray(cv2.imread(str(path))[..., ::-1])
    found = np.asarray(segment_image(rgb, model=model, mpp=0.5))
    blobs = np.asarray(segment_image(rgb, model="watershed", mpp=0.5))
    ids = np.unique(found)[1:]
    on_blob = np.array([(blobs[found == i] > 0).mean() > 0.5 for i in ids])
    assert on_blob.mean() >= 0.97  # 99.6% when written
    assert len(ids) >= 0.7 * (len(np.unique(blobs)) - 1)  # 279 against the watershed's 346 when written
