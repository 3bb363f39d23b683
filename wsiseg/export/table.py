"""A table of the nuclei, one row each, for analysis code, R or a spreadsheet: ``wsiseg run SLIDE --out
nuclei.geojson --table nuclei.csv`` (``.tsv`` for tabs, as QuPath's measurement exports; ``.gz`` after either to
compress it).

Columns: ``Image`` (the slide's name), ``Object ID`` (the GeoJSON feature's UUID, so rows join back to the outlines),
``Object type`` (``Detection``, or ``Cell`` with ``--objects cells``), ``Classification`` (``Nucleus``, for
detections), ``Centroid X µm`` and ``Centroid Y µm`` (the object's: a cell's, not its nucleus'; level-0, from the
slide's top-left corner; empty where the scale is unknown), then every measurement of the GeoJSON under its name
there (``Label``, the zarr label's id; ``Area µm^2``; ``Centroid X px``; ``Score``; the stain means; with cells the
``Nucleus: `` and ``Cell: `` ones), in the GeoJSON's order, which is the rows' order too. Made from the committed GeoJSON, read back a feature at a time
(:func:`wsiseg.export.geojson.iter_features`), so memory does not grow with the slide and the two cannot disagree.

Entry point: :func:`write_table`.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from pathlib import Path

from ..core.atomic import os_error, replacing
from ..core.errors import InputError
from ..options import TABLE_SUFFIXES  # (the names a table may have: the delimiter follows the name; .gz compresses)
from .geojson import iter_features, read_header
#: the columns before the measurements
FIRST = ["Image", "Object ID", "Object type", "Classification", "Centroid X µm", "Centroid Y µm"]


def write_table(geojson: str | os.PathLike, out: str | os.PathLike, image: str | None = None,
                mpp: float | None = None) -> int:
    """Write the objects of ``geojson`` as a table ``out`` (module docstring): ``image`` names the slide in its
    first column (default: the GeoJSON's header's input file name); ``mpp``: level-0 um per pixel for the centroids
    in um (default: the header's ``slide_mpp``). Atomic: ``out`` appears whole or not at all. Returns the rows
    written. :class:`InputError` for a GeoJSON that cannot be read."""
    out, path = Path(out), Path(geojson)
    header = read_header(path)
    image = image if image is not None else Path(str(header.get("input", path.name))).name
    mpp = mpp if mpp is not None else header.get("slide_mpp")
    sep = "\t" if out.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    rows = 0
    try:
        with replacing(out) as tmp:
            raw = gzip.open(tmp, "wb", compresslevel=6) if out.name.lower().endswith(".gz") else open(tmp, "wb")
            with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
                writer, names = csv.writer(f, delimiter=sep, lineterminator="\n"), None
                for feat in iter_features(path):
                    m = (feat.get("properties") or {}).get("measurements") or {}
                    if names is None:  # (every feature of a wsiseg GeoJSON has the same measurements)
                        names = list(m)
                        writer.writerow(FIRST + names)
                    writer.writerow(_row(feat, m, names, image, mpp))
                    rows += 1
                if names is None:
                    writer.writerow(FIRST)
    except OSError as e:
        raise os_error(e, out) from None
    except (EOFError, ValueError) as e:  # (orjson's and gzip's errors: a GeoJSON cut short or not GeoJSON)
        raise InputError(f"{path}: not readable as GeoJSON ({type(e).__name__}: {e})") from None
    return rows


def _row(feat: dict, m: dict, names: list[str], image: str, mpp: float | None) -> list:
    props = feat.get("properties") or {}
    cell = props.get("objectType") == "cell"
    x, y = (m.get(f"{'Cell: ' if cell else ''}Centroid {a} px") for a in "XY")
    um = [round(v * mpp, 3) if isinstance(v, (int, float)) and mpp else "" for v in (x, y)]
    kind = "Cell" if cell else "Detection"
    cls = (props.get("classification") or {}).get("name", "")
    return [image, feat.get("id", ""), kind, cls, *um, *(m.get(k, "") for k in names)]


__all__ = ["FIRST", "TABLE_SUFFIXES", "write_table"]
