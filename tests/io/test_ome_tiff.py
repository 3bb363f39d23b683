"""OME-TIFF (what QuPath exports, Bio-Formats' bfconvert and Glencoe's raw2ometiff write, e.g. from Philips
iSyntax): its scale and objective read from the OME-XML, as QuPath and TIAToolbox read them, so that such a slide
runs without --mpp and gives the nuclei of the same pixels in any other TIFF. ImageJ TIFF (QuPath's other export,
Fiji): its scale in the unit its description names."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsiseg.io.slide import ome_scale, open_slide

from helpers import DICOM_CROP, crop_in, nuclei_of

#: an OME-XML of two images (a macro and the slide), each with its objective
OME_XML = """<?xml version="1.0" encoding="UTF-8"?>
<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">
  <Instrument ID="Instrument:0">
    <Objective ID="Objective:0:0" NominalMagnification="0.6"/>
    <Objective ID="Objective:0:1" NominalMagnification="40.0"/>
  </Instrument>
  <Image ID="Image:0" Name="macro"><ObjectiveSettings ID="Objective:0:0"/>
    <Pixels PhysicalSizeX="16.4" PhysicalSizeXUnit="µm" SizeX="1616" SizeY="4668" Type="uint8"/></Image>
  <Image ID="Image:1" Name=""><ObjectiveSettings ID="Objective:0:1"/>
    <Pixels PhysicalSizeX="252.8" PhysicalSizeXUnit="nm" SizeX="100" SizeY="100" Type="uint8"/></Image>
