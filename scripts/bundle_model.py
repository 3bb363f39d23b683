"""Export a trained checkpoint as a bundled model: fp16, without the training-only discriminators (<= 25 MB), its
detection threshold set, the recipe that produced it in its metadata.

    python scripts/bundle_model.py runs/x/round2.safetensors wsiseg/weights/NAME.safetensors \\
        --min-score 0.5 --recipe runs/x/recipe.txt --reproduce "how to train it again"

``--proposals N`` sets the region proposals the model keeps per tile at inference (the RPN's post-NMS top N),
``--tile-size T`` the tile side ``wsiseg run`` uses for it, ``--nucleus-px D`` its own nucleus size (``wsiseg run
--zoom auto``; measured by ``scripts/nucleus_size.py``); a bundle given as ``src`` keeps its metadata (the bundled
``default`` was re-bundled so: docs/speed.md, docs/precision.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="checkpoint written by wsiseg adapt / the trainer")
    ap.add_argument("dst", help="the bundled file to write")
    ap.add_argument("--min-score", type=float, default=0.5, help="the model's detection threshold (default 0.5)")
    ap.add_argument("--recipe", type=Path, default=None, help="a file of the commands that trained it, one a line")
    ap.add_argument("--reproduce", default="", help="one line: how to train it again")
    ap.add_argument("--proposals", type=int, default=None,
                    help="region proposals kept per tile at inference (default: the checkpoint's own)")
    ap.add_argument("--tile-size", type=int, default=None,
                    help="the tile side (px at the model's scale) wsiseg run uses for it (default: the checkpoint's)")
    ap.add_argument("--nucleus-px", type=float, default=None,
                    help="the median diameter (px at the model's scale) of the nuclei it draws on the images it was "
                         "chosen on, for wsiseg run --zoom auto (scripts/nucleus_size.py; default: the checkpoint's)")
    a = ap.parse_args(argv)

    from wsiseg.models.checkpoint import load_checkpoint, load_pdam, save_checkpoint
    from wsiseg.models.config import to_dict

    ck = load_checkpoint(a.src)
    model, cfg = load_pdam(a.src)
    cfg.roi.score_thresh = a.min_score
    if a.proposals is not None:
        cfg.rpn.post_nms_top_n_test = a.proposals
    if a.tile_size is not None:
        cfg.tile_size = a.tile_size
    if a.nucleus_px is not None:
        cfg.nucleus_px = a.nucleus_px
    cfg.validate()
    meta = dict(ck.meta) if "bundled_from" in ck.meta else dict(ck.meta, bundled_from=str(a.src))
    if a.recipe is not None:
        meta["recipe"] = a.recipe.read_text().splitlines()
    if a.reproduce:
        meta["reproduce"] = a.reproduce
    if a.proposals is not None:
        meta["proposals"] = f"{a.proposals} region proposals per tile at inference (--proposals)"
    if a.tile_size is not None:
        meta["tile_size"] = f"{a.tile_size} px inference tiles (--tile-size)"
    if a.nucleus_px is not None:
        meta["nucleus_px"] = (f"its nuclei are {a.nucleus_px} px across (median) on the images it was chosen on "
                              "(scripts/nucleus_size.py; --nucleus-px)")
    save_checkpoint(a.dst, model, config=to_dict(cfg), mpp=ck.mpp, meta=meta, half=True, inference_only=True)
    print("bundled:", a.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
