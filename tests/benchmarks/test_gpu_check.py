"""``benchmarks/gpu_check.sh``, the one command a borrowed GPU runs, in its smoke mode on this CPU.

Device time is short and lent by chance, so a benchmark option or function renamed since the last loan must fail
here, not there: ``SMOKE=1`` runs the same steps with the same options at toy sizes (no fp16, two tiles, small
slides) and the script exits non-zero when any step fails. Every step but ``tests`` (the CUDA tests, which this
suite already runs on the CPU), ``nmschunks`` (``nms`` with more chunk sizes) and ``profile`` (py-spy, not a test
dependency).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

pytestmark = pytest.mark.slow  # each test runs the script in a subprocess


#: the steps in two groups run side by side (each group one run of the script, in its own folder): on this 2-core
#: machine each step mostly starts Python and torch on one core, so two at once take about half the time (one run of
#: all 14: 301 s on a quiet machine). ``e2ebest`` reads ``nms``'s figures, so they share a group.
GROUPS = (["default", "tta", "r101", "cpuside", "nms", "e2ebest", "gil", "graphs", "e2ebig"],
          ["train", "adapt", "bigtile", "prof", "batches"])


@pytest.mark.skipif(not (SHARED / "kumar" / "images").is_dir(), reason="Kumar images absent (../shared/data)")
def test_every_gpu_check_step_runs_in_smoke_mode(tmp_path):
    env = {**os.environ, "SMOKE": "1", "SWEEP": "1p", "CPUSIDE": "0 1", "OMP_NUM_THREADS": "1", "BIG_WORKERS": "1",
           "BIG_SWEEP": "1"}
    logs = [tmp_path / f"log{i}.txt" for i in range(len(GROUPS))]  # files, not pipes: neither run waits on a reader
    runs = []
    for i, (steps, log) in enumerate(zip(GROUPS, logs)):
        with log.open("w") as f:
            runs.append(subprocess.Popen(["bash", "benchmarks/gpu_check.sh", *steps], cwd=ROOT, stdout=f,
                                         stderr=subprocess.STDOUT, env={**env, "OUT": str(tmp_path / f"out{i}")}))
    for steps, r, path in zip(GROUPS, runs, logs):
        r.wait(timeout=1200)
        log = path.read_text()
        assert r.returncode == 0, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        assert [line.split()[1] for line in log.splitlines() if line.startswith("=== ")][:-1] == steps

    def out(name: str) -> Path:  # a figure's file, in the folder of the group that wrote it
        (found,) = tmp_path.glob(f"out*/{name}")
        return found

    default = json.loads(out("throughput_default_fp16.json").read_text())
    runs = [v for k, v in default.items() if k.startswith("e2e") and isinstance(v, dict) and "tiles_per_s" in v]
    assert len(runs) == 2  # one process, then one tile worker with the predict process
    assert default["e2e_same_geojson"] is True  # the same features either way
    assert set(json.loads(out("nms_default.json").read_text())["nms_sweep"]) == {"4096", "matrix"}
    for name in ("throughput_r101_fp16.json", "throughput_default_tta.json", "e2e_default_best.json", "gil.json",
                 "train_speed_r101.json", "e2e_big.json"):
        assert json.loads(out(name).read_text())
    stages = json.loads(out("adapt_record.json").read_text())["stage_seconds"]
    assert {"source", "translate", "pseudo", "train", "report"} <= set(stages)
    for w in (0, 1):
        assert "tiles/s" in out(f"cpu_side_w{w}.txt").read_text()
    prof = json.loads(out("prof_default.json").read_text())["variants"]
    assert set(prof) == {"base", "eager"} and all(v["same_as_base"] == 1.0 for v in prof.values())
    assert "error" not in json.loads(out("prof_r101.json").read_text())["variants"]["base"]
    assert out("trace_default.json.gz").stat().st_size > 0
    graphed, eager = (json.loads(out(f"e2e_graphs{s}.json").read_text())["e2e"] for s in ("", "_off"))
    assert graphed["geojson_sha1"] == eager["geojson_sha1"]
    big, bigtile = (json.loads(out(f"e2e_{n}.json").read_text())["e2e"] for n in ("big", "bigtile"))
    assert (big["tile"], bigtile["tile"]) == (256, 768) and big["tiles"] > bigtile["tiles"] and bigtile["mpx_per_s"] > 0
    batches = json.loads(out("e2e_batches.json").read_text())
    assert {batches[k]["batch"] for k in ("e2e_batch_128", "e2e_batch_256")} == {128, 256}


def test_a_failing_step_fails_the_script(tmp_path):
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "nosuchstep"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "SMOKE": "1", "OUT": str(tmp_path)}, timeout=300)
    assert r.returncode == 1
    assert r.stdout.splitlines()[-1] == "=== failed: nosuchstep"
