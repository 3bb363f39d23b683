"""AJI's parts (wsiseg.eval.metrics.aji_parts, which scripts/error_census.py prints): they add up to
wsiseg.eval.metrics.aji, and a merge's extra count is the merged detection's area; the script's census sorts a
constructed case's detections and nuclei into their kinds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from wsiseg.eval.metrics import aji, aji_parts, overlap_table


def _disc(lab: np.ndarray, cy: int, cx: int, r: int, value: int) -> None:
    yy, xx = np.mgrid[:lab.shape[0], :lab.shape[1]]
    lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def _merge_case() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((64, 96), np.int32)
    pred = np.zeros_like(truth)
    _disc(truth, 20, 20, 6, 1)
    _disc(truth, 20, 32, 6, 2)  # 1 and 2 touch: the prediction below merges them
    _disc(truth, 48, 70, 7, 3)  # missed
    pred[12:29, 12:41] = 1  # one box over nuclei 1 and 2
    _disc(pred, 10, 80, 4, 2)  # on no nucleus: unused
    return pred, truth


def test_aji_parts_add_up_to_aji_and_count_a_merge_again():
    pred, truth = _merge_case()
    p = aji_parts(overlap_table(pred, truth))
    assert p["inter"] / (p["union"] + p["missed"] + p["unused"]) == pytest.approx(aji(pred, truth))
    assert p["merge_extra"] == (pred == 1).sum()
    assert p["missed"] == (truth == 3).sum() and p["unused"] == (pred == 2).sum()
    rng = np.random.default_rng(0)
    for _ in range(5):  # random overlapping discs on both sides
        t, q = np.zeros((80, 80), np.int32), np.zeros((80, 80), np.int32)
        for k in range(1, 12):
            _disc(t, *rng.integers(5, 75, 2), int(rng.integers(3, 8)), k)
            _disc(q, *rng.integers(5, 75, 2), int(rng.integers(3, 10)), k)
        p = aji_parts(overlap_table(q, t))
        assert p["inter"] / (p["union"] + p["missed"] + p["unused"]) == pytest.approx(aji(q, t))


def test_census_sorts_a_merge_a_match_an_off_detection_and_a_miss():
    saved = list(sys.path)  # (the script puts benchmarks/ on the path too)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import error_census
    finally:
        sys.path[:] = saved
    pred, truth = _merge_case()
    _disc(truth, 50, 20, 8, 4)
    _disc(pred, 51, 20, 8, 7)  # nucleus 4, one pixel off: matched
    counts, pairs = error_census.census(overlap_table(pred, truth))
    assert counts == {"detections": 3, "matched": 1, "near": 0, "merge": 1, "fragment": 0, "off": 1,
                      "nuclei": 4, "n_matched": 1, "n_near": 0, "split": 0, "swallowed": 2, "missed": 1}
    # each detection, in raster order of first pixels: (best IoU, its area, that nucleus' area; 0 where none)
    (b1, a1, n1), (b2, a2, n2), (b3, a3, n3) = pairs
    assert (b1, a1, n1) == (0.0, (pred == 2).sum(), 0.0)
    assert a2 == (pred == 1).sum() and 0 < b2 <= 0.3  # both nuclei inside it: the larger has the higher IoU
    assert n2 == max((truth == 1).sum(), (truth == 2).sum())
    assert b3 > 0.5 and a3 == (pred == 7).sum() and n3 == (truth == 4).sum()
