"""Regions of a slide drawn elsewhere: QuPath annotations exported as GeoJSON, read as one geometry.

``read_regions(path)`` gives the union of the areas a GeoJSON file outlines, in the slide's level-0 pixel
coordinates: what ``wsiseg run --roi`` segments within (``--roi DIR``: each slide's own file in it,
:func:`regions_file`). The file is what QuPath's *File > Export objects as
GeoJSON* writes (a FeatureCollection, or a bare list of features as its older versions and its scripts write), a
single Feature, or a bare geometry; ``.gz`` compressed or not. Coordinates are QuPath's: pixels of the full-resolution
image, origin at its top-left corner (for a slide cropped to its scanned bounds, as QuPath and ``wsiseg`` both show
MRXS and similar slides, the corner of the bounds), so regions drawn in QuPath on the slide ``wsiseg`` reads line up.

Polygons and MultiPolygons count, their holes too (a region drawn with a hole leaves the hole out); a feature QuPath
marks as a detection, cell or tile (``properties.objectType``: nuclei, say, from an earlier run) is not a region and
is passed over, as are points and lines. An invalid outline (self-touching, as hand-drawn ones can be, or a
MultiPolygon whose parts overlap) is repaired as drawn: its parts joined, its holes cut (``shapely.make_valid``,
method ``"structure"``). A file with no region left, or that is not GeoJSON, is an :class:`InputError`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError

#: QuPath object types whose geometries are objects found, not regions drawn (``properties.objectType``)
NOT_REGIONS = ("detection", "cell", "tile")


def _json(path: str | os.PathLike) -> Any:
    """The JSON document of a file, gzip-compressed when its name ends in ``.gz``."""
    p = Path(path)
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        return json.load(f)


def read_features(path: str | os.PathLike) -> list[dict]:
    """All features of a GeoJSON/.geojson.gz file (a FeatureCollection or a bare list, as QuPath accepts)."""
    data = _json(path)
    return data["features"] if isinstance(data, dict) else list(data)


def _load(path: Path) -> Any:
    """:func:`_json`, its failures as :class:`InputError` naming the file."""
    try:
        return _json(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a GeoJSON file") from None
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:  # (json's errors are ValueErrors)
        raise InputError(f"{path}: not a GeoJSON file ({type(e).__name__}: {e})") from None


def _geometries(data: Any, path: Path) -> list[dict]:
    """The geometry objects of the regions in ``data`` (a FeatureCollection, a list of features, a Feature or a
    geometry), leaving out what :data:`NOT_REGIONS` names."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features")
    elif isinstance(data, list):
        items = data
    elif isinstance(data, dict) and "type" in data:
        items = [data]
    else:
        items = None
    if not isinstance(items, list):
        raise InputError(f"{path}: not GeoJSON (expected a FeatureCollection, a list of features, a Feature or a "
                         "geometry)")
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"{path}: feature {k} is not a GeoJSON object")
        if item.get("type") == "Feature":
            props = item.get("properties") or {}
            if isinstance(props, dict) and str(props.get("objectType", "")).lower() in NOT_REGIONS:
                continue
            item = item.get("geometry")
            if item is None:
                continue
        if isinstance(item, dict) and item.get("type") == "GeometryCollection":
            out.extend(g for g in item.get("geometries") or [] if isinstance(g, dict))
        elif isinstance(item, dict):
            out.append(item)
    return out


#: the names a slide's regions file may have in a folder of them (``--roi DIR``), ``{}`` its name with and without
#: its suffix: what QuPath scripts that export each image's annotations write
REGION_NAMES = ("{}.geojson", "{}.geojson.gz", "{}.json")


def regions_file(roi: str | os.PathLike, slide: str | os.PathLike) -> Path:
    """The regions file of ``slide``: ``roi`` itself when it is a file, else, in the folder ``roi``, the one named
    after the slide (:data:`REGION_NAMES`, the slide's name without its suffix first, then with it: ``CMU-1.geojson``
    or ``CMU-1.svs.geojson``). :class:`InputError` when the folder has none for it."""
    from .slide import slide_stem

    roi, slide = Path(roi), Path(slide)
    if not roi.is_dir():
        return roi
    names = dict.fromkeys((slide_stem(slide), slide.name))
    tried = [pattern.format(name) for name in names for pattern in REGION_NAMES]
    for name in tried:
        if (roi / name).is_file():
            return roi / name
    raise InputError(f"{roi}: no regions file for {slide.name} (looked for {', '.join(tried)})")


def regions_file_of(roi: str | os.PathLike | None, slide: str | os.PathLike | None) -> Path | None:
    """:func:`regions_file` resolved, or None where ``--roi`` names none for ``slide`` (no ``roi``, a folder of them
    and no ``slide`` to look one up by, or a folder without the slide's): what a check compares files by, before the
    run says what is wrong in its own words."""
    if roi is None or (slide is None and Path(roi).is_dir()):
        return None
    try:
        return regions_file(roi, slide if slide is not None else Path(roi)).resolve()
    except InputError:
        return None


#: the largest level-0 coordinate a region may have (pixels; a slide is at most a few 1e5 px wide): past it, a file
#: of other units or a broken export, whose regions the tiles' integer grid would wrap around
MAX_COORD = 1e8


def read_regions(path: str | os.PathLike) -> Any:
    """The union of the areas the GeoJSON file ``path`` outlines (module doc): a shapely Polygon or MultiPolygon in
    level-0 pixel coordinates, valid and not empty. :class:`InputError` naming the file when it cannot be read, is
    not GeoJSON, or outlines no area."""
    import shapely
    from shapely.geometry import shape

    p = Path(path)
    if p.exists() and not p.is_dir() and not p.is_file():
        raise InputError(f"{p}: not a regular file")
    areas = []
    for k, g in enumerate(_geometries(_load(p), p)):
        if g.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        try:
            with np.errstate(invalid="ignore"):  # (NaN coordinates: refused below, in one line)
                geom = shape(g)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, shapely.errors.GEOSException) as e:
            raise InputError(f"{p}: region {k}: not a valid {g.get('type')} ({e})") from None
        xy = shapely.get_coordinates(geom)
        if not np.isfinite(xy).all() or (np.abs(xy) > MAX_COORD).any():
            raise InputError(f"{p}: region {k}: coordinates that are not numbers or lie past {MAX_COORD:.0e} px")
        if not geom.is_valid:  # (the "structure" repair: overlapping parts are joined, holes cut, as drawn)
            geom = shapely.make_valid(geom, method="structure", keep_collapsed=False)
        areas.extend(part for part in shapely.get_parts(geom)
                     if part.geom_type in ("Polygon", "MultiPolygon") and part.area > 0)
    roi = shapely.union_all(areas) if areas else None
    if roi is None or roi.is_empty or roi.area <= 0:
        raise InputError(f"{p}: outlines no region: no Polygon or MultiPolygon with an area (export annotations "
                         "from QuPath, not detections)")
    return roi


__all__ = ["read_regions", "regions_file", "regions_file_of", "read_features", "NOT_REGIONS", "REGION_NAMES"]
