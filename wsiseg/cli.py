"""The ``wsiseg`` command line: a thin layer that parses, calls :mod:`wsiseg.api`, and reports.

Every error a user can cause ends with one line ``wsiseg: error: ...`` on stderr and a distinct exit code
(see :mod:`wsiseg.errors`); ``--debug`` shows the traceback instead.
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

from . import __version__

#: the largest --tile-size: a tile, its model tensors and masks must fit in memory many times over
MAX_TILE_SIZE = 4096
from .errors import ConfigError, InputError, OutputError, WsisegError

from .slide import expand_inputs, slide_stem


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= ``lo`` (``what`` names it in the error)."""

    def parse(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if i < lo:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return i

    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _positive_float(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not f > 0 or f != f or f == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return f


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
    i.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"],
                   help="slide reader (default: auto)")
    i.add_argument("--json", action="store_true", help="print JSON")

    r = sub.add_parser("run", help="segment every nucleus of slides/images and write GeoJSON (+ OME-Zarr, preview)")
    r.add_argument("inputs", nargs="+", help="slide or image files, or directories of them")
    r.add_argument("--out", help="GeoJSON output (.geojson or .geojson.gz), for a single input")
    r.add_argument("--out-dir", help="output directory (one <name>.geojson per input)")
    r.add_argument("--zarr", help="OME-Zarr label pyramid output, for a single input")
    r.add_argument("--preview", help="PNG overview with nucleus outlines, for a single input")
    r.add_argument("--save-zarr", action="store_true", help="with --out-dir: also write <name>.zarr")
    r.add_argument("--zarr-image", action="store_true",
                   help="the OME-Zarr's image pyramid holds the slide's pixels (read once more at the end; "
                        "default: the overview as a stand-in)")
    r.add_argument("--save-preview", action="store_true", help="with --out-dir: also write <name>.png")
    r.add_argument("--gzip", action="store_true", help="with --out-dir: write <name>.geojson.gz")
    r.add_argument("--model", default="default",
                   help="default | vesicular | watershed | path to a checkpoint (default: %(default)s)")
    r.add_argument("--min-score", type=float, metavar="P",
                   help="PDAM models: keep detections scoring at least P (0..1; default: the model's own threshold)")
    r.add_argument("--tta", action="store_const", const=4, default=0,
                   help="PDAM models: test-time augmentation, the heads averaged over each tile and its three mirror "
                        "images (about 4x slower)")
    r.add_argument("--semantic-fusion", action="store_true",
                   help="PDAM models: average each mask with the semantic branch's foreground probability (about "
                        "10%% slower on a CPU)")
    r.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL",
                   help="PDAM models: further checkpoints of the same scale (or bundled models: vesicular) averaged "
                        "with --model's (box and mask heads, semantic maps; proposals from --model): an ensemble, "
                        "each model adds the work of one")
    r.add_argument("--tta-views", dest="tta", type=int, choices=[4, 8], metavar="N",
                   help="--tta with N views: 4 (the mirror images) or 8 (and their transposes, about 8x slower)")
    r.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="PDAM models: the network's arithmetic: fp32 (default), bf16 (about 1.7x faster on a CPU with "
                        "native bf16, such as AVX512-BF16 or AMX; Kumar scores unchanged) or fp16 (CUDA only)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: a GPU when there is one)")
    r.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide", "image"],
                   help="slide reader (auto: OpenSlide for vendor formats, tiffslide for tiled TIFF, else image)")
    r.add_argument("--mpp", type=_positive_float, help="microns per pixel of level 0 (overrides the slide's)")
    r.add_argument("--tile-size", type=_positive_int, default=256,
                   help="tile side in model pixels (default: %(default)s; at most 4096)")
    r.add_argument("--overlap", type=_nonneg_int, help="tile overlap in model pixels (default: from the model)")
    r.add_argument("--batch-size", type=_positive_int, help="tiles per batch (default 16 on CPU, 64 on CUDA)")
    r.add_argument("--tile-workers", type=_nonneg_int, metavar="N",
                   default=None, help="processes preparing tiles (candidates, outlines, GeoJSON encoding) beside "
                                      "the main loop, plus one painting the zarr labels when N > 0 (default: 4 "
                                      "when the model runs on a GPU of a host with 8+ cores and there are 256+ "
                                      "tiles, else 0; same outputs for any number)")
    r.add_argument("--predict-process", action="store_true",
                   help="PDAM models: read tiles and run the model in a process of their own, so that stitching "
                        "and writing have the main one to themselves (same outputs)")
    r.add_argument("--no-tissue-mask", action="store_true", help="segment background tiles too")
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (same input and options) from its journal beside the output")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true",
                   help="print a JSON summary per input on stdout (nuclei, tissue mm^2, nuclei per mm^2, mean area, "
                        "tiles, seconds, outputs) instead of the one-line result")
    r.add_argument("--summary-csv", metavar="PATH",
                   help="write the per-input table (the --json figures) as CSV, atomically")

    r.add_argument("--scheduler", help="address of a running dask.distributed scheduler (tcp://host:8786)")
    r.add_argument("--cluster", choices=["local"], help="start a local dask.distributed cluster")
    r.add_argument("--workers", type=_positive_int, help="workers of the local cluster (default: 2, or one per GPU)")
    r.add_argument("--manifest", help="with a cluster: write the run's manifest (.csv or .json)")

    from . import evaluate

    evaluate.add_parser(sub)
    try:
        from .adapt import pipeline as adapt_pipeline

        adapt_pipeline.add_parser(sub)
    except ImportError:  # pragma: no cover - during development
        pass
    for sp in sub.choices.values():  # --debug after the subcommand too (wsiseg run ... --debug)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="wsiseg: %(message)s")
    warnings.showwarning = _show_warning
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        if args.command in ("run", "eval", "adapt"):
            from .runtime import keep_freed_memory

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
        from .api import sample_slide

        print(sample_slide())
        return 0
    if args.command == "info":
        return cmd_info(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "eval":
        from . import evaluate

        return evaluate.run(args)
    if args.command == "adapt":
        from .adapt import pipeline as adapt_pipeline

        return adapt_pipeline.run(args)
    raise ConfigError(f"unknown command {args.command}")


def cmd_info(args: argparse.Namespace) -> int:
    from .slide import open_slide

    with open_slide(args.slide, args.backend) as s:
        info = s.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{info['path']}[/bold]")
    c.print(f"format: {info['format']}   backend: {info['backend']}")
    c.print(f"dimensions: {info['dimensions'][0]} x {info['dimensions'][1]} px")
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
    return 0


def _write_summary_csv(path: str, rows: list[dict]) -> None:
    """The per-input table (:meth:`wsiseg.api.RunSummary.table_row`), atomically."""
    import csv
    import io

    from .atomic import write_text

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
    from .api import load_model, segment_slide
    from .atomic import check_writable

    inputs = expand_inputs(args.inputs)
    jobs: list[tuple[Path, dict[str, str | None]]] = []
    if args.out_dir:
        if args.out or args.zarr or args.preview:
            raise ConfigError("use either --out/--zarr/--preview (one input) or --out-dir (several inputs)")
        d = Path(args.out_dir)
        names = [slide_stem(p) for p in inputs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"several inputs share the name {sorted(dup)[0]!r}; their outputs would collide")
        for p, n in zip(inputs, names):
            jobs.append((p, {"geojson": str(d / (n + (".geojson.gz" if args.gzip else ".geojson"))),
                             "zarr": str(d / f"{n}.zarr") if args.save_zarr else None,
                             "preview": str(d / f"{n}.png") if args.save_preview else None}))
    else:
        if len(inputs) != 1:
            raise ConfigError(f"{len(inputs)} inputs: use --out-dir for several")
        if not (args.out or args.zarr):
            raise ConfigError("no output: give --out nuclei.geojson (and/or --zarr, --preview), or --out-dir")
        if args.out and not (args.out.endswith(".geojson") or args.out.endswith(".geojson.gz")
                             or args.out.endswith(".json")):
            raise ConfigError(f"--out {args.out}: expected a .geojson or .geojson.gz file name")
        jobs.append((inputs[0], {"geojson": args.out, "zarr": args.zarr, "preview": args.preview}))
    if not 16 <= args.tile_size <= MAX_TILE_SIZE:  # a 20,000 px tile took 10.7 GB before failing
        raise ConfigError(f"--tile-size {args.tile_size}: must be 16..{MAX_TILE_SIZE}")
    cores = os.cpu_count() or 1
    if args.tile_workers is not None and args.tile_workers > max(8, 4 * cores):  # ~40 MB each, nothing to do
        raise ConfigError(f"--tile-workers {args.tile_workers}: at most {max(8, 4 * cores)} on this machine "
                          f"({cores} cores)")
    if args.min_score is not None:
        from .api import check_min_score

        check_min_score(args.min_score)
    pdam_only = [f for f, on in (("--min-score", args.min_score is not None), ("--tta", args.tta),
                                 ("--semantic-fusion", args.semantic_fusion), ("--ensemble", args.ensemble),
                                 (f"--precision {args.precision}", args.precision != "fp32"),
                                 ("--predict-process", args.predict_process)) if on]
    if pdam_only:
        from .api import bundled_weights

        if args.model == "watershed" or (args.model == "default" and bundled_weights() is None):
            raise ConfigError(f"{pdam_only[0]} applies to PDAM models, not to the watershed segmenter")
    if args.overlap is not None and (args.overlap % 2 or args.overlap > args.tile_size // 2):
        raise ConfigError(f"--overlap {args.overlap}: must be even and at most half the tile size "
                          f"({args.tile_size // 2})")
    from .export.journal import journal_dir

    cohort = bool(args.scheduler or args.cluster)
    if args.zarr_image and (cohort or not (args.zarr or (args.out_dir and args.save_zarr))):
        raise ConfigError("--zarr-image needs --zarr (or --out-dir with --save-zarr) and a run without a cluster")
    if args.predict_process and cohort:
        raise ConfigError("--predict-process is for single runs (a cohort's workers predict in their own process)")
    for _, outs in jobs:
        seen: dict[Path, str] = {}
        for k, v in outs.items():
            if v and seen.setdefault(Path(v).resolve(), k) != k:
                raise ConfigError(f"the {seen[Path(v).resolve()]} and {k} outputs are the same file: {Path(v).resolve()}")
        main_out = outs["geojson"] or outs["zarr"] or outs["preview"]
        interrupted = bool(main_out) and journal_dir(main_out).is_dir()
        if cohort and not args.overwrite:
            from . import distributed

            if distributed.is_finished(outs):
                continue  # a finished slide of a cohort: run_cohort reports it as skipped
        if interrupted and not (args.resume or args.overwrite):
            raise OutputError(f"{main_out}: an interrupted run left its progress in {journal_dir(main_out)}; pass "
                              f"--resume to continue it, or --overwrite to start over")
        for v in outs.values():
            if v:  # a resumed run may replace what its interrupted self committed before being killed
                check_writable(v, args.overwrite or (args.resume and interrupted))
    if args.summary_csv:
        if cohort:
            raise ConfigError("--summary-csv is for runs without a cluster; a cohort's --manifest run.csv holds the "
                              "same columns")
        taken = {Path(v).resolve() for _, outs in jobs for v in outs.values() if v}
        if Path(args.summary_csv).resolve() in taken:
            raise ConfigError(f"--summary-csv {args.summary_csv}: the same file as an output")
        check_writable(args.summary_csv, args.overwrite)
    if args.scheduler or args.cluster:
        from . import distributed

        return distributed.run_cohort(jobs, args)
    if args.manifest or args.workers:
        raise ConfigError("--manifest/--workers need --cluster local or --scheduler")
    if not args.quiet and sys.stderr.isatty():
        print(f"wsiseg: loading model {args.model} ...", file=sys.stderr, flush=True)
    model = load_model(args.model, args.device)
    batch = args.batch_size or (64 if getattr(model, "device", None) is not None and str(model.device).startswith("cuda")
                                else 16)
    _sigterm_interrupts()
    failures = 0
    rows: list[dict] = []
    for path, outs in jobs:
        try:
            s = segment_slide(path, geojson=outs["geojson"], zarr=outs["zarr"], preview=outs["preview"], model=model,
                              device=args.device, mpp=args.mpp, tile_size=args.tile_size, overlap=args.overlap,
                              batch_size=batch, use_tissue_mask=not args.no_tissue_mask, backend=args.backend,
                              progress=not args.quiet and sys.stderr.isatty(), resume=args.resume,
                              min_score=args.min_score, tta=args.tta, semantic_fusion=args.semantic_fusion,
                              ensemble=args.ensemble,
                              tile_workers=args.tile_workers, precision=args.precision,
                              predict_process=args.predict_process, zarr_image=args.zarr_image)
        except InputError as e:
            if len(jobs) == 1:
                raise
            print(f"wsiseg: error: {e}", file=sys.stderr)
            failures += 1
            continue
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the writers have removed their temp files
            main_out = outs["geojson"] or outs["zarr"] or outs["preview"]
            if main_out and journal_dir(main_out).is_dir():
                print(f"wsiseg: {path.name}: progress kept; rerun with --resume to continue", file=sys.stderr)
            raise
        rows.append({**s.table_row(), "outputs": {k: v for k, v in outs.items() if v}})
        if not args.json:
            written = ", ".join(v for v in outs.values() if v)
            print(f"{path.name}: {s.nuclei} nuclei from {s.tiles_segmented}/{s.tiles_total} tiles in "
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
