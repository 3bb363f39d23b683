"""Cohorts on a real dask.distributed LocalCluster (2 worker processes on loopback) with the watershed model.

Slides: crops of real Kumar H&E tiles written as PNG, and a synthetic two-level tiled pyramidal TIFF (MPP in its
resolution tags) built from Kumar pixels. The reference for every check is the single-process
``segment_slide(...)`` in this process (its GeoJSON ids are deterministic: seeded from the input and parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")
tifffile = pytest.importorskip("tifffile")
cv2 = pytest.importorskip("cv2")

from wsiseg.api import load_model, segment_slide  # noqa: E402
from wsiseg.parallel.cohort import (MANIFEST_FIELDS, ModelPlugin, is_finished, read_manifest, run_cohort,  # noqa: E402
                                worker_device)

MPP = 0.25


def _args(**kw) -> argparse.Namespace:
    base = dict(scheduler=None, cluster=None, workers=None, manifest=None, model="watershed", device="cpu", mpp=MPP,
                tile_size=256, overlap=None, batch_size=None, use_tissue_mask=True, backend="auto", overwrite=False,
                quiet=True)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def slides(kumar_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Three 320 px Kumar crops (PNG), a 512x640 and a 768x1536 two-level tiled TIFF pyramid at 0.25 um/px."""
    d = tmp_path_factory.mktemp("cohort_slides")
    files = sorted((kumar_dir / "images").glob("*.tif"))[:4]
    out: dict[str, Path] = {}
    for k, f in enumerate(files[:3]):
        img = tifffile.imread(f)[..., :3]
        y = 100 * k
        p = d / f"kumar{k}.png"
        cv2.imwrite(str(p), np.ascontiguousarray(img[y:y + 320, y:y + 320, ::-1]))
        out[p.name] = p
    src = tifffile.imread(files[3])[..., :3]
    for name, img in (("pyr_small.tif", src[:512, :640]),
                      ("pyr_big.tif", np.concatenate([src[:768, :768], src[:768, :768][:, ::-1]], axis=1))):
        p = d / name
        _write_pyramid(p, np.ascontiguousarray(img))
        out[name] = p
    return out


def _write_pyramid(path: Path, img: np.ndarray) -> None:
    opts = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=1, resolution=(1e4 / MPP, 1e4 / MPP), **opts)
        tw.write(img[::2, ::2], subfiletype=1, resolution=(1e4 / (2 * MPP), 1e4 / (2 * MPP)), **opts)


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> dict[str, dict]:
    """Single-process outputs (parsed GeoJSON, and the zarr label image of one slide) ."""
    d = tmp_path_factory.mktemp("reference")
    seg = load_model("watershed", "cpu")
    ref = {}
    for name, p in slides.items():
        gj = d / f"{p.stem}.geojson"
        zarr = d / f"{p.stem}.zarr" if name == "kumar0.png" else None
        segment_slide(p, geojson=gj, zarr=zarr, model=seg, mpp=MPP)
        ref[name] = {"geojson": json.loads(gj.read_text()), "zarr": _labels(zarr) if zarr else None}
    return ref


def _labels(zarr_path: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(zarr_path), mode="r")["labels/nuclei/0"][:])


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=":0")
    c = distributed.Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


def _jobs(names, slides, out: Path, zarr_for=()) -> list:
    jobs = []
    for n in names:
        p = slides[n]
        jobs.append((p, {"geojson": str(out / f"{p.stem}.geojson"),
                         "zarr": str(out / f"{p.stem}.zarr") if n in zarr_for else None, "preview": None}))
    return jobs


def _assert_same(jobs, reference) -> None:
    for p, outs in jobs:
        got = json.loads(Path(outs["geojson"]).read_text())
        want = reference[p.name]["geojson"]
        assert len(got["features"]) == len(want["features"]) > 0, p.name
        assert got == want, p.name  # geometry, measurements, labels and deterministic ids; header too
        if outs["zarr"]:
            np.testing.assert_array_equal(_labels(Path(outs["zarr"])), reference[p.name]["zarr"])


