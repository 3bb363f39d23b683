"""A checkpoint to fine-tune with a larger mask head: a PDAM model's weights, its mask head's layers changed.

    python scripts/grow_mask_head.py OUT.safetensors 32,32,32,32 [--model wsiseg/weights/default.safetensors]

Builds the model of ``--model``'s configuration with ``roi.mask_head_channels`` set to the given widths, copies
every tensor of ``--model`` whose name and shape it still has, and leaves the others (the new layers) as the model
initialises them (seed 0). Fine-tune it with ``wsiseg adapt ... --set train.init=OUT.safetensors --set
"model.roi.mask_head_channels=[...]"`` (docs/precision.md, "A deeper mask head"). Prints what was copied and what
is new.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from wsiseg.models.checkpoint import load_checkpoint, save_checkpoint
from wsiseg.models.config import from_dict, to_dict
from wsiseg.models.pdam import ARCH, PDAMConfig, build_pdam


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("channels", help="the mask head's widths, comma-separated (e.g. 32,32,32,32)")
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "wsiseg/weights/default.safetensors"))
    a = ap.parse_args(argv)
    ck = load_checkpoint(a.model, arch=ARCH)
    cfg = from_dict(PDAMConfig, ck.config)
    cfg.roi.mask_head_channels = [int(c) for c in a.channels.split(",")]
    torch.manual_seed(0)
    model = build_pdam(cfg)
    own = model.state_dict()
    copied = 0
    for k, v in ck.state_dict.items():
        if k in own and own[k].shape == v.shape:
            own[k] = v.float()
            copied += 1
        else:
            print(f"not copied (shape changed): {k}")
    model.load_state_dict(own)
    new = [k for k in own if k not in ck.state_dict and not k.startswith(tuple(ck.excluded))]
    print(f"copied {copied} tensors; new: {', '.join(new) or 'none'}")
    save_checkpoint(a.out, model, config=to_dict(cfg), mpp=ck.mpp, meta=ck.meta, inference_only=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
