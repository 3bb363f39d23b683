"""wsiseg: nuclei instance segmentation for whole-slide H&E images, adapted without annotations (CyC-PDAM)."""

__version__ = "0.1.0"
