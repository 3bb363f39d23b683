"""CycleGAN: architecture shapes, losses, schedule, training that learns, checkpoint resume, translation."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from wsiseg.adapt.translate import (
    CycleGANConfig,
    load_generator,
    to_tensor,
    train_cyclegan,
    translate_dir,
)
from wsiseg.core.errors import ConfigError, InputError, ModelError
from wsiseg.models.cyclegan import (
    CycleGAN,
    ImagePool,
    PatchDiscriminator,
    ResnetGenerator,
    linear_decay_lambda,
    lsgan_loss,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is as fast and avoids oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_generator_original_design() -> None:
    g = ResnetGenerator()  # c7s1-64, d128, d256, 9 R256, u128, u64, c7s1-3
    convs = [m for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [c.out_channels for c in convs[:3]] == [64, 128, 256]
    assert [c.out_channels for c in convs[-3:]] == [128, 64, 3]
    assert convs[0].kernel_size == (7, 7) and convs[-1].kernel_size == (7, 7)
    assert len(convs) == 3 + 2 * 9 + 3
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in g.modules()) == 1 + 2 + 2 * 9 + 2
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ZeroPad2d)) for m in g.modules())
    assert isinstance(g.net[-1], nn.Tanh)
    assert sum(p.numel() for p in g.parameters()) == 11_378_179  # the published 11.378 M
    with torch.no_grad():
        for shape in ((1, 3, 256, 256), (2, 3, 64, 96)):
            y = g(torch.rand(shape) * 2 - 1)
            assert y.shape == shape and y.abs().max() <= 1.0


def test_patchgan_output_and_receptive_field() -> None:
    d = PatchDiscriminator()
    assert sum(p.numel() for p in d.parameters()) == 2_764_737
    assert isinstance(d.net[1], nn.LeakyReLU) and d.net[1].negative_slope == 0.2  # no norm on the first layer
    with torch.no_grad():
        assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    # the receptive field of one output is 70x70 (instance norms couple the whole image, so drop them here)
    d_rf = copy.deepcopy(d)
    for i, m in enumerate(d_rf.net):
        if isinstance(m, nn.InstanceNorm2d):
            d_rf.net[i] = nn.Identity()
    x = torch.zeros(1, 3, 256, 256, requires_grad=True)
    d_rf(x)[0, 0, 15, 15].backward()
    ys, xs = np.nonzero(x.grad.abs().sum(1)[0].numpy())
    assert ys.max() - ys.min() + 1 == 70 and xs.max() - xs.min() + 1 == 70


def test_lsgan_loss_and_schedule() -> None:
    ones, zeros = torch.ones(1, 1, 30, 30), torch.zeros(1, 1, 30, 30)
    assert lsgan_loss(ones, True) == 0 and lsgan_loss(ones, False) == 1
    assert lsgan_loss(zeros, True) == 1 and lsgan_loss(zeros, False) == 0
    assert lsgan_loss(torch.full((4,), 0.5), True) == pytest.approx(0.25)

    model = CycleGAN(ngf=4, ndf=4, n_blocks=1)
    sched_g, sched_d = model.make_optimizers(lr=1e-4, betas=(0.5, 0.999), total_iters=100, decay_start=50)
    assert model.opt_g.param_groups[0]["betas"] == (0.5, 0.999)
    lrs = {}
    for it in range(101):
        lrs[it] = model.opt_g.param_groups[0]["lr"]
        assert model.opt_d.param_groups[0]["lr"] == lrs[it]
        model.opt_g.step()
        model.opt_d.step()
        sched_g.step()
        sched_d.step()
    assert lrs[0] == lrs[25] == lrs[49] == lrs[50] == pytest.approx(1e-4)
    assert lrs[75] == pytest.approx(5e-5) and lrs[90] == pytest.approx(2e-5) and lrs[100] == pytest.approx(0.0)
    f = linear_decay_lambda(200, 100)
    assert [f(0), f(99), f(100), f(150), f(200), f(250)] == [1, 1, 1, 0.5, 0, 0]


def test_image_pool() -> None:
    assert torch.equal(ImagePool(0).query(torch.ones(2, 3, 4, 4)), torch.ones(2, 3, 4, 4))
    pool = ImagePool(3)
    for i in range(3):  # filling: returns the current images
        assert torch.equal(pool.query(torch.full((1, 1, 2, 2), float(i))), torch.full((1, 1, 2, 2), float(i)))
    seen = {float(pool.query(torch.full((1, 1, 2, 2), 9.0))[0, 0, 0, 0]) for _ in range(40)}
    assert 9.0 in seen and seen & {0.0, 1.0, 2.0}  # history images are returned too
    assert len(pool.images) == 3


@pytest.fixture(scope="module")
def real_pair(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """One inverted BBBC039 crop (A) and one Kumar H&E tile (B), 64x64, uint8 RGB."""
    bb = shared_data / "bbbc039" / "images"
    ku = shared_data / "kumar" / "images"
    if not bb.is_dir() or not ku.is_dir():
        pytest.skip("real data not present: bbbc039 / kumar images")
    from wsiseg.adapt.source import SourceConfig, read_bbbc_image

    g = read_bbbc_image(sorted(bb.glob("*.tif"))[0], SourceConfig())[200:264, 300:364]
    a = np.repeat((255 - np.rint(g)).astype(np.uint8)[..., None], 3, axis=2)
    b = np.ascontiguousarray(tifffile.imread(sorted(ku.glob("*.tif"))[0])[400:464, 400:464])
    return a, b


def test_losses_finite_and_decreasing(real_pair: tuple[np.ndarray, np.ndarray]) -> None:
    torch.manual_seed(0)
    model = CycleGAN(ngf=8, ndf=8, n_blocks=2, pool_size=50)
    model.make_optimizers(lr=2e-3, total_iters=40, decay_start=40)
    a, b = (to_tensor([x], torch.device("cpu")) for x in real_pair)
    hist = [model.train_step(a, b) for _ in range(40)]
    keys = {"g_gan_ab", "g_gan_ba", "cycle_a", "cycle_b", "idt_a", "idt_b", "g", "d_a", "d_b"}
    assert set(hist[0]) == keys
    assert all(np.isfinite(v) for h in hist for v in h.values())

    def mean(k: str, sl: slice) -> float:
        return float(np.mean([h[k] for h in hist[sl]]))

    for k in ("cycle_a", "cycle_b", "idt_a", "idt_b", "g"):
        assert mean(k, slice(-5, None)) < 0.7 * mean(k, slice(0, 5)), k
    for k in ("d_a", "d_b"):  # discriminators learn too (LSGAN: 0.25 is chance for d outputs at 0.5)
        assert mean(k, slice(-5, None)) < mean(k, slice(0, 5)), k
    # identity weight is 0.5 * lambda_cycle: the identity term is 5 x L1(g_ba(a), a)
    with torch.no_grad():
        ref = torch.nn.functional.l1_loss(model.g_ba(a), a) * 5
        terms = model.generator_losses(a, b)
    assert float(terms["idt_a"]) == pytest.approx(float(ref), rel=1e-5)


def _src_dir(root: Path, pair: tuple[np.ndarray, np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    a = pair[0]
    for i, im in enumerate([a, a[::-1].copy(), np.ascontiguousarray(np.rot90(a))]):
        cv2.imwrite(str(root / "images" / f"{i:05d}.png"), im)
        cv2.imwrite(str(root / "labels" / f"{i:05d}.png"), np.full(im.shape[:2], i, np.uint16))
    return root


def test_train_resume_equals_straight_run(real_pair: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    src = _src_dir(tmp_path / "src", real_pair)
    tgt = [real_pair[1], real_pair[1][:, ::-1].copy()]
    base = dict(ngf=4, ndf=4, n_blocks=1, crop=48, decay_start=1.0, log_every=1, seed=1)
    straight = train_cyclegan(src, tgt, tmp_path / "a", CycleGANConfig(iterations=6, checkpoint_every=3, **base),
                              device="cpu", progress=False)
    # "interrupted" after 3 iterations, then resumed to 6 in the same directory
    train_cyclegan(src, tgt, tmp_path / "b", CycleGANConfig(iterations=3, checkpoint_every=3, **base),
                   device="cpu", progress=False)
    resumed = train_cyclegan(src, tgt, tmp_path / "b", CycleGANConfig(iterations=6, checkpoint_every=3, **base),
                             device="cpu", progress=False)
    ga, gb = load_generator(straight), load_generator(resumed)
    for (ka, va), (kb, vb) in zip(ga.state_dict().items(), gb.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, atol=1e-6), ka
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert log[0].startswith("iteration,lr") and [r.split(",")[0] for r in log[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert sorted(p.name for p in (tmp_path / "b" / "samples").glob("*.png")) == ["0000003.png", "0000006.png"]
    # done: a rerun is skipped (file untouched); another architecture refuses the checkpoint
    mtime = resumed.stat().st_mtime_ns
    assert train_cyclegan(src, tgt, tmp_path / "b", CycleGANConfig(iterations=6, **base), progress=False) == resumed
    assert resumed.stat().st_mtime_ns == mtime
    with pytest.raises(ModelError):
        train_cyclegan(src, tgt, tmp_path / "b", CycleGANConfig(iterations=9, **{**base, "ngf": 8}), progress=False)
    # translation keeps names, sizes (also non-multiples of 4) and copies labels; resumable
    odd = real_pair[0][:50, :38]
    cv2.imwrite(str(src / "images" / "00003.png"), odd)
    cv2.imwrite(str(src / "labels" / "00003.png"), np.ones(odd.shape[:2], np.uint16))
    out = translate_dir(src, resumed, tmp_path / "syn", device="cpu", batch_size=2, progress=False)
    for p in sorted((src / "images").glob("*.png")):
        syn = cv2.imread(str(out / "images" / p.name), cv2.IMREAD_UNCHANGED)
        assert syn.shape == cv2.imread(str(p)).shape and syn.dtype == np.uint8
        assert (out / "labels" / p.name).read_bytes() == (src / "labels" / p.name).read_bytes()
    # same generator, same output as a direct call
    with torch.no_grad():
        direct = gb(to_tensor([real_pair[0]], torch.device("cpu")))
    direct = ((direct.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    got = cv2.cvtColor(cv2.imread(str(out / "images" / "00000.png")), cv2.COLOR_BGR2RGB)
    assert np.abs(got.astype(int) - direct.astype(int)).max() <= 1


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CycleGANConfig(crop=30)
    with pytest.raises(ConfigError):
        CycleGANConfig(decay_start=1.5)
    with pytest.raises(ModelError):
        load_generator(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(ModelError):
        load_generator(tmp_path / "junk.safetensors")
    with pytest.raises(InputError):
        train_cyclegan(tmp_path, [np.zeros((64, 64, 3), np.uint8)], tmp_path / "o", CycleGANConfig(), progress=False)