@pytest.mark.slow
def test_cohort_equals_single_process(client, slides, reference, tmp_path):
    names = ["kumar0.png", "kumar1.png", "kumar2.png", "pyr_small.tif"]
    jobs = _jobs(names, slides, tmp_path, zarr_for={"kumar0.png"})
    assert run_cohort(jobs, _args(), client=client) == 0
    _assert_same(jobs, reference)
    # both workers took part, and each holds the model once, under the plugin's key
    key = ModelPlugin("watershed", "cpu").key
    held = client.run(lambda: key in __import__("wsiseg.parallel.cohort", fromlist=["_MODELS"])._MODELS)
    assert len(held) == 2 and all(held.values())
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_cohort_carries_every_output_option(client, slides, tmp_path):
    """The image pyramid in the zarr (``--zarr-image``) and cells in the GeoJSON (``--objects cells``) reach the
    workers: a cohort writes what a single process writes."""
    p = slides["pyr_small.tif"]
    extra = {"zarr_image": True, "objects": "cells", "cell_expansion": 3.0}
    single = {"geojson": str(tmp_path / "single.geojson"), "zarr": str(tmp_path / "single.zarr"), "preview": None}
    segment_slide(p, **single, **extra, model="watershed", mpp=MPP)
    jobs = [(p, {"geojson": str(tmp_path / "c" / "p.geojson"), "zarr": str(tmp_path / "c" / "p.zarr"), "preview": None,
                 **extra})]
    assert run_cohort(jobs, _args(), client=client) == 0
    got, want = (json.loads(Path(x).read_text()) for x in (jobs[0][1]["geojson"], single["geojson"]))
    assert got == want and got["features"][0]["properties"]["objectType"] == "cell"
    import zarr

    for name in ("0", "labels/nuclei/0"):  # the slide's pixels, and the labels
        a, b = (np.asarray(zarr.open_group(x, mode="r")[name][:]) for x in (jobs[0][1]["zarr"], single["zarr"]))
        assert np.array_equal(a, b) and a.std() > 0, name


def _executing(dask_worker) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


@pytest.mark.slow
def test_killed_worker_slides_are_redone(client, slides, reference, tmp_path):
    names = ["pyr_big.tif", "kumar1.png", "kumar2.png"]
    jobs = _jobs(names, slides, tmp_path)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("rc", run_cohort(jobs, _args(), client=client)))
    t.start()
    from wsiseg.wsi.resume import journal_dir

    journal = journal_dir(jobs[0][1]["geojson"])
    victim = None
    deadline = time.monotonic() + 120
    # kill the worker running the big slide once it has journaled a finished tile row: the redo resumes from it
    while victim is None and t.is_alive() and time.monotonic() < deadline:
        for addr, keys in client.run(_executing).items():
            if any("pyr_big" in k for k in keys) and journal.is_dir():
                victim = addr
                break
        else:
            time.sleep(0.02)
    assert victim is not None, "the big slide never ran"
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)  # a real process death, mid-slide
    t.join(timeout=240)
    assert not t.is_alive()
    assert box["rc"] == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    _assert_same(jobs, reference)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # the dead writer's temp files are gone
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it (the next tests use both again)


