"""Python-level torch calls the fast path makes per batch, by stage: the figure that decides how long the predicting
thread waits for the interpreter lock inside ``wsiseg run`` on a GPU (each call may give the lock up and wait to get
it back; ``benchmarks/gpu_profile.py`` measures the wait on a card). Counted with a ``TorchFunctionMode``, so it runs
anywhere and the counts are exact and repeatable. On a CPU the GPU's branches are taken where they are a setting
(the matrix NMS, the mask logits as whole products, the masks pasted in chunks bounded by pixels only, the overlap
rule in waves chunked by pixels, not by 64 detections; the same instances either way, tested), unless
``--cpu-branches``.

    python benchmarks/torch_calls.py --batch 32                  # the bundled model
    python benchmarks/torch_calls.py --config r101 --batch 8 --top 10
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import build_model, load_tiles  # noqa: E402
import wsiseg.segmenters.postprocess as pp  # noqa: E402
import wsiseg.segmenters.rcnn as rcnn  # noqa: E402
from wsiseg.segmenters.rcnn import PDAMSegmenter  # noqa: E402

STAGES = ("_features", "_proposals", "_detections", "_masks", "_semantic", "_instances")


class Counter(TorchFunctionMode):
    """Counts every torch function or method call made from Python, by the stage set in :attr:`stage`."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = None
        self.calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls[self.stage][getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def count(seg: PDAMSegmenter, tiles) -> dict[str, collections.Counter]:
    mode = Counter()
    for name in STAGES:
        stage = getattr(seg, name)

        def wrapped(*a, _stage=stage, _name=name, **k):
            mode.stage = _name.lstrip("_")
            return _stage(*a, **k)

        setattr(seg, name, wrapped)
    seg.predict(tiles)  # the first call sets the poolers up
    with mode:
        seg.predict(tiles)
    return mode.calls


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=["lite", "r101"], default="lite")
    ap.add_argument("--weights", type=Path, default=ROOT / "wsiseg" / "weights" / "default.safetensors",
                    help="the bundled model (with --config lite)")
    ap.add_argument("--dets", type=int, default=100, help="R101 at random init: detections kept per tile")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tta", type=int, default=0, choices=[0, 4, 8])
    ap.add_argument("--top", type=int, default=0, help="also print each stage's N most frequent calls")
    ap.add_argument("--cpu-branches", action="store_true", help="count the CPU's own branches (see above)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if not a.cpu_branches:
        rcnn._LOGIT_BLOCK = 1 << 40
        pp._wave_limits = lambda device: (None, pp._WAVE_PIXELS)
        pp._paste_limit = lambda device: None
        pp.default_overlap_method = lambda device: "waves"
    torch.set_num_threads(1)
    if a.config == "lite":
        model, desc, _ = build_model("lite", 50, a.weights, 0.5)
    else:
        model, desc, _ = build_model("r101", a.dets)
    seg = PDAMSegmenter(model, 0.25, 64, device="cpu", nms_method="sequential" if a.cpu_branches else "matrix",
                        tta=a.tta)
    tiles, src = load_tiles(a.batch)
    calls = count(seg, tiles)
    per_stage = {k: sum(v.values()) for k, v in calls.items()}
    branches = "CPU" if a.cpu_branches else "GPU"
    print(f"{desc} | batch {a.batch} ({src}) | tta {a.tta} | {branches} branches: {sum(per_stage.values())} "
          "Python-level torch calls a "
          "batch; " + ", ".join(f"{k} {v}" for k, v in per_stage.items()))
    if a.top:
        for k, v in calls.items():
            print(f"  {k}: " + ", ".join(f"{n} {c}" for n, c in v.most_common(a.top)))
    res = {"model": desc, "batch": a.batch, "tta": a.tta, "cpu_branches": a.cpu_branches, "calls_per_stage": per_stage,
           "calls": {k: dict(v) for k, v in calls.items()}}
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
