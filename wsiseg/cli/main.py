"""The ``wsiseg`` command line: a thin layer that parses, calls :mod:`wsiseg.api`, and reports.

Every error a user can cause ends with one line ``wsiseg: error: ...`` on stderr and a distinct exit code
(see :mod:`wsiseg.core.errors`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from ..core.version import __version__

#: the largest --tile-size: a tile, its model tensors and masks must fit in memory many times over
MAX_TILE_SIZE = 4096
from ..core.errors import ConfigError, InputError, OutputError, WsisegError
from ..io.dicom import DICOM_SUFFIX, series_name
from ..io.slide import expand_inputs, slide_label, slide_stem
from ..options import (BACKENDS, GEOJSON_SUFFIXES, PREVIEW_SUFFIXES, TABLE_SUFFIXES, Outputs, RunOptions,
                       add_arguments, positive_int)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (as argparse, without the usage dump)
        raise ConfigError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="wsiseg", description="Nuclei instance segmentation for whole-slide H&E images.")
    p.add_argument("--version", action="version", version=f"wsiseg {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    sub.add_parser("sample", help="print the path of the small real slide bundled with wsiseg")
    i = sub.add_parser("info", help="describe a slide: format, levels, MPP, associated images")
    i.add_argument("slide", help="a slide or image file")
    i.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="slide reader (default: auto)")
    i.add_argument("--json", action="store_true", help="print JSON")

    r = sub.add_parser("run", help="segment every nucleus of slides/images and write GeoJSON (+ OME-Zarr, preview)")
    r.add_argument("inputs", nargs="+", help="slide or image files, or directories of them")
    add_arguments(r, Outputs)  # --out, --zarr, --preview, --dicom-ann, --table, --zarr-image (wsiseg.options)
    r.add_argument("--out-dir", help="output directory (one <name>.geojson per input)")
    r.add_argument("--save-zarr", action="store_true", help="with --out-dir: also write <name>.zarr")
    r.add_argument("--save-preview", action="store_true", help="with --out-dir: also write <name>.png")
    r.add_argument("--save-table", action="store_true", help="with --out-dir: also write <name>.csv, a row a nucleus")
    r.add_argument("--save-dicom-ann", action="store_true",
                   help="with --out-dir: also write <name>.ann.dcm, DICOM annotations (DICOM slides only)")
    r.add_argument("--gzip", action="store_true", help="with --out-dir: write <name>.geojson.gz")
    add_arguments(r, RunOptions)  # --model ... --resume (wsiseg.options)
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true",
                   help="print a JSON summary per input on stdout (nuclei, tissue mm^2, nuclei per mm^2, mean area, "
                        "tiles, seconds, outputs) instead of the one-line result")
    r.add_argument("--summary-csv", metavar="PATH",
                   help="write the per-input table (the --json figures) as CSV, atomically")

    r.add_argument("--scheduler", help="address of a running dask.distributed scheduler (tcp://host:8786)")
    r.add_argument("--cluster", choices=["local"], help="start a local dask.distributed cluster")
    r.add_argument("--workers", type=positive_int, help="workers of the local cluster (default: 2, or one per GPU)")
    r.add_argument("--manifest", help="with a cluster: write the run's manifest (.csv or .json)")

    x = sub.add_parser("export", help="make a table and/or DICOM annotations from a GeoJSON wsiseg run wrote")
    x.add_argument("geojson", help="the GeoJSON (.geojson or .geojson.gz)")
    x.add_argument("--table", metavar="PATH", help="a table of the nuclei, a row each (.csv, .tsv; .gz compresses)")
    x.add_argument("--dicom-ann", metavar="PATH", help="DICOM annotations of the nuclei (.dcm; needs --slide)")
    x.add_argument("--slide", help="the DICOM slide the GeoJSON was made from (its folder, or one of its files)")
    x.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    from ..eval import evaluate

    evaluate.add_parser(sub)
    try:
        from ..adapt import pipeline as adapt_pipeline

        adapt_pipeline.add_parser(sub)
    except ImportError:  # pragma: no cover - during development
        pass
    for sp in sub.choices.values():  # --debug after the subcommand too (wsiseg run ... --debug)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def _quiet_pending_reads(hook):
    """``sys.unraisablehook`` without the reports of zarr's reads left pending when the interpreter closes its event
    loop ("Exception ignored in: <coroutine ...>", a traceback each): what a failed read leaves, not an error."""
    import asyncio

    def quiet(u) -> None:
        if asyncio.iscoroutine(u.object) or "Event loop is closed" in str(u.exc_value):
            return
        hook(u)

    quiet.wsiseg_quiet = True
    return quiet


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="wsiseg: %(message)s")
    warnings.showwarning = _show_warning
    if not debug:  # (zarr's event loop, which tiffslide reads through: after a read fails, the reads it gathered
        # beside it are left pending and asyncio reports each, hundreds of lines after the one error line)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        if not getattr(sys.unraisablehook, "wsiseg_quiet", False):  # (once a process: main() may run again)
            sys.unraisablehook = _quiet_pending_reads(sys.unraisablehook)
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        if args.command in ("run", "eval", "adapt"):
            from ..core.runtime import keep_freed_memory

            keep_freed_memory()
        return int(_dispatch(args) or 0)
    except WsisegError as e:
        if debug:
            raise
        print(f"wsiseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("wsiseg: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("wsiseg: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"wsiseg: warning: {message}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "sample":
        from ..api import sample_slide

        print(sample_slide())
        return 0
    if args.command == "info":
        return cmd_info(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "eval":
        from ..eval import evaluate

        return evaluate.run(args)
    if args.command == "adapt":
        from ..adapt import pipeline as adapt_pipeline

        return adapt_pipeline.run(args)
    raise ConfigError(f"unknown command {args.command}")


def cmd_export(args: argparse.Namespace) -> int:
    """``wsiseg export GEOJSON --table T --dicom-ann A --slide S``: what ``wsiseg run --table/--dicom-ann`` would
    have made along with the GeoJSON, made from it afterwards (the same files)."""
    from ..core.atomic import check_writable
    from ..core.errors import missing_path
    from ..export.dicom_ann import annotated_slide, write_annotations
    from ..export.geojson import read_header, written_by_wsiseg
    from ..export.table import write_table

    if not (args.table or args.dicom_ann):
        raise ConfigError("nothing to make: give --table PATH and/or --dicom-ann PATH")
    _check_derived_names(args)
    if args.dicom_ann and not args.slide:
        raise ConfigError("--dicom-ann refers to the DICOM slide the GeoJSON was made from: give --slide")
    geojson = Path(args.geojson)
    if not geojson.is_file():
        raise missing_path(geojson) if not geojson.exists() else InputError(f"{geojson}: not a file")
    if not written_by_wsiseg(geojson):  # (QuPath's own annotations would become rows without measurements)
        raise InputError(f"{geojson}: not a GeoJSON that wsiseg run wrote: export makes its table and annotations "
                         "from one")
    outs = [v for v in (args.table, args.dicom_ann) if v]
    existed = {v: Path(v).exists() for v in outs}
    for v in outs:
        check_writable(v, args.overwrite)
    done = []
    if args.dicom_ann:  # (the slide checked before anything is written)
        path, origin, image = annotated_slide(args.slide)
        made_from = read_header(geojson).get("input")
        if made_from and Path(made_from).resolve() != path.resolve():
            warnings.warn(f"{geojson} was made from {made_from}, not from {slide_label(path)}", stacklevel=2)
    if args.table:
        done.append(f"{write_table(geojson, args.table, existed=existed[args.table])} rows -> {args.table}")
    if args.dicom_ann:
        n = write_annotations(geojson, path, args.dicom_ann, origin=origin, image=image,
                              existed=existed[args.dicom_ann])
        done.append(f"{n} annotations -> {args.dicom_ann}" if n else "no nuclei, so no DICOM annotations")
    print(f"{geojson}: " + "; ".join(done))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..io.colour import colour_shift
    from ..io.slide import open_slide

    with open_slide(args.slide, args.backend) as s:
        info = s.info()
        shift = colour_shift(s.icc_profile)
        if shift is not None:
            info["icc_profile_shift"] = {"mean_levels": shift[0], "max_levels": shift[1]}
        name = slide_label(s.path) if s.format == "dicom" else None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{name + ': ' if name else ''}{info['path']}[/bold]")
    c.print(f"format: {info['format']}   backend: {info['backend']}")
    c.print(f"dimensions: {info['dimensions'][0]} x {info['dimensions'][1]} px" + (
        f" (cropped to the file's bounds at {info['bounds_origin'][0]}, {info['bounds_origin'][1]}, as QuPath "
        "shows it)" if "bounds_origin" in info else ""))
    mpp = info["mpp"]
    c.print(f"microns per pixel: {mpp if mpp is not None else 'unknown'}   objective power: "
            f"{info['objective_power'] if info['objective_power'] is not None else 'unknown'}")
    t = Table("level", "width", "height", "downsample", "um/px")
    for k, lv in enumerate(info["levels"]):
        t.add_row(str(k), str(lv["width"]), str(lv["height"]), f"{lv['downsample']:.4g}",
                  f"{mpp * lv['downsample']:.4g}" if mpp else "-")
    c.print(t)
    assoc = info["associated_images"]
    c.print("associated images: " + (", ".join(f"{k} ({w}x{h})" for k, (w, h) in assoc.items()) or "none"))
    icc, shift = info["icc_profile"], info.get("icc_profile_shift")
    moves = "" if shift is None else (
        "; applied, it moves no colour" if not shift["max_levels"] else
        f"; applied, it moves colours by {shift['mean_levels']} levels on average, {shift['max_levels']} at most")
    c.print(f"ICC profile: {icc} (colours read as stored unless wsiseg run --icc-profile apply{moves})" if icc
            else "ICC profile: none", markup=False)
    return 0


def _write_summary_csv(path: str, rows: list[dict]) -> None:
    """The per-input table (:meth:`wsiseg.api.RunSummary.table_row`), atomically."""
    import csv
    import io

    from ..core.atomic import write_text

    buf = io.StringIO()
    fields = [k for k in rows[0] if k != "outputs"] if rows else ["input", "nuclei"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    write_text(path, buf.getvalue())


def _sigterm_interrupts() -> None:
    """Make SIGTERM (batch schedulers, ``kill``) stop a run like Ctrl-C: temp files removed, progress kept."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def cmd_run(args: argparse.Namespace) -> int:
    """``wsiseg run``: check everything that can be checked before any work, then segment each input here, or hand
    the cohort to :func:`wsiseg.parallel.cohort.run_cohort`."""
    cohort = bool(args.scheduler or args.cluster)
    jobs = _run_jobs(args, expand_inputs(args.inputs))
    options = RunOptions.from_args(args)
    _check_run_options(args)
    if args.predict_process and cohort:
        raise ConfigError("--predict-process is for single runs (a cohort's workers predict in their own process)")
    _check_outputs(args, jobs, cohort)
    if cohort:
        from ..parallel.cohort import run_cohort

        return run_cohort(jobs, args)
    if args.manifest or args.workers:
        raise ConfigError("--manifest/--workers need --cluster local or --scheduler")
    from ..api import load_model
    from ..core.runtime import import_settled

    if not args.quiet and sys.stderr.isatty():
        print(f"wsiseg: loading model {args.model} ...", file=sys.stderr, flush=True)
    import_settled()  # (torch's import: most of the seconds before the first tile)
    options = options.replace(model=load_model(args.model, args.device))  # loaded once for every input
    _sigterm_interrupts()
    return _run_here(args, jobs, options)


