"""Worker processes (``wsiseg.parallel.workers``): started as fresh interpreters that import this wsiseg."""

from __future__ import annotations

import warnings

import tifffile
from helpers import interrupting_sink


def test_workers_ignore_a_wsiseg_in_the_current_directory(tmp_path, kumar_dir, monkeypatch):
    """A run started inside another checkout (a directory holding some other ``wsiseg``) gives its tile workers
    this package, as its main process has: ``python -m`` would put the current directory first on their path and
    import the other one. Here that other one cannot even be imported: the workers must never see it, and the
    outputs are those of a run without workers."""
    from wsiseg.api import segment_slide

    img = tmp_path / "crop.tif"
    tifffile.imwrite(img, tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:512, :512, :3])
    ref = tmp_path / "ref.geojson"
    segment_slide(img, geojson=ref, model="watershed", mpp=0.25, tile_size=128, uuid_seed=3)
    checkout = tmp_path / "checkout"
    (checkout / "wsiseg" / "parallel").mkdir(parents=True)
    (checkout / "wsiseg" / "__init__.py").write_text("raise ImportError('the other checkout')\n")
    (checkout / "wsiseg" / "parallel" / "__init__.py").write_text("")
    monkeypatch.chdir(checkout)
    out = tmp_path / "workers.geojson"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a worker that failed to start would warn and fall back to the main process
        segment_slide(img, geojson=out, model="watershed", mpp=0.25, tile_size=128, uuid_seed=3, tile_workers=2)
    assert out.read_bytes() == ref.read_bytes()


class _Blobs:
    """A segmenter whose tiles disagree everywhere: random disks seeded by each tile's pixels (the same tile, the same
    disks), so neighbouring tiles propose different seam nuclei and many seam decisions trim a mask."""

    name, mpp, max_nucleus_px = "blobs", 0.25, 40

    def predict(self, tiles):
        import hashlib

        import cv2
        import numpy as np

        from wsiseg.segmenters.base import TileInstances

        out = []
        for t in tiles:
            rng = np.random.default_rng(int.from_bytes(hashlib.sha1(t.tobytes()).digest()[:8], "little"))
            lab = np.zeros(t.shape[:2], np.int32)
            k = 0
            for _ in range(60):
                disk = np.zeros_like(lab, np.uint8)
                cv2.circle(disk, (int(rng.integers(0, lab.shape[1])), int(rng.integers(0, lab.shape[0]))),
                           int(rng.integers(5, 14)), 1, -1)
                new = (disk > 0) & (lab == 0)
                if new.sum() > 20:
                    k += 1
                    lab[new] = k
            out.append(TileInstances(lab, rng.random(k).astype(np.float32)))
        return out


def test_tile_workers_decide_seams_in_bands_and_resume_the_same(tmp_path, kumar_dir, monkeypatch):
    """With tile workers the seam decisions are made by the workers, a band of tile rows per job, each band one row
    early against a guess, checked against the band before it and decided again where the guess was wrong
    (:class:`wsiseg.parallel.seams.BandStitcher`); the trimmed nuclei are outlined there too. On tiles that disagree
    everywhere, with bands of 1 and 2 rows, a run stopped midway and resumed, both with
    workers, writes what a run without workers writes, byte for byte, and so does a whole run."""
    import numpy as np
    import pytest

    import wsiseg.parallel.seams as B
    from wsiseg.api import segment_slide
    from wsiseg.export.zarr_labels import read_zarr_labels

    asked = []
    ask = B.BandStitcher._ask
    monkeypatch.setattr(B.BandStitcher, "_ask", lambda self, k, guess, before: asked.append(
        (k, guess, before is not None and k > 0)) or ask(self, k, guess, before))
    img = tmp_path / "crop.tif"
    tifffile.imwrite(img, tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[1])[:640, :640, :3])
    kw = dict(model=_Blobs(), tile_size=128, uuid_seed=4, mpp=0.25)
    ref = tmp_path / "ref.geojson"
    segment_slide(img, geojson=ref, zarr=tmp_path / "ref.zarr", **kw)
    assert not asked  # (without workers the seams are decided in the main process)
    for band_rows in (2, 1):
        monkeypatch.setattr(B, "BAND_ROWS", band_rows)
        out = tmp_path / f"cut{band_rows}.geojson"
        with pytest.raises(KeyboardInterrupt):
            segment_slide(img, geojson=out, zarr=tmp_path / f"cut{band_rows}.zarr",
                          sink=interrupting_sink(nuclei=600), tile_workers=2, **kw)
        segment_slide(img, geojson=out, zarr=tmp_path / f"cut{band_rows}.zarr", resume=True, tile_workers=2, **kw)
        assert out.read_bytes() == ref.read_bytes(), band_rows
        assert np.array_equal(read_zarr_labels(tmp_path / f"cut{band_rows}.zarr"),
                              read_zarr_labels(tmp_path / "ref.zarr"))
        whole = tmp_path / f"whole{band_rows}.geojson"
        segment_slide(img, geojson=whole, tile_workers=1, **kw)
        assert whole.read_bytes() == ref.read_bytes(), band_rows
    assert sum(1 for _, guess, _ in asked if guess) > 5  # bands decided one row early, against a guess
    # (guesses found wrong and decided again: tests/wsi/test_bands.py, on tiles where chains of nuclei cross rows)


