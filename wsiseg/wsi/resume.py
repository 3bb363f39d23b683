"""Resumable runs: a journal of finished tiles beside the output, so a killed run continues where it stopped.

The journal of a run whose main output is ``out/nuclei.geojson`` is the directory ``out/.nuclei.geojson.wsiseg-resume/``:

- ``params.json``: the run's parameters (:meth:`wsiseg.wsi.run.SlideRun.resume_params`: input file name, size and
  mtime, the :class:`~wsiseg.options.RunOptions` fields marked ``resume`` as given, the model (its weights by their
  sha256: the bundled models share an architecture's name) and its settings,
  scales, overlap, tissue mask, outputs, the list of tiles) and the journal's format (:data:`VERSION`). A resume
  with other parameters is refused (:class:`ConfigError`); a journal of another format is discarded with a warning,
  and the run starts over.
- ``ckpt-000000.npz``, ``ckpt-000001.npz``, ...: one per finished tile row: the nuclei the stitcher emitted since
  the previous checkpoint (in order, with every measured field, stain measurements included) and the zarr writer's
  safe row at that time.
- ``state.npz``: the stitcher's complete state after the last checkpoint (its undecided seam candidates and the
  decided ones later rows compare with) and the number of tiles done; replaced at each checkpoint, so the journal
  grows like the GeoJSON, not with one state per row. A checkpoint counts once ``state.npz`` names it; checkpoint
  files past it (a kill between the two writes) are dropped on resume. Every file is written to a temp name,
  fsynced and renamed: whole or absent.

Resuming replays the journalled nuclei, in order, into fresh writers (GeoJSON, zarr, preview), restores the
stitcher's state, and segments the remaining tiles: the outputs are identical to an uninterrupted run's (ids included,
see :func:`run_seed`). The journal is removed once the outputs are committed. Plain ``.npz`` arrays and JSON only:
nothing in the journal is ever unpickled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.atomic import os_error, replacing
from ..core.errors import ConfigError, OutputError
from .stains import stain_rows, stains_of_rows
from .stitch import Candidate, Nucleus, NucleusBlock, Stitcher, StitcherState

#: the journal's format: a journal of another format (one written before the nuclei carried stain measurements, 1;
#: before a row's or column's last tile ended at the slide's edge, 2; before holes were left out of the tiles, 3; before
#: outlines far fainter than the slide's level were, 4; before the dye band followed the slide's haematoxylin, 5; before
#: grey outlines were left out as black dye, 6; before the model's weights were journalled by their digest, 7) is never
#: resumed: the run starts over, with a warning
VERSION = 8


def journal_dir(target: str | os.PathLike) -> Path:
    """The journal directory of a run whose main output is ``target``."""
    p = Path(target)
    return p.with_name(f".{p.name}.wsiseg-resume")


#: what reading a damaged journal file raises (a truncated or emptied ``.npz``: BadZipFile, EOFError)
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
#: a run's parameters that say where its files lie and when they were written, not what they hold: left out of the
#: ids' seed (:func:`run_seed`), so a slide copied or moved, or written to another output, keeps its ids
UNSEEDED = ("input", "input_mtime_ns", "outputs")
#: how much of the start and of the end of a slide's file the ids' seed reads (a slide's header and its last tiles)
SEED_BYTES = 1 << 20


def run_seed(params: dict[str, Any], input_file: str | os.PathLike | None = None) -> int:
    """The GeoJSON id seed of a run: a hash of every parameter that decides its outputs (``params``: a run's
    :meth:`~wsiseg.wsi.run.SlideRun.resume_params`, its model's weights' digests among them, and what else it writes
    by, less :data:`UNSEEDED`) and of the first and last :data:`SEED_BYTES` of its slide's ``input_file``. The same
    slide, model and options always give the same ids; a run that differs in anything that changes its nuclei (a
    threshold, the model's weights, another slide of the same name and size) gives others, so that joining two runs'
    tables or objects by id never pairs different nuclei."""
    h = hashlib.sha256(json.dumps({k: v for k, v in params.items() if k not in UNSEEDED}, sort_keys=True,
                                  default=str).encode())
    if input_file is not None and Path(input_file).is_file():
        h.update(_ends_digest(*_stat_key(input_file)))
    return int.from_bytes(h.digest()[:8], "little")


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of the whole file at ``path``, hex (a model's weights: 8 MB bundled, ~250 MB for R101; computed
    once per process and file version)."""
    return _file_digest(*_stat_key(path)).hex()


def _stat_key(path: str | os.PathLike) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _ends_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """The first and last :data:`SEED_BYTES` of the file at ``path`` (its size and mtime: the cache's key), hashed."""
    with open(path, "rb") as f:
        head = f.read(SEED_BYTES)
        f.seek(max(size - SEED_BYTES, len(head)))
        return hashlib.sha256(head + f.read(SEED_BYTES)).digest()


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """The whole file at ``path`` hashed (a model's weights: 8 MB bundled, ~250 MB for R101; once per process)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


class ResumeJournal:
    """The journal of one run. Nothing is created on disk before the first :meth:`checkpoint`.

    ``resume=False`` discards any journal left by an earlier run (with a warning); ``resume=True`` keeps it when its
    parameters equal ``params`` and raises :class:`ConfigError` when they differ.
    """

    def __init__(self, target: str | os.PathLike, params: dict[str, Any], resume: bool) -> None:
        self.target = Path(target)
        self.dir = journal_dir(target)
        self.params = json.loads(json.dumps(params, default=str))  # plain JSON values, as read back
        self.checkpoints: list[Path] = []
        if self.dir.exists():
            if not resume:
                warnings.warn(f"{self.dir}: discarding the progress of an interrupted run (pass --resume to "
                              f"continue it)", stacklevel=3)
                self.remove()
            else:
                self._load()
        self._next = len(self.checkpoints)

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        pj = self.dir / "params.json"
        try:
            saved = json.loads(pj.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            warnings.warn(f"{self.dir}: unreadable resume journal; starting over", stacklevel=4)
            self.remove()
            return
        if saved.get("version") != VERSION:  # (it lacks what this version journals: nothing of it can be used)
            warnings.warn(f"{self.dir}: a resume journal of another wsiseg version; starting over", stacklevel=4)
            self.remove()
            return
        old = saved.get("params", {})
        diff = [k for k in sorted(set(old) | set(self.params)) if old.get(k) != self.params.get(k)]
        if diff:
            k = diff[0]
            shown = lambda d: repr(d[k]) if k in d else "the default"  # noqa: E731 (an option journalled when set)
            raise ConfigError(f"{self.target}: cannot resume: the interrupted run had {k} = {shown(old)}, this one "
                              f"{shown(self.params)}; rerun with the same input and options, or pass --overwrite "
                              f"to start over")
        try:
            with np.load(self.dir / "state.npz", allow_pickle=False) as z:
                last = int(z["checkpoint"])
        except _UNREADABLE:
            last = -1  # killed before the first state: nothing to resume
        names = sorted(self.dir.glob("ckpt-*.npz"))
        for i, p in enumerate(names):
            if p.name != f"ckpt-{i:06d}.npz" or i > last:
                break
            self.checkpoints.append(p)
        if len(self.checkpoints) != last + 1:
            raise OutputError(f"{self.dir}: resume journal is missing checkpoints; pass --overwrite to start over")
        for p in names[len(self.checkpoints):]:
            p.unlink(missing_ok=True)

    def replay(self) -> Iterator[tuple[list[Nucleus], float]]:
        """The journalled nuclei, one checkpoint at a time, each with the zarr safe row (level 0) of its time."""
        for i, p in enumerate(self.checkpoints):
            try:
                with np.load(p, allow_pickle=False) as z:
                    nuclei = _nuclei_from(z)
                    safe = float(z["safe_y0"])
            except _UNREADABLE as e:
                raise OutputError(f"{p}: corrupt resume checkpoint ({e}); pass --overwrite to start over") from None
            yield nuclei, safe

    def restore(self, stitcher: Stitcher) -> int:
        """Put the last checkpoint's state into a fresh ``stitcher``; returns the number of tiles already done."""
        if not self.checkpoints:
            return 0
        try:
            with np.load(self.dir / "state.npz", allow_pickle=False) as z:
                _restore_stitcher(stitcher, z)
                return int(z["tiles_done"])
        except _UNREADABLE as e:
            raise OutputError(f"{self.dir}: corrupt resume state ({e}); pass --overwrite to start over") from None

    # ------------------------------------------------------------------ writing
    def checkpoint(self, nuclei: list, stitcher: Stitcher, tiles_done: int, safe_y0: float) -> None:
        """Durably record the nuclei emitted since the last checkpoint (:class:`Nucleus` objects, lists of them or
        :class:`NucleusBlock` objects, in order) and the stitcher's state. Ctrl-C or SIGTERM
        arriving meanwhile takes effect once the checkpoint is whole (see :func:`deferred_interrupts`)."""
        with deferred_interrupts():
            self._checkpoint(nuclei, stitcher, tiles_done, safe_y0)

    def _checkpoint(self, nuclei: list, stitcher: Stitcher, tiles_done: int, safe_y0: float) -> None:
        try:
            if self._next == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._write(self.dir / "params.json", json.dumps({"version": VERSION, "params": self.params},
                                                                indent=1).encode())
            final = self.dir / f"ckpt-{self._next:06d}.npz"
            self._savez(final, **_nuclei_arrays(nuclei), safe_y0=np.float64(safe_y0))
            self._savez(self.dir / "state.npz", **_stitcher_arrays(stitcher), tiles_done=np.int64(tiles_done),
                        checkpoint=np.int64(self._next))
        except OSError as e:
            raise os_error(e, self.dir) from None
        self.checkpoints.append(final)
        self._next += 1

    def _savez(self, path: Path, **arrays: np.ndarray) -> None:
        with replacing(path, durable=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def _write(self, path: Path, data: bytes) -> None:
        with replacing(path, durable=True) as tmp:
            tmp.write_bytes(data)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.checkpoints = []
        self._next = 0


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to their own handlers (Ctrl-C's
    ``KeyboardInterrupt``, the CLI's SIGTERM-as-Ctrl-C). A checkpoint takes milliseconds; an interrupt landing inside
    numpy's zip writer turned into a ``ValueError`` traceback ("Can't close the ZIP file while there is an open
    writing handle") instead of a clean stop. Ignored signals stay ignored. Only the main thread can hold signals:
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
        for s in dict.fromkeys(got):  # each held signal once, to its own handler
            signal.raise_signal(s)


# ---------------------------------------------------------------------------------------------- (de)serialising
def _nuclei_arrays(chunks: list) -> dict[str, np.ndarray]:
    """The nuclei of ``chunks`` (:class:`Nucleus` objects, lists of them or :class:`NucleusBlock` objects), in
    order, as the checkpoint's arrays."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("n_len", "n_poly", "n_fields", "n_centroid", "n_bbox",
                                                          "n_stains")}
    groups: list = []
    for c in chunks:
        if isinstance(c, Nucleus):
            if not groups or not isinstance(groups[-1], list):
                groups.append([])
            groups[-1].append(c)
        else:
            groups.append(list(c) if not isinstance(c, NucleusBlock) else c)
    for c in groups:
        if isinstance(c, NucleusBlock):
            m = c.meas
            got = {"n_len": np.asarray(c.plen, np.int64), "n_poly": c.poly,
                   "n_fields": np.column_stack([c.score, m[:, 0], m[:, 1], m[:, 2]]),
                   "n_centroid": m[:, 3:5], "n_bbox": m[:, 5:9], "n_stains": c.stains}
        else:
            n = len(c)
            polys = [np.asarray(x.polygon, np.float64).reshape(-1, 2) for x in c]
            got = {"n_len": np.array([len(p) for p in polys], np.int64),
                   "n_poly": np.concatenate(polys) if polys else np.zeros((0, 2), np.float64),
                   "n_fields": np.array([[x.score, x.area_px, x.area_um2, x.perimeter_um] for x in c],
                                        np.float64).reshape(n, 4),
                   "n_centroid": np.array([x.centroid for x in c], np.float64).reshape(n, 2),
                   "n_bbox": np.array([x.bbox for x in c], np.float64).reshape(n, 4),
                   "n_stains": stain_rows([x.stains for x in c])}
        for k, v in got.items():
            cols[k].append(v)
    empty = {"n_len": (0,), "n_poly": (0, 2), "n_fields": (0, 4), "n_centroid": (0, 2), "n_bbox": (0, 4),
             "n_stains": (0, 3)}
    return {k: np.concatenate(v).astype(np.int64 if k == "n_len" else np.float64, copy=False) if v
            else np.zeros(empty[k], np.int64 if k == "n_len" else np.float64) for k, v in cols.items()}


def _nuclei_from(z: Any) -> list[Nucleus]:
    lens = z["n_len"]
    poly, fields, cen, bbox = z["n_poly"], z["n_fields"], z["n_centroid"], z["n_bbox"]
    stains = stains_of_rows(z["n_stains"])
    ends = np.cumsum(lens)
    out = []
    for i, e in enumerate(ends):
        s, a_px, a_um, per = (float(v) for v in fields[i])
        out.append(Nucleus(polygon=poly[e - lens[i]:e].copy(), score=s, area_px=a_px, area_um2=a_um,
                           perimeter_um=per, centroid=(float(cen[i, 0]), float(cen[i, 1])),
                           bbox=tuple(float(v) for v in bbox[i]), stains=stains[i]))
    return out


#: the attributes of a Stitcher: configuration (rebuilt identically on resume) and the state saved below
def _stitcher_arrays(st: Stitcher) -> dict[str, np.ndarray]:
    """The stitcher's whole state (see :class:`wsiseg.wsi.stitch.Stitcher`: pending and accepted seam candidates by row,
    the current row and the counters) as plain arrays."""
    state = st.state()
    rows, kinds, tiles, boxes, scores, stains, prim, shapes, bits = [], [], [], [], [], [], [], [], []
    for kind, table in ((0, state.pending), (1, state.accepted)):
        for row, cands in table.items():
            if not cands:
                rows.append(row)  # keep empty rows: their presence matters for the order of decisions
                kinds.append(kind + 2)
                tiles.append((0, 0))
                boxes.append((0, 0, 0, 0))
                scores.append(0.0)
                stains.append(None)
                prim.append(False)
                shapes.append((0, 0))
            for c in cands:
                rows.append(row)
                kinds.append(kind)
                tiles.append(c.tile)
                boxes.append(c.box)
                scores.append(c.score)
                stains.append(c.stains)
                prim.append(c.primary)
                shapes.append(c.mask.shape)
                bits.append(np.asarray(c.mask, bool).ravel())
    m = len(rows)
    flat = np.concatenate(bits) if bits else np.zeros(0, bool)
    return {
        "s_row": np.array(rows, np.int64), "s_kind": np.array(kinds, np.int8),
        "s_tile": np.array(tiles, np.int64).reshape(m, 2), "s_box": np.array(boxes, np.int64).reshape(m, 4),
        "s_score": np.array(scores, np.float64), "s_stains": stain_rows(stains), "s_primary": np.array(prim, bool),
        "s_shape": np.array(shapes, np.int64).reshape(m, 2), "s_bits": np.packbits(flat), "s_nbits": np.int64(flat.size),
        "s_counters": np.array([state.row, state.cut_dropped, state.seam_dropped, state.count], np.int64),
    }


def _restore_stitcher(st: Stitcher, z: Any) -> None:
    flat = np.unpackbits(z["s_bits"], count=int(z["s_nbits"])).astype(bool)
    pending: dict[int, list[Candidate]] = {}
    accepted: dict[int, list[Candidate]] = {}
    pos = 0
    for row, kind, tile, box, score, stains, primary, shape in zip(z["s_row"], z["s_kind"], z["s_tile"], z["s_box"],
                                                                   z["s_score"], stains_of_rows(z["s_stains"]),
                                                                   z["s_primary"], z["s_shape"]):
        table = pending if kind in (0, 2) else accepted
        lst = table.setdefault(int(row), [])
        if kind >= 2:
            continue
        size = int(shape[0]) * int(shape[1])
        mask = flat[pos:pos + size].reshape(int(shape[0]), int(shape[1])).copy()
        pos += size
        lst.append(Candidate((int(tile[0]), int(tile[1])), tuple(int(v) for v in box), mask, float(score),
                             bool(primary), stains=stains))
    st.restore(StitcherState(pending, accepted, *(int(v) for v in z["s_counters"])))
