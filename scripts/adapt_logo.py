"""Leave-one-group-out proof of ``wsiseg adapt``: per held-out group, the adapted model against the model it started
from, on the group's own images (whose labels the adaptation never read), paired per image with standard errors.

Each group was adapted separately (``wsiseg adapt --target GROUP_IMAGES ...``, docs/adapt.md); both models were
scored on the 14 Kumar test images by ``benchmarks/kumar.py --out-json``; this script keeps, for each group, only the
group's images, and pools the groups for the overall row.

    python scripts/adapt_logo.py --base default.json \
        --group test_same_organ=/tmp/logo/same.json:/tmp/logo/test_same_organ \
        --group test_diff_organ=/tmp/logo/diff.json:/tmp/logo/test_diff_organ [--by split|organ_as_published]

``NAME=SCORES.json[:RUN_DIR]``: the group's value in ``split.csv``'s ``--by`` column (``a+b``: either value), the adapted model's kumar.py
scores, and optionally its ``wsiseg adapt`` directory (its unlabelled verdict is shown beside the labelled scores).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLIT = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "kumar" / "split.csv"
METRICS = ("aji", "object_f1", "object_precision", "object_recall")


def _diff(base: dict, new: dict, names: list[str], metric: str) -> tuple[float, float, float, float, int]:
    """Means of base and adapted, mean paired difference, its standard error (ddof=1 / sqrt n), wins."""
    d = [new[n][metric] - base[n][metric] for n in names]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return (sum(base[n][metric] for n in names) / len(names), sum(new[n][metric] for n in names) / len(names),
            mean, se, sum(x > 0 for x in d))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="kumar.py --out-json of the model adaptation started from")
    ap.add_argument("--group", action="append", required=True, metavar="NAME=SCORES.json[:RUN_DIR]")
    ap.add_argument("--by", default="split", help="split.csv column that names the groups (default: split)")
    ap.add_argument("--split", type=Path, default=SPLIT)
    a = ap.parse_args(argv)
    with open(a.split, newline="") as f:
        rows = list(csv.DictReader(f))
    base = {r["name"]: r for r in json.loads(a.base.read_text())["images"]}
    header = "| held-out group | images | " + " | ".join(
        f"{m} start -> adapted (paired diff +- SE, wins)" for m in ("AJI", "object F1")) + \
        " | precision start -> adapted | recall start -> adapted | unlabelled verdict |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    pooled_base, pooled_new, pooled_names = {}, {}, []
    for spec in a.group:
        name, _, rest = spec.partition("=")
        scores, _, run_dir = rest.partition(":")
        new = {r["name"]: r for r in json.loads(Path(scores).read_text())["images"]}
        values = name.split("+")  # a group may join several values, e.g. breast+kidney
        names = [r["image_id"] for r in rows if r[a.by] in values and r["image_id"] in new and r["image_id"] in base]
        if not names:
            print(f"adapt_logo: group {name}: no scored image", file=sys.stderr)
            return 2
        verdict = "-"
        if run_dir and (Path(run_dir) / "adapt_record.json").is_file():
            rounds = json.loads((Path(run_dir) / "adapt_record.json").read_text()).get("rounds", [])
            verdict = "; ".join(f"round {r['round']} {'kept' if r['kept'] else 'not kept'}" for r in rounds) or "-"
        cells = _cells(base, new, names)
        print(f"| {name} | {len(names)} | {cells} | {verdict} |")
        pooled_names += [f"{name}/{n}" for n in names]
        pooled_base.update({f"{name}/{n}": base[n] for n in names})
        pooled_new.update({f"{name}/{n}": new[n] for n in names})
    print(f"| **all groups** | {len(pooled_names)} | {_cells(pooled_base, pooled_new, pooled_names)} | |")
    return 0


def _cells(base: dict, new: dict, names: list[str]) -> str:
    out = []
    for m in ("aji", "object_f1"):
        b, n, d, se, wins = _diff(base, new, names, m)
        out.append(f"{b:.3f} -> {n:.3f} ({d:+.3f} +- {se:.3f}, {wins}/{len(names)})")
    for m in ("object_precision", "object_recall"):
        b, n, *_ = _diff(base, new, names, m)
        out.append(f"{b:.3f} -> {n:.3f}")
    return " | ".join(out)


if __name__ == "__main__":
    sys.exit(main())
