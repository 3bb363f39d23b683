"""PDAM: the panoptic domain-adaptive Mask R-CNN of CyC-PDAM (paper sections 3.1, 3.3-3.5, eq. 3-5).

:class:`PDAM` *is* a torchvision :class:`~torchvision.models.detection.MaskRCNN` (ResNet-FPN, GroupNorm everywhere,
two classes: background and nucleus, no resizing of the input) with three additions used only in training:

* ``semantic_head`` - a Panoptic-FPN semantic branch on P2..P5, CE loss on the source foreground;
* ``da_image`` / ``da_instance`` / ``da_semantic`` - the domain discriminators of tables 1 and 2 behind a
  gradient reversal layer (each optional, ``None`` when switched off in the config);
* :meth:`PDAM.forward_train` - one source batch (with targets) and one target batch (without), returning the named
  losses, the task re-weighting factors of eq. 3 and the total loss of eq. 4.

In ``eval()`` mode ``model(images)`` is exactly torchvision's Mask R-CNN inference (a list of dicts with ``boxes``,
``labels``, ``scores``, ``masks``); the additions are not run.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..core.errors import ConfigError
from .roi_pool import RowsMultiScaleRoIAlign
from .discriminators import (
    SOURCE,
    TARGET,
    ImageDiscriminator,
    InstanceDiscriminator,
    SemanticDiscriminator,
    domain_bce,
    domain_ce,
    entropy_map,
    log_ratio_1way,
    log_ratio_2way,
    pool_fpn_levels,
)
from .grl import grl
from .semantic import SemanticHead, semantic_loss

ARCH = "pdam"
NUM_CLASSES = 2  # background, nucleus


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class BackboneConfig:
    depth: int = 101  # ResNet 18 / 34 / 50 / 101
    returned_layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # ResNet stages feeding the FPN
    fpn_channels: int = 256
    gn_groups: int = 32
    gn_eps: float = 1e-5


@dataclass
class RPNConfig:
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # one per FPN level (+ pool)
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    head_convs: int = 1
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 1000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


@dataclass
class RoIConfig:
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    box_pool: int = 7
    box_head_convs: list[int] = field(default_factory=list)  # 3x3 conv + GN widths before the FCs
    box_head_fc: list[int] = field(default_factory=lambda: [1024, 1024])  # FC + GN + ReLU widths
    mask_pool: int = 14
    sampling_ratio: int = 2  # RoIAlign samples per bin side (torchvision/paper: 2; 1 is 4x cheaper on the CPU)
    mask_head_channels: list[int] = field(default_factory=lambda: [256, 256, 256, 256])
    detections_per_img: int = 500
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    mask_thresh: float = 0.5


@dataclass
class SemanticConfig:
    channels: int = 128


@dataclass
class DAConfig:
    """Domain adaptation switches and settings. Everything off = a plain Mask R-CNN + semantic branch."""

    image: bool = True  # image-level discriminator (table 1)
    instance: bool = True  # instance-level discriminator (section 3.1)
    semantic: bool = True  # semantic-level discriminator (table 2)
    reweight: bool = True  # task re-weighting (eq. 3)
    beta: float = 2.0  # eq. 3 ceiling
    floor: float = 0.0  # eq. 3 floor (paper: none = 0; the authors' code: 0.5 with beta 1.5)
    # "loss": the paper's eq. 4/5 (alpha_da(t) weights the DA losses, the GRL scales by grl_weight);
    # "grl": the authors' code (DA losses weight 1, the GRL coefficient follows eq. 5).
    alpha_mode: str = "loss"
    grl_weight: float = 1.0
    alpha_gamma: float = 10.0  # the 10 of eq. 5
    pool_size: int = 8  # table 1 input size
    instance_rois: int = 64  # top-objectness RPN proposals per image fed to the instance discriminator
    image_channels: list[int] = field(default_factory=lambda: [256, 512, 512])
    instance_hidden: list[int] = field(default_factory=lambda: [1024, 256])
    semantic_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])


@dataclass
class LossWeights:
    rpn: float = 1.0
    roi: float = 1.0
    semantic: float = 1.0
    da_image: float = 1.0
    da_instance: float = 1.0
    da_semantic: float = 1.0


@dataclass
class PDAMConfig:
    name: str = "pdam"  # short identifier written into outputs (e.g. "pdam-r101", "pdam-lite")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    da: DAConfig = field(default_factory=DAConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    mpp: float = 0.25  # microns per pixel the model works at
    max_nucleus_px: int = 64  # largest nucleus diameter (pixels at mpp) expected
    # the inference tile side (pixels at mpp) the model was chosen with: wsiseg run's tile for it unless --tile-size
    # says otherwise (scripts/bundle_model.py --tile-size; chosen on the development set, docs/precision.md)
    tile_size: int = 256
    # the median diameter (pixels at mpp) of the nuclei the model draws on the images it was chosen on, measured as
    # wsiseg.wsi.scale.probe measures a slide's (scripts/nucleus_size.py; bundle_model.py --nucleus-px): where a
    # slide's nuclei look much smaller, wsiseg run shows it larger (--zoom auto). 0: unknown, the slide's own scale
    nucleus_px: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""
        b, r, roi, d = self.backbone, self.rpn, self.roi, self.da

        def bad(key: str, msg: str) -> None:
            raise ConfigError(f"model.{key}: {msg}")

        if b.depth not in (18, 34, 50, 101):
            bad("backbone.depth", f"must be 18, 34, 50 or 101, got {b.depth}")
        rl = list(b.returned_layers)
        if not rl or rl != sorted(set(rl)) or rl[0] != 1 or rl[-1] > 4 or rl != list(range(1, rl[-1] + 1)):
            bad("backbone.returned_layers", f"must be [1], [1, 2], [1, 2, 3] or [1, 2, 3, 4], got {rl}")
        g = b.gn_groups
        if g < 1:
            bad("backbone.gn_groups", f"must be >= 1, got {g}")
        widths = {"backbone.fpn_channels": [b.fpn_channels], "semantic.channels": [self.semantic.channels],
                  "roi.mask_head_channels": roi.mask_head_channels, "roi.box_head_convs": roi.box_head_convs,
                  "roi.box_head_fc": roi.box_head_fc}
        for key, ws in widths.items():
            for w in ws:
                if w < 1 or w % g:
                    bad(key, f"every width must be a positive multiple of gn_groups={g}, got {w}")
        if not roi.mask_head_channels:
            bad("roi.mask_head_channels", "needs at least one layer")
        if not roi.box_head_fc:
            bad("roi.box_head_fc", "needs at least one layer")
        if len(r.anchor_sizes) != len(rl) + 1:
            bad("rpn.anchor_sizes", f"needs one size per FPN output ({len(rl) + 1} for returned_layers {rl}), "
                f"got {len(r.anchor_sizes)}")
        if any(s <= 0 for s in r.anchor_sizes) or not r.aspect_ratios or any(a <= 0 for a in r.aspect_ratios):
            bad("rpn", "anchor sizes and aspect ratios must be positive")
        for key, v in (("rpn.pre_nms_top_n_train", r.pre_nms_top_n_train),
                       ("rpn.post_nms_top_n_train", r.post_nms_top_n_train),
                       ("rpn.pre_nms_top_n_test", r.pre_nms_top_n_test),
                       ("rpn.post_nms_top_n_test", r.post_nms_top_n_test),
                       ("rpn.batch_size_per_image", r.batch_size_per_image),
                       ("roi.batch_size_per_image", roi.batch_size_per_image), ("roi.box_pool", roi.box_pool),
                       ("roi.mask_pool", roi.mask_pool), ("roi.sampling_ratio", roi.sampling_ratio),
                       ("roi.detections_per_img", roi.detections_per_img),
                       ("da.pool_size", d.pool_size), ("da.instance_rois", d.instance_rois),
                       ("max_nucleus_px", self.max_nucleus_px)):
            if v < 1:
                bad(key, f"must be >= 1, got {v}")
        if r.head_convs < 0:
            bad("rpn.head_convs", f"must be >= 0 (0: 1x1 objectness/box convs straight on the FPN), got {r.head_convs}")
        for key, v in (("rpn.nms_thresh", r.nms_thresh), ("rpn.fg_iou_thresh", r.fg_iou_thresh),
                       ("rpn.bg_iou_thresh", r.bg_iou_thresh), ("rpn.positive_fraction", r.positive_fraction),
                       ("roi.positive_fraction", roi.positive_fraction), ("roi.fg_iou_thresh", roi.fg_iou_thresh),
                       ("roi.bg_iou_thresh", roi.bg_iou_thresh), ("roi.score_thresh", roi.score_thresh),
                       ("roi.nms_thresh", roi.nms_thresh), ("roi.mask_thresh", roi.mask_thresh)):
            if not 0.0 <= v <= 1.0:
                bad(key, f"must be in [0, 1], got {v}")
        if r.bg_iou_thresh > r.fg_iou_thresh or roi.bg_iou_thresh > roi.fg_iou_thresh:
            bad("rpn/roi", "bg_iou_thresh must not exceed fg_iou_thresh")
        if d.instance and roi.box_head_fc[-1] != 4 * roi.mask_head_channels[-1]:
            bad("roi", f"instance adaptation sums the box feature ({roi.box_head_fc[-1]}) with the 2x2-pooled mask "
                f"feature (4 x {roi.mask_head_channels[-1]}): box_head_fc[-1] must be 4 * mask_head_channels[-1]")
        if d.beta <= 0 or d.floor < 0 or d.floor > d.beta:
            bad("da", f"need 0 <= floor <= beta and beta > 0, got floor={d.floor}, beta={d.beta}")
        if d.alpha_mode not in ("loss", "grl"):
            bad("da.alpha_mode", f"must be 'loss' or 'grl', got {d.alpha_mode!r}")
        if d.grl_weight < 0 or d.alpha_gamma <= 0:
            bad("da", "grl_weight must be >= 0 and alpha_gamma > 0")
        if len(d.image_channels) != 3 or len(d.semantic_channels) != 4 or not d.instance_hidden:
            bad("da", "image_channels needs 3 widths, semantic_channels 4, instance_hidden at least 1")
        for w in list(d.image_channels) + list(d.semantic_channels) + list(d.instance_hidden):
            if w < 1:
                bad("da", f"discriminator widths must be positive, got {w}")
        for key, v in vars(self.loss_weights).items():
            if v < 0:
                bad(f"loss_weights.{key}", f"must be >= 0, got {v}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or any(s <= 0 for s in self.image_std):
            bad("image_mean/image_std", "need 3 values each, std > 0")
        if not self.mpp > 0:
            bad("mpp", f"must be > 0, got {self.mpp}")
        if not 32 <= self.tile_size <= 4096:
            bad("tile_size", f"must be 32..4096, got {self.tile_size}")
        if not 0.0 <= self.nucleus_px <= self.max_nucleus_px:
            bad("nucleus_px", f"must be 0 (unknown) .. max_nucleus_px={self.max_nucleus_px}, got {self.nucleus_px}")


# ---------------------------------------------------------------------------------------------- eq. 3 and 5
def da_alpha(progress: float, gamma: float = 10.0) -> float:
    """Eq. 5: ``2 / (1 + exp(-gamma t)) - 1`` for training progress ``t`` in [0, 1] (clipped): 0 at t=0, ~1 at t=1."""
    t = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * t)) - 1.0


def task_weight_from_log_ratio(log_ratio: Tensor, beta: float = 2.0, floor: float = 0.0) -> Tensor:
    """Eq. 3 from ``log((1 - p_s) / p_s)`` per location/RoI: ``clamp(mean((1 - p_s) / p_s), floor, beta)``, detached."""
    ratio = torch.exp(log_ratio.detach().float().clamp(max=60.0))
    return ratio.mean().clamp(min=floor, max=beta)


def task_weight(p_source: Tensor, beta: float = 2.0, floor: float = 0.0) -> Tensor:
    """Eq. 3 on probabilities of *source* (``p_s`` in (0, 1)): ``clamp(mean((1 - p_s) / p_s), floor, beta)``."""
    p = p_source.detach().float().clamp(1e-12, 1.0)
    return task_weight_from_log_ratio(torch.log1p(-p.clamp(max=1 - 1e-7)) - torch.log(p), beta, floor)


# -------------------------------------------------------------------------------------------------- network
class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, batch with padding to a multiple of 32) with the resize step removed."""

    def resize(self, image: Tensor, target=None):  # type: ignore[override]
        return image, target


