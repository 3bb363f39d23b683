"""Process-level settings: the one device resolver (:func:`resolve_device`), the interpreter's switch interval while
a slide runs (:func:`quick_gil_handover`), the garbage collector around torch's objects (:func:`import_settled`,
:func:`frozen_heap`), and CPU tuning for the command line: keep freed memory in the heap instead
of unmapping it.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` on free, so each batch's large tensors (RoI features, mask windows: 10-60 MiB) are page-faulted in
again, page by page, on every batch (what that costs: ``benchmarks/throughput.py --malloc system`` against the
default; docs/speed.md). :func:`keep_freed_memory` switches the process to
heap-only allocation with a high trim threshold (what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would do at
start-up), so freed blocks are reused; peak RSS becomes the high-water mark of the working set, which the streaming
pipeline keeps bounded. No-op where glibc is absent (macOS, Windows, musl) or ``WSISEG_MALLOC=system`` is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager
from typing import Iterator

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc as described above (once per process); returns whether it is in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("WSISEG_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
          and mallopt(_M_TOP_PAD, 256 << 20) == 1)
    _done = bool(ok)
    return _done


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process (no when it was never called): the predicting
    process does as its parent did."""
    return bool(_done)


def resolve_device(device):
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``. An unknown device string, or
    a CUDA device asked for where none is available: :class:`~wsiseg.core.errors.ConfigError` (one line, exit 2). The
    one resolver of the package: inference, training and the CycleGAN use it."""
    import torch

    from .errors import ConfigError

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device}: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here (use --device auto or cpu)")
    return dev


#: the longest a thread waits for the GIL held by a busy one while a slide runs (Python's default: 5 ms;
#: environment: ``WSISEG_SWITCH_INTERVAL``, in seconds, to measure others)
SWITCH_INTERVAL = 0.0005


@contextmanager
def quick_gil_handover() -> Iterator[None]:
    """Lower the interpreter's switch interval to :data:`SWITCH_INTERVAL` while a slide runs, then restore it (the
    run and the predicting process hold it).

    The predicting thread releases the GIL in every torch call and must get it back after each; with the default
    interval, a busy main loop (stitching, writing) holds it that long each time (docs/speed.md). The reading
    threads wait the same way."""
    old = sys.getswitchinterval()
    try:
        want = float(os.environ.get("WSISEG_SWITCH_INTERVAL", SWITCH_INTERVAL))
    except ValueError:
        want = SWITCH_INTERVAL
    sys.setswitchinterval(min(old, want) if want > 0 else old)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


#: the modules a segmenting process imports first (:func:`import_settled`): torch's own and torchvision's (whose
#: ``ops`` import ``torch._dynamo``) make about half a million objects that live as long as the process
SETTLED_MODULES = ("torch", "torchvision")
_settled = False


def import_settled(modules: tuple[str, ...] = SETTLED_MODULES) -> None:
    """Import ``modules`` with the cyclic garbage collector paused, then leave every object the process holds out of
    its later scans (:func:`gc.freeze`); the collector itself stays on for the objects made afterwards.

    Importing them makes full collections that scan the objects imported so far, and the interpreter's last
    collection at exit scans them all once more: seconds of a short run on a CPU (docs/speed.md). Objects frozen
    are never collected; these live until the process ends anyway. Once a process (a later call imports nothing new
    and freezes nothing more)."""
    import gc
    import importlib

    global _settled
    if _settled:
        return
    _settled = True
    was = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        if was:
            gc.enable()
    gc.freeze()


YOUNG_GC_THRESHOLD = 20_000


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects that exist now (the model, the modules, the caller's) out of the cyclic garbage collector's
    scans while a slide runs (:func:`gc.freeze`), then hand them back (:func:`gc.unfreeze`).

    The stitch loop makes and frees tens of thousands of small objects per slide (candidates, nuclei, tuples); each
    of the collections they trigger scanned the objects already there too, torch's included: a quarter of the main
    thread's CPU in the loop (docs/speed.md). Objects that exist at the start are live anyway; the loop's own
    objects are still collected as before. A process whose imports are frozen already (:func:`import_settled`, the
    command line's) keeps them so and freezes nothing more: gc has no partial unfreeze."""
    import gc

    mine = gc.get_freeze_count() == 0
    if mine:
        gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], YOUNG_GC_THRESHOLD), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        if mine:
            gc.unfreeze()
