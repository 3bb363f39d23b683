"""The model registry: the models by name (the bundled PDAM weights, the watershed), loading one
(:func:`load_model`), and the model options set on a loaded segmenter (score threshold, test-time augmentation,
semantic fusion, ensemble, precision). :mod:`wsiseg.api` re-exports every public name; the run
(:mod:`wsiseg.wsi.run`) and the predicting process use them from here."""

from __future__ import annotations

import contextlib
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..core.errors import ConfigError, ModelError
from .base import (Augmenting, Ensemble, MixedPrecision, ScoreThresholded, Segmenter, SemanticFusing, describe,
                   on_gpu)

if TYPE_CHECKING:
    from ..options import RunOptions

__all__ = ["BUILTIN_MODELS", "BUNDLED_MODELS", "PRECISIONS", "bundled_weights", "check_min_score", "load_model",
           "model_label", "model_path", "native_bf16", "set_ensemble", "set_min_score", "set_precision",
           "set_semantic_fusion", "set_tta"]

#: the bundled PDAM weights, by name: ``default`` (the model of ``wsiseg run``) and ``vesicular`` (``default`` trained
#: once more with pale-interior nuclei in its training crops, ``train.vesicular=0.5``; docs/models.md)
BUNDLED_MODELS = ("default", "vesicular")
BUILTIN_MODELS = (*BUNDLED_MODELS, "watershed")


def bundled_weights(name: str = "default") -> Path | None:
    """The bundled PDAM weights ``name`` (:data:`BUNDLED_MODELS`), if this installation has them."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"no bundled model {name!r} (bundled: {', '.join(BUNDLED_MODELS)})")
    try:
        p = resources.files("wsiseg") / "weights" / f"{name}.safetensors"
        return Path(str(p)) if p.is_file() else None
    except (FileNotFoundError, ModuleNotFoundError):
        return None


def model_path(name_or_path: str | Path) -> Path:
    """The checkpoint file of a bundled model's name or of a path (a directory: its ``model.safetensors``, else its
    last ``.safetensors``); ModelError when there is none."""
    name = str(name_or_path)
    if name in BUNDLED_MODELS:
        w = bundled_weights(name)
        if w is None:
            raise ModelError(f"{name}: this installation has no bundled {name} weights")
        return w
    p = Path(name)
    if not p.exists():
        raise ModelError(f"{p}: no such model file (built-in models: {', '.join(BUILTIN_MODELS)})")
    if p.is_dir():
        cand = sorted(p.glob("*.safetensors"))
        final = [c for c in cand if c.name in ("model.safetensors", "final.safetensors")]
        if not cand:
            raise ModelError(f"{p}: directory holds no .safetensors model")
        p = (final or cand)[-1]
    return p


def model_files(seg: Segmenter) -> list[Path]:
    """The checkpoint files ``seg`` was loaded from (its own and its ensemble's further members'; none for a
    classical model or one built in memory): what a run's ids are seeded by besides its settings."""
    info = describe(seg)
    files = []
    for source in (info.source, *info.member_sources):
        if source:
            with contextlib.suppress(ModelError, OSError):
                files.append(model_path(source))
    return files


def _is_watershed(name_or_path: str) -> bool:
    """Whether :func:`load_model` gives the classical watershed for ``name_or_path``: asked by name, or ``default``
    in an installation without bundled weights."""
    return name_or_path == "watershed" or (name_or_path == "default" and bundled_weights() is None)


def load_model(name_or_path: str = "default", device: str = "auto") -> Segmenter:
    """``"watershed"`` (classical), ``"default"`` (bundled PDAM weights, or watershed when none are bundled),
    ``"vesicular"`` (the second bundled PDAM model) or the path of a checkpoint written by ``wsiseg adapt`` / the PDAM
    trainer."""
    from .watershed import WatershedSegmenter

    if _is_watershed(name_or_path):
        return WatershedSegmenter()
    p = model_path(name_or_path)
    try:
        from .rcnn import PDAMSegmenter
    except ImportError as e:  # pragma: no cover - the PDAM predictor ships with the package
        raise ModelError(f"{p}: the PDAM predictor is not available ({e})") from None
    return PDAMSegmenter.from_checkpoint(p, device=device)


def configured_model(options: "RunOptions") -> Segmenter:
    """``options.model`` loaded on ``options.device`` (a name or path; a loaded Segmenter is used as it is) with the
    model options applied: ensemble, min score, test-time views, semantic fusion, precision. What a run and the
    benchmarks build their model with."""
    o = options
    seg = load_model(o.model, o.device) if isinstance(o.model, str) else o.model
    if o.ensemble:
        set_ensemble(seg, o.ensemble)
    if o.min_score is not None:
        set_min_score(seg, o.min_score)
    if o.tta:
        set_tta(seg, o.tta)
    if o.semantic_fusion:
        set_semantic_fusion(seg, True)
    if o.precision is not None:
        set_precision(seg, o.precision)
    return seg


def check_min_score(min_score: float) -> float:
    """``min_score`` as a float in 0..1 (ConfigError otherwise)."""
    if not 0.0 <= float(min_score) <= 1.0:
        raise ConfigError(f"--min-score must lie in 0..1, got {min_score}")
    return float(min_score)


def set_min_score(seg: Segmenter, min_score: float) -> None:
    """Keep only detections scoring at least ``min_score`` (0..1) from now on: PDAM models only (ConfigError else)."""
    if not isinstance(seg, ScoreThresholded):
        raise _not_pdam("--min-score", seg)
    seg.min_score = check_min_score(min_score)


