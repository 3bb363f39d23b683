"""QuPath GeoJSON, streamed: one Feature per nucleus written as it is found, so memory never holds them all.

Format (QuPath 0.4+ imports it, ``.geojson.gz`` too): a FeatureCollection; each Feature has a UUID ``id``, a Polygon
``geometry`` in level-0 pixel coordinates (origin top-left; a vertex is the centre of a boundary pixel, i.e.
``(col + 0.5, row + 0.5)``), and ``properties``: ``objectType: "detection"``, ``classification`` {name "Nucleus",
color [r, g, b]} and ``measurements``, a flat map of numbers named as QuPath names its own shape features (so "Add
shape features" does not add near-duplicate columns): ``Label`` (the nucleus' id in the zarr label image: its
1-based order in this file), ``Area µm^2``, ``Perimeter µm``, ``Circularity`` (4 pi area / perimeter^2),
``Solidity`` (area / convex hull area), ``Max diameter µm`` and ``Min diameter µm`` (the largest and smallest
caliper widths), ``Centroid X px`` / ``Centroid Y px`` (level-0) and the model's ``Score``; every one of these is
computed from the polygon as written (tested against shapely). Then, where the run measured them (``wsiseg run`` and
:func:`wsiseg.api.segment_slide` do), the stain measurements as QuPath names its intensity features:
``Hematoxylin: Mean``, ``Hematoxylin: Std.Dev.`` and ``Eosin: Mean``, colour-deconvolution optical densities over the
nucleus' pixels at the model's resolution (defined in :mod:`wsiseg.wsi.stains`).

Cells (``wsiseg run --objects cells``, :mod:`wsiseg.wsi.cells`): each Feature is then a QuPath cell object, as
QuPath writes one: ``geometry`` the cell's polygon, ``nucleusGeometry`` its nucleus', ``objectType: "cell"`` and no
classification; the measurements are the nucleus' shape features prefixed ``Nucleus: ``, the cell's prefixed
``Cell: ``, ``Nucleus/Cell area ratio``, then ``Label`` and ``Score`` as for nuclei and the stain measurements
prefixed ``Nucleus: `` (the cytoplasm's pixels are not measured).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

import numpy as np
import orjson

from ..core.atomic import commit, discard, os_error, temp_path
from ..core.errors import InputError, OutputError, ProcessDied
from ..io import regions
from ..parallel.workers import Helper
from ..wsi.stains import MEASUREMENTS as STAIN_MEASUREMENTS
from ..wsi.cells import Cell
from ..wsi.stitch import Nucleus

#: the reader of what this module writes (all features of a GeoJSON file; it lives with the regions reader)
read_features = regions.read_features
#: how a file this module writes starts and ends its first line (between them, the provenance header)
_FILE_HEAD, _FILE_HEAD_END = b'{"type": "FeatureCollection", "wsiseg"', b'"features": ['

NUCLEUS_COLOR = [200, 0, 0]
#: the GeoJSON file's write buffer: a tile's features (tens of kB) took several system calls with Python's 8 kB;
#: small enough that a full disk is still reported within a few tiles
GEOJSON_BUFFER = 1 << 16
#: nuclei of :meth:`GeoJSONWriter.write_block` handed over to the writing process in one message, at least: one
#: message a tile cost the run's main thread twice the CPU (docs/speed.md)
GEOJSON_HANDOVER = 512


class GeoJSONWriter:
    """``with GeoJSONWriter(path) as w: w.write(nuclei)`` - the file appears under ``path`` only on success.

    ``process``: the features are written (ids drawn, labels numbered, bytes joined, compressed for ``.gz`` and
    written) by a process of its own (:class:`_WriterProcess`), off the caller's thread; the caller only encodes
    what was not encoded ahead and hands the parts over. The bytes are the same either way (tested). When that
    process cannot start, the writing stays here (a warning); its errors (a full disk) are raised here, at the
    next :meth:`write` or on leaving the context, as the writer's own would be."""

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None, seed: int | None = None,
                 process: bool = False) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.existed = self.path.exists()  # (another run's file appearing meanwhile is never replaced: commit)
        self.count = 0
        self.metadata = metadata or {}
        self.seed = seed
        self.process = process
        self._file: _FeatureFile | None = None  # (writing here)
        self._proc: Helper | None = None  # (writing in a process of its own: _WriterProcess)
        self._held: list = []  # (blocks not handed over to the process yet: write_block)
        self._held_n = 0

    def __enter__(self) -> "GeoJSONWriter":
        head = {"type": "FeatureCollection", "wsiseg": self.metadata}
        head_bytes = (json.dumps(head)[:-1] + ', "features": [\n').encode()
        gz = self.path.name.endswith(".gz")
        try:
            if self.process:
                open(self.tmp, "wb").close()  # (a file that cannot be made fails here, as without the process)
                self._proc = _WriterProcess.start(self.tmp, gz, head_bytes, self.seed)
            if self._proc is None:
                self._file = _FeatureFile(self.tmp, gz, head_bytes, self.seed)
        except OSError as e:
            discard(self.tmp)
            raise os_error(e, self.path) from None
        return self

    def write(self, nuclei: Iterable[Nucleus | Cell],
              encoded: list[tuple[bytes, bytes] | None] | None = None) -> None:
        """Append ``nuclei`` (or cells; labels: their order in the file). ``encoded``: optionally,
        :func:`feature_parts` of each nucleus, computed ahead (e.g. in a worker process; ``None`` entries are encoded
        here); the bytes written are the same either way."""
        assert self._file is not None or self._proc is not None
        nuclei = list(nuclei)
        if not nuclei:
            return
        if encoded is None:
            encoded = [None] * len(nuclei)
        todo = [i for i, enc in enumerate(encoded) if enc is None]
        if todo:
            encoded = list(encoded)
            for i, enc in zip(todo, features_parts([nuclei[i] for i in todo])):
                encoded[i] = enc
        self.count += len(nuclei)
        self._hand_over()
        try:
            if self._proc is not None:
                self._proc.send(_pack_parts(encoded), self.path)
            else:
                self._file.write(encoded)
        except OSError as e:
            raise os_error(e, self.path) from None

    def write_block(self, block) -> None:
        """Append a :class:`~wsiseg.wsi.stitch.NucleusBlock`'s nuclei, their GeoJSON parts as encoded (the same bytes
        as :meth:`write` of its nuclei with those parts). To the writing process, blocks are handed over together,
        :data:`GEOJSON_HANDOVER` nuclei or more a message (and before anything else is written, and at the end)."""
        assert self._file is not None or self._proc is not None
        n = len(block)
        if not n:
            return
        self.count += n
        if self._proc is None:
            self._write_parts(_parts_message(n, block.blen, block.blob))
            return
        self._held.append(block)
        self._held_n += n
        if self._held_n >= GEOJSON_HANDOVER:
            self._hand_over()

    def _hand_over(self) -> None:
        """Send the blocks held for the writing process."""
        if self._held:
            self._write_parts(self._held_message())

    def _held_message(self) -> bytes:
        """The blocks held for the writing process as one message (no longer held)."""
        held, self._held, self._held_n = self._held, [], 0
        return _parts_message(sum(len(b) for b in held), np.concatenate([b.blen for b in held]),
                              *(b.blob for b in held))

    def _write_parts(self, msg: bytes) -> None:
        try:
            if self._proc is not None:
                self._proc.send(msg, self.path)
            else:
                self._file.write(_unpack_parts(msg))
        except OSError as e:
            raise os_error(e, self.path) from None

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._file = self._file, None
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                if exc_type is None:
                    try:
                        if self._held:
                            proc.send(self._held_message(), self.path)
                    except BaseException:
                        proc.kill()
                        raise
                    proc.finish(self.path)
                else:
                    proc.kill()
            elif f is not None:
                f.close(exc_type is None)
        except (OSError, OutputError, ProcessDied) as e:
            discard(self.tmp)
            if exc_type is None:
                raise (os_error(e, self.path) if isinstance(e, OSError) else e) from None
            return
        if exc_type is None:
            commit(self.tmp, self.path, existed=self.existed)
        else:
            discard(self.tmp)