def _square_nuclei_tiles(grid, seed: int, pixels: bool = False) -> list:
    """``(row, col, TileInstances)`` of every tile of ``grid``: 10 px square nuclei every 24 px, each row of them
    shifted by up to 5 px at random, scores rising with the label; with ``pixels``, random RGB pixels too."""
    import numpy as np

    from wsiseg.segmenters.base import TileInstances

    rng, T = np.random.default_rng(seed), grid.tile
    tiles = []
    for r in range(grid.rows):
        for c in range(grid.cols):
            lab = np.zeros((T, T), np.int32)
            k = 0
            for y in range(8, T - 8, 24):
                for x in range(8 + int(rng.integers(0, 6)), T - 8, 24):
                    k += 1
                    lab[y:y + 10, x:x + 10] = k
            px = rng.integers(0, 256, (T, T, 3), dtype=np.uint8) if pixels else None
            tiles.append((r, c, TileInstances(lab, np.linspace(0.5, 1.0, k, dtype=np.float32), pixels=px)))
    return tiles


def test_tile_workers_apply_the_tissue_masks_guard_as_the_main_process_does():
    """The tissue mask travels to the tile workers after the slab's tiles; they drop the instances centred off it
    (``keep_in_tissue``), and their proposals are those prepared here, item for item."""
    import numpy as np

    from wsiseg.parallel.tiles import TilePool
    from wsiseg.wsi.grid import TileGrid
    from wsiseg.wsi.tissue import TissueMask

    grid = TileGrid(600, 600, 256, 64, 2.0)  # level 0: 1200 x 1200
    mask = np.zeros((300, 300), bool)  # 4 level-0 px per mask pixel
    mask[:, :150] = True  # tissue on the left half (level-0 x < 600: model x < 300)
    tissue = TissueMask(mask, 4.0)
    tiles = _square_nuclei_tiles(grid, seed=0)

    def prepared(workers):
        out = []
        with TilePool(grid, 16, 0.25, workers, tissue=tissue) as pool:
            pool.submit(tiles)
            for p in pool.results(wait=True):
                out.append((p.row, p.col, [(x, y, s) for _, x, y, s, _ in p.safe],
                            [(c.box, c.primary, c.score) for c in p.pending]))
        return out

    here, there = prepared(0), prepared(2)
    assert here == there
    xs = [x + 5 for _, _, safe, _ in here for x, _, _ in safe] + \
         [(b[0] + b[2]) / 2 for _, _, _, pend in here for b, _, _ in pend]
    assert xs and max(xs) < 300 + 1  # nothing centred right of the tissue's edge (model x 300)
    assert min(xs) < 20  # the tissue's own nuclei are kept


def test_tile_workers_leave_out_faint_nuclei_as_the_main_process_does():
    """A run's faint cut (``faint``: the slide's haematoxylin level times ``FAINT_SHARE``) travels to the tile
    workers; there as here, an instance whose mean haematoxylin is below it is left out (``drop_faint``): on tiles of
    pink stroma, the odd-numbered squares dark purple and the even ones the stroma's own pink (no brighter than it,
    so not holes), only the purple ones are proposed, and the workers' proposals are those prepared here."""
    import numpy as np

    from wsiseg.parallel.tiles import TilePool
    from wsiseg.segmenters.base import TileInstances
    from wsiseg.wsi.grid import TileGrid
    from wsiseg.wsi.stains import SlideStain, stain_stats

    grid = TileGrid(500, 500, 256, 64, 1.0)
    pink, purple = np.array([235, 170, 200], np.uint8), np.array([80, 40, 120], np.uint8)
    tiles = _square_nuclei_tiles(grid, seed=1)
    for _, _, inst in tiles:
        inst.pixels = np.where(((inst.labels % 2) == 1)[..., None], purple, pink).astype(np.uint8)
    h = stain_stats(np.stack([pink, purple])[:, None, :], np.array([[1], [2]]))[:, 0]
    faint = float(h.mean())  # (between the two)
    assert h[0] < faint < h[1]

    def prepared(workers, cut):
        out = []
        with TilePool(grid, 16, 0.25, workers, stain=SlideStain(faint=cut)) as pool:
            pool.submit([(r, c, TileInstances(i.labels, i.scores, pixels=i.pixels)) for r, c, i in tiles])
            for p in pool.results(wait=True):
                out.append((p.row, p.col, [s for _, _, _, s, _ in p.safe], [c.score for c in p.pending]))
        return out

    here, there, every = prepared(0, faint), prepared(2, faint), prepared(0, 0.0)
    assert here == there
    odd = {float(s) for _, _, i in tiles for s in i.scores[0::2]}  # (label k's score is scores[k - 1])
    purple = [(r, c, [s for s in safe if s in odd], [s for s in pend if s in odd]) for r, c, safe, pend in every]
    assert here == purple and sum(len(safe) for _, _, safe, _ in here) >= 40
    assert sum(len(safe) for _, _, safe, _ in every) > 1.8 * sum(len(safe) for _, _, safe, _ in here)


