"""Stage 3 of ``wsiseg adapt``: train a CycleGAN (source crops <-> target tiles) and translate the source to H&E.

Entry points:

* :func:`train_cyclegan` trains :class:`wsiseg.models.cyclegan.CycleGAN` for ``cfg.iterations`` iterations (one
  random source crop and one random target tile per image of the batch, random flips / 90-degree rotations) with
  the paper's schedule (lr constant for the first ``decay_start`` fraction, then linear to 0). It checkpoints every
  ``checkpoint_every`` iterations to ``out_dir/cyclegan_ckpt.safetensors`` (all four networks and both Adam states;
  safetensors, never pickle) and resumes from it; the image pools restart empty on resume. The result is
  ``out_dir/generator_ab.safetensors`` (source -> target generator, its architecture in the metadata), returned; when
  it already exists for the same iteration count and ``resume`` is true, training is skipped.
  Also written: ``out_dir/cyclegan.yaml`` (the config), ``out_dir/log.csv`` (losses), ``out_dir/samples/*.png``.
* :func:`translate_dir` runs the generator over ``source_dir/images/*.png`` and writes ``out_dir/images/*.png``
  (synthesised RGB uint8, same size and name) and copies ``source_dir/labels/*.png``. Existing outputs are skipped.

Image batches are drawn from ``numpy.random.default_rng([seed, iteration])``, so a resumed run sees the same data.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.atomic import replacing, write_bytes, write_png
from ..core.errors import ConfigError, InputError, ModelError, OutputError
from ..core.runtime import resolve_device
from ..models.config import save_yaml, to_dict
from ..models.cyclegan import CycleGAN, ResnetGenerator, linear_decay_lambda, pad_to_multiple

CKPT_FORMAT = "wsiseg-cyclegan-v1"
GEN_FORMAT = "wsiseg-cyclegan-generator-v1"


@dataclass
class CycleGANConfig:
    """CycleGAN hyper-parameters. Defaults are the original design and the paper's learning rate."""

    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 9
    n_layers_d: int = 3
    iterations: int = 20000
    decay_start: float = 0.5  # fraction of iterations with constant lr; linear to 0 afterwards
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # times lambda_cycle
    pool_size: int = 50
    batch_size: int = 1
    crop: int = 256
    augment: bool = True  # random flips and 90-degree rotations of both domains
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)

    def validate(self) -> None:
        if min(self.ngf, self.ndf, self.iterations, self.batch_size, self.checkpoint_every, self.log_every) < 1:
            raise ConfigError("cyclegan: ngf, ndf, iterations, batch_size, checkpoint_every, log_every must be >= 1")
        if self.n_blocks < 0 or self.n_layers_d < 1:
            raise ConfigError("cyclegan: n_blocks must be >= 0 and n_layers_d >= 1")
        if not 0.0 <= self.decay_start <= 1.0:
            raise ConfigError(f"cyclegan.decay_start: a fraction in [0, 1] (got {self.decay_start})")
        if not self.lr > 0 or not all(0.0 <= b < 1.0 for b in self.betas):  # (Adam's own checks, before any stage)
            raise ConfigError(f"cyclegan: lr must be > 0 and betas in [0, 1) (got {self.lr}, {list(self.betas)})")
        if self.crop < 16 or self.crop % 4:
            raise ConfigError(f"cyclegan.crop: a multiple of 4, >= 16 (got {self.crop})")
        if self.lr <= 0 or self.pool_size < 0:
            raise ConfigError("cyclegan: lr must be > 0 and pool_size >= 0")

    def __post_init__(self) -> None:
        self.validate()


# ------------------------------------------------------------------------------------------------ helpers


def read_rgb(path: Path) -> np.ndarray:
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise InputError(f"{path}: not a readable image")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


write_rgb = write_png
_atomic_write = write_bytes


