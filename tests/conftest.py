from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
# a journal checkpoint at every finished tile row (the resume tests kill runs at given checkpoints); the default,
# a bounded share of the run's time, has its own test (test_reliability.py)
os.environ.setdefault("WSISEG_CHECKPOINT_SHARE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _no_stray_threads():
    """Every test leaves no reading or predicting thread of ours behind. One left for the garbage collector to
    stop (a generator never closed) is shut down from whichever thread collects it, and once hung CI."""
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith(("wsiseg-read", "wsiseg-predict"))]
    assert not left, f"threads left running: {left}"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return need(SHARED_DATA)


@pytest.fixture(scope="session")
def svs_path() -> Path:
    return need(SHARED_DATA / "slides" / "cmu_small_region.svs")


@pytest.fixture(scope="session")
def kumar_dir() -> Path:
    return need(SHARED_DATA / "kumar")


@pytest.fixture
def svs_with_lost_tiles(tmp_path, svs_path) -> Path:
    """A copy of the real slide whose tile bytes 40-79 never arrived (a preallocated, incomplete download): zeros in
    those JPEG tiles, so reading them fails while the file opens."""
    import tifffile

    data = bytearray(svs_path.read_bytes())
    page = tifffile.TiffFile(svs_path).pages[0]
    for off, n in list(zip(page.dataoffsets, page.databytecounts))[40:80]:
        data[off:off + n] = bytes(n)
    p = tmp_path / "holes.svs"
    p.write_bytes(bytes(data))
    return p