</OME>"""


def test_the_scale_and_objective_of_each_image_from_its_own_elements():
    """Each image is found by its size (the XML may list images whose pixels are in other files)."""
    assert ome_scale(OME_XML, (1616, 4668)) == (16.4, 0.6)
    mpp, obj = ome_scale(OME_XML, (100, 100))
    assert mpp == pytest.approx(0.2528) and obj == 40.0
    assert ome_scale(OME_XML, (100, 101)) == (None, None)
    no_unit = OME_XML.replace(' PhysicalSizeXUnit="nm"', "")  # (micrometres when the unit is not given)
    assert ome_scale(no_unit, (100, 100))[0] == pytest.approx(252.8)
    assert ome_scale(OME_XML.replace('"nm"', '"parsec"'), (100, 100))[0] is None
    assert ome_scale(OME_XML.replace('PhysicalSizeX="252.8"', ""), (100, 100))[0] is None
    twins = OME_XML.replace('SizeX="1616" SizeY="4668"', 'SizeX="100" SizeY="100"')  # (same size, other scale)
    assert ome_scale(twins, (100, 100)) == (None, None)
    assert ome_scale("<OME", (1, 1)) == (None, None) and ome_scale(None, (1, 1)) == (None, None)


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    return crop_in(tmp_path_factory.mktemp("ome"))


def _ome(path, crop, planar: bool = False, macro: bool = False, tiled: bool = True, macro_first: bool = False):
    """``crop`` as an OME-TIFF: a pyramid in SubIFDs (else one untiled page), RGB interleaved or as three planes,
    optionally a macro image as a second series (or the first); its scale only in the OME-XML, in nanometres."""
    rgb = crop["rgb"]
    data = np.moveaxis(rgb, -1, 0).copy() if planar else rgb
    meta = {"axes": "CYX" if planar else "YXS", "PhysicalSizeX": crop["mpp"] * 1000, "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": crop["mpp"] * 1000, "PhysicalSizeYUnit": "nm"}
    kw = dict(photometric="minisblack" if planar else "rgb", compression="zlib")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as t:
        if macro_first:
            t.write(rgb[::8, ::8].copy(), photometric="rgb", metadata={"axes": "YXS", "Name": "macro",
                                                                       "PhysicalSizeX": 16.4})
        if tiled:
            t.write(data, subifds=1, tile=(256, 256), metadata=meta, **kw)
            half = data[:, ::2, ::2] if planar else data[::2, ::2]
            t.write(np.ascontiguousarray(half), subfiletype=1, tile=(256, 256), **kw)
        else:
            t.write(data, metadata=meta, **kw)
        if macro:
            t.write(rgb[::8, ::8].copy(), photometric="rgb", metadata={"axes": "YXS", "Name": "macro",
                                                                       "PhysicalSizeX": 16.4})
    with tifffile.TiffFile(path) as t:  # (the writer's own: no resolution tags, the scale in the OME-XML alone)
        unit = t.pages[0].tags.get("ResolutionUnit")
        assert t.is_ome and (unit is None or int(unit.value) == 1)  # (1: none, no scale in the TIFF tags)
    return path


@pytest.mark.parametrize("planar,macro,tiled,macro_first", [
    (False, False, True, False), (True, True, True, False), (False, False, False, False), (True, False, False, False),
    (False, False, False, True)])
def test_an_ome_tiff_gives_its_scale_and_the_same_pixels(crop, tmp_path, planar, macro, tiled, macro_first):
    """Tiled (tiffslide) or one untiled image (read whole: the slide's series, its planes included, whatever the
    series' order)."""
    path = _ome(tmp_path / "slide.ome.tif", crop, planar, macro, tiled, macro_first)
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(crop["mpp"])
        assert (s.backend, s.format) == (("tiffslide", "ome-tiff") if tiled else ("image", "tif"))
        assert np.array_equal(s.read_region((0, 0), 0, s.dimensions), crop["rgb"])
        assert ("macro" in s.associated) == macro


def test_wsiseg_run_on_an_ome_tiff_needs_no_mpp_and_finds_the_nuclei_of_its_pixels(crop, tmp_path):
    from wsiseg.api import segment_slide

    path = _ome(tmp_path / "slide.ome.tif", crop)
    segment_slide(path, geojson=tmp_path / "ome.geojson", progress=False)
    segment_slide(crop["tif"], geojson=tmp_path / "tif.geojson", progress=False)
    shapes = [nuclei_of(tmp_path / f"{n}.geojson") for n in ("ome", "tif")]
    assert len(shapes[0]) > 100 and shapes[0] == shapes[1]
    assert DICOM_CROP[2:] == tuple(crop["rgb"].shape[1::-1])


@pytest.mark.parametrize("unit,mpp", [("micron", 0.25), ("\\u00B5m", 0.25), ("nm", 0.25), (None, None)])
def test_an_imagej_tiff_gives_its_scale_in_its_own_unit(tmp_path, unit, mpp):
    rgb = np.full((64, 64, 3), 200, np.uint8)
    per_unit = 1 / 0.25 if unit != "nm" else 1 / 250
    path = tmp_path / "region.tif"
    tifffile.imwrite(path, rgb, imagej=True, resolution=(per_unit, per_unit),
                     metadata={"unit": unit} if unit else {})
    with tifffile.TiffFile(path) as t:  # (as ImageJ writes it: no TIFF unit, the unit in its description)
        assert t.is_imagej and int(t.pages[0].tags["ResolutionUnit"].value) == 1
    with open_slide(path) as s:
        assert s.mpp == (pytest.approx(mpp) if mpp else None)


def test_a_tiled_ome_tiff_whose_first_image_is_not_the_slide_is_refused_in_one_line(crop, tmp_path):
    """Its reader (tiffslide) reads the first image: a macro first would be segmented in place of the slide."""
    import subprocess
    import sys

    path = _ome(tmp_path / "slide.ome.tif", crop, macro_first=True)
    r = subprocess.run([sys.executable, "-m", "wsiseg", "info", str(path)], capture_output=True, text=True)
    h, w = crop["rgb"].shape[:2]
    assert r.returncode == 3 and r.stderr.strip().splitlines() == [
        f"wsiseg: error: {path}: an OME-TIFF whose first image ({w // 8} x {h // 8} px) is not its slide ({w} x {h} "
        "px, image 2): its reader reads the first; convert it with the slide first"]
