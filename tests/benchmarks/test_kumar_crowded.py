"""``benchmarks/kumar.py --crowded``: only the tiles with the most detections are predicted again, with the settings
asked for, and the model is left as it was."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
KUMAR = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "kumar"

pytestmark = pytest.mark.skipif(not (KUMAR / "images").is_dir(), reason="Kumar images absent (../shared/data)")


def _kumar():
    spec = importlib.util.spec_from_file_location("kumar_benchmark", ROOT / "benchmarks" / "kumar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_crowded_tiles_are_predicted_again_and_the_model_is_left_as_it_was():
    import tifffile

    from wsiseg.segmenters.registry import load_model

    seg = load_model("default")
    if not hasattr(seg, "tile_size"):
        pytest.skip("the bundled default weights are absent (watershed fallback)")
    # a crowded kidney tile and a sparse breast tile, at the model's own tile size
    side = seg.tile_size
    tiles = np.stack([tifffile.imread(KUMAR / "images" / f"{name}.tif")[:side, :side, :3]
                      for name in ("TCGA-HE-7130-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1")])
    own = (seg.tile_size, seg.min_score)
    plain = seg.predict(tiles)
    assert plain[0].count > plain[1].count
    predict = _kumar().crowded(seg, plain[0].count, 256, 0.5)  # the crowded tile reaches it, the sparse one not
    out = predict(tiles)
    assert (seg.tile_size, seg.min_score) == own
    assert np.array_equal(out[1].labels, plain[1].labels)
    seg.tile_size, seg.min_score = 256, 0.5
    try:
        (direct,) = seg.predict(tiles[:1])
    finally:
        seg.tile_size, seg.min_score = own
    assert np.array_equal(out[0].labels, direct.labels) and out[0].count > plain[0].count
    never = _kumar().crowded(seg, 10**6, 256, 0.5)(tiles)
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(never, plain))
