"""Outputs appear whole or not at all: write under a temporary name beside the target, rename when complete.

A run killed at any moment (even SIGKILL) leaves the previous output, or nothing, under the final name, never a
half-written file. Temporary names start with ``.`` and end with ``.partial`` so they are easy to spot and clean.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def path_relation(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """How path ``a`` stands to path ``b`` once both are resolved: ``"is"`` it, ``"lies inside"`` it, ``"holds"`` it,
    or None when they are apart; what writing to one would do to the other (an output over an input, a run's folder
    over its slides)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return "is" if ra == rb else "lies inside" if rb in ra.parents else "holds" if ra in rb.parents else None


def check_writable(target: str | os.PathLike, overwrite: bool, folder: bool = False) -> Path:
    """Fail early (before any work) when ``target`` exists without ``overwrite``, is a directory where a file is to
    be written (``folder``: the output is a directory itself, a zarr store) or its directory is unwritable."""
    p = Path(target)
    if p.is_dir() and not folder:
        raise OutputError(f"{p}: a directory, where a file is to be written: name a file")
    if p.exists() and not overwrite:
        raise OutputError(f"{p}: already exists (use --overwrite to replace it)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{parent}: cannot create output directory: {e.strerror}") from None
    if not parent.is_dir():
        raise OutputError(f"{parent}: not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: output directory is not writable")
    # permissions alone do not tell (root, read-only mounts, /proc): try to create a file there
    probe = parent / f".wsiseg-probe.{uuid.uuid4().hex[:8]}.partial"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{parent}: output directory is not writable ({e.strerror or e})") from None
    return p


def temp_path(target: str | os.PathLike) -> Path:
    p = Path(target)
    return p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.partial")


@contextmanager
def replacing(target: str | os.PathLike, durable: bool = False, existed: bool = True) -> Iterator[Path]:
    """A file written whole or not at all by a writer that wants a path: ``with replacing(target) as tmp:`` write
    ``tmp`` (a :func:`temp_path` beside ``target``); when the block ends, ``tmp`` replaces ``target`` at once
    (``os.replace``); when it raises, ``tmp`` is removed and the error goes on. ``durable``: the file's data and the
    rename reach the disk before this returns (fsync; the resume journal). ``existed`` False: ``target`` was not
    there when the work began, and one that appeared meanwhile is not replaced (:func:`commit`'s OutputError). The
    one place the package renames a finished file into place by hand (outputs that must not replace a file that
    appeared meanwhile: :func:`commit`)."""
    target = Path(target)
    tmp = temp_path(target)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        if existed:
            os.replace(tmp, target)
        else:
            commit(tmp, target, existed=False)
    except BaseException:
        discard(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, target: str | os.PathLike, existed: bool = True) -> None:
    """Move a finished temporary file or directory onto ``target`` (replacing an old one atomically for files).

    ``existed``: whether ``target`` existed when the work began (and was allowed to be replaced). When it did not,
    a ``target`` that appeared meanwhile (another run writing the same output) is never replaced: files are linked
    into place, which fails when the name is taken, atomically; the temporary file is removed and an
    :class:`OutputError` says so."""
    tmp, target = Path(tmp), Path(target)
    if not existed:
        try:
            _move_no_replace(tmp, target)
        except OSError as e:
            if not isinstance(e, FileExistsError) and e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR,
                                                                     errno.EISDIR):
                raise
            discard(tmp)
            raise OutputError(f"{target}: appeared while this run was writing it (another run?); left as it is, "
                              "this run's output discarded") from None
        return
    if tmp.is_dir():
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, target)


def _move_no_replace(tmp: Path, target: Path) -> None:
    """``tmp`` to ``target``, failing (FileExistsError) when ``target`` exists: a file by a hard link, which is
    atomic (a plain rename after an existence check where the filesystem has no hard links); a directory by a
    rename, which fails onto a non-empty directory or a file."""
    if tmp.is_dir():
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        os.rename(tmp, target)
        return
    try:
        os.link(tmp, target)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP):
            raise
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside directory ``path`` durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def discard(tmp: str | os.PathLike) -> None:
    p = Path(tmp)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def os_error(e: OSError, path: str | os.PathLike) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: disk full while writing (nothing was written under this name)")
    if e.errno == errno.EFBIG:
        return OutputError(f"{path}: file size limit reached while writing (nothing was written under this name)")
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`replacing`)."""
    p = Path(path)
    try:
        with replacing(p) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise OutputError(f"{p}: cannot write ({e.strerror})") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all: a :func:`temp_path` beside it, then :func:`commit`."""
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        discard(tmp)
        raise os_error(e, path) from None
    commit(tmp, path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` whole or not at all: a :func:`temp_path` beside ``dst``, then :func:`commit`."""
    tmp = temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
    except OSError as e:
        discard(tmp)
        raise os_error(e, dst) from None
    commit(tmp, dst)


def write_png(path: str | os.PathLike, arr) -> None:
    """An image as PNG, atomically: RGB (H, W, 3) or greyscale/labels (H, W) of uint8/uint16."""
    import cv2

    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise OutputError(f"{path}: PNG encoding failed")
    write_bytes(path, buf.tobytes())
