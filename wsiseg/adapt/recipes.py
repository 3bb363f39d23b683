"""The recipes of ``wsiseg adapt``: what one command runs, sized for the device it runs on.

``finetune`` (the default) starts from a trained model (the bundled ``default``) and adapts it to the target
slides: the target's tissue tiles labelled by that model (TTA over 4 views, semantic fusion, its own score
threshold, each slide seen in the stain it was adapted to; detections on white and those far paler than the slide's
typical one left out), the target's glass and
tissue with its haematoxylin removed as negatives, glass holes cut into labelled crops, copies of single nuclei
pasted against others, HED stain augmentation, synthesised source crops (CycleGAN + nuclei inpainting) beside them,
1,600 iterations; then the unlabelled report (:mod:`wsiseg.adapt.report`) decides whether the student is kept
and whether another round runs. It is the recipe of the bundled model's last round.

``paper`` is the paper's own recipe: CycleGAN + nuclei inpainting + PDAM with its three discriminators, from
scratch. On a GPU it runs the paper's configuration (ResNet-101, 24,000 iterations after a 20,000-iteration
CycleGAN); on a CPU ``configs/kumar_lite.yaml`` (ResNet-18 PDAM-lite, 800 iterations).

A recipe is a base configuration (a YAML file, or the paper's defaults), settings over it and a schedule (the
iterations) over its own base; ``--config`` replaces the base and brings its own schedule, ``--set`` overrides
anything last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..core.errors import ConfigError
from .config import load_config

CONFIGS = Path(str(resources.files("wsiseg") / "configs"))


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    base_cpu: str | None  # a file of wsiseg/configs, or None: the paper's defaults (the dataclasses')
    base_gpu: str | None
    settings: dict = field(default_factory=dict)  # dotted key -> value, over the base
    schedule: dict = field(default_factory=dict)  # over the recipe's own base only: a --config brings its own
    rounds_cpu: int = 1
    rounds_gpu: int = 1
    starts_from_model: bool = False  # train.init and pseudo.teacher = --start


FINETUNE = Recipe(
    "finetune", "start from a trained model (--start, default: the bundled 'default'); self-training on the target's "
    "tiles labelled by it, negatives from the target's glass, stain augmentation; rounds kept only when the "
    "unlabelled report says the student is no worse",
    "kumar_lite.yaml", "kumar_lite.yaml",
    {"source_only": True,  # the target reaches the model through its pseudo-labelled tiles (docs/experiments.md)
     "train.pseudo_fraction": 0.5, "train.stain_jitter": 0.5,
     "train.negative_fraction": 0.2, "train.negative_eosin": 0.5, "train.white_out": 0.3, "train.seed": 5,
     "pseudo.tta": 4, "pseudo.semantic_fusion": True,
     # the teacher's outlines of pale stroma gaps are not labels: on the sample the student drew 55% fewer
     # (docs/precision.md, "The target's own pale outlines as negatives"); on Kumar 6 of 8,291 labels go
     "pseudo.drop_pale": 0.25,
     # the teacher labels each slide's tiles mapped onto the stain it was adapted to (Macenko, per slide); the student
     # learns them on the tiles as they are. Development set: re-stained as another lab, the student's AJI +0.0072
     # +- 0.0019; as they are, -0.0005 +- 0.0015 (docs/adapt.md, "The teacher sees the stain it knows")
     "pseudo.stain_norm": True,
     # copies of single nuclei pasted against others, eight tries a crop: the bundled rounds 6-8 (docs/precision.md)
     "train.touching": 1.0, "train.touching_copies": 8},
    # twice kumar_lite's 800 iterations: round 8 of the bundled model (development set: AJI +0.005 over 800)
    schedule={"train.iterations": 1600},
    rounds_cpu=1, rounds_gpu=3, starts_from_model=True)

PAPER = Recipe(
    "paper", "the paper's recipe from scratch: CycleGAN + nuclei inpainting + PDAM with its three discriminators "
    "(GPU: ResNet-101, 24,000 iterations; CPU: configs/kumar_lite.yaml)",
    "kumar_lite.yaml", None)

RECIPES = {r.name: r for r in (FINETUNE, PAPER)}


def build_config(recipe: str, device: str, config: str | Path | None = None, overrides: list[str] | None = None,
                 start: str = "default"):
    """The :class:`AdaptConfig` of ``recipe`` on ``device`` ("cpu"/"cuda..."): base (``config`` or the recipe's for
    the device), the recipe's settings (and its schedule, unless ``config`` replaces the base), the start model's
    weights and whole model section (finetune), ``overrides``."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe: unknown recipe {recipe!r} (recipes: {', '.join(RECIPES)})")
    r = RECIPES[recipe]
    gpu = str(device).startswith("cuda")
    base = config if config is not None else (r.base_gpu if gpu else r.base_cpu)
    if base is not None and config is None:
        base = CONFIGS / base
    settings = [f"{k}={_yaml(v)}" for k, v in r.settings.items()]
    if config is None:
        settings += [f"{k}={_yaml(v)}" for k, v in r.schedule.items()]
    settings.append(f"rounds={r.rounds_gpu if gpu else r.rounds_cpu}")
    if r.starts_from_model:
        path, model = start_model(start)
        # the start's whole model section replaces the base's (its architecture, inference settings, tile and
        # scale: a student runs as its start was chosen to run); --set model.X still overrides it
        settings += [f"train.init={path}", f"pseudo.teacher={path}", f"pseudo.min_score={model['roi']['score_thresh']}",
                     f"model={_flow(model)}"]
    return load_config(base, settings + list(overrides or []))


