"""QuPath GeoJSON, streamed: one Feature per nucleus written as it is found, so memory never holds them all.

Format (QuPath 0.4+ imports it, ``.geojson.gz`` too): a FeatureCollection; each Feature has a UUID ``id``, a Polygon
``geometry`` in level-0 pixel coordinates (origin top-left; a vertex is the centre of a boundary pixel, i.e.
``(col + 0.5, row + 0.5)``), and ``properties``: ``objectType: "detection"``, ``classification`` {name "Nucleus",
color}, ``measurements`` (area and perimeter in um and px, centroid, model score) and ``label``: the nucleus' id
in the zarr label image (its 1-based order in this file).
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from pathlib import Path
from typing import IO, Iterable

import numpy as np

from ..atomic import commit, discard, os_error, temp_path
from ..stitch import Nucleus

NUCLEUS_COLOR = [200, 0, 0]
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # built once: json.dumps with options builds one per call


class GeoJSONWriter:
    """``with GeoJSONWriter(path) as w: w.write(nuclei)`` - the file appears under ``path`` only on success."""

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None, seed: int | None = None) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.count = 0
        self.metadata = metadata or {}
        self._rng = uuid.uuid4 if seed is None else _seeded_uuid(seed)
        self._f: IO[str] | None = None

    def __enter__(self) -> "GeoJSONWriter":
        try:
            if self.path.name.endswith(".gz"):
                self._f = gzip.open(self.tmp, "wt", encoding="utf-8", compresslevel=6)
            else:
                self._f = open(self.tmp, "w", encoding="utf-8")
            head = {"type": "FeatureCollection", "wsiseg": self.metadata}
            self._f.write(json.dumps(head)[:-1] + ', "features": [\n')
        except OSError as e:
            discard(self.tmp)
            raise os_error(e, self.path) from None
        return self

    def write(self, nuclei: Iterable[Nucleus]) -> None:
        assert self._f is not None
        parts = []
        enc = _ENCODER.encode
        for n in nuclei:
            self.count += 1
            parts.append(("" if self.count == 1 else ",\n") + enc(feature(n, self.count, str(self._rng()))))
        if parts:
            try:
                self._f.write("".join(parts))
            except OSError as e:
                raise os_error(e, self.path) from None

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._f = self._f, None
        try:
            if f is not None:
                if exc_type is None:
                    f.write("\n]}\n")
                f.close()
        except OSError as e:
            discard(self.tmp)
            if exc_type is None:
                raise os_error(e, self.path) from None
            return
        if exc_type is None:
            commit(self.tmp, self.path)
        else:
            discard(self.tmp)


def _seeded_uuid(seed: int):
    rng = np.random.default_rng(seed)

    def make() -> uuid.UUID:
        return uuid.UUID(bytes=rng.bytes(16), version=4)

    return make


def feature(n: Nucleus, label: int, fid: str) -> dict:
    ring = np.round(n.polygon, 3).tolist()
    ring.append(ring[0])
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": "Nucleus", "color": NUCLEUS_COLOR},
            "label": label,
            "measurements": {
                "Area um^2": round(n.area_um2, 3),
                "Area px": round(n.area_px, 2),
                "Perimeter um": round(n.perimeter_um, 3),
                "Centroid X px": round(n.centroid[0], 2),
                "Centroid Y px": round(n.centroid[1], 2),
                "Score": round(n.score, 4),
            },
        },
    }


def read_features(path: str | os.PathLike) -> list[dict]:
    """All features of a GeoJSON/.geojson.gz file (a FeatureCollection or a bare list, as QuPath accepts)."""
    p = Path(path)
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["features"] if isinstance(data, dict) else list(data)
