"""Average the weights of checkpoints of one architecture (a "model soup"), e.g. two students fine-tuned from the
same round: ``python scripts/average_weights.py OUT.safetensors A.safetensors B.safetensors [...]``.

The first file's metadata (architecture, config, scale) goes to the output; floating-point tensors are averaged in
float64 and stored in the first file's dtype, other tensors are taken from the first file.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, paths = args[0], args[1:]
    files = [safe_open(p, "pt") for p in paths]
    keys = set(files[0].keys())
    if any(set(f.keys()) != keys for f in files[1:]):
        print("error: the checkpoints hold different tensors (not one architecture)", file=sys.stderr)
        return 1
    res = {}
    for k in sorted(keys):
        first = files[0].get_tensor(k)
        if first.is_floating_point():
            res[k] = (sum(f.get_tensor(k).double() for f in files) / len(files)).to(first.dtype)
        else:
            res[k] = first
    save_file(res, out, metadata=files[0].metadata())
    return 0


if __name__ == "__main__":
    sys.exit(main())
