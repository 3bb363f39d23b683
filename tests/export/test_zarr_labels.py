"""The OME-Zarr output (issue 28): valid under an independent validator (ome-zarr-models), read as napari's OME-Zarr
plugin reads it, sharded into few files, and with the slide's pixels on the labels' grid when asked (--zarr-image)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsiseg.cli import main
from wsiseg.export.zarr_labels import SHARD_CHUNKS, ZarrLabelWriter, read_zarr_labels
from wsiseg.wsi.stitch import Nucleus, paint_polygon


def _squares(shape: tuple[int, int], step: int = 16, side: float = 12.0) -> list[np.ndarray]:
    """Square nuclei covering the whole image, in raster order (every chunk of every level holds labels)."""
    sq = np.array([[0.5, 0.5], [side + 0.5, 0.5], [side + 0.5, side + 0.5], [0.5, side + 0.5]])
    return [sq + [x, y] for y in range(0, shape[0], step) for x in range(0, shape[1], step)]


def _nuclei(polys: list[np.ndarray]) -> list[Nucleus]:
    return [Nucleus(p, 1.0, 1.0, 1.0, 1.0, (0.0, 0.0), (0.0, 0.0, 1.0, 1.0)) for p in polys]


def _write(path: Path, shape: tuple[int, int], polys: list[np.ndarray], rows: int = 256, **kw) -> ZarrLabelWriter:
    """Paint ``polys`` (raster order) a band of ``rows`` at a time, flushing above the next band, as a run does."""
    with ZarrLabelWriter(path, shape, 0.25, **kw) as zw:
        label, i = 1, 0
        for y in range(0, shape[0], rows):
            band = []
            while i < len(polys) and polys[i][:, 1].min() < y + rows:
                band.append(polys[i])
                i += 1
            zw.write(_nuclei(band), label)
            label += len(band)
            zw.flush_above(y + rows - 20)
    return zw


def _files(path: Path) -> int:
    return sum(len(f) for _, _, f in os.walk(path))


def _checkerboard_reader(x: int, y: int, w: int, h: int) -> np.ndarray:
    """A synthetic slide's level-0 pixels: no two neighbouring pixels alike, so no chunk of any level is empty."""
    yy, xx = np.mgrid[y:y + h, x:x + w]
    v = ((xx * 7 + yy * 13) % 251).astype(np.uint8)
    return np.stack([v, 255 - v, (v // 2).astype(np.uint8)], -1)


# ------------------------------------------------------------------------------------------------ validation
def test_store_validates_with_ome_zarr_models(tmp_path):
    """The default store (overview stand-in) is valid OME-Zarr 0.5 under ome-zarr-models: the image has as many
    levels as its label image, on the same grid (same shapes and scales), the pyramids' "type" recorded. The layout
    before issue 28 (a one-level overview above a 5-level label pyramid) is what the validator rejected."""
    ozm = pytest.importorskip("ome_zarr_models", reason="ome-zarr-models (the test extra) is not installed")
    import zarr
    from ome_zarr_models.v05.image import Image

    shape = (1300, 900)
    overview = np.full((325, 225, 3), 200, np.uint8)
    z = tmp_path / "n.zarr"
    _write(z, shape, _squares(shape, step=40), overview=(overview, 4.0), min_size=100)
    model = ozm.open_ome_zarr(str(z))
    assert isinstance(model, Image)
    (ms,) = model.ome_attributes.multiscales
    label = model.labels.get_image_labels_group("nuclei")
    (lms,) = label.ome_attributes.multiscales
    assert len(ms.datasets) == len(lms.datasets) == 5
    assert ms.type == "local_mean" and lms.type == "nearest"
    g = zarr.open_group(str(z), mode="r")
    for d, ld in zip(ms.datasets, lms.datasets):
        assert list(d.coordinateTransformations[0].scale[1:]) == list(ld.coordinateTransformations[0].scale)
        assert g[d.path].shape[1:] == g["labels/nuclei"][ld.path].shape
    # the stand-in: the levels at most 2x finer than the overview (downsample 2, 4, 8, 16) hold it; level 0 no file
    assert not (z / "0" / "c").exists() and np.all(g["0"][:, :4, :4] == 255)
    assert np.all(g["2"][...] == 200)
    # the old layout, rebuilt: the validator says why it is not OME-Zarr
    attrs = dict(g.attrs["ome"])
    attrs["multiscales"] = [dict(attrs["multiscales"][0], datasets=attrs["multiscales"][0]["datasets"][2:3])]
    zarr.open_group(str(z), mode="r+").attrs["ome"] = attrs
    with pytest.raises(Exception, match="Number of image label multiscale levels"):
        Image.from_zarr(zarr.open_group(str(z), mode="r"))


def test_sharded_labels_equal_painting_one_by_one_across_shards(tmp_path):
    """Small chunks, so each row of chunks spans several shards: the labels (and every pyramid level) equal the
    polygons painted one by one, when the run flushes as it goes and when chunks are flushed early and painted
    again after their shard was written (then written on their own, merged into the shard by zarr)."""
    rng = np.random.default_rng(28)
    shape = (200, 1500)  # chunk 16: shards of 16 x 512 px, 3 per row
    polys = []
    for _ in range(1500):
        c = rng.uniform([-10, -10], [1510, 210])
        n = int(rng.integers(3, 12))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(2, 9, n)
        polys.append(np.round((c + np.stack([np.cos(ang), np.sin(ang)], 1) * r[:, None]) * 2) / 2)
    polys.sort(key=lambda p: p[:, 1].min())
    ref = np.zeros(shape, np.int32)
    for k, p in enumerate(polys, start=1):
        paint_polygon(ref, p, k)
    z = tmp_path / "rows.zarr"
    zw = _write(z, shape, polys, rows=40, chunk=16, min_size=20)
    assert not zw.pyramid_rebuilt
    for level in range(5):
        assert np.array_equal(read_zarr_labels(z, level).astype(np.int32), ref[::2 ** level, ::2 ** level]), level
    import zarr

    assert zarr.open_array(str(z / "labels" / "nuclei" / "0"), mode="r").shards == (16, 16 * SHARD_CHUNKS)
    z = tmp_path / "early.zarr"  # flushed far ahead of the painting: shards written, then painted again
    with ZarrLabelWriter(z, shape, 0.25, chunk=16, min_size=20) as zw:
        s = 0
        for n in (7, 300, 0, 500, 693):
            zw.write(_nuclei(polys[s:s + n]), s + 1)
            s += n
            zw.flush_above(200 if s < len(polys) else None)
    assert zw.pyramid_rebuilt
    for level in range(5):
        assert np.array_equal(read_zarr_labels(z, level).astype(np.int32), ref[::2 ** level, ::2 ** level]), level


# ------------------------------------------------------------------------------------------------ file count
def test_a_whole_6000_px_slide_is_few_files(tmp_path):
    """Sharding: a 6000 x 6000 slide whose every chunk holds labels and pixels (--zarr-image) is one file per shard
    (a row of chunks, SHARD_CHUNKS wide) and per metadata document: 65 files, where one file per 512 px chunk was
    206 for the labels alone."""
    shape = (6000, 6000)
    z = tmp_path / "big.zarr"
    _write(z, shape, _squares(shape), image_reader=_checkerboard_reader)
    level_rows = [12, 6, 3, 2, 1, 1]  # 6000, 3000, 1500, 750, 375, 188 px: one shard across
    metadata = 3 + 2 * len(level_rows)  # root, labels, labels/nuclei, and each array's zarr.json
    assert _files(z) == 2 * sum(level_rows) + metadata < 2000
    assert read_zarr_labels(z, 0)[6, 6] == 1 and read_zarr_labels(z, 5).shape == (188, 188)


# ------------------------------------------------------------------------------------------------ napari
def test_read_as_napari_ome_zarr_reads_it(tmp_path):
    """What napari's OME-Zarr plugin makes of the store. Up to its 0.7 releases it is ome-zarr-py's Reader: opened at
    ``labels/nuclei`` the labels layer is visible, the image behind it (with the labels' levels); opened at the root,
    that Reader adds label layers hidden, whatever the metadata says. From 0.8 on, the plugin's own reader starts
    every labels layer hidden (its choice, not the file's): only an "omero" block on the label image would change
    that, and its colormap is one napari's Labels layer refuses, so the store has none. Colours: no "colors" list, so
    napari's cycling label palette colours every label (a list would leave every unlisted label transparent). When
    napari and napari-ome-zarr are installed (not in the test extra: napari is large), the layers are built with
    them too."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    shape = (1100, 700)
    z = tmp_path / "n.zarr"
    _write(z, shape, _squares(shape, step=30), overview=(np.full((550, 350, 3), 180, np.uint8), 2.0),
           min_size=100)
    nodes = list(Reader(parse_url(str(z / "labels" / "nuclei")))())
    labels = [n for n in nodes if n.load(Label)]
    assert len(labels) == 1 and labels[0].visible and labels[0].metadata["visible"] is True
    assert labels[0].metadata["color"] == {}  # napari-ome-zarr then leaves napari's own palette
    images = [n for n in nodes if not n.load(Label) and n.data]
    assert [d.shape[1:] for d in images[0].data] == [d.shape for d in labels[0].data]
    attrs = json.loads((z / "labels" / "nuclei" / "zarr.json").read_text())["attributes"]["ome"]
    assert "omero" not in attrs and "colors" not in attrs["image-label"]
    try:
        from napari.components import ViewerModel
        from napari_ome_zarr._reader import napari_get_reader
    except ImportError:
        return
    viewer = ViewerModel()
    for data, meta, kind in napari_get_reader(str(z))():
        viewer._add_layer_from_data(data, meta, kind)
    (lab,) = [layer for layer in viewer.layers if layer._type_string == "labels"]
    assert len(lab.data) == len(labels[0].data) == 5
    assert lab.colormap.map(np.arange(1, 50))[:, 3].min() == 1.0  # every label opaque
    assert len([layer for layer in viewer.layers if layer._type_string == "image"]) == 3  # R, G, B


# ------------------------------------------------------------------------------------------------ --zarr-image
@pytest.mark.parametrize("ready", ["at once", "at the end"])
def test_the_painter_process_writes_the_overview_stand_in(tmp_path, ready):
    """With a painter process, the image pyramid's stand-in is written there (handed over once the overview is
    known: at the first flush, or when the writer finishes): the store equals the one written without the process,
    labels, image levels and metadata."""
    from concurrent.futures import Future

    shape = (700, 900)
    ov = np.random.default_rng(3).integers(0, 256, (175, 225, 3), dtype=np.uint8)
    polys = _squares(shape, step=24)
    stores = []
    for process in (False, True):
        fut: Future = Future()
        if ready == "at once":
            fut.set_result((ov, 4.0))
        z = tmp_path / f"{process}.zarr"
        with ZarrLabelWriter(z, shape, 0.25, overview=fut, chunk=64, min_size=60, paint_process=process) as zw:
            assert (zw._painter is not None) == process
            label = 1
            for y in range(0, shape[0], 100):
                band = [q for q in polys if y <= q[:, 1].min() < y + 100]
                zw.write(_nuclei(band), label)
                label += len(band)
                zw.flush_above(y + 80)
                assert zw._image_handed == (process and ready == "at once")
            if not fut.done():
                fut.set_result((ov, 4.0))
        assert zw._image_handed == process
        stores.append(z)
    import zarr

    a, b = (zarr.open_group(str(z), mode="r") for z in stores)
    assert sorted(a.array_keys()) == sorted(b.array_keys()) == ["0", "1", "2", "3", "4"]
    for k in a.array_keys():
        assert np.array_equal(a[k][...], b[k][...]), k
        assert np.array_equal(read_zarr_labels(stores[0], int(k)), read_zarr_labels(stores[1], int(k))), k
    assert np.all(a["0"][...] == 255) and not np.all(a["2"][...] == 255)  # (the overview at 4x: levels 1 to 4)
    assert dict(a.attrs) == dict(b.attrs)


def test_halving_is_the_rounded_2x2_mean_odd_edges_repeated():
    """A pyramid level from the one below: the rounded mean of each 2x2 block, the last row and column repeated at an
    odd edge, for every byte value (the ties of the rounding included)."""
    from wsiseg.export.zarr_labels import _halve

    rng = np.random.default_rng(5)
    for h, w in ((64, 64), (63, 65), (1, 1), (2, 301)):
        src = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
        src[0, : h // 2] = 255  # (all-255 and mixed blocks)
        oh, ow = -(-h // 2), -(-w // 2)
        p = np.pad(src.astype(np.int32), ((0, 0), (0, 2 * oh - h), (0, 2 * ow - w)), mode="edge")
        want = (p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2] + 2) // 4
        got = _halve(src, oh, ow)
        assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_zarr_image_is_the_slides_pixels_and_the_labels_unchanged(tmp_path, kumar_dir, capsys):
    """``wsiseg run --zarr-image``: the image pyramid's level 0 is the slide's pixels, each level above the 2x2 mean
    of the one below (odd edges included), on the labels' grid; the labels are byte-identical to a run without it;
    the store validates. Without a zarr output the flag is a one-line error."""
    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:601, :777, :3]
    tif = tmp_path / "crop.tif"
    tifffile.imwrite(tif, img)
    args = ["run", str(tif), "--mpp", "0.25", "--model", "watershed", "--tile-size", "128", "--quiet"]
    assert main([*args, "--zarr", str(tmp_path / "plain.zarr")]) == 0
    assert main([*args, "--zarr", str(tmp_path / "img.zarr"), "--zarr-image"]) == 0
    import zarr

    g = zarr.open_group(str(tmp_path / "img.zarr"), mode="r")
    levels = [np.moveaxis(g[str(k)][...], 0, -1) for k in range(len(list(g.array_keys())))]
    assert len(levels) == 3 and np.array_equal(levels[0], img)
    for a, b in zip(levels, levels[1:]):
        h, w = b.shape[:2]
        p = np.pad(a.astype(np.int32), ((0, 2 * h - a.shape[0]), (0, 2 * w - a.shape[1]), (0, 0)), mode="edge")
        assert np.array_equal(b, (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2] + 2) // 4)
    for k in range(3):
        assert levels[k].shape[:2] == read_zarr_labels(tmp_path / "img.zarr", k).shape
        assert np.array_equal(read_zarr_labels(tmp_path / "img.zarr", k), read_zarr_labels(tmp_path / "plain.zarr", k))
    assert g.attrs["ome"]["multiscales"][0]["name"] == "slide"
    ozm = pytest.importorskip("ome_zarr_models", reason="ome-zarr-models (the test extra) is not installed")
    ozm.open_ome_zarr(str(tmp_path / "img.zarr"))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "n.geojson"), "--zarr-image"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("wsiseg: error:") == 1 and "--zarr-image needs --zarr" in err
