"""wsiseg.eval.metrics: hand-computed cases, a brute-force reference, relabelling invariance, and the Kumar labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from skimage import io
from skimage.segmentation import expand_labels

from wsiseg.eval import metrics
from wsiseg.eval.metrics import (
    aji,
    aji_plus,
    evaluate_pair,
    object_f1,
    overlap_table,
    panoptic_quality,
    pixel_f1,
)

HEADLINE = ("aji", "aji_plus", "pixel_f1", "object_f1", "pq", "dq", "sq", "object_f1_glas")


def canvas(shape=(12, 12), dtype=np.int32) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


def approx(x):
    return pytest.approx(x, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# hand-computed cases


def test_perfect_prediction_scores_one():
    gt = canvas()
    gt[1:5, 1:5] = 1
    gt[6:10, 2:9] = 7
    s = evaluate_pair(gt.copy(), gt)
    for k in HEADLINE:
        assert s[k] == 1.0, k
    assert s["n_true"] == s["n_pred"] == 2.0


def test_empty_prediction_gives_zero_not_crash():
    gt = canvas()
    gt[1:5, 1:5] = 3
    pred = canvas()
    s = evaluate_pair(pred, gt)
    for k in HEADLINE + ("object_precision", "object_recall"):
        assert s[k] == 0.0, k
    assert aji(pred, gt) == 0.0
    assert aji_plus(pred, gt) == 0.0


def test_empty_truth_gives_zero():
    gt = canvas()
    pred = canvas()
    pred[2:6, 2:6] = 1
    s = evaluate_pair(pred, gt)
    for k in HEADLINE:
        assert s[k] == 0.0, k


def test_both_empty_is_defined_as_one():
    s = evaluate_pair(canvas(), canvas())
    for k in HEADLINE:
        assert s[k] == 1.0, k
    assert s["n_true"] == s["n_pred"] == 0.0


def test_split_nucleus():
    # truth: one 4x4 nucleus (16 px); prediction splits it 12 + 4 px
    gt = canvas()
    gt[2:6, 2:6] = 1
    pred = canvas()
    pred[2:5, 2:6] = 5
    pred[5:6, 2:6] = 9
    s = evaluate_pair(pred, gt)
    # AJI: best IoU 12/16; C = 12, U = 16 + the unused 4-px piece = 20
    assert s["aji"] == approx(12 / 20)
    assert s["aji_plus"] == approx(12 / 20)
    assert s["pixel_f1"] == 1.0
    assert s["object_precision"] == approx(0.5)
    assert s["object_recall"] == 1.0
    assert s["object_f1"] == approx(2 / 3)
    assert s["sq"] == approx(0.75)
    assert s["pq"] == approx(2 / 3 * 0.75)
    # GlaS: the 12-px piece covers 3/4 of the nucleus (a hit), the 4-px piece 1/4 (not): P 1/2, R 1
    assert (s["glas_precision"], s["glas_recall"]) == (0.5, 1.0)
    assert s["object_f1_glas"] == approx(2 / 3)


def test_merged_nuclei():
    # truth: two touching 4x4 nuclei; prediction: one 4x8 blob covering both
    gt = canvas()
    gt[2:6, 0:4] = 1
    gt[2:6, 4:8] = 2
    pred = canvas()
    pred[2:6, 0:8] = 1
    s = evaluate_pair(pred, gt)
    # AJI lets both truths pick the merged blob: C = 16 + 16, U = 32 + 32
    assert s["aji"] == approx(0.5)
    # AJI+ pairs it with one truth only: C = 16, U = 32 + the unpaired truth's 16
    assert s["aji_plus"] == approx(16 / 48)
    # IoU is exactly 0.5, which is not a match (strict > 0.5)
    assert s["object_f1"] == 0.0
    assert s["pq"] == 0.0
    assert s["pixel_f1"] == 1.0
    # GlaS: the blob covers all of both; it is given the first (raster order) and counts as one hit: P 1, R 1/2
    assert (s["glas_precision"], s["glas_recall"]) == (1.0, 0.5)
    assert s["object_f1_glas"] == approx(2 / 3)


def test_glas_criterion_accepts_a_loose_outline_that_iou_rejects():
    # truth: a 4x4 nucleus; prediction: a 6x6 outline around it (IoU 16/36, below 0.5, but all of it covered)
    gt = canvas()
    gt[3:7, 3:7] = 1
    pred = canvas()
    pred[2:8, 2:8] = 4
    s = evaluate_pair(pred, gt)
    assert s["object_f1"] == 0.0
    assert s["object_f1_glas"] == 1.0
    # covering less than half of the nucleus is not a hit
    pred[:] = 0
    pred[3:7, 3:4] = 4
    s = evaluate_pair(pred, gt)
    assert s["object_f1_glas"] == 0.0


def test_shifted_by_one_pixel():
    gt = canvas((20, 20))
    gt[5:15, 5:15] = 1
    pred = canvas((20, 20))
    pred[5:15, 6:16] = 1
    s = evaluate_pair(pred, gt)
    assert s["aji"] == approx(90 / 110)
    assert s["aji_plus"] == approx(90 / 110)
    assert s["pixel_f1"] == approx(180 / 200)
    assert s["object_f1"] == 1.0
    assert s["sq"] == approx(90 / 110)
    assert s["pq"] == approx(90 / 110)


def test_no_overlap():
    gt = canvas()
    gt[0:4, 0:4] = 1
    pred = canvas()
    pred[8:12, 8:12] = 1
    s = evaluate_pair(pred, gt)
    for k in HEADLINE:
        assert s[k] == 0.0, k


def test_truth_without_overlapping_prediction_consumes_nothing():
    # G1 predicted exactly; G2 missed. The classic bug (argmax over an all-zero IoU row) pairs G2 with prediction
    # #1 and adds |G2| + |P1| to the union (AJI 16/48); the definition adds only |G2| (AJI 16/32).
    gt = canvas()
    gt[0:4, 0:4] = 1
    gt[8:12, 8:12] = 2
    pred = canvas()
    pred[0:4, 0:4] = 1
    assert aji(pred, gt) == approx(0.5)
    assert aji_plus(pred, gt) == approx(0.5)
    assert object_f1(pred, gt) == approx(2 / 3)
    assert pixel_f1(pred, gt) == approx(32 / 48)
    assert panoptic_quality(pred, gt) == approx(2 / 3)


def test_iou_exactly_half_is_not_a_match_but_just_above_is():
    gt = canvas((4, 20))
    gt[0, 0:10] = 1  # 10 px
    pred = canvas((4, 20))
    pred[0, 0:5] = 1  # IoU 5/10
    assert object_f1(pred, gt) == 0.0
    pred[0, 5] = 1  # IoU 6/10
    assert object_f1(pred, gt) == 1.0


def test_aji_plus_one_to_one_maximises_summed_iou():
    # P1 covers G1 and half of G2; P2 covers the other half of G2. Greedy "best IoU per truth" would give P1 to
    # both truths; one-to-one pairing gives P1->G1, P2->G2.
    gt = canvas((4, 24))
    gt[0:4, 0:8] = 1  # 32 px
    gt[0:4, 8:16] = 2  # 32 px
    pred = canvas((4, 24))
    pred[0:4, 0:12] = 1  # 48 px: IoU with G1 32/48, with G2 16/64
    pred[0:4, 12:16] = 2  # 16 px: IoU with G2 16/32
    # AJI: G1 -> P1 (32/48), G2 -> P2 (0.5 > 0.25): C = 32 + 16, U = 48 + 32
    assert aji(pred, gt) == approx(48 / 80)
    assert aji_plus(pred, gt) == approx(48 / 80)
    # now make P2 tiny so G2's best IoU is P1: AJI lets P1 serve twice, AJI+ does not
    pred[0:4, 12:16] = 0
    pred[0, 15] = 2  # 1 px, IoU with G2 1/32; G2 with P1: 16/64
    assert aji(pred, gt) == approx((32 + 16) / (48 + 64 + 1))
    assert aji_plus(pred, gt) == approx((32 + 1) / (48 + 32))


def test_overlap_table_counts():
    gt = canvas((3, 4))
    gt[0, :] = 10
    gt[1:, 2:] = 20
    pred = canvas((3, 4))
    pred[0, 1:3] = 4
    pred[1, 3] = 4
    t = overlap_table(pred, gt)
    assert (t.n_true, t.n_pred) == (2, 1)
    assert t.true_area.tolist() == [4, 4, 4]
    assert t.pred_area.tolist() == [9, 3]
    assert list(zip(t.pair_true.tolist(), t.pair_pred.tolist(), t.pair_inter.tolist())) == [(1, 1, 2), (2, 1, 1)]


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_pair(canvas((3, 3)), canvas((3, 4)))
    with pytest.raises(ValueError, match="integer"):
        evaluate_pair(canvas().astype(np.float32), canvas())


# ---------------------------------------------------------------------------------------------------------------
# relabelling invariance, dtypes, no mutation


def random_labels(rng: np.random.Generator, shape=(40, 40), n=8, distance=5) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    pts = rng.integers(0, shape, size=(n, 2))
    lab[pts[:, 0], pts[:, 1]] = np.arange(1, n + 1)
    lab = expand_labels(lab, distance)
    lab[rng.random(shape) < 0.02] = 0  # a few holes
    return lab


def relabel(lab: np.ndarray, rng: np.random.Generator, dtype, offset: int, sign: int = 1) -> np.ndarray:
    ids = np.unique(lab[lab != 0])
    new = rng.permutation(ids.size) * 3 + offset  # non-contiguous, permuted
    lut = dict(zip(ids.tolist(), (sign * new).tolist()))
    out = np.zeros(lab.shape, dtype=dtype)
    for old, v in lut.items():
        out[lab == old] = v
    return out


def test_relabelling_and_dtypes_do_not_change_scores():
    rng = np.random.default_rng(1)
    gt = random_labels(rng, n=10)
    pred = random_labels(rng, n=12)
    ref = evaluate_pair(pred, gt)
    for dtype, offset, sign in [
        (np.uint8, 1, 1),
        (np.int16, 1000, -1),
        (np.uint16, 60000 - 40, 1),
        (np.uint32, 3_000_000_000, 1),
        (np.int64, 2**40, -1),
    ]:
        p2 = relabel(pred, rng, dtype, offset, sign)
        g2 = relabel(gt, rng, np.int64 if dtype != np.uint8 else np.uint16, offset, sign)
        assert evaluate_pair(p2, g2) == ref


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(2)
    gt = random_labels(rng)
    pred = random_labels(rng)
    g0, p0 = gt.copy(), pred.copy()
    gt.flags.writeable = False
    pred.flags.writeable = False
    evaluate_pair(pred, gt)
    for f in (aji, aji_plus, object_f1, pixel_f1, panoptic_quality):
        f(pred, gt)
    np.testing.assert_array_equal(gt, g0)
    np.testing.assert_array_equal(pred, p0)
    # non-contiguous views work too and are left alone
    evaluate_pair(pred[:, ::2], gt[:, ::2])
    np.testing.assert_array_equal(pred, p0)


# ---------------------------------------------------------------------------------------------------------------
# property tests against a brute-force reference


def brute_force(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dense per-pair reference (raster-order tie-breaking, as documented)."""

    def ordered_ids(a):
        flat = a.ravel()
        seen = []
        for v in flat[flat != 0]:
            if v not in seen:
                seen.append(v)
        return seen

    gids, pids = ordered_ids(gt), ordered_ids(pred)
    gm = [gt == i for i in gids]
    pm = [pred == j for j in pids]
    inter = np.array([[np.sum(a & b) for b in pm] for a in gm], dtype=float).reshape(len(gm), len(pm))
    union = np.array([[np.sum(a | b) for b in pm] for a in gm], dtype=float).reshape(len(gm), len(pm))
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    c = u = 0.0
    used = set()
    for i, a in enumerate(gm):
        if len(pm) and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))  # first maximum = raster-order tie-break
            c += inter[i, j]
            u += union[i, j]
            used.add(j)
        else:
            u += a.sum()
    u += sum(pm[j].sum() for j in range(len(pm)) if j not in used)
    tp = int((2 * inter > union).sum())
    n = len(gm) + len(pm)
    # GlaS: each prediction's truth of most shared pixels (first maximum = raster-order tie-break)
    hits = [(j, int(np.argmax(inter[:, j]))) for j in range(len(pm)) if len(gm) and inter[:, j].max() > 0]
    hits = [(j, i) for j, i in hits if 2 * inter[i, j] >= gm[i].sum()]
    gp = len(hits) / len(pm) if pm else float(n == 0)
    gr = len({i for _, i in hits}) / len(gm) if gm else float(n == 0)
    f1 = 2 * tp / n if n else 1.0
    sq = iou[2 * inter > union].mean() if tp else (1.0 if n == 0 else 0.0)
    fg_g, fg_p = gt != 0, pred != 0
    denom = fg_g.sum() + fg_p.sum()
    return {
        "aji": (c / u) if u else 1.0,
        "object_f1": f1,
        "sq": sq,
        "pq": f1 * sq,
        "pixel_f1": 2 * (fg_g & fg_p).sum() / denom if denom else 1.0,
        "object_f1_glas": 2 * gp * gr / (gp + gr) if gp + gr else 0.0,
        "best_iou_sum": linear_sum_assignment(-iou)[0].size and float(iou[linear_sum_assignment(-iou)].sum()),
    }