class _FeatureFile:
    """The features file being written: the collection's head, then each feature's id, encoded parts and label
    (the ids drawn by :func:`_uuid4s`, from ``seed`` when given), then the closing. Where the features are written,
    by :class:`GeoJSONWriter` or in its :class:`_WriterProcess`."""

    def __init__(self, path: Path, gz: bool, head: bytes, seed: int | None) -> None:
        self.f: IO[bytes] = gzip.open(path, "wb", compresslevel=6) if gz else open(path, "wb",
                                                                                 buffering=GEOJSON_BUFFER)
        self.ids = _uuid4s(None if seed is None else np.random.default_rng(seed))
        self.count = 0
        self.f.write(head)

    def write(self, encoded: list[tuple[bytes, bytes]]) -> None:
        out = []
        for (mid, tail), fid in zip(encoded, self.ids(len(encoded))):
            self.count += 1
            out += (b"" if self.count == 1 else b",\n", _HEAD, fid.encode(), mid, str(self.count).encode(), tail)
        self.f.write(b"".join(out))

    def close(self, complete: bool) -> None:
        try:
            if complete:
                self.f.write(b"\n]}\n")
        finally:
            self.f.close()


class _WriterProcess:
    """A :class:`GeoJSONWriter`'s features written in a process of its own: ``python -m wsiseg.export.geojson`` (a
    :class:`~wsiseg.parallel.workers.Helper`) runs a :class:`_FeatureFile` on the messages it is sent, in order: the
    encoded parts of each write, as one message of bytes (:func:`_pack_parts`: pickling the pairs cost the caller
    several times more), then the end, after which it writes the closing and answers ``("ok",)``."""

    NAME = "GeoJSON writer process"

    @staticmethod
    def start(path: Path, gz: bool, head: bytes, seed: int | None) -> "Helper | None":
        """The :class:`~wsiseg.parallel.workers.Helper` writing to ``path`` (made already); None (and a warning)
        when it cannot start."""
        spec = json.dumps({"path": str(path), "gz": gz, "head": head.decode(), "seed": seed})
        return Helper.start("wsiseg.export.geojson", spec, _WriterProcess.NAME,
                            "writing the features here (same outputs)", raw=True)

    @staticmethod
    def begin(spec: dict) -> "_FeatureFile":
        return _FeatureFile(Path(spec["path"]), bool(spec["gz"]), spec["head"].encode(), spec["seed"])

    @staticmethod
    def handle(out: "_FeatureFile", msg: bytes) -> None:
        out.write(_unpack_parts(msg))

    @staticmethod
    def end(out: "_FeatureFile") -> tuple:
        out.close(True)
        return ()


