"""CycleGAN (Zhu et al., ICCV 2017) in its original design, with configurable widths for a CPU-sized variant.

* :class:`ResnetGenerator`: c7s1-ngf, d(2 ngf), d(4 ngf), ``n_blocks`` residual blocks, u(2 ngf), u(ngf), c7s1-3;
  InstanceNorm (no affine), ReLU, reflection padding, tanh output. Output shape == input shape for inputs whose
  sides are multiples of 4 (:func:`pad_to_multiple` pads others).
* :class:`PatchDiscriminator`: the 70x70 PatchGAN, C64-C128-C256-C512 (4x4 convs, strides 2-2-2-1, LeakyReLU 0.2,
  InstanceNorm on all but the first) then a 4x4 stride-1 conv to one logit per patch: a 256x256 input gives 30x30.
* :class:`CycleGAN`: both generators (``g_ab``: domain A -> B, here fluorescence -> H&E; ``g_ba``), both
  discriminators, least-squares GAN loss, cycle loss (``lambda_cycle``, 10) and identity loss
  (``lambda_identity`` * ``lambda_cycle``, i.e. 0.5 * 10), image pools of 50, Adam (betas 0.5, 0.999) and the
  "constant, then linear to 0" schedule (:func:`linear_decay_lambda`, used with ``torch.optim.lr_scheduler.LambdaLR``
  stepped once per iteration). :meth:`CycleGAN.train_step` runs one full update and returns the losses.

Images are float tensors in [-1, 1], shape (B, 3, H, W). Weights are initialised N(0, 0.02) as in the original.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            nn.InstanceNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """ResNet generator; ``ngf=64, n_blocks=9`` is the original 256x256 design."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_ch, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        ch = ngf
        for _ in range(2):  # d128, d256
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(ch * 2), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [ResidualBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):  # u128, u64
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_ch, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (``n_layers=3``): one real/fake logit per overlapping 70x70 patch."""

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            nxt = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, nxt, 4, stride=stride, padding=1), nn.InstanceNorm2d(nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        layers += [nn.Conv2d(ch, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for conv weights, zero biases (the original CycleGAN initialisation)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def lsgan_loss(pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean((pred - 1)^2) for real, mean(pred^2) for fake."""
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if target_is_real else 0.0))


def linear_decay_lambda(total_iters: int, decay_start: int):
    """Multiplier for LambdaLR: 1 for ``it < decay_start``, then linear to 0 at ``it == total_iters``."""
    decay_len = max(1, total_iters - decay_start)

    def f(it: int) -> float:
        if it < decay_start:
            return 1.0
        return max(0.0, 1.0 - (it - decay_start) / decay_len)

    return f


class ImagePool:
    """The history buffer of generated images (Shrivastava et al.): with a full pool, each image is swapped with a
    stored one with probability 0.5, so discriminators also see older fakes. ``size == 0`` disables it."""

    def __init__(self, size: int = 50, rng: random.Random | None = None) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = rng or random.Random(0)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif self.rng.random() < 0.5:
                j = self.rng.randrange(self.size)
                out.append(self.images[j].clone())
                self.images[j] = img.clone()
            else:
                out.append(img)
        return torch.cat(out, 0)


class CycleGAN(nn.Module):
    """Two generators, two discriminators, their losses and optimisers.

    ``g_ab`` maps domain A (source) to B (target); ``d_a`` judges A images, ``d_b`` B images.
    """

    def __init__(
        self,
        ngf: int = 64,
        ndf: int = 64,
        n_blocks: int = 9,
        n_layers_d: int = 3,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.g_ab = ResnetGenerator(3, 3, ngf, n_blocks)
        self.g_ba = ResnetGenerator(3, 3, ngf, n_blocks)
        self.d_a = PatchDiscriminator(3, ndf, n_layers_d)
        self.d_b = PatchDiscriminator(3, ndf, n_layers_d)
        init_weights(self)
        self.lambda_cycle = lambda_cycle
        self.lambda_identity = lambda_identity
        self.pool_a = ImagePool(pool_size, random.Random(seed))
        self.pool_b = ImagePool(pool_size, random.Random(seed + 1))
        self.opt_g: torch.optim.Optimizer | None = None
        self.opt_d: torch.optim.Optimizer | None = None

    def make_optimizers(
        self, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.999), total_iters: int = 1, decay_start: int = 0
    ) -> tuple[torch.optim.lr_scheduler.LambdaLR, torch.optim.lr_scheduler.LambdaLR]:
        """Create the two Adam optimisers and their LambdaLR schedulers (step them once per iteration)."""
        self.opt_g = torch.optim.Adam(list(self.g_ab.parameters()) + list(self.g_ba.parameters()), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(list(self.d_a.parameters()) + list(self.d_b.parameters()), lr=lr, betas=betas)
        f = linear_decay_lambda(total_iters, decay_start)
        return (
            torch.optim.lr_scheduler.LambdaLR(self.opt_g, f),
            torch.optim.lr_scheduler.LambdaLR(self.opt_d, f),
        )

    def generator_losses(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward both cycles; returns the generator loss terms and the fakes (``fake_a``, ``fake_b``)."""
        fake_b = self.g_ab(real_a)
        rec_a = self.g_ba(fake_b)
        fake_a = self.g_ba(real_b)
        rec_b = self.g_ab(fake_a)
        out = {
            "g_gan_ab": lsgan_loss(self.d_b(fake_b), True),
            "g_gan_ba": lsgan_loss(self.d_a(fake_a), True),
            "cycle_a": F.l1_loss(rec_a, real_a) * self.lambda_cycle,
            "cycle_b": F.l1_loss(rec_b, real_b) * self.lambda_cycle,
        }
        if self.lambda_identity > 0:
            w = self.lambda_cycle * self.lambda_identity
            out["idt_a"] = F.l1_loss(self.g_ba(real_a), real_a) * w
            out["idt_b"] = F.l1_loss(self.g_ab(real_b), real_b) * w
        out["fake_a"], out["fake_b"] = fake_a, fake_b
        return out

    def discriminator_loss(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (lsgan_loss(d(real), True) + lsgan_loss(d(fake.detach()), False))

    def train_step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        """One CycleGAN iteration: update the generators (discriminators frozen), then both discriminators on pooled
        fakes. Returns every loss term as a float (``g`` = the total generator loss)."""
        if self.opt_g is None or self.opt_d is None:
            raise RuntimeError("call make_optimizers() before train_step()")
        for d in (self.d_a, self.d_b):
            d.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        terms = self.generator_losses(real_a, real_b)
        fake_a, fake_b = terms.pop("fake_a"), terms.pop("fake_b")
        g_total = sum(terms.values())
        g_total.backward()
        self.opt_g.step()
        for d in (self.d_a, self.d_b):
            d.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        d_b = self.discriminator_loss(self.d_b, real_b, self.pool_b.query(fake_b))
        d_a = self.discriminator_loss(self.d_a, real_a, self.pool_a.query(fake_a))
        (d_a + d_b).backward()
        self.opt_d.step()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out.update(g=float(g_total.detach()), d_a=float(d_a.detach()), d_b=float(d_b.detach()))
        return out


def pad_to_multiple(x: torch.Tensor, m: int = 4) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B, C, H, W) on the bottom/right so that H and W are multiples of ``m``; returns the original
    (H, W) to crop back to."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x, (h, w)
