"""Cohorts of slides across a dask.distributed cluster: ``wsiseg run ... --scheduler tcp://host:8786`` or
``--cluster local --workers N``.

Design (one task per slide; nothing home-made: scheduling, retries and worker failure handling are dask's):

- **What moves over the network per slide**: the slide's path and its output paths in (a few hundred bytes), a
  small summary dict out (tiles, nuclei, seconds, outputs). Pixels never move: slides are opened *on the worker* by
  path (so every worker must see the slides and the output directory at the same paths: shared storage) and
  outputs are written there by the worker.
- **The model is loaded once per worker**: :class:`ModelPlugin` (a dask ``WorkerPlugin``, registered under a name
  keyed by the model spec) loads ``--model`` on the worker's device when the worker starts (and on every worker that
  joins or is restarted later); tasks look it up by that key and never ship weights.
- **Failures**: a worker that dies loses only its in-flight slides; the scheduler reassigns them, and tasks are
  submitted with ``retries=2``. Outputs are written atomically (temp name + rename), so a slide is either finished
  (all its outputs exist) or not; a re-run skips finished slides (unless ``overwrite``), which makes resuming after a
  crash cheap. A slide redone after a worker died resumes from the journal of finished tile rows its killed attempt
  left beside the output (``segment_slide(resume=True)``), with the same result as an uninterrupted run. GeoJSON ids
  are deterministic (``segment_slide``'s default seed: a hash of the input's name and size and of the parameters),
  so a cohort run writes what a single-process ``wsiseg run`` / ``segment_slide`` of each slide writes, and a slide
  redone twice (a worker wrongly declared dead) writes the same bytes.
- **Per-slide errors**: an :class:`~wsiseg.core.errors.InputError` (unreadable slide, no MPP, ...) fails that slide
  only; it is reported in the summary/manifest and the run exits with code 3 (other wsiseg errors: their own code).

Entry point: :func:`run_cohort` (called by ``wsiseg run`` with the parsed arguments).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..core.errors import ConfigError, InputError, WsisegError
from ..io.slide import slide_label
from ..options import Outputs, RunOptions
from ..segmenters.registry import source_label

PROGRESS_TOPIC = "wsiseg-progress"
MANIFEST_FIELDS = ("input", "status", "tiles_total", "tiles_segmented", "nuclei", "tissue_mm2", "nuclei_per_mm2",
                   "mean_area_um2", "seconds", "worker", "geojson", "zarr", "preview", "error")

# Models loaded on this (worker) process, keyed by model spec; filled by ModelPlugin.setup.
_MODELS: dict[str, Any] = {}
_LOCKS: dict[str, threading.Lock] = {}
_MODELS_LOCK = threading.Lock()


def model_key(model: str, device: str) -> str:
    """The key a model is cached under on workers: the spec, the device, and for files their size and mtime (so a
    retrained checkpoint under the same path is reloaded)."""
    p = Path(model)
    stamp = ""
    try:
        if model not in ("default", "watershed") and p.exists():
            st = p.stat()
            stamp = f":{st.st_size}:{int(st.st_mtime_ns)}"
    except OSError:
        pass
    return f"wsiseg-model:{model}:{device}{stamp}"


try:  # the plugin base class; distributed is an optional dependency of the package
    from distributed import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - only without dask.distributed installed
    _WorkerPluginBase = object


class ModelPlugin(_WorkerPluginBase):
    """Loads ``model`` on ``device`` once per worker process (at registration, and on workers that join later).

    Only the spec travels (it pickles to a few bytes); a loading error (``ModelError``) is raised on the client by
    ``Client.register_plugin``. Registering the same key again is a no-op (``idempotent``), so repeated cohorts on a
    long-lived cluster reuse the loaded model.
    """

    idempotent = True

    def __init__(self, model: str, device: str) -> None:
        self.model = model
        self.device = device
        self.key = model_key(model, device)

    def setup(self, worker: Any = None) -> None:
        _get_model(self.key, self.model, worker_device(self.device, getattr(worker, "name", None)))

    def teardown(self, worker: Any = None) -> None:
        with _MODELS_LOCK:
            _MODELS.pop(self.key, None)


def worker_device(device: str, worker_name: Any) -> str:
    """The device a worker loads its model on: ``device``, except that on a machine where a worker sees several
    GPUs (a plain LocalCluster, not dask-cuda's one-GPU-per-worker) worker ``k`` takes GPU ``k mod n``."""
    if device not in ("auto", "cuda") or not isinstance(worker_name, int):
        return device
    n = _cuda_count()
    return f"cuda:{worker_name % n}" if n > 1 else device


def _get_model(key: str, model: str, device: str) -> Any:
    with _MODELS_LOCK:
        seg = _MODELS.get(key)
        if seg is None:
            from ..api import load_model

            seg = _MODELS[key] = load_model(model, device)
            _LOCKS[key] = threading.Lock()
        return seg


@dataclass
class SlideResult:
    """One row of the summary table and manifest."""

    input: str
    status: str  # "done" | "skipped" | "failed"
    tiles_total: int = 0
    tiles_segmented: int = 0
    nuclei: int = 0
    tissue_mm2: float | None = None
    nuclei_per_mm2: float | None = None
    mean_area_um2: float | None = None
    seconds: float = 0.0
    worker: str = ""
    geojson: str | None = None
    zarr: str | None = None
    preview: str | None = None
    error: str = ""
    exit_code: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def segment_task(path: str, outputs: dict[str, Any], options: dict[str, Any], key: str, model: str,
                 device: str, index: int, topic: str = PROGRESS_TOPIC) -> dict[str, Any]:
    """The task run on a worker for one slide: opens the slide by path, uses the worker's loaded model, writes the
    outputs (:meth:`Outputs.to_dict <wsiseg.options.Outputs.to_dict>`, atomically) with the cohort's options
    (:meth:`RunOptions.to_dict <wsiseg.options.RunOptions.to_dict>`; ``resume`` always: a retried task continues
    what its killed attempt journalled) and returns a small summary dict. wsiseg errors come back as
    ``{"error": ...}`` (they would fail again on another worker, so they are not retried); anything else raises and
    dask retries it."""
    from ..api import segment_slide

    worker_addr = _worker_address()
    progress = _progress_reporter(index, topic)
    t0 = time.perf_counter()
    try:
        seg = _get_model(key, model, device)  # loaded by ModelPlugin at worker start; here only if that failed
        opts = RunOptions.from_dict(options).replace(model=seg, resume=True)
        with _LOCKS[key]:  # a model is not re-entrant (calibrate() sets per-slide state): one slide at a time per model
            s = segment_slide(path, Outputs.from_dict(outputs), opts, progress=progress)
    except WsisegError as e:
        return {"error": str(e), "exit_code": e.exit_code, "input_error": isinstance(e, InputError),
                "worker": worker_addr, "seconds": time.perf_counter() - t0}
    row = s.table_row()
    return {"tiles_total": s.tiles_total, "tiles_segmented": s.tiles_segmented, "nuclei": s.nuclei,
            **{k: row[k] for k in ("tissue_mm2", "nuclei_per_mm2", "mean_area_um2")},
            "seconds": s.seconds, "worker": worker_addr, "stage_seconds": s.stage_seconds}


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return ""


def _progress_reporter(index: int, topic: str, every: float = 0.5):
    """Tile progress of one slide, sent to the client as dask events at most every ``every`` seconds."""
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return False
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < every:
            return
        last[0] = now
        try:
            w.log_event(topic, {"index": index, "done": int(done), "total": int(total)})
        except Exception:  # progress is best effort, never a reason to fail a slide
            pass

    return report


# ----------------------------------------------------------------------------------------------------- client side
def _outputs(outputs: Outputs | dict[str, Any]) -> Outputs:
    return outputs if isinstance(outputs, Outputs) else Outputs.from_dict(outputs)


def is_finished(outputs: Outputs | dict[str, Any]) -> bool:
    """True when every requested output of a slide exists (outputs appear only when complete: atomic writes) and no
    journal of an interrupted run is left beside its main output."""
    wanted = list(_outputs(outputs).files().values())
    return bool(wanted) and all(Path(v).exists() for v in wanted) and not _journal(outputs).is_dir()


def made_otherwise(outputs: Outputs | dict[str, Any], options: RunOptions, slide: Path | None = None) -> str | None:
    """How the run that wrote a slide's existing GeoJSON differs from one with ``options`` and ``outputs``' objects,
    by what its header records (e.g. ``"model 'default' -> 'vesicular', slide_mpp 0.25 -> 0.3"``): the model and an
    ensemble's members (by their files: :func:`~wsiseg.segmenters.registry.source_label`), test-time views, semantic
    fusion, the tissue mask, the regions of interest (by their file; ``slide``: the slide, for a folder of them),
    cells; the score threshold, scale, zoom and overlap where ``options`` give them (else they are the model's or the
    slide's, which the header cannot be held to). Not the tile size (fitted to a small image) nor the arithmetic
    (``--precision``, the device: a few scores' last digits). None when nothing differs, or there is no such file or
    header. A finished slide is skipped only then."""
    from ..export.geojson import read_header
    from ..io.regions import regions_file_of

    outs = _outputs(outputs)
    if not outs.geojson or not Path(outs.geojson).is_file():
        return None
    head = read_header(outs.geojson)
    if not head:
        return None
    tta = options.tta if not isinstance(options.tta, bool) else 4 if options.tta else 0
    roi = head.get("roi") if isinstance(head.get("roi"), dict) else {}
    roi_now = regions_file_of(options.roi, slide)
    pairs = [("model", head.get("model_source") or head.get("model"), source_label(options.model)),
             ("ensemble", head.get("ensemble", []), [source_label(m) for m in options.ensemble]),
             ("tta", head.get("tta", 0), int(tta or 0)),
             ("semantic_fusion", bool(head.get("semantic_fusion")), bool(options.semantic_fusion)),
             ("tissue_mask", head.get("tissue_mask", True), bool(options.use_tissue_mask)),
             ("roi", roi.get("file") and str(Path(roi["file"]).resolve()), str(roi_now) if roi_now else None),
             ("objects", head.get("objects", "nuclei"), outs.objects),
             ("cell_expansion_um", head.get("cell_expansion_um"), outs.cell_expansion if outs.objects == "cells"
              else None)]
    if options.icc_profile == "ignore":
        pairs.append(("icc_profile", head.get("icc_profile"), None))
    for key, given, was in (("min_score", options.min_score, "min_score"), ("slide_mpp", options.mpp, "slide_mpp"),
                            ("zoom", None if options.zoom == "auto" else options.zoom, "zoom"),
                            ("overlap", options.overlap, "overlap")):
        if given is not None:
            pairs.append((key, head.get(was), round(float(given), 4) if key == "min_score" else given))
    diff = [f"{k} {was!r} -> {now!r}" for k, was, now in pairs if not _same(was, now)]
    return ", ".join(diff) or None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(abs(float(b)), 1.0)
    return a == b


def check_kept(outputs: Outputs | dict[str, Any], options: RunOptions, slide: Path | None = None) -> None:
    """ConfigError when a finished slide's GeoJSON, about to be skipped, was made with other options
    (:func:`made_otherwise`): skipped, a run with new options would report it done with the old ones' nuclei."""
    why = made_otherwise(outputs, options, slide)
    if why:
        raise ConfigError(f"{_outputs(outputs).geojson}: made with other options ({why}); pass --overwrite to redo "
                          "it with these, or write to another folder")


#: the outputs made from the GeoJSON, which a finished slide can be given without being segmented again
DERIVED = ("table", "dicom_ann")


def is_derivable(outputs: Outputs | dict[str, Any]) -> bool:
    """True when a slide is finished but for outputs made from its GeoJSON (a table, DICOM annotations: asked for
    on a later run of the cohort), which :func:`derive` then makes from the GeoJSON instead of segmenting it
    again."""
    outs = _outputs(outputs)
    files = outs.files()
    wanted = [v for k, v in files.items() if k not in DERIVED]
    missing = [v for k, v in files.items() if k in DERIVED and not Path(v).exists()]
    return bool(wanted) and bool(missing) and all(Path(v).exists() for v in wanted) and not _journal(outs).is_dir()


def derive(path: Path, outputs: Outputs) -> SlideResult:
    """A finished slide's missing table and DICOM annotations, made from its GeoJSON (as ``wsiseg export``): a
    "skipped" row (its segmentation kept), or a "failed" one with the error."""
    from ..export.dicom_ann import annotated_slide, write_annotations
    from ..export.table import write_table

    t0 = time.perf_counter()
    row = SlideResult(str(path), "skipped", geojson=outputs.geojson, zarr=outputs.zarr, preview=outputs.preview)
    try:
        if outputs.table and not Path(outputs.table).exists():
            write_table(outputs.geojson, outputs.table, existed=False)
        if outputs.dicom_ann and not Path(outputs.dicom_ann).exists():
            main, origin, image = annotated_slide(path)
            write_annotations(outputs.geojson, main, outputs.dicom_ann, origin=origin, image=image, existed=False)
    except WsisegError as e:
        return SlideResult(str(path), "failed", error=str(e), exit_code=e.exit_code,
                           seconds=time.perf_counter() - t0)
    return row


def _journal(outputs: Outputs | dict[str, Any]) -> Path:
    from ..wsi.resume import journal_dir

    main = _outputs(outputs).main
    return journal_dir(main) if main else Path("/nonexistent/.wsiseg-resume")


def _options(args: Any, model: str) -> RunOptions:
    """The cohort's options for its workers: ``wsiseg run``'s (:meth:`RunOptions.from_args`), the model and the
    ensemble's files as absolute paths (workers may run elsewhere: shared storage), no tile workers unless asked
    for (a worker is one of many processes already) and the batch size left to each worker's device."""
    from ..api import BUNDLED_MODELS

    o = RunOptions.from_args(args)
    return o.replace(model=model, ensemble=[m if m in BUNDLED_MODELS else str(Path(m).resolve()) for m in o.ensemble],
                     tile_workers=o.tile_workers or 0, batch_size=getattr(args, "batch_size", None))


def _manifest_format(path: str | None) -> str | None:
    if not path:
        return None
    low = path.lower()
    if low.endswith(".csv"):
        return "csv"
    if low.endswith(".json"):
        return "json"
    raise ConfigError(f"--manifest {path}: expected a .csv or .json file name")


def _start_cluster(args: Any) -> tuple[Any, Any]:
    """(client, cluster we started or None)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--scheduler/--cluster need dask.distributed: pip install 'wsiseg[distributed]'") from None

    scheduler = getattr(args, "scheduler", None)
    if scheduler:
        _probe_scheduler(scheduler)
        try:
            return Client(scheduler, timeout="10s", set_as_default=False), None
        except (OSError, TimeoutError, ValueError, MemoryError) as e:  # MemoryError: something else answered
            msg = (f"--scheduler {scheduler}: something listens there but did not answer as a dask scheduler"
                   if isinstance(e, MemoryError) else f"--scheduler {scheduler}: cannot connect: {e}")
        _collect_quietly()  # the half-made Client's __del__ would print a traceback of its own
        raise ConfigError(msg)
    workers = getattr(args, "workers", None)
    device = getattr(args, "device", "auto")
    cluster = None
    if device != "cpu" and _cuda_count() > 0:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            LocalCUDACluster = None
        if LocalCUDACluster is not None:  # one worker per GPU (CUDA_VISIBLE_DEVICES set per worker)
            kw = {"n_workers": workers} if workers else {}
            cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR, **kw)
        elif not workers:  # without dask-cuda: one plain worker per GPU, each picks its GPU (worker_device)
            workers = _cuda_count()
    if cluster is None:
        cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=":0", silence_logs=logging.ERROR)
    try:
        return Client(cluster, set_as_default=False), cluster
    except BaseException:
        cluster.close()
        raise


SCHEDULER_PROBE_SECONDS = 5.0


def _nanny_environ() -> tuple[str, ...]:
    """What dask's Nanny sets in the parent's ``os.environ`` before it spawns each worker (its ``pre-spawn-environ``:
    OMP_, MKL_, OPENBLAS_NUM_THREADS=1, ...) and never takes back: left there, the caller's own numpy and torch
    would run on one thread after a cohort."""
    import dask

    return tuple(dask.config.get("distributed.nanny.pre-spawn-environ", None) or ())


@contextlib.contextmanager
def _environ_kept(names: Sequence[str]) -> Iterator[None]:
    """``os.environ[name]`` for each of ``names`` as it was before, once the block is left (set again or removed)."""
    before = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _collect_quietly() -> None:
    """Collect garbage with unraisable exceptions (those of __del__ methods) silenced."""
    import gc

    hook, sys.unraisablehook = sys.unraisablehook, (lambda _: None)
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _probe_scheduler(address: str) -> None:
    """A one-line ConfigError, at once, for an address that is not ``[tcp://]host:port`` or where nothing listens
    (dask's Client would trace back after its 20 s timeout, then again when collected)."""
    import re
    import socket

    m = re.fullmatch(r"(?:(tcp|tls)://)?(\[[^\]]+\]|[^:/\s]+):(\d{1,5})", address.strip())
    if not m:
        raise ConfigError(f"--scheduler {address}: not a scheduler address (expected tcp://host:port, e.g. "
                          "tcp://10.0.0.5:8786)")
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=SCHEDULER_PROBE_SECONDS).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ConfigError(f"--scheduler {address}: cannot reach {host}:{port} ({why}); is the scheduler running "
                          "there?") from None


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


def run_cohort(jobs: Sequence[tuple[Path, Outputs | dict[str, Any]]], args: Any, client: Any = None) -> int:
    """Segment every ``(slide, outputs)`` job on a dask cluster; return the process exit code.

    ``jobs``' outputs: :class:`~wsiseg.options.Outputs` (or their dicts). ``args`` carries the ``wsiseg run`` options:
    the cohort's own (scheduler, cluster, workers, manifest, overwrite, resume, quiet) and the fields of
    :class:`~wsiseg.options.RunOptions` (missing ones default). ``client``, if given, is used as is (and not
    closed) instead of connecting/starting a cluster. Slides whose outputs all exist are skipped unless
    ``args.overwrite``. Exit code: 0, or 3 when a slide failed with an input error (another wsiseg error: its code;
    an unexpected failure after the retries: 1).
    """
    from ..core.atomic import check_writable

    t_start = time.time()
    if getattr(args, "scheduler", None) and getattr(args, "cluster", None):
        raise ConfigError("use either --scheduler (an existing cluster) or --cluster local, not both")
    if getattr(args, "scheduler", None) and getattr(args, "workers", None):
        raise ConfigError("--workers sets the size of a --cluster local; an existing --scheduler has its own workers")
    quiet = bool(getattr(args, "quiet", False))
    manifest_fmt = _manifest_format(getattr(args, "manifest", None))
    model = getattr(args, "model", "default")
    if model not in ("default", "watershed") and Path(model).exists():
        model = str(Path(model).resolve())  # workers may run elsewhere: send the absolute path (shared storage)
    device = getattr(args, "device", "auto")
    overwrite = bool(getattr(args, "overwrite", False))
    resume = bool(getattr(args, "resume", False))
    options = _options(args, model).to_dict()
    jobs = [(path, _outputs(outs)) for path, outs in jobs]
    results: list[SlideResult | None] = [None] * len(jobs)
    todo: list[int] = []
    given = _options(args, model)
    for i, (path, outs) in enumerate(jobs):
        finished = not overwrite and is_finished(outs)
        derivable = not overwrite and not finished and is_derivable(outs)
        if finished or derivable:
            check_kept(outs, given, Path(path))
        if finished:
            results[i] = SlideResult(str(path), "skipped", geojson=outs.geojson, zarr=outs.zarr, preview=outs.preview)
        elif derivable:  # (a table or annotations asked for since: from its GeoJSON)
            results[i] = derive(path, outs)
        else:
            todo.append(i)
            if not resume:  # tasks resume only what a killed attempt of *this* run journaled (or --resume asks)
                shutil.rmtree(_journal(outs), ignore_errors=True)
            for k, v in outs.files().items():  # creates missing output directories; an unwritable one fails early
                check_writable(v, overwrite=True, folder=k == "zarr")

    own = client is None
    cluster = None
    if todo:
        with _quiet_dask_logs(), _environ_kept(_nanny_environ() if own else ()):
            if own:
                client, cluster = _start_cluster(args)
            try:
                _run(client, jobs, todo, results, options, model, device, quiet)
            finally:
                if own:
                    client.close()
                    if cluster is not None:
                        cluster.close()
    _clean_partials(jobs)
    done = [r for r in results if r is not None]
    _print_summary(done, time.time() - t_start, quiet)
    if manifest_fmt:
        write_manifest(args.manifest, done, {"model": model, "device": device, "options": options,
                                             "seconds": round(time.time() - t_start, 3)})
    failed = [r for r in done if r.status == "failed"]
    if not failed:
        return 0
    print(f"wsiseg: {len(failed)} of {len(jobs)} inputs failed", file=sys.stderr)
    codes = {r.exit_code for r in failed}
    return 3 if 3 in codes or 4 in codes else max(codes)


@contextlib.contextmanager
def _quiet_dask_logs(level: int = logging.ERROR):
    """dask's INFO/WARNING chatter (cluster start/stop, worker restarts) off the console while the cohort runs: the
    progress line and the summary say what happened to each slide."""
    log = logging.getLogger("distributed")
    old = log.level
    log.setLevel(max(old, level))
    try:
        yield
    finally:
        log.setLevel(old)


def _run(client: Any, jobs: Sequence[tuple[Path, Outputs]], todo: list[int], results: list, options: dict,
         model: str, device: str, quiet: bool) -> None:
    from distributed import as_completed

    plugin = ModelPlugin(model, device)
    client.register_plugin(plugin, name=plugin.key)
    live: dict[int, int] = {}  # slide index -> tiles done so far (from worker events)
    lock = threading.Lock()
    bar = _CohortProgress(len(jobs), len(jobs) - len(todo), quiet)
    n_tiles = [0]

    def on_event(event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        try:
            i, d = int(msg["index"]), int(msg["done"])
        except (TypeError, KeyError, ValueError):
            return
        with lock:
            if results[i] is None:
                live[i] = d
                bar.update(tiles=n_tiles[0] + sum(live.values()))

    run_id = uuid.uuid4().hex[:8]
    topic = f"{PROGRESS_TOPIC}-{run_id}"  # per run: cohorts of other clients on the same cluster do not mix in
    client.subscribe_topic(topic, on_event)
    futures = {}
    for i in todo:
        path, outs = jobs[i]
        p = Path(path)
        target = str(p if p.is_absolute() else p.resolve())
        fut = client.submit(segment_task, target, outs.resolved().to_dict(), options, plugin.key, model, device, i, topic,
                            key=f"wsiseg-slide-{i}-{p.name}-{run_id}", retries=2, pure=False)
        futures[fut] = i
    try:
        for fut in as_completed(list(futures), loop=client.loop):
            i = futures[fut]
            path, outs = jobs[i]
            r = SlideResult(str(path), "done", geojson=outs.geojson, zarr=outs.zarr, preview=outs.preview)
            try:
                out = fut.result()
            except Exception as e:  # retries exhausted, or too many workers died running it (KilledWorker)
                r.status, r.error, r.exit_code = "failed", f"{type(e).__name__}: {e}", 1
            else:
                r.worker = out.get("worker", "")
                r.seconds = round(float(out.get("seconds", 0.0)), 3)
                if "error" in out:
                    r.status, r.error, r.exit_code = "failed", out["error"], int(out["exit_code"])
                else:
                    r.tiles_total, r.tiles_segmented = out["tiles_total"], out["tiles_segmented"]
                    r.nuclei, r.stage_seconds = out["nuclei"], out.get("stage_seconds", {})
                    r.tissue_mm2, r.nuclei_per_mm2 = out.get("tissue_mm2"), out.get("nuclei_per_mm2")
                    r.mean_area_um2 = out.get("mean_area_um2")
            with lock:
                results[i] = r
                live.pop(i, None)
                n_tiles[0] += r.tiles_segmented
                bar.slide_done(r, n_tiles[0] + sum(live.values()))
            if r.status == "failed" and not quiet:
                bar.log(f"wsiseg: error: {r.error}")
    finally:
        try:
            client.unsubscribe_topic(topic)
        except Exception:
            pass
        bar.stop()
        for fut in futures:  # nothing of ours stays on a long-lived cluster
            fut.release()


class _CohortProgress:
    """A rich progress line on stderr: slides done / total, nuclei found, tiles/s (nothing when quiet)."""

    def __init__(self, total: int, skipped: int, quiet: bool) -> None:
        self.p = None
        self.t0 = time.perf_counter()
        self.nuclei = 0
        if quiet:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("[bold]slides"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[nuclei]} nuclei"), TextColumn("{task.fields[rate]} tiles/s"),
                          TimeElapsedColumn(), console=Console(stderr=True))
        self.p.start()
        self.task = self.p.add_task("slides", total=total, completed=skipped, nuclei=0, rate="-")

    def update(self, tiles: int) -> None:
        if self.p is not None:
            dt = max(time.perf_counter() - self.t0, 1e-6)
            self.p.update(self.task, rate=f"{tiles / dt:.1f}")

    def slide_done(self, r: SlideResult, tiles: int) -> None:
        self.nuclei += r.nuclei
        if self.p is not None:
            self.p.update(self.task, advance=1, nuclei=self.nuclei)
            self.update(tiles)

    def log(self, text: str) -> None:
        if self.p is not None:
            self.p.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        if self.p is not None:
            self.p.stop()


def _print_summary(results: list[SlideResult], seconds: float, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("slide", "status", "tiles", "nuclei", "seconds", "outputs", title="wsiseg cohort")
    for r in results:
        outs = ", ".join(v for v in (r.geojson, r.zarr, r.preview) if v)
        t.add_row(slide_label(Path(r.input)), r.status if r.status != "failed" else f"failed: {r.error}",
                  f"{r.tiles_segmented}/{r.tiles_total}" if r.status == "done" else "-",
                  str(r.nuclei) if r.status == "done" else "-",
                  f"{r.seconds:.1f}" if r.status != "skipped" else "-", outs)
    n_done = sum(r.status == "done" for r in results)
    rate = n_done / seconds * 60 if seconds > 0 else 0.0
    c = Console(width=max(Console().width, 120))
    c.print(t)
    c.print(f"{n_done} done, {sum(r.status == 'skipped' for r in results)} skipped, "
            f"{sum(r.status == 'failed' for r in results)} failed; {sum(r.nuclei for r in results)} nuclei in "
            f"{seconds:.1f} s ({rate:.1f} slides/min)")


def write_manifest(path: str | os.PathLike, results: Sequence[SlideResult], run: dict[str, Any]) -> None:
    """The run's manifest, atomically: CSV (one row per slide, columns :data:`MANIFEST_FIELDS`) or JSON
    (``{"wsiseg": version, "run": {...}, "slides": [rows]}``), by the file's suffix."""
    from ..core.atomic import check_writable, write_text
    from ..core.version import __version__

    fmt = _manifest_format(str(path))
    p = check_writable(path, overwrite=True)
    rows = [{k: asdict(r)[k] for k in MANIFEST_FIELDS} for r in results]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        text = buf.getvalue()
    else:
        text = json.dumps({"wsiseg": __version__, "run": run, "slides": rows}, indent=1) + "\n"
    write_text(p, text)


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The slide rows of a manifest written by :func:`write_manifest` (CSV values come back as strings)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such manifest")
    if _manifest_format(str(p)) == "csv":
        with open(p, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return json.loads(p.read_text(encoding="utf-8"))["slides"]


def _clean_partials(jobs: Sequence[tuple[Path, Outputs]]) -> None:
    """Remove temporary ``.<name>.*.partial`` files/directories that killed workers left beside our outputs (every
    task of this run has finished, so no live writer of ours owns them)."""
    from ..core.atomic import discard

    for _, outs in jobs:
        for v in outs.files().values():
            p = Path(v)
            pat = re.compile(r"\." + re.escape(p.name) + r"\.[0-9a-f]{8}\.(partial|old|png)$")
            try:
                for tmp in p.parent.glob(f".{glob.escape(p.name)}.*"):
                    if pat.match(tmp.name):
                        discard(tmp)
            except OSError:
                pass