def to_tensor(batch: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 images -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class _ImageSource:
    """Random access to uint8 RGB images given as a directory of PNGs or an in-memory sequence."""

    def __init__(self, images: str | Path | Sequence[np.ndarray], what: str) -> None:
        if isinstance(images, (str, Path)):
            d = Path(images)
            paths = sorted(d.glob("*.png")) if d.is_dir() else []
            if not paths:
                raise InputError(f"{d}: no {what} PNG images found")
            self.paths: list[Path] | None = paths
            self.arrays: Sequence[np.ndarray] | None = None
            self.n = len(paths)
        else:
            if len(images) == 0:
                raise InputError(f"no {what} images given")
            for a in images:
                if not (isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3):
                    raise InputError(f"{what} images must be uint8 HxWx3 arrays")
            self.paths, self.arrays, self.n = None, images, len(images)

    def get(self, i: int) -> np.ndarray:
        return self.arrays[i] if self.arrays is not None else read_rgb(self.paths[i])


def _sample(src: _ImageSource, rng: np.random.Generator, crop: int, augment: bool) -> np.ndarray:
    im = src.get(int(rng.integers(src.n)))
    h, w = im.shape[:2]
    if h < crop or w < crop:
        raise InputError(f"training image of {h}x{w} is smaller than the crop {crop}")
    y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    im = im[y : y + crop, x : x + crop]
    if augment:
        im = np.rot90(im, int(rng.integers(4)))
        if rng.random() < 0.5:
            im = im[:, ::-1]
    return np.ascontiguousarray(im)


def _optim_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(float(v))
            out[f"{prefix}.{idx}.{k}"] = t.detach().cpu().contiguous()
    return out


def _load_optim(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[name] = t
    sd["state"] = state
    opt.load_state_dict(sd)


def _build(cfg: CycleGANConfig) -> CycleGAN:
    return CycleGAN(
        ngf=cfg.ngf,
        ndf=cfg.ndf,
        n_blocks=cfg.n_blocks,
        n_layers_d=cfg.n_layers_d,
        lambda_cycle=cfg.lambda_cycle,
        lambda_identity=cfg.lambda_identity,
        pool_size=cfg.pool_size,
        seed=cfg.seed,
    )


def save_generator(path: Path, gen: ResnetGenerator, ngf: int, n_blocks: int, iteration: int) -> None:
    meta = {"format": GEN_FORMAT, "ngf": str(ngf), "n_blocks": str(n_blocks), "iteration": str(iteration)}
    with replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in gen.state_dict().items()}, str(tmp), metadata=meta)