class GNMLPHead(nn.Module):
    """Box head: optional 3x3 conv + GN + ReLU layers, then FC (no bias) + GN + ReLU layers ("2fc" with GN)."""

    def __init__(self, in_channels: int, pool: int, convs: list[int], fcs: list[int], groups: int, eps: float):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in convs:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.GroupNorm(groups, w, eps=eps), nn.ReLU(True)]
            c = w
        layers.append(nn.Flatten())
        n = c * pool * pool
        for w in fcs:
            layers += [nn.Linear(n, w, bias=False), nn.GroupNorm(groups, w, eps=eps), nn.ReLU(True)]
            n = w
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _gn(groups: int, eps: float):
    return lambda channels: nn.GroupNorm(groups, channels, eps=eps)


def _build_backbone(cfg: PDAMConfig) -> BackboneWithFPN:
    b = cfg.backbone
    norm = _gn(b.gn_groups, b.gn_eps)
    body = getattr(resnet, f"resnet{b.depth}")(weights=None, norm_layer=norm)
    in_stage2 = body.inplanes // 8  # 64 (basic blocks) or 256 (bottlenecks)
    in_channels = [in_stage2 * 2 ** (i - 1) for i in b.returned_layers]
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(b.returned_layers)}
    return BackboneWithFPN(body, return_layers, in_channels, b.fpn_channels, extra_blocks=LastLevelMaxPool(),
                           norm_layer=norm)


