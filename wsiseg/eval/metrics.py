"""Instance segmentation metrics: AJI, AJI+, object F1, pixel F1 and panoptic quality.

Every metric is computed from ONE sparse overlap (contingency) table per (prediction, truth) pair, built by
:func:`overlap_table` in a single pass over the pixels, so there is no per-nucleus or per-pair Python loop
(a 1000x1000 image with 1,000 nuclei takes a few tens of milliseconds).

Conventions (guaranteed):

- Inputs are two integer label images of the same shape (any dimensionality, any integer dtype). ``0`` is background,
  every other value is one instance; ids need not be contiguous and may be negative or huge. Inputs are never mutated.
- Results do not depend on the ids: instances are renumbered internally in raster order of their first pixel, and
  every tie (equal IoU) is broken by that order, so permuting or remapping ids gives exactly the same figures.
- "Match" for object F1 and PQ means IoU > 0.5 (strict, computed exactly in integers: ``2 * inter > union``); such
  matches are unique by construction (Kirillov et al. 2019), so no assignment is needed.
- Empty images: when both truth and prediction hold no instance, every metric is 1.0 (the prediction is exactly
  right). When exactly one of them is empty, every metric is 0.0. A prediction with no instance therefore scores
  AJI 0 instead of crashing.

Definitions:

- **AJI** (Kumar et al. 2017): each true nucleus G picks the overlapping prediction S with the highest IoU (a
  prediction may be picked by several true nuclei); C = sum |G & S|, U = sum |G | S|. A true nucleus that overlaps
  no prediction adds |G| to U and consumes nothing (the known bug of taking ``argmax`` over an all-zero row, which
  consumes prediction #1, is avoided). Finally every prediction never picked adds its area to U. AJI = C / U.
- **AJI+** (Graham et al. 2019, HoVer-Net): as AJI but with a one-to-one pairing that maximises the summed IoU over
  overlapping pairs (sparse Jonker-Volgenant assignment); unpaired truths and predictions add their areas to U.
- **object F1**: TP = pairs with IoU > 0.5, precision = TP / n_pred, recall = TP / n_true, F1 = 2 TP / (n_pred + n_true).
- **pixel F1**: Dice of the binary foregrounds, 2 |A & B| / (|A| + |B|).
- **PQ** = DQ x SQ with DQ = TP / (TP + FP/2 + FN/2) (equal to object F1) and SQ = mean IoU of the TPs (0 if no TP).
- **object F1, GlaS criterion** (Sirinukunwattana et al. 2017, the gland-segmentation contest; a more lenient
  detection measure some nuclei papers report as "object F1"): each prediction is given the true nucleus it shares
  most pixels with (ties to the first in raster order) and is a hit when it covers at least half of that nucleus;
  precision = hits / n_pred, recall = distinct nuclei hit / n_true, F1 = 2PR / (P + R). A loose outline or a merge
  of two nuclei can be a hit here, never under IoU > 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

__all__ = [
    "OverlapTable",
    "overlap_table",
    "scores_from_table",
    "evaluate_pair",
    "aji",
    "aji_parts",
    "best_pair",
    "aji_plus",
    "object_f1",
    "pixel_f1",
    "panoptic_quality",
    "elongated_recall",
    "METRIC_NAMES",
]

#: The headline metrics, in the order tables print them.
METRIC_NAMES = ("aji", "aji_plus", "pixel_f1", "object_f1", "pq")


@dataclass(frozen=True)
class OverlapTable:
    """Sparse contingency table of one (prediction, truth) pair.

    Instances are renumbered 1..n in raster order of their first pixel (0 = background).
    ``true_area[i]`` / ``pred_area[j]`` are pixel counts (index 0 = background pixels); ``pair_true``,
    ``pair_pred``, ``pair_inter`` list every (true i >= 1, pred j >= 1) pair that shares at least one pixel,
    sorted by (i, j), with the shared pixel count.
    """

    n_true: int
    n_pred: int
    true_area: np.ndarray  # int64, (n_true + 1,)
    pred_area: np.ndarray  # int64, (n_pred + 1,)
    pair_true: np.ndarray  # int64, (n_pairs,)
    pair_pred: np.ndarray  # int64, (n_pairs,)
    pair_inter: np.ndarray  # int64, (n_pairs,)

    @property
    def pair_union(self) -> np.ndarray:
        return self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        return self.pair_inter / self.pair_union


def _check(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred)
    g = np.asarray(gt)
    for name, a in (("pred", p), ("gt", g)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be an integer label image, got dtype {a.dtype}")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    return p, g


def _canonical(run_values: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber run values to 0..n: 0 stays background, others ranked by first occurrence (= first pixel)."""
    values, first, inverse = np.unique(run_values, return_index=True, return_inverse=True)
    fg = values != 0
    n = int(fg.sum())
    rank = np.zeros(values.size, dtype=np.int64)
    order = np.argsort(first[fg], kind="stable")
    fg_rank = np.empty(n, dtype=np.int64)
    fg_rank[order] = np.arange(1, n + 1)
    rank[fg] = fg_rank
    return rank[inverse.reshape(-1)], n


