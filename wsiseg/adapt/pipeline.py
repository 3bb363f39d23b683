"""``wsiseg adapt``: labelled fluorescence (BBBC039) + a hospital's unlabelled slides -> a PDAM model for them.

Stages (each resumable, each skipped when its outputs are complete, ``--force`` redoes them):

    source     BBBC039 -> labelled, inverted 256x256 crops (train) and whole images (val)   out/source/{train,val}
    target     target slides/images -> tissue tiles at the model's resolution                out/target
    translate  CycleGAN trained on source vs target, then source -> synthesised H&E            out/cyclegan, out/synth/
    inpaint    nuclei inpainting (eq. 1-2) of the synthesised images                         out/inpainted/
    pseudo     only when train.pseudo_fraction > 0 (not in the paper): pseudo-labels of the
               target tiles by the watershed or a teacher model (pseudo.teacher), mixed into
               the labelled crops (self-training)                                             out/pseudo/
    negatives  only when train.negative_fraction > 0 (not in the paper): glass tiles of the
               target slides (outside their tissue mask), empty crops for training           out/negatives/
    train      PDAM on synthesised source (+ masks) and real target tiles; val on synth val   out/pdam/
    -> out/model.safetensors (usable by ``wsiseg run --model``) and out/adapt_record.json

A stage is complete when its ``.done`` marker exists and records the same configuration; ``--stages`` runs a subset.
Target labels are never read.
"""



import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_yaml, to_dict
from ..errors import ConfigError, InputError
from .target import TargetConfig

STAGES = ("source", "target", "translate", "inpaint", "pseudo", "negatives", "train")


def _cfg_types():
    from ..models.pdam import PDAMConfig
    from ..trainer import TrainConfig
    from .source import SourceConfig
    from .translate import CycleGANConfig

    return SourceConfig, CycleGANConfig, PDAMConfig, TrainConfig


@dataclass
class PseudoConfig:
    """The pseudo stage (used when ``train.pseudo_fraction > 0``)."""

    min_solidity: float = 0.0  # > 0: drop and inpaint pseudo-instances less solid than this (fragments)
    teacher: str = ""  # a model file (e.g. an earlier round's model.safetensors) labels the tiles; "": the watershed
    min_score: float = 0.5  # a teacher's detections scoring below this are not labels
    tta: int = 0  # 4 or 8: the teacher labels with test-time augmentation (its heads averaged over 4 or 8 views)
    semantic_fusion: bool = False  # the teacher's masks averaged with its semantic branch (wsiseg run --semantic-fusion)
    ensemble: list[str] = field(default_factory=list)  # more model files or bundled names, averaged (--ensemble)
    drop_white: bool = True  # a teacher's detections on white (glass, fat, lumen) are not labels (wsiseg.background)

    def validate(self) -> None:
        if self.tta not in (0, 4, 8):
            raise ConfigError(f"pseudo.tta: must be 0 (off), 4 or 8 views (got {self.tta})")
        if self.tta and not self.teacher:
            raise ConfigError("pseudo.tta: needs a model teacher (pseudo.teacher)")
        if not 0 <= self.min_solidity <= 1:
            raise ConfigError(f"pseudo.min_solidity: must be in [0, 1] (got {self.min_solidity})")
        if not 0 <= self.min_score <= 1:
            raise ConfigError(f"pseudo.min_score: must be in [0, 1] (got {self.min_score})")
        if self.teacher and not Path(self.teacher).is_file():
            raise ConfigError(f"pseudo.teacher: {self.teacher}: no such model file")
        if (self.semantic_fusion or self.ensemble) and not self.teacher:
            raise ConfigError("pseudo.semantic_fusion and pseudo.ensemble need a model teacher (pseudo.teacher)")
        if self.ensemble:
            from ..api import BUNDLED_MODELS  # (only with an ensemble: the API is heavier than this module)
        for m in self.ensemble:
            if m not in BUNDLED_MODELS and not Path(m).is_file():
                raise ConfigError(f"pseudo.ensemble: {m}: no such model file")


