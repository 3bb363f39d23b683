"""The segmenter slot: what every nuclei model (classical watershed, PDAM, ...) gives the pipeline.

A segmenter takes a batch of RGB tiles *at its own resolution* (``mpp`` microns per pixel) and returns, for each
tile, a :class:`TileInstances`: an instance label image of the tile's size (0 = background, ``k`` = the k-th
instance, so every pixel belongs to at most one nucleus) and the score of each instance (and, once a run has
measured them, its stain measurements). The stitcher turns those into slide-wide nuclei; it never needs to know
which model produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class TileInstances:
    """Instances found in one tile.

    labels: ``(H, W)`` int32, 0 = background, ids ``1..n`` (contiguous); pixels of instance ``k`` are ``labels == k``.
    scores: ``(n,)`` float32, ``scores[k - 1]`` is the confidence of instance ``k`` (1.0 for classical methods).
    stains: ``(n, 3)`` float32 stain measurements of each instance (:func:`wsiseg.wsi.stains.stain_stats`), or
    ``(0, 3)`` where none were made: a segmenter need not fill them; a run does, from the tile's pixels, once
    ``predict`` returns (:func:`wsiseg.wsi.stains.with_stains`).
    """

    labels: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stains: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int32)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.stains = np.asarray(self.stains, dtype=np.float32).reshape(-1, 3)
        if self.labels.ndim != 2:
            raise ValueError(f"labels must be 2-D, got shape {self.labels.shape}")

    def stain_row(self, k: int) -> tuple[float, float, float] | None:
        """Instance ``k``'s stain measurements as floats, or ``None`` when the instances have none."""
        if self.stains.shape[0] != self.count or not 1 <= k <= self.count:
            return None
        h, sd, e = self.stains[k - 1].tolist()
        return h, sd, e

    @property
    def count(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "TileInstances":
        return cls(np.zeros(shape, np.int32), np.zeros(0, np.float32))


@runtime_checkable
class Segmenter(Protocol):
    """What the pipeline needs of a model.

    name:  short identifier written into outputs (e.g. ``"watershed"``, ``"pdam-lite"``).
    mpp:   microns per pixel the model works at; the tiler resamples the slide so tiles arrive at this scale.
    max_nucleus_px: the largest nucleus diameter (pixels at ``mpp``) the model is expected to return; the tiler
           needs an overlap larger than this for the stitching guarantee.
    predict(tiles): ``tiles`` is ``(B, H, W, 3)`` uint8 RGB; returns ``B`` :class:`TileInstances`.
    """

    name: str
    mpp: float
    max_nucleus_px: int

    def predict(self, tiles: np.ndarray) -> list[TileInstances]: ...


def on_gpu(seg: Segmenter) -> bool:
    """Whether ``seg`` runs on a CUDA device (a classical segmenter has no device: no). The run sizes its batches,
    prefetch and tile workers by it; ``--precision fp16`` needs it."""
    return str(getattr(seg, "device", "")).startswith("cuda")
