"""OME-Zarr images as slides (wsiseg.io.ngff): written by the ome-zarr library (NGFF 0.5, zarr v3) and in
bioformats2raw's layout (NGFF 0.4, zarr v2, the axes t, c, z, y, x), from the bundled slide's pixels; read as every
other slide is, and segmented into the nuclei of the same pixels in a TIFF."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from wsiseg.io.slide import expand_inputs, open_slide, slide_stem

from helpers import crop_in, nuclei_of


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    return crop_in(tmp_path_factory.mktemp("ngff"))


def _ome_zarr(path, rgb, mpp, levels=3, unit="micrometer"):
    """``rgb`` as the ome-zarr library writes an image (NGFF 0.5: axes c, y, x; its own 2x pyramid)."""
    import ome_zarr.writer as writer

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    writer.write_image(np.moveaxis(rgb, -1, 0), root, axes=["c", "y", "x"], scale_factors=[2 ** k for k in
                       range(1, levels)], scale={"c": 1.0, "y": mpp, "x": mpp},
                       axes_units={"y": unit, "x": unit} if unit else None)
    return path


def _bioformats2raw(path, rgb, mpp, grey: bool = False, macro_first: bool = False):
    """``rgb`` in bioformats2raw's layout: a root naming the layout, the image in series ``0/`` (NGFF 0.4 on zarr
    v2, axes t, c, z, y, x with units in micrometres, one level), or in ``1/`` after a macro image in ``0/``."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    if macro_first:
        _series(root.create_group("0"), rgb[::16, ::16], mpp * 16, False)
    _series(root.create_group("1" if macro_first else "0"), rgb, mpp, grey)
    return path


def _series(image, rgb, mpp, grey):
    data = np.moveaxis(rgb, -1, 0)[:1] if grey else np.moveaxis(rgb, -1, 0)
    image.create_array("0", data=data[None, :, None], chunks=(1, 1, 1, 256, 256))
    image.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"}, {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, mpp, mpp]}]}]}]


