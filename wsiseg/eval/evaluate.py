"""``wsiseg eval PRED GT``: score predicted nuclei against true instance labels.

Entry points: :func:`add_parser` registers the ``eval`` sub-command on an argparse ``subparsers`` object and
:func:`run` executes it (returns the exit code; user errors are raised as :mod:`wsiseg.core.errors` classes).
:func:`evaluate_paths` is the same computation as plain data, for scripts.

Inputs (guaranteed behaviour):

- GT: a label image (``.png``, ``.tif``/``.tiff``, ``.npy``; 2-D, integer, 0 = background) or a directory of them.
- PRED: the same kinds, or a GeoJSON from ``wsiseg run`` (``.geojson`` / ``.geojson.gz``), or a directory of any of
  these. GeoJSON is rasterised to the shape of its GT image by :func:`rasterize_geojson`.
- Directories are matched by name: the file name less its known extension (``a.png`` <-> ``a.geojson.gz``).
  Names present on one side only are listed in a warning and in the JSON, and skipped (``--strict`` makes them an
  error). No common name at all, a missing path, an unreadable file or a shape mismatch raise :class:`InputError`.
- Output: a table per image, then mean +- std per group (``--by CSV --column COL``) and over all images. The std
  is the population std (ddof=0) of the per-image figures. ``--json`` writes every figure (overwriting the file).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np
import tifffile

from wsiseg.core.errors import ConfigError, InputError, OutputError
from wsiseg.eval.metrics import METRIC_NAMES, evaluate_pair
from wsiseg.wsi.stitch import paint_polygon

__all__ = [
    "LABEL_SUFFIXES",
    "GEOJSON_SUFFIXES",
    "add_parser",
    "run",
    "evaluate_paths",
    "evaluate_pairs",
    "summarize",
    "print_report",
    "rasterize_geojson",
    "iter_geojson_features",
    "read_label_image",
    "read_groups",
    "match_files",
]

LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
GEOJSON_SUFFIXES = (".geojson", ".geojson.gz")
#: Column titles of the printed table, in :data:`wsiseg.eval.metrics.METRIC_NAMES` order.
METRIC_TITLES = {"aji": "AJI", "aji_plus": "AJI+", "pixel_f1": "pixel F1", "object_f1": "object F1", "pq": "PQ"}
#: Figures kept per image in reports (headline metrics first).
REPORT_KEYS = METRIC_NAMES + ("object_precision", "object_recall", "dq", "sq", "n_true", "n_pred")
NO_GROUP = "(not in CSV)"


# ----------------------------------------------------------------------------------------------------------------
# reading inputs


def _kind(path: Path) -> str | None:
    """'geojson', 'labels' or None from the file name (case-insensitive)."""
    name = path.name.lower()
    if name.endswith(GEOJSON_SUFFIXES):
        return "geojson"
    if name.endswith(LABEL_SUFFIXES):
        return "labels"
    return None


def _stem(path: Path) -> str:
    """The file name less its known extension (``x.geojson.gz`` -> ``x``)."""
    name = path.name
    for suffix in GEOJSON_SUFFIXES[::-1] + LABEL_SUFFIXES:  # longest first
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_label_image(path: str | Path) -> np.ndarray:
    """Read a 2-D integer label image file (PNG, TIFF or ``.npy``); raises :class:`InputError` if it is not one. (The
    labels of ``wsiseg run``'s OME-Zarr: :func:`wsiseg.export.zarr_labels.read_zarr_labels`.)"""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise InputError(f"{path}: not a readable PNG image")
        elif suffix in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            raise InputError(f"{path}: unsupported label image type (use {', '.join(LABEL_SUFFIXES)})")
    except InputError:
        raise
    except Exception as exc:  # corrupt file: any reader error
        raise InputError(f"{path}: cannot read label image ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{path}: a label image must be 2-D (one integer per pixel), got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{path}: a label image must hold integers, got dtype {arr.dtype}")
    if arr.size == 0:  # a 0x0 truth would score any prediction 1.0
        raise InputError(f"{path}: the label image is empty ({arr.shape[1]}x{arr.shape[0]} px)")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:  # (-1 for background would be a nucleus)
        raise InputError(f"{path}: a label image holds 0 for background and 1, 2, ... for objects; it has "
                         f"{int(arr.min())}")
    return arr


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


class _Stream:
    """Incremental JSON value reader over a text stream (one value at a time, never the whole file)."""

    def __init__(self, fh: TextIO, path: Path, chunk: int = 1 << 20) -> None:
        self.fh, self.path, self.chunk = fh, path, chunk
        self.buf, self.pos, self.eof = "", 0, False
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.fh.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if c == "" or c not in chars:
            found = repr(c) if c else "end of file"
            raise InputError(f"{self.path}: not valid GeoJSON (expected one of {chars!r}, found {found})")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decode the next JSON value; reads more text until it is complete (and followed by a delimiter)."""
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self._more():
                    continue
                raise InputError(f"{self.path}: not valid GeoJSON (truncated or malformed JSON)") from None
            if end < len(self.buf) or self.eof or not self._more():  # a number may continue in the next chunk
                self.pos = end
                return obj


def iter_geojson_features(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield the features of a GeoJSON FeatureCollection (or a bare list of features, as QuPath writes) one at a
    time, in file order, reading ``chunk_chars`` characters at a time (never the whole file); ``.gz`` files are
    decompressed on the fly. Malformed or truncated JSON raises :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with _open_text(path) as fh:
            s = _Stream(fh, path, chunk_chars)
            if s.peek() == "[":
                yield from _iter_array(s)
                return
            s.expect("{")
            found = False
            if s.peek() == "}":
                s.pos += 1
            else:
                while True:
                    key = s.value()
                    s.expect(":")
                    if key == "features":
                        if s.peek() != "[":
                            raise InputError(f"{path}: not valid GeoJSON ('features' is not a list)")
                        found = True
                        yield from _iter_array(s)
                    else:
                        s.value()
                    if s.expect(",}") == "}":
                        break
            if not found:
                raise InputError(f"{path}: not a GeoJSON FeatureCollection (no 'features' list)")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:  # includes corrupt .gz
        raise InputError(f"{path}: cannot read GeoJSON ({type(exc).__name__}: {exc})") from None


def _iter_array(s: _Stream) -> Iterator[dict]:
    s.expect("[")
    if s.peek() == "]":
        s.pos += 1
        return
    while True:
        yield s.value()
        if s.expect(",]") == "]":
            return


def _rings(geometry: dict | None) -> list:
    """Exterior rings of a Polygon / MultiPolygon geometry ([] for anything else)."""
    if not isinstance(geometry, dict):
        return []
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if not coords:
        return []
    if kind == "Polygon":
        return [coords[0]]
    if kind == "MultiPolygon":
        return [part[0] for part in coords if part]
    return []


def rasterize_geojson(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise the polygons of a ``wsiseg run`` GeoJSON into an int32 label image of ``shape`` (rows, cols).

    Feature k (1-based, file order) is drawn as label k: every exterior ring (each part of a MultiPolygon) is filled
    with ``cv2.fillPoly`` after mapping vertex (x, y), the centre of a boundary pixel at level 0, to pixel
    ``round(x - 0.5), round(y - 0.5)``. Holes are ignored; where features overlap the earlier one keeps the pixel
    (the rule of ``wsiseg.api.segment_image``, so both give the same labels); parts outside the image are clipped;
    features without a Polygon/MultiPolygon geometry leave their label unused. A QuPath cell object (``wsiseg run
    --objects cells``) is drawn by its ``nucleusGeometry``, the nucleus, not by the cell. Features are streamed
    (``.geojson.gz`` supported); only a feature's bounding box is touched per feature. A feature wholly outside the
    image, or with non-finite coordinates, is an :class:`InputError` (dropping it would score a prediction of another
    image or level as if it were right).
    """
    h, w = int(shape[0]), int(shape[1])
    canvas = np.zeros((h, w), dtype=np.int32)
    outside = 0
    for k, feature in enumerate(iter_geojson_features(path), start=1):
        if k > np.iinfo(np.int32).max:
            raise InputError(f"{path}: more features than int32 labels can hold")
        geometry = None
        if isinstance(feature, dict):  # (a QuPath cell's nucleus: what the labels are of, not the grown cell)
            geometry = feature.get("nucleusGeometry") or feature.get("geometry")
        polys = []
        for ring in _rings(geometry):
            try:
                xy = np.asarray(ring, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"{path}: feature {k} has malformed coordinates") from None
            if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] == 0:
                raise InputError(f"{path}: feature {k} has malformed coordinates")
            if not np.isfinite(xy[:, :2]).all():
                raise InputError(f"{path}: feature {k} has non-finite (NaN or infinite) coordinates")
            polys.append(xy[:, :2])
        if polys and not paint_polygon(canvas, polys, k):
            outside += 1
    if outside:
        raise InputError(f"{path}: {outside} predicted nuclei lie wholly outside the {w} x {h} label image; the "
                         "prediction and the labels must be of the same image and level")
    return canvas


