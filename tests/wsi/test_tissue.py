"""The tissue mask (wsiseg.wsi.tissue) on slides whose glass is tinted: the same tissue as the slide's own."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import wsiseg
from wsiseg.io.slide import open_slide
from wsiseg.wsi.tissue import SAT_MAX, SAT_MIN, glass_colour, neutral_glass, tissue_mask

SAMPLE = Path(wsiseg.__file__).parent / "data" / "sample.svs"


def _tinted(tmp_path: Path, name: str, gain: tuple[float, float, float]) -> Path:
    """The bundled sample's pixels, each channel scaled by ``gain``, as a tiled TIFF with the sample's scale."""
    with open_slide(str(SAMPLE)) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3].astype(np.float32)
        mpp = slide.mpp
    out = tmp_path / f"{name}.tif"
    tifffile.imwrite(out, np.clip(np.round(rgb * np.float32(gain)), 0, 255).astype(np.uint8), tile=(256, 256),
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)
    return out


def test_glass_is_found_on_a_slide_and_not_on_an_image_that_is_all_tissue(shared_data):
    """:func:`glass_colour`: the sample's glass is near white and untinted, so :func:`neutral_glass` leaves its
    overview as it is (its mask is the mask of before); a Kumar image, all tissue, and the StarDist H&E sample have
    no glass."""
    with open_slide(str(SAMPLE)) as slide:
        img, _ = slide.thumbnail(max_size=2048)
    glass = glass_colour(img)
    assert glass is not None and glass.min() >= 235 and (glass.max() - glass.min()) / glass.max() < SAT_MIN
    assert neutral_glass(img) is img
    for path in [shared_data / "kumar" / "images" / "TCGA-A7-A13E-01Z-00-DX1.tif",
                 shared_data / "samples" / "he_histo.jpg"]:
        if not path.is_file():
            pytest.skip(f"{path.name} absent")
        rgb = np.ascontiguousarray(tifffile.imread(path)[..., :3] if path.suffix == ".tif"
                                   else cv2.imread(str(path))[..., ::-1])
        assert glass_colour(rgb) is None and neutral_glass(rgb) is rgb


@pytest.mark.parametrize("name, gain", [("yellowed", (1.0, 1.0, 0.86)), ("bluish", (0.88, 0.93, 1.0))])
def test_a_slide_with_tinted_glass_has_the_tissue_of_its_untinted_self(tmp_path, name, gain):
    """The bundled sample with its glass tinted (a yellowed mounting medium: blue at 0.86; a bluish scanner: red at
    0.88, green at 0.93) is as saturated as pale tissue, above the mask's cap on Otsu's threshold, so the saturation
    rule alone would take the glass for tissue. White-balanced by its glass, the tinted slide's mask is the sample's:
    the same tissue fraction to within 1%, and the masks agree on 99% of their pixels."""
    with open_slide(str(SAMPLE)) as slide:
        plain = tissue_mask(slide)
    path = _tinted(tmp_path, name, gain)
    with open_slide(str(path)) as slide:
        img, _ = slide.thumbnail(max_size=2048)
        glass = glass_colour(img)
        tinted = tissue_mask(slide)
    assert glass is not None and (glass.max() - glass.min()) / glass.max() > SAT_MAX
    white = glass_colour(neutral_glass(img))  # (grey now)
    assert white is not None and (white.max() - white.min()) / white.max() < 0.01
    assert tinted.mask.shape == plain.mask.shape
    assert abs(tinted.fraction - plain.fraction) <= 0.01
    assert (tinted.mask == plain.mask).mean() >= 0.99


@pytest.mark.parametrize("ink", [(20, 110, 60), (30, 140, 140)])
def test_a_green_or_teal_pen_stroke_on_the_glass_is_not_tissue(tmp_path, ink):
    """A pen stroke (60 um wide, the ink's transmittance at 60%) drawn on the bundled sample's glass is as saturated
    as tissue, but of the green to teal that neither stain has: the mask leaves it out (not a pixel of the mask along
    its middle) and the slide's tissue fraction is the sample's to within 0.2%."""
    with open_slide(str(SAMPLE)) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3].astype(np.float32)
        plain = tissue_mask(slide)
        mpp = slide.mpp
    stroke = np.zeros(rgb.shape[:2], np.float32)
    ends = ((1700, 100), (2150, 1000))  # (level 0: on the glass right of the tissue)
    cv2.line(stroke, *ends, 1.0, thickness=120)
    op = 0.6 * stroke[..., None]
    rgb = rgb * (1 - op + op * np.float32(ink) / 255)
    path = tmp_path / "pen.tif"
    tifffile.imwrite(path, np.clip(np.round(rgb), 0, 255).astype(np.uint8), tile=(256, 256),
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)
    with open_slide(str(path)) as slide:
        pen = tissue_mask(slide)
    xs = np.linspace(ends[0][0], ends[1][0], 50)
    ys = np.linspace(ends[0][1], ends[1][1], 50)
    assert not plain.contains(xs, ys).any() and not pen.contains(xs, ys).any()
    assert abs(pen.fraction - plain.fraction) <= 0.002
