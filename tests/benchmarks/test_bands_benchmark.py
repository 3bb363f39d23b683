"""``benchmarks/bands.py`` on a small replayed slide: band decisions equal the stitcher's on real predictions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

pytestmark = pytest.mark.slow  # a worker process


@pytest.mark.skipif(not (SHARED / "kumar" / "images").is_dir(), reason="Kumar images absent (../shared/data)")
def test_bands_benchmark_checks_and_prints(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bands
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = bands.main(["--size", "1500", "--tiles", "4", "--band-rows", "2", "--workers", "1", "--repeat", "1"])
    # (main asserts every variant's decisions equal the stitcher's)
    assert set(res) == {"serial", "bands, here", "bands, 1 workers"}
    assert res["bands, here"]["bands"] >= 2 and res["bands, 1 workers"]["redecided"] == 0
    assert "ms/tile" in capsys.readouterr().out