def _read_meta(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - anything unreadable is a bad model file
        raise ModelError(f"{path}: not a safetensors file ({e})") from None


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> ResnetGenerator:
    """A source -> target generator saved by :func:`train_cyclegan`, in eval mode on ``device``."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: generator checkpoint not found")
    meta = _read_meta(p)
    if meta.get("format") != GEN_FORMAT:
        raise ModelError(f"{p}: not a wsiseg CycleGAN generator (format {meta.get('format')!r})")
    gen = ResnetGenerator(3, 3, int(meta["ngf"]), int(meta["n_blocks"]))
    try:
        gen.load_state_dict(load_file(str(p)))
    except RuntimeError as e:
        raise ModelError(f"{p}: weights do not match the declared architecture ({str(e).splitlines()[0]})") from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return gen.to(dev).eval()


# ------------------------------------------------------------------------------------------------ training


def train_cyclegan(
    source_dir: str | Path,
    target_images: str | Path | Sequence[np.ndarray],
    out_dir: str | Path,
    cfg: CycleGANConfig | None = None,
    resume: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train the CycleGAN (A = ``source_dir/images/*.png``, B = ``target_images``: uint8 HxWx3 tiles at least
    ``cfg.crop`` square, or a directory of PNGs); returns the path of ``generator_ab.safetensors``."""
    cfg = cfg or CycleGANConfig()
    out_dir = Path(out_dir)
    gen_path = out_dir / "generator_ab.safetensors"
    ckpt_path = out_dir / "cyclegan_ckpt.safetensors"
    if resume and gen_path.is_file() and _read_meta(gen_path).get("iteration") == str(cfg.iterations):
        return gen_path
    src = _ImageSource(Path(source_dir) / "images", "source")
    tgt = _ImageSource(target_images, "target")
    try:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create ({e.strerror})") from None
    save_yaml(cfg, out_dir / "cyclegan.yaml")

    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    model = _build(cfg).to(dev)
    decay_start = int(round(cfg.decay_start * cfg.iterations))
    sched_g, sched_d = model.make_optimizers(cfg.lr, cfg.betas, cfg.iterations, decay_start)
    start = 0
    if resume and ckpt_path.is_file():
        start = _load_checkpoint(ckpt_path, model, cfg, dev)
        f = linear_decay_lambda(cfg.iterations, decay_start)
        for opt, sch in ((model.opt_g, sched_g), (model.opt_d, sched_d)):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * f(start)
            sch.last_epoch = start
            sch._last_lr = [g["lr"] for g in opt.param_groups]
    model.train()
    autocast = dev.type == "cuda" and cfg.amp
    preview = to_tensor([_sample(src, np.random.default_rng([cfg.seed, 2**31]), cfg.crop, False)], dev)

    log_path = out_dir / "log.csv"
    new_log = not log_path.is_file()
    logf = open(log_path, "a", newline="")
    writer = None
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("cyclegan"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar = Progress(*columns, TextColumn("{task.fields[msg]}"), console=Console(stderr=True))
        task = bar.add_task("cyclegan", total=cfg.iterations, completed=start, msg="")
        bar.start()
    t0 = time.time()
    try:
        for it in range(start, cfg.iterations):
            rng = np.random.default_rng([cfg.seed, it])
            real_a = to_tensor([_sample(src, rng, cfg.crop, cfg.augment) for _ in range(cfg.batch_size)], dev)
            real_b = to_tensor([_sample(tgt, rng, cfg.crop, cfg.augment) for _ in range(cfg.batch_size)], dev)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                losses = model.train_step(real_a, real_b)
            sched_g.step()
            sched_d.step()
            done = it + 1
            if done % cfg.log_every == 0 or done == cfg.iterations:
                lr_now = model.opt_g.param_groups[0]["lr"]
                row = {"iteration": done, "lr": lr_now, "seconds": round(time.time() - t0, 2)}
                row.update({k: round(v, 5) for k, v in losses.items()})
                if writer is None:
                    writer = csv.DictWriter(logf, fieldnames=list(row))
                    if new_log:
                        writer.writeheader()
                writer.writerow(row)
                logf.flush()
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                _save_checkpoint(ckpt_path, model, cfg, done)
                model.g_ab.eval()
                with torch.no_grad():
                    s = to_uint8(model.g_ab(preview))[0]
                model.g_ab.train()
                write_rgb(out_dir / "samples" / f"{done:07d}.png", np.hstack([to_uint8(preview)[0], s]))
            if bar is not None:
                bar.update(task, completed=done, msg=f"G {losses['g']:.3f} D {losses['d_a'] + losses['d_b']:.3f}")
    finally:
        logf.close()
        if bar is not None:
            bar.stop()
    save_generator(gen_path, model.g_ab, cfg.ngf, cfg.n_blocks, cfg.iterations)
    return gen_path


def _save_checkpoint(path: Path, model: CycleGAN, cfg: CycleGANConfig, iteration: int) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(_optim_tensors("opt_g", model.opt_g))
    tensors.update(_optim_tensors("opt_d", model.opt_d))
    meta = {"format": CKPT_FORMAT, "iteration": str(iteration), "config": json.dumps(to_dict(cfg))}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _load_checkpoint(path: Path, model: CycleGAN, cfg: CycleGANConfig, dev: torch.device) -> int:
    meta = _read_meta(path)
    if meta.get("format") != CKPT_FORMAT:
        raise ModelError(f"{path}: not a wsiseg CycleGAN checkpoint")
    saved = json.loads(meta.get("config", "{}"))
    arch = ("ngf", "ndf", "n_blocks", "n_layers_d")
    if any(saved.get(k) != getattr(cfg, k) for k in arch):
        raise ModelError(f"{path}: checkpoint architecture {({k: saved.get(k) for k in arch})} differs from the config")
    tensors = load_file(str(path), device=str(dev))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optim("opt_g", model.opt_g, tensors)
    _load_optim("opt_d", model.opt_d, tensors)
    return int(meta["iteration"])


# ------------------------------------------------------------------------------------------------ translation


def translate_dir(
    source_dir: str | Path,
    generator_ckpt: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Translate ``source_dir/images/*.png`` with the generator to ``out_dir/images`` (same names and sizes) and copy
    ``source_dir/labels/*.png`` to ``out_dir/labels``; pairs already present are skipped. Returns ``out_dir``."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if source_dir.resolve() == out_dir.resolve():
        raise ConfigError(f"{out_dir}: the translation must not overwrite its source directory")
    paths = sorted((source_dir / "images").glob("*.png"))
    if not paths:
        raise InputError(f"{source_dir / 'images'}: no source PNG images found")
    dev = resolve_device(device)
    gen = load_generator(generator_ckpt, dev)
    for sub in ("images", "labels"):
        try:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out_dir / sub}: cannot create ({e.strerror})") from None
    todo = [p for p in paths if not all((out_dir / s / p.name).is_file() for s in ("images", "labels"))]
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True))
        task = bar.add_task("translate", total=len(todo))
        bar.start()
    try:
        i = 0
        while i < len(todo):
            first = read_rgb(todo[i])
            batch, names = [first], [todo[i]]
            i += 1
            while i < len(todo) and len(batch) < batch_size:
                im = read_rgb(todo[i])
                if im.shape != first.shape:
                    break
                batch.append(im)
                names.append(todo[i])
                i += 1
            x, (h, w) = pad_to_multiple(to_tensor(batch, dev), 4)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                y = to_uint8(gen(x)[..., :h, :w])
            for p, rgb in zip(names, y):
                lab = source_dir / "labels" / p.name
                if not lab.is_file():
                    raise InputError(f"{lab}: labels missing for {p.name}")
                _atomic_write(out_dir / "labels" / p.name, lab.read_bytes())
                write_rgb(out_dir / "images" / p.name, rgb)
            if bar is not None:
                bar.update(task, advance=len(names))
    finally:
        if bar is not None:
            bar.stop()
    return out_dir