def test_an_ome_zarr_image_reads_as_a_slide(crop):
    path = _ome_zarr(crop["dir"] / "lib.ome.zarr", crop["rgb"], crop["mpp"])
    rgb, (h, w) = crop["rgb"], crop["rgb"].shape[:2]
    with open_slide(path) as s:
        assert (s.backend, s.format) == ("zarr", "ome-zarr") and s.mpp == pytest.approx(crop["mpp"])
        assert [(lv.width, lv.downsample) for lv in s.levels] == [(w, 1.0), (w // 2, 2.0), (w // 4, 4.0)]
        assert np.array_equal(s.read_region((0, 0), 0, (w, h)), rgb)
        level1 = np.moveaxis(np.asarray(zarr.open_group(str(path), mode="r")["s1"]), 0, -1)  # (its own)
        assert np.array_equal(s.read_region((200, 100), 1, (128, 64)), level1[50:114, 100:228])
        edge = s.read_region((w - 10, h - 10), 0, (20, 20))  # (past the image: white)
        assert (edge[10:, :] == 255).all() and np.array_equal(edge[:10, :10], rgb[-10:, -10:])
    assert slide_stem(path) == "lib"
    no_unit = _ome_zarr(crop["dir"] / "nounit.ome.zarr", rgb, crop["mpp"], levels=1, unit=None)
    with open_slide(no_unit) as s:  # (no unit: no scale; a run asks for --mpp)
        assert s.mpp is None


def test_wsiseg_run_on_bioformats2raw_output_finds_the_nuclei_of_its_pixels(crop):
    from wsiseg.api import segment_slide

    d = crop["dir"]
    path = _bioformats2raw(d / "b2r.zarr", crop["rgb"], crop["mpp"])
    assert path in expand_inputs([d]) and expand_inputs([path]) == [path]
    segment_slide(path, geojson=d / "zarr.geojson", progress=False)
    segment_slide(crop["tif"], geojson=d / "tif.geojson", progress=False)
    shapes = [nuclei_of(d / f"{n}.geojson") for n in ("zarr", "tif")]
    assert len(shapes[0]) > 100 and shapes[0] == shapes[1]


def _one_line_error(path, *extra):
    r = subprocess.run([sys.executable, "-m", "wsiseg", "run", str(path), "--out", str(path.parent / "o.geojson"),
                        "--model", "watershed", *extra], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (path.parent / "o.geojson").exists()
    return r.stderr.strip()


def test_a_grey_image_and_wsisegs_own_stand_in_are_refused_in_one_line(crop, tmp_path):
    from wsiseg.api import segment_slide

    grey = _bioformats2raw(tmp_path / "grey.zarr", crop["rgb"], crop["mpp"], grey=True)
    assert _one_line_error(grey) == (f"wsiseg: error: {grey}: a greyscale OME-Zarr image of uint8; wsiseg segments "
                                     "colour brightfield (H&E) slides: three 8-bit channels")
    ours = tmp_path / "nuclei.zarr"
    segment_slide(crop["tif"], zarr=ours, model="watershed", progress=False)
    assert "a wsiseg output whose image is a stand-in for the slide" in _one_line_error(ours)
    full = tmp_path / "full.zarr"  # (with --zarr-image it holds the slide's pixels: a slide again)
    segment_slide(crop["tif"], zarr=full, zarr_image=True, model="watershed", progress=False)
    with open_slide(full) as s:
        assert s.mpp == pytest.approx(crop["mpp"])
        assert np.array_equal(s.read_region((0, 0), 0, s.dimensions), crop["rgb"])
    assert "not an OME-Zarr image" in _one_line_error(crop["tif"], "--backend", "zarr")


def test_bioformats2raw_with_a_macro_first_reads_the_slide(crop, tmp_path):
    """Bio-Formats may put a macro image first (a Leica SCN's): the series of most pixels is the slide."""
    path = _bioformats2raw(tmp_path / "m.zarr", crop["rgb"], crop["mpp"], macro_first=True)
    with open_slide(path) as s:
        assert s.dimensions == crop["rgb"].shape[1::-1] and s.mpp == pytest.approx(crop["mpp"])


def test_a_changed_image_is_not_resumed_and_an_output_never_replaces_the_input(crop, tmp_path, monkeypatch):
    """An OME-Zarr slide is a folder whose own size and time do not change when a chunk inside is rewritten: the
    journal fingerprints its files. And ``--zarr`` writes a folder: never over the slide or inside it."""
    from wsiseg.api import segment_slide
    from wsiseg.core.errors import ConfigError
    from wsiseg.io.slide import input_fingerprint

    from helpers import interrupting_sink

    path = _bioformats2raw(tmp_path / "b.zarr", crop["rgb"], crop["mpp"])
    before = input_fingerprint(path)
    monkeypatch.setenv("WSISEG_CHECKPOINT_SHARE", "1")
    out = tmp_path / "cut.geojson"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(path, geojson=out, model="watershed", tile_size=256, sink=interrupting_sink(calls=12))
    arr = zarr.open_group(str(path / "0"), mode="r+")["0"]
    arr[0, :, 0, :256, :256] = 255  # (a chunk rewritten: the folder's own stat is as it was)
    assert input_fingerprint(path) != before
    with pytest.raises(ConfigError, match="cannot resume: the interrupted run had input_"):
        segment_slide(path, geojson=out, model="watershed", tile_size=256, resume=True)
    for bad in (path, path / "0" / "nuclei.zarr"):
        with pytest.raises(ConfigError, match="the zarr output .* (is|lies inside) the input"):
            segment_slide(path, zarr=bad, model="watershed")
    assert np.asarray(zarr.open_group(str(path / "0"), mode="r")["0"]).shape[1] == 3  # (untouched)


def test_a_folder_of_slides_leaves_out_wsisegs_own_outputs_and_odd_metadata_is_no_image(crop, tmp_path):
    from wsiseg.api import segment_slide
    from wsiseg.io.ngff import is_ngff

    d = tmp_path / "cohort"
    d.mkdir()
    slide = _bioformats2raw(d / "s.zarr", crop["rgb"][:512, :512], crop["mpp"])
    segment_slide(slide, zarr=d / "s_nuclei.zarr", zarr_image=True, model="watershed", progress=False)
    assert expand_inputs([d]) == [slide]  # (its output, an OME-Zarr image too, is not taken for a slide)
    nested = _bioformats2raw(d / "site" / "patient" / "n.zarr", crop["rgb"][:256, :256], crop["mpp"])
    assert expand_inputs([d]) == [slide, nested]  # (any depth, as a download nests them)
    for attrs in ('{"attributes": [1], "node_type": "group", "zarr_format": 3}',
                  '{"attributes": {"ome": {"multiscales": {"a": 1}}}, "node_type": "group", "zarr_format": 3}',
                  '{"attributes": {"ome": {"multiscales": [{"datasets": []}]}}, "node_type": "group", '
                  '"zarr_format": 3}'):
        odd = tmp_path / "odd.zarr"
        odd.mkdir(exist_ok=True)
        (odd / "zarr.json").write_text(attrs)
        assert not is_ngff(odd)


def test_a_level_of_an_odd_sized_image_is_read_where_its_scale_puts_it(crop, tmp_path):
    """A 1,023 px image's level 1 is 511 px: its downsample is what its scale transform says (the ome-zarr library
    writes 1023 / 511), and a read at the level-0 location ``round(i * downsample)``, as the tiler asks for level
    pixel i, starts at pixel i, not one off."""
    rgb = np.ascontiguousarray(crop["rgb"][:1023, :1023])
    path = _ome_zarr(tmp_path / "odd.ome.zarr", rgb, crop["mpp"], levels=2)
    group = zarr.open_group(str(path), mode="r")
    level1 = np.moveaxis(np.asarray(group["s1"]), 0, -1)
    scales = [d["coordinateTransformations"][0]["scale"][-1] for d in
              group.attrs["ome"]["multiscales"][0]["datasets"]]
    with open_slide(path) as s:
        ds = s.levels[1].downsample
        assert ds == pytest.approx(scales[1] / scales[0]) and s.levels[1].width == level1.shape[1] == 511
        for i, j in ((301, 157), (0, 0), (510, 509)):
            got = s.read_region((round(i * ds), round(j * ds)), 1, (1, 1))
            assert np.array_equal(got[0, 0], level1[j, i]), (i, j)