def _pack_parts(encoded: list[tuple[bytes, bytes]]) -> bytes:
    """``encoded``'s pairs as one message (:func:`_parts_message`)."""
    flat = [b for pair in encoded for b in pair]
    return _parts_message(len(encoded), np.fromiter(map(len, flat), np.uint32, len(flat)), *flat)


def _parts_message(n: int, lens: np.ndarray, *parts: bytes) -> bytes:
    """The writing process' message of ``n`` features: ``n``, every part's length (uint32; two parts a feature) and
    the parts joined (given apart, or already joined as one)."""
    return b"".join((np.uint32(n).tobytes(), np.asarray(lens, np.uint32).tobytes(), *parts))


def _unpack_parts(msg: bytes) -> list[tuple[bytes, bytes]]:
    """:func:`_pack_parts`' pairs again."""
    n = int(np.frombuffer(msg, np.uint32, 1)[0])
    lens = np.frombuffer(msg, np.uint32, 2 * n, 4)
    ends = (np.cumsum(lens) + 4 + 8 * n).tolist()
    starts = [4 + 8 * n] + ends[:-1]
    flat = [msg[a:b] for a, b in zip(starts, ends)]
    return list(zip(flat[0::2], flat[1::2]))


def _uuid4s(rng: np.random.Generator | None) -> Callable[[int], list[str]]:
    """``ids(n)``: the next ``n`` random (version 4) UUIDs as strings, all from one draw of 16 * n bytes (from
    ``rng``: the same ids for the same seed, whatever the batches; else from the OS). Equal to
    ``str(uuid.UUID(bytes=b, version=4))`` for each 16-byte ``b``, at a tenth of the cost."""

    def ids(n: int) -> list[str]:
        if n == 0:
            return []
        b = np.frombuffer(rng.bytes(16 * n) if rng is not None else os.urandom(16 * n), np.uint8).reshape(n, 16).copy()
        b[:, 6] = (b[:, 6] & 0x0F) | 0x40  # version 4
        b[:, 8] = (b[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
        h = b.tobytes().hex()
        return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
                for i in range(0, 32 * n, 32)]

    return ids


def iter_features(path: str | os.PathLike) -> Iterator[dict]:
    """The features of a GeoJSON file (plain or ``.gz``) one by one: a file this module wrote read a line at a time
    (it writes one feature a line, so a slide's million nuclei are never all parsed at once), ValueError at the end
    when its closing ``]}`` is missing (a file cut short between two features); any other file whole
    (:func:`read_features`), one of ours saved again in another layout too."""
    path = Path(path)
    with _open(path) as f:
        if not _ours(f.readline()):  # (not as written here: a file of ours saved again by another program, say)
            yield from read_features(path)
            return
        closed = False
        for line in f:
            line = line.strip()
            if line.startswith(b"{"):
                yield orjson.loads(line[:-1] if line.endswith(b",") else line)
            elif line == b"]}":
                closed = True
        if not closed:
            raise ValueError("cut short: its features do not end with ]}")


def read_back(path: str | os.PathLike) -> Iterator[dict]:
    """:func:`iter_features`, its failures as one-line :class:`InputError` naming the file (the outputs made from a
    GeoJSON: :mod:`wsiseg.export.table`, :mod:`wsiseg.export.dicom_ann`)."""
    try:
        yield from iter_features(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError, KeyError) as e:  # (gzip's, orjson's: a file cut short or not GeoJSON)
        raise InputError(f"{path}: not readable as GeoJSON ({type(e).__name__}: {e})") from None


def read_header(path: str | os.PathLike) -> dict:
    """The provenance header of a GeoJSON file this module wrote (its ``wsiseg`` member); {} for any other file."""
    with _open(Path(path)) as f:
        first = f.readline().strip()
    if not _ours(first):
        return {}
    try:
        return orjson.loads(first[: -len(_FILE_HEAD_END)].rstrip().rstrip(b",") + b"}").get("wsiseg") or {}
    except orjson.JSONDecodeError:
        return {}


def written_by_wsiseg(path: str | os.PathLike) -> bool:
    """Whether the GeoJSON at ``path`` is one this module wrote: its provenance header (:func:`read_header`), or,
    in one rewritten by another JSON writer, its ``wsiseg`` member anywhere in the file. A file that cannot be read
    counts as one, for its reader to say what is wrong in its own words."""
    try:
        if read_header(path):
            return True
        with _open(Path(path)) as f:
            tail = b""
            while chunk := f.read(1 << 20):
                if b'"wsiseg"' in tail + chunk:
                    return True
                tail = chunk[-16:]
    except (OSError, EOFError, ValueError):
        return True
    return False


def _ours(first_line: bytes) -> bool:
    """Whether a GeoJSON file's first line is as this module writes it (the header, then one feature a line)."""
    first_line = first_line.strip()
    return first_line.startswith(_FILE_HEAD) and first_line.endswith(_FILE_HEAD_END)


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def feature(n: Nucleus, label: int, fid: str, shape: dict[str, float] | None = None,
            ring: list | None = None) -> dict:
    """The QuPath detection object of ``n`` (module docstring); ``shape`` and ``ring``: its shape measurements and
    written outline where already computed (:func:`features_parts`)."""
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": "Polygon", "coordinates": [_ring(n.polygon) if ring is None else ring]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": "Nucleus", "color": NUCLEUS_COLOR},
            "measurements": {"Label": label, **(shape_measurements(n) if shape is None else shape),
                             "Score": round(n.score, 4), **stain_measurements(n)},
        },
    }