def _run_jobs(args: argparse.Namespace, inputs: list[Path]) -> list[tuple[Path, Outputs]]:
    """Each input with its outputs: ``--out/--zarr/--preview`` for one input, or named after it in ``--out-dir``."""
    outs: list[dict[str, str | None]] = []
    if args.out_dir:
        if args.geojson or args.zarr or args.preview or args.dicom_ann or args.table:
            raise ConfigError("use either --out/--zarr/--preview/--dicom-ann/--table (one input) or --out-dir "
                              "(several inputs)")
        if args.roi and len(inputs) != 1 and not Path(args.roi).is_dir():
            raise ConfigError(f"--roi {args.roi}: a file outlines regions of one slide; {len(inputs)} inputs were "
                              "given (give a folder of one GeoJSON per slide, named after it)")
        d = Path(args.out_dir)
        names = [slide_stem(p) for p in inputs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"several inputs share the name {sorted(dup)[0]!r}; their outputs would collide")
        for n in names:
            outs.append({"geojson": str(d / (n + (".geojson.gz" if args.gzip else ".geojson"))),
                         "zarr": str(d / f"{n}.zarr") if args.save_zarr else None,
                         "preview": str(d / f"{n}.png") if args.save_preview else None,
                         "dicom_ann": str(d / f"{n}.ann.dcm") if args.save_dicom_ann else None,
                         "table": str(d / f"{n}.csv") if args.save_table else None})
    else:
        if len(inputs) != 1:
            raise ConfigError(f"{len(inputs)} inputs: use --out-dir for several")
        for flag, v in (("--dicom-ann", args.dicom_ann), ("--table", args.table)):
            if v and not args.geojson:
                raise ConfigError(f"{flag} is made from the GeoJSON: give --out nuclei.geojson too")
        _check_derived_names(args)
        if not (args.geojson or args.zarr):
            raise ConfigError("no output: give --out nuclei.geojson (and/or --zarr, --preview), or --out-dir")
        if args.geojson and not args.geojson.endswith(GEOJSON_SUFFIXES):
            raise ConfigError(f"--out {args.geojson}: expected a .geojson or .geojson.gz file name")
        _check_kind_of_name(args.zarr, "--zarr", (".zarr",), "a zarr store's name (e.g. nuclei.zarr)")
        _check_kind_of_name(args.preview, "--preview", PREVIEW_SUFFIXES,
                            "an image file name (.png, .jpg, .tif or .webp)")
        if args.preview and args.preview.lower().endswith(_NOT_WRITTEN):
            raise ConfigError(f"--preview {args.preview}: a format wsiseg does not write: name a .png, .jpg, .tif or "
                              ".webp file (a name without a suffix gets a PNG)")
        outs.append({"geojson": args.geojson, "zarr": args.zarr, "preview": args.preview, "dicom_ann": args.dicom_ann,
                     "table": args.table})
    for flag, single, on in (("--save-dicom-ann", "--dicom-ann", args.save_dicom_ann),
                             ("--save-table", "--table", args.save_table)):
        if on and not args.out_dir:
            raise ConfigError(f"{flag} is for --out-dir; with --out, give {single} PATH")
    if args.dicom_ann or args.save_dicom_ann:
        not_dicom = [p for p in inputs if series_name(p) is None]
        if not_dicom:
            flag = "--dicom-ann" if args.dicom_ann else "--save-dicom-ann"
            raise ConfigError(f"{flag}: {slide_label(not_dicom[0])} is not a DICOM slide; DICOM annotations refer to "
                              "a DICOM slide's image")
    if args.zarr_image and not (args.zarr or (args.out_dir and args.save_zarr)):
        raise ConfigError("--zarr-image needs --zarr (or --out-dir with --save-zarr)")
    if args.objects == "cells" and not all(o["geojson"] for o in outs):
        raise ConfigError("--objects cells writes cells into the GeoJSON: give --out (or --out-dir)")
    return [(p, Outputs(**o, zarr_image=args.zarr_image, objects=args.objects, cell_expansion=args.cell_expansion))
            for p, o in zip(inputs, outs)]


