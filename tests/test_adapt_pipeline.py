"""`wsiseg adapt` end to end on tiny real inputs: every stage runs, resumes/skips, and `wsiseg run` loads the model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import tifffile

from wsiseg.adapt.pipeline import load_config
from wsiseg.cli import main

TINY = Path(__file__).parent / "data" / "adapt_tiny.yaml"


def test_configs_load():
    for name in ("kumar_lite.yaml", "kumar_r101.yaml"):
        cfg = load_config(Path(__file__).parents[1] / "configs" / name)
        assert cfg.model.mpp == 0.25 and cfg.inpaint.radius == 3
    assert load_config(Path(__file__).parents[1] / "configs" / "kumar_r101.yaml").model.backbone.depth == 101


def test_config_overrides_make_the_ablations():
    lite = Path(__file__).parents[1] / "configs" / "kumar_lite.yaml"
    cfg = load_config(lite, ["inpaint.enabled=false", "train.iterations=5", "model.roi.score_thresh=0.3"])
    assert (cfg.inpaint.enabled, cfg.train.iterations, cfg.model.roi.score_thresh) == (False, 5, 0.3)
    assert cfg.model.backbone.depth == load_config(lite).model.backbone.depth  # the rest is the file's
    assert load_config(None, ["source_only=true"]).source_only is True  # over the defaults


@pytest.mark.parametrize("item, words", [("train.iterationz=5", "iterationz"), ("nokey", "KEY=VALUE"),
                                         ("train.iterations=abc", "integer"), ("source_only.x=1", "not a section"),
                                         ("pseudo.tta=3", "4 or 8"), ("pseudo.tta=4", "needs a model teacher"),
                                         ("pseudo.semantic_fusion=true", "need a model teacher"),
                                         ("pseudo.ensemble=[m.safetensors]", "need a model teacher")])
def test_bad_override_is_one_line_error(tmp_path, capsys, item, words):
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--set", item])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_config_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {iterations: -3}\n")
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "iterations" in err and "Traceback" not in err


def test_adapt_end_to_end_tiny(tmp_path, shared_data, capsys):
    tg = tmp_path / "target"
    tg.mkdir()
    img = tifffile.imread(next((shared_data / "kumar" / "images").glob("*.tif")))[..., :3]
    cv2.imwrite(str(tg / "hospital.png"), img[:384, :384, ::-1])
    out = tmp_path / "adapt"
    args = ["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
            "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet"]
    assert main(args) == 0
    for d in ("source/train/images", "source/val/labels", "target/images", "synth/train/images", "inpainted/train/m_aux"):
        assert any((out / d).iterdir()), d
    model = out / "model.safetensors"
    assert model.is_file()
    rec = json.loads((out / "adapt_record.json").read_text())
    assert rec["target_images"] >= 1 and rec["source_images"] == 3
    # second run: every stage is complete and skipped
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("skipped") == 5
    # the model segments with `wsiseg run`
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), img[:200, :200, ::-1])
    gj = tmp_path / "n.geojson"
    assert main(["run", str(small), "--mpp", "0.25", "--model", str(model), "--out", str(gj), "--quiet",
                 "--device", "cpu"]) == 0
    assert json.loads(gj.read_text())["type"] == "FeatureCollection"


def test_pseudo_labels_are_the_watershed_of_each_tile(tmp_path, shared_data):
    """The pseudo stage labels each target tile exactly as the watershed calibrated once on its slide's tiles."""
    import numpy as np

    from wsiseg.adapt.pseudo import pseudo_label_dir
    from wsiseg.segment.watershed import WatershedSegmenter

    tg = tmp_path / "tiles"
    tg.mkdir()
    slides = sorted((shared_data / "kumar" / "images").glob("*.tif"))[:2]
    tiles: dict[str, list] = {}
    for s in slides:
        img = tifffile.imread(s)[..., :3]
        for r, c in ((0, 0), (1, 2)):
            t = np.ascontiguousarray(img[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128])
            cv2.imwrite(str(tg / f"{s.stem}_{r:04d}_{c:04d}.png"), t[..., ::-1])
            tiles.setdefault(s.stem, []).append((f"{s.stem}_{r:04d}_{c:04d}.png", t))
    out = pseudo_label_dir(tg, tmp_path / "pseudo", progress=False)
    for stem, pairs in tiles.items():
        seg = WatershedSegmenter()
        seg.calibrate(np.concatenate([t for _, t in pairs], axis=1))
        for name, t in pairs:
            lab = cv2.imread(str(out / "labels" / name), cv2.IMREAD_UNCHANGED)
            assert lab.dtype == np.uint16 and lab.max() > 0
            assert np.array_equal(lab, seg.predict(t)[0].labels)
            assert np.array_equal(cv2.imread(str(out / "images" / name))[..., ::-1], t)
    before = {p: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}
    pseudo_label_dir(tg, tmp_path / "pseudo", progress=False)  # complete: nothing rewritten
    assert before == {p: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}