def cell_feature(c: Cell, label: int, fid: str) -> dict:
    """The QuPath cell object of ``c`` (module docstring), ``label`` its nucleus' (and the zarr label's)."""
    nucleus, cell = shape_measurements(c.nucleus), shape_measurements(c.outline)
    ratio = c.nucleus.area_px / c.outline.area_px if c.outline.area_px > 0 else 0.0
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": "Polygon", "coordinates": [_ring(c.outline.polygon)]},
        "nucleusGeometry": {"type": "Polygon", "coordinates": [_ring(c.nucleus.polygon)]},
        "properties": {
            "objectType": "cell",
            "measurements": {"Label": label, **{f"Nucleus: {k}": v for k, v in nucleus.items()},
                             **{f"Cell: {k}": v for k, v in cell.items()},
                             "Nucleus/Cell area ratio": round(min(1.0, ratio), 4), "Score": round(c.nucleus.score, 4),
                             **{f"Nucleus: {k}": v for k, v in stain_measurements(c.nucleus).items()}},
        },
    }


def _ring(polygon: np.ndarray) -> list:
    ring = np.round(polygon, 3).tolist()
    ring.append(ring[0])
    return ring


def shape_measurements(n: Nucleus) -> dict[str, float]:
    """QuPath-named shape features of ``n``'s polygon (area, perimeter and centroid as :class:`Nucleus` holds them,
    which are the polygon's own); lengths in um (level-0 um/px = sqrt(area_um2 / area_px))."""
    hull = _hull(n.polygon)
    (max_d,), (min_d,) = _hull_diameters([hull])
    return _shape_measurements(n, hull, max_d, min_d)


