"""DICOM annotations: the nuclei of a DICOM slide as a Microscopy Bulk Simple Annotations object (``ANN``).

A hospital that keeps its slides in a PACS keeps what is found on them there too: ``wsiseg run SLIDE_FOLDER --out
nuclei.geojson --dicom-ann nuclei.dcm`` writes, beside the GeoJSON, one DICOM file (PS3.3 A.87, Microscopy Bulk
Simple Annotations IOD) that a DICOMweb store takes in the slide's own study and viewers such as Slim (the Imaging
Data Commons') draw over the slide. Written by highdicom; what it holds:

- **The image it annotates**: the slide's full-resolution image (the series' largest VOLUME instance), with its
  patient, study, specimen and frame of reference copied from it. Coordinates are 2D, relative to that image's
  Total Pixel Matrix (``PixelOriginInterpretation`` VOLUME): DICOM's image coordinates put (0, 0) at the top-left
  corner of the top-left pixel, as the GeoJSON does, so each vertex is the GeoJSON's, moved by the slide's bounds'
  corner where OpenSlide crops to one (:mod:`wsiseg.io.slide`). Stored as 32-bit floats (at 150,000 px a step of
  0.016 px, 4 nm at 0.25 um/px).
- **One annotation group per kind of object**: ``Nucleus`` (SNOMED CT 84640000, category Anatomical Structure
  91723000), every nucleus a POLYGON (its GeoJSON ring, without the repeated closing vertex, as the standard asks);
  with ``--objects cells`` also ``Cell`` (SNOMED CT 4421005), the cells' outlines in the same order. Made by an
  AUTOMATIC algorithm, identified as ``wsiseg`` with its version and the model.
- **The GeoJSON's measurements**, one value per annotation, in the GeoJSON's order: Area (SNOMED CT 42798000, um2)
  and Perimeter (131191004, um) by their standard codes; the others (``Label``, the zarr label's id; ``Score``;
  ``Circularity``, ``Solidity``, the diameters; the stain means) under the private coding scheme ``99WSISEG``
  (DICOM's designator for a local scheme, named in the object's Coding Scheme Identification Sequence), each
  code's meaning the GeoJSON's name; a value a feature lacks (a nucleus whose stain was not measured) is NaN,
  DICOM's "no value". A cell's measurements go with the group they describe (``Cell: Area µm^2`` as the cell's
  Area; ``Label``, ``Score`` and ``Nucleus/Cell area ratio`` with both).

Entry point: :func:`write_annotations` (``wsiseg run`` calls it after the GeoJSON is committed).
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.atomic import os_error, replacing
from ..core.errors import InputError
from ..core.version import __version__
from .geojson import read_back, read_header

#: the coding scheme designator of the measurements DICOM has no code for (PS3.3 8.2: "99" starts a local scheme)
PRIVATE_SCHEME = "99WSISEG"
#: SOP class UIDs: the VL Whole Slide Microscopy Image an annotation refers to
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: the GeoJSON's measurement names with a standard code: (SNOMED CT code, meaning, UCUM unit)
STANDARD = {"Area µm^2": ("42798000", "Area", "um2"), "Perimeter µm": ("131191004", "Perimeter", "um")}
#: units of the GeoJSON's other measurements (the rest have none)
UNITS = {"Max diameter µm": "um", "Min diameter µm": "um"}
#: the private codes of wsiseg's own measurements (others: their names' letters, :func:`_code`)
PRIVATE_CODES = {"Label": "LABEL", "Score": "SCORE", "Circularity": "CIRCULARITY", "Solidity": "SOLIDITY",
                 "Max diameter µm": "MAXDIAMETER", "Min diameter µm": "MINDIAMETER",
                 "Hematoxylin: Mean": "HEMATOXYLINMEAN", "Hematoxylin: Std.Dev.": "HEMATOXYLINSD",
                 "Eosin: Mean": "EOSINMEAN", "Nucleus/Cell area ratio": "NCRATIO"}
PLURALS = {"Nucleus": "nuclei", "Cell": "cells"}
NAN = float("nan")
#: measurements left out: the centroid is the polygon's own, which a viewer computes
LEFT_OUT = ("Centroid X px", "Centroid Y px")


@dataclass
class _Group:
    """The polygons of one kind of object and their measurements, in the GeoJSON's order."""

    polygons: list[np.ndarray] = field(default_factory=list)  # (float32, as written: a slide's million in ~0.5 GB)
    values: dict[str, array] = field(default_factory=dict)

    def add(self, ring: list, measurements: dict[str, float], where: str) -> None:
        pts = np.asarray(ring, np.float64)
        if pts.ndim != 2 or pts.shape[1] < 2 or len(pts) < 4:
            raise InputError(f"{where}: not a polygon of at least three vertices")
        pts = pts[:-1, :2] if np.array_equal(pts[0], pts[-1]) else pts[:, :2]  # (DICOM repeats no vertex)
        pts = pts.astype(np.float32)
        n = len(self.polygons)
        for k, v in measurements.items():
            col = self.values.get(k)
            if col is None:  # (first seen here: the features before have no value)
                col = self.values[k] = array("d", [NAN]) * n
            col.append(float(v))
        for col in self.values.values():
            if len(col) == n:  # (a measurement this feature lacks, or holds as null: NaN, DICOM's "no value")
                col.append(NAN)
        self.polygons.append(pts)


