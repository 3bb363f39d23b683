"""Reading and predicting in a process of their own (``segment_slide(predict_process=True)``, ``wsiseg run
--predict-process``).

In one process, the threads that read tiles and drive the model share the interpreter lock with the main loop,
which stitches and writes, so the predicting thread waits for the lock (docs/speed.md). :class:`PredictProcess`
moves reading and predicting into a fresh interpreter, ``python -m wsiseg.parallel.predict``, started like the tile
workers
(:func:`wsiseg.parallel.workers.spawn_worker`). It runs the same code as the main process would
(:func:`wsiseg.wsi.grid.iter_batches` and :func:`~wsiseg.wsi.grid.predict_ahead`, a batch ahead or not, as there) with
the same model file, settings (:meth:`wsiseg.segmenters.rcnn.PDAMSegmenter.settings`), tiles and batches, so the outputs
are the same (tested). It writes each batch's label images and tiles into a shared memory-mapped ring of ``slots``
batches and sends the rest (tile ids, scores, timings) through a pipe; the main process copies the labels and pixels
out and hands the slot back (the stain measurements are made from the pixels where the tiles are prepared: in the
tile workers when there are some, not here, where reading and predicting feed the model). The main process then
only stitches and writes, with the interpreter lock to itself.

Errors: a user error in the process (a corrupt tile: :class:`~wsiseg.core.errors.InputError`) is raised in the main
process as the same class with the same one-line message; a bug keeps its traceback; a process that dies (killed,
out of memory) gives a one-line :class:`~wsiseg.core.errors.ProcessDied`, and the run's progress is kept for
``--resume``, as when a run is interrupted. PDAM models loaded from a file only (the process loads the file
again, so changes made to the model's weights in memory are not seen there): :func:`check` says why not otherwise.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator, NoReturn

import numpy as np

from ..core.errors import ConfigError, ModelError, ProcessDied
from ..options import RunOptions
from ..segmenters.base import Segmenter, SegmenterInfo, Settable, TileInstances, describe
from ..wsi.grid import TileGrid
from .tiles import map_slab, slab_bytes
from .workers import end_worker, remove_slab, slab_file, spawn_worker


def check(seg: Segmenter) -> SegmenterInfo:
    """ConfigError unless ``seg`` can be rebuilt in another process: a PDAM model loaded from a file (and the
    members of its ensemble too), :class:`~wsiseg.segmenters.base.Settable`; else its description."""
    info = describe(seg)
    if info.source is None or not isinstance(seg, Settable) or None in info.member_sources:
        raise ConfigError(f"--predict-process needs a PDAM model loaded from a file, not {info.name}")
    return info


class PredictProcess:
    """``predict_ahead(iter_batches(read, tiles, options.batch_size, read_workers), with_pixels(seg.predict),
    int(options.prefetch))`` in a process of its own, reading with ``options.backend``: the run's own prediction,
    each tile's pixels with its instances (:func:`wsiseg.wsi.stains.with_pixels`).

    ``options``: the run's, resolved (:attr:`wsiseg.wsi.run.SlideRun.opts`: a batch size, prefetch and the slide
    reader set); the model is ``seg``'s file with its settings (:meth:`~wsiseg.segmenters.rcnn.PDAMSegmenter.settings`,
    which hold what the model options set and anything set on ``seg`` directly).

    The process starts here and loads the model while the caller does other work (the tissue mask); then
    :meth:`predict` ``(tiles)`` yields ``(tile_ids, [TileInstances], read_wait_s, predict_s, predict_wait_s)`` per
    batch, in the order of ``tiles``, as :func:`~wsiseg.wsi.grid.predict_ahead` does: the first two figures as the
    process measured them, the last the seconds this side waited for the batch. One :meth:`predict` per process.
    Use as a context manager: leaving it stops the process (killed when leaving on an error) and removes the ring.
    """

    def __init__(self, seg: Segmenter, path: str, grid: TileGrid, options: RunOptions, read_workers: int,
                 slots: int = 3) -> None:
        info = check(seg)
        import dataclasses
        import json

        import torch

        from ..core import runtime

        if options.batch_size is None or options.prefetch is None or options.backend == "auto":
            raise ValueError("PredictProcess: options must be resolved (batch_size, prefetch, a slide reader)")
        T = grid.tile
        self.shape = (max(2, int(slots)), max(1, int(options.batch_size)), T, T)
        self._slab_path = slab_file(slab_bytes(self.shape))  # None: no room, labels and pixels go through the pipe
        spec = json.dumps({"model": info.source, "device": info.device, "settings": seg.settings(),
                           "threads": torch.get_num_threads(), "keep_freed_memory": runtime.freed_memory_kept(),
                           "path": str(path), "grid": dataclasses.asdict(grid),
                           "options": options.replace(model=info.source).to_dict(),
                           "read_workers": int(read_workers), "slab": self._slab_path, "shape": self.shape})
        self._slab = self._pixels = None
        try:
            self._proc, self._jobs, self._results = spawn_worker("wsiseg.parallel.predict", spec, grow="results")
        except OSError as e:
            remove_slab(self._slab_path)
            self._slab_path = None
            raise ModelError(f"cannot start the predicting process ({e})") from None
        if self._slab_path is not None:
            self._slab, self._pixels = map_slab(self._slab_path, self.shape, "r")

    def __enter__(self) -> "PredictProcess":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)

    def predict(self, tiles: list[tuple[int, int]], stage: Callable[[list], list] | None = None
                ) -> Iterator[tuple[list[tuple[int, int]], list[TileInstances], float, float, float]]:
        """``(tile_ids, [TileInstances], read_s, predict_s, wait_s)`` per batch of ``tiles``, read and predicted by the
        process. ``stage`` (the tile pool's :meth:`~wsiseg.parallel.tiles.TilePool.stage`) gets each batch's
        instances while they still view the process' ring and copies them where they go next, or gives the same
        list back; those are copied out of the ring here."""
        import time

        self._send([(int(r), int(c)) for r, c in tiles])
        while True:
            t0 = time.perf_counter()
            msg = self._recv()
            wait = time.perf_counter() - t0
            if msg[0] == "done":
                return
            _, slot, ids, scores, inline, t_read, t_pred, sharpened = msg
            out = []
            for k, (sc, here) in enumerate(zip(scores, inline)):  # (views of the ring's slot, or sent inline)
                lab, px = (self._slab[slot, k], self._pixels[slot, k]) if here is None else here
                out.append(TileInstances(lab, sc, pixels=px, sharpened=sharpened[k]))
            if slot is not None:
                staged = stage(out) if stage is not None else out
                if staged is out:  # (not put elsewhere: copied out of the ring before the slot is given back)
                    staged = [TileInstances(np.array(t.labels), t.scores, pixels=np.array(t.pixels),
                                            sharpened=t.sharpened) if here is None
                              else t for t, here in zip(out, inline)]
                out = staged
                try:  # copied out: the process may fill the slot again (unless it is through: then it has closed its
                    self._jobs.send(slot)  # end, and a death shows at the next message)
                except OSError:
                    pass
            yield [tuple(i) for i in ids], out, t_read, t_pred, wait

    def _send(self, msg: Any) -> None:
        try:
            self._jobs.send(msg)
        except OSError:  # the process stopped before it took the tiles: its error, if it sent one
            self._recv()
            self._died()

    def _recv(self) -> tuple:
        """The process' next message; its error raised here (the same class and message for a user error)."""
        try:
            msg = self._results.recv()
        except (EOFError, OSError):
            self._died()
        if msg[0] == "error":
            from ..core import errors

            cls = getattr(errors, msg[1], None)
            if not (isinstance(cls, type) and issubclass(cls, errors.WsisegError)):
                cls = ModelError
            raise cls(msg[2])
        if msg[0] == "bug":
            raise RuntimeError(f"the predicting process failed:\n{msg[1]}")
        return msg

    def _died(self) -> NoReturn:
        import subprocess

        rc = self._proc.poll()
        if rc is None:
            try:
                rc = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # still running, its pipe broken: stop it
                self._proc.kill()
                rc = self._proc.wait()
        raise ProcessDied(f"the predicting process died (exit status {rc}: killed from outside, or out of memory?)")

    def close(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        try:
            if not kill:
                self._jobs.send(None)
        except OSError:
            pass
        self._jobs.close()
        end_worker(self._proc, kill)
        self._results.close()
        self._proc = None
        self._slab = self._pixels = None
        remove_slab(self._slab_path)
        self._slab_path = None


# ------------------------------------------------------------------------------------------ the process itself
def _serve(jobs: Any, results: Any, spec: dict) -> None:
    """Load the model and open the slide as ``spec`` says, receive the tiles, then read and predict them in
    batches, each into a free slot of the ring (or through the pipe), until done or told to stop (``None``)."""
    import signal
    import traceback
    from contextlib import closing

    from ..core.errors import WsisegError

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which then stops this one
    try:
        from ..core.runtime import import_settled, quick_gil_handover

        import_settled()
        import torch

        from ..io.slide import open_slide
        from ..segmenters.rcnn import PDAMSegmenter
        from ..wsi.grid import iter_batches, predict_ahead, tile_reader
        from ..wsi.stains import with_pixels

        if spec["keep_freed_memory"]:  # as the main process does (the command line's)
            from ..core.runtime import keep_freed_memory

            keep_freed_memory()
        torch.set_num_threads(int(spec["threads"]))
        seg = PDAMSegmenter.from_settings(spec["model"], spec["device"], spec["settings"])
        shape = tuple(spec["shape"])
        slab = pixels = None
        if spec["slab"] is not None:
            slab, pixels = map_slab(spec["slab"], shape, "r+")
        free = deque(range(shape[0]))
        tiles = jobs.recv()
        if tiles is None:
            return
        grid = TileGrid(**spec["grid"])
        opts = RunOptions.from_dict(spec["options"])
        path, backend = spec["path"], opts.backend
        with open_slide(path, backend, opts.icc_profile) as slide, quick_gil_handover():
            batches = iter_batches(tile_reader(slide, path, backend, grid), [tuple(t) for t in tiles],
                                   opts.batch_size, workers=spec["read_workers"])
            with closing(predict_ahead(batches, with_pixels(seg.predict), depth=int(opts.prefetch))) as predicted:
                for ids, res, t_read, t_pred, _ in predicted:
                    while not free or jobs.poll():  # slots handed back (waiting when none is free)
                        msg = jobs.recv()
                        if msg is None:
                            return
                        free.append(msg)
                    slot = free.popleft() if slab is not None else None
                    inline: list = []
                    for k, inst in enumerate(res):
                        if slot is not None and inst.labels.shape == shape[2:]:
                            slab[slot, k] = inst.labels
                            pixels[slot, k] = inst.pixels
                            inline.append(None)
                        else:
                            inline.append((inst.labels, inst.pixels))
                    if slot is not None and all(x is not None for x in inline):
                        free.appendleft(slot)  # (not used after all)
                        slot = None
                    results.send(("batch", slot, ids, [inst.scores for inst in res], inline, t_read, t_pred,
                                  [inst.sharpened for inst in res]))
        results.send(("done",))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the main process is gone
    except WsisegError as e:
        _reply(results, ("error", type(e).__name__, str(e)))
    except Exception:  # a bug: reported by the main process with its traceback
        _reply(results, ("bug", traceback.format_exc()))


def _reply(results: Any, msg: tuple) -> None:
    try:
        results.send(msg)
    except OSError:
        pass


def _main(argv: list[str]) -> None:
    """``python -m wsiseg.parallel.predict JOBS_FD RESULTS_FD SPEC``: one :class:`PredictProcess` (see
    :func:`_serve`)."""
    import json
    from multiprocessing.connection import Connection

    _serve(Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False), json.loads(argv[2]))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