def _hull(polygon: np.ndarray) -> np.ndarray:
    """(k, 2) float64: the convex hull of an outline (OpenCV's, of its float32 vertices)."""
    import cv2

    return cv2.convexHull(np.ascontiguousarray(polygon, np.float32))[:, 0, :].astype(np.float64)


def _shape_measurements(n: Nucleus, hull: np.ndarray, max_d: float, min_d: float) -> dict[str, float]:
    """:func:`shape_measurements` given ``n``'s convex hull and its largest and smallest caliper widths (pixels)."""
    import cv2

    um = (n.area_um2 / n.area_px) ** 0.5 if n.area_px > 0 else 0.0
    hull_area = cv2.contourArea(hull.astype(np.float32)) if len(hull) >= 3 else 0.0
    perim_px = n.perimeter_um / um if um > 0 else 0.0
    return {
        "Area µm^2": round(n.area_um2, 3),
        "Perimeter µm": round(n.perimeter_um, 3),
        "Circularity": round(min(1.0, 4 * np.pi * n.area_px / perim_px ** 2), 4) if perim_px > 0 else 0.0,
        "Solidity": round(min(1.0, n.area_px / hull_area), 4) if hull_area > 0 else 0.0,
        "Max diameter µm": round(max_d * um, 3),
        "Min diameter µm": round(min_d * um, 3),
        "Centroid X px": round(n.centroid[0], 2),
        "Centroid Y px": round(n.centroid[1], 2),
    }


def stain_measurements(n: Nucleus) -> dict[str, float]:
    """QuPath-named stain measurements of ``n`` (:mod:`wsiseg.wsi.stains`), rounded to 4 decimals; none when ``n``
    has none."""
    if n.stains is None:
        return {}
    return {k: round(float(v), 4) for k, v in zip(STAIN_MEASUREMENTS, n.stains)}


_HEAD = b'{"type":"Feature","id":"'
_LABEL = '"measurements":{"Label":'.encode()


def feature_parts(n: Nucleus | Cell) -> tuple[bytes, bytes]:
    """The encoded :func:`feature` of ``n`` (:func:`cell_feature` of a cell) without its id and label, as
    ``(mid, tail)``: ``_HEAD + id + mid + str(label) + tail`` is ``orjson.dumps(feature(n, label, id))``, byte for
    byte (tested). Everything but the id and the label is known once the nucleus is, so workers can encode it."""
    return _parts(orjson.dumps(cell_feature(n, 0, "") if isinstance(n, Cell) else feature(n, 0, "")))


def _parts(b: bytes) -> tuple[bytes, bytes]:
    """``(mid, tail)`` of an encoded feature with an empty id and label 0 (:func:`feature_parts`)."""
    k = b.index(_LABEL + b"0,") + len(_LABEL)
    return b[len(_HEAD):k], b[k + 1:]


