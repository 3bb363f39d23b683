"""Source preparation on real BBBC039: mask decoding, the <3-nuclei rule, inversion, alignment, resumability."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.measure import label as sk_label

from wsiseg.adapt.source import (
    SourceConfig,
    decode_bbbc_mask,
    prepare_source,
    read_bbbc_image,
    read_pair,
    split_stems,
)
from wsiseg.core.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def bbbc(shared_data: Path) -> Path:
    d = shared_data / "bbbc039"
    if not d.is_dir():
        pytest.skip(f"real data not present: {d}")
    return d


def _independent_count(mask_png: Path) -> int:
    """Count nuclei without the module: PIL-free read of the red channel, skimage label per colour value."""
    rgba = cv2.imread(str(mask_png), cv2.IMREAD_UNCHANGED)
    red = rgba[..., 2]
    return sum(int(sk_label(red == v, connectivity=1).max()) for v in (1, 2, 3))


def test_decode_counts_match_independent_count(bbbc: Path) -> None:
    stems = split_stems(bbbc, "train")[:4]
    for s in stems:
        lab = decode_bbbc_mask(bbbc / "masks" / f"{s}.png")
        assert lab.dtype == np.int32 and lab.shape == (520, 696)
        ids = np.unique(lab)
        assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, lab.max() + 1))  # contiguous 1..n
        assert lab.max() == _independent_count(bbbc / "masks" / f"{s}.png") > 0
        # each instance lies on a single colour value
        red = cv2.imread(str(bbbc / "masks" / f"{s}.png"), cv2.IMREAD_UNCHANGED)[..., 2]
        for i in range(1, lab.max() + 1, 17):
            assert len(np.unique(red[lab == i])) == 1


def test_decode_total_matches_published(bbbc: Path) -> None:
    total = sum(int(decode_bbbc_mask(p).max()) for p in sorted((bbbc / "masks").glob("*.png")))
    assert total == 23617  # the data README's figure over all 200 images


@pytest.fixture(scope="module")
def crops(bbbc: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SourceConfig]:
    out = tmp_path_factory.mktemp("src")
    cfg = SourceConfig(n_crops=24, seed=3)
    prepare_source(bbbc, out, cfg, split="train", progress=False)
    return out, cfg


def test_crops_rules_inversion_alignment(crops: tuple[Path, SourceConfig]) -> None:
    out, cfg = crops
    imgs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in imgs] == [f"{i:05d}.png" for i in range(24)]
    for p in imgs:
        rgb, lab = read_pair(p, out / "labels")
        raw_lab = cv2.imread(str(out / "labels" / p.name), cv2.IMREAD_UNCHANGED)
        assert raw_lab.dtype == np.uint16 and rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ids = np.unique(lab)
        n = int(lab.max())
        assert np.array_equal(ids, np.arange(n + 1))  # contiguous, background present
        assert n >= cfg.min_nuclei  # the <3-nuclei rule, on what is really in the crop
        areas = np.bincount(lab.ravel())[1:]
        assert areas.min() >= cfg.min_area
        g = rgb[..., 0].astype(float)
        # inversion: bright background, nuclei darker than background (image and labels aligned)
        assert np.median(g[lab == 0]) > 200
        assert g[lab > 0].mean() < g[lab == 0].mean() - 30
        # alignment at the instance level: nearly every nucleus is darker than its 3-px surrounding ring
        ring_darker = 0
        for i in range(1, n + 1):
            m = (lab == i).astype(np.uint8)
            ring = (cv2.dilate(m, np.ones((7, 7), np.uint8)) > 0) & (lab == 0)
            if ring.sum() >= 10 and g[m > 0].mean() < g[ring].mean():
                ring_darker += 1
        assert ring_darker >= 0.8 * n


def test_crops_are_augmented_and_deterministic(bbbc: Path, crops: tuple[Path, SourceConfig], tmp_path: Path) -> None:
    out, cfg = crops
    # resumable: delete two crops, rerun, they come back byte-identical; others untouched
    before = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    before_l = {p.name: p.read_bytes() for p in (out / "labels").glob("*.png")}
    (out / "images" / "00005.png").unlink()
    (out / "labels" / "00011.png").unlink()
    prepare_source(bbbc, out, cfg, split="train", progress=False)
    assert {p.name: p.read_bytes() for p in (out / "images").glob("*.png")} == before
    assert {p.name: p.read_bytes() for p in (out / "labels").glob("*.png")} == before_l
    # a different seed gives different crops
    prepare_source(bbbc, tmp_path, SourceConfig(n_crops=2, seed=4), progress=False)
    assert (tmp_path / "images" / "00000.png").read_bytes() != before["00000.png"]
    # no leftovers from atomic writes
    assert not list(out.rglob(".*.tmp"))


def _one_split(bbbc: Path, root: Path, split: str, stems: list[str]) -> Path:
    """A BBBC039 view whose ``split`` lists only ``stems`` (keeps the tests fast)."""
    (root / "splits").mkdir(parents=True)
    (root / "images").symlink_to(bbbc / "images")
    (root / "masks").symlink_to(bbbc / "masks")
    (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def test_no_augmentation_crop_equals_plain_crop(bbbc: Path, tmp_path: Path) -> None:
    """With rotation/flips off and zoom fixed at 1, a crop is an exact window of the inverted, normalised image."""
    stem = split_stems(bbbc, "train")[0]
    fake = _one_split(bbbc, tmp_path / "bbbc", "train", [stem])
    cfg = SourceConfig(n_crops=3, rotation=False, flips=False, scale_range=(1.0, 1.0), min_area=0, min_nuclei=0)
    prepare_source(fake, tmp_path / "out", cfg, progress=False)
    full = 255 - np.clip(np.rint(read_bbbc_image(bbbc / "images" / f"{stem}.tif", cfg)), 0, 255).astype(np.uint8)
    full_lab = decode_bbbc_mask(bbbc / "masks" / f"{stem}.png")
    for i in range(3):
        rgb, lab = read_pair(tmp_path / "out" / "images" / f"{i:05d}.png", tmp_path / "out" / "labels")
        g = rgb[..., 0]
        res = cv2.matchTemplate(full.astype(np.float32), g.astype(np.float32), cv2.TM_SQDIFF)
        y, x = np.unravel_index(int(res.argmin()), res.shape)
        assert np.array_equal(full[y : y + 256, x : x + 256], g)
        window = full_lab[y : y + 256, x : x + 256]
        assert np.array_equal(window > 0, lab > 0)  # labels follow the image exactly
        assert lab.max() == len(np.unique(window)) - 1  # every instance in the window, relabelled 1..n


def test_val_split_whole_images(bbbc: Path, tmp_path: Path) -> None:
    stems = split_stems(bbbc, "val")[:2]
    fake = _one_split(bbbc, tmp_path / "bbbc", "val", stems)
    prepare_source(fake, tmp_path / "out", SourceConfig(), split="val", progress=False)
    for i, s in enumerate(stems):
        rgb, lab = read_pair(tmp_path / "out" / "images" / f"{i:05d}.png", tmp_path / "out" / "labels")
        assert rgb.shape == (520, 696, 3)
        assert lab.max() == decode_bbbc_mask(bbbc / "masks" / f"{s}.png").max()


def test_errors(bbbc: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SourceConfig(crop=250)
    with pytest.raises(ConfigError):
        SourceConfig(normalise="zscore")
    with pytest.raises(InputError):
        prepare_source(tmp_path / "nope", tmp_path / "out", SourceConfig(n_crops=1), progress=False)
    with pytest.raises(InputError):
        prepare_source(bbbc, tmp_path / "out", SourceConfig(n_crops=1), split="nosuchsplit", progress=False)
    with pytest.raises(InputError):
        decode_bbbc_mask(tmp_path / "missing.png")
