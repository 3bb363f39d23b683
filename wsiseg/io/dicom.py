"""DICOM whole-slide images: a slide is a folder of files.

A DICOM slide (the VL Whole Slide Microscopy Image series of DICOM PS3.3: what hospitals' PACS, the Imaging Data
Commons and converters such as wsidicomizer give) is not one file but a *series*: one file per pyramid level, and
others for its label, overview and thumbnail, all named by their instance UIDs (or ``IM000001`` in a DICOMDIR export)
and kept in one folder. OpenSlide opens the whole series from any one of its files (it looks for the others in the
same folder by their SeriesInstanceUID). So here:

- :func:`dicom_series` lists a folder's DICOM slides, one per series, by what OpenSlide reads in each file; a DICOM
  file that is not part of a slide (an annotation, a segmentation, a report) belongs to none;
- a folder given as input yields each series it holds, or that a folder at any depth below it holds, as **one**
  slide, read through the series' largest file (:func:`main_file`; ``wsiseg.io.slide.expand_inputs``); without
  this, each level's file would be segmented as a slide of its own;
- :func:`series_name` names such a slide after its folder when the folder holds that series alone (how the
  Imaging Data Commons and most exports lay slides out: one folder each), else after its SeriesInstanceUID.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

#: what DICOM files are called when they have a suffix
DICOM_SUFFIX = ".dcm"
#: a DICOM file's magic (PS3.10): these bytes after its 128-byte preamble
_MAGIC = (128, b"DICM")

_lock = threading.Lock()
#: folder -> (its mtime, its series): a folder's files are read once per process until the folder changes
_series: dict[str, tuple[int, dict[str, list[Path]]]] = {}


def is_dicom(path: Path) -> bool:
    """Whether ``path`` may be a DICOM file: named ``*.dcm``, or a regular file with no suffix and DICOM's magic
    (DICOMDIR exports name their files ``IM000001``). Reads 132 bytes at most (never from a FIFO or device, which
    could block)."""
    suffix = path.suffix.lower()
    if suffix == DICOM_SUFFIX:
        return True
    if suffix or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC[0])
            return f.read(len(_MAGIC[1])) == _MAGIC[1]
    except OSError:
        return False


def _series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of the slide OpenSlide reads ``path`` as part of; "" for a file OpenSlide takes for a
    DICOM slide's but cannot open (cut short, or a series it refuses); None when it is no DICOM slide's. (OpenSlide's
    own reading, not a DICOM parser's: what it cannot tell for a slide is not one to us either; 0.4 ms a file.)"""
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)) != "dicom":
            return None
        with openslide.OpenSlide(str(path)) as s:
            return s.properties.get("dicom.SeriesInstanceUID", "")
    except Exception:  # (OpenSlide's own error: the run that opens the file says it, once per folder)
        return ""


def dicom_series(folder: Path) -> dict[str, list[Path]]:
    """The DICOM slides in ``folder`` (not in folders inside it): SeriesInstanceUID -> the series' files there,
    sorted, with the series in the order of their first files; the files OpenSlide takes for a DICOM slide's but
    cannot open under "" (one slide, so that opening it says why once). Empty when it holds none. Each file is read
    once per process while the folder is unchanged."""
    folder = Path(os.path.abspath(folder))
    try:
        key, mtime = str(folder.resolve()), folder.stat().st_mtime_ns
    except OSError:
        return {}
    with _lock:
        hit = _series.get(key)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    found: dict[str, list[Path]] = {}
    try:
        files = sorted(f for f in folder.iterdir() if f.is_file() and is_dicom(f))
    except OSError:
        files = []
    for f in files:
        uid = _series_uid(f)
        if uid is not None:
            found.setdefault(uid, []).append(f)
    with _lock:
        _series[key] = (mtime, found)
    return found


def main_file(files: list[Path]) -> Path:
    """The file a DICOM slide is opened and known by: the largest of its series' ``files`` (its full-resolution
    level, whose size and time a run's resume journal then checks), the first by name of equals."""
    def size(f: Path) -> int:
        try:
            return f.stat().st_size
        except OSError:
            return -1

    return max(files, key=size)  # (max keeps the first of equals)


def slides_in(folder: Path) -> list[Path]:
    """One file for each DICOM slide in ``folder`` or in any folder below it (:func:`main_file`), sorted. Any depth,
    since downloads nest a slide's folder in others (the Imaging Data Commons' ``idc download``: collection, patient,
    study, then ``SM_<SeriesInstanceUID>``). The real folders are searched first, then those reached through links
    (so a slide is named after its own folder where both lead to it), each folder once; hidden folders and zarr
    stores (whose chunk files have no suffix) are not searched; a folder that cannot be listed is warned about."""
    found: list[Path] = []
    seen: set[str] = set()
    links: list[str] = []
    pending = [str(folder)]
    while pending:
        for top, dirs, _ in os.walk(pending.pop(0), onerror=_unlisted):
            real = os.path.realpath(top)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.lower().endswith(".zarr"))
            links += [os.path.join(top, d) for d in dirs if os.path.islink(os.path.join(top, d))]
            found += [main_file(files) for files in dicom_series(Path(top)).values()]
        if not pending:
            pending, links = links, []
    return sorted(found)


def _unlisted(e: OSError) -> None:
    import warnings

    warnings.warn(f"{e.filename}: cannot be searched for slides ({e.strerror or e})", stacklevel=2)


def series_of(path: Path) -> tuple[str, list[Path]] | None:
    """``(SeriesInstanceUID, its files)`` of the DICOM slide ``path`` is a file of ("" for one OpenSlide cannot
    open); None when ``path`` is no DICOM slide's file."""
    path = Path(os.path.abspath(path))
    if not is_dicom(path):
        return None
    return next(((uid, files) for uid, files in dicom_series(path.parent).items()
                 if any(f.name == path.name for f in files)), None)


def series_name(path: Path) -> str | None:
    """The name of the DICOM slide ``path`` is a file of: its folder's name when that folder holds no other DICOM
    slide, else the slide's SeriesInstanceUID. None when ``path`` is not a file of a DICOM slide (or of one that
    cannot be opened, beside others)."""
    found = series_of(path)
    if found is None:
        return None
    folder = Path(os.path.abspath(path)).parent
    return folder.name if len(dicom_series(folder)) == 1 and folder.name else found[0] or None


__all__ = ["DICOM_SUFFIX", "dicom_series", "is_dicom", "main_file", "series_name", "series_of", "slides_in"]
