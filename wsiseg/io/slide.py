"""One small interface over whole-slide readers: OpenSlide, tiffslide, and plain images.

``open_slide(path)`` picks a backend automatically: OpenSlide for the vendor formats it recognises (Aperio SVS,
Hamamatsu, MIRAX, ...), tiffslide for other tiled or pyramidal TIFFs (it reads both successive-page and SubIFD
pyramids), Zeiss's pylibCZIrw for CZI (:mod:`wsiseg.io.czi`), else a plain-image reader for PNG/JPEG/untiled
TIFF that loads the image once and returns a :class:`Slide`:

- ``levels``: the pyramid, level 0 first (width, height, downsample relative to level 0);
- ``mpp``: microns per pixel of level 0 (``None`` when the file does not say);
- ``read_region((x, y), level, (w, h))``: RGB uint8 ``(h, w, 3)``; ``(x, y)`` in level-0 pixels as in OpenSlide;
  pixels outside the slide (or transparent ones) come back white, like glass.

A slide whose file declares the bounds of its non-empty region (OpenSlide's ``openslide.bounds-*``: MIRAX, Leica
SCN, VSI, ...) is cropped to them, as QuPath crops it by default: level 0 is then the bounds' rectangle, so
coordinates written in it (GeoJSON, zarr labels, preview) are those QuPath shows, and ``origin`` holds the
rectangle's corner in the file's own level-0 frame (add it to get OpenSlide's coordinates).

A :class:`Slide` holds an open file handle and does not pickle: pass the path to workers and open it there
(:func:`cached_slide` keeps one handle per path, process and backend).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.errors import ConfigError, InputError, NoMPPError, missing_path
from ..options import BACKENDS, ICC_CHOICES
from .colour import describe as describe_profile
from .colour import srgb_converter
from .czi import is_czi
from .ngff import images_in, is_ngff
from .pixels import image_rgb, rgb8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
#: a plain (untiled, unpyramidal) image is decoded whole: refuse one larger than this many pixels
MAX_PLAIN_PIXELS = 1 << 30


#: levels larger than this (pixels) are reduced to a thumbnail a strip at a time (Slide.thumbnail)
THUMBNAIL_STREAM_PX = 1 << 26

_TOKENS = itertools.count()  # (each slide handle's own key in _CHUNKS)


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


@dataclass
class Slide:
    """A readable slide. Use :func:`open_slide` to make one."""

    path: Path
    backend: str
    format: str
    levels: list[Level]
    mpp: float | None
    objective_power: float | None
    associated: dict[str, tuple[int, int]] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    #: the corner of level 0 in the file's own level-0 frame: not (0, 0) for a slide cropped to its bounds
    origin: tuple[int, int] = (0, 0)
    _impl: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: the handle's key in the process' cache of decoded TIFF tiles (:data:`_CHUNKS`), and its levels' TIFF tile
    #: shapes as :func:`_tiff_chunk` found them
    _token: int = field(default_factory=lambda: next(_TOKENS), repr=False)
    _tile_shapes: dict = field(default_factory=dict, repr=False)
    #: the ICC profile the file embeds (None: none), and whether the pixels read are converted by it to sRGB
    #: (``open_slide(..., icc="apply")``; :mod:`wsiseg.io.colour`)
    icc_profile: bytes | None = field(default=None, repr=False)
    icc_applied: bool = False
    _colour: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_array(cls, image: np.ndarray, mpp: float | None, path: str | os.PathLike = "<array>",
                   format: str = "array") -> "Slide":
        """A one-level slide of an in-memory ``(H, W, 3)`` uint8 RGB image (read by the ``image`` backend), of
        ``mpp`` microns per pixel (``None``: unknown)."""
        h, w = image.shape[:2]
        return cls(Path(path), "image", format, [Level(w, h, 1.0)], mpp, None, {}, {}, _impl=image)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution-saving level whose downsample is <= ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} out of range 0..{len(self.levels) - 1}")
        if self._impl is None:
            raise InputError(f"{self.path}: slide is closed")
        try:
            with _quiet_decoders():
                rgb = _READERS[self.backend](self, x, y, level, w, h)
            return rgb if self._colour is None else self._colour(rgb)
        except InputError:
            raise
        except Exception as e:  # decoder errors from corrupt tiles
            raise InputError(f"{self.path}: cannot decode region at ({x}, {y}) level {level}: {_short(e)}") from e

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self.associated:
            raise KeyError(name)
        if self.backend not in ("openslide", "tiffslide"):
            raise KeyError(name)
        try:
            with _quiet_decoders():
                return rgb8(np.asarray(self._impl.associated_images[name]))
        except Exception as e:  # corrupt associated image
            raise InputError(f"{self.path}: cannot decode associated image {name!r}: {_short(e)}") from e

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB overview no larger than ``max_size`` on its long side, and its downsample from level 0."""
        import cv2

        w0, h0 = self.dimensions
        target = max(w0, h0) / max_size
        lvl = self.best_level_for_downsample(max(target, 1.0))
        lv = self.levels[lvl]
        scale = max(lv.width, lv.height) / max_size
        if scale > 2 and lv.width * lv.height > THUMBNAIL_STREAM_PX:  # a file without a small enough level
            img = self._thumbnail_strips(lvl, scale)
        else:
            img = self.read_region((0, 0), lvl, (lv.width, lv.height))
            if scale > 1:
                nw, nh = max(1, round(lv.width / scale)), max(1, round(lv.height / scale))
                img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        return img, w0 / img.shape[1]

    def _thumbnail_strips(self, lvl: int, scale: float) -> np.ndarray:
        """Level ``lvl`` reduced ``scale`` times, read and reduced a strip of rows at a time, so memory holds one
        strip (about THUMBNAIL_STREAM_PX / 4 pixels) and the result, whatever the level's size: a 40,000 px
        single-level TIFF would otherwise be decoded whole (4.8 GB)."""
        import cv2

        lv = self.levels[lvl]
        nw, nh = max(1, round(lv.width / scale)), max(1, round(lv.height / scale))
        sy = lv.height / nh
        rows = max(1, int(THUMBNAIL_STREAM_PX // 4 // (lv.width * sy)))  # output rows per strip
        out = np.empty((nh, nw, 3), np.uint8)
        for oy in range(0, nh, rows):
            oy1 = min(nh, oy + rows)
            y0, y1 = int(oy * sy), min(lv.height, max(int(oy * sy) + 1, int(np.ceil(oy1 * sy))))
            strip = self.read_region((0, round(y0 * lv.downsample)), lvl, (lv.width, y1 - y0))
            out[oy:oy1] = cv2.resize(strip, (nw, oy1 - oy), interpolation=cv2.INTER_AREA)
        return out

    def close(self) -> None:
        impl, self._impl = self._impl, None
        if impl is not None and hasattr(impl, "close"):
            impl.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        raise TypeError("Slide handles do not pickle: pass the path and open the slide where it is used")

    def info(self) -> dict[str, Any]:
        """Plain-data description (what ``wsiseg info`` prints)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "backend": self.backend,
            "dimensions": list(self.dimensions),
            "mpp": self.mpp,
            "objective_power": self.objective_power,
            "levels": [{"width": lv.width, "height": lv.height, "downsample": lv.downsample} for lv in self.levels],
            **({"bounds_origin": list(self.origin)} if self.origin != (0, 0) else {}),
            "icc_profile": describe_profile(self.icc_profile),
            "associated_images": {k: list(v) for k, v in self.associated.items()},
        }


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


@contextlib.contextmanager
def _quiet_decoders() -> Iterator[None]:
    """Silence what decoders print on their own about corrupt files (tifffile's logger, OpenCV's libtiff/libjpeg
    messages): the error we raise says it in one line."""
    tlog = logging.getLogger("tifffile")
    old_level = tlog.level
    tlog.setLevel(logging.CRITICAL)
    cv_log = None
    try:
        import cv2

        cv_log = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # pragma: no cover - OpenCV without its logging module
        pass
    try:
        yield
    finally:
        tlog.setLevel(old_level)
        if cv_log is not None:
            import cv2

            cv2.utils.logging.setLogLevel(cv_log)


# --------------------------------------------------------------------------------------------------- backends
def _open_openslide(path: Path) -> Slide:
    import openslide

    try:
        s = openslide.OpenSlide(str(path))
    except Exception as e:
        raise InputError(f"{path}: OpenSlide cannot open it: {_short(e)}") from e
    props = dict(s.properties)
    levels = [Level(int(w), int(h), float(d)) for (w, h), d in zip(s.level_dimensions, s.level_downsamples)]
    mpp = _float(props.get("openslide.mpp-x"))
    obj = _float(props.get("openslide.objective-power"))
    assoc = {k: tuple(int(x) for x in v.size) for k, v in _safe_assoc(s).items()}
    fmt = props.get("openslide.vendor") or (openslide.OpenSlide.detect_format(str(path)) or "unknown")
    bounds = [_float(props.get(f"openslide.bounds-{k}")) for k in ("x", "y", "width", "height")]
    origin = (0, 0)
    if None not in bounds and bounds[2] > 0 and bounds[3] > 0:  # crop to them, as QuPath does (module docstring)
        bx, by, bw, bh = (int(v) for v in bounds)
        origin = (bx, by)
        levels = [Level(max(1, int(np.ceil(bw / lv.downsample))), max(1, int(np.ceil(bh / lv.downsample))),
                        lv.downsample) for lv in levels]
    return Slide(path, "openslide", str(fmt), levels, mpp, obj, assoc, props, origin, _impl=s,
                 icc_profile=_embedded_profile(s))


def _embedded_profile(s: Any) -> bytes | None:
    """The ICC profile an OpenSlide or tiffslide handle read from the file, as bytes, unparsed: both keep the file's
    bytes (``_profile``; their public ``color_profile`` parses them, the fallback for another version), so a corrupt
    profile fails only ``--icc-profile apply``."""
    raw = getattr(s, "_profile", None)
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw) or None
    try:
        prof = s.color_profile
        return None if prof is None else prof.tobytes()
    except Exception:  # (a profile the library cannot parse, without its bytes: as good as none)
        return None


def _safe_assoc(s: Any) -> dict:
    try:
        return dict(s.associated_images)
    except Exception:
        return {}


def _read_openslide(sl: Slide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    img = sl._impl.read_region((x + sl.origin[0], y + sl.origin[1]), level, (w, h))
    return rgb8(np.asarray(img))


def _open_tiffslide(path: Path) -> Slide:
    import tiffslide

    try:
        s = tiffslide.TiffSlide(str(path))
        dims = s.level_dimensions
    except Exception as e:
        raise InputError(f"{path}: not a readable TIFF slide: {_short(e)}") from e
    props = dict(s.properties)
    levels = [Level(int(w), int(h), float(d)) for (w, h), d in zip(dims, s.level_downsamples)]
    mpp = _float(props.get("tiffslide.mpp-x"))
    obj = _float(props.get("tiffslide.objective-power"))
    try:
        assoc = {k: (int(v.shape[1]), int(v.shape[0])) for k, v in
                 ((k, np.asarray(s.associated_images[k])) for k in list(s.associated_images))}
    except Exception:
        assoc = {}
    fmt = props.get("tiffslide.vendor") or "generic-tiff"
    tf = s.ts_tifffile
    why = _not_rgb(tf)
    if why:
        s.close()
        raise InputError(f"{path}: a tiled TIFF of {why} colours: convert it to RGB")
    if fmt == "generic-tiff" and getattr(tf, "is_ome", False):  # (tiffslide reads no OME-XML)
        fmt = "ome-tiff"
        main, read = ome_main(tf), int(props.get("tiffslide.series-index") or 0)
        if main != read:
            (h, w), (mh, mw) = _yx(tf.series[read]), _yx(tf.series[main])
            s.close()
            raise InputError(f"{path}: an OME-TIFF whose first image ({w} x {h} px) is not its slide ({mw} x {mh} "
                             f"px, image {main + 1}): its reader reads the first; convert it with the slide first")
        ome_mpp, ome_obj = ome_scale(tf.ome_metadata, (levels[0].width, levels[0].height))
        mpp, obj = ome_mpp or mpp, obj or ome_obj
    return Slide(path, "tiffslide", str(fmt), levels, mpp, obj, assoc, props, _impl=s, icc_profile=_embedded_profile(s))


#: TIFF compressions whose YCbCr tiles the decoder gives as RGB (JPEG, old-style JPEG, Aperio's ALT_JPEG, Adobe's
#: lossy JPEG)
JPEG_CODES = (6, 7, 33007, 34892)


def _decoded_as_rgb(page: Any) -> bool:
    """Whether a TIFF page's pixels decode as greyscale or RGB(A) as they are: RGB, black-is-zero, or YCbCr under a
    JPEG compression (whose decoder gives RGB); any other colour model needs converting."""
    import tifffile

    P, pm = tifffile.PHOTOMETRIC, page.photometric
    return pm in (P.RGB, P.MINISBLACK) or (pm == P.YCBCR and page.compression in JPEG_CODES)


def _not_rgb(tf: Any) -> str | None:
    """The colour model of a tiled TIFF's slide when tiffslide would read it wrongly (a palette's indices as grey,
    CMYK as RGBA, raw YCbCr as RGB, white-is-zero inverted), else None."""
    import tifffile

    try:
        page = tf.series[ome_main(tf) or 0].levels[0].keyframe  # (an OME-TIFF's slide, else the first)
        pm = tifffile.PHOTOMETRIC(page.photometric)
    except Exception:  # (anything unusual: tiffslide's own error, or none)
        return None
    return None if _decoded_as_rgb(page) else pm.name


def _read_tiffslide(sl: Slide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    lv = sl.levels[level]
    ds = lv.downsample
    # tiffslide does not pad out-of-bounds reads the way OpenSlide does: read the valid part and pad with white
    lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0 = max(lx, 0), max(ly, 0)
    x1, y1 = min(lx + w, lv.width), min(ly + h, lv.height)
    if x1 <= x0 or y1 <= y0:
        return out
    chunk = _tiff_chunk(sl, level)
    if chunk is None or (x1 - x0) * (y1 - y0) > 4 * chunk[0] * chunk[1]:  # (a large region: read once, not kept)
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = _tiffslide_box(sl, level, x0, y0, x1, y1)
        return out
    ch, cw = chunk
    for cy in range(y0 // ch, (y1 - 1) // ch + 1):
        for cx in range(x0 // cw, (x1 - 1) // cw + 1):
            tile = _CHUNKS.get((sl._token, level, cy, cx), lambda cy=cy, cx=cx: _tiffslide_box(
                sl, level, cx * cw, cy * ch, min((cx + 1) * cw, lv.width), min((cy + 1) * ch, lv.height)))
            ax0, ax1 = max(x0, cx * cw), min(x1, (cx + 1) * cw)
            ay0, ay1 = max(y0, cy * ch), min(y1, (cy + 1) * ch)
            out[ay0 - ly:ay1 - ly, ax0 - lx:ax1 - lx] = tile[ay0 - cy * ch:ay1 - cy * ch, ax0 - cx * cw:ax1 - cx * cw]
    return out


def _tiffslide_box(sl: Slide, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Level pixels ``[y0, y1) x [x0, x1)`` (inside the level) as RGB. tiffslide takes a level-0 location and
    truncates ``location / downsample``: the smallest integer location above ``x0 * downsample`` lands on ``x0``
    (for downsamples >= 1, non-integer ones included)."""
    ds = sl.levels[level].downsample
    with sl._lock:
        arr = sl._impl.read_region((math.ceil(x0 * ds), math.ceil(y0 * ds)), level, (x1 - x0, y1 - y0),
                                   as_array=True)
    return rgb8(arr)


def _tiff_chunk(sl: Slide, level: int) -> tuple[int, int] | None:
    """``(height, width)`` of the TIFF tiles of ``level``, read and kept whole (:data:`_CHUNKS`) when the level is
    tiled in tiles of at most :data:`MAX_CHUNK_PIXELS`; else None (regions read as asked). Regions larger than four
    TIFF tiles (an overview read in strips) are read as asked too: kept, they would only push the model's tiles
    out."""
    if level not in sl._tile_shapes:
        chunk = None
        try:
            page = sl._impl.ts_tifffile.series[0].levels[level].keyframe
            th, tw = int(page.tilelength), int(page.tilewidth)
            lv = sl.levels[level]
            if th > 0 and tw > 0 and th * tw <= MAX_CHUNK_PIXELS and tuple(page.shape[:2]) == (lv.height, lv.width) \
                    and "tiffslide.series-composition" not in sl._impl.zarr_group.attrs:
                chunk = (th, tw)
        except Exception:  # (anything unusual: read regions as asked)
            chunk = None
        sl._tile_shapes[level] = chunk
    return sl._tile_shapes[level]


class _ChunkCache:
    """Decoded TIFF tiles, shared by a process' reading threads, the least recently used dropped past ``capacity``
    bytes. A model tile overlaps its neighbours and a TIFF tile spans several model tiles, so reading regions as
    asked decoded each TIFF tile many times over (docs/speed.md); read whole and kept, each is decoded about once
    while the run moves along its rows. Two threads missing the same tile both read it (the same pixels)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._tiles: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        tile = load()
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = tile
                self._bytes += tile.nbytes
                while self._bytes > self.capacity and len(self._tiles) > 1:
                    self._bytes -= self._tiles.popitem(last=False)[1].nbytes
        return tile

    def drop(self, token: Any) -> None:
        """Let go of the tiles of the slide handle ``token`` (the first part of their keys)."""
        with self._lock:
            for key in [k for k in self._tiles if k[0] == token]:
                self._bytes -= self._tiles.pop(key).nbytes


def _open_czi(path: Path) -> Slide:
    from .czi import CziHandle

    h = CziHandle(path)
    w, ht = h.size
    levels = [Level(max(1, round(w / d)), max(1, round(ht / d)), d) for d in h.downsamples]
    return Slide(path, "czi", "czi", levels, h.mpp, h.objective_power, {}, h.properties, _impl=h)


def _read_czi(sl: Slide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    return sl._impl.read(x, y, sl.levels[level].downsample, w, h)


def _open_zarr(path: Path) -> Slide:
    from .ngff import NgffHandle

    h = NgffHandle(path)
    levels = [Level(*h.level_size(i), d) for i, d in enumerate(h.downsamples)]
    return Slide(path, "zarr", "ome-zarr", levels, h.mpp, None, {}, {}, _impl=h)


def _read_zarr(sl: Slide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    ds = sl.levels[level].downsample  # (a level-0 location, as OpenSlide takes it: read_tile asks for round(i * ds))
    return sl._impl.read(round(x / ds), round(y / ds), level, w, h)


#: decoded TIFF tiles kept per process: two rows of 512 px tiles of a slide level 80,000 px wide
CHUNK_CACHE_BYTES = 256 << 20
#: the largest TIFF tile kept whole (larger ones, and strips, are read as asked)
MAX_CHUNK_PIXELS = 2048 * 2048
_CHUNKS = _ChunkCache(CHUNK_CACHE_BYTES)


def _load_plain(path: Path, is_tiff: bool | None = None) -> np.ndarray:
    suffix = path.suffix.lower()
    arr = None
    if is_tiff is None:
        is_tiff = suffix in (".tif", ".tiff")
    if is_tiff:
        import tifffile

        cut = _tiff_cut_short(path)
        if cut:
            raise InputError(f"{path}: truncated TIFF: {cut}")
        try:
            with tifffile.TiffFile(str(path)) as t:
                if len(t.pages) == 0:
                    raise InputError(f"{path}: corrupt TIFF: no readable image directory")
                main = ome_main(t)  # (an OME-TIFF: its slide's series, three planes of RGB included)
                page = t.pages[0] if main is None else t.series[main]
                h, w = page.shape[:2] if main is None else _yx(page)
                if h * w > MAX_PLAIN_PIXELS:
                    raise InputError(f"{path}: an untiled image of {w} x {h} px is too large "
                                     f"to load whole; convert it to a tiled pyramidal TIFF")
                arr = page.asarray() if main is not None else _stored_colours(page, page.asarray(), path)
        except InputError:
            raise
        except MemoryError:
            raise InputError(f"{path}: corrupt or truncated TIFF (declares an image too large to load)") from None
        except Exception as e:
            raise InputError(f"{path}: corrupt or truncated TIFF: {_short(e)}") from e
    else:
        import cv2

        data = np.fromfile(str(path), np.uint8)
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if arr is None:
            raise InputError(f"{path}: not a readable image (unsupported or corrupt)")
        if arr.ndim == 3:
            arr = arr[..., ::-1] if arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]]
    return image_rgb(arr, str(path))


def _stored_colours(page: Any, arr: np.ndarray, path: Path) -> np.ndarray:
    """A plain TIFF page's pixels ``arr`` as greyscale or RGB(A) whatever colours it stores them in (its
    PhotometricInterpretation): a palette through its colour map, CMYK and YCbCr converted, white-is-zero inverted;
    read as they were, these gave grey, white or false colours and no nuclei. :class:`InputError` for other colour
    models (CIELab...)."""
    import cv2
    import tifffile

    P, pm = tifffile.PHOTOMETRIC, page.photometric
    if _decoded_as_rgb(page):
        return arr
    if pm == P.MINISWHITE and arr.dtype.kind in "biu":
        return ~arr if arr.dtype == np.bool_ else np.iinfo(arr.dtype).max - arr
    if pm == P.PALETTE and page.colormap is not None and arr.ndim == 2:
        return np.moveaxis(np.asarray(page.colormap)[:, arr], 0, -1)  # (16-bit entries: scaled like any 16 bits)
    if pm == P.SEPARATED and arr.ndim == 3 and arr.shape[2] >= 4 and arr.dtype == np.uint8:
        cmyk = arr[..., :4].astype(np.uint16)
        return ((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:4]) // 255).astype(np.uint8)
    if pm == P.YCBCR and arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        return cv2.cvtColor(np.ascontiguousarray(arr[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
    samples = arr.shape[-1] if arr.ndim == 3 else 1
    raise InputError(f"{path}: a TIFF of {getattr(pm, 'name', pm)} colours ({arr.dtype}, {samples} samples a pixel): "
                     "convert it to RGB")


def _tiff_cut_short(path: Path) -> str | None:
    """Why a TIFF is evidently cut short (its first directory lies past the end of the file), else None."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    bo = "<" if head[:2] == b"II" else ">"
    if len(head) < 8:
        return f"only {size} bytes"
    if head[2:4] in (b"*\x00", b"\x00*"):
        off = struct.unpack(bo + "I", head[4:8])[0]
    elif len(head) >= 16:
        off = struct.unpack(bo + "Q", head[8:16])[0]
    else:
        return f"only {size} bytes"
    if off + 2 > size:
        return f"the file is cut short ({size} bytes; its image directory starts at byte {off})"
    return None


