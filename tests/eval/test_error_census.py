"""AJI's parts (wsiseg.eval.metrics.aji_parts, which scripts/error_census.py prints): they add up to
wsiseg.eval.metrics.aji, and a merge's extra count is the merged detection's area."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.eval.metrics import aji, aji_parts, overlap_table


def _disc(lab: np.ndarray, cy: int, cx: int, r: int, value: int) -> None:
    yy, xx = np.mgrid[:lab.shape[0], :lab.shape[1]]
    lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def test_aji_parts_add_up_to_aji_and_count_a_merge_again():
    truth = np.zeros((64, 96), np.int32)
    pred = np.zeros_like(truth)
    _disc(truth, 20, 20, 6, 1)
    _disc(truth, 20, 32, 6, 2)  # 1 and 2 touch: the prediction below merges them
    _disc(truth, 48, 70, 7, 3)  # missed
    pred[12:29, 12:41] = 1  # one box over nuclei 1 and 2
    _disc(pred, 10, 80, 4, 2)  # on no nucleus: unused
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