def overlap_table(pred: np.ndarray, gt: np.ndarray) -> OverlapTable:
    """Build the sparse overlap table of ``pred`` against ``gt`` (same shape, integer dtypes; never mutated).

    One O(pixels) pass finds the raster runs over which neither image changes; everything after works on runs.
    """
    p, g = _check(pred, gt)
    pf = p.reshape(-1)
    gf = g.reshape(-1)
    size = pf.size
    if size == 0:
        zero = np.zeros(0, dtype=np.int64)
        return OverlapTable(0, 0, np.zeros(1, np.int64), np.zeros(1, np.int64), zero, zero, zero)
    change = np.empty(size, dtype=bool)
    change[0] = True
    np.not_equal(pf[1:], pf[:-1], out=change[1:])
    change[1:] |= gf[1:] != gf[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(np.append(starts, size))
    g_run, n_true = _canonical(gf[starts])
    p_run, n_pred = _canonical(pf[starts])
    true_area = np.bincount(g_run, weights=lengths, minlength=n_true + 1).astype(np.int64)
    pred_area = np.bincount(p_run, weights=lengths, minlength=n_pred + 1).astype(np.int64)
    both = (g_run > 0) & (p_run > 0)
    code = g_run[both] * (n_pred + 1) + p_run[both]
    codes, inverse = np.unique(code, return_inverse=True)
    inter = np.bincount(inverse.reshape(-1), weights=lengths[both], minlength=codes.size).astype(np.int64)
    return OverlapTable(
        n_true=n_true,
        n_pred=n_pred,
        true_area=true_area,
        pred_area=pred_area,
        pair_true=codes // (n_pred + 1),
        pair_pred=codes % (n_pred + 1),
        pair_inter=inter,
    )


# ----------------------------------------------------------------------------------------------------------------
# metrics from a table


def best_pair(group: np.ndarray, score: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Indices into the pair arrays of each group's best pair: the highest ``score``, ties to the lowest ``tie``
    (instance ids are in raster order, so the lowest is the first in raster order); groups in ascending order."""
    order = np.lexsort((tie, -score, group))
    first = np.ones(order.size, dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    return order[first]


def aji_parts(t: OverlapTable) -> dict[str, int]:
    """AJI's sums for one table, as :func:`aji` adds them: ``inter`` and ``union`` of the pairs it picks (each true
    nucleus with its prediction of highest IoU, ties to the first in raster order), ``merge_extra`` (the part of
    ``union`` that is a prediction's area counted again because more than one nucleus picked it), ``missed`` (the
    area of the nuclei no prediction overlaps) and ``unused`` (of the predictions no nucleus picked).
    AJI = inter / (union + missed + unused)."""
    best = best_pair(t.pair_true, t.pair_iou, t.pair_pred)
    matched_true = np.zeros(t.n_true + 1, dtype=bool)
    matched_true[t.pair_true[best]] = True
    picked = np.bincount(t.pair_pred[best], minlength=t.n_pred + 1)  # times each prediction was picked
    return {"inter": int(t.pair_inter[best].sum()), "union": int(t.pair_union[best].sum()),
            "merge_extra": int((t.pred_area[1:] * np.maximum(picked[1:] - 1, 0)).sum()),
            "missed": int(t.true_area[1:][~matched_true[1:]].sum()),
            "unused": int(t.pred_area[1:][picked[1:] == 0].sum())}


def _aji(t: OverlapTable) -> float:
    if t.n_true == 0 and t.n_pred == 0:
        return 1.0
    if t.n_true == 0 or t.n_pred == 0 or t.pair_true.size == 0:
        return 0.0
    p = aji_parts(t)
    return float(p["inter"] / (p["union"] + p["missed"] + p["unused"]))


def _one_to_one(t: OverlapTable) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the pair arrays of a one-to-one pairing maximising the summed IoU (overlapping pairs only).

    Solved as a full matching on the graph augmented with an "unpaired" dummy for every node, so a full matching
    always exists; real edges weigh 1 + IoU and dummy edges 1, every full matching has n_true + n_pred edges, hence
    the maximum-weight one maximises the IoU sum.
    """
    nt, npr, k = t.n_true, t.n_pred, t.pair_true.size
    ti = t.pair_true - 1
    pj = t.pair_pred - 1
    # rows: true 0..nt-1, then "pred j unpaired" nt..nt+npr-1; cols: pred 0..npr-1, then "true i unpaired".
    # The dummy x dummy block only needs an edge where (i, j) is a real edge (it frees both dummies).
    rows = np.concatenate([ti, np.arange(nt), nt + pj, nt + np.arange(npr)])
    cols = np.concatenate([pj, npr + np.arange(nt), npr + ti, np.arange(npr)])
    weights = np.concatenate([1.0 + t.pair_iou, np.ones(nt), np.ones(k), np.ones(npr)])
    graph = coo_array((weights, (rows, cols)), shape=(nt + npr, npr + nt)).tocsr()
    r, c = min_weight_full_bipartite_matching(graph, maximize=True)
    real = (r < nt) & (c < npr)
    mt, mp = r[real], c[real]
    # map (true, pred) back to the index of the pair in the table (pairs are sorted by code)
    codes = t.pair_true * (npr + 1) + t.pair_pred
    idx = np.searchsorted(codes, (mt + 1) * (npr + 1) + (mp + 1))
    return idx, real


def _aji_plus(t: OverlapTable) -> float:
    if t.n_true == 0 and t.n_pred == 0:
        return 1.0
    if t.n_true == 0 or t.n_pred == 0 or t.pair_true.size == 0:
        return 0.0
    idx, _ = _one_to_one(t)
    inter = t.pair_inter[idx].sum()
    union = t.pair_union[idx].sum()
    paired_true = np.zeros(t.n_true + 1, dtype=bool)
    paired_true[t.pair_true[idx]] = True
    paired_pred = np.zeros(t.n_pred + 1, dtype=bool)
    paired_pred[t.pair_pred[idx]] = True
    union += t.true_area[1:][~paired_true[1:]].sum() + t.pred_area[1:][~paired_pred[1:]].sum()
    return float(inter / union)


def _matches(t: OverlapTable) -> np.ndarray:
    """Boolean mask over pairs with IoU > 0.5 (exact integer test); unique on both sides by construction."""
    return 2 * t.pair_inter > t.pair_union


def _detection(t: OverlapTable) -> dict[str, float]:
    if t.n_true == 0 and t.n_pred == 0:
        return {"object_precision": 1.0, "object_recall": 1.0, "object_f1": 1.0, "dq": 1.0, "sq": 1.0, "pq": 1.0,
                "glas_precision": 1.0, "glas_recall": 1.0, "object_f1_glas": 1.0}
    m = _matches(t)
    tp = int(m.sum())
    precision = tp / t.n_pred if t.n_pred else 0.0
    recall = tp / t.n_true if t.n_true else 0.0
    f1 = 2 * tp / (t.n_true + t.n_pred)
    sq = float(t.pair_iou[m].mean()) if tp else 0.0
    return {
        "object_precision": float(precision),
        "object_recall": float(recall),
        "object_f1": float(f1),
        "dq": float(f1),
        "sq": sq,
        "pq": float(f1 * sq),
        **_glas(t),
    }


def _glas(t: OverlapTable) -> dict[str, float]:
    """The GlaS criterion's precision, recall and F1 (module docstring); called with at least one instance."""
    if t.pair_true.size == 0:
        return {"glas_precision": 0.0, "glas_recall": 0.0, "object_f1_glas": 0.0}
    # per prediction: the most shared pixels first, ties to the truth that comes first in raster order
    best = best_pair(t.pair_pred, t.pair_inter, t.pair_true)
    hit = 2 * t.pair_inter[best] >= t.true_area[t.pair_true[best]]
    precision = int(hit.sum()) / t.n_pred
    recall = np.unique(t.pair_true[best][hit]).size / t.n_true
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"glas_precision": float(precision), "glas_recall": float(recall), "object_f1_glas": float(f1)}