def _tiff_data_cut_short(path: Path) -> str | None:
    """Why a TIFF's image data is evidently cut short (a tile or strip runs past the end of the file), else None.
    Only reads the directories (cheap); a file tifffile cannot parse is left to the reader to report."""
    try:
        import tifffile

        size = path.stat().st_size
        with _quiet_decoders(), tifffile.TiffFile(str(path)) as t:
            for i, page in enumerate(t.pages):
                offs = np.asarray(page.dataoffsets, np.int64)
                cnts = np.asarray(page.databytecounts, np.int64)
                if offs.size and offs.size == cnts.size:
                    end = int((offs + cnts).max())
                    if end > size:
                        return (f"the image data of page {i} runs to byte {end} but the file has only {size} bytes "
                                f"(an incomplete copy?)")
    except Exception:
        return None
    return None


def _open_image(path: Path) -> Slide:
    with open(path, "rb") as f:
        is_tiff = f.read(4) in _TIFF_MAGIC
    arr = _load_plain(path, is_tiff)
    with open(path, "rb") as f:
        head = f.read(8)
    fmt = ("png" if head.startswith(_IMAGE_MAGIC[0]) else "jpeg" if head.startswith(_IMAGE_MAGIC[1])
           else path.suffix.lower().lstrip(".") or "image")
    slide = Slide.from_array(arr, _tiff_mpp(path), path, fmt)
    slide.icc_profile = _image_profile(path, is_tiff)
    return slide


