"""The segmenter slot: what every nuclei model (classical watershed, PDAM, ...) gives the pipeline.

A segmenter takes a batch of RGB tiles *at its own resolution* (``mpp`` microns per pixel) and returns, for each
tile, a :class:`TileInstances`: an instance label image of the tile's size (0 = background, ``k`` = the k-th
instance, so every pixel belongs to at most one nucleus) and the score of each instance (and, once a run has
measured them, its stain measurements). The stitcher turns those into slide-wide nuclei; it never needs to know
which model produced them.

That is all a segmenter must have (:class:`Segmenter`). What else the pipeline needs to know of one (where it runs,
its checkpoint and settings, for the outputs' provenance and the resume journal) is a :class:`SegmenterInfo`, read
with :func:`describe`; what else a segmenter can *do* is a small protocol each (:class:`Calibrating`,
:class:`ScoreThresholded`, :class:`Augmenting`, :class:`SemanticFusing`, :class:`Ensemble`, :class:`MixedPrecision`,
:class:`Settable`), checked with ``isinstance``. A segmenter with none of them runs with the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

#: the tile side (model pixels) a run uses when neither the options nor the model (:attr:`SegmenterInfo.tile_size`)
#: say otherwise
DEFAULT_TILE = 256


@dataclass
class TileInstances:
    """Instances found in one tile.

    labels: ``(H, W)`` int32, 0 = background, ids ``1..n`` (contiguous); pixels of instance ``k`` are ``labels == k``.
    scores: ``(n,)`` float32, ``scores[k - 1]`` is the confidence of instance ``k`` (1.0 for classical methods).
    stains: ``(n, 3)`` float32 stain measurements of each instance (:func:`wsiseg.wsi.stains.stain_stats`), or
    ``(0, 3)`` where none were made: a segmenter need not fill them; a run does, from the tile's pixels, which
    travel with the instances (``pixels``) from ``predict`` to where the tile is prepared
    (:func:`wsiseg.wsi.stains.with_pixels`, :func:`~wsiseg.wsi.stains.measure`).
    """

    labels: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stains: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    #: the tile's ``(H, W, 3)`` uint8 pixels, kept until the stain measurements are made from them
    #: (:func:`wsiseg.wsi.stains.measure`, where the tile is prepared: in a tile worker when there are some)
    pixels: np.ndarray | None = None
    #: the unsharp mask's width (pixels) the tile was predicted again with because its own nuclei looked out of
    #: focus (:func:`wsiseg.segmenters.focus.tile_sharpening`); 0.0: predicted as it was read
    sharpened: float = 0.0

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

    def subset(self, keep: np.ndarray) -> "TileInstances":
        """The instances where ``keep`` (``(n,)`` bool) holds, relabelled ``1..m`` in their order, with their scores,
        stain measurements and the tile's pixels; ``self`` itself when every one is kept."""
        keep = np.asarray(keep, bool).reshape(-1)
        if keep.all():
            return self
        new = np.zeros(self.count + 1, np.int32)  # old id -> new id (background stays 0)
        new[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        stains = self.stains[keep] if self.stains.shape[0] == self.count else self.stains
        return TileInstances(new[self.labels], self.scores[keep], stains, self.pixels, self.sharpened)

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


@dataclass(frozen=True)
class SegmenterInfo:
    """A segmenter as the pipeline sees it besides ``predict`` (:func:`describe`); the defaults are those of a
    segmenter that says nothing more than :class:`Segmenter` asks.

    name: written into outputs. source: the checkpoint it was loaded from (``None``: none, or built in memory).
    device: where it runs (``"cpu"``, ``"cuda:0"``...; ``""``: no device, a classical model). threshold: a classical
    model's foreground threshold as it is now (``None``: none). min_score: the detections' score threshold
    (``None``: none). tta: test-time views (0: off). semantic_fusion: masks fused with a semantic map.
    precision: the network's reduced arithmetic (``"bf16"``, ``"fp16"``; ``None``: full). member_sources: an
    ensemble's further checkpoints (``None`` for a member built in memory; empty: a single model). tile_size: the tile
    side (model pixels) the model was chosen with, a run's when none is asked for (``None``: :data:`DEFAULT_TILE`).
    nucleus_px: the median diameter (model pixels) of the nuclei it draws on the images it was chosen on, which
    ``--zoom auto`` compares a slide's with (:mod:`wsiseg.wsi.scale`; 0.0: unknown, the slide's own scale).
    """

    name: str
    source: str | None = None
    device: str = ""
    threshold: float | None = None
    min_score: float | None = None
    tta: int = 0
    semantic_fusion: bool = False
    precision: str | None = None
    member_sources: tuple[str | None, ...] = ()
    tile_size: int | None = None
    nucleus_px: float = 0.0


@runtime_checkable
class SelfDescribing(Protocol):
    """A segmenter that describes itself (:func:`describe` asks it)."""

    def info(self) -> SegmenterInfo: ...


@runtime_checkable
class Calibrating(Protocol):
    """A segmenter fitted to each slide before its tiles: ``calibrate(overview)`` gets the slide's RGB overview
    (tissue only, where a tissue mask was found)."""

    def calibrate(self, overview: np.ndarray) -> Any: ...


@runtime_checkable
class ScoreThresholded(Protocol):
    """A segmenter that keeps only detections scoring at least ``min_score`` (0..1), which may be changed."""

    min_score: float


@runtime_checkable
class Augmenting(Protocol):
    """A segmenter with test-time augmentation: ``tta`` views (0: off); its setter raises ValueError for a count
    it cannot do."""

    tta: int


@runtime_checkable
class Sharpening(Protocol):
    """A segmenter that can sharpen its tiles before its network sees them: an unsharp mask of ``sharpen`` px
    (Gaussian sigma, model pixels; 0.0: off), for a slide out of focus; and with ``refocus`` (the tiles' zoom; 0.0:
    off), each tile whose own nuclei look out of focus predicted again, sharpened, for a slide out of focus in parts
    (:mod:`wsiseg.segmenters.focus`)."""

    sharpen: float
    refocus: float


@runtime_checkable
class SemanticFusing(Protocol):
    """A segmenter that can fuse its masks with a semantic map; the setter raises ValueError where it cannot."""

    semantic_fusion: bool


@runtime_checkable
class Ensemble(Protocol):
    """A segmenter that averages further models of its kind, loaded from checkpoints (ValueError for one that does
    not fit)."""

    @property
    def member_sources(self) -> Sequence[str | None]: ...

    def add_member_checkpoint(self, path: str) -> None: ...

    def clear_members(self) -> None: ...


@runtime_checkable
class MixedPrecision(Protocol):
    """A segmenter whose network may run in reduced arithmetic: ``amp`` is ``None`` (full), ``"bf16"`` or
    ``"fp16"``."""

    amp: str | None


@runtime_checkable
class Settable(Protocol):
    """A segmenter that another process can rebuild from its checkpoint (:attr:`SegmenterInfo.source`) and
    ``settings()``, plain data (the predicting process, :mod:`wsiseg.parallel.predict`)."""

    def settings(self) -> dict: ...


def describe(seg: Segmenter) -> SegmenterInfo:
    """What the pipeline needs to know of ``seg`` besides ``predict``: its own :meth:`SelfDescribing.info` where it
    has one, else the defaults with its name. The one place a segmenter's optional parts are looked for."""
    if isinstance(seg, SelfDescribing):
        return seg.info()
    return SegmenterInfo(name=str(getattr(seg, "name", type(seg).__name__)))


def tile_for(seg: Segmenter, asked: int | None = None) -> int:
    """The tile side a run of ``seg`` uses: ``asked`` when given, else the model's own
    (:attr:`SegmenterInfo.tile_size`), else :data:`DEFAULT_TILE`."""
    return int(asked or describe(seg).tile_size or DEFAULT_TILE)


def on_gpu(seg: Segmenter) -> bool:
    """Whether ``seg`` runs on a CUDA device (a classical segmenter has no device: no). The run sizes its batches,
    prefetch and tile workers by it; ``--precision fp16`` needs it."""
    return describe(seg).device.startswith("cuda")


#: most tile pixels of one batch on a CPU when no batch size is given: 16 tiles of the bundled model's own 384 px
#: (a batch's working memory grows with its pixels: docs/speed.md)
CPU_BATCH_PIXELS = 16 * 384 * 384


def default_batch(seg: Segmenter, tile: int = DEFAULT_TILE) -> int:
    """Tiles per batch when none is given: on a CPU 16, or for tiles larger than 384 px as many as hold
    :data:`CPU_BATCH_PIXELS` (at least 1), so that a batch of large tiles needs no more memory; on a GPU 128, or 64
    on a card under 24 GiB (where R101's batch of 128 would not fit), for 256 px tiles, and for larger ``tile`` as
    many as hold the same pixels (a multiple of 8, at least 8). The predictor's Python work per batch hardly grows
    with the batch, and inside a run it waits for the interpreter lock call by call, so larger batches pay on a GPU
    (measured: docs/speed.md)."""
    if not on_gpu(seg):
        return max(1, min(16, CPU_BATCH_PIXELS // (tile * tile)))
    import torch

    dev = torch.device(describe(seg).device)
    n = 128 if torch.cuda.get_device_properties(dev).total_memory >= 24 * 2**30 else 64
    return n if tile <= DEFAULT_TILE else max(8, n * DEFAULT_TILE ** 2 // tile ** 2 // 8 * 8)
