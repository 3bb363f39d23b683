"""Worker processes of a run: fresh interpreters (``python -m MODULE``) talking through pipes, and the shared
memory-mapped slabs they exchange label images in. Used by the tile pool (:mod:`wsiseg.parallel.tiles`), the
predicting process (:mod:`wsiseg.parallel.predict`), the zarr label painter (:mod:`wsiseg.export.zarr_labels`) and
the GeoJSON writer (:mod:`wsiseg.export.geojson`); the last two are :class:`Helper` processes. Standard library only:
it imports nothing of the package but its errors (when it raises them)."""

from __future__ import annotations


def slab_file(size: int) -> str | None:
    """A file of ``size`` bytes, its blocks reserved (so that a full ``/dev/shm``, 64 MB in a default Docker
    container, fails here rather than as SIGBUS on a later write): in ``/dev/shm`` where it fits, else in the temp
    directory; ``None`` when neither has room."""
    import os
    import tempfile

    for d in ("/dev/shm", None):
        if d is not None and not os.path.isdir(d):
            continue
        remove_dead_slabs(d or tempfile.gettempdir())
        fd, path = tempfile.mkstemp(prefix=f"{SLAB_PREFIX}{os.getpid()}-", dir=d)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
            return path
        except OSError:
            os.unlink(path)
        finally:
            os.close(fd)
    return None


SLAB_PREFIX = "wsiseg-tiles-"  # + the owner's pid + "-": a slab whose owner is dead (killed) is removed by the next


def remove_dead_slabs(directory: str) -> int:
    """Remove the slab files in ``directory`` whose owning process no longer exists (left by a run killed with
    SIGKILL, which cleans nothing up); returns how many. Slabs of live processes, or of other users', stay."""
    import os

    removed = 0
    try:
        names = [n for n in os.listdir(directory) if n.startswith(SLAB_PREFIX)]
    except OSError:
        return 0
    for name in names:
        pid_text = name[len(SLAB_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):  # another user's live process, or no such pid range
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except OSError:
            pass
    return removed


def remove_slab(path: str | None) -> None:
    """Delete a :func:`slab_file` (if any, and if still there)."""
    import os

    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


#: ``python -c _BOOT MODULE ARGS...``: ``python -m MODULE ARGS...`` without the current directory on the path
_BOOT = ("import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; "
         "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def spawn_worker(module: str, spec: str, grow: str = "results"):
    """``python -m MODULE JOBS_FD RESULTS_FD SPEC`` as a fresh interpreter (it imports what it needs, never the
    caller's main script or torch), with ``wsiseg`` importable there however the caller found it, and only that
    ``wsiseg`` (not one in the current directory). Returns ``(process,
    jobs, results)``: the two ends of its pipes as ``multiprocessing`` connections (``grow``: the pipe, ``"jobs"``
    or ``"results"``, enlarged to hold 1 MB where Linux allows). Raises ``OSError`` when it cannot start."""
    import os
    import subprocess
    import sys
    from multiprocessing.connection import Connection
    from pathlib import Path

    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])  # the directory holding the wsiseg package
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    jr, jw = os.pipe()
    rr, rw = os.pipe()
    _grow_pipe(jw if grow == "jobs" else rw)
    try:
        # never the current directory first on the path (what ``-m`` puts there): a run started inside another
        # checkout of wsiseg would give its workers that other code (-P: Python 3.11+; before, the same by hand)
        boot = ["-P", "-m", module] if sys.version_info >= (3, 11) else ["-c", _BOOT, module]
        proc = subprocess.Popen([sys.executable, *boot, str(jr), str(rw), spec], pass_fds=(jr, rw),
                                stdin=subprocess.DEVNULL, env=env)
    except BaseException:
        for fd in (jw, rr):
            os.close(fd)
        raise
    finally:
        os.close(jr)
        os.close(rw)
    return proc, Connection(jw, readable=False), Connection(rr, writable=False)