def _pixel_f1(t: OverlapTable) -> float:
    a = int(t.true_area[1:].sum())
    b = int(t.pred_area[1:].sum())
    if a + b == 0:
        return 1.0
    return float(2 * int(t.pair_inter.sum()) / (a + b))


def scores_from_table(t: OverlapTable) -> dict[str, float]:
    """Every metric from one table. Keys: ``aji, aji_plus, pixel_f1, object_f1, object_precision,
    object_recall, pq, dq, sq, object_f1_glas, glas_precision, glas_recall, n_true, n_pred`` (all floats)."""
    out = {"aji": _aji(t), "aji_plus": _aji_plus(t), "pixel_f1": _pixel_f1(t)}
    out.update(_detection(t))
    out["n_true"] = float(t.n_true)
    out["n_pred"] = float(t.n_pred)
    return out


# ----------------------------------------------------------------------------------------------------------------
# public one-metric functions


def evaluate_pair(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """All metrics of ``pred`` against ``gt`` from one overlap table (see :func:`scores_from_table` for keys)."""
    return scores_from_table(overlap_table(pred, gt))


def aji(pred: np.ndarray, gt: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017), in [0, 1]."""
    return _aji(overlap_table(pred, gt))


def aji_plus(pred: np.ndarray, gt: np.ndarray) -> float:
    """AJI+ (one-to-one pairing maximising summed IoU, Graham et al. 2019), in [0, 1]."""
    return _aji_plus(overlap_table(pred, gt))


def object_f1(pred: np.ndarray, gt: np.ndarray) -> float:
    """Object-level F1: a prediction matches a true nucleus when their IoU > 0.5."""
    return _detection(overlap_table(pred, gt))["object_f1"]


def pixel_f1(pred: np.ndarray, gt: np.ndarray) -> float:
    """Pixel-level F1 (Dice) of the binary foregrounds (label != 0)."""
    return _pixel_f1(overlap_table(pred, gt))


def panoptic_quality(pred: np.ndarray, gt: np.ndarray) -> float:
    """Panoptic quality PQ = DQ x SQ with IoU > 0.5 matching (DQ and SQ are in :func:`evaluate_pair`)."""
    return _detection(overlap_table(pred, gt))["pq"]


#: how many times as long as wide a true nucleus is, at least, to count as elongated (:func:`elongated_recall`)
ELONGATED = 2.5


def elongated_recall(pred: np.ndarray, gt: np.ndarray, at: float = ELONGATED, min_px: int = 20) -> dict[str, int]:
    """How many of the truth's elongated nuclei the prediction finds: ``{"long_true": n, "long_found": k}``, ``n``
    the true nuclei of at least ``min_px`` pixels whose ellipse of the same second moments is at least ``at`` times
    as long as wide (spindle-shaped: fibroblasts, smooth muscle), ``k`` those a prediction matches at IoU > 0.5, as
    object F1 counts a match. 2-D label images, as :func:`evaluate_pair` takes them (the truth's ids >= 0)."""
    from skimage.measure import regionprops

    t = overlap_table(pred, gt)
    g = np.asarray(gt).reshape(-1)
    values, first = np.unique(g, return_index=True)
    fg = values != 0
    ids = values[fg][np.argsort(first[fg], kind="stable")]  # ids[k - 1]: the truth's own id of instance k
    found = set(ids[t.pair_true[_matches(t)] - 1].tolist())
    long = [r.label for r in regionprops(np.asarray(gt)) if r.area >= min_px
            and r.axis_major_length >= at * r.axis_minor_length]
    return {"long_true": len(long), "long_found": sum(1 for i in long if i in found)}
