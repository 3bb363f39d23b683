"""Helpers shared by test modules of several folders (importable: tests/ is on the path, holding conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsiseg.models.pdam import BackboneConfig, DAConfig, PDAMConfig, RoIConfig, RPNConfig, SemanticConfig


def tiny_config(**da) -> PDAMConfig:
    """The smallest sensible PDAM (ResNet-18 stages 1-2, 64-channel FPN) for fast CPU tests."""
    return PDAMConfig(
        backbone=BackboneConfig(depth=18, returned_layers=[1, 2], fpn_channels=64),
        rpn=RPNConfig(anchor_sizes=[8, 16, 32], aspect_ratios=[1.0], pre_nms_top_n_train=600,
                      post_nms_top_n_train=200, pre_nms_top_n_test=600, post_nms_top_n_test=200,
                      batch_size_per_image=128),
        roi=RoIConfig(batch_size_per_image=64, box_head_fc=[128, 128], mask_head_channels=[32, 32],
                      detections_per_img=50),
        semantic=SemanticConfig(channels=32),
        da=DAConfig(image_channels=[64, 64, 64], instance_hidden=[64, 32], semantic_channels=[32, 32, 32, 32],
                    instance_rois=16, **da),
    )


def interrupting_sink(calls: int | None = None, nuclei: int | None = None):
    """A ``segment_slide`` sink that stops the run as Ctrl-C does (``KeyboardInterrupt``, the journal kept): at its
    ``calls``-th call, or once it has been given more than ``nuclei`` nuclei."""
    seen = [0, 0]

    def sink(batch) -> None:
        seen[0] += 1
        seen[1] += len(batch)
        if seen[0] == calls or (nuclei is not None and seen[1] > nuclei):
            raise KeyboardInterrupt

    return sink


class StopAfter:
    """``seg`` interrupted (as by Ctrl-C: ``KeyboardInterrupt``) once it has predicted ``n`` tiles; otherwise it is
    ``seg`` (its name, scale, description and, for a classical one, its calibration)."""

    def __init__(self, seg, n: int) -> None:
        self.seg, self.n = seg, n
        self.name, self.mpp, self.max_nucleus_px = seg.name, seg.mpp, seg.max_nucleus_px
        if hasattr(seg, "calibrate"):
            self.calibrate = seg.calibrate

    def info(self):
        """``seg``'s description (a watershed's threshold, calibrated per slide, goes into the resume journal)."""
        return self.seg.info()

    def predict(self, tiles):
        self.n -= len(tiles)
        if self.n < 0:
            raise KeyboardInterrupt
        return self.seg.predict(tiles)


def random_layout(rng: np.random.Generator, h: int, w: int, n: int, rmax: int) -> np.ndarray:
    """Non-overlapping blobs (ellipses, some touching) of radius <= rmax."""
    import cv2
    from scipy import ndimage as ndi

    lab = np.zeros((h, w), np.int32)
    k = 0
    for _ in range(n):
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        ax, ay = rng.integers(3, rmax + 1), rng.integers(3, rmax + 1)
        m = np.zeros((h, w), np.uint8)
        cv2.ellipse(m, (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        m = m.astype(bool) & (lab == 0)
        cc, nc = ndi.label(m)
        if nc == 0:
            continue
        m = cc == (np.argmax(np.bincount(cc.ravel())[1:]) + 1)
        if m.sum() < 12:
            continue
        k += 1
        lab[m] = k
    return lab


def probe_image(seg, img: np.ndarray, mpp: float = 0.25):
    """:func:`wsiseg.wsi.scale.probe` of the RGB image ``img`` (at ``mpp``) with ``seg``, as a run of it probes."""
    import functools

    from wsiseg.io.slide import Slide
    from wsiseg.wsi.grid import plan_grid, read_tile
    from wsiseg.wsi.scale import probe

    slide = Slide.from_array(img, mpp)

    def tiles_at(zoom):
        grid = plan_grid(seg, slide.dimensions, mpp, zoom=zoom)
        return functools.partial(read_tile, slide, grid), grid.tiles(None)

    return probe(seg, tiles_at)


# ---- DICOM slides, made from the real bundled slide by an independent writer (wsidicomizer), as a hospital's
# converter would (tests/io/test_dicom.py, tests/export/test_dicom_ann.py; both skip without wsidicomizer)

#: the crop of the bundled slide the DICOM slides hold: dermis and epidermis (level-0 pixels, 20x)
DICOM_CROP = (600, 1200, 1024, 1024)


def crop_tiff(path: Path, levels: int = 1) -> Path:
    """The crop as a tiled, losslessly compressed TIFF at the slide's scale (``levels``: a pyramid of halvings)."""
    import cv2
    import tifffile

    from wsiseg.api import sample_slide
    from wsiseg.io.slide import open_slide

    s = open_slide(sample_slide())
    img = s.read_region(DICOM_CROP[:2], 0, DICOM_CROP[2:])
    with tifffile.TiffWriter(path) as t:
        for k in range(levels):
            t.write(img, tile=(256, 256), compression="zlib", photometric="rgb", resolutionunit="CENTIMETER",
                    resolution=(1e4 / (s.mpp * 2 ** k),) * 2, subfiletype=1 if k else 0)
            img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return path


def dicomize(source: Path, folder: Path, lossless: bool = True, **kw) -> list[Path]:
    """``source`` written as a DICOM slide into ``folder`` by wsidicomizer (uncompressed: the same pixels)."""
    import wsidicomizer
    from wsidicom.codec import JpegSettings, NumpySettings
    from wsidicomizer.sources.tiffslide.tiffslide_source import TiffSlideSource

    folder.mkdir(parents=True, exist_ok=True)
    files = wsidicomizer.WsiDicomizer.convert(source, folder, tile_size=256, preferred_source=TiffSlideSource,
                                              encoding=NumpySettings() if lossless else JpegSettings(), **kw)
    return [Path(f) for f in files]


def crop_in(folder: Path) -> dict:
    """The crop as a TIFF in ``folder`` (:func:`crop_tiff`) with its pixels and scale: what the reader tests write
    in another format, to find the same nuclei in (``{"dir", "tif", "mpp", "rgb"}``)."""
    from wsiseg.io.slide import open_slide

    path = crop_tiff(folder / "crop.tif")
    with open_slide(path) as s:
        return {"dir": folder, "tif": path, "mpp": s.mpp, "rgb": s.read_region((0, 0), 0, s.dimensions)}


def nuclei_of(geojson: Path) -> list:
    """A GeoJSON's nuclei as ``(geometry, measurements)``, in order: what two runs of the same pixels share (their
    ids, seeded by the input, differ)."""
    from wsiseg.export.geojson import iter_features

    return [(f["geometry"], f["properties"]["measurements"]) for f in iter_features(geojson)]