def _load_pred(path: Path, shape: tuple[int, int]) -> np.ndarray:
    if _kind(path) == "geojson":
        return rasterize_geojson(path, shape)
    return read_label_image(path)


def match_files(pred: Path, gt: Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair prediction and truth files: ``([(name, pred_file, gt_file)], pred_only_names, gt_only_names)``.

    Two files pair up directly; two directories pair by name (file name less its known extension).
    """
    pred, gt = Path(pred), Path(gt)
    for role, p in (("PRED", pred), ("GT", gt)):
        if not p.exists():
            raise InputError(f"{p}: {role} path does not exist")
    if pred.is_file() and gt.is_file():
        if _kind(pred) is None:
            kinds = ", ".join(LABEL_SUFFIXES + GEOJSON_SUFFIXES)
            raise InputError(f"{pred}: unsupported prediction type (use {kinds})")
        if _kind(gt) != "labels":
            raise InputError(f"{gt}: the truth must be a label image ({', '.join(LABEL_SUFFIXES)})")
        return [(_stem(gt), pred, gt)], [], []
    if not (pred.is_dir() and gt.is_dir()):
        raise InputError(f"PRED {pred} and GT {gt} must both be files or both be directories")

    def index(folder: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in sorted(folder.iterdir()):
            if f.is_file() and _kind(f) in kinds:
                name = _stem(f)
                if name in out:
                    raise InputError(f"{folder}: two files named {name!r} ({out[name].name}, {f.name})")
                out[name] = f
        return out

    preds = index(pred, ("labels", "geojson"))
    gts = index(gt, ("labels",))
    common = sorted(preds.keys() & gts.keys())
    pred_only = sorted(preds.keys() - gts.keys())
    gt_only = sorted(gts.keys() - preds.keys())
    if not common:
        raise InputError(
            f"no prediction in {pred} matches a label image in {gt} by name "
            f"({len(preds)} predictions, {len(gts)} label images)"
        )
    return [(n, preds[n], gts[n]) for n in common], pred_only, gt_only


def read_groups(csv_path: str | Path, column: str, id_column: str = "image_id") -> dict[str, str]:
    """``{image id: group}`` from a CSV with a header row (e.g. Kumar's ``split.csv``, column ``split``)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such CSV file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            for col in (id_column, column):
                if col not in header:
                    raise InputError(f"{csv_path}: no column {col!r} (columns: {', '.join(header) or 'none'})")
            return {row[id_column]: row[column] for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{csv_path}: cannot read CSV ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------------------------
# computing


def evaluate_pairs(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    """Score ``(name, pred, gt)`` label arrays: one row ``{"name": ..., <REPORT_KEYS>: float}`` per pair."""
    rows = []
    for name, pred, gt in pairs:
        scores = evaluate_pair(pred, gt)
        rows.append({"name": name, **{k: scores[k] for k in REPORT_KEYS}})
    return rows


def summarize(rows: Sequence[dict[str, Any]], group_key: str | None = "group") -> dict[str, dict[str, Any]]:
    """Per group (rows' ``group_key`` value, in first-seen order) and ``"all"``: ``{"n", "mean", "std"}`` of every
    report key. std is the population std (ddof=0) across images."""
    groups: dict[str, list[dict[str, Any]]] = {}
    if group_key is not None:
        for r in rows:
            if r.get(group_key) is not None:
                groups.setdefault(str(r[group_key]), []).append(r)
    groups["all"] = list(rows)
    out = {}
    for g, members in groups.items():
        if not members:
            continue
        table = np.array([[float(r[k]) for k in REPORT_KEYS] for r in members], dtype=np.float64)
        out[g] = {
            "n": len(members),
            "mean": dict(zip(REPORT_KEYS, table.mean(axis=0).tolist())),
            "std": dict(zip(REPORT_KEYS, table.std(axis=0, ddof=0).tolist())),
        }
    return out


def evaluate_paths(
    pred: str | Path,
    gt: str | Path,
    *,
    by: str | Path | None = None,
    column: str = "split",
    id_column: str = "image_id",
    strict: bool = False,
) -> dict[str, Any]:
    """Everything ``wsiseg eval`` computes, as a JSON-ready dict with keys ``pred, gt, metrics, std, images,
    summary, unmatched`` (``images``: one row per matched name, with ``group`` when ``by`` is given)."""
    pred, gt = Path(pred), Path(gt)
    pairs, pred_only, gt_only = match_files(pred, gt)
    if strict and (pred_only or gt_only):
        raise InputError(
            f"unmatched names: {len(pred_only)} predictions without truth ({', '.join(pred_only[:5])}), "
            f"{len(gt_only)} truths without prediction ({', '.join(gt_only[:5])})"
        )
    groups = read_groups(by, column, id_column) if by is not None else None
    rows = []
    for name, pred_file, gt_file in pairs:
        truth = read_label_image(gt_file)
        labels = _load_pred(pred_file, truth.shape)
        if labels.shape != truth.shape:
            raise InputError(f"{pred_file}: shape {labels.shape} differs from the truth {gt_file} {truth.shape}")
        row = evaluate_pairs([(name, labels, truth)])[0]
        row["pred_path"], row["gt_path"] = str(pred_file), str(gt_file)
        if groups is not None:
            row["group"] = groups.get(name, NO_GROUP)
        rows.append(row)
    return {
        "pred": str(pred),
        "gt": str(gt),
        "metrics": list(METRIC_NAMES),
        "std": "population std across images (ddof=0)",
        "group_by": None if by is None else {"csv": str(by), "column": column, "id_column": id_column},
        "images": rows,
        "summary": summarize(rows, "group" if groups is not None else None),
        "unmatched": {"pred_only": pred_only, "gt_only": gt_only},
    }


# ----------------------------------------------------------------------------------------------------------------
# printing and the command line


def print_report(report: dict[str, Any], console: Any = None, *, title: str = "wsiseg eval") -> None:
    """Print the per-image table and the mean +- std summary table with rich."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # files and pipes: wide enough for one line per row
            console = Console(width=160)
    rows = report["images"]
    grouped = any("group" in r for r in rows)
    per_image = Table(title=f"{title}: per image", show_lines=False)
    per_image.add_column("image", overflow="fold")
    if grouped:
        per_image.add_column("group")
    per_image.add_column("true", justify="right")
    per_image.add_column("pred", justify="right")
    for k in METRIC_NAMES:
        per_image.add_column(METRIC_TITLES[k], justify="right")
    for r in rows:
        cells = [r["name"]] + ([str(r.get("group", ""))] if grouped else [])
        cells += [f"{int(r['n_true'])}", f"{int(r['n_pred'])}"] + [f"{r[k]:.4f}" for k in METRIC_NAMES]
        per_image.add_row(*cells)
    console.print(per_image)

    summary = Table(title=f"{title}: mean +- std (population std, ddof=0)")
    summary.add_column("group", no_wrap=True)
    summary.add_column("images", justify="right")
    for k in METRIC_NAMES:
        summary.add_column(METRIC_TITLES[k], justify="right", no_wrap=True)
    for g, s in report["summary"].items():
        summary.add_row(g, str(s["n"]), *[f"{s['mean'][k]:.4f} +- {s['std'][k]:.4f}" for k in METRIC_NAMES])
    console.print(summary)
    unmatched = report.get("unmatched") or {}
    for key, what in (("pred_only", "predictions without a truth"), ("gt_only", "truths without a prediction")):
        names = unmatched.get(key) or []
        if names:
            console.print(f"[yellow]warning:[/] {len(names)} {what} (skipped): {', '.join(names)}")
    if grouped:
        missing = [r["name"] for r in rows if r.get("group") == NO_GROUP]
        if missing:
            console.print(f"[yellow]warning:[/] {len(missing)} images not in the --by CSV: {', '.join(missing)}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``eval`` sub-command on ``subparsers`` (from ``ArgumentParser.add_subparsers``); sets
    ``func=run`` as the parser default."""
    p = subparsers.add_parser(
        "eval",
        help="score predicted nuclei against true instance labels (AJI, AJI+, pixel F1, object F1, PQ)",
        description=(
            "Score PRED against GT. GT: a label image (PNG/TIFF/NPY, 0 = background) or a directory of them; "
            "PRED: the same, or a GeoJSON from 'wsiseg run' (.geojson/.geojson.gz, rasterised to the GT shape), "
            "or a directory; directories are matched by file name less extension. Prints a table per image and "
            "mean +- std (population std, ddof=0)."
        ),
    )
    p.add_argument("pred", type=Path, metavar="PRED", help="prediction file or directory")
    p.add_argument("gt", type=Path, metavar="GT", help="truth label image or directory")
    p.add_argument("--json", dest="json_out", type=Path, metavar="OUT.json", help="write every figure to this JSON")
    p.add_argument("--by", type=Path, metavar="CSV", help="group images by a column of this CSV (header row)")
    p.add_argument("--column", default="split", help="the CSV column to group by (default: split)")
    p.add_argument("--id-column", default="image_id", help="the CSV column holding image names (default: image_id)")
    p.add_argument("--strict", action="store_true", help="fail when a name has no counterpart (default: warn, skip)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``wsiseg eval`` from parsed arguments; returns 0. Raises InputError / OutputError on bad input/output
    (an existing ``--json`` file without ``--overwrite``: OutputError, checked before any scoring)."""
    out = getattr(args, "json_out", None)
    if out is not None:
        inputs = [Path(p) for p in (args.pred, args.gt, getattr(args, "by", None)) if p is not None]
        target = Path(out).resolve()
        if any(target == p.resolve() for p in inputs):
            raise ConfigError(f"--json {out}: an input of this evaluation: name another file")
    if out is not None and Path(out).exists() and not getattr(args, "overwrite", False):
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    report = evaluate_paths(
        args.pred,
        args.gt,
        by=getattr(args, "by", None),
        column=getattr(args, "column", "split"),
        id_column=getattr(args, "id_column", "image_id"),
        strict=getattr(args, "strict", False),
    )
    print_report(report)
    if out is not None:
        write_json(report, Path(out))
    return 0


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` as indented JSON; raises :class:`OutputError` when it cannot be written."""
    try:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write JSON ({exc.strerror or exc})") from None
