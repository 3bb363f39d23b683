"""Checkpoints: safetensors round trip with config/mpp/meta, fp16 and inference-only exports, and refusal of
anything else (missing, pickle / torch.save, random bytes, foreign safetensors, other architecture, wrong shapes)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from wsiseg.models.checkpoint import load_checkpoint, load_pdam, save_checkpoint
from wsiseg.models.config import to_dict
from wsiseg.core.errors import ModelError
from wsiseg.models.pdam import build_pdam

from helpers import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_cfg():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.roi.score_thresh = 0.0  # random weights: keep detections so outputs can be compared
    return build_pdam(cfg).eval(), cfg


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 128, 128, generator=g)


def _outputs(model, image):
    with torch.no_grad():
        return model([image])[0]


def test_round_trip_gives_identical_outputs(tmp_path, model_and_cfg, image):
    model, cfg = model_and_cfg
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, model, config=to_dict(cfg), mpp=0.5, meta={"seed": 3, "data": {"n": 1}})
    assert not [f for f in tmp_path.iterdir() if f.name != "m.safetensors"]  # no temp file left behind
    ck = load_checkpoint(p)
    assert ck.arch == "pdam" and ck.mpp == 0.5 and ck.meta == {"seed": 3, "data": {"n": 1}}
    assert ck.config == to_dict(cfg)
    loaded, lcfg = load_pdam(p)
    assert lcfg.mpp == 0.5 and lcfg.backbone.fpn_channels == cfg.backbone.fpn_channels
    assert not loaded.training
    a, b = _outputs(model, image), _outputs(loaded, image)
    assert len(a["boxes"]) > 0
    for k in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_half_and_inference_only_exports(tmp_path, model_and_cfg, image):
    model, cfg = model_and_cfg
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_checkpoint(full, model, config=to_dict(cfg), mpp=0.25, meta={})
    save_checkpoint(half, model, config=to_dict(cfg), mpp=0.25, meta={}, half=True, inference_only=True)
    assert half.stat().st_size < 0.5 * full.stat().st_size
    ck = load_checkpoint(half)
    assert all(v.dtype == torch.float16 for v in ck.state_dict.values() if v.is_floating_point())
    assert not any(k.startswith("da_") for k in ck.state_dict)
    loaded, _ = load_pdam(half)
    assert next(loaded.parameters()).dtype == torch.float32
    with torch.no_grad():
        fa = model.backbone(model.transform([image])[0].tensors)
        fb = loaded.backbone(loaded.transform([image])[0].tensors)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0.05, atol=0.05)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="not found"):
        load_pdam(tmp_path / "nope.safetensors")


class _Boom:
    """Unpickling this would create the marker file: proves the loader never unpickles."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_torch_save_file_is_refused_without_unpickling(tmp_path, model_and_cfg):
    model, _ = model_and_cfg
    marker = tmp_path / "unpickled"
    boom = _Boom()
    boom.marker = str(marker)
    p = tmp_path / "model.pt"
    torch.save({"state": model.backbone.fpn.state_dict(), "evil": boom}, p)
    with pytest.raises(ModelError, match="refusing to unpickle"):
        load_checkpoint(p)
    with pytest.raises(ModelError, match="refusing to unpickle"):
        load_pdam(p)
    assert not marker.exists()


def test_plain_pickle_file_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    boom = _Boom()
    boom.marker = str(marker)
    p = tmp_path / "model.pkl"
    p.write_bytes(pickle.dumps({"evil": boom}, protocol=4))
    with pytest.raises(ModelError, match="pickle"):
        load_checkpoint(p)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"abc", np.random.default_rng(0).bytes(4096), b"\x10" * 100])
def test_random_bytes_are_refused(tmp_path, content):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(content)
    with pytest.raises(ModelError, match="not a safetensors checkpoint"):
        load_checkpoint(p)


def test_foreign_safetensors_and_other_architecture_are_refused(tmp_path, model_and_cfg):
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(ModelError, match="not a wsiseg checkpoint"):
        load_checkpoint(p)

    other = torch.nn.Linear(2, 2)
    q = tmp_path / "other.safetensors"
    save_checkpoint(q, other, config={}, mpp=0.25, meta={})
    assert load_checkpoint(q).arch == "linear"
    with pytest.raises(ModelError, match="architecture 'linear', expected 'pdam'"):
        load_pdam(q)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    wrong = to_dict(cfg)
    wrong["roi"]["box_head_fc"] = [256, 256]  # different head width than the stored tensors
    wrong["roi"]["mask_head_channels"] = [64, 64]
    p = tmp_path / "wrong.safetensors"
    save_checkpoint(p, model, config=wrong, mpp=0.25, meta={})
    with pytest.raises(ModelError, match="mis-shaped"):
        load_pdam(p)

    fewer = to_dict(cfg)
    fewer["da"]["image"] = False  # config without the image discriminator: its tensors are unexpected
    q = tmp_path / "fewer.safetensors"
    save_checkpoint(q, model, config=fewer, mpp=0.25, meta={})
    with pytest.raises(ModelError, match="unexpected"):
        load_pdam(q)

    bad = to_dict(cfg)
    bad["backbone"]["depth"] = 7
    r = tmp_path / "bad.safetensors"
    save_checkpoint(r, model, config=bad, mpp=0.25, meta={})
    with pytest.raises(ModelError, match="invalid model config"):
        load_pdam(r)


def test_metadata_is_plain_json(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, model, config=to_dict(cfg), mpp=0.25, meta={"command": "wsiseg adapt"})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    md = json.loads(raw[8:8 + n])["__metadata__"]
    assert md["format"] == "wsiseg-checkpoint" and md["arch"] == "pdam"
    assert json.loads(md["meta"]) == {"command": "wsiseg adapt"} and float(md["mpp"]) == 0.25


def test_bundling_sets_the_proposals_and_keeps_the_weights(tmp_path, model_and_cfg):
    """``scripts/bundle_model.py --proposals N --tile-size T`` (how the bundled ``default`` got its 150 proposals a
    tile and its 384 px tiles): the model keeps N region proposals per tile at inference and runs T px tiles, its
    threshold as asked, the same stored tensors, and a bundle re-bundled keeps its metadata (the recipe, where it
    came from)."""
    import subprocess
    import sys

    from safetensors import safe_open

    model, cfg = model_and_cfg
    src, first, second = tmp_path / "run.safetensors", tmp_path / "b1.safetensors", tmp_path / "b2.safetensors"
    save_checkpoint(src, model, config=to_dict(cfg), mpp=0.25, meta={"seed": 5})
    script = Path(__file__).resolve().parents[2] / "scripts" / "bundle_model.py"
    subprocess.run([sys.executable, str(script), str(src), str(first), "--min-score", "0.85", "--reproduce", "r"],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(script), str(first), str(second), "--min-score", "0.85", "--proposals", "77",
                    "--tile-size", "384"], check=True, capture_output=True)
    m2, c2 = load_pdam(second)
    assert c2.rpn.post_nms_top_n_test == 77 and m2.eval().rpn.post_nms_top_n() == 77 and c2.roi.score_thresh == 0.85
    assert load_pdam(first)[1].rpn.post_nms_top_n_test == cfg.rpn.post_nms_top_n_test
    assert (load_pdam(first)[1].tile_size, c2.tile_size) == (256, 384)  # (the inference tile a run takes for it)
    meta = load_checkpoint(second).meta
    assert meta["seed"] == 5 and meta["reproduce"] == "r" and meta["bundled_from"] == str(src)
    assert "77" in meta["proposals"] and "384" in meta["tile_size"]
    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