def test_adapt_with_pseudo_labels_tiny(tmp_path, shared_data):
    tg = tmp_path / "target"
    tg.mkdir()
    img = tifffile.imread(next((shared_data / "kumar" / "images").glob("*.tif")))[..., :3]
    cv2.imwrite(str(tg / "hospital.png"), img[:384, :384, ::-1])
    out = tmp_path / "adapt"
    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet",
                 "--set", "train.pseudo_fraction=0.5", "--set", "train.stain_jitter=0.1"]) == 0
    assert len(list((out / "pseudo" / "labels").glob("*.png"))) == len(list((out / "target" / "images").glob("*")))
    rec = json.loads((out / "adapt_record.json").read_text())
    assert rec["pseudo_images"] >= 1 and rec["config"]["train"]["pseudo_fraction"] == 0.5

    # a second round: the student labels the tiles (pseudo.teacher); the pseudo stage is redone with its predictions
    import shutil

    from wsiseg.api import load_model, set_min_score

    teacher = tmp_path / "teacher.safetensors"
    shutil.copyfile(out / "model.safetensors", teacher)
    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet",
                 "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", f"train.init={teacher}"]) == 0
    seg = load_model(str(teacher), device="cpu")
    set_min_score(seg, 0.05)
    names = sorted(p.name for p in (out / "target" / "images").glob("*.png"))  # one slide: batches of 8 in order
    _assert_pseudo_labels_are(seg, out, names)
    assert json.loads((out / "adapt_record.json").read_text())["config"]["pseudo"]["teacher"] == str(teacher)

    # the teacher with test-time augmentation (pseudo.tta): the pseudo stage is redone with its TTA predictions
    from wsiseg.api import set_tta

    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet", "--stages", "pseudo",
                 "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", "pseudo.tta=4"]) == 0
    set_tta(seg, 4)
    _assert_pseudo_labels_are(seg, out, names)

    # the teacher as an ensemble with the second round's student, with semantic fusion (pseudo.ensemble,
    # pseudo.semantic_fusion): the pseudo stage is redone with the ensemble's predictions
    from wsiseg.api import set_ensemble, set_semantic_fusion

    member = tmp_path / "member.safetensors"
    shutil.copyfile(out / "model.safetensors", member)
    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet", "--stages", "pseudo",
                 "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", f"pseudo.ensemble=[{member}]",
                 "--set", "pseudo.semantic_fusion=true"]) == 0
    seg = load_model(str(teacher), device="cpu")
    set_min_score(seg, 0.05)
    set_ensemble(seg, [member])
    set_semantic_fusion(seg, True)
    _assert_pseudo_labels_are(seg, out, names)


def _assert_pseudo_labels_are(seg, out, names):
    """Every pseudo-label written under ``out`` equals ``seg``'s prediction of its tile (tiles in batches of 8, in
    the order the pseudo stage reads them) less its instances on white (pseudo.drop_white, the default)."""
    import numpy as np

    from wsiseg.adapt.pseudo import drop_on_white

    for k in range(0, len(names), 8):
        tiles = np.stack([cv2.imread(str(out / "target" / "images" / n))[..., ::-1] for n in names[k:k + 8]])
        for name, tile, inst in zip(names[k:k + 8], tiles, seg.predict(tiles)):
            lab = cv2.imread(str(out / "pseudo" / "labels" / name), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(lab, drop_on_white(tile, inst.labels))


def test_missing_ensemble_member_is_one_line_error(tmp_path, capsys):
    teacher = tmp_path / "t.safetensors"
    teacher.write_bytes(b"x")
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--set", f"pseudo.teacher={teacher}", "--set", f"pseudo.ensemble=[{tmp_path / 'none.safetensors'}]"])
    err = capsys.readouterr().err
    assert code == 2 and "pseudo.ensemble" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_teacher_is_one_line_error(tmp_path, capsys):
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={tmp_path / 'none.safetensors'}"])
    err = capsys.readouterr().err
    assert code == 2 and "pseudo.teacher" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_drop_ragged_removes_and_inpaints_only_the_ragged_instances():
    """A constructed tile: a solid disc is kept, a C-shaped fragment is dropped from the labels and inpainted."""
    import numpy as np

    from wsiseg.adapt.pseudo import drop_ragged

    rgb = np.full((64, 64, 3), 220, np.uint8)
    lab = np.zeros((64, 64), np.int32)
    cv2.circle(lab, (16, 16), 8, 1, -1)
    cv2.ellipse(lab, (44, 44), (12, 12), 0, 40, 320, 2, 4)  # a thick open arc: solidity well below 0.85
    rgb[lab > 0] = (90, 40, 120)
    img, out = drop_ragged(rgb, lab, 0.85)
    assert np.array_equal(out, (lab == 1).astype(out.dtype)) and np.array_equal(img[lab == 1], rgb[lab == 1])
    assert img[lab == 2].mean() > 180  # the fragment is painted over with the surrounding background
    assert drop_ragged(rgb, lab, 0.0)[1] is lab


def test_a_stage_rerun_with_another_config_starts_afresh(tmp_path):
    """Outputs of a stage run with another configuration are removed, not resumed into."""
    from wsiseg.adapt.pipeline import _Stage

    st = _Stage(tmp_path, "pseudo", {"min_solidity": 0.0}, force=False)
    assert not st.redo and not st.done()
    st.finish()
    assert _Stage(tmp_path, "pseudo", {"min_solidity": 0.0}, force=False).done()
    other = _Stage(tmp_path, "pseudo", {"min_solidity": 0.85}, force=False)
    assert other.redo and not other.done()
    assert _Stage(tmp_path, "pseudo", {"min_solidity": 0.0}, force=True).redo


def test_adapt_without_a_config_says_it_runs_the_papers_gpu_recipe(tmp_path, capsys):
    """The default configuration is the paper's (GPU-sized), and help and a note say so; with --config: no note."""
    assert main(["adapt", "--source", str(tmp_path / "none"), "--target", str(tmp_path), "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert "no --config: the paper's configuration (ResNet-101 PDAM, 24000 iterations; CycleGAN 20000)" in err
    assert "configs/kumar_lite.yaml" in err and "not a directory" in err
    assert main(["adapt", "--source", str(tmp_path / "none"), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--config", str(TINY)]) == 3
    assert "no --config" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    assert "the paper's own configuration, sized for a GPU" in " ".join(capsys.readouterr().out.split())