#: image and archive names a preview would not be written as (it was PNG data under the name)
_NOT_WRITTEN = (".gif", ".bmp", ".jp2", ".j2k", ".svg", ".pdf", ".heic", ".avif", ".ppm", ".pgm", ".gz", ".bz2", ".xz",
                ".zip")
#: the names of every kind of output: a --zarr or --preview named as another kind is taken for a mix-up of the options
_OUTPUT_SUFFIXES = GEOJSON_SUFFIXES + (".zarr",) + PREVIEW_SUFFIXES + (DICOM_SUFFIX,) + TABLE_SUFFIXES


def _check_derived_names(args: argparse.Namespace) -> None:
    """ConfigError for a ``--table`` or ``--dicom-ann`` whose name is not of its kind (``wsiseg run``, ``export``)."""
    if args.table and not args.table.lower().endswith(TABLE_SUFFIXES):
        raise ConfigError(f"--table {args.table}: expected a .csv or .tsv file name (.gz after it to compress)")
    if args.dicom_ann and not args.dicom_ann.lower().endswith(DICOM_SUFFIX):
        raise ConfigError(f"--dicom-ann {args.dicom_ann}: expected a .dcm file name")


def _check_kind_of_name(name: str | None, flag: str, ok: tuple[str, ...], expected: str) -> None:
    """ConfigError when ``name`` ends as another output's name does (``nuclei.geojson`` given to ``--zarr``): the
    options swapped, which would write one kind of output under another's name. ``ok``: the flag's own suffixes."""
    low = (name or "").lower().rstrip("/")
    if low.endswith(_OUTPUT_SUFFIXES) and not low.endswith(ok):
        raise ConfigError(f"{flag} {name}: expected {expected}")