def start_model(name: str) -> tuple[str, dict]:
    """The file of ``name`` (a bundled model's name or a path) and its model section as the checkpoint holds it
    (architecture, score threshold, inference tile, scale: what the student keeps); ConfigError when unusable."""
    from ..api import BUNDLED_MODELS, BUILTIN_MODELS, model_path
    from ..core.errors import ModelError
    from ..models.checkpoint import load_pdam
    from ..models.config import to_dict

    if name in BUILTIN_MODELS and name not in BUNDLED_MODELS:
        raise ConfigError(f"--start: {name} is not a PDAM model (the finetune recipe needs one to start from)")
    try:
        path = model_path(name)
        _, cfg = load_pdam(path, device="cpu")  # every check of `wsiseg run`'s loading: a start that runs
    except ModelError as e:
        raise ConfigError(f"--start: {e}") from None
    model = to_dict(cfg)
    model["roi"]["score_thresh"] = round(float(cfg.roi.score_thresh), 4)
    return str(path), model


def _flow(section: dict) -> str:
    """``section`` as one line of YAML that reads back as it is (JSON would not: YAML reads ``1e-05`` as a string)."""
    return yaml.safe_dump(section, default_flow_style=True, width=1 << 30).strip()


def _yaml(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)


# Seconds per unit of work, measured with the kumar_lite sizes (`wsiseg adapt` record's stage_seconds; docs/adapt.md):
# on a 2-core CPU with the run alone (16 Kumar images: translate 174-184 s, pseudo 52, train 226-256 for 800
# iterations, report 11-12 for 64 tiles; two runs sharing it with torch's default threads were up to 15x slower, a
# cost no estimate should carry) and on an H200 with 16 host cores (one round on 6 Kumar
# images, `benchmarks/gpu_check.sh adapt`; the translate stage's 35.9 s split between the CycleGAN's iterations and
# the crops it translates by assumption). Larger sizes are scaled from these: on a CPU by area and width; on a GPU
# the small CycleGAN is bound by kernel launches, not arithmetic, so its rate is kept for the paper's sizes (a
# guess: ~700 GFLOP an iteration there), and R101's trainer ran at 6.4 it/s with its discriminators
# (docs/experiments.md).
_RATES = {
    "cpu": {"source_crop": 0.01, "target_slide": 1.0, "cyclegan_it": 0.4, "translate_crop": 0.06, "inpaint_crop": 0.012,
            "pseudo_tile": 0.21, "negatives_slide": 1.0, "train_it": 0.31, "report_tile": 0.046,
            "r101": 4.0, "cyclegan_by_size": True},
    "cuda": {"source_crop": 0.009, "target_slide": 0.08, "cyclegan_it": 0.1, "translate_crop": 0.005,
             "inpaint_crop": 0.011, "pseudo_tile": 0.027, "negatives_slide": 0.02, "train_it": 0.069,
             "report_tile": 0.013, "r101": 1.4, "cyclegan_by_size": False},
}


def estimate(cfg, n_targets: int, device: str, tiles: int | None = None) -> dict[str, float]:
    """Seconds each stage will take, roughly (``_RATES``), for ``cfg`` and ``n_targets`` slides/images of which
    the target stage draws ``tiles`` tiles (None: ``per_slide`` from each; :func:`wsiseg.adapt.target.tiles_to_draw`
    counts them for given inputs); the trainer's rate scales with the square of its crop size and the backbone, the
    CycleGAN's (on a CPU) with its crop's area and its width."""
    r = _RATES["cuda" if str(device).startswith("cuda") else "cpu"]
    if tiles is None:
        tiles = n_targets * cfg.target.per_slide(n_targets)
    crops = cfg.source.n_crops
    cg = r["cyclegan_it"]
    if r["cyclegan_by_size"]:
        cg *= (cfg.cyclegan.crop / 128) ** 2 * (cfg.cyclegan.ngf / 16) * (cfg.cyclegan.n_blocks / 6)
    it = r["train_it"] * (cfg.train.crop_size / 256) ** 2 * (r["r101"] if cfg.model.backbone.depth > 50 else 1.0)
    if not cfg.source_only:
        it *= 1.6  # the target batch and the discriminators
    views = max(1, cfg.pseudo.tta) / 4
    out = {"source": crops * r["source_crop"], "target": n_targets * r["target_slide"],
           "translate": cfg.cyclegan.iterations * cg + crops * r["translate_crop"], "inpaint": crops * r["inpaint_crop"]}
    rounds = max(1, cfg.rounds)
    if cfg.train.pseudo_fraction > 0:
        out["pseudo"] = rounds * tiles * r["pseudo_tile"] * views
    if cfg.train.negative_fraction > 0:
        out["negatives"] = n_targets * r["negatives_slide"]
    out["train"] = rounds * cfg.train.iterations * it
    out["report"] = rounds * min(tiles, cfg.report_tiles) * r["report_tile"] * 4  # 2 models x (tile, mirror)
    return out
