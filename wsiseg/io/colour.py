"""Colour management: the ICC profile a slide carries, and its pixels converted by it to sRGB.

A scanner stores the colours its camera saw; the ICC profile it embeds (OpenSlide's and tiffslide's
``color_profile``: Aperio, DICOM, Hamamatsu and other vendor files, a TIFF's InterColorProfile tag; a PNG's or
JPEG's own) says what colours those numbers are. Like QuPath, napari and OpenSlide, wsiseg reads the numbers as
stored unless asked: the bundled models were trained on TCGA scans read as stored, so converting the slides they
were made for would show them colours they never saw. ``wsiseg run --icc-profile apply`` converts to sRGB (the
colours the profile means, as a colour-managed viewer shows them): for a scanner whose stored colours are far from
its slides' real ones. ``wsiseg adapt`` reads its target slides as stored: a model adapted to them learns their
stored colours, and is run without it.

:func:`srgb_converter` gives the conversion: LittleCMS through Pillow's ImageCms, relative colorimetric with black point
compensation (the colours the profile measures, its white to sRGB's white and its black to sRGB's black, no
preference rendering; an sRGB profile of either ICC version then maps every colour to itself, where the perceptual
intent of the v4 sRGB profile that highdicom inserts moves them by up to 102 levels); :func:`describe` a profile's
name, :func:`colour_shift` how far applying it moves colours (``wsiseg info``). :func:`matrix_profile` writes a
simple RGB profile (primaries, white and a tone curve) and :func:`stored_as` converts sRGB into a profile's colours,
for simulating a scanner in tests and benchmarks (``benchmarks/shift.py``).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np

from ..core.errors import InputError

#: a conversion moving no colour of a 16-level grid per channel by more than this many levels is taken for none
#: (an sRGB profile, as converters such as wsidicomizer insert, differs from Pillow's own by rounding)
IDENTITY_LEVELS = 1

#: pixels converted at a time (LittleCMS through a PIL image: two copies of these in memory)
_STRIP_PIXELS = 1 << 22


def _profile(data: bytes, where: str):
    from PIL import ImageCms

    try:
        prof = ImageCms.ImageCmsProfile(io.BytesIO(data))
    except Exception as e:  # (PyCMSError, OSError: not a profile LittleCMS can read)
        raise InputError(f"{where}: its ICC profile cannot be read ({str(e).strip() or type(e).__name__})") from None
    space = prof.profile.xcolor_space.strip()
    if space != "RGB":  # (a grey image's Gray profile included: the models are for H&E's colours)
        raise InputError(f"{where}: its ICC profile is for {space or 'an unknown'} colours, not RGB: "
                         "--icc-profile apply converts RGB slides only")
    return prof


def describe(data: bytes | None) -> str | None:
    """The profile's own description (e.g. "ScanScope v1"), "unnamed", "unreadable"; None without a profile."""
    if data is None:
        return None
    from PIL import ImageCms

    try:
        prof = ImageCms.ImageCmsProfile(io.BytesIO(data))
        return (ImageCms.getProfileDescription(prof) or "").strip() or "unnamed"
    except Exception:
        return "unreadable"