@dataclass
class NegativesConfig:
    """The negatives stage (used when ``train.negative_fraction > 0``): glass tiles of the target slides."""

    per_slide: int = 32  # at most this many glass tiles of each target slide
    min_white: float = 0.95  # share of a tile's pixels that must be white (wsiseg.background.white_mask)

    def validate(self) -> None:
        if self.per_slide < 0 or not 0 < self.min_white <= 1:
            raise ConfigError("negatives: per_slide must be >= 0 and min_white in (0, 1]")


@dataclass
class InpaintConfig:
    enabled: bool = True  # False: the "w/o NI" ablation trains on the raw synthesised images
    radius: int = 3
    mode: str = "pixels"


def _adapt_config_class():
    SourceConfig, CycleGANConfig, PDAMConfig, TrainConfig = _cfg_types()

    @dataclass
    class AdaptConfig:
        source: SourceConfig = field(default_factory=SourceConfig)
        target: TargetConfig = field(default_factory=TargetConfig)
        cyclegan: CycleGANConfig = field(default_factory=CycleGANConfig)
        inpaint: InpaintConfig = field(default_factory=InpaintConfig)
        pseudo: PseudoConfig = field(default_factory=PseudoConfig)
        negatives: NegativesConfig = field(default_factory=NegativesConfig)
        model: PDAMConfig = field(default_factory=PDAMConfig)
        train: TrainConfig = field(default_factory=TrainConfig)
        val_images: int = 0  # validation images used by the trainer (0 = all of the val split)
        source_only: bool = False  # baseline: no target images in PDAM training (no adaptation)

    return AdaptConfig


def load_config(path: str | Path | None, overrides: list[str] | None = None):
    return load_yaml(_adapt_config_class(), path, overrides)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stage:
    def __init__(self, out: Path, name: str, cfg, force: bool) -> None:
        self.marker = out / f".{name}.done"
        self.key = _hash(cfg)
        self.force = force
        self.name = name
        # outputs left by a run with another configuration are removed, not resumed (they would be mixed in)
        self.redo = force or (self.marker.exists() and not self.done())

    def done(self) -> bool:
        if self.force or not self.marker.exists():
            return False
        try:
            return json.loads(self.marker.read_text()).get("config") == self.key
        except (OSError, ValueError):
            return False

    def finish(self, **info) -> None:
        self.marker.write_text(json.dumps({"config": self.key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}))


