"""Segmenters: a batch of tiles -> their instances (the PDAM Mask R-CNN, the classical watershed)."""