def features_parts(nuclei: list[Nucleus | Cell]) -> list[tuple[bytes, bytes]]:
    """:func:`feature_parts` of each nucleus, byte for byte (tested), with the array work of their shape
    measurements done for many at once (:func:`_hull_diameters`, on runs of at most :data:`HULL_RUN` hulls of
    similar vertex count and :data:`HULL_PAIRS` padded vertex pairs): per nucleus, the numpy calls on its few hull
    vertices cost more than their arithmetic (measured in docs/speed.md). Cells go through :func:`feature_parts`."""
    if not nuclei:
        return []
    if any(isinstance(n, Cell) or np.asarray(n.polygon).dtype != np.float64 for n in nuclei):
        return [feature_parts(n) for n in nuclei]  # (cells; an outline of another type rounds and prints as its own)
    hulls = [_hull(n.polygon) for n in nuclei]
    max_d = [0.0] * len(hulls)
    min_d = [0.0] * len(hulls)
    # by vertex count, so that each run is padded to about its own hulls' size (each result depends on its hull alone)
    order = sorted(range(len(hulls)), key=lambda i: len(hulls[i]))
    start = 0
    while start < len(order):
        end = start + 1  # (sorted: a run's widest hull is its last)
        while (end < len(order) and end - start < HULL_RUN
               and (end + 1 - start) * len(hulls[order[end]]) ** 2 <= HULL_PAIRS):
            end += 1
        run = order[start:end]
        for i, mx, mn in zip(run, *_hull_diameters([hulls[i] for i in run])):
            max_d[i], min_d[i] = mx, mn
        start = end
    rings = np.split(np.round(np.concatenate([n.polygon for n in nuclei]), 3),
                     np.cumsum([len(n.polygon) for n in nuclei])[:-1].tolist())
    out = []
    for n, hull, mx, mn, ring in zip(nuclei, hulls, max_d, min_d, rings):
        ring = ring.tolist()
        ring.append(ring[0])
        out.append(_parts(orjson.dumps(feature(n, 0, "", _shape_measurements(n, hull, mx, mn), ring))))
    return out


#: the padded vertex pairs :func:`features_parts` measures at once (a few arrays of this many float64s)
HULL_PAIRS = 1 << 18
#: the most hulls :func:`features_parts` measures at once (sorted by vertex count: runs of similar size)
HULL_RUN = 64


def _hull_diameters(hulls: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """The largest and smallest caliper widths of each convex hull ((k, 2) float64; the hulls padded to one length,
    each result depending on its own hull alone): the largest vertex distance (0 under 2 vertices), and the
    narrowest strip holding the hull with one of its edges on a side (0 under 3 vertices)."""
    n = len(hulls)
    lens = np.array([len(h) for h in hulls])
    k = int(lens.max())
    pts = np.zeros((n, k, 2), np.float64)
    valid = np.arange(k)[None, :] < lens[:, None]
    pts[valid] = np.concatenate(hulls)
    x, y = pts[..., 0], pts[..., 1]
    dx = x[:, :, None] - x[:, None, :]
    dy = y[:, :, None] - y[:, None, :]
    pair = valid[:, :, None] & valid[:, None, :]
    # (the square root of the largest squared distance: sqrt is monotone and correctly rounded, so it is the largest
    # distance, with one square root a hull)
    widest_sq = np.where(pair, dx * dx + dy * dy, -np.inf).max(axis=(1, 2))
    max_d = np.where(lens > 1, np.sqrt(np.maximum(widest_sq, 0.0)), 0.0)
    # edges: each vertex to the next, the last to the first (np.roll within each hull's own length)
    ar = np.arange(k)[None, :]
    nxt = np.where(ar + 1 < lens[:, None], ar + 1, 0)
    ex = np.take_along_axis(x, nxt, axis=1) - x
    ey = np.take_along_axis(y, nxt, axis=1) - y
    norm = np.hypot(ex, ey)
    edge = valid & (norm > 0)
    safe = np.where(edge, norm, 1.0)
    ex, ey = ex / safe, ey / safe
    dd = np.abs((x[:, None, :] - x[:, :, None]) * ey[:, :, None]
                - (y[:, None, :] - y[:, :, None]) * ex[:, :, None])  # (hull, edge, vertex)
    widest = np.where(valid[:, None, :], dd, -np.inf).max(axis=2)
    narrow = np.where(edge, widest, np.inf).min(axis=1)
    min_d = np.where((lens >= 3) & edge.any(axis=1), narrow, 0.0)
    return max_d.tolist(), min_d.tolist()


if __name__ == "__main__":  # a _WriterProcess
    import sys

    from ..parallel.workers import serve

    serve(sys.argv[1:], _WriterProcess.begin, _WriterProcess.handle, _WriterProcess.end, raw=True)