def set_tta(seg: Segmenter, views: bool | int = True) -> None:
    """Test-time augmentation from now on: the heads averaged over ``views`` views of each tile (``True`` or 4: the
    tile and its three mirror images, about 4x the work; 8: and their transposes; ``False``/0/1: off). PDAM models
    on their fast path only (ConfigError else; :attr:`wsiseg.segmenters.rcnn.PDAMSegmenter.tta` checks)."""
    if not isinstance(seg, Augmenting):
        raise _not_pdam("--tta", seg)
    with _config_error("--tta"):
        seg.tta = views


def set_semantic_fusion(seg: Segmenter, on: bool = True) -> None:
    """Average each mask with the semantic branch's foreground probability from now on (PDAM models with a
    semantic branch, fast path; ConfigError else)."""
    if not isinstance(seg, SemanticFusing):
        raise _not_pdam("--semantic-fusion", seg)
    with _config_error("--semantic-fusion"):
        seg.semantic_fusion = on


def set_ensemble(seg: Segmenter, paths: Sequence[str | Path]) -> None:
    """From now on ``seg`` is an ensemble with the PDAM checkpoints ``paths`` (``wsiseg run --ensemble``; bundled
    models by name, e.g. ``"vesicular"``; none: a single model again; the same list again: nothing to do): every
    model sees every tile (and view, with ``--tta``), and their box-head outputs, masks and semantic maps are
    averaged; ``len(paths) + 1`` times the work. PDAM models of one scale and input, on the fast path (ModelError
    for a missing file, ConfigError else)."""
    if not isinstance(seg, Ensemble):
        if not paths:
            return
        raise _not_pdam("--ensemble", seg)
    for p in paths:
        if str(p) == "watershed":
            raise ConfigError("--ensemble takes PDAM models, not the watershed")
    paths = [str(model_path(p)) for p in paths]
    if list(seg.member_sources) == paths:
        return
    seg.clear_members()
    for path in paths:
        try:
            seg.add_member_checkpoint(path)
        except ValueError as e:
            seg.clear_members()
            raise ConfigError(f"--ensemble: {e}") from None


#: ``--precision`` choices: the network's arithmetic (post-processing is always float32)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def native_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), which runs the bundled models about 1.5-1.8x
    faster under bf16 than in fp32 (docs/speed.md)."""
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def set_precision(seg: Segmenter, precision: str = "fp32") -> None:
    """The network's arithmetic from now on: ``"fp32"`` (default, the reference), ``"bf16"`` (autocast; on a CPU
    with native bf16, such as AVX512-BF16 or AMX, faster with Kumar scores unchanged: docs/speed.md),
    ``"fp16"`` (autocast, CUDA only) or ``"auto"`` (``wsiseg run``'s default: bf16 for a PDAM model on a CPU with
    native bf16, else fp32). Post-processing stays float32. PDAM models only (ConfigError else, except for
    ``"fp32"`` and ``"auto"``). A CPU without native bf16 runs bf16 emulated, slower: a warning says so."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if isinstance(seg, MixedPrecision) and not on_gpu(seg) and native_bf16() else "fp32"
    if precision == "fp32":
        if isinstance(seg, MixedPrecision):
            seg.amp = None
        return
    if not isinstance(seg, MixedPrecision):
        raise _not_pdam(f"--precision {precision}", seg)
    if precision == "fp16" and not on_gpu(seg):
        raise ConfigError("--precision fp16 needs a CUDA device; on the CPU use bf16")
    if precision == "bf16" and not on_gpu(seg) and not native_bf16():
        warnings.warn("--precision bf16: this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX); it is "
                      "emulated, slower than fp32", stacklevel=2)
    seg.amp = precision


def _not_pdam(flag: str, seg: Segmenter) -> ConfigError:
    """The error for ``flag`` given with a segmenter that cannot do it."""
    return ConfigError(f"{flag} applies to PDAM models, not to {describe(seg).name}")


@contextlib.contextmanager
def _config_error(flag: str) -> Iterator[None]:
    """A segmenter's setter's ValueError (a value it cannot do) as a ConfigError naming ``flag``."""
    try:
        yield
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def source_label(model) -> str | None:
    """A model (a name, a path, or a loaded one) as a GeoJSON header names what a run used (``model_source``, or
    ``model`` for a classical one): a bundled model by its name, whether given so or by its file; another checkpoint
    (a file, or the folder ``wsiseg adapt`` wrote) by its resolved file (:func:`model_label`); the watershed as
    ``watershed`` (``default`` without bundled weights is it)."""
    if model is None:
        return None
    if not isinstance(model, (str, Path)):
        info = describe(model)
        return model_label(info.source) if info.source else info.name
    if _is_watershed(str(model)):
        return "watershed"
    if str(model) in BUILTIN_MODELS:
        return str(model)
    try:
        return model_label(str(model_path(model)))
    except ModelError:
        return str(model)


def model_label(source: str | None) -> str | None:
    """A model file as provenance (the GeoJSON header's ``model_source``): the bundled model's name, else the
    file's resolved path; ``None`` for none."""
    if source is None:
        return None
    for name in BUNDLED_MODELS:
        w = bundled_weights(name)
        if w is not None and Path(source).resolve() == w.resolve():
            return name
    return str(Path(source).resolve())
