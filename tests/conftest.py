from __future__ import annotations

from pathlib import Path

import os
import pytest
import torch

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data"))


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
