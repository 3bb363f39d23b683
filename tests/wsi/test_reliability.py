"""Reliability (issue 8): every bad input ends in one clear line and a distinct exit code; outputs appear whole or
not at all, whatever happens to the run (SIGKILL, disk full); ``--resume`` finishes an interrupted run with output
identical to an uninterrupted one; model files never execute code.

Exit codes (wsiseg.core.errors): 2 config, 3 input, 4 no MPP, 5 output, 6 model.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from wsiseg.cli import main
from wsiseg.wsi.resume import journal_dir
from wsiseg.export.zarr_labels import read_zarr_labels

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str, *needles: str) -> str:
    """The stderr of a failed command: exactly one 'wsiseg: error:' line naming all ``needles``, no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("wsiseg: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def no_outputs(*paths: Path) -> None:
    for p in paths:
        assert not p.exists(), p


@pytest.fixture(scope="module")
def kumar_tif(kumar_dir) -> Path:
    return sorted((kumar_dir / "images").glob("*.tif"))[0]


@pytest.fixture(scope="module")
def kumar_crop(tmp_path_factory, kumar_tif) -> Path:
    """A 600 x 600 crop of a real Kumar tile (0.25 um/px), as a plain TIFF: 81 tiles of 128 px in 9 rows."""
    p = tmp_path_factory.mktemp("crop") / "kumar_crop.tif"
    tifffile.imwrite(p, tifffile.imread(kumar_tif)[:600, :600, :3])
    return p


def _pyramid(path: Path, img: np.ndarray, mpp: float | None) -> Path:
    res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as w:
        w.write(img, tile=(256, 256), compression="zlib", photometric="rgb", subifds=1, **res)
        w.write(img[::2, ::2], tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1)
    return path


# ------------------------------------------------------------------------------------------------------ bad input
def test_missing_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", str(tmp_path / "nope.svs"))
    assert code == 3
    one_line_error(err, "nope.svs", "no such file")
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o.geojson"))
    assert code == 3
    one_line_error(err, "nope.svs", "no such file")
    no_outputs(tmp_path / "o.geojson")


@pytest.mark.slow
def test_python_dash_m_wsiseg(tmp_path):
    """``python -m wsiseg`` is the same command line: its version, and a bad path's one-line error and exit code."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-m", "wsiseg", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("wsiseg ")
    r = subprocess.run([sys.executable, "-m", "wsiseg", "info", str(tmp_path / "nope.svs")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 3
    one_line_error(r.stderr, "nope.svs", "no such file")


def test_directory_where_a_file_is_expected(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert code == 3
    one_line_error(err, str(tmp_path), "is a directory")
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run_cli(capsys, "run", str(tmp_path), "--out-dir", str(tmp_path / "o"))
    assert code == 3
    one_line_error(err, str(tmp_path), "holds no slide or image files")


@pytest.mark.parametrize("name,content", [("notes.txt", b"just some text\n"), ("fake.svs", b"not a slide " * 100),
                                          ("photo.jpg", b"\xff\xd8\xff\xe0 cut jpeg")])
def test_unsupported_or_non_image_file(tmp_path, capsys, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    code, _, err = run_cli(capsys, "info", str(p))
    assert code == 3
    line = one_line_error(err, name)
    assert "unsupported" in line or "not a readable image" in line
    code, _, err = run_cli(capsys, "run", str(p), "--out", str(tmp_path / "o.geojson"), "--model", "watershed")
    assert code == 3
    one_line_error(err, name)
    no_outputs(tmp_path / "o.geojson")


@pytest.mark.parametrize("cut", [16, 1000, 491_607])
def test_svs_cut_short(tmp_path, capsys, svs_path, cut):
    """Aperio writes the directories after the tiles: any cut loses them (16 bytes: the header alone)."""
    p = tmp_path / "cut.svs"
    p.write_bytes(svs_path.read_bytes()[:cut])
    code, _, err = run_cli(capsys, "info", str(p))
    assert code == 3
    one_line_error(err, "cut.svs", "truncated TIFF", "cut short")


def test_svs_tile_data_lost(tmp_path, capsys, svs_with_lost_tiles):
    """A copy whose tile bytes never arrived (a preallocated, incomplete download): zeros in the JPEG tiles."""
    p = svs_with_lost_tiles
    out, z = tmp_path / "o.geojson", tmp_path / "o.zarr"
    code, _, err = run_cli(capsys, "run", str(p), "--out", str(out), "--zarr", str(z), "--model", "watershed",
                           "--quiet")
    assert code == 3
    one_line_error(err, "holes.svs", "cannot decode region")
    no_outputs(out, z, journal_dir(out))
    assert not list(tmp_path.glob(".*partial"))


def test_tiff_tile_data_cut(tmp_path, capsys, kumar_tif):
    """A tiled TIFF with its directories first (tifffile's layout), cut in its tile data: refused when opened."""
    full = _pyramid(tmp_path / "full.tif", tifffile.imread(kumar_tif)[..., :3], 0.25)
    p = tmp_path / "cut.tif"
    p.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    code, _, err = run_cli(capsys, "info", str(p))
    assert code == 3
    one_line_error(err, "cut.tif", "truncated TIFF", "image data")


def test_image_smaller_than_one_tile_is_padded_and_segmented(tmp_path, capsys, kumar_tif):
    """Decision: an image smaller than a tile is padded with white (glass) and segmented, not refused."""
    p = tmp_path / "small.png"
    cv2.imwrite(str(p), tifffile.imread(kumar_tif)[:100, :120, 2::-1])
    out, z = tmp_path / "s.geojson", tmp_path / "s.zarr"
    code, stdout, err = run_cli(capsys, "run", str(p), "--out", str(out), "--zarr", str(z), "--mpp", "0.25",
                                "--model", "watershed", "--quiet")
    assert code == 0, err
    fc = json.loads(out.read_text())
    assert len(fc["features"]) >= 3  # a real H&E corner holds nuclei
    for f in fc["features"]:
        xy = np.asarray(f["geometry"]["coordinates"][0])
        assert (xy >= 0).all() and (xy[:, 0] <= 120).all() and (xy[:, 1] <= 100).all()
    labels = read_zarr_labels(z)
    assert labels.shape == (100, 120) and labels.max() == len(fc["features"])


def test_no_mpp_on_a_pyramidal_tiff(tmp_path, capsys, kumar_tif):
    p = _pyramid(tmp_path / "nompp.tif", tifffile.imread(kumar_tif)[..., :3], None)
    out = tmp_path / "o.geojson"
    code, _, err = run_cli(capsys, "run", str(p), "--out", str(out), "--model", "watershed", "--quiet")
    assert code == 4
    one_line_error(err, "nompp.tif", "no microns per pixel", "--mpp")
    no_outputs(out)


def test_no_tissue_is_an_empty_valid_output(tmp_path, capsys):
    p = _pyramid(tmp_path / "glass.tif", np.full((1024, 1024, 3), 243, np.uint8), 0.25)
    out, z = tmp_path / "g.geojson", tmp_path / "g.zarr"
    code, _, err = run_cli(capsys, "run", str(p), "--out", str(out), "--zarr", str(z), "--model", "watershed",
                           "--quiet")
    assert code == 0
    assert "wsiseg: warning:" in err and "no tissue" in err and "Traceback" not in err
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"] == []
    lab = read_zarr_labels(z)
    assert lab.shape == (1024, 1024) and not lab.any()


@pytest.mark.parametrize("args,needle", [
    (["--tile-size", "0"], "--tile-size"),
    (["--tile-size", "8"], "--tile-size 8"),
    (["--overlap", "7"], "--overlap 7"),
    (["--overlap", "200"], "--overlap 200"),
    (["--overlap", "-2"], "--overlap"),
    (["--mpp", "-1"], "--mpp"),
    (["--batch-size", "abc"], "--batch-size"),
])
def test_invalid_config_values(tmp_path, capsys, svs_path, args, needle):
    out = tmp_path / "o.geojson"
    code, _, err = run_cli(capsys, "run", str(svs_path), "--out", str(out), "--model", "watershed", *args)
    assert code == 2
    one_line_error(err, needle)
    no_outputs(out)


class _Payload:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_is_not_one(tmp_path, capsys, svs_path):
    import torch

    out = tmp_path / "o.geojson"
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = run_cli(capsys, "run", str(svs_path), "--out", str(out), "--model", str(rnd))
    assert code == 6
    one_line_error(err, "random.safetensors", "not a safetensors checkpoint")

    marker = tmp_path / "pwned"
    evil = tmp_path / "bad.pt"
    torch.save({"model": _Payload(str(marker))}, evil)  # a real torch.save zip with a code-running pickle
    raw = tmp_path / "bad.pkl"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))  # and a bare pickle
    for f in (evil, raw):
        code, _, err = run_cli(capsys, "run", str(svs_path), "--out", str(out), "--model", str(f))
        assert code == 6
        one_line_error(err, f.name, "refusing to unpickle")
    assert not marker.exists(), "a model file executed code"
    no_outputs(out)