label_images = st.integers(0, 2**32 - 1).map(np.random.default_rng)


@settings(max_examples=40, deadline=None)
@given(rng=label_images, n_gt=st.integers(0, 7), n_pred=st.integers(0, 7))
def test_matches_brute_force_reference(rng, n_gt, n_pred):
    gt = random_labels(rng, shape=(24, 24), n=n_gt, distance=int(rng.integers(1, 6)))
    pred = random_labels(rng, shape=(24, 24), n=n_pred, distance=int(rng.integers(1, 6)))
    s = evaluate_pair(pred, gt)
    ref = brute_force(pred, gt)
    for k in ("aji", "object_f1", "sq", "pq", "pixel_f1", "object_f1_glas"):
        assert s[k] == pytest.approx(ref[k], abs=1e-12), k
    for k in HEADLINE:
        assert 0.0 <= s[k] <= 1.0
    t = overlap_table(pred, gt)
    if t.pair_true.size:
        idx, _ = metrics._one_to_one(t)
        assert np.unique(t.pair_true[idx]).size == idx.size
        assert np.unique(t.pair_pred[idx]).size == idx.size
        assert t.pair_iou[idx].sum() == pytest.approx(ref["best_iou_sum"], abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(rng=label_images, dtype=st.sampled_from([np.uint16, np.int32, np.int64, np.uint64]))
def test_relabel_invariance_property(rng, dtype):
    gt = random_labels(rng, shape=(32, 32), n=int(rng.integers(0, 9)), distance=int(rng.integers(1, 7)))
    pred = random_labels(rng, shape=(32, 32), n=int(rng.integers(0, 9)), distance=int(rng.integers(1, 7)))
    ref = evaluate_pair(pred, gt)
    offset = int(rng.integers(1, 10_000))
    assert evaluate_pair(relabel(pred, rng, dtype, offset), relabel(gt, rng, dtype, offset)) == ref
    # swapping the roles of truth and prediction leaves the symmetric metrics alone
    swapped = evaluate_pair(gt, pred)
    for k in ("pixel_f1", "object_f1", "pq"):
        assert swapped[k] == pytest.approx(ref[k], abs=1e-12), k


# ---------------------------------------------------------------------------------------------------------------
# real Kumar labels


def kumar_labels(kumar_dir: Path, test_only: bool) -> list[tuple[str, np.ndarray]]:
    with open(kumar_dir / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        (r["image_id"], io.imread(kumar_dir / "labels" / f"{r['image_id']}.png"))
        for r in rows
        if not test_only or r["split"] != "train"
    ]


def shift1(lab: np.ndarray) -> np.ndarray:
    out = np.zeros_like(lab)
    out[1:, 1:] = lab[:-1, :-1]
    return out


def test_kumar_truth_against_itself_is_perfect(kumar_dir):
    for name, gt in kumar_labels(kumar_dir, test_only=False):
        s = evaluate_pair(gt.copy(), gt)
        for k in HEADLINE:
            assert s[k] == 1.0, (name, k)


def test_kumar_truth_shifted_one_pixel(kumar_dir):
    # the 14 test images, truth shifted by (+1 row, +1 col); measured means: AJI 0.8509, AJI+ 0.8509,
    # pixel F1 0.9234, object F1 0.9982, PQ 0.8286 (min per image: AJI 0.8085, PQ 0.7642, object F1 0.9799)
    scores = [evaluate_pair(shift1(gt), gt) for _, gt in kumar_labels(kumar_dir, test_only=True)]
    assert len(scores) == 14
    mean = {k: float(np.mean([s[k] for s in scores])) for k in HEADLINE}
    assert 0.83 < mean["aji"] < 0.87
    assert 0.83 < mean["aji_plus"] < 0.87
    assert 0.91 < mean["pixel_f1"] < 0.94
    assert 0.99 < mean["object_f1"] <= 1.0
    assert 0.81 < mean["pq"] < 0.85
    for s in scores:
        assert 0.78 < s["aji"] < 0.9
        assert s["object_f1"] > 0.97


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/kumar.py aggregation, with the no-model oracles


def _kumar_benchmark(name="kumar"):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kumar_benchmark_oracles(kumar_dir, tmp_path, capsys):
    bench = _kumar_benchmark()
    assert [g for _, g in bench.test_images(kumar_dir)].count("seen") == 8
    assert [g for _, g in bench.test_images(kumar_dir)].count("unseen") == 6
    out = tmp_path / "truth.json"
    assert bench.main(["--oracle", "truth", "--data", str(kumar_dir), "--out-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["images"]) == 14
    assert {r["group"] for r in report["images"]} == {"seen", "unseen"}
    for subset, n in (("seen", 8), ("unseen", 6), ("all", 14)):
        assert report["summary"][subset]["n_images"] == n
        for k in bench.METRICS:
            assert report["summary"][subset][k] == [1.0, 0.0]
    printed = capsys.readouterr().out
    assert "CyC-PDAM (paper)" in printed and "0.5610" in printed
    long_true = sum(r["long_true"] for r in report["images"])
    assert long_true > 0 and all(r["long_found"] == r["long_true"] for r in report["images"])
    assert f"{long_true} of {long_true} found (recall 1.000" in printed

    out = tmp_path / "shift.json"
    assert bench.main(["--oracle", "shift1", "--data", str(kumar_dir), "--out-json", str(out)]) == 0
    s = json.loads(out.read_text())["summary"]
    assert 0.83 < s["all"]["aji"][0] < 0.87
    # the "all" figures are the image-weighted combination of the two subsets
    for k in bench.METRICS:
        assert s["all"][k][0] == pytest.approx((8 * s["seen"][k][0] + 6 * s["unseen"][k][0]) / 14)
    # population std (ddof=0) over the 14 per-image figures
    aji = [r["aji"] for r in json.loads(out.read_text())["images"]]
    assert s["all"]["aji"][1] == pytest.approx(float(np.std(aji, ddof=0)))


def test_kumar_benchmark_markdown_table(kumar_dir, tmp_path, capsys):
    bench = _kumar_benchmark()
    runs = []
    for oracle in ("truth", "shift1"):
        runs.append(tmp_path / f"{oracle}.json")
        assert bench.main(["--oracle", oracle, "--data", str(kumar_dir), "--out-json", str(runs[-1])]) == 0
    capsys.readouterr()
    assert bench.main(["--table", *map(str, runs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| method | AJI |") and len(lines) == 2 + len(bench.PAPER) + 2
    assert lines[-2].startswith("| ours: oracle truth | 1.0000 ± 0.0000 |")
    assert "| ours: oracle shift1 | 0.8" in lines[-1]


def test_paired_comparison_of_two_runs(kumar_dir, tmp_path, capsys):
    """benchmarks/paired.py: per-image differences B - A, their standard error (ddof=1) and B's wins."""
    bench, paired = _kumar_benchmark(), _kumar_benchmark("paired")
    runs = {}
    for oracle in ("truth", "shift1"):
        runs[oracle] = tmp_path / f"{oracle}.json"
        assert bench.main(["--oracle", oracle, "--data", str(kumar_dir), "--out-json", str(runs[oracle])]) == 0
    a, b = (json.loads(runs[k].read_text()) for k in ("truth", "shift1"))
    res = paired.paired(a, b)
    d = np.array([rb["aji"] - ra["aji"] for ra, rb in zip(a["images"], b["images"])])
    assert res["aji"]["diff"] == pytest.approx(d.mean()) and res["aji"]["n"] == 14
    assert res["aji"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(14))
    assert res["aji"]["wins"] == 0 and res["aji"]["a"] == 1.0  # the truth is never beaten
    assert paired.paired(b, a)["aji"]["wins"] == 14
    capsys.readouterr()
    assert paired.main([str(runs["truth"]), str(runs["shift1"])]) == 0
    assert "aji" in capsys.readouterr().out
    assert paired.main([str(runs["truth"]), str(tmp_path / "none.json")]) == 2
    assert "error" in capsys.readouterr().err


def test_elongated_recall_counts_the_long_true_nuclei_a_prediction_matches():
    """Constructed: two long true nuclei (one matched at IoU > 0.5, one covered by a quarter only) and a round one
    (matched, not counted); the ids of either image do not change the counts; the real Kumar truth against itself
    finds every long nucleus."""
    gt = np.zeros((60, 60), np.int32)
    gt[5:9, 5:40] = 7      # 4 x 35: long
    gt[20:30, 20:30] = 3   # round
    gt[40:44, 10:50] = 9   # 4 x 40: long
    pred = np.zeros_like(gt)
    pred[5:9, 5:38] = 1    # IoU 33/35
    pred[20:30, 20:30] = 2
    pred[40:44, 10:20] = 5  # IoU 10/40
    assert metrics.elongated_recall(pred, gt) == {"long_true": 2, "long_found": 1}
    swapped = np.select([gt == 7, gt == 3, gt == 9], [100, 1, 2], 0).astype(np.int32)
    assert metrics.elongated_recall(pred * 11, swapped) == {"long_true": 2, "long_found": 1}
    assert metrics.elongated_recall(pred, gt, at=20.0) == {"long_true": 0, "long_found": 0}
    assert metrics.elongated_recall(np.zeros_like(gt), gt) == {"long_true": 2, "long_found": 0}


def test_elongated_recall_of_the_kumar_truth_against_itself(kumar_dir):
    truth = io.imread(next((kumar_dir / "labels").glob("*.png")))
    out = metrics.elongated_recall(truth, truth)
    assert out["long_true"] > 0 and out["long_found"] == out["long_true"]