def adapt(source_dir: str | Path, targets: list[str | Path], out_dir: str | Path, cfg, stages=STAGES,
          force: bool = False, device: str = "auto", progress: bool = True, log=print) -> Path | None:
    """Run the requested stages; returns the model path once the train stage has run (else None)."""
    from ..trainer import load_pair_dir, train
    from .inpaint import inpaint_dir
    from .source import prepare_source
    from .target import sample_target
    from .translate import train_cyclegan, translate_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {', '.join(bad)} (stages: {', '.join(STAGES)})")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))

    def stage(name: str, conf) -> _Stage | None:
        st = _Stage(out, name, conf, force)
        if name not in stages:
            return None
        if st.done():
            log(f"[{name}] complete, skipped (use --force to redo)")
            return None
        log(f"[{name}] running")
        return st

    if st := stage("source", cfg.source):
        if st.redo:
            shutil.rmtree(out / "source", ignore_errors=True)
        for split in ("train", "val"):
            prepare_source(source_dir, out / "source" / split, cfg.source, split=split, progress=progress)
        st.finish()
    target_key = (cfg.target, [str(t) for t in targets], cfg.model.mpp)  # what the target tiles depend on
    if st := stage("target", target_key):
        if st.redo:
            shutil.rmtree(out / "target", ignore_errors=True)
        sample_target(targets, out / "target", cfg.target, cfg.model.mpp, progress=progress)
        st.finish(tiles=len(list((out / "target" / "images").glob("*.png"))))
    if st := stage("translate", (cfg.source, cfg.target, cfg.cyclegan)):
        if st.redo:
            for d in ("cyclegan", "synth"):
                shutil.rmtree(out / d, ignore_errors=True)
        _need(out / "source" / "train" / "images", "source")
        _need(out / "target" / "images", "target")
        gen = train_cyclegan(out / "source" / "train", out / "target" / "images", out / "cyclegan", cfg.cyclegan,
                             resume=True, device=device, progress=progress)
        for split in ("train", "val"):
            translate_dir(out / "source" / split, gen, out / "synth" / split, device=device, progress=progress)
        st.finish()
    if st := stage("inpaint", (cfg.source, cfg.target, cfg.cyclegan, cfg.inpaint)):
        if st.redo:
            shutil.rmtree(out / "inpainted", ignore_errors=True)
        _need(out / "synth" / "train" / "images", "translate")
        for split in ("train", "val"):
            inpaint_dir(out / "synth" / split, out / "inpainted" / split, radius=cfg.inpaint.radius,
                        mode=cfg.inpaint.mode, progress=progress)
        st.finish()
    if cfg.train.pseudo_fraction > 0 and (st := stage("pseudo", (*target_key, cfg.pseudo, _teacher_digest(cfg)))):
        from .pseudo import pseudo_label_dir

        if st.redo:
            shutil.rmtree(out / "pseudo", ignore_errors=True)
        _need(out / "target" / "images", "target")
        teacher = None
        if cfg.pseudo.teacher:
            from ..api import load_model, set_ensemble, set_min_score, set_semantic_fusion, set_tta

            teacher = load_model(cfg.pseudo.teacher, device=device)
            set_ensemble(teacher, cfg.pseudo.ensemble)
            set_min_score(teacher, cfg.pseudo.min_score)
            if cfg.pseudo.tta:
                set_tta(teacher, cfg.pseudo.tta)
            if cfg.pseudo.semantic_fusion:
                set_semantic_fusion(teacher, True)
        pseudo_label_dir(out / "target" / "images", out / "pseudo", progress=progress,
                         min_solidity=cfg.pseudo.min_solidity, radius=cfg.inpaint.radius, teacher=teacher,
                         drop_white=cfg.pseudo.drop_white)
        st.finish(tiles=len(list((out / "pseudo" / "labels").glob("*.png"))))
    if cfg.train.negative_fraction > 0 and (st := stage("negatives", (*target_key, cfg.negatives))):
        from .target import sample_background

        if st.redo:
            shutil.rmtree(out / "negatives", ignore_errors=True)
        n = sample_background(targets, out / "negatives", cfg.target, cfg.model.mpp, cfg.negatives.per_slide,
                              cfg.negatives.min_white)
        log(f"[negatives] {n} glass tiles of the target slides (the rest of the negatives are synthetic)")
        st.finish(tiles=n)
    if "train" not in stages:
        return None
    st = _Stage(out, "train", cfg, force)
    model_path = out / "model.safetensors"
    if st.done() and model_path.exists():
        log("[train] complete, skipped (use --force to redo)")
        return model_path
    log("[train] running")
    src_root = out / ("inpainted" if cfg.inpaint.enabled else "synth")
    _need(src_root / "train" / "images", "inpaint" if cfg.inpaint.enabled else "translate")
    source = load_pair_dir(src_root / "train")
    val = load_pair_dir(src_root / "val")
    if cfg.val_images:
        val = val[:cfg.val_images]
    target = None
    if not cfg.source_only:
        from ..trainer import load_image_dir

        target = load_image_dir(out / "target" / "images")
    pseudo = None
    if cfg.train.pseudo_fraction > 0:
        _need(out / "pseudo" / "labels", "pseudo")
        pseudo = load_pair_dir(out / "pseudo")
    negatives = None
    if cfg.train.negative_fraction > 0 and (out / "negatives").is_dir() and any((out / "negatives").glob("*.png")):
        from ..trainer import load_image_dir

        negatives = load_image_dir(out / "negatives")
    if st.redo:
        shutil.rmtree(out / "pdam", ignore_errors=True)
    final = train(cfg.model, cfg.train, source, target, out / "pdam", val=val, resume=True, device=device,
                  progress=progress, pseudo=pseudo, negatives=negatives)
    shutil.copyfile(final, model_path)
    record = {"command": " ".join(sys.argv), "source": str(source_dir), "targets": [str(t) for t in targets],
              "config": to_dict(cfg), "source_images": len(source), "target_images": len(target or []),
              "pseudo_images": len(pseudo or []), "negative_images": len(negatives or []),
              "val_images": len(val)}
    metrics = out / "pdam" / "metrics.json"
    if metrics.exists():
        record["validation"] = json.loads(metrics.read_text())
    (out / "adapt_record.json").write_text(json.dumps(record, indent=1, default=str))
    st.finish()
    log(f"[train] model written to {model_path}")
    return model_path


