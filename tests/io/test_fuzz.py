"""Fuzzing the slide reader with mutated real TIFF/SVS bytes (hypothesis): whatever the damage, ``open_slide`` and
``read_region``/``thumbnail`` either work or raise a clean :class:`wsiseg.core.errors.InputError`, never anything else.

A few dozen examples here; ``python scripts/fuzz_reader.py --n 2000`` runs many more, each in a child process
with a timeout (so a hang would be caught too).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsiseg.core.errors import InputError
from wsiseg.io.slide import open_slide

_SEEDS: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def seeds(svs_path, kumar_dir) -> dict[str, bytes]:
    """The real Aperio SVS (JPEG tiles, OpenSlide) and a small two-level tiled TIFF of a Kumar image (deflate,
    tiffslide): their bytes, mutated by the tests."""
    if not _SEEDS:
        _SEEDS["svs"] = svs_path.read_bytes()
        img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:512, :512, :3]
        with tempfile.TemporaryDirectory() as td:
            p = Path(td) / "p.tif"
            with tifffile.TiffWriter(p) as w:
                w.write(img, tile=(128, 128), compression="zlib", photometric="rgb", subifds=1,
                        resolution=(40000, 40000), resolutionunit="CENTIMETER")
                w.write(img[::2, ::2], tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=1)
            _SEEDS["tif"] = p.read_bytes()
    return _SEEDS


def exercise(path: Path) -> None:
    """Everything a run does with a slide before segmenting: open, describe, thumbnail, a few regions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open_slide(path) as s:
                s.info()
                s.thumbnail(max_size=256)
                w, h = s.dimensions
                for x, y in ((0, 0), (w // 2, h // 2), (w - 64, h - 64)):
                    assert s.read_region((x, y), 0, (256, 256)).shape == (256, 256, 3)
                if len(s.levels) > 1:
                    s.read_region((0, 0), len(s.levels) - 1, (64, 64))
        except InputError as e:
            msg = str(e)
            assert str(path) in msg and "\n" not in msg  # one line naming the file


def _write(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="wsiseg-fuzz-"))
    p = d / name
    p.write_bytes(data)
    return p


def _cleanup(p: Path) -> None:
    p.unlink(missing_ok=True)
    p.parent.rmdir()


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("header"), st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), min_size=1,
                                          max_size=8)),
    st.tuples(st.just("data"), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1,
                                        max_size=32)),
    st.tuples(st.just("run"), st.tuples(st.floats(0.0, 1.0), st.binary(min_size=1, max_size=2048))),
)


def mutate(data: bytes, m) -> bytes:
    kind, arg = m
    b = bytearray(data)
    n = len(b)
    if kind == "truncate":
        return bytes(b[:int(arg * n)])
    if kind == "header":  # the TIFF header and first directory entries
        for pos, x in arg:
            b[pos % n] ^= x
    elif kind == "data":  # anywhere, mostly tile data
        for frac, x in arg:
            b[min(int(frac * n), n - 1)] ^= x
    else:
        frac, junk = arg
        pos = min(int(frac * n), n - 1)
        b[pos:pos + len(junk)] = junk[: n - pos]
    return bytes(b)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(which=st.sampled_from(["svs", "tif"]), m=mutation)
def test_mutated_slides_fail_cleanly(seeds, which, m):
    p = _write(mutate(seeds[which], m), "fuzz.svs" if which == "svs" else "fuzz.tif")
    try:
        exercise(p)
    finally:
        _cleanup(p)


@pytest.mark.parametrize("which", ["svs", "tif"])
def test_unmutated_seeds_read(seeds, which):
    """The seeds themselves open and read (so the fuzz test exercises the readers, not only their refusals)."""
    p = _write(seeds[which], "ok.svs" if which == "svs" else "ok.tif")
    try:
        with open_slide(p) as s:
            assert s.mpp is not None
            r = s.read_region((0, 0), 0, (64, 64))
            assert r.dtype == np.uint8 and r.std() > 0
    finally:
        _cleanup(p)