def _check_run_options(args: argparse.Namespace) -> None:
    """The option values this machine or the model cannot take, as one-line ConfigErrors."""
    if args.tile_size is not None and not 16 <= args.tile_size <= MAX_TILE_SIZE:  # a 20,000 px tile: 10.7 GB, failed
        raise ConfigError(f"--tile-size {args.tile_size}: must be 16..{MAX_TILE_SIZE}")
    cores = os.cpu_count() or 1
    if args.tile_workers is not None and args.tile_workers > max(8, 4 * cores):  # ~40 MB each, nothing to do
        raise ConfigError(f"--tile-workers {args.tile_workers}: at most {max(8, 4 * cores)} on this machine "
                          f"({cores} cores)")
    if args.min_score is not None:
        from ..api import check_min_score

        check_min_score(args.min_score)
    pdam_only = [f for f, on in (("--min-score", args.min_score is not None), ("--tta", args.tta),
                                 ("--semantic-fusion", args.semantic_fusion), ("--ensemble", args.ensemble),
                                 (f"--precision {args.precision}", args.precision not in ("fp32", "auto")),
                                 ("--predict-process", args.predict_process)) if on]
    if pdam_only:
        from ..api import bundled_weights

        if args.model == "watershed" or (args.model == "default" and bundled_weights() is None):
            raise ConfigError(f"{pdam_only[0]} applies to PDAM models, not to the watershed segmenter")
    if args.overlap is not None and (args.overlap % 2 or (args.tile_size and args.overlap > args.tile_size // 2)):
        half = f" ({args.tile_size // 2})" if args.tile_size else ""
        raise ConfigError(f"--overlap {args.overlap}: must be even and at most half the tile size{half}")


def _check_outputs(args: argparse.Namespace, jobs: list[tuple[Path, Outputs]], cohort: bool) -> None:
    """Before any work: no two outputs of an input the same file, an interrupted run's journal not ignored,
    every output (and ``--summary-csv``) writable."""
    from ..core.atomic import check_writable
    from ..io.regions import regions_file_of
    from ..parallel.cohort import check_kept
    from ..wsi.resume import journal_dir

    given = RunOptions.from_args(args)
    for path, outs in jobs:
        seen: dict[Path, str] = {}
        for k, v in outs.files().items():
            if seen.setdefault(Path(v).resolve(), k) != k:
                raise ConfigError(f"the {seen[Path(v).resolve()]} and {k} outputs are the same file: {Path(v).resolve()}")
        main_out = outs.main
        interrupted = bool(main_out) and journal_dir(main_out).is_dir()
        if cohort and not args.overwrite:
            from ..parallel.cohort import is_derivable, is_finished

            if is_finished(outs) or is_derivable(outs):
                check_kept(outs, given, path)
                continue  # a finished slide of a cohort: run_cohort reports it as skipped (its new table or
                # annotations made from its GeoJSON)
        if _already_done(args, outs):
            check_kept(outs, given, path)
            continue  # resuming a batch: a slide it finished before the interruption is skipped (_run_here)
        if interrupted and not (args.resume or args.overwrite):
            raise OutputError(f"{main_out}: an interrupted run left its progress in {journal_dir(main_out)}; pass "
                              f"--resume to continue it, or --overwrite to start over")
        for k, v in outs.files().items():  # a resumed run may replace what its interrupted self committed
            check_writable(v, args.overwrite or (args.resume and interrupted), folder=k == "zarr")
    if args.summary_csv:
        if cohort:
            raise ConfigError("--summary-csv is for runs without a cluster; a cohort's --manifest run.csv holds the "
                              "same columns")
        taken = {Path(v).resolve() for _, outs in jobs for v in outs.files().values()}
        if Path(args.summary_csv).resolve() in taken:
            raise ConfigError(f"--summary-csv {args.summary_csv}: the same file as an output")
        read = {p.resolve() for p, _ in jobs} | {regions_file_of(args.roi, p) for p, _ in jobs}
        if Path(args.summary_csv).resolve() in read:
            raise ConfigError(f"--summary-csv {args.summary_csv}: the same file as an input")
        check_writable(args.summary_csv, args.overwrite)


def _already_done(args: argparse.Namespace, outs: Outputs) -> bool:
    """Whether ``--resume`` (without ``--overwrite``) finds this input of a batch finished: all its outputs there,
    whole (they appear only when complete), and no journal of an interrupted run beside them."""
    from ..parallel.cohort import is_finished

    return bool(args.resume) and not args.overwrite and is_finished(outs)


def _run_here(args: argparse.Namespace, jobs: list[tuple[Path, Outputs]], options: RunOptions) -> int:
    """Segment each input in this process; an input error fails that input only (exit 3 at the end)."""
    from ..api import segment_slide
    from ..wsi.resume import journal_dir

    failures = 0
    rows: list[dict] = []
    for path, outs in jobs:
        if _already_done(args, outs):
            print(f"{slide_label(path)}: finished before the interruption, skipped (--resume)", file=sys.stderr)
            continue
        try:
            s = segment_slide(path, outs, options, progress=not args.quiet and sys.stderr.isatty())
        except InputError as e:
            if len(jobs) == 1:
                raise
            print(f"wsiseg: error: {e}", file=sys.stderr)
            failures += 1
            continue
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the writers have removed their temp files
            if outs.main and journal_dir(outs.main).is_dir():
                print(f"wsiseg: {slide_label(path)}: progress kept; rerun with --resume to continue", file=sys.stderr)
            raise
        rows.append({**s.table_row(), "outputs": dict(s.outputs)})
        if not args.json:
            written = ", ".join(str(v) for v in outs.files().values() if str(v) in s.outputs.values())
            zoom = f" shown {s.zoom:g}x larger," if s.zoom != 1.0 else ""
            zoom += " sharpened (out of focus)," if s.sharpened_um else ""
            zoom += f" {s.refocused_tiles} sharpened (out of focus in parts)," if s.refocused_tiles else ""
            print(f"{slide_label(path)}: {s.nuclei} nuclei from {s.tiles_segmented}/{s.tiles_total} tiles{zoom} in "
                  f"{s.seconds:.1f} s -> {written}")
    if args.json:
        print(json.dumps(rows, indent=1))
    if args.summary_csv:
        _write_summary_csv(args.summary_csv, rows)
    if failures:
        print(f"wsiseg: {failures} of {len(jobs)} inputs failed", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