def _converter(src, dst, where: str) -> Callable[..., np.ndarray]:
    """``convert(rgb, out=None)``: RGB uint8 ``(H, W, 3)`` pixels from profile ``src`` to ``dst`` (into ``out``,
    which may be ``rgb`` itself, else a new array), relative colorimetric with black point compensation.

    The transform is built once and shared by the threads that read tiles (LittleCMS 2 works on a copy of a
    transform's cache in each call; tested with 8 threads); Pillow releases the GIL while it converts."""
    from PIL import Image, ImageCms

    try:
        transform = ImageCms.buildTransform(src, dst, "RGB", "RGB", ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                            ImageCms.Flags.BLACKPOINTCOMPENSATION)
    except Exception as e:
        raise InputError(f"{where}: its ICC profile cannot convert to sRGB ({str(e).strip()})") from None

    def convert(rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        out = np.empty_like(rgb) if out is None else out
        h, w = rgb.shape[:2]
        rows = max(1, _STRIP_PIXELS // max(w, 1))
        for y in range(0, h, rows):
            strip = Image.fromarray(rgb[y:y + rows], "RGB")
            out[y:y + rows] = np.asarray(ImageCms.applyTransform(strip, transform))
        return out

    return convert


def _grid() -> np.ndarray:
    """Every colour of a 16-level grid per channel, as a 64 x 64 RGB image."""
    levels = np.linspace(0, 255, 16).round().astype(np.uint8)
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(64, 64, 3)


def colour_shift(data: bytes | None) -> tuple[float, int] | None:
    """How far ``--icc-profile apply`` would move colours by profile ``data``: the mean and largest change in levels
    (0-255) of any channel, over a 16-level grid per channel; None without a profile or for one that cannot
    convert. For ``wsiseg info``: a user can see whether a slide's profile matters."""
    if data is None:
        return None
    try:
        change = _grid_change(_srgb(data, "profile"))
    except InputError:
        return None
    if change.max() <= IDENTITY_LEVELS:  # (what srgb_converter takes for no conversion)
        return 0.0, 0
    return round(float(change.mean()), 1), int(change.max())


def srgb_converter(data: bytes, where: str) -> Callable[..., np.ndarray] | None:
    """A function ``convert(rgb, out=None)`` taking RGB uint8 ``(H, W, 3)`` pixels in ``data``'s colours to sRGB
    (:func:`_converter`), or None when it moves no colour by more than :data:`IDENTITY_LEVELS` (an sRGB profile):
    reading as stored is then the same. :class:`InputError` (naming ``where``) for a profile LittleCMS cannot read
    or one not for RGB."""
    convert = _srgb(data, where)
    return None if _grid_change(convert).max() <= IDENTITY_LEVELS else convert


def _srgb(data: bytes, where: str) -> Callable[..., np.ndarray]:
    """The conversion from profile ``data`` to sRGB, whatever it moves."""
    from PIL import ImageCms

    return _converter(_profile(data, where), ImageCms.createProfile("sRGB"), where)


def _grid_change(convert: Callable[..., np.ndarray]) -> np.ndarray:
    """How many levels ``convert`` moves each channel of each colour of :func:`_grid`."""
    grid = _grid()
    return np.abs(convert(grid).astype(np.int16) - grid)


def stored_as(rgb: np.ndarray, data: bytes) -> np.ndarray:
    """sRGB ``rgb`` (uint8) converted to profile ``data``'s colours: what a scanner storing in them writes, the
    inverse of :func:`srgb_converter`'s conversion. For simulating a scanner in tests and benchmarks."""
    from PIL import ImageCms

    return _converter(ImageCms.createProfile("sRGB"), _profile(data, "profile"), "profile")(rgb)


# ------------------------------------------------------------------------------- a profile written from numbers
#: (x, y) chromaticities of some well-known RGB spaces' primaries, red, green, blue
PRIMARIES = {"srgb": ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)),
             "adobe": ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))}
D65 = (0.3127, 0.3290)
_D50_XYZ = np.array([0.9642, 1.0, 0.8249])
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def _xyz(xy: tuple[float, float]) -> np.ndarray:
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def matrix_profile(primaries: tuple = PRIMARIES["srgb"], white: tuple[float, float] = D65, gamma: float = 2.2,
                   description: str = "wsiseg synthetic RGB") -> bytes:
    """An ICC v2 input-device (``scnr``) RGB profile of three primaries and a white point ((x, y) chromaticities)
    and one power-law tone curve: the simplest profile a scanner embeds (a matrix and curves). Its colorants are
    adapted to the D50 connection space by the Bradford transform, as ICC v2 asks. For tests and benchmarks."""
    m = np.stack([_xyz(p) for p in primaries], 1)  # RGB -> XYZ, up to each primary's scale
    m = m * np.linalg.solve(m, _xyz(white))  # (scaled so that RGB 1, 1, 1 is the white)
    adapt = np.linalg.inv(_BRADFORD) @ np.diag((_BRADFORD @ _D50_XYZ) / (_BRADFORD @ _xyz(white))) @ _BRADFORD
    m50 = adapt @ m

    def s15(v: float) -> bytes:
        return struct.pack(">i", int(round(v * 65536)))

    def xyz_tag(v) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(s15(c) for c in v)

    text = description.encode("ascii", "replace")
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text) + 1) + text + b"\0" + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, int(round(gamma * 256))) + bytes(2)
    tags = [(b"desc", desc), (b"wtpt", xyz_tag(_D50_XYZ)), (b"rXYZ", xyz_tag(m50[:, 0])),
            (b"gXYZ", xyz_tag(m50[:, 1])), (b"bXYZ", xyz_tag(m50[:, 2])), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve), (b"cprt", b"text" + bytes(4) + b"no copyright, use freely\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, body = [], b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table.append(sig + struct.pack(">II", offset + len(body), len(data)))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"scnr" + b"RGB " + b"XYZ "
              + bytes(12) + b"acsp" + bytes(4 + 4 + 4 + 4 + 8) + struct.pack(">I", 0)
              + b"".join(s15(c) for c in _D50_XYZ) + bytes(4 + 16 + 28))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(table) + body


__all__ = ["IDENTITY_LEVELS", "PRIMARIES", "colour_shift", "describe", "matrix_profile", "srgb_converter", "stored_as"]