def _image_profile(path: Path, is_tiff: bool) -> bytes | None:
    """The ICC profile a plain image embeds (a TIFF's InterColorProfile tag, a PNG's iCCP chunk, a JPEG's APP2
    segments), else None; a file whose header cannot be parsed for it has none as far as this reader knows."""
    try:
        if is_tiff:
            import tifffile

            with tifffile.TiffFile(str(path)) as t:
                tag = t.pages[0].tags.get("InterColorProfile")
                value = None if tag is None else tag.value
        else:  # (the header only, through the format's own class: Image.open would refuse an image over Pillow's
            # decompression-bomb limit, 179 Mpx, that wsiseg reads whole up to MAX_PLAIN_PIXELS)
            from PIL import JpegImagePlugin, PngImagePlugin

            with open(path, "rb") as f:
                head = f.read(8)
                f.seek(0)
                kind = (PngImagePlugin.PngImageFile if head.startswith(_IMAGE_MAGIC[0]) else
                        JpegImagePlugin.JpegImageFile if head.startswith(_IMAGE_MAGIC[1]) else None)
                value = None if kind is None else kind(f).info.get("icc_profile")
    except Exception:
        return None
    return bytes(value) if isinstance(value, (bytes, bytearray)) and value else None


#: micrometres per unit: OME's UnitsLength (PhysicalSizeX's, micrometres when absent) and ImageJ's ``unit=``
_UNITS_UM = {"pm": 1e-6, "\u00c5": 1e-4, "\u212b": 1e-4, "nm": 1e-3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0,
             "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_scale(xml: str | None, size: tuple[int, int]) -> tuple[float | None, float | None]:
    """``(mpp, objective power)`` of the image of ``size`` (width, height: the slide read) from an OME-TIFF's
    OME-XML: ``Pixels/@PhysicalSizeX`` in its unit (what QuPath, Bio-Formats' ``bfconvert`` and Glencoe's
    ``raw2ometiff`` write; TIFF resolution tags they may leave out), and the ``NominalMagnification`` of the
    objective its ``ObjectiveSettings`` names (or the file's only one). The image is found by its size, not its
    place: the XML may list images whose pixels lie in other files, which the file's series leave out. None for
    what it does not say, or when images of that size say different things."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return None, None
    objectives = root.findall("{*}Instrument/{*}Objective")
    found = set()
    for image in root.findall("{*}Image"):
        pixels = image.find("{*}Pixels")
        if pixels is None or (pixels.get("SizeX"), pixels.get("SizeY")) != (str(size[0]), str(size[1])):
            continue
        unit = _UNITS_UM.get(pixels.get("PhysicalSizeXUnit", "µm"))
        px = _float(pixels.get("PhysicalSizeX"))
        chosen = image.find("{*}ObjectiveSettings")
        ids = [o for o in objectives if chosen is not None and o.get("ID") == chosen.get("ID")]
        obj = ids or (objectives if len(objectives) == 1 else [])
        found.add((px * unit if px is not None and unit is not None else None,
                   _float(obj[0].get("NominalMagnification")) if obj else None))
    return found.pop() if len(found) == 1 else (None, None)


def _tiff_mpp(path: Path) -> float | None:
    """MPP from an OME-TIFF's OME-XML (:func:`ome_scale`), else from TIFF resolution tags: in centimetres or inches,
    or, in an ImageJ TIFF (QuPath's *Export images > ImageJ TIFF*, Fiji), in the unit its description names
    (``unit=micron``, with no TIFF unit); else None."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as t:
            if t.is_ome and t.series:
                h, w = _yx(t.series[ome_main(t)])
                mpp = ome_scale(t.ome_metadata, (w, h))[0]
                if mpp is not None:
                    return mpp
            tags = t.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xres = tags.get("XResolution")
            if unit is None or xres is None:
                return None
            num, den = xres.value
            unit_v = int(unit.value)
            named = str((t.imagej_metadata or {}).get("unit", "") if t.is_imagej else "")  # (ImageJ escapes µ)
            named = named.replace("\\u00B5", "µ").replace("\\u00b5", "µ").strip().lower()
            microns = {2: 25400.0, 3: 10000.0}.get(unit_v) or (_UNITS_UM.get(named) if unit_v == 1 else None)
            if num <= 0 or den <= 0 or microns is None:
                return None
            per_unit = num / den
            mpp = microns / per_unit
            # 72/96 dpi style defaults are not a microscope resolution
            return mpp if 0.05 <= mpp <= 20 else None
    except Exception:
        return None


def _read_image(sl: Slide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    arr = sl._impl
    H, W = arr.shape[:2]
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = arr[y0:y1, x0:x1]
    return out


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")
_READERS = {"openslide": _read_openslide, "tiffslide": _read_tiffslide, "czi": _read_czi, "zarr": _read_zarr,
            "image": _read_image}


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def _openslide_format(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def open_slide(path: str | os.PathLike, backend: str = "auto", icc: str = "ignore") -> Slide:
    """Open ``path`` with ``backend`` ("auto", "openslide", "tiffslide", "czi", "zarr" or "image"). ``icc``: "ignore"
    reads the pixels as stored; "apply" converts them to sRGB by the ICC profile the file embeds
    (:mod:`wsiseg.io.colour`; as stored when it embeds none: :attr:`Slide.icc_applied` says which), an
    :class:`InputError` for a profile that cannot convert."""
    p = Path(path)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if icc not in ICC_CHOICES:
        raise ConfigError(f"icc_profile: expected one of {', '.join(ICC_CHOICES)}, got {icc!r}")
    if not p.exists():
        raise missing_path(p)
    if is_ngff(p):  # (an OME-Zarr image: a folder, read through zarr)
        if backend not in ("auto", "zarr"):
            raise InputError(f"{p}: an OME-Zarr image, read by the zarr backend, not {backend}")
        return _opened(p, _open_zarr, False, icc)
    p = slide_file(p)
    if not p.is_file():  # a FIFO, socket or device would block or never end
        raise InputError(f"{p}: not a regular file, expected a slide or image file")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror}") from None
    if not head:
        raise InputError(f"{p}: empty file")
    is_tiff = head[:4] in _TIFF_MAGIC
    if backend == "auto" and is_czi(head):
        backend = "czi"  # (Zeiss's own format: neither OpenSlide nor tiffslide reads it)
    if backend == "auto":
        with _quiet_decoders():
            fmt = _openslide_format(p)
            pyramid = is_tiff and _is_pyramid_or_svs(p)
        if fmt is not None and fmt != "generic-tiff":
            backend = "openslide"  # vendor formats (Aperio, Hamamatsu, MIRAX, ...)
        elif pyramid:
            backend = "tiffslide"
        elif p.suffix.lower() in IMAGE_SUFFIXES or is_tiff or head.startswith(_IMAGE_MAGIC):
            backend = "image"  # (a PNG/JPEG/BMP under another name, e.g. renamed .svs, is read as what it is)
        else:
            raise InputError(f"{p}: unsupported file format (not a slide OpenSlide/tiffslide can read, nor PNG/JPEG/TIFF)")
    if is_tiff:
        cut = _tiff_cut_short(p) or _tiff_data_cut_short(p)
        if cut:
            raise InputError(f"{p}: truncated TIFF: {cut}")
    if backend == "zarr":
        raise InputError(f"{p}: not an OME-Zarr image (a folder holding a multiscale image)")
    opener = {"openslide": _open_openslide, "tiffslide": _open_tiffslide, "czi": _open_czi,
              "image": _open_image}[backend]
    return _opened(p, opener, is_tiff, icc)


def _opened(p: Path, opener: Callable[[Path], Slide], is_tiff: bool, icc: str) -> Slide:
    """``opener(p)``, its readers' own errors as one-line InputErrors, its colours managed as ``icc`` asks."""
    with warnings.catch_warnings(), _quiet_decoders():
        warnings.simplefilter("ignore")
        try:
            slide = opener(p)
        except InputError:
            raise
        except MemoryError:
            raise InputError(f"{p}: corrupt file (declares an image too large to load)") from None
        except Exception as e:  # any reader's own error type on a corrupt file
            raise InputError(f"{p}: corrupt or unreadable {'TIFF' if is_tiff else 'file'}: {_short(e)}") from e
    if slide.levels[0].width < 1 or slide.levels[0].height < 1:
        raise InputError(f"{p}: image has no pixels")
    if icc == "apply" and slide.icc_profile is not None:
        try:
            _to_srgb(slide)
        except BaseException:
            slide.close()
            raise
    return slide


def _to_srgb(slide: Slide) -> None:
    """``slide``'s reads converted to sRGB by its profile: an image in memory converted once, here; a slide's
    regions as they are read (:meth:`Slide.read_region`, which the overview, the tissue mask and the tiles all
    go through). A profile that moves no colour (sRGB) is not run at all."""
    convert = srgb_converter(slide.icc_profile, str(slide.path))
    slide.icc_applied = True
    if convert is None:
        return
    if slide.backend == "image":  # (in place where it can: a 1 Gpx image is 3 GB)
        img = slide._impl
        slide._impl = convert(img, out=img if img.flags.writeable and img.flags.c_contiguous else None)
    else:
        slide._colour = convert


def _unused_is_tiled(p: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(str(p)) as t:
            return bool(t.pages[0].is_tiled)
    except Exception:
        return False


def _is_pyramid_or_svs(p: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(str(p)) as t:
            main = t.series[ome_main(t) or 0]
            return bool(t.is_svs or len(main.levels) > 1 or main.keyframe.is_tiled)
    except Exception:
        return False


def ome_main(t: Any) -> int | None:
    """The slide among an OME-TIFF's series (a ``tifffile.TiffFile``'s): the one of most pixels, a macro or label
    image being smaller whatever its place; None for a TIFF that is not OME."""
    if not t.is_ome or not t.series:
        return None
    return max(range(len(t.series)), key=lambda i: int(np.prod(_yx(t.series[i]), dtype=np.int64)))


def _yx(series: Any) -> tuple[int, int]:
    """(height, width) of a tifffile series' level 0."""
    axes, shape = series.axes, series.shape
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


_cache_lock = threading.Lock()


_handles: dict[tuple, Slide] = {}  # (device, inode, mtime, backend, icc) -> handle, the 8 last used


def cached_slide(path: str | os.PathLike, backend: str = "auto", icc: str = "ignore") -> Slide:
    """One open handle per (file, backend, colour management, file mtime) in this process: for tasks that get only
    a path (one call per tile read). The file is known by its device and inode, so two spellings of one path share a
    handle and a file replaced under the same name is opened again; one ``stat`` a call (resolving the path cost ~0.2
    ms)."""
    try:
        st = os.stat(path)
    except OSError:
        raise InputError(f"{path}: no such file") from None
    key = (st.st_dev, st.st_ino, st.st_mtime, backend, icc)
    with _cache_lock:
        slide = _handles.pop(key, None)
        if slide is None:
            slide = open_slide(path, backend, icc)
        _handles[key] = slide  # last used at the end
        while len(_handles) > 8:
            _handles.pop(next(iter(_handles)))
        return slide


_holders: dict[tuple[int, int], int] = {}  # (device, inode) -> the runs of this process reading that slide now


@contextlib.contextmanager
def slide_held(path: str | os.PathLike) -> Iterator[None]:
    """A run's hold on the slide at ``path``: when the last run of this process that holds it ends, its cached
    handles (:func:`cached_slide`) are closed and their decoded tiles let go (:func:`release_slide`), so that its
    file is not held open after the runs (a deleted input's space freed) nor its tiles kept in memory; while another
    run (a thread of a notebook or service, a dask worker's) still reads it, they stay."""
    try:
        st = os.stat(path)
    except OSError:
        yield
        return
    key = (st.st_dev, st.st_ino)
    with _cache_lock:
        _holders[key] = _holders.get(key, 0) + 1
    try:
        yield
    finally:
        with _cache_lock:
            _holders[key] -= 1
            last = _holders[key] == 0
            if last:
                del _holders[key]
        if last:
            release_slide(path)


def release_slide(path: str | os.PathLike) -> None:
    """Close this process' cached handles (:func:`cached_slide`) of the slide at ``path`` and let go of their decoded
    tiles; unless a run still holds it (:func:`slide_held`), whose reads would fail on a closed handle."""
    try:
        st = os.stat(path)
    except OSError:
        return
    with _cache_lock:
        if _holders.get((st.st_dev, st.st_ino)):
            return
        for key in [k for k in _handles if k[:2] == (st.st_dev, st.st_ino)]:
            slide = _handles.pop(key)
            slide.close()
            _CHUNKS.drop(slide._token)  # (its decoded TIFF tiles: up to CHUNK_CACHE_BYTES)


#: what a directory given as input is searched for (by suffix; DICOM slides by :func:`wsiseg.io.dicom.slides_in`)
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".czi",
                  ".png", ".jpg", ".jpeg", ".bmp"}


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input paths as given: files as they are, an OME-Zarr image's folder as it is, other directories as their
    slide/image files (by suffix, sorted), their DICOM slides, each read through one of its files
    (:mod:`wsiseg.io.dicom`: a DICOM slide is a folder of files, here or at any depth below), and their OME-Zarr
    images at any depth (:func:`wsiseg.io.ngff.images_in`); a missing path or a directory with none is an
    :class:`InputError`."""
    from .dicom import slides_in

    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if is_ngff(p):
            out.append(p)
        elif p.is_dir():
            files = sorted([f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES]
                           + slides_in(p) + images_in(p))
            if not files:
                raise InputError(f"{p}: directory holds no slide or image files")
            out.extend(files)
        elif not p.exists():
            raise missing_path(p)
        else:
            out.append(p)
    return out


def input_fingerprint(p: Path) -> tuple[int, int]:
    """``(size, mtime_ns)`` that change when the slide at ``p`` changes, for the resume journal and the ids' seed: a
    file's own; an OME-Zarr folder's summed over its files (a folder's own stat does not change when a chunk inside
    is rewritten; about 1 s per 100,000 chunk files)."""
    if not p.is_dir():
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    size = latest = 0
    for root, _, files in os.walk(p):
        for f in files:
            st = os.stat(os.path.join(root, f))
            size, latest = size + st.st_size, max(latest, st.st_mtime_ns)
    return size, latest


def slide_file(p: Path) -> Path:
    """The file to open for the slide at ``p``: ``p`` itself, or for a folder that holds one DICOM slide (a DICOM
    slide is a folder of files: :mod:`wsiseg.io.dicom`) its main file. :class:`InputError` for any
    other folder."""
    from .dicom import dicom_series, main_file

    if not p.is_dir() or is_ngff(p):  # (an OME-Zarr image is a folder read as it is)
        return p
    series = dicom_series(p)
    if len(series) == 1:
        return main_file(next(iter(series.values())))
    if series:
        raise InputError(f"{p}: holds {len(series)} DICOM slides; give one of their files, or the folder to "
                         "wsiseg run with --out-dir")
    raise InputError(f"{p}: is a directory, expected a slide or image file")


def slide_stem(p: Path) -> str:
    """A slide's name without its suffix (``.ome.tif(f)`` counted as one), for output names; a DICOM slide's
    (:func:`wsiseg.io.dicom.series_name`: its folder's, or its SeriesInstanceUID) for any of its files."""
    from .dicom import series_name

    name = p.name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return series_name(p) or p.stem


def slide_label(p: Path) -> str:
    """How messages name the slide at ``p``: its file's name, or a DICOM slide's name (:func:`slide_stem`) with
    "(DICOM)", since its files are named by UIDs."""
    from .dicom import series_name

    name = series_name(p)
    return f"{name} (DICOM)" if name else p.name


#: level-0 microns per pixel that a slide may have: finer than 0.05 or coarser than 4 um/px (a 2.5x scan) cannot be
#: a scan to find nuclei in, and a wild value (9e+99 in a file's metadata) would build a tile grid without end
MPP_RANGE = (0.05, 4.0)


def resolve_mpp(slide: Slide, mpp: float | None, model_mpp: float) -> float:
    """Level-0 microns per pixel: ``mpp`` when given, else the slide's. A whole-slide file without MPP is an error
    (a wrong scale silently ruins every nucleus); a plain image without MPP is assumed at the model's scale."""
    if mpp is not None:
        if not (mpp > 0 and np.isfinite(mpp)):
            raise ConfigError(f"--mpp must be a positive number, got {mpp}")
        if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
            raise ConfigError(f"--mpp {mpp:g}: implausible for finding nuclei (expected {MPP_RANGE[0]:g}.."
                              f"{MPP_RANGE[1]:g} um/px; a 40x scan is about 0.25, 20x about 0.5)")
        return float(mpp)
    if slide.mpp is not None:
        if not MPP_RANGE[0] <= slide.mpp <= MPP_RANGE[1]:
            raise InputError(f"{slide.path}: the slide declares {slide.mpp:g} um/px, implausible for finding nuclei "
                             f"(expected {MPP_RANGE[0]:g}..{MPP_RANGE[1]:g}); pass --mpp with the right scale")
        return slide.mpp
    if slide.backend == "image":
        warnings.warn(f"{slide.path.name}: no microns-per-pixel in the file; assuming the model's {model_mpp} um/px "
                      f"(pass --mpp to set it)", stacklevel=2)
        return model_mpp
    raise NoMPPError(f"{slide.path}: the slide declares no microns per pixel; pass --mpp")
