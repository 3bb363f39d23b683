"""The same pixels read the same whatever holds them: bit depths, colour models, alpha and black fill
(wsiseg.io.pixels, the plain and tiled TIFF readers, OME-Zarr's alpha, the Python API, the slide's stain level)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile

from wsiseg.core.errors import InputError
from wsiseg.io.pixels import image_rgb, rgb8, to_uint8
from wsiseg.io.slide import cached_slide, open_slide, release_slide, slide_held

RES = dict(resolution=(4e4, 4e4), resolutionunit="CENTIMETER")  # 0.25 um a pixel


@pytest.fixture(scope="module")
def kumar_rgb(kumar_dir):
    return tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:512, :512, :3].copy()


def test_bit_depths_scaled_by_their_range():
    v = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(v.astype(np.uint16) * 257), v)  # 16 bits as 8 bits widened
    assert np.array_equal(to_uint8(v / 255.0), v)  # floats in 0..1
    assert np.array_equal(to_uint8(v.astype(np.float32)), v)  # floats in 0..255
    assert np.array_equal(to_uint8(np.array([True, False])), [255, 0])
    assert np.array_equal(to_uint8(np.array([-5, 0, 200], np.int16)), [0, 0, 200])  # (other integers by value)
    assert np.array_equal(to_uint8(np.array([0, 65535], np.int32)), [0, 255])
    grey_alpha = np.dstack([np.full((2, 2), 100, np.uint8), np.array([[255, 0], [255, 0]], np.uint8)])
    assert np.array_equal(rgb8(grey_alpha)[..., 0], [[100, 255], [100, 255]])
    assert np.array_equal(to_uint8(np.array([np.nan, 0.5])), [0, 128])
    grey = rgb8(np.array([[0, 65535]], np.uint16))
    assert grey.shape == (1, 2, 3) and grey.dtype == np.uint8 and np.array_equal(grey[0, :, 0], [0, 255])
    rgba16 = np.full((2, 2, 4), 65535, np.uint16)  # opaque 16-bit RGBA: scaled, not its low bytes
    assert np.array_equal(rgb8(rgba16), np.full((2, 2, 3), 255, np.uint8))
    with pytest.raises(InputError, match="unsupported image layout"):
        image_rgb(np.zeros((16, 16, 2), np.uint8), "x.tif")


def test_16_bit_tiffs_read_as_their_8_bits_tiled_or_not(tmp_path, kumar_rgb):
    wide = kumar_rgb.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "plain.tif", wide, photometric="rgb", **RES)
    tifffile.imwrite(tmp_path / "tiled.tif", wide, photometric="rgb", tile=(256, 256), **RES)
    for name, backend in (("plain.tif", "image"), ("tiled.tif", "tiffslide")):
        with open_slide(tmp_path / name) as s:
            assert s.backend == backend
            assert np.array_equal(s.read_region((0, 0), 0, s.dimensions), kumar_rgb), name


def test_tiff_colour_models_read_as_rgb(tmp_path, kumar_rgb):
    from PIL import Image

    im = Image.fromarray(kumar_rgb)
    pal = im.quantize(256)
    pal.save(tmp_path / "pal.tif")
    pal.save(tmp_path / "pal.png")
    im.convert("CMYK").save(tmp_path / "cmyk.tif")
    im.convert("YCbCr").save(tmp_path / "ycc.tif")
    grey = kumar_rgb[..., 1]
    tifffile.imwrite(tmp_path / "white_is_zero.tif", 255 - grey, photometric="miniswhite")

    def read(name):
        with open_slide(tmp_path / name, "image") as s:
            return s.read_region((0, 0), 0, s.dimensions).astype(int)

    assert np.abs(read("pal.tif") - read("pal.png")).max() <= 1  # (Pillow widens the TIFF's map by 256, not 257)
    assert np.abs(read("cmyk.tif") - kumar_rgb).max() <= 1
    assert np.abs(read("ycc.tif") - kumar_rgb).mean() < 1.5  # (YCbCr rounds)
    assert np.array_equal(read("white_is_zero.tif")[..., 0], grey)
    tifffile.imwrite(tmp_path / "lab.tif", kumar_rgb, photometric="cielab")
    with pytest.raises(InputError, match="CIELAB colours.*convert it to RGB"):
        open_slide(tmp_path / "lab.tif", "image")
    idx = np.asarray(pal)
    cmap = np.asarray(pal.getpalette()[:768], np.uint16).reshape(256, 3).T * 257
    tifffile.imwrite(tmp_path / "pal_tiled.tif", idx, photometric="palette", colormap=cmap, tile=(256, 256), **RES)
    with pytest.raises(InputError, match="tiled TIFF of PALETTE colours"):
        open_slide(tmp_path / "pal_tiled.tif")


def test_ome_zarr_alpha_is_white_as_a_tiff_s(tmp_path, kumar_rgb):
    zarr = pytest.importorskip("zarr")
    rgba = np.dstack([kumar_rgb, np.full(kumar_rgb.shape[:2], 255, np.uint8)])
    rgba[:, :100] = 0  # transparent (and black beneath)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"], **RES)
    g = zarr.open_group(str(tmp_path / "rgba.zarr"), mode="w", zarr_format=3)
    g.create_array("0", data=np.ascontiguousarray(np.moveaxis(rgba, -1, 0)), chunks=(4, 256, 256))
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"]
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.25, 0.25]}]}]}]}
    with open_slide(tmp_path / "rgba.tif") as a, open_slide(tmp_path / "rgba.zarr") as b:
        pa, pb = a.read_region((0, 0), 0, a.dimensions), b.read_region((0, 0), 0, b.dimensions)
    assert (pb[:, :100] == 255).all() and np.array_equal(pa, pb)


def test_black_fill_does_not_move_the_stain_level(kumar_rgb):
    """A scanner's black fill outside its scan (or an OME-Zarr's missing chunks) is not the darkest stain: taken
    for it, the faint cut dropped nearly every nucleus of the slide."""
    from wsiseg.wsi.stains import haematoxylin_level

    black = kumar_rgb.copy()
    black[:, :200] = 0
    white = kumar_rgb.copy()
    white[:, :200] = 255
    assert haematoxylin_level([black]) == haematoxylin_level([white]) > 0


def test_api_arrays_read_as_files_of_them_are(tmp_path, kumar_rgb):
    from wsiseg.api import image_nuclei

    def centres(nuclei):
        return sorted((round(float(n.polygon[:, 0].mean()), 1), round(float(n.polygon[:, 1].mean()), 1))
                      for n in nuclei)

    ref = centres(image_nuclei(kumar_rgb, "watershed", mpp=0.25, zoom=1))
    assert ref
    assert centres(image_nuclei(kumar_rgb.astype(np.uint16) * 257, "watershed", mpp=0.25, zoom=1)) == ref
    assert centres(image_nuclei(kumar_rgb / 255.0, "watershed", mpp=0.25, zoom=1)) == ref
    assert centres(image_nuclei(np.moveaxis(kumar_rgb, -1, 0), "watershed", mpp=0.25, zoom=1)) == ref
    rgba = np.dstack([kumar_rgb, np.full(kumar_rgb.shape[:2], 255, np.uint8)])
    rgba[:, :200, 3] = 0  # transparent: glass, whatever colour lies beneath
    glass = kumar_rgb.copy()
    glass[:, :200] = 255
    assert centres(image_nuclei(rgba, "watershed", mpp=0.25, zoom=1)) == \
        centres(image_nuclei(glass, "watershed", mpp=0.25, zoom=1))
    grey = image_nuclei(kumar_rgb[..., 1], "watershed", mpp=0.25, zoom=1)  # a greyscale array: three equal channels
    assert isinstance(grey, list)
    assert centres(image_nuclei(kumar_rgb.astype(np.int64), "watershed", mpp=0.25, zoom=1)) == ref  # (astype(int))
    from wsiseg.api import segment_image

    labels = segment_image(np.moveaxis(kumar_rgb, -1, 0), "watershed", mpp=0.25, zoom=1)
    assert labels.shape == kumar_rgb.shape[:2] and labels.max() == len(ref)


def test_a_run_leaves_no_handle_of_its_slide_open(tmp_path, kumar_rgb):
    from wsiseg.api import segment_slide

    path = tmp_path / "x.tif"
    tifffile.imwrite(path, kumar_rgb, photometric="rgb", tile=(256, 256), **RES)
    segment_slide(path, geojson=tmp_path / "x.geojson", model="watershed")
    assert json.loads((tmp_path / "x.geojson").read_text())["features"]

    def open_files():
        fds = []
        for d in os.listdir("/proc/self/fd"):
            with __import__("contextlib").suppress(OSError):
                fds.append(os.readlink(f"/proc/self/fd/{d}"))
        return [f for f in fds if f.endswith("x.tif")]

    assert open_files() == []
    cached_slide(path)
    assert open_files()
    release_slide(path)
    assert open_files() == []
    with slide_held(path):  # another run still reading it: its handle stays open until the last run ends
        with slide_held(path):
            cached_slide(path)
        release_slide(path)
        assert open_files() and cached_slide(path).read_region((0, 0), 0, (4, 4)).shape == (4, 4, 3)
    assert open_files() == []