def _teacher_digest(cfg) -> str:
    """The content hash of the teacher's files (a retrained teacher or ensemble member at the same path redoes the
    pseudo stage); "" without."""
    if not cfg.pseudo.teacher:
        return ""
    from ..api import model_path

    digests = [_file_digest(model_path(p)) for p in (cfg.pseudo.teacher, *cfg.pseudo.ensemble)]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _need(p: Path, stage: str) -> None:
    if not p.is_dir() or not any(p.iterdir()):
        raise InputError(f"{p}: missing; run the '{stage}' stage first")


# ------------------------------------------------------------------------------------------------- command line
def add_parser(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser("adapt", help="train a model for unlabelled target slides (CycleGAN + inpainting + PDAM)")
    a.add_argument("--source", required=True, help="BBBC039 directory (images/, masks/, splits/)")
    a.add_argument("--target", nargs="+", required=True, help="target slides/images, or directories of them")
    a.add_argument("--out", required=True, help="working/output directory")
    a.add_argument("--config", default=None,
                   help="YAML config (default: the paper's own configuration, sized for a GPU: R101 PDAM for 24,000 "
                        "iterations after a full CycleGAN, days on a CPU; configs/kumar_lite.yaml is the CPU-sized "
                        "recipe of the bundled model)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config value (repeatable), e.g. --set inpaint.enabled=false "
                        "--set source_only=true --set train.iterations=800")
    a.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    a.add_argument("--force", action="store_true", help="redo the selected stages")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a.add_argument("--target-mpp", type=float, help="um/px of target images that do not say (Kumar: 0.25)")
    a.add_argument("--quiet", action="store_true")
    return a


def run(args: argparse.Namespace) -> int:
    from ..cli import _expand_inputs

    cfg = load_config(args.config, args.overrides)
    if args.config is None:
        print(f"wsiseg: note: no --config: the paper's configuration (ResNet-{cfg.model.backbone.depth} PDAM, "
              f"{cfg.train.iterations} iterations; CycleGAN {cfg.cyclegan.iterations}), sized for a GPU and days on a "
              "CPU; on a CPU pass --config configs/kumar_lite.yaml", file=sys.stderr)
    if args.target_mpp is not None:
        cfg.target.mpp = args.target_mpp
    src = Path(args.source)
    if not src.is_dir():
        raise InputError(f"{src}: not a directory (expected BBBC039's images/, masks/, splits/)")
    targets = _expand_inputs(args.target)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    path = adapt(src, targets, args.out, cfg, stages=stages, force=args.force, device=args.device,
                 progress=not args.quiet and sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr))
    if path is not None:
        print(f"model: {path}   (use: wsiseg run SLIDE --model {path} --out nuclei.geojson)")
    return 0
