"""Nuclei inpainting (eq. 1-2) on constructed and real images, and a tiny end-to-end run of stages 1, 3 and 4."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from wsiseg.adapt.inpaint import auxiliary_mask, haematoxylin_otsu, inpaint, inpaint_dir
from wsiseg.adapt.source import SourceConfig, prepare_source, read_pair, split_stems
from wsiseg.adapt.translate import CycleGANConfig, train_cyclegan, translate_dir
from wsiseg.core.errors import ConfigError, InputError

BG = (235, 205, 225)  # pink background
NUC = (95, 60, 150)  # haematoxylin-dark nucleus


def _disk(shape: tuple[int, int], c: tuple[int, int], r: int) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, c, r, 1, -1)
    return m.astype(bool)


@pytest.fixture()
def scene() -> dict:
    """128x128 synthetic H&E: 3 annotated nuclei (one drawn 1 px larger than its mask: a halo), 2 unannotated
    nuclei, one more unannotated nucleus touching an annotated one."""
    shape = (128, 128)
    img = np.zeros(shape + (3,), np.uint8)
    img[:] = BG
    labels = np.zeros(shape, np.int32)
    annotated = [((20, 20), 8), ((60, 30), 7), ((100, 100), 9)]
    for i, (c, r) in enumerate(annotated, 1):
        labels[_disk(shape, c, r)] = i
        img[_disk(shape, c, r + (1 if i == 3 else 0))] = NUC  # nucleus 3 renders with a 1-px halo
    free = [((30, 90), 7), ((95, 40), 6)]
    for c, r in free:
        img[_disk(shape, c, r)] = NUC
    touching = ((60 + 7 + 6, 30), 6)  # touches annotated nucleus 2
    img[_disk(shape, *touching)] = NUC
    free_mask = np.logical_or.reduce([_disk(shape, c, r) for c, r in free])
    return {"img": img, "labels": labels, "free": free_mask, "touching": _disk(shape, *touching)}


def test_constructed_case_removes_exactly_unannotated(scene: dict) -> None:
    img, labels, free, touching = scene["img"], scene["labels"], scene["free"], scene["touching"]
    fg = haematoxylin_otsu(img)
    assert np.array_equal(fg, np.all(img == NUC, axis=2))  # Otsu on H separates the two colours exactly

    out, aux = inpaint(img, labels)  # defaults: pixels mode, margin 2, Telea radius 3
    assert aux.dtype == bool and not (aux & (labels > 0)).any()
    near2 = cv2.dilate((labels > 0).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    assert np.array_equal(aux, (free | touching) & ~near2)  # free nuclei whole, the touching one less a 2-px strip
    assert np.array_equal(aux & ~touching, free)
    assert np.array_equal(out[~aux], img[~aux])  # annotated nuclei (and everything not in M_aux) untouched
    assert np.array_equal(out[labels > 0], img[labels > 0])
    filled = out[free].astype(float).mean(0)
    assert np.abs(filled - np.array(BG)).max() < 10  # the free nuclei became background
    assert not haematoxylin_otsu(out)[free].any()


def test_margin_and_component_modes(scene: dict) -> None:
    img, labels, free, touching = scene["img"], scene["labels"], scene["free"], scene["touching"]
    halo = np.all(img == NUC, axis=2) & (labels == 0) & ~free & ~touching  # the 1-px rim of nucleus 3
    assert halo.sum() > 0
    literal = auxiliary_mask(img, labels, mode="pixels", margin=0, min_area=0)  # eq. 1 as printed
    assert np.array_equal(literal, np.all(img == NUC, axis=2) & (labels == 0))
    assert (literal & halo).sum() == halo.sum()
    assert not (auxiliary_mask(img, labels, margin=2) & halo).any()
    comp = auxiliary_mask(img, labels, mode="components", margin=0)
    assert np.array_equal(comp, free)  # whole blobs not touching annotation; the touching nucleus stays
    with pytest.raises(ConfigError):
        auxiliary_mask(img, labels, mode="blobs")
    # a flat image has no Otsu foreground: nothing to inpaint, image returned unchanged
    flat = np.full_like(img, 200)
    out, aux = inpaint(flat, labels)
    assert not aux.any() and np.array_equal(out, flat)
    with pytest.raises(InputError):
        inpaint(img[..., 0], labels)
    with pytest.raises(InputError):
        inpaint(img, labels[:10])


def test_real_he_with_dropped_annotations(kumar_dir: Path) -> None:
    """A real H&E tile whose annotation lacks half of its nuclei stands in for a synthesised image with extra
    nuclei: inpainting must remove most Otsu foreground outside the kept annotation and leave annotated pixels."""
    name = "TCGA-21-5784-01Z-00-DX1"
    img = np.ascontiguousarray(tifffile.imread(kumar_dir / "images" / f"{name}.tif")[:256, :256])
    full = cv2.imread(str(kumar_dir / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)[:256, :256]
    ids = np.unique(full)[1:]
    dropped = ids[np.random.default_rng(0).random(len(ids)) < 0.5]
    kept = np.where(np.isin(full, dropped), 0, full)
    out, aux = inpaint(img, kept)
    assert np.array_equal(out[kept > 0], img[kept > 0])
    drop_mask = np.isin(full, dropped)
    before = haematoxylin_otsu(img)
    assert (aux & drop_mask & before).sum() > 0.9 * (drop_mask & before).sum()  # unannotated nuclei found
    # measured against the original image's threshold, foreground outside the annotation drops by over half
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    t = threshold_otsu(rgb2hed(img)[..., 0])
    after_fg = rgb2hed(out)[..., 0] > t
    outside = kept == 0
    assert (after_fg & outside).sum() < 0.5 * (before & outside).sum()


def test_inpaint_dir_keeps_raw_and_resumes(scene: dict, tmp_path: Path) -> None:
    src = tmp_path / "syn"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    for i in range(2):
        cv2.imwrite(str(src / "images" / f"{i:05d}.png"), cv2.cvtColor(scene["img"], cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(src / "labels" / f"{i:05d}.png"), scene["labels"].astype(np.uint16))
    raw_before = (src / "images" / "00000.png").read_bytes()
    out = inpaint_dir(src, tmp_path / "inp", progress=False)
    assert (src / "images" / "00000.png").read_bytes() == raw_before  # raw kept for the "w/o NI" ablation
    rgb, lab = read_pair(out / "images" / "00000.png", out / "labels")
    ref, ref_aux = inpaint(scene["img"], scene["labels"])
    assert np.array_equal(rgb, ref) and np.array_equal(lab, scene["labels"])
    assert np.array_equal(cv2.imread(str(out / "m_aux" / "00000.png"), cv2.IMREAD_UNCHANGED) > 0, ref_aux)
    rec = json.loads((out / "inpaint.json").read_text())
    assert rec["mode"] == "pixels" and rec["radius"] == 3 and rec["images_done_this_run"] == 2
    (out / "images" / "00001.png").unlink()
    inpaint_dir(src, out, progress=False)
    assert json.loads((out / "inpaint.json").read_text())["images_done_this_run"] == 1
    assert (out / "images" / "00001.png").is_file()
    with pytest.raises(ConfigError):
        inpaint_dir(src, src, progress=False)
    with pytest.raises(InputError):
        inpaint_dir(tmp_path / "empty", tmp_path / "x", progress=False)


def test_end_to_end_tiny(shared_data: Path, kumar_dir: Path, tmp_path: Path) -> None:
    """prepare_source on 2 BBBC039 images -> CycleGAN for a few iterations with Kumar crops as targets ->
    translate_dir -> inpaint_dir: every output present, readable and consistent."""
    bbbc = shared_data / "bbbc039"
    if not bbbc.is_dir():
        pytest.skip(f"real data not present: {bbbc}")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fake = tmp_path / "bbbc"
        (fake / "splits").mkdir(parents=True)
        (fake / "images").symlink_to(bbbc / "images")
        (fake / "masks").symlink_to(bbbc / "masks")
        (fake / "splits" / "train.txt").write_text("\n".join(split_stems(bbbc, "train")[:2]) + "\n")
        src = prepare_source(fake, tmp_path / "source", SourceConfig(n_crops=4, crop=128), progress=False)

        kumar = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])
        targets = [np.ascontiguousarray(kumar[y : y + 128, x : x + 128]) for y in (0, 500) for x in (0, 500)]
        cfg = CycleGANConfig(ngf=4, ndf=4, n_blocks=1, iterations=4, crop=128, checkpoint_every=2, log_every=1)
        gen = train_cyclegan(src, targets, tmp_path / "cyclegan", cfg, device="cpu", progress=False)
        syn = translate_dir(src, gen, tmp_path / "synth", device="cpu", progress=False)
        inp = inpaint_dir(syn, tmp_path / "synth_inpainted", progress=False)
    finally:
        torch.set_num_threads(n_threads)
    names = [f"{i:05d}.png" for i in range(4)]
    for d in (src, syn, inp):
        assert sorted(p.name for p in (d / "images").glob("*.png")) == names
        assert sorted(p.name for p in (d / "labels").glob("*.png")) == names
    for n in names:
        s_rgb, s_lab = read_pair(src / "images" / n, src / "labels")
        y_rgb, y_lab = read_pair(syn / "images" / n, syn / "labels")
        i_rgb, i_lab = read_pair(inp / "images" / n, inp / "labels")
        assert s_rgb.shape == y_rgb.shape == i_rgb.shape == (128, 128, 3)
        assert np.array_equal(s_lab, y_lab) and np.array_equal(s_lab, i_lab) and s_lab.max() >= 3
        aux = cv2.imread(str(inp / "m_aux" / n), cv2.IMREAD_UNCHANGED) > 0
        assert not (aux & (s_lab > 0)).any() and np.array_equal(i_rgb[~aux], y_rgb[~aux])
    assert (tmp_path / "cyclegan" / "cyclegan.yaml").is_file() and (tmp_path / "cyclegan" / "log.csv").is_file()
