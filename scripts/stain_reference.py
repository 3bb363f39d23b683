"""The Kumar train images' stain, as ``wsiseg.adapt.pseudo.KUMAR_HE`` and ``KUMAR_MAX`` hold it.

``python scripts/stain_reference.py [--data ../shared/data/kumar]``: Macenko's haematoxylin and eosin vectors and
the 99th percentile of each stain's amount (torchstain's ``NumpyMacenkoNormalizer.fit``) of the 16 train images'
pixels pooled (every fourth row and column of each; images only, no label is read), printed as the constants and
compared with those in the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from kumar import DEFAULT_DATA, dev_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    from wsiseg.adapt.pseudo import KUMAR_HE, KUMAR_MAX

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"Kumar folder (default {DEFAULT_DATA})")
    a = ap.parse_args(argv)
    pooled = np.concatenate([tifffile.imread(a.data / "images" / f"{n}.tif")[::4, ::4, :3]
                             for n in dev_images(a.data)])
    norm = NumpyMacenkoNormalizer()
    norm.fit(np.ascontiguousarray(pooled), Io=240)
    he, mx = np.round(norm.HERef, 4), np.round(norm.maxCRef, 4)
    print(f"KUMAR_HE = np.array({he.tolist()})\nKUMAR_MAX = np.array({mx.tolist()})")
    same = np.allclose(he, KUMAR_HE, atol=1e-4) and np.allclose(mx, KUMAR_MAX, atol=1e-4)
    print("the package holds these" if same else "the package holds other values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