class PDAM(MaskRCNN):
    """Mask R-CNN + semantic branch + domain discriminators, built from a :class:`PDAMConfig` (see module doc)."""

    arch = ARCH

    def __init__(self, cfg: PDAMConfig):
        cfg.validate()
        b, r, roi, d = cfg.backbone, cfg.rpn, cfg.roi, cfg.da
        backbone = _build_backbone(cfg)
        c = b.fpn_channels
        levels = [str(i) for i in range(len(b.returned_layers))]  # "0".. = P2.. ; "pool" (P_last+1) is RPN-only
        anchors = AnchorGenerator(sizes=tuple((s,) for s in r.anchor_sizes),
                                  aspect_ratios=(tuple(r.aspect_ratios),) * len(r.anchor_sizes))
        norm = _gn(b.gn_groups, b.gn_eps)
        super().__init__(
            backbone,
            num_classes=None,
            min_size=256,
            max_size=100_000,
            image_mean=list(cfg.image_mean),
            image_std=list(cfg.image_std),
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=r.head_convs),
            rpn_pre_nms_top_n_train=r.pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=r.pre_nms_top_n_test,
            rpn_post_nms_top_n_train=r.post_nms_top_n_train,
            rpn_post_nms_top_n_test=r.post_nms_top_n_test,
            rpn_nms_thresh=r.nms_thresh,
            rpn_fg_iou_thresh=r.fg_iou_thresh,
            rpn_bg_iou_thresh=r.bg_iou_thresh,
            rpn_batch_size_per_image=r.batch_size_per_image,
            rpn_positive_fraction=r.positive_fraction,
            box_roi_pool=RowsMultiScaleRoIAlign(levels, roi.box_pool, roi.sampling_ratio),
            box_head=GNMLPHead(c, roi.box_pool, list(roi.box_head_convs), list(roi.box_head_fc), b.gn_groups,
                               b.gn_eps),
            box_predictor=FastRCNNPredictor(roi.box_head_fc[-1], NUM_CLASSES),
            box_score_thresh=roi.score_thresh,
            box_nms_thresh=roi.nms_thresh,
            box_detections_per_img=roi.detections_per_img,
            box_fg_iou_thresh=roi.fg_iou_thresh,
            box_bg_iou_thresh=roi.bg_iou_thresh,
            box_batch_size_per_image=roi.batch_size_per_image,
            box_positive_fraction=roi.positive_fraction,
            mask_roi_pool=RowsMultiScaleRoIAlign(levels, roi.mask_pool, roi.sampling_ratio),
            mask_head=MaskRCNNHeads(c, list(roi.mask_head_channels), 1, norm_layer=norm),
            mask_predictor=MaskRCNNPredictor(roi.mask_head_channels[-1], roi.mask_head_channels[-1], NUM_CLASSES),
        )
        self.transform = NoResizeTransform(256, 100_000, list(cfg.image_mean), list(cfg.image_std))
        self.cfg = cfg
        self.level_names = levels
        self.semantic_head = SemanticHead(c, len(levels), cfg.semantic.channels, NUM_CLASSES, b.gn_groups)
        self.da_image = ImageDiscriminator(c, d.image_channels, b.gn_groups) if d.image else None
        self.da_instance = InstanceDiscriminator(roi.box_head_fc[-1], d.instance_hidden) if d.instance else None
        self.da_semantic = SemanticDiscriminator(NUM_CLASSES, d.semantic_channels, b.gn_groups) if d.semantic else None

    # ----------------------------------------------------------------------------------------- pieces
    def _levels(self, features: dict[str, Tensor]) -> list[Tensor]:
        return [features[k] for k in self.level_names]

    def _features(self, images: ImageList, others: ImageList | None) -> tuple[dict, dict | None]:
        if others is None:
            return self.backbone(images.tensors), None
        if images.tensors.shape[1:] == others.tensors.shape[1:]:  # one batched pass (GroupNorm is per sample)
            n = images.tensors.shape[0]
            feats = self.backbone(torch.cat([images.tensors, others.tensors]))
            return (OrderedDict((k, v[:n]) for k, v in feats.items()),
                    OrderedDict((k, v[n:]) for k, v in feats.items()))
        return self.backbone(images.tensors), self.backbone(others.tensors)

    def _proposals(self, images: ImageList, features: dict[str, Tensor]) -> list[Tensor]:
        """RPN proposals without losses (for unlabelled target images), via torchvision's RPN parts."""
        rpn = self.rpn
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(images, feats)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        return boxes

    def instance_features(self, features: dict[str, Tensor], rois: list[Tensor],
                          image_sizes: list[tuple[int, int]]) -> Tensor:
        """Section 3.1: box-head feature (R, D) + mask-branch feature (R, C, 14, 14) pooled to 2x2 and flattened."""
        h = self.roi_heads
        box = h.box_head(h.box_roi_pool(features, rois, image_sizes))
        mask = h.mask_head(h.mask_roi_pool(features, rois, image_sizes))
        return box + F.adaptive_avg_pool2d(mask, 2).flatten(1)

    def semantic_logits(self, features: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        return self.semantic_head(self._levels(features), size)

    # ------------------------------------------------------------------------------------------ training
    def forward_train(self, source_images: list[Tensor], source_targets: list[dict[str, Tensor]],
                      target_images: list[Tensor] | None = None, progress: float = 0.0) -> dict[str, Tensor]:
        """One PDAM training step's losses (call in ``train()`` mode; backpropagate ``out["loss"]``).

        ``source_images``/``target_images``: float ``(3, H, W)`` tensors in [0, 1]; ``source_targets``: dicts with
        ``boxes`` (float ``(n, 4)`` xyxy), ``labels`` (int64, all 1) and ``masks`` (uint8 ``(n, H, W)``).
        ``progress`` in [0, 1] drives eq. 5. ``target_images=None`` (or empty) is supervised-only: no
        discriminator runs and all re-weighting factors are 1.

        Returns ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``, ``loss_mask``,
        ``loss_semantic``, the enabled ones of ``loss_da_img``, ``loss_da_ins``, ``loss_da_sem`` (each the mean of
        the source and target cross-entropies), the detached factors ``w_img``, ``w_ins``, ``w_sem`` (eq. 3) and
        ``alpha_da`` (eq. 5), and ``loss``, the total of eq. 4.
        """
        d, lw = self.cfg.da, self.cfg.loss_weights
        adapt = bool(target_images) and (d.image or d.instance or d.semantic)
        img_s, tgt_s = self.transform(source_images, source_targets)
        img_t = self.transform(list(target_images))[0] if adapt else None
        feats_s, feats_t = self._features(img_s, img_t)

        proposals_s, rpn_losses = self.rpn(img_s, feats_s, tgt_s)
        _, roi_losses = self.roi_heads(feats_s, proposals_s, img_s.image_sizes, tgt_s)

        size_s = tuple(img_s.tensors.shape[-2:])
        sem_s = self.semantic_logits(feats_s, size_s)
        fg = torch.full((len(tgt_s), *size_s), 255, dtype=torch.long, device=sem_s.device)
        for i, (t, (h, w)) in enumerate(zip(tgt_s, img_s.image_sizes)):
            m = t["masks"]
            fg[i, :h, :w] = (m.amax(0) > 0).long() if m.shape[0] else 0
        loss_sem = semantic_loss(sem_s, fg)

        device = sem_s.device
        one = torch.ones((), device=device)
        alpha = da_alpha(progress, d.alpha_gamma) if adapt else 0.0
        grl_coef = d.grl_weight if d.alpha_mode == "loss" else alpha
        da_scale = alpha if d.alpha_mode == "loss" else 1.0
        out: dict[str, Tensor] = {}
        weights = {"w_img": one, "w_ins": one, "w_sem": one}

        def reweight(name: str, log_ratio: Tensor) -> None:
            if d.reweight:
                weights[name] = task_weight_from_log_ratio(log_ratio, d.beta, d.floor)

        if adapt and d.image:
            x = torch.cat([pool_fpn_levels(self._levels(feats_s), d.pool_size),
                           pool_fpn_levels(self._levels(feats_t), d.pool_size)])
            logits = self.da_image(grl(x, grl_coef))
            n = len(source_images)
            out["loss_da_img"] = 0.5 * (domain_ce(logits[:n], SOURCE) + domain_ce(logits[n:], TARGET))
            reweight("w_img", log_ratio_2way(logits[:n]))
        if adapt and d.semantic:
            size_t = tuple(img_t.tensors.shape[-2:])
            sem_t = self.semantic_logits(feats_t, size_t)
            logit_s = self.da_semantic(grl(entropy_map(F.softmax(sem_s.float(), 1)), grl_coef))
            logit_t = self.da_semantic(grl(entropy_map(F.softmax(sem_t.float(), 1)), grl_coef))
            out["loss_da_sem"] = 0.5 * (domain_ce(logit_s, SOURCE) + domain_ce(logit_t, TARGET))
            reweight("w_sem", log_ratio_2way(logit_s))
        if adapt and d.instance:
            k = d.instance_rois
            rois_s = [p[:k].detach() for p in proposals_s]
            rois_t = [p[:k] for p in self._proposals(img_t, feats_t)]
            f_s = self.instance_features(feats_s, rois_s, img_s.image_sizes)
            f_t = self.instance_features(feats_t, rois_t, img_t.image_sizes)
            logits = self.da_instance(grl(torch.cat([f_s, f_t]), grl_coef))
            ns = f_s.shape[0]
            out["loss_da_ins"] = 0.5 * (domain_bce(logits[:ns], SOURCE) + domain_bce(logits[ns:], TARGET))
            reweight("w_ins", log_ratio_1way(logits[:ns]))

        rpn_loss = rpn_losses["loss_objectness"] + rpn_losses["loss_rpn_box_reg"]
        roi_loss = roi_losses["loss_classifier"] + roi_losses["loss_box_reg"] + roi_losses["loss_mask"]
        total = (weights["w_img"] * lw.rpn * rpn_loss + weights["w_ins"] * lw.roi * roi_loss
                 + weights["w_sem"] * lw.semantic * loss_sem)
        da_w = {"loss_da_img": lw.da_image, "loss_da_ins": lw.da_instance, "loss_da_sem": lw.da_semantic}
        for key, value in out.items():
            total = total + da_scale * da_w[key] * value
        result = {**rpn_losses, **roi_losses, "loss_semantic": loss_sem, **out, **weights,
                  "alpha_da": torch.tensor(alpha, device=device), "loss": total}
        return result


def build_pdam(cfg: PDAMConfig) -> PDAM:
    """A randomly initialised :class:`PDAM` (no pretrained weights anywhere); raises ConfigError on a bad config."""
    return PDAM(cfg)


__all__ = ["PDAM", "PDAMConfig", "BackboneConfig", "RPNConfig", "RoIConfig", "SemanticConfig", "DAConfig",
           "LossWeights", "build_pdam", "da_alpha", "task_weight", "task_weight_from_log_ratio", "ARCH"]
