"""The configuration of ``wsiseg adapt`` (:func:`load_config`): one section per stage and model, read from a YAML
file with ``--set``-style overrides. The recipes (:mod:`wsiseg.adapt.recipes`) build it; the pipeline
(:mod:`wsiseg.adapt.pipeline`) runs it.
"""

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from ..models.config import load_yaml
from .target import TargetConfig


def _cfg_types():
    from ..models.pdam import PDAMConfig
    from ..train.trainer import TrainConfig
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
    drop_white: bool = True  # a teacher's detections on white (glass, fat, lumen) are not labels (eval.background)
    drop_pale: float = 0.0  # f > 0: detections with a mean haematoxylin below f x their slide's median are not labels
    # the labeller sees each slide's tiles in the Kumar train images' stain (pseudo.normalise_stain); the student
    # trains on the tiles as they are
    stain_norm: bool = False

    def validate(self) -> None:
        if self.tta not in (0, 4, 8):
            raise ConfigError(f"pseudo.tta: must be 0 (off), 4 or 8 views (got {self.tta})")
        if self.tta and not self.teacher:
            raise ConfigError("pseudo.tta: needs a model teacher (pseudo.teacher)")
        if not 0 <= self.min_solidity <= 1:
            raise ConfigError(f"pseudo.min_solidity: must be in [0, 1] (got {self.min_solidity})")
        if not 0 <= self.min_score <= 1:
            raise ConfigError(f"pseudo.min_score: must be in [0, 1] (got {self.min_score})")
        if not 0 <= self.drop_pale < 1:
            raise ConfigError(f"pseudo.drop_pale: must be in [0, 1) (got {self.drop_pale})")
        if self.teacher and not Path(self.teacher).is_file():
            raise ConfigError(f"pseudo.teacher: {self.teacher}: no such model file")
        if (self.semantic_fusion or self.ensemble) and not self.teacher:
            raise ConfigError("pseudo.semantic_fusion and pseudo.ensemble need a model teacher (pseudo.teacher)")
        if self.ensemble:
            from ..segmenters.registry import BUNDLED_MODELS  # (only with an ensemble)
        for m in self.ensemble:
            if m not in BUNDLED_MODELS and not Path(m).is_file():
                raise ConfigError(f"pseudo.ensemble: {m}: no such model file")


@dataclass
class NegativesConfig:
    """The negatives stage (used when ``train.negative_fraction > 0``): glass tiles of the target slides."""

    per_slide: int = 32  # at most this many glass tiles of each target slide
    min_white: float = 0.95  # share of a tile's pixels that must be white (wsiseg.eval.background.white_mask)

    def validate(self) -> None:
        if self.per_slide < 0 or not 0 < self.min_white <= 1:
            raise ConfigError("negatives: per_slide must be >= 0 and min_white in (0, 1]")


@dataclass
class InpaintConfig:
    enabled: bool = True  # False: the "w/o NI" ablation trains on the raw synthesised images
    radius: int = 3
    mode: str = "pixels"

    def validate(self) -> None:  # (checked when the config is read, not when the stage starts minutes later)
        from .inpaint import MODES

        if self.mode not in MODES or self.radius < 0:
            raise ConfigError(f"inpaint: mode must be one of {', '.join(MODES)} and radius >= 0 (got {self.mode!r}, "
                              f"{self.radius})")


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
        rounds: int = 1  # self-training rounds at most (each labelled by the last kept model; wsiseg.adapt.report)
        report_tiles: int = 64  # target tiles the unlabelled report measures each model on

        def validate(self) -> None:
            if self.rounds < 1 or self.report_tiles < 1:
                raise ConfigError("rounds and report_tiles must be >= 1")
            if self.rounds > 1 and not self.pseudo.teacher:
                raise ConfigError("rounds > 1 needs a model teacher (pseudo.teacher): each round is labelled by the "
                                  "last kept model")
            if self.target.zoom and not self.pseudo.teacher:
                raise ConfigError("target.zoom: needs a model teacher (pseudo.teacher), whose nuclei's size it uses")

    return AdaptConfig


def load_config(path: str | Path | None, overrides: list[str] | None = None):
    return load_yaml(_adapt_config_class(), path, overrides)