@pytest.mark.slow
def test_rerun_skips_finished_slides_and_reports_input_errors(client, slides, reference, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    jobs = _jobs(["kumar0.png", "kumar1.png"], slides, tmp_path / "out")
    jobs.append((bad, {"geojson": str(tmp_path / "out" / "broken.geojson"), "zarr": None, "preview": None}))
    man = tmp_path / "manifest.csv"
    assert run_cohort(jobs, _args(manifest=str(man)), client=client) == 3  # one input failed, the others ran
    _assert_same(jobs[:2], reference)
    rows = read_manifest(man)
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert list(rows[0]) == list(MANIFEST_FIELDS)
    assert "broken.png" in rows[2]["error"] and not Path(jobs[2][1]["geojson"]).exists()
    assert int(rows[0]["nuclei"]) == len(reference["kumar0.png"]["geojson"]["features"])

    # re-run: finished slides are recognised and not redone (their files are untouched)
    before = {p.name: Path(o["geojson"]).stat().st_mtime_ns for p, o in jobs[:2]}
    man2 = tmp_path / "manifest.json"
    assert run_cohort(jobs[:2], _args(manifest=str(man2)), client=client) == 0
    assert [r["status"] for r in read_manifest(man2)] == ["skipped", "skipped"]
    assert {p.name: Path(o["geojson"]).stat().st_mtime_ns for p, o in jobs[:2]} == before
    assert is_finished(jobs[0][1]) and not is_finished(jobs[2][1])

    # --overwrite redoes them, with identical outputs; here through --scheduler (connecting to the running cluster),
    # which reuses the model the workers already hold (the plugin is registered once per model key)
    key = ModelPlugin("watershed", "cpu").key

    def model_ids():
        return client.run(lambda: id(__import__("wsiseg.parallel.cohort", fromlist=["_MODELS"])._MODELS[key]))

    ids = model_ids()
    assert run_cohort(jobs[:2], _args(manifest=str(man2), overwrite=True, scheduler=client.scheduler.address)) == 0
    assert model_ids() == ids
    data = json.loads(man2.read_text())
    assert [r["status"] for r in data["slides"]] == ["done", "done"] and data["run"]["model"] == "watershed"
    assert all(r["tiles_segmented"] > 0 and r["seconds"] > 0 and r["worker"] for r in data["slides"])
    _assert_same(jobs[:2], reference)


def test_bad_options_are_config_errors(tmp_path):
    from wsiseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="manifest"):
        run_cohort([], _args(manifest=str(tmp_path / "m.txt")))
    with pytest.raises(ConfigError, match="not both"):
        run_cohort([], _args(scheduler="tcp://127.0.0.1:1", cluster="local"))
    with pytest.raises(ConfigError, match="--workers"):
        run_cohort([], _args(scheduler="tcp://127.0.0.1:1", workers=2))


def test_worker_device():
    assert worker_device("cpu", 3) == "cpu" and worker_device("cuda:1", 0) == "cuda:1"
    assert worker_device("auto", "not-an-index") == "auto"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert worker_device("auto", 3) == (f"cuda:{3 % n}" if n > 1 else "auto")


@pytest.mark.slow
def test_cli_local_cluster(slides, reference, tmp_path, capsys, monkeypatch):
    from wsiseg.cli import main

    # (dask's Nanny sets these in the parent before spawning workers; the cohort puts back what was there)
    kept = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    for k in kept:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    names = ["kumar2.png", "pyr_small.tif"]
    out = tmp_path / "results"
    man = tmp_path / "run.json"
    rc = main(["run", *(str(slides[n]) for n in names), "--out-dir", str(out), "--cluster", "local", "--workers", "2",
               "--model", "watershed", "--device", "cpu", "--mpp", str(MPP), "--quiet", "--manifest", str(man)])
    assert rc == 0, capsys.readouterr().err
    jobs = _jobs(names, slides, out)
    _assert_same(jobs, reference)
    rows = read_manifest(man)
    assert [Path(r["input"]).name for r in rows] == names and all(r["status"] == "done" for r in rows)
    assert "slides/min" in capsys.readouterr().out
    assert [os.environ.get(k) for k in kept] == [None, "3", None]


@pytest.mark.slow
def test_cli_rerun_of_a_finished_cohort_skips(tmp_path):
    """A cohort re-run through the CLI skips finished slides instead of refusing existing outputs."""
    import cv2
    import tifffile

    from wsiseg.cli import main

    kumar = Path(os.environ.get("WSISEG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")) / "kumar" / "images"
    if not kumar.is_dir():
        pytest.skip("Kumar images absent")
    img = tifffile.imread(sorted(kumar.glob("*.tif"))[0])[:200, :200, :3]
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), img[..., ::-1])
    out = tmp_path / "out"
    args = ["run", str(src), "--out-dir", str(out), "--mpp", "0.25", "--model", "watershed", "--quiet",
            "--cluster", "local", "--workers", "1"]
    assert main(args) == 0
    before = (out / "a.geojson").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "a.geojson").stat().st_mtime_ns == before