def test_tile_workers_take_the_slides_dye_band_as_the_main_process_does():
    """A run's dye band (``SlideStain.dye_top``: lower where the slide's haematoxylin is blue) travels to the tile
    workers: on tiles whose even-numbered squares are a blue of hue about 200 degrees, the odd ones purple, the
    default band (to 210) leaves the blue ones out, a slide's band that ends at 195 keeps them, and the workers'
    proposals are those prepared here either way."""
    import numpy as np

    from wsiseg.parallel.tiles import TilePool
    from wsiseg.segmenters.base import TileInstances
    from wsiseg.wsi.grid import TileGrid
    from wsiseg.wsi.stains import DYE_HUE, SlideStain, hue_saturation

    grid = TileGrid(500, 500, 256, 64, 1.0)
    blue, purple = np.array([40, 110, 150], np.uint8), np.array([80, 40, 120], np.uint8)
    hue, _ = hue_saturation(np.stack([blue, purple])[:, None, :], np.array([[1], [2]]))
    assert 195 < hue[0] < DYE_HUE[1] < hue[1]
    tiles = _square_nuclei_tiles(grid, seed=2)
    for _, _, inst in tiles:
        inst.pixels = np.where(((inst.labels % 2) == 1)[..., None], purple, blue).astype(np.uint8)

    def prepared(workers, top):
        with TilePool(grid, 16, 0.25, workers, stain=SlideStain(dye_top=top)) as pool:
            pool.submit([(r, c, TileInstances(i.labels, i.scores, pixels=i.pixels)) for r, c, i in tiles])
            return [(p.row, p.col, sorted(float(s) for _, _, _, s, _ in p.safe)) for p in pool.results(wait=True)]

    band, bluer = prepared(2, DYE_HUE[1]), prepared(2, 195.0)
    assert band == prepared(0, DYE_HUE[1]) and bluer == prepared(0, 195.0)
    odd = {float(s) for _, _, i in tiles for s in i.scores[0::2]}  # (label k's score is scores[k - 1])
    assert all(set(safe) <= odd for _, _, safe in band) and sum(len(safe) for _, _, safe in band) >= 40
    assert sum(len(safe) for _, _, safe in bluer) > 1.8 * sum(len(safe) for _, _, safe in band)


def test_tiles_staged_by_the_predicting_thread_give_the_same_proposals_and_free_their_places():
    """A predicting thread copies its tiles into free places of the workers' slab itself (``TilePool.stage``); the
    main thread then sends their places alone. The proposals (stains measured from the staged pixels included) are
    those prepared in the main process; a batch with too few free places is left for ``submit`` to copy; every
    place is free again once the results are in, and the staged values are the tiles' own."""
    import threading

    import numpy as np

    from wsiseg.parallel.tiles import SlabPlaces, TilePool
    from wsiseg.wsi.grid import TileGrid

    grid = TileGrid(700, 450, 128, 32, 1.0)
    tiles = _square_nuclei_tiles(grid, seed=1, pixels=True)
    assert len(tiles) >= 12

    def plain(props):
        return [(p.row, p.col, [(x, y, s, tuple(np.round(st, 4))) for _, x, y, s, st in p.safe],
                [(c.box, c.primary, c.score) for c in p.pending]) for p in props]

    with TilePool(grid, 8, 0.25, 0) as pool:
        pool.submit(tiles)
        ref = plain(pool.results(wait=True))
    staged_counts = []
    with TilePool(grid, 8, 0.25, 2, places=SlabPlaces(chunk=2, depth=1, ahead=3)) as pool:  # 2 * 1 * 2 + 3 = 7
        places = 7
        assert len(pool._free) == places
        out = []
        for batch in (tiles[0:3], tiles[3:6], tiles[6:9], tiles[9:]):  # the last larger than the free places
            got: list = []
            t = threading.Thread(target=lambda b=batch: got.extend(pool.stage([inst for _, _, inst in b])))
            t.start()
            t.join()
            staged_counts.append(sum(g is not inst for g, (_, _, inst) in zip(got, batch)))
            for g, (_, _, inst) in zip(got, batch):
                assert np.array_equal(g.labels, inst.labels) and np.array_equal(g.pixels, inst.pixels)
            pool.submit([(r, c, g) for g, (r, c, _) in zip(got, batch)])
            out.extend(pool.results())
        out.extend(pool.results(wait=True))
        assert len(pool._free) == places and not pool._held
    assert plain(out) == ref
    assert staged_counts[0] == 3 and staged_counts[-1] == 0  # staged where there was room; the large batch copied
