"""Development set only: detections kept by score x mask confidence**p instead of by score (docs/precision.md).

    python scripts/mask_score_dev.py '{"kind":"score","t":0.85}' '{"kind":"mc","t":0.75}' '{"kind":"mc","t":0.6,"p":3}'

Each rule is JSON: ``kind`` "score" (the box head's score >= t, what ships) or "mc" (score x c**p >= t, c the mean
mask probability over the mask's own pixels, p default 1); the bundled ``default`` predicts from score 0.5 and the
rule picks among its detections before the overlap rule. Prints the 16 development images' mean AJI, object F1,
precision, recall and PQ per rule and writes /tmp/ms/RULE.json (per image).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from skimage import io

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kumar import DEFAULT_DATA, dev_images  # noqa: E402
import wsiseg.segmenters.postprocess as pp  # noqa: E402
from wsiseg.api import RunOptions, configured_model, segment_image  # noqa: E402
from wsiseg.eval.metrics import evaluate_pair  # noqa: E402

OUT = Path("/tmp/ms")
OUT.mkdir(exist_ok=True)
torch.set_num_threads(1)
seg = configured_model(RunOptions(model="default", min_score=0.5))
orig = seg._instances
RULE = {}
def patched(batch, det, probs, fuse):
    if det.boxes.shape[0]:
        m = probs > 0.5
        mc = (probs * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)
        s = det.scores if RULE["kind"] == "score" else det.scores * mc ** RULE.get("p", 1.0)
        keep = s >= RULE["t"]
        det = pp.Detections(det.boxes[keep], det.scores[keep], det.labels[keep], det.image_index[keep])
        probs = probs[keep]
    return orig(batch, det, probs, fuse)
seg._instances = patched
rules = [json.loads(r) for r in sys.argv[1:]]
imgs = dev_images(DEFAULT_DATA)
data = {i: (tifffile.imread(DEFAULT_DATA / "images" / f"{i}.tif")[..., :3],
            io.imread(DEFAULT_DATA / "labels" / f"{i}.png")) for i in imgs}
for r in rules:
    RULE.clear(); RULE.update(r)
    t0 = time.time(); rows = []
    for i in imgs:
        img, truth = data[i]
        pred = np.asarray(segment_image(img, model=seg, mpp=0.25, device="cpu"))
        rows.append({"name": i, **evaluate_pair(pred, truth)})
    out = {"rule": r, "rows": rows, "mean": {k: float(np.mean([x[k] for x in rows]))
                                             for k in ("aji", "object_f1", "object_precision", "object_recall", "pq")}}
    name = "_".join(f"{k}{v}" for k, v in r.items())
    (OUT / f"{name}.json").write_text(json.dumps(out))
    print(name, {k: round(v, 4) for k, v in out["mean"].items()}, f"{time.time() - t0:.0f}s", flush=True)
