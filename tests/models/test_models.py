"""PDAM network: discriminator layer shapes (paper tables 1 and 2), GRL, eq. 3 / eq. 5, losses of a training step."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN

from wsiseg.models.config import from_dict
from wsiseg.core.errors import ConfigError
from wsiseg.models.discriminators import (
    ImageDiscriminator,
    InstanceDiscriminator,
    SemanticDiscriminator,
    entropy_map,
    pool_fpn_levels,
)
from wsiseg.models.grl import grl
from wsiseg.models.pdam import (
    PDAM,
    DAConfig,
    PDAMConfig,
    build_pdam,
    da_alpha,
    task_weight,
    task_weight_from_log_ratio,
)
from wsiseg.models.semantic import SemanticHead
from wsiseg.train.trainer import load_run_config, targets_from_labels, to_rgb_uint8

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(1)

from helpers import tiny_config  # noqa: E402


def shapes_through(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    seen: dict[str, tuple] = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape[1:])))
             for n in names]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def conv_params(conv: nn.Conv2d) -> tuple:
    return conv.kernel_size, conv.stride, conv.padding


# ------------------------------------------------------------------------------------------- tables 1 and 2
def test_image_discriminator_matches_table_1():
    d = ImageDiscriminator()  # paper widths are the defaults, and the r101 config's
    assert DAConfig().image_channels == [256, 512, 512]
    seen = shapes_through(d, ["conv1", "conv2", "conv3", "conv4"], torch.randn(2, 256, 8, 8))
    assert seen == {"conv1": (256, 8, 8), "conv2": (512, 8, 8), "conv3": (512, 8, 8), "conv4": (2, 8, 8)}
    assert conv_params(d.conv1[0]) == ((3, 3), (1, 1), (1, 1))
    assert conv_params(d.conv2[0]) == ((3, 3), (1, 1), (1, 1))
    assert conv_params(d.conv3[0]) == ((3, 3), (1, 1), (1, 1))
    assert conv_params(d.conv4) == ((1, 1), (1, 1), (0, 0))


def test_image_discriminator_input_is_pooled_sum_of_fpn_levels():
    levels = [torch.randn(1, 256, 64 >> i, 64 >> i) for i in range(4)]  # P2..P5 of a 256x256 image
    x = pool_fpn_levels(levels, 8)
    assert x.shape == (1, 256, 8, 8)
    expected = sum(torch.nn.functional.avg_pool2d(f, f.shape[-1] // 8) for f in levels)
    torch.testing.assert_close(x, expected)


def test_semantic_discriminator_matches_table_2():
    d = SemanticDiscriminator()
    assert DAConfig().semantic_channels == [64, 128, 256, 512]
    names = ["c1", "r1", "c2", "r2", "c3", "r3", "c4", "r4", "c5"]
    seen = shapes_through(d, names, torch.rand(1, 2, 256, 256))
    assert seen == {"c1": (64, 128, 128), "r1": (64, 128, 128), "c2": (128, 64, 64), "r2": (128, 64, 64),
                    "c3": (256, 32, 32), "r3": (256, 32, 32), "c4": (512, 16, 16), "r4": (512, 16, 16),
                    "c5": (2, 16, 16)}
    assert conv_params(d.c1[0]) == ((7, 7), (2, 2), (3, 3))
    for c in (d.c2, d.c3, d.c4):
        assert conv_params(c[0]) == ((5, 5), (2, 2), (2, 2))
    for r in (d.r1, d.r2, d.r3, d.r4):
        assert conv_params(r.conv1) == conv_params(r.conv2) == ((3, 3), (1, 1), (1, 1))
    assert conv_params(d.c5) == ((1, 1), (1, 1), (0, 0))


def test_instance_discriminator_is_three_fc_layers():
    d = InstanceDiscriminator(1024, (1024, 256))
    fcs = [m for m in d.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(1024, 1024), (1024, 256), (256, 1)]
    assert d(torch.randn(5, 1024)).shape == (5, 1)


def test_entropy_map_is_normalised_self_information():
    p = torch.tensor([0.5, 0.5, 1.0, 0.0]).view(1, 1, 2, 2)
    probs = torch.cat([p, 1 - p], 1)
    e = entropy_map(probs)
    assert e.shape == (1, 2, 2, 2)
    total = e.sum(1)[0]
    torch.testing.assert_close(total, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), atol=1e-6, rtol=0)


def test_semantic_head_output_size():
    head = SemanticHead(64, num_levels=4, channels=32)
    levels = [torch.randn(2, 64, 64 >> i, 64 >> i) for i in range(4)]
    assert head(levels, (256, 256)).shape == (2, 2, 256, 256)


# --------------------------------------------------------------------------------------------- GRL, eq 3, 5
def test_grl_is_identity_forward_and_flips_and_scales_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = grl(x, 0.3)
    torch.testing.assert_close(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * w)


def test_eq5_alpha_schedule_known_points():
    assert da_alpha(0.0) == 0.0
    assert da_alpha(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # 0.98661
    assert da_alpha(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)  # 0.99991
    assert da_alpha(0.1) == pytest.approx(0.46211716)
    assert da_alpha(-1) == 0.0 and da_alpha(2) == da_alpha(1)
    ts = np.linspace(0, 1, 11)
    assert all(np.diff([da_alpha(t) for t in ts]) > 0)


def test_eq3_task_weight_known_points():
    t = torch.tensor
    assert float(task_weight(t([0.5]))) == pytest.approx(1.0)  # undecided discriminator: weight 1
    assert float(task_weight(t([0.8]))) == pytest.approx(0.25)  # source-biased features: down-weighted
    assert float(task_weight(t([0.2]))) == pytest.approx(2.0)  # (1-p)/p = 4 capped at beta = 2
    assert float(task_weight(t([0.2]), beta=5.0)) == pytest.approx(4.0)
    assert float(task_weight(t([0.9]), beta=1.5, floor=0.5)) == pytest.approx(0.5)  # the authors' clamp
    assert float(task_weight(t([0.5, 0.8]))) == pytest.approx(0.625)  # mean over locations
    big = task_weight_from_log_ratio(t([1e4, 3.0]))  # no overflow to inf/nan
    assert float(big) == 2.0
    x = t([0.3], requires_grad=True)
    assert not task_weight(x).requires_grad  # detached


# ------------------------------------------------------------------------------------------------- network
def test_r101_config_is_the_paper_network():
    cfg = load_run_config(ROOT / "configs" / "pdam_r101.yaml").model
    assert cfg.backbone.depth == 101 and cfg.da.beta == 2.0 and cfg.da.floor == 0.0
    m = build_pdam(cfg)
    assert isinstance(m, MaskRCNN) and isinstance(m, PDAM)
    assert len(m.backbone.body.layer3) == 23  # ResNet-101
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    gns = [x for x in m.modules() if isinstance(x, nn.GroupNorm)]
    assert gns and all(g.num_groups == 32 and g.eps == 1e-5 for g in gns)
    for part in (m.backbone.body, m.backbone.fpn, m.roi_heads.box_head, m.roi_heads.mask_head, m.semantic_head):
        assert any(isinstance(x, nn.GroupNorm) for x in part.modules())
    assert m.da_image is not None and m.da_instance is not None and m.da_semantic is not None


def test_lite_config_loads_and_is_small():
    cfg = load_run_config(ROOT / "configs" / "pdam_lite.yaml").model
    m = build_pdam(cfg)
    n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    assert n * 2 <= 25e6  # <= 25 MB in fp16, discriminators included


@pytest.mark.parametrize("change", [
    {"backbone": {"depth": 42}},
    {"rpn": {"anchor_sizes": [8, 16]}},
    {"roi": {"box_head_fc": [1024, 512]}},  # instance DA needs box feature = 4 x mask channels
    {"da": {"alpha_mode": "sometimes"}},
    {"da": {"beta": 1.0, "floor": 2.0}},
    {"backbone": {"fpn_channels": 100}},
    {"mpp": 0.0},
    {"no_such_key": 1},
])
def test_bad_config_values_raise_config_error(change):
    with pytest.raises(ConfigError):
        from_dict(PDAMConfig, change)


def test_eval_forward_is_stock_mask_rcnn_without_resizing():
    torch.manual_seed(0)
    m = build_pdam(tiny_config()).eval()
    imgs = [torch.rand(3, 96, 160), torch.rand(3, 128, 128)]
    with torch.no_grad():
        out = m(imgs)
    assert len(out) == 2
    for o, img in zip(out, imgs):
        assert set(o) == {"boxes", "labels", "scores", "masks"}
        assert o["masks"].shape[1:] == (1, *img.shape[1:])  # original size: no resize
        if len(o["boxes"]):
            assert float(o["boxes"][:, 2].max()) <= img.shape[2] and float(o["boxes"][:, 3].max()) <= img.shape[1]
            assert set(o["labels"].tolist()) <= {1}


# --------------------------------------------------------------------------------------- training step
LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_semantic"}
DA_LOSSES = {"loss_da_img", "loss_da_ins", "loss_da_sem"}


@pytest.fixture(scope="module")
def real_batch():
    """A 256x256 DSB2018 crop (grey -> RGB) with its instances as source, a 256x256 Kumar crop as target."""
    import tifffile

    samples, kumar = SHARED_DATA / "samples", SHARED_DATA / "kumar" / "images"
    if not samples.is_dir() or not kumar.is_dir():
        pytest.skip(f"real data not present: {samples} / {kumar}")
    img = to_rgb_uint8(tifffile.imread(samples / "dsb2018_img2d.tif"))[:256, :256]
    lab = tifffile.imread(samples / "dsb2018_mask2d.tif").astype(np.int32)[:256, :256]
    tgt = tifffile.imread(sorted(kumar.glob("*.tif"))[0])[300:556, 300:556, :3]

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255

    t = targets_from_labels(lab)
    assert len(t["boxes"]) > 20
    return [tensor(img)], [t], [tensor(tgt)]


def test_lite_training_step_has_every_loss_finite_with_gradients(real_batch):
    src, tgts, tgt = real_batch
    torch.manual_seed(0)
    m = build_pdam(load_run_config(ROOT / "configs" / "pdam_lite.yaml").model).train()
    out = m.forward_train(src, tgts, tgt, progress=0.3)
    assert LOSSES | DA_LOSSES | {"loss", "w_img", "w_ins", "w_sem", "alpha_da"} <= set(out)
    for k, v in out.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    assert float(out["alpha_da"]) == pytest.approx(da_alpha(0.3))
    for k in ("w_img", "w_ins", "w_sem"):
        assert 0.0 <= float(out[k]) <= 2.0 and not out[k].requires_grad
    out["loss"].backward()
    for part in (m.backbone, m.semantic_head, m.da_image, m.da_instance, m.da_semantic, m.roi_heads.mask_head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)


def _expected_total(out, da_scale):
    rpn = out["loss_objectness"] + out["loss_rpn_box_reg"]
    roi = out["loss_classifier"] + out["loss_box_reg"] + out["loss_mask"]
    total = out["w_img"] * rpn + out["w_ins"] * roi + out["w_sem"] * out["loss_semantic"]
    return total + da_scale * sum(out[k] for k in DA_LOSSES if k in out)


@pytest.mark.parametrize("switch, removed, weight", [
    ("image", "loss_da_img", "w_img"),
    ("instance", "loss_da_ins", "w_ins"),
    ("semantic", "loss_da_sem", "w_sem"),
])
def test_switching_a_da_piece_off_removes_its_loss_and_weight(real_batch, switch, removed, weight):
    src, tgts, tgt = real_batch
    torch.manual_seed(0)
    m = build_pdam(tiny_config(**{switch: False})).train()
    assert getattr(m, {"image": "da_image", "instance": "da_instance", "semantic": "da_semantic"}[switch]) is None
    with torch.no_grad():
        out = m.forward_train(src, tgts, tgt, progress=0.5)
    assert removed not in out and (DA_LOSSES - {removed}) <= set(out)
    assert float(out[weight]) == 1.0
    torch.testing.assert_close(out["loss"], _expected_total(out, da_alpha(0.5)))


def test_reweighting_off_and_supervised_only(real_batch):
    src, tgts, tgt = real_batch
    torch.manual_seed(0)
    m = build_pdam(tiny_config(reweight=False)).train()
    with torch.no_grad():
        out = m.forward_train(src, tgts, tgt, progress=1.0)
        sup = m.forward_train(src, tgts, None, progress=1.0)
    assert DA_LOSSES <= set(out) and all(float(out[w]) == 1.0 for w in ("w_img", "w_ins", "w_sem"))
    torch.testing.assert_close(out["loss"], _expected_total(out, da_alpha(1.0)))
    assert not (DA_LOSSES & set(sup)) and LOSSES <= set(sup) and float(sup["alpha_da"]) == 0.0
    torch.testing.assert_close(sup["loss"], _expected_total(sup, 0.0))


def test_grl_mode_puts_the_schedule_in_the_gradient_not_the_loss(real_batch):
    src, tgts, tgt = real_batch
    torch.manual_seed(0)
    m = build_pdam(tiny_config(alpha_mode="grl")).train()
    with torch.no_grad():
        out = m.forward_train(src, tgts, tgt, progress=0.1)
    torch.testing.assert_close(out["loss"], _expected_total(out, 1.0))
