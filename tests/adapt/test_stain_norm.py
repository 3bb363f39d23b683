"""The stain the adapt teacher sees (wsiseg.adapt.pseudo.normalise_stain), on real Kumar tiles."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsiseg.adapt.pseudo import normalise_stain


@pytest.fixture(scope="module")
def tiles(shared_data) -> list[np.ndarray]:
    img = tifffile.imread(sorted((shared_data / "kumar" / "images").glob("*.tif"))[0])[..., :3]
    return [np.ascontiguousarray(img[r:r + 256, c:c + 256]) for r in (0, 512) for c in (0, 512)]


def _restained(rgb: np.ndarray, h: float, e: float) -> np.ndarray:
    """``rgb`` as another lab's stain would give it: haematoxylin times ``h``, eosin times ``e`` (scikit-image's
    HED unmixing)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed[..., 0] *= h
    hed[..., 1] *= e
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def _diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(a, b)]))


def test_another_stain_is_mapped_close_to_the_original(tiles):
    """The same tissue in two stains comes out far closer together than it went in (measured: 10.7 grey levels
    apart as they are, 4.9 normalised), in uint8 tiles of the same shapes."""
    other = [_restained(t, 0.6, 1.6) for t in tiles]
    a, b = normalise_stain(tiles), normalise_stain(other)
    assert all(x.dtype == np.uint8 and x.shape == t.shape for x, t in zip(a + b, tiles + other))
    assert _diff(a, b) < 0.6 * _diff(tiles, other)


def test_a_slide_is_mapped_as_one(tiles):
    """One estimate for all of a slide's tiles: a tile with half the stain stays paler than the tile it came from
    (each alone would be mapped closer to one look), and nothing is returned for no tile."""
    t = tiles[0]
    pale = (255 * ((t.astype(np.float64) + 1) / 256) ** 0.5).astype(np.uint8)  # every stain's amount halved
    both = normalise_stain([t, pale])
    joint = float(both[1].mean()) - float(both[0].mean())  # measured: 58 grey levels (51 as they are)
    assert joint > 30
    alone = normalise_stain([t])[0], normalise_stain([pale])[0]
    assert abs(float(alone[1].mean()) - float(alone[0].mean())) < joint / 2  # measured: 25
    assert normalise_stain([]) == []


def test_too_little_stain_is_seen_as_it_is(tiles):
    """A slide of glass, or with a speck of stain, has no stain to estimate: its tiles come back unchanged, never an
    error that would stop a run."""
    glass = np.full((256, 256, 3), 245, np.uint8)
    speck = glass.copy()
    speck[:8, :8] = tiles[0][:8, :8]
    for slide in ([glass], [glass, speck]):
        out = normalise_stain(slide)
        assert all(np.array_equal(a, b) for a, b in zip(out, slide)) and len(out) == len(slide)
