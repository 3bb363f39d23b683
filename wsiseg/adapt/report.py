"""What ``wsiseg adapt`` can tell about a model on the target slides without a single label.

On a fixed subset of the target's tissue tiles (:func:`report_tiles`), each model (the teacher a round starts
from, the student it trains) is measured by :func:`measure`:

- ``per_mm2``: detections per mm^2 of tile (the tiles are tissue);
- ``share_on_white``: the share of detections lying on white (glass, fat, lumen:
  :func:`wsiseg.eval.background.on_white`);
- ``flip_consistency``: the object F1 (IoU > 0.5) between the model's instances on a tile and on its mirror image
  (mirrored back), averaged over tiles: a model that has learnt the target's nuclei finds the same ones either way;
- ``coverage``: the share of a model-free reference's objects (the classical ``watershed``'s, computed once for
  all models: :func:`reference`) that the model's detections cover by at least half (:func:`coverage`): a recall-side
  measure, since a student that stops finding nuclei leaves more of the dark blobs the watershed finds uncovered;
- score quantiles (10/50/90%) of its detections.

and the two are compared by :func:`agreement` (object F1 between teacher and student). :func:`verdict` is the
stopping rule (docs/adapt.md says when each part was fixed and on what): the student is kept only when it is no
worse than its teacher on every measure (white share at most +0.5 points, flip consistency at most 0.01 lower,
density within 0.67..1.5x the teacher's, coverage at most 0.045 lower); rounds stop when a student is not kept or
agrees with its teacher on >= 95% of objects (nothing more to learn from it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

WHITE_MARGIN = 0.005
CONSISTENCY_MARGIN = 0.01
DENSITY_RANGE = (0.67, 1.5)
CONVERGED = 0.95
#: how much lower than its teacher's a student's :func:`coverage` may be. More precise students cover fewer of the
#: watershed's objects too (some of those are not nuclei), so the margin sits between students that kept their
#: recall and one that lost it, on the development set (docs/adapt.md)
COVERAGE_MARGIN = 0.045


@dataclass
class Measures:
    tiles: int
    detections: int
    per_mm2: float
    share_on_white: float
    flip_consistency: float
    score_p10: float
    score_p50: float
    score_p90: float
    coverage: float = -1.0  # -1: not measured (no reference given)

    def as_dict(self) -> dict:
        return asdict(self)


def report_tiles(images_dir: str | Path, n: int) -> np.ndarray:
    """Up to ``n`` target tiles (N, H, W, 3) RGB, evenly spaced over the sorted tile names (so every slide counts)."""
    names = sorted(Path(images_dir).glob("*.png"))
    if not names:
        return np.zeros((0, 1, 1, 3), np.uint8)
    pick = np.unique(np.linspace(0, len(names) - 1, min(n, len(names))).round().astype(int))
    return np.stack([cv2.imread(str(names[i]), cv2.IMREAD_COLOR)[..., ::-1] for i in pick])


def _predict(seg, tiles: np.ndarray, batch: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    labels, scores = [], []
    for k in range(0, len(tiles), batch):
        for inst in seg.predict(np.ascontiguousarray(tiles[k:k + batch])):
            labels.append(inst.labels)
            scores.append(np.asarray(inst.scores, np.float64))
    return labels, scores


def _object_f1(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    from ..eval.metrics import object_f1

    return float(np.mean([object_f1(x, y) for x, y in zip(a, b)])) if a else 1.0


def reference(tiles: np.ndarray) -> list[np.ndarray]:
    """The classical ``watershed``'s label image of each tile: the model-free objects :func:`coverage` counts."""
    from ..api import load_model

    return _predict(load_model("watershed"), tiles)[0]


def coverage(labels: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """The share of the objects of ``ref`` (label images) whose pixels the instances of ``labels`` (the same tiles)
    cover by at least half; 1.0 when ``ref`` has no object."""
    hit = total = 0
    for lab, r in zip(labels, ref):
        n = int(r.max()) if r.size else 0
        if n == 0:
            continue
        ids = r.ravel()
        area = np.bincount(ids, minlength=n + 1)[1:]
        covered = np.bincount(ids, weights=(lab > 0).ravel(), minlength=n + 1)[1:]
        hit += int(np.count_nonzero(covered >= 0.5 * area))
        total += n
    return hit / total if total else 1.0


def measure(seg, tiles: np.ndarray, mpp: float,
            ref: list[np.ndarray] | None = None) -> tuple[Measures, list[np.ndarray]]:
    """``seg``'s :class:`Measures` on ``tiles`` (at ``mpp`` um/px) and its label image of each tile; ``ref``:
    :func:`reference` of the tiles, for the coverage (None: coverage not measured, -1)."""
    from ..eval.background import on_white

    labels, scores = _predict(seg, tiles)
    mirrored, _ = _predict(seg, tiles[:, :, ::-1])
    mirrored = [m[:, ::-1] for m in mirrored]
    n = sum(int(l.max()) if l.size else 0 for l in labels)  # ids are 1..n
    white = sum(int(on_white(t, l).sum()) for t, l in zip(tiles, labels))
    area_mm2 = len(tiles) * tiles.shape[1] * tiles.shape[2] * (mpp / 1000.0) ** 2 if len(tiles) else 1.0
    s = np.concatenate(scores) if scores else np.zeros(0)
    q = np.quantile(s, [0.1, 0.5, 0.9]) if s.size else np.zeros(3)
    return Measures(len(tiles), n, round(n / area_mm2, 1), round(white / max(n, 1), 4),
                    round(_object_f1(labels, mirrored), 4), *(round(float(v), 3) for v in q),
                    round(coverage(labels, ref), 4) if ref is not None else -1.0), labels


def agreement(teacher: list[np.ndarray], student: list[np.ndarray]) -> float:
    """Object F1 (IoU > 0.5) between two models' instances on the same tiles, averaged over tiles."""
    return round(_object_f1(student, teacher), 4)


def verdict(teacher: Measures, student: Measures, agree: float) -> tuple[bool, bool, list[str]]:
    """(keep the student, stop the rounds, the reasons) by the rule in this module's docstring."""
    why = []
    if student.share_on_white > teacher.share_on_white + WHITE_MARGIN:
        why.append(f"more detections on white ({student.share_on_white:.1%} vs {teacher.share_on_white:.1%})")
    if student.flip_consistency < teacher.flip_consistency - CONSISTENCY_MARGIN:
        why.append(f"less consistent under mirroring ({student.flip_consistency:.3f} vs "
                   f"{teacher.flip_consistency:.3f})")
    ratio = student.per_mm2 / teacher.per_mm2 if teacher.per_mm2 else float("inf")
    if not DENSITY_RANGE[0] <= ratio <= DENSITY_RANGE[1]:
        why.append(f"detection density {ratio:.2f}x the teacher's")
    if min(student.coverage, teacher.coverage) >= 0 and student.coverage < teacher.coverage - COVERAGE_MARGIN:
        why.append(f"covers fewer of the watershed's objects ({student.coverage:.1%} vs {teacher.coverage:.1%}): "
                   "recall lost")
    keep = not why
    if keep:
        why.append("no worse than its teacher on every unlabelled measure")
    stop = not keep or agree >= CONVERGED
    if keep and agree >= CONVERGED:
        why.append(f"agrees with its teacher on {agree:.0%} of objects: converged")
    return keep, stop, why
