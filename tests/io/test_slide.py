"""Slide reading: real SVS with both backends, synthetic pyramidal TIFFs, plain images, tiles at model scale."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tifffile

from wsiseg.core.errors import InputError
from wsiseg.io.slide import open_slide
from wsiseg.wsi.grid import TileGrid, read_tile


def test_svs_both_backends_agree(svs_path):
    a = open_slide(svs_path, "openslide")
    b = open_slide(svs_path, "tiffslide")
    assert a.backend == "openslide" and b.backend == "tiffslide"
    assert a.dimensions == b.dimensions == (2220, 2967)
    assert a.mpp == pytest.approx(0.499) and b.mpp == pytest.approx(0.499)
    assert a.objective_power == b.objective_power == 20
    assert set(a.associated) == set(b.associated) == {"label", "macro", "thumbnail"}
    assert a.associated["thumbnail"] == b.associated["thumbnail"]
    for loc, size in [((0, 0), (300, 200)), ((1000, 1500), (256, 256)), ((2100, 2900), (200, 200))]:
        pa = a.read_region(loc, 0, size)
        pb = b.read_region(loc, 0, size)
        assert pa.shape == (size[1], size[0], 3) and pa.dtype == np.uint8
        assert np.array_equal(pa, pb)
    # beyond the slide: white, like glass
    out = a.read_region((2200, 2950), 0, (64, 64))
    assert (out[30:, 30:] == 255).all()
    assert np.array_equal(out, b.read_region((2200, 2950), 0, (64, 64)))
    assert a.associated_image("label").shape[2] == 3


def test_auto_backend_picks_openslide_for_svs(svs_path):
    s = open_slide(svs_path)
    assert s.backend == "openslide" and s.format == "aperio"


def _pyramid_tiff(path, img, mpp=None, levels=3, subifds=False):
    """A tiled pyramidal TIFF (levels as successive pages, or as SubIFDs), optionally with resolution tags."""
    kw = {}
    if mpp is not None:
        kw = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(img, tile=(128, 128), subifds=levels - 1 if subifds else None, photometric="rgb",
                 compression="zlib", **kw)
        cur = img
        for _ in range(levels - 1):
            cur = cur[::2, ::2]
            tw.write(cur, tile=(128, 128), subfiletype=1, photometric="rgb", compression="zlib", **kw)


@pytest.mark.parametrize("shape", [(1000, 1300), (700, 512)])
@pytest.mark.parametrize("mpp", [0.25, None])
def test_synthetic_pyramid(tmp_path, shape, mpp):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(*shape, 3), dtype=np.uint8)
    p = tmp_path / "pyr.tif"
    _pyramid_tiff(p, img, mpp)
    for backend in ("tiffslide", "openslide"):
        s = open_slide(p, backend)
        assert s.dimensions == (shape[1], shape[0])
        assert len(s.levels) == 3
        assert [round(lv.downsample) for lv in s.levels] == [1, 2, 4]
        if mpp is None:
            assert s.mpp is None
        else:
            assert s.mpp == pytest.approx(mpp, rel=1e-3)
        assert np.array_equal(s.read_region((100, 60), 0, (128, 96)), img[60:156, 100:228])
        lv1 = s.read_region((200, 120), 1, (50, 40))  # location in level-0 coordinates
        assert np.array_equal(lv1, img[::2, ::2][60:100, 100:150])
    assert open_slide(p).backend == "tiffslide"


def test_subifd_pyramid_read_by_tiffslide(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, size=(600, 700, 3), dtype=np.uint8)
    p = tmp_path / "sub.tif"
    _pyramid_tiff(p, img, 0.5, subifds=True)
    s = open_slide(p)
    assert s.backend == "tiffslide" and len(s.levels) == 3 and s.mpp == pytest.approx(0.5)
    assert np.array_equal(s.read_region((40, 80), 2, (30, 20)), img[::4, ::4][20:40, 10:40])


def test_plain_images(tmp_path, kumar_dir):
    import cv2

    src = tifffile.imread(next((kumar_dir / "images").glob("*.tif")))[..., :3]
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), src[..., ::-1])
    for p in (png, next((kumar_dir / "images").glob("*.tif"))):
        s = open_slide(p)
        assert s.backend == "image" and s.dimensions == (1000, 1000)
        assert np.array_equal(s.read_region((10, 20), 0, (50, 40)), src[20:60, 10:60])
    grey = tmp_path / "g.png"
    cv2.imwrite(str(grey), src[..., 0])
    assert open_slide(grey).read_region((0, 0), 0, (5, 5)).shape == (5, 5, 3)


def test_read_tile_resamples_to_model_scale(tmp_path):
    # a 20x image (0.5 um/px) read for a 40x model (0.25 um/px): each pixel becomes 2x2
    img = np.zeros((300, 300, 3), np.uint8)
    img[100:110, 50:70] = 200
    p = tmp_path / "x.tif"
    _pyramid_tiff(p, img, mpp=0.5, levels=2)
    s = open_slide(p)
    g = TileGrid.for_slide(s.dimensions, s.mpp, 0.25, 256, 64)
    assert g.scale == pytest.approx(0.5) and (g.width, g.height) == (600, 600)
    t = read_tile(s, g, 0, 0)
    assert t.shape == (256, 256, 3)
    inner = t[4:, 4:, 0]  # the slide's top/left border blends with the white beyond it
    ys, xs = np.nonzero(inner > 100)
    assert (ys.min() + 4, ys.max() + 4, xs.min() + 4, xs.max() + 4) == (200, 219, 100, 139)
    # and a 40x slide read for a 20x model: shrink 2x from level 0 (level 1 exists and is used directly)
    g2 = TileGrid.for_slide(s.dimensions, 0.25, 0.5, 64, 16)
    t2 = read_tile(s, g2, 0, 0)
    assert np.array_equal(t2, s.read_region((0, 0), 1, (64, 64)))


@pytest.mark.parametrize("content,msg", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"hello, this is not an image at all", "unsupported file format"),
])
def test_bad_inputs(tmp_path, content, msg):
    p = tmp_path / "bad.svs"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(InputError, match=msg):
        open_slide(p)


def test_directory_is_not_a_slide(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        open_slide(tmp_path)


def test_truncated_svs(tmp_path, svs_path):
    data = svs_path.read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[:200])
    with pytest.raises(InputError):
        s = open_slide(p)
        s.read_region((0, 0), 0, (256, 256))


def test_slide_does_not_pickle(svs_path):
    import pickle

    with pytest.raises(TypeError, match="do not pickle"):
        pickle.dumps(open_slide(svs_path))


def test_iter_batches_and_predict_ahead_keep_order_and_errors():
    """Batches come in tile order; predictions run one batch ahead in a thread but arrive in order, exactly as
    calling predict in a loop; a failing predict raises at its batch; leaving early stops cleanly."""
    import threading

    from wsiseg.wsi.grid import iter_batches, predict_ahead

    tiles = [(r, c) for r in range(5) for c in range(7)]

    def read(r: int, c: int) -> np.ndarray:
        return np.full((4, 4, 3), r * 10 + c, np.uint8)

    threads: set[str] = set()

    def predict(px: np.ndarray) -> list[int]:
        threads.add(threading.current_thread().name)
        return [int(p[0, 0, 0]) for p in px]

    got = list(predict_ahead(iter_batches(read, tiles, 4), predict))
    assert [i for ids, *_ in got for i in ids] == tiles
    assert [v for _, out, *_ in got for v in out] == [r * 10 + c for r, c in tiles]
    assert all(len(t) == 5 and min(t[2:]) >= 0 for t in got)
    assert threads and all(n.startswith("wsiseg-predict") for n in threads)
    threads.clear()
    serial = list(predict_ahead(iter_batches(read, tiles, 4), predict, depth=0))  # no thread: the same results
    assert [(ids, out) for ids, out, *_ in serial] == [(ids, out) for ids, out, *_ in got]
    assert threads == {threading.current_thread().name}

    def failing(px: np.ndarray) -> list[int]:
        if px[0, 0, 0, 0] >= 20:
            raise ValueError("bad batch")
        return predict(px)

    seen = []
    with pytest.raises(ValueError, match="bad batch"):
        for ids, out, *_ in predict_ahead(iter_batches(read, tiles, 7), failing):
            seen.append(out)
    assert len(seen) == 2  # rows 0 and 1, then the error at row 2

    def unreadable(r: int, c: int) -> np.ndarray:  # two bad tiles in one batch: the first in order is raised
        if (r, c) in ((1, 5), (1, 2)):
            raise OSError(f"tile {r},{c} unreadable")
        return read(r, c)

    with pytest.raises(OSError, match="tile 1,2 unreadable"):
        list(iter_batches(unreadable, tiles, 14))

    def ours() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith(("wsiseg-predict", "wsiseg-read"))]

    # the reader's threads stopped with the error, here, not later in the garbage collector (which may run in any
    # thread, and joining threads there once hung a CI run)
    assert not ours()

    gen = predict_ahead(iter_batches(read, tiles, 4), predict)
    next(gen)
    gen.close()  # early exit: both thread pools shut down without hanging
    assert not ours()
    for depth in (0, 1):  # a consumer that fails mid-way, with the generator still referenced by the traceback
        with pytest.raises(KeyError):
            with contextlib.closing(predict_ahead(iter_batches(read, tiles, 4), predict, depth=depth)) as gen:
                for _ in gen:
                    raise KeyError("consumer failed")
        assert not ours()


def test_thumbnail_of_a_level_without_pyramid_streams_in_strips(tmp_path, monkeypatch, kumar_dir):
    """A level far larger than the thumbnail is reduced a strip of rows at a time (so a 40k px single-level TIFF is
    never decoded whole); the strips give the same overview as one whole-level reduction, to rounding."""
    import numpy as np
    import tifffile

    import wsiseg.io.slide as slide_mod
    from wsiseg.io.slide import open_slide

    img = tifffile.imread(next((kumar_dir / "images").glob("*.tif")))[..., :3]
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, img, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        whole, ds = s.thumbnail(max_size=125)
        monkeypatch.setattr(slide_mod, "THUMBNAIL_STREAM_PX", 1 << 16)  # 64k px: this 1 Mpx level now streams
        reads = []
        orig = s.read_region
        monkeypatch.setattr(s, "read_region", lambda loc, lvl, size: reads.append(size) or orig(loc, lvl, size))
        strips, ds2 = s.thumbnail(max_size=125)
    assert strips.shape == whole.shape == (125, 125, 3) and ds == ds2 == 8
    assert len(reads) > 4 and max(w * h for w, h in reads) <= (1 << 16) // 4 + 1000 * 8
    assert np.abs(strips.astype(int) - whole.astype(int)).mean() < 1.0


def test_png_named_svs_is_read_as_the_png_it_is(tmp_path, kumar_dir):
    import cv2
    import numpy as np
    import tifffile

    from wsiseg.io.slide import open_slide

    img = tifffile.imread(next((kumar_dir / "images").glob("*.tif")))[:200, :300, :3]
    p = tmp_path / "renamed.svs"
    ok, buf = cv2.imencode(".png", img[..., ::-1])
    p.write_bytes(buf.tobytes())
    with open_slide(p) as s:
        assert s.backend == "image" and s.format == "png" and s.dimensions == (300, 200)
        assert np.array_equal(s.read_region((0, 0), 0, (300, 200)), img)


def _leica_scn(path, img: np.ndarray, origin: tuple[int, int], nm_per_px: int = 250) -> None:
    """A Leica SCN file (BigTIFF, zlib tiles, the SCN XML OpenSlide reads) whose one brightfield image ``img`` lies
    at ``origin`` inside a larger empty collection: OpenSlide then declares ``openslide.bounds-*`` around it, as it
    does for MIRAX and VSI slides."""
    h, w = img.shape[:2]
    ox, oy = origin
    cw, ch = w + 2 * ox, h + 2 * oy
    xml = (f'<?xml version="1.0" encoding="utf-8"?>'
           f'<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
           f'<collection name="t" sizeX="{cw * nm_per_px}" sizeY="{ch * nm_per_px}"><image name="main">'
           f'<pixels sizeX="{w}" sizeY="{h}"><dimension sizeX="{w}" sizeY="{h}" r="0" ifd="0"/>'
           f'<dimension sizeX="{w // 2}" sizeY="{h // 2}" r="1" ifd="1"/></pixels>'
           f'<view sizeX="{w * nm_per_px}" sizeY="{h * nm_per_px}" offsetX="{ox * nm_per_px}" '
           f'offsetY="{oy * nm_per_px}" spacingZ="0"/><scanSettings><objectiveSettings><objective>40</objective>'
           f'</objectiveSettings><illuminationSettings><illuminationSource>brightfield</illuminationSource>'
           f'</illuminationSettings></scanSettings></image></collection></scn>')
    with tifffile.TiffWriter(path, bigtiff=True) as t:
        t.write(img, tile=(256, 256), compression="zlib", photometric="rgb", description=xml, metadata=None)
        t.write(img[::2, ::2], tile=(256, 256), compression="zlib", photometric="rgb", metadata=None)


def test_slide_with_bounds_is_cropped_as_qupath_does(tmp_path, kumar_dir):
    """A slide that declares the bounds of its non-empty region (here a Leica SCN, read by OpenSlide) is cropped to
    them, as QuPath crops it by default: level 0 is the bounds' rectangle, its pixels the image's, and ``wsiseg
    run`` writes the same polygons as for the image alone (so they land on the nuclei in QuPath), with the offset
    in the header."""
    import json

    from wsiseg.cli import main

    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:, :, :3]
    scn, plain = tmp_path / "s.scn", tmp_path / "plain.tif"
    _leica_scn(scn, img, (300, 200))
    tifffile.imwrite(plain, img)
    import openslide

    props = openslide.OpenSlide(str(scn)).properties
    assert (props["openslide.bounds-x"], props["openslide.bounds-y"]) == ("300", "200")
    with open_slide(scn) as s:
        assert s.backend == "openslide" and s.format == "leica" and s.origin == (300, 200)
        assert s.dimensions == (img.shape[1], img.shape[0]) and s.levels[1].width == img.shape[1] // 2
        assert np.array_equal(s.read_region((0, 0), 0, (img.shape[1], img.shape[0])), img)
        assert s.info()["bounds_origin"] == [300, 200]
    outs = {}
    for p in (scn, plain):
        gj = tmp_path / f"{p.stem}.geojson"
        assert main(["run", str(p), "--out", str(gj), "--model", "watershed", "--mpp", "0.25", "--quiet"]) == 0
        outs[p] = json.loads(gj.read_text(encoding="utf-8"))
    a, b = outs[scn], outs[plain]
    assert len(a["features"]) == len(b["features"]) > 100
    assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]]
    assert a["wsiseg"]["bounds_origin"] == [300, 200] and "bounds_origin" not in b["wsiseg"]


def test_rgba_composited_onto_white_exactly_whether_opaque_or_not():
    from wsiseg.io.pixels import rgb8

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)

    def reference(a):  # the definition: straight alpha over white, floor division
        al = a[..., 3:4].astype(np.int64)
        return ((a[..., :3].astype(np.int64) * al + 255 * (255 - al)) // 255).astype(np.uint8)

    opaque = a.copy()
    opaque[..., 3] = 255  # a scan's tissue: the fast path
    for x in (a, opaque, opaque[:, ::2], a[:, ::2]):  # contiguous and strided
        out = rgb8(x)
        assert out.dtype == np.uint8 and out.shape == x.shape[:2] + (3,) and out.flags.c_contiguous
        assert np.array_equal(out, reference(x))
    one = opaque.copy()
    one[5, 7, 3] = 0  # a single transparent pixel is composited (white), the rest kept
    out = rgb8(one)
    assert (out[5, 7] == 255).all() and np.array_equal(np.delete(out.reshape(-1, 3), 5 * 48 + 7, 0),
                                                      np.delete(opaque[..., :3].reshape(-1, 3), 5 * 48 + 7, 0))


def test_cached_slide_one_handle_per_file_and_a_new_one_when_it_is_replaced(tmp_path, kumar_dir):
    import os
    import shutil

    from wsiseg.io.slide import cached_slide

    src = sorted((kumar_dir / "images").glob("*.tif"))
    a = tmp_path / "a.tif"
    shutil.copy(src[0], a)
    first = cached_slide(a)
    assert cached_slide(str(a)) is first
    assert cached_slide(tmp_path / "." / "a.tif") is first  # another spelling of the same file
    os.symlink(a, tmp_path / "link.tif")
    assert cached_slide(tmp_path / "link.tif") is first
    shutil.copy(src[1], tmp_path / "b.tif")
    os.replace(tmp_path / "b.tif", a)  # replaced under the same name: opened again
    second = cached_slide(a)
    assert second is not first
    assert np.array_equal(second.read_region((0, 0), 0, (8, 8)), open_slide(src[1]).read_region((0, 0), 0, (8, 8)))
    with pytest.raises(InputError, match="no such file"):
        cached_slide(tmp_path / "missing.tif")


def test_tiled_levels_read_through_the_tile_cache_as_asked(tmp_path):
    """A tiled pyramid whose levels have non-integer downsamples (700 -> 234 -> 78 px): every region, any level,
    inside, across and outside the edges, is the level's pixels padded with white, read through the process' cache
    of decoded TIFF tiles (each tile decoded once) or, for large regions and a level in strips, as asked."""
    import wsiseg.io.slide as S

    rng = np.random.default_rng(4)
    img = rng.integers(0, 255, size=(600, 700, 3), dtype=np.uint8)
    lv = [img, img[::3, ::3], img[::9, ::9]]
    p = tmp_path / "odd.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(img, tile=(128, 128), subifds=2, photometric="rgb", compression="zlib")
        tw.write(lv[1], tile=(64, 64), subfiletype=1, photometric="rgb", compression="zlib")
        tw.write(lv[2], subfiletype=1, photometric="rgb", compression="zlib")  # (strips: read as asked)
    s = open_slide(p)
    assert s.backend == "tiffslide" and all(lv_.downsample % 1 for lv_ in s.levels[1:])  # (2.996, 8.97)
    assert [S._tiff_chunk(s, k) for k in range(3)] == [(128, 128), (64, 64), None]
    for _ in range(120):
        k = int(rng.integers(0, 3))
        h, w = lv[k].shape[:2]
        ds = s.levels[k].downsample
        x, y = int(rng.integers(-40, w + 10)), int(rng.integers(-40, h + 10))
        rw, rh = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        want = np.full((rh, rw, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + rw, w), min(y + rh, h)
        if x1 > x0 and y1 > y0:
            want[y0 - y:y1 - y, x0 - x:x1 - x] = lv[k][y0:y1, x0:x1]
        got = s.read_region((int(np.ceil(x * ds)), int(np.ceil(y * ds))), k, (rw, rh))
        assert np.array_equal(got, want), (k, x, y, rw, rh)
    keys = [key for key in S._CHUNKS._tiles if key[0] == s._token]
    assert len(keys) == len(set(keys)) and {key[1] for key in keys} == {0, 1}  # (the strips never kept)


def test_the_tile_cache_keeps_the_last_used_within_its_bytes():
    from wsiseg.io.slide import _ChunkCache

    c = _ChunkCache(3 * 100)
    loads = []

    def tile(k):
        loads.append(k)
        return np.zeros(100, np.uint8)

    for k in (1, 2, 3, 1, 4, 1, 2):
        c.get(("s", k), lambda k=k: tile(k))
    assert loads == [1, 2, 3, 4, 2]  # 2 was the least recently used when 4 came in; 1 stayed
    assert c._bytes <= 300 and list(c._tiles) == [("s", 4), ("s", 1), ("s", 2)]
