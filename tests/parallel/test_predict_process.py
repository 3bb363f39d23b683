"""Reading and predicting in a process of their own (``segment_slide(predict_process=True)``,
``wsiseg run --predict-process``): the same outputs, the model's settings carried over, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsiseg.api import bundled_weights, load_model, segment_slide, set_min_score, set_semantic_fusion
from wsiseg.cli import main
from wsiseg.core.errors import ConfigError, ProcessDied
from wsiseg.wsi.resume import journal_dir
from wsiseg.export.zarr_labels import read_zarr_labels

pytestmark = pytest.mark.skipif(bundled_weights() is None, reason="no bundled weights in this installation")


@pytest.fixture(scope="module")
def image(kumar_dir):
    return sorted((kumar_dir / "images").glob("*.tif"))[2]  # 1000 x 1000 px of real H&E at 0.25 um/px


def _run(image, d, name, **kw):
    gj, z = d / f"{name}.geojson", d / f"{name}.zarr"
    s = segment_slide(image, geojson=gj, zarr=z, model=kw.pop("model", "default"), device="cpu", mpp=0.25,
                      batch_size=4, uuid_seed=7, **kw)
    return s, gj.read_bytes(), read_zarr_labels(z)


@pytest.mark.slow
def test_the_same_outputs_with_and_without_the_process(tmp_path, image):
    """GeoJSON byte for byte and the label image: without tile workers and with two; and with a changed score
    threshold and semantic fusion, which the process must carry over to the model it loads."""
    s, ref_gj, ref_lab = _run(image, tmp_path, "ref")
    assert s.nuclei > 100 and s.tiles_segmented > 8  # several batches: the ring of slots is reused
    for workers in (0, 2):
        s, gj, lab = _run(image, tmp_path, f"p{workers}", predict_process=True, tile_workers=workers)
        assert gj == ref_gj, workers
        assert np.array_equal(lab, ref_lab), workers
        assert s.stage_seconds["segment"] > 0  # the process' own timings come back
    seg = load_model("default", "cpu")
    set_min_score(seg, 0.95)  # above the bundled model's own threshold (0.80), so fewer nuclei
    set_semantic_fusion(seg, True)
    _, ref_gj, ref_lab = _run(image, tmp_path, "ref_set", model=seg)
    _, gj, lab = _run(image, tmp_path, "p_set", model=seg, predict_process=True)
    assert gj == ref_gj and np.array_equal(lab, ref_lab)
    assert len(json.loads(gj)["features"]) < s.nuclei  # (the threshold did apply)


def test_settings_rebuild_the_same_segmenter():
    from wsiseg.segmenters.rcnn import PDAMSegmenter

    from wsiseg.api import set_ensemble

    seg = load_model("default", "cpu")
    set_min_score(seg, 0.6)
    seg.tta = 4
    set_ensemble(seg, [str(bundled_weights())])  # an ensemble's members are reloaded too
    seg.tile_size = 320  # sets how many proposals a larger tile gets: the process's copy must agree
    st = seg.settings()
    assert st["members"] == [str(bundled_weights())]
    again = PDAMSegmenter.from_settings(seg.source, "cpu", st)
    assert again.settings() == st and json.loads(json.dumps(st)) == st
    assert again.members == 1 and again.tile_size == 320 and again.min_score == 0.6


def test_a_model_the_process_cannot_load_is_refused(tmp_path, image, capsys):
    with pytest.raises(ConfigError, match="needs a PDAM model loaded from a file"):
        segment_slide(image, geojson=tmp_path / "w.geojson", model="watershed", mpp=0.25, predict_process=True)
    assert not list(tmp_path.iterdir())
    code = main(["run", str(image), "--out", str(tmp_path / "w.geojson"), "--mpp", "0.25", "--model", "watershed",
                 "--predict-process", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--predict-process" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_dead_process_keeps_the_progress_and_resume_completes_it(tmp_path, image):
    """The process killed mid-run (as by the out-of-memory killer): a one-line ProcessDied, no outputs, the journal
    kept; ``resume=True`` then writes what an uninterrupted run writes."""
    import psutil

    gj, z = tmp_path / "n.geojson", tmp_path / "n.zarr"
    killed, calls = [], []

    def kill_the_process(nuclei):  # once two tile rows of six are done (the process runs at most 4 batches ahead)
        calls.append(len(nuclei))
        if len(calls) >= 12 and not killed:
            for p in psutil.Process().children():
                if "wsiseg.parallel.predict" in " ".join(p.cmdline()):
                    p.kill()
                    killed.append(p.pid)

    kw = dict(geojson=gj, zarr=z, model="default", device="cpu", mpp=0.25, batch_size=2, predict_process=True,
              tile_size=256)  # (6 x 6 tiles, so that the kill lands mid-run)
    with pytest.raises(ProcessDied, match="predicting process died.*progress is kept") as e:
        segment_slide(image, sink=kill_the_process, **kw)
    assert killed and "\n" not in str(e.value)
    assert not gj.exists() and not z.exists() and journal_dir(gj).is_dir()
    segment_slide(image, resume=True, **kw)
    assert not journal_dir(gj).exists()
    ref = tmp_path / "ref2.geojson"
    segment_slide(image, geojson=ref, zarr=tmp_path / "ref2.zarr", model="default", device="cpu", mpp=0.25,
                  batch_size=2, tile_size=256)
    assert gj.read_bytes() == ref.read_bytes()
    assert np.array_equal(read_zarr_labels(z), read_zarr_labels(tmp_path / "ref2.zarr"))


@pytest.mark.slow
def test_a_corrupt_tile_read_in_the_process_is_the_usual_input_error(tmp_path, capsys, svs_with_lost_tiles):
    """Reading happens in the process too: a tile that cannot be decoded is the one-line InputError (exit 3) a run
    without the process gives, and no output is left."""
    out = tmp_path / "o.geojson"
    code = main(["run", str(svs_with_lost_tiles), "--out", str(out), "--device", "cpu", "--predict-process", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "\n" not in err and "cannot decode region" in err, err
    assert not out.exists() and not journal_dir(out).exists()


@pytest.mark.slow
def test_a_process_that_is_through_is_not_a_dead_one(image):
    """The process sends its last batch and exits while this side is still on its first: handing the later slots
    back to a process that is gone is no error, and every batch arrives, in order."""
    import time

    from wsiseg.options import RunOptions
    from wsiseg.parallel.predict import PredictProcess
    from wsiseg.io.slide import open_slide
    from wsiseg.wsi.grid import TileGrid

    seg = load_model("default", "cpu")
    with open_slide(image) as slide:
        backend, dims = slide.backend, slide.dimensions
    grid = TileGrid.for_slide(dims, 0.25, seg.mpp, 256, 64)
    tiles = [(0, c) for c in range(4)]
    opts = RunOptions(backend=backend, batch_size=1, prefetch=True)
    with PredictProcess(seg, str(image), grid, opts, read_workers=2, slots=3) as pp:
        it = pp.predict(tiles)
        got = [next(it)]
        t0 = time.monotonic()
        while pp._proc.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        assert pp._proc.poll() == 0  # through, and gone
        got += list(it)
    assert [ids for ids, *_ in got] == [[t] for t in tiles]
    ref = [seg.predict(_tile(image, grid, t)[None])[0] for t in tiles]  # (in batches of one, as there)
    for (_, res, *_), want in zip(got, ref):
        assert np.array_equal(res[0].labels, want.labels) and np.array_equal(res[0].scores, want.scores)


def _tile(path, grid, t):
    from wsiseg.wsi.grid import read_one

    return read_one(str(path), "auto", grid, *t)
