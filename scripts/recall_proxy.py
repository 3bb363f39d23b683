"""Does haematoxylin coverage track recall without labels? A probe for ``wsiseg adapt``'s unlabelled report.

``python scripts/recall_proxy.py --models default PATH ... [--min-score S]`` segments the 16 Kumar development
images with each model and prints, per model, the labelled object recall and precision (IoU > 0.5) beside three
label-free candidates: the share of haematoxylin-positive pixels (colour deconvolution, Otsu threshold per image,
one opening) inside detections (*coverage*), the share of detected pixels that are haematoxylin-positive (*purity*),
and the share of haematoxylin blobs of >= 30 px at least half covered by detections (*blobs*). A candidate is useful
only if it moves with recall from model to model; docs/adapt.md says what it showed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kumar.py: the image lists

from kumar import dev_images  # noqa: E402


def haematoxylin_mask(rgb: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    h = rgb2hed(rgb).astype(np.float32)[..., 0]
    return ndi.binary_opening(h > threshold_otsu(h), iterations=1)


def proxies(h: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(coverage, purity, blobs) of a label image against a haematoxylin mask (see the module doc)."""
    from scipy import ndimage as ndi

    fg = labels > 0
    both = int((h & fg).sum())
    blobs, _ = ndi.label(h)
    size = np.bincount(blobs.ravel())
    inside = np.bincount(blobs.ravel(), weights=fg.ravel(), minlength=len(size))
    big = np.nonzero(size[1:] >= 30)[0] + 1
    return (both / max(int(h.sum()), 1), both / max(int(fg.sum()), 1),
            float(np.mean(inside[big] / size[big] >= 0.5)) if len(big) else 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", "watershed"])
    ap.add_argument("--min-score", type=float, default=None, help="PDAM checkpoints: score threshold")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "kumar")
    args = ap.parse_args(argv)
    if not (args.data / "split.csv").is_file():
        print(f"error: {args.data}: no Kumar split.csv here", file=sys.stderr)
        return 3
    import tifffile
    from skimage import io

    from wsiseg.api import load_model, segment_image, set_min_score
    from wsiseg.eval.metrics import evaluate_pair

    ids = dev_images(args.data)
    images = {i: tifffile.imread(args.data / "images" / f"{i}.tif")[..., :3] for i in ids}
    truths = {i: io.imread(args.data / "labels" / f"{i}.png") for i in ids}
    masks = {i: haematoxylin_mask(images[i]) for i in ids}
    print("model | recall | precision | coverage | purity | blobs   (means over the 16 development images)")
    for name in args.models:
        model = load_model(name, "cpu")
        if args.min_score is not None and name != "watershed":
            set_min_score(model, args.min_score)
        rows = []
        for i in ids:
            pred = np.asarray(segment_image(images[i], model=model, mpp=0.25, device="cpu"))
            e = evaluate_pair(pred, truths[i])
            rows.append((e["object_recall"], e["object_precision"], *proxies(masks[i], pred)))
        m = np.mean(rows, axis=0)
        print(f"{name} | " + " | ".join(f"{v:.4f}" for v in m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
