"""A table of the nuclei, one row each, for analysis code, R or a spreadsheet: ``wsiseg run SLIDE --out
nuclei.geojson --table nuclei.csv`` (``.tsv`` for tabs, as QuPath's measurement exports; ``.gz`` after either to
compress it).

Columns: ``Image`` (the slide's name), ``Object ID`` (the GeoJSON feature's UUID, so rows join back to the outlines),
``Object type`` (``Detection``, or ``Cell`` with ``--objects cells``), ``Classification`` (``Nucleus``, for
detections), ``Centroid X µm`` and ``Centroid Y µm`` (the object's: a cell's, not its nucleus'; level-0, from the
slide's top-left corner; empty where the scale is unknown), then every measurement of the GeoJSON under its name
there (``Label``, the zarr label's id; ``Area µm^2``; ``Centroid X px``; ``Score``; the stain means; with cells the
``Nucleus: `` and ``Cell: `` ones; every one any feature has, in the order they first appear, empty where a
feature has none), in the GeoJSON's order, which is the rows' order too. Made from the committed GeoJSON, read
twice a feature at a time (:func:`wsiseg.export.geojson.read_back`: the columns, then the rows), so memory does
not grow with the slide and the two cannot disagree.

Entry point: :func:`write_table`.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from pathlib import Path

from ..core.atomic import os_error, replacing
from ..options import TABLE_SUFFIXES  # (the names a table may have: the delimiter follows the name; .gz compresses)
from .geojson import read_back, read_header

#: the columns before the measurements
FIRST = ["Image", "Object ID", "Object type", "Classification", "Centroid X µm", "Centroid Y µm"]


def write_table(geojson: str | os.PathLike, out: str | os.PathLike, image: str | None = None,
                mpp: float | None = None, existed: bool = True) -> int:
    """Write the objects of ``geojson`` as a table ``out`` (module docstring): ``image`` names the slide in its
    first column (default: as the GeoJSON's header's input is named, a DICOM slide after its folder); ``mpp``:
    level-0 um per pixel for the centroids in um (default: the header's ``slide_mpp``). Atomic: ``out`` appears
    whole or not at all; ``existed`` False: ``out`` was not there when the run began, and one that appeared since is
    left as it is (an OutputError). Returns the rows written. :class:`InputError` for a GeoJSON that cannot be read."""
    out, path = Path(out), Path(geojson)
    header, names = _columns(path)
    image = image if image is not None else _name(Path(str(header.get("input", path.name))))
    mpp = mpp if mpp is not None else header.get("slide_mpp")
    sep = "\t" if out.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    rows = 0
    try:
        with replacing(out, existed=existed) as tmp:
            raw = gzip.open(tmp, "wb", compresslevel=6) if out.name.lower().endswith(".gz") else open(tmp, "wb")
            with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
                writer = csv.writer(f, delimiter=sep, lineterminator="\n")
                writer.writerow(FIRST + names)
                for feat in read_back(path):
                    writer.writerow(_row(feat, names, image, mpp))
                    rows += 1
    except OSError as e:
        raise os_error(e, out) from None
    return rows


def _columns(path: Path) -> tuple[dict, list[str]]:
    """The GeoJSON's provenance header, and the names of its measurements in the order they first appear (a first
    reading of the whole file: features may lack some, a nucleus with no stain measured its stain means)."""
    names: dict[str, None] = {}
    for feat in read_back(path):
        names.update(dict.fromkeys((feat.get("properties") or {}).get("measurements") or {}))
    return read_header(path), list(names)


def _name(slide: Path) -> str:
    """A slide's name in the table: its file's, or a DICOM slide's (its folder's: :func:`series_name`)."""
    from ..io.dicom import series_name

    return series_name(slide) or slide.name


def _row(feat: dict, names: list[str], image: str, mpp: float | None) -> list:
    props = feat.get("properties") or {}
    m = props.get("measurements") or {}
    cell = props.get("objectType") == "cell"
    x, y = (m.get(f"{'Cell: ' if cell else ''}Centroid {a} px") for a in "XY")
    um = [round(v * mpp, 3) if isinstance(v, (int, float)) and mpp else "" for v in (x, y)]
    kind = "Cell" if cell else "Detection"
    cls = (props.get("classification") or {}).get("name", "")
    return [image, feat.get("id", ""), kind, cls, *um, *("" if m.get(k) is None else m[k] for k in names)]


__all__ = ["FIRST", "TABLE_SUFFIXES", "write_table"]
