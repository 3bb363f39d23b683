"""PDAM training speed: seconds per iteration of a run config (both domains, every paper loss), to size a run.

    python benchmarks/train_speed.py --config configs/pdam_r101.yaml --iters 60      # GPU: the paper's model
    python benchmarks/train_speed.py --config configs/pdam_lite.yaml --iters 10      # this CPU

Trains ``--iters`` iterations of the config's model with its own train settings (batch, AMP, crops) on 256x256
crops of the Kumar images, with their labels as the labelled domain and the same images as the unlabelled one:
this measures speed only (nothing here is an accuracy figure; ``wsiseg adapt`` never trains on Kumar labels).
Prints seconds per iteration after ``--warmup`` iterations, the projected time of the config's whole run, and peak
GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsiseg.train.trainer import TrainData, load_pair_dir, load_run_config, train  # noqa: E402

KUMAR = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "kumar"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "pdam_r101.yaml")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.iters <= a.warmup:
        ap.error("--iters must exceed --warmup")
    rc = load_run_config(a.config)
    rc.train.log_every = 1
    rc.train.checkpoint_every = 10**9
    rc.train.iterations = max(rc.train.iterations, a.iters)
    pairs = load_pair_dir(KUMAR) if (KUMAR / "labels").is_dir() else []
    if not pairs:
        sys.exit(f"no Kumar images and labels under {KUMAR} (set WSISEG_SHARED_DATA)")
    full = rc.train.iterations
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train(rc.model, rc.train, TrainData(pairs, [img for img, _ in pairs]), d, resume=False, device=a.device,
              progress=False, stop_at=a.iters)
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (Path(d) / "log.jsonl").read_text().splitlines()]
    # s_per_it is cumulative from the first iteration: elapsed(i) = i * s_per_it(i)
    el = {r["iter"]: r["iter"] * r["s_per_it"] for r in recs if "s_per_it" in r}
    s_it = (el[a.iters] - el[a.warmup]) / (a.iters - a.warmup)
    cuda = torch.cuda.is_available() and a.device != "cpu"
    res = {"config": str(a.config), "model": rc.model.name, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "amp": rc.train.amp, "iters": a.iters, "warmup": a.warmup, "s_per_it": s_it,
           "full_run_iterations": full, "full_run_hours": s_it * full / 3600, "wall_s": wall,
           "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
           "finite": all(r.get("finite", True) for r in recs)}
    print(f"{rc.model.name} ({a.config.name}) on {res['device']}, amp {rc.train.amp}: {s_it:.3f} s/it "
          f"(iterations {a.warmup}-{a.iters}); the config's {full} iterations would take {res['full_run_hours']:.2f} h; "
          f"all losses finite: {res['finite']}"
          + (f"; peak GPU {res['peak_gpu_mib']:.0f} MiB" if cuda else ""), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
