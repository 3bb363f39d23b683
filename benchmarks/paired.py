"""Paired comparison of two ``benchmarks/kumar.py --out-json`` runs on the same images.

For each metric: the mean of the per-image differences B - A, its standard error (std over images with ddof=1,
divided by sqrt(n)), and on how many images B is ahead (ties not counted). This is how docs' "AJI +0.0082 ±
0.0017 (11/14)" figures are computed: two models on the same 14 images, so the image-to-image spread (much larger
than the gap between models) cancels.

    python benchmarks/paired.py A.json B.json [--per-image]
    python benchmarks/paired.py A.json B.json --shift x20   # two benchmarks/shift.py runs, on one of their shifts
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS = ("aji", "pixel_f1", "object_f1", "object_precision", "object_recall", "pq", "n_pred")


def paired(a: dict, b: dict, metrics=METRICS) -> dict[str, dict[str, float]]:
    """``{metric: {"a", "b", "diff", "se", "wins", "n"}}`` over the images both runs scored (by name)."""
    rows_a = {r["name"]: r for r in a["images"]}
    rows_b = {r["name"]: r for r in b["images"]}
    names = [n for n in rows_a if n in rows_b]
    if len(names) < 2:
        raise ValueError(f"the two runs share {len(names)} image(s); a paired comparison needs at least 2")
    out = {}
    for m in metrics:
        xa = [float(rows_a[n][m]) for n in names]
        xb = [float(rows_b[n][m]) for n in names]
        d = [y - x for x, y in zip(xa, xb)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
        out[m] = {"a": sum(xa) / len(xa), "b": sum(xb) / len(xb), "diff": mean, "se": se,
                  "wins": sum(v > 0 for v in d), "n": len(d)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="kumar.py --out-json of the reference run")
    ap.add_argument("b", type=Path, help="kumar.py --out-json of the run compared with it")
    ap.add_argument("--per-image", action="store_true", help="also print each image's AJI in both runs")
    ap.add_argument("--shift", default=None, help="A and B are benchmarks/shift.py --out-json runs: compare them on "
                    "this shift (none: the images as they are)")
    args = ap.parse_args(argv)
    try:
        a, b = (json.loads(p.read_text(encoding="utf-8")) for p in (args.a, args.b))
        if args.shift is not None:
            for path, run in ((args.a, a), (args.b, b)):
                if args.shift not in run.get("runs", {}):
                    raise ValueError(f"{path}: no shift {args.shift!r} here (it has: {', '.join(run.get('runs', {}))})")
            a, b = a["runs"][args.shift], b["runs"][args.shift]
        res = paired(a, b)
    except (OSError, ValueError, KeyError) as e:
        print(f"paired.py: error: {e}", file=sys.stderr)
        return 2
    print(f"A = {args.a}\nB = {args.b}")
    print(f"{'metric':<10} {'A':>8} {'B':>8} {'B - A':>9} {'± se':>8}  B ahead")
    for m, r in res.items():
        print(f"{m:<10} {r['a']:8.4f} {r['b']:8.4f} {r['diff']:+9.4f} {r['se']:8.4f}  {r['wins']}/{r['n']}")
    if args.per_image:
        rows_b = {r["name"]: r for r in b["images"]}
        for r in a["images"]:
            if r["name"] in rows_b:
                print(f"  {r['name']:<28} {r['aji']:.4f} -> {rows_b[r['name']]['aji']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