def _numbers(props: dict, prefix: str | None) -> dict[str, float]:
    """The numeric measurements of a feature for one group: all of them (``prefix`` None), or a cell's for the
    group ``prefix`` names (``Nucleus: `` or ``Cell: ``, the prefix taken off; unprefixed ones go with both)."""
    m = props.get("measurements") or {}
    out = {}
    for k, v in m.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if prefix is not None and ": " in k and k.split(": ", 1)[0] in ("Nucleus", "Cell"):
            if not k.startswith(prefix):
                continue
            k = k[len(prefix):]
        if k not in LEFT_OUT:
            out[k] = v
    return out


def read_groups(geojson: str | os.PathLike, shift: tuple[float, float] = (0.0, 0.0)) -> dict[str, _Group]:
    """The GeoJSON's objects as annotation groups (``Nucleus``, and ``Cell`` for cell objects), each vertex moved by
    ``shift`` (the slide's bounds' corner). :class:`InputError` for a feature that is not one polygon."""
    groups: dict[str, _Group] = {}
    for k, feat in enumerate(read_back(geojson)):
        _add(groups, feat, shift, f"{geojson}: feature {k + 1}")
    return groups


def _add(groups: dict[str, _Group], feat: dict, shift: tuple[float, float], where: str) -> None:
    """One feature's polygon (and its nucleus', for a cell) into ``groups``, moved by ``shift``."""
    props = feat.get("properties") or {}
    geom = feat.get("geometry") or {}
    nucleus = feat.get("nucleusGeometry")
    if geom.get("type") != "Polygon" or not geom.get("coordinates"):
        raise InputError(f"{where}: expected a Polygon, got {geom.get('type')!r}")
    if nucleus is None:
        parts = [("Nucleus", geom, None)]
    else:
        parts = [("Nucleus", nucleus, "Nucleus: "), ("Cell", geom, "Cell: ")]
    for name, g, prefix in parts:
        ring = np.asarray(g["coordinates"][0], np.float64) + shift
        groups.setdefault(name, _Group()).add(ring, _numbers(props, prefix), where)


def volume_image(slide: str | os.PathLike):
    """The pydicom dataset (without pixels) of a DICOM slide's full-resolution image: among the files of the series
    ``slide`` is (a folder holding one DICOM slide, or any of its files), the VOLUME image with the most pixels.
    :class:`InputError` when ``slide`` is not a DICOM slide."""
    import pydicom

    from ..io.dicom import series_of
    from ..io.slide import slide_file, slide_label

    p = slide_file(Path(slide))  # (a folder: its DICOM slide's main file)
    found = series_of(p)
    if found is None:
        raise InputError(f"{slide_label(p)}: not a DICOM slide, and DICOM annotations refer to a DICOM slide's image")
    best, best_px = None, -1
    for f in found[1]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as e:  # (pydicom's own errors: the file is cut short or not DICOM)
            raise InputError(f"{f}: not readable as DICOM ({type(e).__name__}: {e})") from None
        kind = list(ds.get("ImageType", []))
        px = int(ds.get("TotalPixelMatrixColumns", 0)) * int(ds.get("TotalPixelMatrixRows", 0))
        if ds.get("SOPClassUID") == WSI_SOP_CLASS and len(kind) > 2 and kind[2] == "VOLUME" and px > best_px:
            best, best_px = ds, px
    if best is None:
        raise InputError(f"{slide_label(p)}: the DICOM slide has no VOLUME image to annotate")
    return best


