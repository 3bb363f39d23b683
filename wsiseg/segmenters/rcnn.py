"""The PDAM segmenter: batched Mask R-CNN inference over tiles, with all post-processing vectorised on the device.

:class:`PDAMSegmenter` wraps any torchvision ``MaskRCNN`` (the PDAM model included: it is one, with extra training-
only branches) in the pipeline's :class:`~wsiseg.segmenters.base.Segmenter` interface.

- ``fast=True`` (default): runs ``model.backbone``, the RPN head, the RoI box head and the mask head on the whole
  batch, and replaces torchvision's per-image post-processing and per-instance mask pasting by the batched tensor
  code of :mod:`wsiseg.segmenters.postprocess`.
- ``fast=False``: the simple path, the reference: the model's own eval stages (torchvision's box post-processing;
  each mask pasted per instance where it was learnt, :func:`~wsiseg.segmenters.postprocess.stock_predict`), masks
  thresholded at 0.5, and the same overlap rule in plain per-instance code.

Both return, per tile, a label image (0 background, instances ``1..n`` in decreasing score order, every pixel at
most one instance) and the instance scores; on the same weights and inputs they give the same instances (masks
equal up to float rounding of pixels whose probability sits on the 0.5 threshold).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers

from wsiseg.segmenters import postprocess as pp
from wsiseg.segmenters.base import DEFAULT_TILE, SegmenterInfo, TileInstances
from wsiseg.core.runtime import resolve_device  # noqa: F401  (also this module's name for it)
from wsiseg.models.roi_pool import pool_rois_rows, rois_at, rows_apply

MASK_THRESHOLD = 0.5
#: the unsharp mask's amount (:func:`unsharp`): the tile plus this many times its detail finer than the blur (1 and 2
#: tried on the development images blurred by 4 px, each sharpened by the blur its nuclei's edges showed: AJI +0.059
#: and +0.089 over none; docs/precision.md, "Out of focus")
SHARPEN_AMOUNT = 2.0


@dataclass(frozen=True)
class PredictorOptions:
    """How :class:`PDAMSegmenter` runs a model (each field is described in its docstring); plain data, so that another
    process can build the same predictor (:meth:`PDAMSegmenter.settings`)."""

    amp: str | None = None
    fast: bool = True
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = True
    mask_threshold: float = MASK_THRESHOLD
    max_cover: float = pp.MAX_COVER
    nms_chunk: int | None = None
    nms_method: str | None = None
    tta: bool | int = False
    semantic_fusion: bool = False
    sharpen: float = 0.0
    refocus: float = 0.0


class PDAMSegmenter:
    """A torchvision Mask R-CNN (e.g. PDAM) as a :class:`~wsiseg.segmenters.base.Segmenter`.

    ``model``: a ``torchvision.models.detection.MaskRCNN`` (moved to ``device`` and put in eval mode).
    ``mpp`` / ``max_nucleus_px``: the model's scale and largest nucleus, for the tiler; :attr:`tile_size`: the tile
    side a run uses for it when none is asked for (a checkpoint's ``tile_size``; 256 for a module);
    :attr:`nucleus_px`: the median diameter of the nuclei it draws on the images it was chosen on (a checkpoint's;
    0.0, unknown, for a module), for ``--zoom auto`` (:mod:`wsiseg.wsi.scale`).
    ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``... The options, a :class:`PredictorOptions` (or its fields given by
    name, which override it): ``amp``: ``None``, ``"fp16"`` or ``"bf16"`` autocast for the
    network (on the CPU bf16 only: fp16 is ignored there); post-processing always runs in float32.
    ``fast``: the vectorised path (default) or the simple reference path. ``channels_last``: convert the model and
    inputs on CUDA. ``compile``: ``torch.compile`` the backbone (off by default). ``cuda_graphs``: on CUDA, the
    backbone + FPN replayed as a CUDA graph per batch shape (:class:`_GraphedBackbone`; on by default, same features).
    ``mask_threshold``: probability above which a pasted mask pixel is foreground.
    ``nms_chunk`` / ``nms_method``: how the fast path's NMS runs (:func:`wsiseg.segmenters.postprocess.grouped_nms`:
    ``"matrix"``, the CUDA default, or ``"sequential"`` ``nms`` calls of at most ``nms_chunk`` boxes, the CPU
    default); the kept boxes are the same either way.
    ``tta``: test-time augmentation (fast path): ``True`` or 4: the backbone also sees each tile mirrored
    left-right, top-bottom and both (8: and the four transposed, for square tiles); proposals come from the tile
    itself; the box head classifies and refines every proposal in every view (its class probabilities and boxes,
    mapped back, are averaged before NMS) and the mask head predicts every detection in every view (probabilities
    mapped back and averaged). About 4x (8x) the work of the heads and backbone.
    ``semantic_fusion`` (fast path, models with PDAM's semantic branch): each detection's pasted mask probability
    is averaged, on the detection's own pixels, with the semantic branch's foreground probability before the 0.5
    threshold (with ``tta``, the semantic map averaged over the views too); about 10% more work on a CPU.
    ``sharpen``: each tile sharpened before the network sees it, by an unsharp mask of a Gaussian of this many pixels
    (:func:`unsharp`; 0.0, the default: as it is), for a slide out of focus (:mod:`wsiseg.segmenters.focus` chooses it).
    ``refocus``: 0.0 (the default: off), or the zoom the tiles are shown at: each tile not sharpened whose own nuclei
    say it is out of focus (:func:`~wsiseg.segmenters.focus.tile_sharpening`) is predicted again, sharpened by the
    blur they show (:attr:`TileInstances.sharpened <wsiseg.segmenters.base.TileInstances.sharpened>`), for a slide
    out of focus in parts.
    ``members``: further models of the same kind (an ensemble): each sees every view too, and their box-head
    outputs, masks and semantic maps are averaged with this model's, as the views' are; proposals come from this
    model's RPN and its ``min_score`` decides. About ``1 + len(members)`` times the work (:meth:`add_member`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mpp: float,
        max_nucleus_px: int,
        device: str | torch.device = "auto",
        options: PredictorOptions | None = None,
        *,
        name: str = "pdam",
        members: tuple[torch.nn.Module, ...] = (),
        **option_values,
    ) -> None:
        """``options``, and any of its fields given by name (``fast=False``, ``tta=4``...), which override it."""
        unknown = set(option_values) - {f.name for f in fields(PredictorOptions)}
        if unknown:
            raise TypeError(f"PDAMSegmenter got unexpected option(s): {', '.join(sorted(unknown))}")
        o = replace(options or PredictorOptions(), **option_values)
        amp, fast, compile = o.amp, o.fast, o.compile
        if amp not in (None, "fp16", "bf16"):
            raise ValueError(f"amp must be None, 'fp16' or 'bf16', got {amp!r}")
        self.name = name
        self.mpp = float(mpp)
        self.max_nucleus_px = int(max_nucleus_px)
        self.tile_size = DEFAULT_TILE
        self.nucleus_px = 0.0
        self.device = resolve_device(device)
        self.amp = amp if self.device.type == "cuda" or amp == "bf16" else None
        self.fast = fast
        self.mask_threshold = o.mask_threshold
        self.max_cover = o.max_cover
        #: most boxes one ``nms`` call gets (:func:`wsiseg.segmenters.postprocess.grouped_nms`; same result for any)
        self.nms_chunk = o.nms_chunk or pp.default_nms_chunk(self.device)
        #: ``"matrix"`` or ``"sequential"`` NMS (:func:`wsiseg.segmenters.postprocess.grouped_nms`; same result)
        self.nms_method = o.nms_method or pp.default_nms_method(self.device)
        self.channels_last = o.channels_last and self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._compiled = bool(compile)
        self.cuda_graphs = bool(o.cuda_graphs) and self.device.type == "cuda"
        self._nets = [self._net(self.model)]
        #: the checkpoints of the ensemble's members (:meth:`add_member_checkpoint`; None: added as a module), so
        #: that another process loads them too
        self.member_sources: list[str | None] = []
        for member in members:
            self.add_member(member)
        self.tta = o.tta
        self.semantic_fusion = o.semantic_fusion
        self.sharpen = float(o.sharpen)
        self.refocus = float(o.refocus)
        self._cache: dict = {}
        #: seconds spent per stage by the last fast ``predict`` call, filled only when ``self.profile`` is True
        self.profile = False
        self.timings: dict[str, float] = {}
        #: the clock of those timings (e.g. ``time.process_time`` for CPU seconds on a shared machine)
        self.clock = None
        #: the checkpoint this segmenter was loaded from (:meth:`from_checkpoint`), so that another process can load
        #: the same model (:mod:`wsiseg.parallel.predict`); None when built from a module
        self.source: str | None = None

    @property
    def tta(self) -> int:
        """Test-time augmentation: 0 (off), 4 (the tile and its three mirror images) or 8 (and their transposes).
        Set ``True`` for 4, ``False``/0/1 for off; ValueError for other counts or on the simple path."""
        return self._tta

    @tta.setter
    def tta(self, views: bool | int) -> None:
        n = 4 if views is True else int(views or 0)
        if n not in (0, 1, 4, 8):
            raise ValueError(f"test-time augmentation takes 4 or 8 views, got {views}")
        if n > 1 and not self.fast:
            raise ValueError("test-time augmentation (tta) is a feature of the fast path")
        self._tta = n if n > 1 else 0

    @property
    def semantic_fusion(self) -> bool:
        """Each pasted mask's probability averaged with the semantic branch's foreground probability. ValueError
        when set on the simple path or for a model without PDAM's semantic branch."""
        return self._semantic_fusion

    @semantic_fusion.setter
    def semantic_fusion(self, on: bool) -> None:
        if on and not self.fast:
            raise ValueError("semantic fusion is a feature of the fast path")
        if on and not all(hasattr(net.model, "semantic_logits") for net in self._nets):
            raise ValueError("semantic fusion needs a model with PDAM's semantic branch")
        self._semantic_fusion = bool(on)

    @property
    def min_score(self) -> float:
        """The detections' score threshold (0..1): the RoI heads keep only detections scoring above it."""
        return float(self.model.roi_heads.score_thresh)

    @min_score.setter
    def min_score(self, value: float) -> None:
        self.model.roi_heads.score_thresh = value

    def info(self) -> SegmenterInfo:
        """This segmenter as the pipeline sees it (:func:`wsiseg.segmenters.base.describe`), as it is now."""
        return SegmenterInfo(name=self.name, source=self.source, device=str(self.device), min_score=self.min_score,
                             tta=self.tta, semantic_fusion=self.semantic_fusion, precision=self.amp,
                             member_sources=tuple(self.member_sources), tile_size=self.tile_size,
                             nucleus_px=self.nucleus_px)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", members: tuple[str, ...] = (),
                        **kwargs) -> "PDAMSegmenter":
        """Load a checkpoint written by the trainer (``wsiseg.models.checkpoint.load_pdam``); ``members``: further
        checkpoints, an ensemble with it (:meth:`add_member`)."""
        from wsiseg.models.checkpoint import load_pdam  # lazy: heavy, and optional for classical segmenters

        dev = resolve_device(device)
        model, cfg = load_pdam(path, dev)
        kwargs.setdefault("name", str(getattr(cfg, "name", "pdam")))
        seg = cls(model, mpp=cfg.mpp, max_nucleus_px=cfg.max_nucleus_px, device=dev, **kwargs)
        seg.source = str(path)
        seg.tile_size = int(cfg.tile_size)
        seg.nucleus_px = float(cfg.nucleus_px)
        for m in members:
            seg.add_member_checkpoint(m)
        return seg

    @classmethod
    def from_settings(cls, path: str | Path, device: str, settings: dict) -> "PDAMSegmenter":
        """The segmenter whose :meth:`settings` these are, its model loaded again from ``path`` (its
        :attr:`source`) onto ``device``: it predicts as that one did (another process's copy,
        :mod:`wsiseg.parallel.predict`)."""
        st = dict(settings)
        min_score, tile_size = st.pop("min_score"), st.pop("tile_size")
        seg = cls.from_checkpoint(path, device=device, **st)
        seg.min_score = min_score
        seg.tile_size = int(tile_size)
        return seg

    def add_member(self, model: torch.nn.Module) -> None:
        """Add a model to the ensemble (see the class docstring). It must take the same input (normalisation,
        resizing) and have the same classes as this one (ValueError else); it moves to this segmenter's device."""
        tr, mt = self.model.transform, model.transform
        same_input = (list(tr.image_mean), list(tr.image_std), tr.size_divisible) == \
            (list(mt.image_mean), list(mt.image_std), mt.size_divisible) and type(tr) is type(mt)
        if not same_input:
            raise ValueError("an ensemble member must normalise and resize its input as the first model does")
        if model.roi_heads.box_predictor.cls_score.out_features != \
                self.model.roi_heads.box_predictor.cls_score.out_features:
            raise ValueError("an ensemble member must have the first model's classes")
        if not self.fast:
            raise ValueError("an ensemble is a feature of the fast path")
        model = model.to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if getattr(self, "_semantic_fusion", False) and not hasattr(model, "semantic_logits"):
            raise ValueError("semantic fusion needs every ensemble member to have PDAM's semantic branch")
        self._nets.append(self._net(model))
        self.member_sources.append(None)

    def _net(self, model: torch.nn.Module) -> "_Net":
        """``model`` (on this segmenter's device) as a :class:`_Net`; on the CPU its modules made those that take the
        faster bfloat16 routes first (:func:`_use_cpu_bf16_modules`)."""
        if self.device.type == "cpu":
            _use_cpu_bf16_modules(model)
        return _Net(model, self._compiled, _GraphedBackbone(model.backbone) if self.cuda_graphs else None)

    def add_member_checkpoint(self, path: str | Path) -> None:
        """:meth:`add_member` of a checkpoint written by the trainer, at the model's scale (ValueError else)."""
        from wsiseg.models.checkpoint import load_pdam

        model, cfg = load_pdam(path, self.device)
        if abs(float(cfg.mpp) - self.mpp) > 1e-6:
            raise ValueError(f"{path}: an ensemble member must work at the first model's scale "
                             f"({cfg.mpp} vs {self.mpp} um/px)")
        self.add_member(model)
        self.member_sources[-1] = str(path)

    def clear_members(self) -> None:
        """Back to a single model: the ensemble's members are dropped."""
        del self._nets[1:]
        self.member_sources = []

    @property
    def members(self) -> int:
        """How many models the ensemble has besides the first (0: a single model)."""
        return len(self._nets) - 1

    @property
    def options(self) -> PredictorOptions:
        """The :class:`PredictorOptions` this segmenter runs with now (attributes such as ``tta`` may be changed)."""
        return PredictorOptions(amp=self.amp, fast=self.fast, channels_last=self.channels_last,
                                compile=self._compiled, cuda_graphs=self.cuda_graphs,
                                mask_threshold=self.mask_threshold, max_cover=self.max_cover,
                                nms_chunk=self.nms_chunk, nms_method=self.nms_method, tta=self.tta,
                                semantic_fusion=self.semantic_fusion, sharpen=self.sharpen,
                                refocus=self.refocus)

    def settings(self) -> dict:
        """What :meth:`from_checkpoint` of :attr:`source` needs, besides the device, to give a segmenter that predicts
        as this one does: its :attr:`options` as they are now, its name, its members, ``min_score`` (the
        detections' threshold, which ``wsiseg.api.set_min_score`` may have changed) and :attr:`tile_size` (which
        sets how many proposals and detections a larger tile gets). Plain data (JSON)."""
        return {"name": self.name, **asdict(self.options), "members": list(self.member_sources),
                "min_score": self.min_score, "tile_size": self.tile_size}

    # ------------------------------------------------------------------ helpers
    def backbone_features(self, tiles: np.ndarray) -> dict[str, torch.Tensor]:
        """The backbone+FPN features of ``tiles`` (``(B, H, W, 3)`` uint8), computed as :meth:`predict` computes
        them (device, arithmetic, normalisation) and no further: the ceiling a predictor's speed is measured
        against (``benchmarks/throughput.py``)."""
        with torch.inference_mode(), self._autocast():
            images, _ = self._prepare(self._to_device(tiles))
            return self._nets[0].backbone(images.tensors)

    def stock_predict(self, tiles: np.ndarray) -> list[dict[str, torch.Tensor]]:
        """torchvision's own Mask R-CNN forward of ``tiles`` (its transform, heads and post-processing), on this
        segmenter's device and arithmetic: the reference the fast path is timed against."""
        with torch.inference_mode(), self._autocast():
            return self.model(list(self._to_device(tiles)))

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _to_device(self, tiles: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) in 0..1 on the device (sharpened by :attr:`sharpen`)."""
        t = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return unsharp(t.permute(0, 3, 1, 2).float().div_(255.0), self.sharpen)

    def _mark(self, stage: str, t0: list[float]) -> None:
        if self.profile:
            import time

            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = (self.clock or time.perf_counter)()
            self.timings[stage] = self.timings.get(stage, 0.0) + now - t0[0]
            t0[0] = now

    def _prepare(self, x: torch.Tensor) -> tuple[ImageList, tuple[int, int]]:
        """The model's ``GeneralizedRCNNTransform`` (normalise, resize, pad) done on the whole batch at once."""
        tr = self.model.transform
        mean = torch.as_tensor(tr.image_mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.as_tensor(tr.image_std, dtype=x.dtype, device=x.device)[:, None, None]
        x = (x - mean) / std
        h, w = x.shape[-2:]
        size = self._resized_size(h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        div = tr.size_divisible
        ph, pw = -size[0] % div, -size[1] % div
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return ImageList(x, [size] * x.shape[0]), size

    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        """The size the model's transform resizes an ``h x w`` image to (asked of its own ``resize`` once, so
        subclasses such as PDAM's no-resize transform are honoured); cached per input size."""
        key = ("resize", h, w)
        if key not in self._cache:
            probe, _ = self.model.transform.resize(torch.zeros(3, h, w))
            self._cache[key] = (int(probe.shape[-2]), int(probe.shape[-1]))
        return self._cache[key]

    def _anchors(self, images: ImageList, feats: list[torch.Tensor]) -> torch.Tensor:
        key = (tuple(images.tensors.shape[-2:]), tuple(tuple(f.shape[-2:]) for f in feats), self.device)
        a = self._cache.get(key)
        if a is None:
            one = ImageList(images.tensors[:1], images.image_sizes[:1])
            a = self.model.rpn.anchor_generator(one, [f[:1].float() for f in feats])[0]
            self._cache[key] = a
        return a

    # ------------------------------------------------------------------ predict
    def predict(self, tiles: np.ndarray) -> list[TileInstances]:
        """Segment a batch of RGB tiles ``(B, H, W, 3)`` uint8; returns ``B`` :class:`TileInstances`."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (B, H, W, 3) uint8, got {tiles.shape} {tiles.dtype}")
        if tiles.shape[0] == 0:
            return []
        with torch.inference_mode():
            result = self._predict_fast(tiles) if self.fast else self._predict_simple(tiles)
        if self.refocus and not self.sharpen:
            self._refocused(tiles, result)
        return result

    def _refocused(self, tiles: np.ndarray, result: list[TileInstances]) -> None:
        """Each tile of ``result`` whose own nuclei look out of focus predicted again, sharpened (:attr:`refocus`),
        one at a time: each tile's width is its own."""
        from .focus import tile_sharpening

        for k, inst in enumerate(result):
            px = tile_sharpening(tiles[k], inst.labels, self.refocus)
            if px:
                self.sharpen = px  # (so predict sharpens this tile and checks it no further)
                try:
                    again = self.predict(tiles[k:k + 1])[0]
                finally:
                    self.sharpen = 0.0
                again.sharpened = px
                result[k] = again

    def _predict_simple(self, tiles: np.ndarray) -> list[TileInstances]:
        x = self._to_device(tiles)
        with self._autocast(), _scaled_counts(self.model, pp.cap_scale(tiles.shape[1:3], self.tile_size)):
            outs = pp.stock_predict(self.model, list(x))
        result = []
        for o in outs:
            masks = (o["masks"][:, 0].float() > self.mask_threshold).cpu().numpy()
            labels, scores = pp.resolve_overlaps_reference(masks, o["scores"].float().cpu().numpy(), self.max_cover)
            result.append(TileInstances(labels, scores))
        return result

    def _predict_fast(self, tiles: np.ndarray) -> list[TileInstances]:
        """The fast path as stages, on the whole batch: features, proposals, detections, masks, the semantic map (for
        fusion) and the instances (masks pasted, overlaps resolved)."""
        batch = self._features(tiles)
        proposals = self._proposals(batch)
        det = self._detections(batch, proposals)
        probs = self._masks(batch, det)
        fuse = self._semantic(batch, det)
        return self._instances(batch, det, probs, fuse)

    def _features(self, tiles: np.ndarray) -> "_Batch":
        """Every model's backbone + FPN on the tiles in every view (views after the tiles: image ``a * B + i`` is
        tile ``i`` in view ``a``)."""
        import time

        b, h0, w0 = tiles.shape[:3]
        t0 = [(self.clock or time.perf_counter)()]
        x = self._to_device(tiles)
        views = pp.tta_views(self.tta or 1, square=h0 == w0)
        if len(views) > 1:
            x = torch.cat([pp.view_images(x, v) for v in views])
        with self._autocast():
            images, size = self._prepare(x)
            feats = [net.backbone(images.tensors) for net in self._nets]
        self._mark("backbone", t0)
        return _Batch(b, (h0, w0), size, views, images, feats, t0, [{} for _ in self._nets])

    def _proposals(self, batch: "_Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """The first model's RPN on the tiles themselves (not the other views): ``(boxes (P, 4), image_index (P,))``."""
        rpn, b = self.model.rpn, batch.b
        feat_list = [f[:b] for f in batch.feats[0].values()]
        images = ImageList(batch.images.tensors[:b], batch.images.image_sizes[:b])
        with self._autocast():
            obj, deltas, num_per_level = self._nets[0].rpn_head(feat_list)
        anchors = self._anchors(images, feat_list)
        settings = pp.ProposalSettings.of(rpn).scaled(pp.cap_scale(batch.tile_size, self.tile_size))
        out = pp.select_proposals(obj.view(b, -1), pp.EncodedBoxes(deltas.view(b, -1, 4), anchors, rpn.box_coder),
                                  num_per_level, batch.size, settings, self._nms_options())
        self._mark("rpn", batch.t0)
        return out

    def _detections(self, batch: "_Batch", proposals: tuple[torch.Tensor, torch.Tensor]) -> pp.Detections:
        """The box head of every model on every proposal in every view; with several passes (views, models) each
        pass's boxes are decoded from its own proposals, mapped back and averaged before NMS."""
        roi, size = self.model.roi_heads, batch.size
        prop_boxes, prop_img = proposals
        with self._autocast():
            pooled = batch.pooled(self._nets, "box_roi_pool", prop_boxes, prop_img)
            outs = [net.roi.box_predictor(net.box_head(x)) for net, x in zip(self._nets, pooled)]
            class_logits, box_reg = torch.cat([c for c, _ in outs]), torch.cat([r for _, r in outs])
        decoded = None
        passes = batch.pass_views(len(self._nets))
        if len(passes) > 1:
            n_p = prop_boxes.shape[0]
            dec = [pp.decode_detections(class_logits[a * n_p:(a + 1) * n_p], box_reg[a * n_p:(a + 1) * n_p],
                                        pp.view_boxes(prop_boxes, v, size), size[::-1] if v[0] else size,
                                        roi.box_coder)
                   for a, v in enumerate(passes)]
            decoded = (torch.stack([pp.view_boxes(bx, v, size, inverse=True)
                                    for (bx, _), v in zip(dec, passes)]).mean(0),
                       torch.stack([pr for _, pr in dec]).mean(0))
        settings = pp.DetectionSettings.of(roi).scaled(pp.cap_scale(batch.tile_size, self.tile_size))
        det = pp.select_detections(class_logits, box_reg, proposals, batch.b, size, settings, self._nms_options(),
                                   decoded=decoded)
        self._mark("roi_box", batch.t0)
        return det

    def _masks(self, batch: "_Batch", det: pp.Detections) -> torch.Tensor:
        """Mask probabilities ``(N, M, M)`` of the detections: every model in every view, mapped back onto the
        detection's box and averaged."""
        n = det.boxes.shape[0]
        if n == 0:
            self._mark("mask_head", batch.t0)
            return torch.zeros(0, 28, 28, device=self.device)
        with self._autocast():
            pooled = batch.pooled(self._nets, "mask_roi_pool", det.boxes, det.image_index)
            labels = det.labels.repeat(len(batch.views))
            mask_logits = torch.cat([net.mask_logits(net.mask_head(x), labels) for net, x in zip(self._nets, pooled)])
        probs = mask_logits.float().sigmoid()
        passes = batch.pass_views(len(self._nets))
        if len(passes) > 1:
            probs = probs.view(len(passes), n, *probs.shape[1:])
            probs = torch.stack([pp.unview_masks(p, v) for p, v in zip(probs, passes)]).mean(0)
        self._mark("mask_head", batch.t0)
        return probs

    def _semantic(self, batch: "_Batch", det: pp.Detections) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With semantic fusion: the semantic branch's foreground probability at tile resolution (the models' and
        views' maps averaged: mapping a view back is linear) and the detections' image index; else None."""
        if not self.semantic_fusion or det.boxes.shape[0] == 0:
            return None
        b, size, views = batch.b, batch.size, batch.views
        with self._autocast():
            sem = torch.stack([net.model.semantic_logits(f, batch.images.tensors.shape[-2:]).float().softmax(1)[:, 1]
                               for net, f in zip(self._nets, batch.feats)]).mean(0)
        sem = sem[:, :size[0], :size[1]]
        if len(views) > 1:
            sem = torch.stack([pp.unview_masks(sv, v)
                               for sv, v in zip(sem.view(len(views), b, *sem.shape[1:]), views)]).mean(0)
        if size != batch.tile_size:
            sem = F.interpolate(sem[:, None], size=batch.tile_size, mode="bilinear", align_corners=False)[:, 0]
        return sem, det.image_index

    def _instances(self, batch: "_Batch", det: pp.Detections, probs: torch.Tensor,
                   fuse: tuple[torch.Tensor, torch.Tensor] | None) -> list[TileInstances]:
        """Each mask pasted where it was learnt, in tile coordinates, thresholded, and the overlaps resolved into one
        label image per tile."""
        b, (h0, w0), size = batch.b, batch.tile_size, batch.size
        sx, sy = pp.mask_frame_offset(batch.views)
        boxes = det.boxes + torch.tensor([sx, sy, sx, sy], device=det.boxes.device)
        if size != (h0, w0):  # back to tile coordinates, as GeneralizedRCNNTransform.postprocess does
            ratio = torch.tensor([w0 / size[1], h0 / size[0]] * 2, device=self.device, dtype=torch.float32)
            boxes = boxes * ratio
        windows, origins = pp.paste_masks(probs, boxes, (h0, w0), self.mask_threshold, fuse=fuse)
        labels, keep = pp.resolve_overlaps(windows, origins, det.image_index, b, (h0, w0), self.max_cover)
        labels_np = _to_host(labels)
        kept_img = det.image_index[keep].cpu().numpy()
        kept_scores = det.scores[keep].cpu().numpy()
        self._mark("postprocess", batch.t0)
        bounds = np.searchsorted(kept_img, np.arange(b + 1))
        return [TileInstances(labels_np[i], kept_scores[bounds[i] : bounds[i + 1]]) for i in range(b)]

    def _nms_options(self) -> pp.NMSOptions:
        return pp.NMSOptions(self.nms_chunk, self.nms_method)


@dataclass
class _Batch:
    """What the fast path's stages share about one batch: ``b`` tiles of ``tile_size``, resized to ``size`` for the
    network, seen in ``views``; the (normalised, padded) images of every view and each model's features; ``t0``: the
    profiling clock; ``dense``: per model, the feature levels made contiguous (see :func:`_pool`)."""

    b: int
    tile_size: tuple[int, int]
    size: tuple[int, int]
    views: list
    images: ImageList
    feats: list[dict]
    t0: list[float]
    dense: list[dict]

    def pass_views(self, models: int) -> list:
        """The view of each pass, model-major: pass ``a`` is model ``a // len(views)`` under ``views[a % len]``."""
        return [v for _ in range(models) for v in self.views]

    def pooled(self, nets: list["_Net"], pooler: str, boxes: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        """Each model's ``pooler`` (``"box_roi_pool"`` or ``"mask_roi_pool"``) output for ``boxes`` of the tiles
        (``image``: their tile index, sorted), mapped into every view."""
        views = self.views  # (view-major, as the images of every view follow the tiles)
        in_views = torch.cat([pp.view_boxes(boxes, v, self.size) for v in views]) if len(views) > 1 else \
            pp.view_boxes(boxes, views[0], self.size)
        index = torch.cat([image + a * self.b for a in range(len(views))]) if len(views) > 1 else image
        shapes = [self.size] * (self.b * len(views))
        return [_pool(getattr(net.roi, pooler), f, in_views, index, shapes, d)
                for net, f, d in zip(nets, self.feats, self.dense)]


class _Net:
    """One model of the fast path, with its heads wrapped for speed: the backbone (``torch.compile``d when asked),
    the box head, the mask head and the mask logits of :func:`_box_head_fn`, :func:`_mask_head_fn` and
    :func:`_mask_logits_fn`."""

    def __init__(self, model: torch.nn.Module, compile: bool = False, backbone=None) -> None:
        self.model = model
        self.roi = model.roi_heads
        self.backbone = backbone or (torch.compile(model.backbone, dynamic=False) if compile else model.backbone)
        self.rpn_head = _rpn_head_fn(model.rpn.head)
        self.box_head = _box_head_fn(self.roi.box_head)
        self.mask_head = _mask_head_fn(self.roi.mask_head)
        self.mask_logits = _mask_logits_fn(self.roi.mask_predictor)


class _SignReLU(torch.nn.ReLU):
    """``nn.ReLU`` that, in place on a bfloat16 CPU tensor under inference mode, zeroes the negative values through
    their int16 view (the sign bit): this torch's bfloat16 ``relu_`` is not vectorised on the CPU, and the ReLUs
    after the backbone's GroupNorms cost about a tenth of a bfloat16 prediction (docs/speed.md). The same values,
    but for the sign of a zero (-0 becomes +0, which no sum or GroupNorm after it tells apart). Otherwise
    ``nn.ReLU`` itself (float32, a GPU, training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _relu_(x) if self.inplace and torch.is_inference_mode_enabled() else super().forward(x)


def unsharp(x: torch.Tensor, sigma: float, amount: float = SHARPEN_AMOUNT) -> torch.Tensor:
    """``x`` (a float tensor ``(B, C, H, W)`` in 0..1) sharpened by an unsharp mask: ``x + amount (x - G x)``, ``G`` a
    Gaussian of ``sigma`` px (separable, mirrored at the borders), clipped to 0..1. ``sigma`` 0: ``x`` itself."""
    if sigma <= 0:
        return x
    r = max(1, int(np.ceil(3 * sigma)))  # (3 sigma; a tile narrower than that mirrors what it has)
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    if x.device.type == "cpu":  # OpenCV's blur: a 384 px tile in about 2 ms here, torch's depthwise conv in 20
        import cv2

        hwc = x.permute(0, 2, 3, 1).contiguous().numpy()
        blurred = torch.from_numpy(np.stack([cv2.GaussianBlur(im, (2 * r + 1, 2 * r + 1), sigma,
                                                              borderType=cv2.BORDER_REFLECT_101).reshape(im.shape)
                                             for im in hwc])).permute(0, 3, 1, 2)
    else:
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = kernel / kernel.sum()
        c = x.shape[1]
        blurred = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                           groups=c)
        blurred = F.conv2d(F.pad(blurred, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                           groups=c)
    return (x + amount * (x - blurred)).clamp_(0.0, 1.0)


def _relu_(x: torch.Tensor) -> torch.Tensor:
    """``x.relu_()``, a bfloat16 CPU tensor's through its int16 view (:class:`_SignReLU`), any other's by torch; not
    for autograd."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        x.view(torch.int16).clamp_min_(0)
        return x
    return x.relu_()


#: the largest map (height x width) :class:`_SmallMapGroupNorm` normalises in float32: this torch's channels-last
#: bfloat16 GroupNorm took 2.0 ms on (8, 256, 16, 16) against 0.9 in float32 and back, but 0.46 against 1.2 on
#: (8, 128, 32, 32) (one thread, docs/speed.md)
SMALL_GN_PIXELS = 16 * 16


class _SmallMapGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` that, on a channels-last bfloat16 CPU map of at most :data:`SMALL_GN_PIXELS` pixels under
    inference mode, normalises the map in float32 and rounds the result to bfloat16, where torch's own bfloat16
    kernel is slower; that kernel computes in float32 too, and the two gave the same values on every shape of the
    bundled model's backbone and FPN (tested). Otherwise ``nn.GroupNorm`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 4
                and x.shape[2] * x.shape[3] <= SMALL_GN_PIXELS and x.is_contiguous(memory_format=torch.channels_last)
                and torch.is_inference_mode_enabled()):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(torch.bfloat16)
        return super().forward(x)


class _PoolAfterReLU(torch.nn.MaxPool2d):
    """The 3x3 stride-2 ``nn.MaxPool2d`` of a ResNet's stem, which follows a ReLU: on a bfloat16 CPU map of even
    height and width under inference mode, the maximum of each window taken over rows, then columns, of the
    values' int16 view, which orders non-negative bfloat16 values as their values (all a ReLU gives, NaN after the
    largest). This torch's bfloat16 max pooling took 7.7 ms on a batch of 8 stems' (64, 128, 128) maps, this 2.5
    (docs/speed.md). The same values; otherwise ``nn.MaxPool2d`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 4 and x.shape[2] % 2 == 0
                and x.shape[3] % 2 == 0 and torch.is_inference_mode_enabled()):
            return super().forward(x)
        v = x.view(torch.int16)
        even, odd = v[:, :, 0::2], v[:, :, 1::2]  # output row i: input rows 2i - 1, 2i, 2i + 1 (row -1: padding)
        rows = torch.maximum(even, odd)
        torch.maximum(rows[:, :, 1:], odd[:, :, :-1], out=rows[:, :, 1:])
        even, odd = rows[..., 0::2], rows[..., 1::2]
        out = torch.maximum(even, odd)
        torch.maximum(out[..., 1:], odd[..., :-1], out=out[..., 1:])
        return out.view(torch.bfloat16)


class _CastOnceConv2d(torch.nn.Conv2d):
    """``nn.Conv2d`` that, under bfloat16 autocast on the CPU in inference mode, keeps its weight and bias converted
    to bfloat16 (the weight in the input's memory layout, as torch's oneDNN convolution would copy it) until they
    change, instead of converting and copying them again at every batch (about 0.5 ms a tile for the bundled
    backbone, docs/speed.md). Autocast then converts only the input: the same convolution, the same values.
    Otherwise ``nn.Conv2d`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_inference_mode_enabled()):
            return super().forward(x)
        w, b = self.weight, self.bias
        layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        key = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version), layout)
        cached = self.__dict__.get("_bf16")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_bf16"] = (key, w.to(torch.bfloat16).contiguous(memory_format=layout),
                                               None if b is None else b.to(torch.bfloat16))
        return self._conv_forward(x, cached[1], cached[2])


def _stem_pool(pool: torch.nn.Module, before: torch.nn.Module | None) -> bool:
    """Whether ``pool`` is a 3x3 stride-2 max pooling padded by 1 right after a ReLU (``before``, its sibling)."""
    return (type(pool) is torch.nn.MaxPool2d and isinstance(before, torch.nn.ReLU)
            and pool.kernel_size in (3, (3, 3)) and pool.stride in (2, (2, 2))
            and pool.padding in (1, (1, 1)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices)


def _use_cpu_bf16_modules(model: torch.nn.Module) -> None:
    """Every plain ``nn.ReLU``, ``nn.GroupNorm`` and ``nn.Conv2d`` of ``model`` made a :class:`_SignReLU`, a
    :class:`_SmallMapGroupNorm` and a :class:`_CastOnceConv2d`, and a ResNet stem's max pooling a
    :class:`_PoolAfterReLU`, in place (subclasses that add no parameters or buffers: the same modules, state dict
    and hooks)."""
    for m in model.modules():  # (parents before their children: a pool is swapped before it is visited)
        before = None
        for child in m.children():
            if _stem_pool(child, before):
                child.__class__ = _PoolAfterReLU
            before = child
        if type(m) is torch.nn.ReLU:
            m.__class__ = _SignReLU
        elif type(m) is torch.nn.GroupNorm:
            m.__class__ = _SmallMapGroupNorm
        elif type(m) is torch.nn.Conv2d:
            m.__class__ = _CastOnceConv2d


def _to_host(t: torch.Tensor) -> np.ndarray:
    """``t`` as a NumPy array in host memory. From a GPU the copy lands in page-locked memory (torch's caching host
    allocator reuses its blocks once the arrays that view them are gone), much faster than a copy to pageable memory
    (measured: docs/speed.md)."""
    if t.device.type != "cuda":
        return t.numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host.numpy()


class _GraphedBackbone:
    """A backbone + FPN replayed as a CUDA graph, one graph per input shape, layout and autocast dtype (the first
    ``shapes`` met: a run's full batches and its last, shorter one; eager beyond them, so that a cohort's many last
    batches do not each keep a graph's memory): a batch's kernels are launched by one replay instead of one Python call
    each, so the predicting thread needs the interpreter lock less often inside a run, where the main loop and the
    reading threads want it too (measured: docs/speed.md). Guarantee: the same features as ``backbone(x)`` under the
    caller's CUDA autocast, read at each call (so ``set_precision`` after construction is honoured); captured with
    the autocast cache off, so the weights' casts are part of the graph and in-place weight updates are seen; a
    capture that fails leaves it eager (a warning). The returned tensors are the graph's own and are overwritten by
    the next call, which the fast path's stages, run one after another, never overlap."""

    def __init__(self, backbone: torch.nn.Module, shapes: int = 2) -> None:
        self.backbone, self.shapes = backbone, shapes
        self.graphs: dict = {}

    def __call__(self, x: torch.Tensor):
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, amp)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.shapes:
                return self._run(x, amp)
            try:
                entry = self.graphs[key] = self._capture(x, amp)
            except RuntimeError as e:  # a capture this device or build refuses: eager from now on, said once
                import warnings

                warnings.warn(f"the backbone runs without CUDA graphs: {e}".splitlines()[0], RuntimeWarning,
                              stacklevel=2)
                self.shapes = 0
                return self._run(x, amp)
        static_x, out, graph = entry
        static_x.copy_(x)
        graph.replay()
        return out

    def _run(self, x: torch.Tensor, amp: torch.dtype | None):
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None, cache_enabled=False):
            return self.backbone(x)

    def _capture(self, x: torch.Tensor, amp: torch.dtype | None):
        static_x = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN's choices, lazy allocations)
            for _ in range(2):
                self._run(static_x, amp)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._run(static_x, amp)
        return static_x, out, graph


@contextlib.contextmanager
def _scaled_counts(model: torch.nn.Module, factor: float):
    """While inside, ``model``'s own testing counts (the RPN's top-n before and after NMS, the detections kept per
    image) times ``factor``, as the fast path scales them (:func:`wsiseg.segmenters.postprocess.cap_scale`): the
    stock forward reads them from its modules (in eval mode)."""
    rpn, roi = model.rpn, model.roi_heads
    saved = rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], roi.detections_per_img
    if factor != 1:
        ps = pp.ProposalSettings.of(rpn).scaled(factor)
        rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = ps.pre_nms_top_n, ps.post_nms_top_n
        roi.detections_per_img = pp.DetectionSettings.of(roi).scaled(factor).detections_per_img
    try:
        yield
    finally:
        rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], roi.detections_per_img = saved


def _rpn_head_fn(head: torch.nn.Module):
    """``fn(features) -> (objectness (B * A, 1), deltas (B * A, 4), anchors per level)``: torchvision's ``RPNHead`` on
    a list of feature levels, its outputs in ``concat_box_prediction_layers``' order (per image, level by level, each
    level's pixels in raster order, the anchors of a pixel together).

    On the CPU, for a level with channels-last strides (the backbone's output there), the two 1x1 convolutions are
    one product of the pixel rows with their stacked weights, whose output is already in that order: the values of
    the convolutions up to float rounding (tested; bit for bit where torch sums in the same order, as at two threads
    here), which torch runs on such input through its generic im2col kernel and then permutes (the time saved:
    docs/speed.md). Otherwise, and for a head that is not torchvision's ``RPNHead``, the
    head itself and the permutation."""
    if not isinstance(head, RPNHead):

        def generic(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
            obj, deltas = head(features)
            counts = [o.shape[1] * o.shape[2] * o.shape[3] for o in obj]
            return *concat_box_prediction_layers(obj, deltas), counts

        return generic
    conv, cls, box = head.conv, head.cls_logits, head.bbox_pred
    a = cls.out_channels
    w = torch.cat([cls.weight, box.weight]).detach().flatten(1).t().contiguous()  # (C, 5 * A): A logits, 4 A deltas
    bias = torch.cat([cls.bias, box.bias]).detach()

    def fn(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        ts = [conv(f) for f in features]
        counts = [t.shape[2] * t.shape[3] * a for t in ts]
        if not all(t.device.type == "cpu" and t.permute(0, 2, 3, 1).is_contiguous() for t in ts):
            obj, deltas = concat_box_prediction_layers([cls(t) for t in ts], [box(t) for t in ts])  # RPNHead's own
            return obj, deltas, counts
        b, c = ts[0].shape[:2]
        wt, bt = w.to(ts[0].dtype), bias.to(ts[0].dtype)
        out = [torch.addmm(bt, t.permute(0, 2, 3, 1).reshape(-1, c), wt).view(b, -1, 5 * a) for t in ts]
        obj = torch.cat([o[..., :a].reshape(b, -1) for o in out], 1)
        deltas = torch.cat([o[..., a:].reshape(b, -1, 4) for o in out], 1)
        return obj.reshape(-1, 1), deltas.reshape(-1, 4), counts

    return fn


def _box_head_fn(head: torch.nn.Module):
    """``fn(x) -> features``: the box head on pooled RoIs ``x`` ``(n, C, s, s)``. When ``x`` has channels-last
    strides (the CPU pooling's result, :func:`_pool`) and the head starts by flattening into a linear layer (PDAM's
    ``GNMLPHead`` without convolutions, torchvision's ``TwoMLPHead``), that layer's weight is read with its columns
    in ``(s, s, C)`` order, so the rows are used as they lie instead of being copied to ``(C, s, s)`` order: the same
    sums (equal up to float rounding). Otherwise ``head(x)``. The weights are read once, when the segmenter is
    built (it owns its model)."""
    layers = getattr(head, "layers", None)
    if isinstance(layers, torch.nn.Sequential) and len(layers) > 1 and isinstance(layers[0], torch.nn.Flatten) \
            and isinstance(layers[1], torch.nn.Linear):
        first, rest = layers[1], layers[2:]
    elif isinstance(getattr(head, "fc6", None), torch.nn.Linear) and isinstance(getattr(head, "fc7", None),
                                                                                torch.nn.Linear):
        first, fc7 = head.fc6, head.fc7

        def rest(y: torch.Tensor) -> torch.Tensor:
            return F.relu(fc7(F.relu(y)))
    else:
        return head
    cache: dict = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1)
        if not rows.is_contiguous() or first.in_features != c * h * w:
            return head(x)
        key = (c, h, w, x.dtype)
        wp = cache.get(key)
        if wp is None:  # (c * h * w, out), the product's second operand as it lies: faster (docs/speed.md); in the
            # features' type (bfloat16 under autocast: converted once, not each batch, the same rounding)
            wp = cache[key] = first.weight.detach().view(-1, c, h, w).permute(2, 3, 1, 0).reshape(
                c * h * w, first.out_features).to(x.dtype).contiguous()
        y = rows.reshape(n, c * h * w)
        b = first.bias
        y = torch.mm(y, wp) if b is None else torch.addmm(b.to(y.dtype), y, wp)
        return rest(y)

    return forward


#: pixel rows per block of the mask logits' one-class products on the CPU (:func:`_mask_logits_fn`): 4096 x 128
#: floats, 2 MB, which stay in cache between the two products (1.6x faster than whole products here)
_LOGIT_BLOCK = 4096


def _mask_head_fn(head: torch.nn.Module):
    """``fn(x) -> features``: the mask head, with every GroupNorm's input made contiguous first when the head is a
    (nested) ``Sequential``, as torchvision's ``MaskRCNNHeads`` is. On channels-last RoIs (the CPU pooling's result)
    the convolutions keep that layout, and the CPU's GroupNorm on it cost 17x its time on a contiguous tensor here
    (355 RoIs, 32 channels, 14x14); the copy costs a tenth of that. On a GPU the input is left as it is (the head
    as its own forward runs it). The same values. Other heads: ``head(x)``."""
    if not isinstance(head, torch.nn.Sequential):
        return head

    def run(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for m in seq:
            if isinstance(m, torch.nn.Sequential):
                x = run(m, x)
            elif isinstance(m, torch.nn.GroupNorm) and x.device.type == "cpu":
                x = m(x.contiguous())
            else:
                x = m(x)
        return x

    return lambda x: run(head, x)


def _mask_logits_fn(pred: torch.nn.Module):
    """``fn(x, labels) -> (n, 2H, 2W)``: the logits of each instance's own class from torchvision's
    ``MaskRCNNPredictor`` (2x2 stride-2 transposed conv, ReLU, 1x1 conv to the classes), computed as two matrix
    products on the ``(n * H * W, C)`` pixel rows: the transposed conv is a product to ``4 C`` columns (one block of
    ``C`` per output sub-pixel), the 1x1 conv a product to the few classes, and only the one-class result is
    interleaved to ``2H x 2W``. The same sums as the module (equal up to float rounding), without its ``(n, C, 2H,
    2W)`` intermediate, its ReLU over it and its logits for every class: on the CPU the module's transposed conv,
    pixel shuffle and 1x1 conv cost more than the two mask-head convolutions before them. When every instance has
    the same class (always so for nuclei), on the CPU, the second product is a matrix-vector product with that
    class's column and both run over blocks of :data:`_LOGIT_BLOCK` rows, so the first's result is read from cache;
    on a GPU the two whole products stay. Any other predictor:
    ``pred(x)`` indexed by ``labels``. The weights are read once, when the segmenter is built (it owns its model)."""
    up, logits = getattr(pred, "conv5_mask", None), getattr(pred, "mask_fcn_logits", None)
    if not (isinstance(up, torch.nn.ConvTranspose2d) and isinstance(logits, torch.nn.Conv2d)
            and up.kernel_size == (2, 2) and up.stride == (2, 2) and up.padding == (0, 0) and up.groups == 1
            and up.dilation == (1, 1) and up.output_padding == (0, 0) and logits.kernel_size == (1, 1)
            and logits.groups == 1):

        def generic(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return pred(x)[torch.arange(x.shape[0], device=x.device), labels]

        return generic
    cin, cout = up.weight.shape[:2]
    # ConvTranspose2d weight (Cin, Cout, 2, 2) -> (Cin, 4 * Cout), column (a * 2 + b) * Cout + o
    w_up = up.weight.detach().permute(0, 2, 3, 1).reshape(cin, 4 * cout).contiguous()
    b_up = None if up.bias is None else up.bias.detach().repeat(4)
    w_cls = logits.weight.detach().reshape(logits.out_channels, cout).t().contiguous()  # (Cout, K)
    b_cls = None if logits.bias is None else logits.bias.detach()

    def one_class(rows: torch.Tensor, k: int) -> torch.Tensor:
        """All instances of class ``k``: that class's logit only, the rows in blocks whose products stay in cache."""
        wu, wk = w_up.to(rows.dtype), w_cls[:, k].contiguous().to(rows.dtype)
        bu = None if b_up is None else b_up.to(rows.dtype)
        out = rows.new_empty(rows.shape[0] * 4)
        buf = rows.new_empty(min(rows.shape[0], _LOGIT_BLOCK), wu.shape[1])
        for s in range(0, rows.shape[0], _LOGIT_BLOCK):
            r = rows[s:s + _LOGIT_BLOCK]
            y = buf[:r.shape[0]]
            if bu is None:
                torch.mm(r, wu, out=y)
            else:
                torch.addmm(bu, r, wu, out=y)
            torch.mv(_relu_(y.view(-1, cout)), wk, out=out[4 * s:4 * (s + r.shape[0])])
        if b_cls is not None:
            out += b_cls[k].to(out.dtype)
        return out

    def forward(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, cin)
        if n and x.device.type == "cpu" and bool((labels == labels[0]).all()):  # one class (always so for nuclei)
            y = one_class(rows, int(labels[0]))
            return y.view(n, h, w, 2, 2).permute(0, 1, 3, 2, 4).reshape(n, 2 * h, 2 * w)
        y = rows @ w_up.to(rows.dtype)
        if b_up is not None:
            y += b_up.to(y.dtype)
        y = F.relu_(y).view(n * h * w * 4, cout) @ w_cls.to(y.dtype)  # (n*h*w*4, K)
        if b_cls is not None:
            y += b_cls.to(y.dtype)
        k = y.shape[1]
        y = y.view(n, h * w * 4, k).gather(2, labels.view(n, 1, 1).expand(n, h * w * 4, 1))
        return y.view(n, h, w, 2, 2).permute(0, 1, 3, 2, 4).reshape(n, 2 * h, 2 * w)

    return forward


def _pool(pooler, feats: dict, boxes: torch.Tensor, image: torch.Tensor, shapes: list[tuple[int, int]],
          dense: dict | None = None) -> torch.Tensor:
    """``MultiScaleRoIAlign`` output, ``(n, C, s, s)``, for ``boxes`` ``(n, 4)`` of the images ``image`` ``(n,)``
    (sorted by image; ``shapes``: every image's size), all images in one call: the pooler itself takes a list of
    boxes per image and maps each image's boxes to levels with a few Python-level calls per image, each of which
    waits for the interpreter lock inside a run (measured: docs/speed.md); its level arithmetic is per box, so one
    call over all boxes gives the same levels.

    On the CPU (fixed sampling ratio, square output) :func:`wsiseg.models.roi_pool.pool_rois_rows`, read from the
    channels-last features in place; the result has channels-last strides (the heads read it so:
    :func:`_box_head_fn`, :func:`_mask_head_fn`). A box's result does not depend on the other boxes of the batch,
    nor on whether it is the segmenter's first call.

    Elsewhere, when every box maps to the same level (nuclei nearly always do), one torchvision ``roi_align`` on
    that level, without the pooler's zero-filled result tensor and per-level scatter (the same values: the pooler
    computes exactly this call for that level); ``dense`` caches the levels made contiguous, shared by the box and
    the mask pooling of one batch (``roi_align`` copies a channels-last map to a contiguous one on every call)."""
    from torchvision.ops import roi_align

    if rows_apply(pooler, feats):
        return pool_rois_rows(pooler, feats, rois_at(boxes, image, torch.float32), boxes, shapes).permute(0, 3, 1, 2)

    def by_pooler() -> torch.Tensor:  # the pooler itself, on the boxes of each image
        return pooler(feats, list(boxes.split(torch.bincount(image, minlength=len(shapes)).tolist())), shapes)

    mapper, scales = getattr(pooler, "map_levels", None), getattr(pooler, "scales", None)
    if mapper is None or scales is None or len(scales) < 2 or boxes.shape[0] == 0:
        return by_pooler()  # first call (sets the scales up), single level, or nothing to pool
    levels = mapper([boxes])
    lvl = int(levels[0])
    if not bool((levels == lvl).all()):
        return by_pooler()
    name = pooler.featmap_names[lvl]
    if dense is None:
        x = feats[name]
    else:
        x = dense.get(name)
        if x is None:
            x = dense[name] = feats[name].contiguous()
    return roi_align(x, rois_at(boxes, image), pooler.output_size, spatial_scale=scales[lvl],
                     sampling_ratio=pooler.sampling_ratio, aligned=False)
