"""Model checkpoints: one safetensors file holding the weights plus, in its metadata, everything needed to rebuild
the model (architecture name, full config, microns per pixel, free-form meta). Never pickle.

Layout of the safetensors metadata (all strings): ``format`` = ``"wsiseg-checkpoint"``, ``version``, ``arch``,
``config`` (JSON), ``mpp``, ``meta`` (JSON), ``dtype`` (``float32``/``float16``), ``excluded`` (JSON list of
state-dict key prefixes left out, e.g. the discriminators of an inference-only export).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import replacing
from ..core.errors import ConfigError, ModelError, OutputError

FORMAT = "wsiseg-checkpoint"
VERSION = "1"
#: state-dict prefixes that inference never uses (dropped by ``save_checkpoint(..., inference_only=True)``)
TRAINING_ONLY_PREFIXES = ("da_image.", "da_instance.", "da_semantic.")


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns. ``state_dict`` tensors are on the CPU, in their stored dtype."""

    state_dict: dict[str, torch.Tensor]
    config: dict
    mpp: float
    meta: dict = field(default_factory=dict)
    arch: str = ""
    excluded: list[str] = field(default_factory=list)


def _arch_of(model: nn.Module) -> str:
    return str(getattr(model, "arch", type(model).__name__.lower()))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, config: dict, mpp: float, meta: dict | None = None,
                    half: bool = False, inference_only: bool = False) -> None:
    """Write ``model``'s state dict and its description to ``path`` (temp file + rename: never half-written).

    ``half``: store floating-point tensors as float16 (for bundled weights; loading casts back to the model's dtype).
    ``inference_only``: leave out the training-only modules (:data:`TRAINING_ONLY_PREFIXES`); :func:`load_pdam`
    accepts such a file. ``config`` and ``meta`` must be JSON-serialisable.
    """
    from safetensors.torch import save_file

    p = Path(path)
    excluded = list(TRAINING_ONLY_PREFIXES) if inference_only else []
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if any(k.startswith(e) for e in excluded):
            continue
        t = v.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.half()
        tensors[k] = t.contiguous().clone()
    try:
        metadata = {"format": FORMAT, "version": VERSION, "arch": _arch_of(model),
                    "config": json.dumps(config), "mpp": repr(float(mpp)), "meta": json.dumps(meta or {}),
                    "dtype": "float16" if half else "float32", "excluded": json.dumps(excluded)}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{p}: checkpoint config/meta is not JSON-serialisable ({e})") from None
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(p) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError as e:
        raise OutputError(f"{p}: cannot write checkpoint: {e.strerror or e}") from None


def _read_header(p: Path) -> dict:
    """The safetensors JSON header, or ModelError naming what the file is instead."""
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":
                raise ModelError(f"{p}: is a PyTorch zip/pickle file (torch.save); refusing to unpickle it - "
                                 "only safetensors checkpoints are loaded")
            if head[:1] == b"\x80" and len(head) > 1 and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                raise ModelError(f"{p}: is a Python pickle file; refusing to unpickle it - "
                                 "only safetensors checkpoints are loaded")
            if len(head) < 8:
                raise ModelError(f"{p}: not a safetensors checkpoint (file too short)")
            (n,) = struct.unpack("<Q", head)
            size = p.stat().st_size
            if n < 2 or n > min(size - 8, 100_000_000):
                raise ModelError(f"{p}: not a safetensors checkpoint (no valid header)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise ModelError(f"{p}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{p}: not a safetensors checkpoint (corrupt header)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{p}: not a safetensors checkpoint (corrupt header)")
    return header


def load_checkpoint(path: str | os.PathLike, arch: str | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (no code is ever unpickled).

    Raises :class:`ModelError` (one line naming the file) for a missing file, a pickle/``torch.save`` file, a file
    that is not safetensors, a safetensors file without wsiseg metadata, or (when ``arch`` is given) a checkpoint of
    another architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: checkpoint file not found")
    if not p.is_file():
        raise ModelError(f"{p}: not a file")
    header = _read_header(p)
    md = header.get("__metadata__") or {}
    if md.get("format") != FORMAT:
        raise ModelError(f"{p}: a safetensors file but not a wsiseg checkpoint (no '{FORMAT}' metadata)")
    found = md.get("arch", "")
    if arch is not None and found != arch:
        raise ModelError(f"{p}: checkpoint is for architecture {found!r}, expected {arch!r}")
    try:
        config = json.loads(md.get("config", "{}"))
        meta = json.loads(md.get("meta", "{}"))
        excluded = json.loads(md.get("excluded", "[]"))
        mpp = float(md["mpp"])
    except (KeyError, ValueError, TypeError):
        raise ModelError(f"{p}: checkpoint metadata is corrupt (config/meta/mpp)") from None
    if not (math.isfinite(mpp) and 0 < mpp):
        raise ModelError(f"{p}: checkpoint metadata gives the model's scale as {mpp} um/px: not a usable scale")
    try:
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{p}: corrupt safetensors data ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         ) from None
    return Checkpoint(state_dict=state, config=config, mpp=mpp, meta=meta, arch=found, excluded=list(excluded))


def load_pdam(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Rebuild a PDAM from its checkpoint: ``(model in eval mode on device, PDAMConfig)``.

    The state dict must match the architecture the config describes exactly (missing, unexpected or mis-shaped
    tensors: :class:`ModelError`), except for the training-only modules an inference-only export left out.
    The returned config's ``mpp`` is the checkpoint's.
    """
    from .config import from_dict
    from .pdam import ARCH, PDAMConfig, build_pdam

    p = Path(path)
    ck = load_checkpoint(p, arch=ARCH)
    try:
        cfg = from_dict(PDAMConfig, ck.config, where=f"{p}:config")
    except ConfigError as e:
        raise ModelError(f"{p}: checkpoint holds an invalid model config ({e})") from None
    cfg.mpp = ck.mpp
    model = build_pdam(cfg)
    load_weights(model, ck, p, "the architecture in its config")
    return model.to(device).eval(), cfg


def load_weights(model: torch.nn.Module, ck: Checkpoint, path: str | os.PathLike, what: str = "this model") -> None:
    """Copy ``ck``'s tensors into ``model``; every tensor of the model must be there with its shape, except those
    of the modules an inference-only export left out, and none may be extra. Else :class:`ModelError` naming
    ``path`` and saying the weights do not match ``what``."""
    own = model.state_dict()
    allowed_missing = tuple(ck.excluded)
    missing = [k for k in own if k not in ck.state_dict and not (allowed_missing and k.startswith(allowed_missing))]
    unexpected = [k for k in ck.state_dict if k not in own]
    shapes = [k for k, v in ck.state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            raise ModelError(f"{path}: weights do not match {what}: {len(keys)} {kind} "
                             f"tensor(s), e.g. {', '.join(keys[:3])}{more}")
    model.load_state_dict(ck.state_dict, strict=False)