def check_image(image, dimensions: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> None:
    """:class:`InputError` unless the DICOM ``image`` (:func:`volume_image`) is the slide read from it: as large as
    its level-0 ``dimensions`` (where the slide is cropped to bounds whose corner ``origin`` is not (0, 0), at least
    as large as the bounds' far corner); else the annotations would not lie where the GeoJSON's do."""
    size = (int(image.get("TotalPixelMatrixColumns", 0)), int(image.get("TotalPixelMatrixRows", 0)))
    need = (dimensions[0] + origin[0], dimensions[1] + origin[1])
    cropped = tuple(origin) != (0, 0)
    if (size[0] < need[0] or size[1] < need[1]) if cropped else size != need:
        raise InputError(f"the DICOM slide's full-resolution image is {size[0]} x {size[1]} px, not the {need[0]} x "
                         f"{need[1]} px read from it: its annotations could not be placed")


def annotated_slide(slide: str | os.PathLike) -> tuple[Path, tuple[int, int], object]:
    """The DICOM slide annotations are made for (a run's, before any work; ``wsiseg export``'s; a cohort's finished
    slides') at ``slide`` (its folder, or one of its files) as ``(its main file, its bounds' corner, its
    volume_image)``, the image checked against the slide OpenSlide reads (:func:`check_image`)."""
    from ..io.slide import open_slide, slide_file

    path = slide_file(Path(slide))
    image = volume_image(path)
    with open_slide(path) as s:
        dims, origin = s.dimensions, s.origin
    check_image(image, dims, origin)
    return path, origin, image


def _check_inside(groups: dict[str, _Group], image, geojson) -> None:
    """:class:`InputError` when an outline reaches past the DICOM ``image`` (a GeoJSON of another, larger slide)."""
    size = (float(image.get("TotalPixelMatrixColumns", 0)), float(image.get("TotalPixelMatrixRows", 0)))
    far = np.max([p.max(axis=0) for g in groups.values() for p in g.polygons], axis=0)
    if far[0] > size[0] + 1 or far[1] > size[1] + 1:
        raise InputError(f"{geojson}: its outlines reach ({far[0]:.0f}, {far[1]:.0f}), outside the DICOM slide's "
                         f"{size[0]:.0f} x {size[1]:.0f} px image: made from another slide?")


def _code(name: str):
    """The measurement ``name``'s code: SNOMED CT's where it has one, else the private scheme's (ASCII: DICOM's
    default character set), its meaning the GeoJSON's name without its unit."""
    from pydicom.sr.coding import Code

    if name in STANDARD:
        value, meaning, _ = STANDARD[name]
        return Code(value, "SCT", meaning)
    meaning = _ascii(name.removesuffix(" µm^2").removesuffix(" µm"))
    value = PRIVATE_CODES.get(name) or "".join(c for c in meaning.upper() if c.isalnum())[:16] or "MEASUREMENT"
    return Code(value, PRIVATE_SCHEME, meaning[:64])


def _ascii(text: str) -> str:
    return text.replace("µ", "u").encode("ascii", "replace").decode()


def _unit(name: str):
    from pydicom.sr.coding import Code

    unit = STANDARD[name][2] if name in STANDARD else UNITS.get(name, "1")
    meaning = {"um2": "square micrometer", "um": "micrometer", "1": "no units"}[unit]
    return Code(unit, "UCUM", meaning)


def build(groups: dict[str, _Group], source, header: dict | None = None):
    """The annotations object (a highdicom dataset) of ``groups`` on the image ``source`` (:func:`volume_image`);
    ``header``: the GeoJSON's provenance header (the model's name goes into the algorithm's identification)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    header = header or {}
    model = str(header.get("model_source") or header.get("model") or "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="wsiseg", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={k: str(header[k]) for k in ("model", "model_source", "min_score", "precision", "zoom")
                    if header.get(k) is not None})
    kinds = {"Nucleus": codes.SCT.Nucleus, "Cell": codes.SCT.Cell}
    items = []
    for number, (name, g) in enumerate(((n, g) for n, g in groups.items() if g.polygons), start=1):
        measurements, used = [], set()
        for k, v in g.values.items():
            values = np.asarray(v, np.float32)
            if np.isnan(values).all():
                continue
            code = _code(k)
            while code.value in used:  # (two names of another GeoJSON with the same letters)
                code = type(code)(code.value[:14] + f"{len(used):02d}", code.scheme_designator, code.meaning)
            used.add(code.value)
            measurements.append(hd.ann.Measurements(name=code, values=values, unit=_unit(k)))
        items.append(hd.ann.AnnotationGroup(
            number=number, uid=generate_uid(), label=name,
            annotated_property_category=codes.SCT.AnatomicalStructure, annotated_property_type=kinds[name],
            graphic_type=hd.ann.GraphicTypeValues.POLYGON,
            graphic_data=g.polygons,
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, measurements=measurements or None,
            description=f"{PLURALS[name]} found by wsiseg" + (f" ({model})" if model else "")))
    if not items:
        raise InputError("no nuclei to annotate: the GeoJSON holds none (a DICOM annotation needs at least one)")
    series_number = int(source.get("SeriesNumber", 0) or 0) + 1000
    ds = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source], annotation_coordinate_type="2D", annotation_groups=items,
        series_instance_uid=generate_uid(), series_number=series_number % 2 ** 31, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="wsiseg", manufacturer_model_name=(model or "wsiseg")[:64],
        software_versions=__version__, device_serial_number="0", content_label="NUCLEI",
        content_description=f"nuclei found by wsiseg {__version__}"[:64],
        pixel_origin_interpretation="VOLUME")
    scheme = Dataset()  # (SOP Common's Coding Scheme Identification: a local scheme is named where it is used)
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = PRIVATE_SCHEME, "wsiseg measurements"
    scheme.CodingSchemeResponsibleOrganization = "wsiseg"
    ds.CodingSchemeIdentificationSequence = [scheme]
    return ds


def write_annotations(geojson: str | os.PathLike, slide: str | os.PathLike, out: str | os.PathLike,
                      origin: tuple[int, int] = (0, 0), header: dict | None = None, image=None,
                      existed: bool = True) -> int:
    """Write the objects of ``geojson`` (wsiseg's, or any GeoJSON of polygons in the slide's level-0 pixels) as a
    DICOM annotations file ``out`` on the DICOM slide ``slide`` (a folder holding one, or any of its files);
    ``origin``: the corner of the slide's bounds, where OpenSlide crops to them (``Slide.origin``); ``header``: the
    GeoJSON's provenance (default: read from it); ``image``: the slide's :func:`volume_image`, where already read.
    Atomic: ``out`` appears whole or not at all; ``existed`` False: ``out`` was not there when the run began, and
    one that appeared since is left as it is (an OutputError). Returns the number of annotations (nuclei; with cells,
    nuclei and cells); 0, and nothing written, when the GeoJSON holds none (an annotation object needs one)."""
    source = volume_image(slide) if image is None else image
    groups = read_groups(geojson, shift=origin)
    if not any(g.polygons for g in groups.values()):
        return 0
    _check_inside(groups, source, geojson)
    ds = build(groups, source, read_header(geojson) if header is None else header)
    try:
        with replacing(out, existed=existed) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    except OSError as e:
        raise os_error(e, out) from None
    return sum(len(g.polygons) for g in groups.values())


__all__ = ["PRIVATE_SCHEME", "annotated_slide", "build", "check_image", "read_groups", "volume_image",
           "write_annotations"]