def test_checkpoint_for_another_architecture(tmp_path, capsys, svs_path):
    import torch

    from wsiseg.models.checkpoint import save_checkpoint

    net = torch.nn.Conv2d(3, 8, 3)
    net.arch = "cyclegan"
    ck = tmp_path / "gen.safetensors"
    save_checkpoint(ck, net, config={}, mpp=0.5)
    code, _, err = run_cli(capsys, "run", str(svs_path), "--out", str(tmp_path / "o.geojson"), "--model", str(ck))
    assert code == 6
    one_line_error(err, "gen.safetensors", "architecture")


def test_output_directory_cannot_be_written(tmp_path, capsys, svs_path):
    plain = tmp_path / "afile"
    plain.write_text("x")
    for out, needle in ((plain / "o.geojson", "not a directory"), (plain / "sub" / "o.geojson", "cannot create"),
                        (Path("/proc/wsiseg-o.geojson"), "not writable")):
        code, _, err = run_cli(capsys, "run", str(svs_path), "--out", str(out), "--model", "watershed")
        assert code == 5, err
        one_line_error(err, needle)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = run_cli(capsys, "run", str(svs_path), "--out", str(ro / "o.geojson"), "--model", "watershed")
        assert code == 5
        one_line_error(err, "not writable")


def _cli(*argv: str, limit_bytes: int | None = None, **kw) -> subprocess.Popen:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "wsiseg.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=limit if limit_bytes else None, **kw)


@pytest.mark.slow
def test_disk_full_mid_write_keeps_old_outputs(tmp_path, kumar_crop):
    """A file-size limit (RLIMIT_FSIZE, like a full disk: EFBIG) hit while writing: one line, exit 5, the old
    outputs untouched, no temp file left; the journal stays for --resume."""
    out, z = tmp_path / "o.geojson", tmp_path / "o.zarr"
    out.write_text("old geojson")
    z.mkdir()
    (z / "keep").write_text("old zarr")
    p = _cli("run", str(kumar_crop), "--out", str(out), "--zarr", str(z), "--mpp", "0.25", "--model", "watershed",
             "--tile-size", "128", "--overwrite", "--quiet", limit_bytes=60_000)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 5, err
    line = one_line_error(err, "o.geojson", "file size limit")
    assert "nothing was written" in line
    assert out.read_text() == "old geojson" and (z / "keep").read_text() == "old zarr"
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.endswith(".partial")) == []


# -------------------------------------------------------------------------------------- interruption and resume
def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill point: "
                                 f"{proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def _ckpts(out: Path) -> int:
    d = journal_dir(out)
    return len(list(d.glob("ckpt-*.npz"))) if d.is_dir() else 0


