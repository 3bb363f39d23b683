"""wsiseg: nuclei instance segmentation for whole-slide H&E images, adapted without annotations (CyC-PDAM).

The Python API, with the command line's defaults (the bundled ``default`` model)::

    from wsiseg import segment_slide, segment_image, load_model
    segment_slide("slide.svs", geojson="nuclei.geojson", zarr="nuclei.zarr")   # what `wsiseg run` does
    segment_slide("slide.svs", Outputs(geojson="n.geojson"), RunOptions(tta=4))  # the same, as objects
    labels = segment_image(rgb, mpp=0.25)                                      # an in-memory image -> int32 labels

The names are imported on first use, so ``import wsiseg`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core import version as _version

__version__ = _version.__version__  # (defined in wsiseg.core.version: nothing in the package imports the root)

#: name -> the module that defines it
_API = {**{name: "wsiseg.api" for name in ("segment_slide", "segment_image", "image_nuclei", "load_model",
                                           "nuclei_labels", "Nucleus", "BUNDLED_MODELS", "BUILTIN_MODELS")},
        "RunOptions": "wsiseg.options", "Outputs": "wsiseg.options"}
__all__ = sorted(_API)

if TYPE_CHECKING:  # for type checkers and IDEs: the real definitions
    from .api import (BUILTIN_MODELS, BUNDLED_MODELS, Nucleus, image_nuclei, load_model, nuclei_labels,
                      segment_image, segment_slide)
    from .options import Outputs, RunOptions


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'wsiseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