def end_worker(proc, kill: bool) -> None:
    """End a :func:`spawn_worker` process: kill it at once (``kill``), or wait for it to exit by itself (it does
    once its jobs pipe is closed or sent ``None``), killing it after 30 s."""
    import subprocess

    if kill:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Let a pipe hold ``size`` bytes (Linux; elsewhere, or beyond the system's limit, it stays as it is), so that
    a worker writes a whole result at once and the main thread reads it in one call."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):
        pass


def ready_check(conn):
    """``check()``: whether ``conn`` has something to read, or its other end is closed, without waiting (what
    ``conn.poll()`` says), through one ``select.poll`` object made here: ``Connection.poll`` builds a selector per
    call, which cost the caller more than handing a tile's GeoJSON features over (docs/speed.md)."""
    import select

    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    return lambda: bool(p.poll(0))


class Helper:
    """A helper process of a run that is fed messages in order and answers once, at the end (the zarr label painter,
    the GeoJSON writer): started by :meth:`start` (a :func:`spawn_worker` running :func:`serve`), sent messages by
    :meth:`send` (pickled, or ``raw`` bytes), ended by :meth:`finish` (which returns its answer) or :meth:`kill`.
    Its first error (an ``OSError``: disk full, say) comes back at once and is raised here at the next
    :meth:`send` or at :meth:`finish`, as the ``OSError`` it was (a bug: an ``OutputError`` with its traceback); a
    dead process is a one-line ``ProcessDied``. ``name`` says what it is in those messages."""

    def __init__(self, proc, jobs, results, name: str, raw: bool = False) -> None:
        self.proc, self.jobs, self.results, self.name, self.raw = proc, jobs, results, name, raw
        self._errored = ready_check(results)  # (an error came back: checked at every send)

    @classmethod
    def start(cls, module: str, spec: str, name: str, instead: str, raw: bool = False) -> "Helper | None":
        """The process ``python -m module ... spec``; None, and a warning saying what happens ``instead``, when it
        cannot start."""
        import warnings

        try:
            return cls(*spawn_worker(module, spec, grow="jobs"), name, raw)
        except OSError as e:
            warnings.warn(f"the {name} did not start ({e}); {instead}", RuntimeWarning, stacklevel=3)
            return None

    def send(self, msg, path) -> None:
        """Hand ``msg`` over (blocks only while the process is a full pipe behind); raises its error, if any."""
        if self._errored():
            self._raise(self._recv(path), path)
        try:
            if self.raw:
                self.jobs.send_bytes(msg)
            else:
                self.jobs.send(msg)
        except (OSError, ValueError):
            self._died(path)

    def finish(self, path) -> tuple:
        """Tell it to end, wait for its answer (``("ok", ...)``, returned) and its exit; raises its error."""
        try:
            self.send(b"" if self.raw else None, path)
            reply = self._recv(path)
            if reply[0] != "ok":
                self._raise(reply, path)
            return reply
        finally:
            self.kill(wait_first=True)

    def kill(self, wait_first: bool = False) -> None:
        """Close the pipes and end the process: killed at once, or (``wait_first``) after it exits by itself."""
        for c in (self.jobs, self.results):
            try:
                c.close()
            except OSError:
                pass
        end_worker(self.proc, kill=not wait_first)

    def _recv(self, path) -> tuple:
        try:
            return self.results.recv()
        except (EOFError, OSError):
            self._died(path)

    def _died(self, path):
        from ..core.errors import ProcessDied

        raise ProcessDied(f"{path}: the {self.name} died (killed from outside?)") from None

    def _raise(self, reply: tuple, path) -> None:
        from ..core.errors import OutputError

        if reply[0] == "error":
            raise OSError(reply[1], reply[2])
        raise OutputError(f"{path}: the {self.name} failed:\n{reply[1]}")


def serve(argv: list[str], begin, handle, end, raw: bool = False) -> None:
    """The loop of a :class:`Helper`'s process (``python -m MODULE JOBS_FD RESULTS_FD SPEC``): ``state =
    begin(spec)`` (the JSON ``SPEC``), ``handle(state, message)`` for each message in order until the end (``None``,
    or an empty message when ``raw``), then answers ``("ok", *end(state))``. Its first error is answered at once
    and again at the end, and the messages after it are read and dropped; when the caller is gone, it just
    returns."""
    import json
    import signal
    import traceback
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which then stops this one
    jobs, results = Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False)
    err, state, reply = None, None, None

    def failed(e: BaseException) -> tuple:
        if isinstance(e, OSError):
            return "error", e.errno, e.strerror or str(e)
        return "bug", traceback.format_exc()

    try:
        state = begin(json.loads(argv[2]))
    except Exception as e:
        err = failed(e)
        results.send(err)
    while True:
        try:
            msg = jobs.recv_bytes() if raw else jobs.recv()
        except (EOFError, OSError):
            return  # the caller is gone: it discards what was written
        if (not msg) if raw else msg is None:
            break
        if err is not None:
            continue
        try:
            handle(state, msg)
        except Exception as e:
            err = failed(e)
            results.send(err)
    if err is None:
        try:
            reply = ("ok", *end(state))
        except Exception as e:
            err = failed(e)
    results.send(err if err is not None else reply)