def _zarr_levels(z: Path) -> list[np.ndarray]:
    import zarr

    g = zarr.open_group(str(z), mode="r")
    return [np.asarray(g["labels"]["nuclei"][k][...]) for k in sorted(g["labels"]["nuclei"].array_keys())]


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path, kumar_crop):
    args = ["--mpp", "0.25", "--model", "watershed", "--tile-size", "128", "--batch-size", "2", "--quiet"]
    # the reference: one uninterrupted run
    ref = tmp_path / "ref"
    ref.mkdir()
    p = _cli("run", str(kumar_crop), "--out", str(ref / "n.geojson"), "--zarr", str(ref / "n.zarr"), *args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err

    d = tmp_path / "run"
    d.mkdir()
    out, z = d / "n.geojson", d / "n.zarr"
    out.write_text("old geojson")  # a previous result, replaced only by a complete new one
    z.mkdir()
    (z / "keep").write_text("old zarr")
    run = ["run", str(kumar_crop), "--out", str(out), "--zarr", str(z), *args]

    def old_outputs_intact() -> None:
        assert out.read_text() == "old geojson" and (z / "keep").read_text() == "old zarr"

    # 1. killed as soon as it writes its temp outputs
    proc = _cli(*run, "--overwrite")
    _wait_for(lambda: any(x.name.endswith(".partial") for x in d.iterdir()), proc)
    _kill(proc)
    old_outputs_intact()
    # 2. killed mid-run, after two finished tile rows are journalled
    proc = _cli(*run, "--overwrite")
    _wait_for(lambda: _ckpts(out) >= 2, proc)
    _kill(proc)
    old_outputs_intact()
    n_killed = _ckpts(out)
    assert n_killed >= 2
    # without --resume (or --overwrite) the interrupted run's progress is not thrown away silently
    proc = _cli(*run)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5
    one_line_error(err, "interrupted run", "--resume")
    # a resume with other options is refused, the journal kept
    proc = _cli(*run, "--resume", "--no-tissue-mask")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    one_line_error(err, "cannot resume", "tissue_mask")
    assert _ckpts(out) == n_killed
    # 3. the resumed run stopped by SIGTERM a row later: exit 130, temp files removed, progress kept
    proc = _cli(*run, "--resume")
    _wait_for(lambda: _ckpts(out) > n_killed, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err, err
    old_outputs_intact()
    assert not list(d.glob("*.partial")) and not list(d.glob(".*.partial"))
    n_killed = _ckpts(out)
    # 4. and killed again, a row later
    proc = _cli(*run, "--resume")
    _wait_for(lambda: _ckpts(out) > n_killed, proc)
    _kill(proc)
    old_outputs_intact()
    # 5. resumed to the end
    proc = _cli(*run, "--resume")
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out.read_bytes() == (ref / "n.geojson").read_bytes()  # ids included: they are seeded by the run
    a, b = _zarr_levels(z), _zarr_levels(ref / "n.zarr")
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not (z / "keep").exists()
    assert sorted(x.name for x in d.iterdir()) == ["n.geojson", "n.zarr"]  # no journal, no temp files left
    fc = json.loads(out.read_text())
    assert len(fc["features"]) > 100 and len({f["id"] for f in fc["features"]}) == len(fc["features"])


@pytest.mark.slow
def test_resume_after_disk_full(tmp_path, kumar_crop):
    """A run stopped by a full disk keeps its journal; --resume (with room again) completes it."""
    args = ["run", str(kumar_crop), "--out", str(tmp_path / "n.geojson"), "--mpp", "0.25", "--model", "watershed",
            "--tile-size", "128", "--quiet"]
    p = _cli(*args, limit_bytes=120_000)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 5, err
    assert _ckpts(tmp_path / "n.geojson") >= 1 and not (tmp_path / "n.geojson").exists()
    p = _cli(*args, "--resume")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    fc = json.loads((tmp_path / "n.geojson").read_text())
    assert len(fc["features"]) > 100
    assert not journal_dir(tmp_path / "n.geojson").exists()


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    p = _cli("--debug", "info", str(tmp_path / "missing.svs"))
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" in err and "InputError" in err


def _StopAfter(n: int):
    """The watershed segmenter, interrupted (as by Ctrl-C) once ``n`` tiles are done."""
    from wsiseg.segmenters.watershed import WatershedSegmenter

    from helpers import StopAfter

    return StopAfter(WatershedSegmenter(), n)


def test_resume_journal_edge_cases(tmp_path, kumar_crop):
    """API level: a kill between a checkpoint's two files (nuclei written, state not yet) loses nothing; a resume
    of a journal without state starts over; resume=False discards a journal with a warning."""
    import shutil

    from wsiseg.api import segment_slide

    kw = dict(mpp=0.25, tile_size=128, batch_size=3)
    ref = segment_slide(kumar_crop, geojson=tmp_path / "ref.geojson", model="watershed", **kw)
    out = tmp_path / "n.geojson"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(kumar_crop, geojson=out, model=_StopAfter(40), **kw)
    j = journal_dir(out)
    ck = sorted(j.glob("ckpt-*.npz"))
    assert len(ck) >= 3 and (j / "state.npz").is_file() and not out.exists()
    shutil.copy(ck[-1], j / f"ckpt-{len(ck):06d}.npz")  # written, but its state never was
    s = segment_slide(kumar_crop, geojson=out, model="watershed", resume=True, **kw)
    assert out.read_bytes() == (tmp_path / "ref.geojson").read_bytes()
    assert (s.nuclei, s.cut_dropped, s.seam_dropped) == (ref.nuclei, ref.cut_dropped, ref.seam_dropped)
    assert not j.exists()

    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        segment_slide(kumar_crop, geojson=out, model=_StopAfter(40), **kw)
    (j / "state.npz").unlink()  # killed before its first state: nothing to resume, starts over
    segment_slide(kumar_crop, geojson=out, model="watershed", resume=True, **kw)
    assert out.read_bytes() == (tmp_path / "ref.geojson").read_bytes()

    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        segment_slide(kumar_crop, geojson=out, model=_StopAfter(40), **kw)
    with pytest.warns(UserWarning, match="discarding the progress"):
        segment_slide(kumar_crop, geojson=out, model="watershed", **kw)
    assert out.read_bytes() == (tmp_path / "ref.geojson").read_bytes() and not j.exists()


def test_a_journal_of_the_former_format_starts_over(tmp_path, kumar_crop):
    """A journal written before the nuclei carried stain measurements (format 1: no stain columns) is never resumed
    with them missing: ``resume=True`` warns and starts over, and the outputs are an uninterrupted run's, stain
    measurements and all."""
    from wsiseg.api import segment_slide
    from wsiseg.io.regions import read_features
    from wsiseg.wsi.resume import VERSION

    kw = dict(mpp=0.25, tile_size=128, batch_size=3)
    ref = tmp_path / "ref.geojson"
    segment_slide(kumar_crop, geojson=ref, model="watershed", **kw)
    out = tmp_path / "n.geojson"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(kumar_crop, geojson=out, model=_StopAfter(40), **kw)
    j = journal_dir(out)
    params = json.loads((j / "params.json").read_text())
    assert params["version"] == VERSION  # (the format of today's journals)
    (j / "params.json").write_text(json.dumps({**params, "version": 1}))
    for f in sorted(j.glob("*.npz")):  # as format 1 wrote them
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files if k not in ("n_stains", "s_stains")}
        with open(f, "wb") as fh:
            np.savez(fh, **arrays)
    with pytest.warns(UserWarning, match="another wsiseg version; starting over"):
        segment_slide(kumar_crop, geojson=out, model="watershed", resume=True, **kw)
    assert out.read_bytes() == ref.read_bytes() and not j.exists()
    assert all("Hematoxylin: Mean" in f["properties"]["measurements"] for f in read_features(out))


def test_sparse_checkpoints_resume_the_same(tmp_path, kumar_crop, monkeypatch):
    """Checkpoints take a bounded share of the run (``WSISEG_CHECKPOINT_SHARE``, default 5%): the first finished
    row is always journalled, later ones only once the last checkpoint's cost is repaid. A journal that skipped rows
    resumes to the same outputs (the skipped rows are redone); a bad share is a config error."""
    from wsiseg.api import segment_slide
    from wsiseg.core.errors import ConfigError

    kw = dict(mpp=0.25, tile_size=128, batch_size=3)
    ref = segment_slide(kumar_crop, geojson=tmp_path / "ref.geojson", model="watershed", **kw)
    out = tmp_path / "n.geojson"
    monkeypatch.setenv("WSISEG_CHECKPOINT_SHARE", "1e-9")  # after the first, none for ages
    with pytest.raises(KeyboardInterrupt):
        segment_slide(kumar_crop, geojson=out, model=_StopAfter(40), **kw)
    assert len(list(journal_dir(out).glob("ckpt-*.npz"))) == 1
    monkeypatch.delenv("WSISEG_CHECKPOINT_SHARE")  # the default
    s = segment_slide(kumar_crop, geojson=out, model="watershed", resume=True, **kw)
    assert out.read_bytes() == (tmp_path / "ref.geojson").read_bytes() and s.nuclei == ref.nuclei
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv("WSISEG_CHECKPOINT_SHARE", bad)
        with pytest.raises(ConfigError, match="WSISEG_CHECKPOINT_SHARE"):
            segment_slide(kumar_crop, geojson=tmp_path / "x.geojson", model="watershed", **kw)
    assert not (tmp_path / "x.geojson").exists()


def test_an_interrupt_waits_until_the_checkpoint_is_whole(tmp_path):
    """Ctrl-C (or the CLI's SIGTERM) landing inside a checkpoint's numpy zip writer once surfaced as a ValueError
    traceback; it now waits until the checkpoint is written whole, then stops the run as Ctrl-C does, and the
    journal it leaves resumes. (SIGTERM with the CLI's handler: a CI shell may start the tests with SIGINT ignored.)"""
    from wsiseg.wsi.resume import ResumeJournal, deferred_interrupts
    from wsiseg.wsi.stitch import Nucleus, Stitcher
    from wsiseg.wsi.grid import TileGrid

    def stop(signum, frame):  # as wsiseg.cli._sigterm_interrupts installs it
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                signal.raise_signal(signal.SIGTERM)
                reached.append(True)  # the interrupt is held: this still runs
        assert reached and signal.getsignal(signal.SIGTERM) is stop

        params = {"input": "x"}
        journal = ResumeJournal(tmp_path / "n.geojson", params, resume=False)
        real = journal._savez

        def interrupted_write(path, **arrays):  # the signal arrives as each file is being written
            signal.raise_signal(signal.SIGTERM)
            real(path, **arrays)

        journal._savez = interrupted_write
        grid = TileGrid.for_slide((600, 600), 0.25, 0.25, 256, 64)
        nucleus = Nucleus(np.array([[1.5, 1.5], [9.5, 1.5], [9.5, 9.5]]), 0.9, 30.0, 1.9, 6.0, (6.0, 4.0),
                          (1, 1, 10, 10))
        with pytest.raises(KeyboardInterrupt):
            journal.checkpoint([nucleus], Stitcher(grid, 0.25), 3, 12.0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    again = ResumeJournal(tmp_path / "n.geojson", params, resume=True)
    assert len(again.checkpoints) == 1 and again.restore(Stitcher(grid, 0.25)) == 3
    [(nuclei, safe)] = list(again.replay())
    assert safe == 12.0 and np.array_equal(nuclei[0].polygon, nucleus.polygon)


@pytest.mark.slow
@pytest.mark.parametrize("flags, words", [
    (["--preview", "{out}"], ["--preview", "expected an image file name"]),  # (caught by its name first)
    (["--zarr", "{out}"], ["--zarr", "expected a zarr store's name"]),
    (["--zarr", "{d}/same", "--preview", "{d}/same"], ["zarr and preview outputs are the same file"]),
])
def test_colliding_output_paths_are_a_config_error_before_any_work(tmp_path, kumar_crop, flags, words):
    out = tmp_path / "x.geojson"
    out.write_text("keep me")  # an existing output: untouched even with --overwrite
    proc = _cli("run", str(kumar_crop), "--model", "watershed", "--out", str(out), "--overwrite",
                *[f.format(out=out, d=tmp_path) for f in flags])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    one_line_error(err, *words)
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["x.geojson"]


@pytest.mark.parametrize("flags, words", [
    (["--zarr", "{d}/n.geojson"], ["--zarr", "n.geojson", "zarr store"]),
    (["--zarr", "{d}/n.png"], ["--zarr", "n.png", "zarr store"]),
    (["--preview", "{d}/n.geojson"], ["--preview", "n.geojson", "image file name"]),
    (["--preview", "{d}/n.zarr"], ["--preview", "n.zarr", "image file name"]),
    (["--preview", "{d}/n.gif"], ["--preview", "n.gif", "a format wsiseg does not write"]),
])
def test_an_output_named_as_another_kind_is_a_config_error(tmp_path, kumar_crop, capsys, flags, words):
    """``--zarr nuclei.geojson`` or ``--preview nuclei.geojson`` (the options swapped) would write one kind of output
    under another's name: a one-line error before any work. A name without a suffix is still taken."""
    code = main(["run", str(kumar_crop), "--model", "watershed", "--out", str(tmp_path / "x.geojson"),
                 *[f.format(d=tmp_path) for f in flags]])
    assert code == 2
    one_line_error(capsys.readouterr().err, *words)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["slide.svs", "IM000001"])  # (without a suffix it may be a DICOM file to look into)
def test_a_fifo_as_input_is_refused_at_once(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    proc = _cli("run", str(fifo), "--model", "watershed", "--out", str(tmp_path / "n.geojson"))
    _, err = proc.communicate(timeout=120)  # (it used to block forever, opening the FIFO)
    assert proc.returncode == 3
    one_line_error(err, "not a regular file")


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_one_line(tmp_path, kumar_crop):
    proc = _cli("run", str(kumar_crop), "--device", "cuda", "--out", str(tmp_path / "n.geojson"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    one_line_error(err, "--device cuda", "no CUDA device")
    assert not (tmp_path / "n.geojson").exists()
    from wsiseg.core.errors import ConfigError
    from wsiseg.core.runtime import resolve_device

    with pytest.raises(ConfigError, match="cuda:x"):
        resolve_device("cuda:x")


@pytest.mark.slow
def test_an_implausible_mpp_is_refused_not_tiled_without_end(tmp_path):
    """A slide whose own metadata declares 9999.9 um/px, and --mpp 1e9 / 1e-9: one line, at once (they used to build
    a tile grid of ~1e20 entries, or fail on a region at row 124,999,998)."""
    from wsiseg.api import sample_slide

    data = sample_slide().read_bytes()
    assert data.count(b"MPP = 0.4990") == 2
    bad = tmp_path / "bad_mpp.svs"
    bad.write_bytes(data.replace(b"MPP = 0.4990", b"MPP = 9999.9"))
    proc = _cli("run", str(bad), "--model", "watershed", "--out", str(tmp_path / "a.geojson"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3
    one_line_error(err, "9999.9 um/px", "implausible", "--mpp")
    for mpp in ("1e9", "1e-9"):
        proc = _cli("run", str(sample_slide()), "--model", "watershed", "--mpp", mpp,
                    "--out", str(tmp_path / "b.geojson"))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        one_line_error(err, "implausible", "0.05..4 um/px")
    assert not any(tmp_path.glob("*.geojson"))


@pytest.mark.slow
@pytest.mark.parametrize("flags, words", [
    (["--tile-size", "20000"], ["--tile-size 20000", "16..4096"]),
    (["--tile-workers", "500"], ["--tile-workers 500", "at most"]),
])
def test_sizes_past_what_the_machine_can_use_are_config_errors(tmp_path, flags, words):
    from wsiseg.api import sample_slide

    proc = _cli("run", str(sample_slide()), "--model", "watershed", "--out", str(tmp_path / "n.geojson"), *flags)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    one_line_error(err, *words)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_symlink_loop_and_broken_link_are_named(tmp_path):
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    broken = tmp_path / "broken.svs"
    broken.symlink_to(tmp_path / "gone.svs")
    for path, words in ((loop, "symbolic link loop"), (broken, "broken symbolic link")):
        p = _cli("run", str(path), "--out", str(tmp_path / "n.geojson"))
        _, err = p.communicate(timeout=120)
        assert p.returncode == 3
        one_line_error(err, words)


@pytest.mark.slow
def test_model_with_an_impossible_scale_is_a_model_error_naming_the_file(tmp_path, kumar_crop):
    """A checkpoint whose metadata gives mpp 0 or nan: exit 6 (model), the file named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from wsiseg.api import model_path

    src = model_path("default")
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for bad in ("0.0", "nan"):
        m = tmp_path / f"mpp_{bad}.safetensors"
        save_file(tensors, str(m), metadata={**meta, "mpp": bad})
        p = _cli("run", str(kumar_crop), "--mpp", "0.25", "--model", str(m), "--out", str(tmp_path / "n.geojson"))
        _, err = p.communicate(timeout=300)
        assert p.returncode == 6
        one_line_error(err, m.name, "scale")


@pytest.mark.slow
def test_preview_is_encoded_as_its_name_says(tmp_path, kumar_crop):
    import cv2

    for name, magic in (("p.jpg", b"\xff\xd8\xff"), ("p.png", b"\x89PNG")):
        p = _cli("run", str(kumar_crop), "--mpp", "0.25", "--model", "watershed", "--out", str(tmp_path / f"{name}.geojson"),
                 "--preview", str(tmp_path / name), "--quiet")
        p.communicate(timeout=300)
        assert p.returncode == 0
        assert (tmp_path / name).read_bytes()[:len(magic)] == magic and cv2.imread(str(tmp_path / name)) is not None
    assert not list(tmp_path.glob(".*"))  # no temp file left


@pytest.mark.slow
def test_output_that_appears_during_the_run_is_not_replaced(tmp_path, kumar_crop):
    """Two runs writing the same --out: the second one's check passed before the first finished. Simulated: the
    output appears (written by 'another run') while this run writes its temp file: this run fails with one line,
    exit 5, and the other's file is left as it was, with no temp file left behind."""
    import time

    out = tmp_path / "n.geojson"
    p = _cli("run", str(kumar_crop), "--mpp", "0.25", "--model", "default", "--out", str(out), "--quiet",
             "--device", "cpu")
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".n.geojson.*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    out.write_text("the other run's output\n")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 5, err
    one_line_error(err, "appeared while this run was writing")
    assert out.read_text() == "the other run's output\n"
    assert not [q for q in tmp_path.glob(".n.geojson.*") if not q.is_dir()]


def test_commit_never_replaces_a_file_or_store_that_appeared(tmp_path):
    from wsiseg.core.atomic import commit
    from wsiseg.core.errors import OutputError

    for make in ("file", "dir"):
        tmp, target = tmp_path / f".{make}.tmp", tmp_path / make
        if make == "file":
            tmp.write_text("new")
        else:
            tmp.mkdir()
            (tmp / "zarr.json").write_text("new")
        target.mkdir() if make == "dir" else target.write_text("other")
        if make == "dir":
            (target / "zarr.json").write_text("other")
        with pytest.raises(OutputError, match="appeared"):
            commit(tmp, target, existed=False)
        assert not tmp.exists()
        assert (target / "zarr.json" if make == "dir" else target).read_text() == "other"
    fresh = tmp_path / ".fresh.tmp"
    fresh.write_text("x")
    commit(fresh, tmp_path / "fresh", existed=False)
    assert (tmp_path / "fresh").read_text() == "x" and not fresh.exists()


def test_replacing_puts_a_file_in_place_whole_or_not_at_all(tmp_path):
    """core.atomic.replacing, the one tmp + rename of the journal, checkpoints, the trainer's state and write_bytes:
    the target replaced when the block ends; the old file kept and no temp file left when it raises."""
    from wsiseg.core.atomic import replacing

    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(q.name for q in tmp_path.iterdir()) == ["state.json"]
    for durable in (False, True):
        with replacing(target, durable=durable) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".state.json.") and tmp.name.endswith(".partial")
            tmp.write_text(f"new {durable}")
        assert target.read_text() == f"new {durable}" and sorted(q.name for q in tmp_path.iterdir()) == ["state.json"]


def test_slabs_of_killed_runs_are_removed_by_the_next(tmp_path):
    """A run killed with SIGKILL leaves its tile slab in /dev/shm; the slab's name carries its owner's pid, and
    the next slab made (any later run with tile workers, --resume included) removes those whose owner is dead."""
    import os
    import subprocess

    from wsiseg.parallel.workers import SLAB_PREFIX, remove_slab, slab_file

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if shm is None:
        pytest.skip("no /dev/shm here")
    stale = os.path.join(shm, f"{SLAB_PREFIX}{dead.pid}-abc123")
    live = os.path.join(shm, f"{SLAB_PREFIX}{os.getpid()}-live99")
    for f in (stale, live):
        with open(f, "wb") as fh:
            fh.write(b"x" * 1024)
    try:
        path = slab_file(4096)
        assert path is not None and os.path.basename(path).startswith(f"{SLAB_PREFIX}{os.getpid()}-")
        assert not os.path.exists(stale) and os.path.exists(live)
        remove_slab(path)
    finally:
        for f in (stale, live):
            if os.path.exists(f):
                os.unlink(f)


@pytest.mark.slow
def test_bad_scheduler_addresses_are_one_line_errors(tmp_path, kumar_crop):
    """--scheduler notaurl, a port where nothing listens, and a server that is not a dask scheduler: one line,
    exit 2, no traceback (the last used to trace back twice, after 40 s)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def garbage() -> None:  # answers anything with bytes that are not dask's protocol
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"\xff" * 64 + b"HTTP/1.1 400 Bad Request\r\n\r\n")
            c.close()

    threading.Thread(target=garbage, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    free_port = closed.getsockname()[1]
    closed.close()
    try:
        for address, words in (("notaurl", "not a scheduler address"),
                               (f"tcp://127.0.0.1:{free_port}", "cannot reach"),
                               (f"tcp://127.0.0.1:{srv.getsockname()[1]}", "--scheduler")):
            p = _cli("run", str(kumar_crop), "--mpp", "0.25", "--out", str(tmp_path / "n.geojson"),
                     "--scheduler", address)
            _, err = p.communicate(timeout=120)
            assert p.returncode == 2, err
            one_line_error(err, words)
            assert "Exception ignored" not in err
    finally:
        srv.close()


def _children(pid: int, needle: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and needle in cmd:
            out.append(int(d.name))
    return out


@pytest.mark.slow
def test_killed_zarr_painter_is_exit_1_with_progress_kept(tmp_path, svs_path):
    """The zarr painter process killed from outside: one line, exit 1 (a helper process died, as README says),
    and the progress kept for --resume."""
    import time

    out, z = tmp_path / "n.geojson", tmp_path / "n.zarr"
    p = _cli("run", str(svs_path), "--model", "watershed", "--out", str(out), "--zarr", str(z), "--tile-workers", "1",
             "--quiet")
    deadline = time.monotonic() + 120
    painters: list[int] = []
    while not painters and p.poll() is None and time.monotonic() < deadline:
        painters = _children(p.pid, "wsiseg.export.zarr_labels")
        time.sleep(0.05)
    assert painters, "no painter process seen"
    time.sleep(1.0)
    os.kill(painters[0], signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    if p.returncode == 0:
        pytest.skip("the run finished before the painter was killed")
    assert p.returncode == 1, err
    one_line_error(err, "painter process died")
    assert not out.exists() and not z.exists()


@pytest.mark.slow
def test_an_overview_that_cannot_be_read_is_the_usual_input_error(tmp_path, capsys, kumar_tif):
    """The overview is read in a thread of its own while tiles are segmented: a slide whose overview cannot be
    decoded (a lost tile of level 0 on the glass, which no segmented tile reads) still fails with the one-line input
    error (exit 3), no output and no journal left."""
    tissue = tifffile.imread(kumar_tif)[:, :, :3]
    img = np.full((4096, 4096, 3), 244, np.uint8)  # 1 mm of glass at 0.25 um/px
    img[:, :2000] = np.tile(tissue, (5, 2, 1))[:4096, :2000]  # tissue on the left half
    path = tmp_path / "lost.tif"
    res = {"resolution": (1e4 / 0.25, 1e4 / 0.25), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as w:
        w.write(img, tile=(256, 256), compression="zlib", photometric="rgb", subifds=2, **res)
        for ds in (4, 16):
            w.write(cv2.resize(img, (4096 // ds, 4096 // ds), interpolation=cv2.INTER_AREA), tile=(256, 256),
                    compression="zlib", photometric="rgb", subfiletype=1)
    data = bytearray(path.read_bytes())
    page = tifffile.TiffFile(path).pages[0]
    off, n = page.dataoffsets[2 * 16 + 14], page.databytecounts[2 * 16 + 14]  # row 2, column 14: glass
    data[off:off + n] = bytes(n)
    path.write_bytes(bytes(data))
    out = tmp_path / "o.geojson"
    code, _, err = run_cli(capsys, "run", str(path), "--out", str(out), "--model", "watershed", "--device", "cpu",
                           "--quiet")
    assert code == 3
    one_line_error(err, "lost.tif", "cannot decode region")
    no_outputs(out)
    assert not journal_dir(out).exists()


def test_ids_are_the_same_for_the_same_run_and_never_shared_by_different_nuclei(tmp_path, kumar_dir):
    """GeoJSON ids are seeded by the run: the same slide (moved or copied) and options give the same ids; another
    threshold, another model's weights or another slide of the same name and size give none of them (joining two
    runs' tables by id would pair different nuclei)."""
    import shutil

    from wsiseg.cli.main import main
    from wsiseg.export.geojson import iter_features

    src = sorted((kumar_dir / "images").glob("*.tif"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for image, folder in zip(src, ("a", "b")):  # (uncompressed: the same size)
        tifffile.imwrite(tmp_path / folder / "x.tif", tifffile.imread(image)[:512, :512, :3], photometric="rgb")
    assert (tmp_path / "a" / "x.tif").stat().st_size == (tmp_path / "b" / "x.tif").stat().st_size

    def ids(slide, out, *opts):
        assert main(["run", str(slide), "--out", str(tmp_path / out), "--mpp", "0.25", "--quiet", "--tile-size",
                     "256", *opts]) == 0
        return [f["id"] for f in iter_features(tmp_path / out)]

    first = ids(tmp_path / "a" / "x.tif", "1.geojson", "--model", "watershed")
    shutil.copy(tmp_path / "a" / "x.tif", tmp_path / "moved.tif")
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "moved.tif", tmp_path / "moved" / "x.tif")
    assert ids(tmp_path / "moved" / "x.tif", "2.geojson", "--model", "watershed") == first
    other_slide = ids(tmp_path / "b" / "x.tif", "3.geojson", "--model", "watershed")
    assert not set(other_slide) & set(first)
    pdam = ids(tmp_path / "a" / "x.tif", "4.geojson", "--zoom", "1")
    stricter = ids(tmp_path / "a" / "x.tif", "5.geojson", "--zoom", "1", "--min-score", "0.95")
    assert pdam and stricter and not set(stricter) & set(pdam)
    from safetensors.torch import load_file, save_file

    from wsiseg.segmenters.registry import bundled_weights

    weights = load_file(str(bundled_weights("default")))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 100)
    weights[name] = weights[name] * 1.0001  # another model: other weights, the same name and size
    from safetensors import safe_open

    with safe_open(str(bundled_weights("default")), "pt") as f:
        meta = f.metadata()
    save_file(weights, str(tmp_path / "other.safetensors"), metadata=meta)
    other_model = ids(tmp_path / "a" / "x.tif", "6.geojson", "--zoom", "1", "--model",
                      str(tmp_path / "other.safetensors"))
    assert other_model and not set(other_model) & set(pdam)


def test_no_output_replaces_an_input_even_with_overwrite(tmp_path, kumar_crop, capsys):
    """The regions file, the slide and an evaluation's files are inputs: naming one as an output (``--out`` the
    ``--roi`` file, ``--summary-csv`` the slide, ``eval --json`` the truth) is a one-line config error, and the
    file is kept; an output that is an existing directory is an output error before any work."""
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {
        "objectType": "annotation"}, "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]]}}]}))
    before = roi.read_bytes()
    common = ["--model", "watershed", "--mpp", "0.25", "--overwrite"]
    assert main(["run", str(kumar_crop), "--roi", str(roi), "--out", str(roi), *common]) == 2
    one_line_error(capsys.readouterr().err, "--roi regions file")
    assert roi.read_bytes() == before
    slide = tmp_path / "slide.tif"
    slide.write_bytes(kumar_crop.read_bytes())
    assert main(["run", str(slide), "--out", str(tmp_path / "a.geojson"), "--summary-csv", str(slide), *common]) == 2
    one_line_error(capsys.readouterr().err, "--summary-csv", "an input")
    assert slide.read_bytes() == kumar_crop.read_bytes()
    (tmp_path / "d.geojson").mkdir()
    (tmp_path / "d.png").mkdir()
    for flags in (["--out", str(tmp_path / "d.geojson")],
                  ["--out", str(tmp_path / "e.geojson"), "--preview", str(tmp_path / "d.png")]):
        assert main(["run", str(slide), *flags, *common]) == 5
        one_line_error(capsys.readouterr().err, "a directory, where a file is to be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.geojson", "d.png", "roi.geojson", "slide.tif"]
    truth = tmp_path / "truth.npy"
    np.save(truth, np.zeros((64, 64), np.int32) + np.arange(64, dtype=np.int32)[:, None] // 8)
    kept = truth.read_bytes()
    assert main(["eval", str(truth), str(truth), "--json", str(truth), "--overwrite"]) == 2
    one_line_error(capsys.readouterr().err, "--json", "an input")
    assert truth.read_bytes() == kept


def test_a_damaged_journal_is_one_line(tmp_path, kumar_crop):
    """A checkpoint cut short (a zip that is not one) stops a resume with the journal's one-line error, not a
    traceback; an emptied state starts over."""
    from wsiseg.api import segment_slide
    from wsiseg.core.errors import OutputError

    kw = dict(mpp=0.25, tile_size=128, batch_size=3)
    segment_slide(kumar_crop, geojson=tmp_path / "ref.geojson", model="watershed", **kw)
    out = tmp_path / "n.geojson"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(kumar_crop, geojson=out, model=_StopAfter(40), **kw)
    j = journal_dir(out)
    ck = sorted(j.glob("ckpt-*.npz"))
    ck[0].write_bytes(ck[0].read_bytes()[:100])
    with pytest.raises(OutputError, match="corrupt resume checkpoint"):
        segment_slide(kumar_crop, geojson=out, model="watershed", resume=True, **kw)
    (j / "state.npz").write_bytes(b"")
    segment_slide(kumar_crop, geojson=out, model="watershed", resume=True, **kw)
    assert out.read_bytes() == (tmp_path / "ref.geojson").read_bytes()


def test_resuming_with_another_model_s_weights_is_refused(tmp_path, kumar_crop, monkeypatch):
    """The bundled models share an architecture's name: the journal knows a model by its weights' digest, so a
    run interrupted with one is not finished with another (their nuclei mixed in one file)."""
    from helpers import interrupting_sink

    from wsiseg.api import segment_slide
    from wsiseg.core.errors import ConfigError

    monkeypatch.setenv("WSISEG_CHECKPOINT_SHARE", "1")  # (every tile row)
    out = tmp_path / "n.geojson"
    kw = dict(mpp=0.25, tile_size=128, batch_size=4, zoom=1)
    with pytest.raises(KeyboardInterrupt):
        segment_slide(kumar_crop, geojson=out, sink=interrupting_sink(nuclei=20), **kw)
    assert journal_dir(out).is_dir()
    with pytest.raises(ConfigError, match="cannot resume.*model_weights"):
        segment_slide(kumar_crop, geojson=out, model="vesicular", resume=True, **kw)
    segment_slide(kumar_crop, geojson=out, resume=True, **kw)  # the same model resumes
    assert out.is_file() and not journal_dir(out).exists()


def test_resuming_a_batch_skips_the_slides_it_finished(tmp_path, kumar_crop, capsys):
    """After an interrupted ``--out-dir`` run, the ``--resume`` it suggests goes on: a slide finished before the
    interruption is skipped (its outputs untouched), the rest are segmented (was: 'already exists', exit 5)."""
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.tif", "b.tif"):
        shutil.copy(kumar_crop, src / name)
    out = tmp_path / "out"
    common = ["--model", "watershed", "--mpp", "0.25", "--out-dir", str(out), "--quiet"]
    assert main(["run", str(src / "a.tif"), *common]) == 0  # (the batch's first slide, done before a Ctrl-C)
    done = (out / "a.geojson").stat().st_mtime_ns
    assert main(["run", str(src), *common, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "a.tif: finished before the interruption, skipped (--resume)" in err and "Traceback" not in err
    assert (out / "a.geojson").stat().st_mtime_ns == done and (out / "b.geojson").is_file()


@pytest.mark.slow
def test_a_corrupt_tile_is_one_line_not_zarr_s_pending_reads(tmp_path, kumar_tif):
    """A tiled TIFF whose JPEG tile data is damaged fails its run with the one error line; the reads that zarr (which
    tiffslide reads through) gathered beside the failed one are not reported one by one (about 300 lines)."""
    img = tifffile.imread(kumar_tif)[..., :3]
    p = tmp_path / "bad.tif"
    tifffile.imwrite(p, np.tile(img, (2, 2, 1)), tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    data = bytearray(p.read_bytes())
    rng = np.random.default_rng(0)
    lo, hi = len(data) * 4 // 10, len(data) * 6 // 10
    data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(data))
    proc = _cli("run", str(p), "--out", str(tmp_path / "o.geojson"), "--zarr", str(tmp_path / "o.zarr"))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3
    one_line_error(err, "bad.tif", "cannot decode")
    assert len(err.splitlines()) <= 3, err[:2000]


def test_a_finished_slide_made_with_other_options_is_not_skipped(tmp_path, kumar_crop, capsys):
    """A later run of a batch or cohort skips a slide whose outputs exist only when its GeoJSON's header agrees with
    its options (the model by its file, the threshold, scale and zoom given, test-time views, cells): with others
    it says which and stops (before, it reported the slide done with the old options' nuclei); the same options,
    the model given by name or by its file, still skip."""
    from wsiseg.options import Outputs, RunOptions
    from wsiseg.parallel.cohort import made_otherwise
    from wsiseg.segmenters.registry import bundled_weights

    out = tmp_path / "out"
    common = ["--mpp", "0.25", "--out-dir", str(out), "--quiet", "--zoom", "1"]
    assert main(["run", str(kumar_crop), *common]) == 0
    gj = out / "kumar_crop.geojson"
    before = gj.read_bytes()
    assert main(["run", str(kumar_crop), *common, "--min-score", "0.95", "--resume"]) == 2
    one_line_error(capsys.readouterr().err, "kumar_crop.geojson", "made with other options",
                   "min_score 0.8 -> 0.95", "--overwrite")
    assert main(["run", str(kumar_crop), *common, "--model", "vesicular", "--resume"]) == 2
    one_line_error(capsys.readouterr().err, "model 'default' -> 'vesicular'")
    assert gj.read_bytes() == before
    assert main(["run", str(kumar_crop), *common, "--model", str(bundled_weights("default")), "--resume"]) == 0
    assert "skipped" in capsys.readouterr().err and gj.read_bytes() == before
    given = RunOptions(model="default", mpp=0.25, zoom=1.0)
    assert made_otherwise(Outputs(geojson=str(gj)), given) is None
    assert made_otherwise(Outputs(geojson=str(gj)), given.replace(mpp=0.3, tta=True)) == \
        "tta 0 -> 4, slide_mpp 0.25 -> 0.3"
    assert made_otherwise(Outputs(geojson=str(gj), objects="cells"), given) == \
        "objects 'nuclei' -> 'cells', cell_expansion_um None -> 5.0"
    assert made_otherwise(Outputs(geojson=str(gj)), given.replace(use_tissue_mask=False, ensemble=["vesicular"],
                                                                  model=str(bundled_weights("default")))) == \
        "ensemble [] -> ['vesicular'], tissue_mask True -> False"