"""`wsiseg adapt` end to end on tiny real inputs: every stage runs, resumes/skips, and `wsiseg run` loads the model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import tifffile

from wsiseg.adapt.config import load_config
from wsiseg.core.errors import ConfigError
from wsiseg.cli import main

TINY = Path(__file__).parents[1] / "data" / "adapt_tiny.yaml"


def test_configs_load():
    for name in ("kumar_lite.yaml", "kumar_r101.yaml"):
        cfg = load_config(Path(__file__).parents[2] / "configs" / name)
        assert cfg.model.mpp == 0.25 and cfg.inpaint.radius == 3
    assert load_config(Path(__file__).parents[2] / "configs" / "kumar_r101.yaml").model.backbone.depth == 101


def test_config_overrides_make_the_ablations():
    lite = Path(__file__).parents[2] / "configs" / "kumar_lite.yaml"
    cfg = load_config(lite, ["inpaint.enabled=false", "train.iterations=5", "model.roi.score_thresh=0.3"])
    assert (cfg.inpaint.enabled, cfg.train.iterations, cfg.model.roi.score_thresh) == (False, 5, 0.3)
    assert cfg.model.backbone.depth == load_config(lite).model.backbone.depth  # the rest is the file's
    assert load_config(None, ["source_only=true"]).source_only is True  # over the defaults


@pytest.mark.parametrize("item, words", [("train.iterationz=5", "iterationz"), ("nokey", "KEY=VALUE"),
                                         ("cyclegan.lambda_cycle=.nan", "finite"),
                                         ("train.weight_decay=.inf", "finite"),
                                         ("cyclegan.betas=[2,3]", "betas"), ("inpaint.mode=bogus", "inpaint: mode"),
                                         ("train.iterations=abc", "integer"), ("source_only.x=1", "source_only"),
                                         ("pseudo.tta=3", "4 or 8"), ("pseudo.tta=4", "needs a model teacher"),
                                         ("pseudo.semantic_fusion=true", "need a model teacher"),
                                         ("pseudo.ensemble=[m.safetensors]", "need a model teacher")])
def test_bad_override_is_one_line_error(tmp_path, capsys, item, words):
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--recipe", "paper", "--set", item])
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
            "--recipe", "paper", "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet"]
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
    assert capsys.readouterr().err.count("skipped") == 6  # source, target, translate, inpaint, train, report
    # a rerun with other settings redoes it and replaces its model: the finished run's model and record kept first
    before = model.read_bytes()
    assert main([*args, "--set", "train.iterations=7"]) == 0
    assert "its model and record are kept in" in capsys.readouterr().err
    kept = list((out / "previous").glob("*/model.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() == before
    assert (kept[0].parent / "adapt_record.json").is_file()
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
    from wsiseg.segmenters.watershed import WatershedSegmenter

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
                 "--recipe", "paper", "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet",
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
                 "--recipe", "paper", "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet",
                 "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", f"train.init={teacher}"]) == 0
    seg = load_model(str(teacher), device="cpu")
    set_min_score(seg, 0.05)
    names = sorted(p.name for p in (out / "target" / "images").glob("*.png"))  # one slide: batches of 8 in order
    _assert_pseudo_labels_are(seg, out, names)
    assert json.loads((out / "adapt_record.json").read_text())["config"]["pseudo"]["teacher"] == str(teacher)

    # pseudo.drop_pale: the pseudo stage is redone, the same labels less those far paler than the slide's typical one
    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--recipe", "paper", "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet",
                 "--stages", "pseudo", "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", "pseudo.drop_pale=0.5"]) == 0
    _assert_pseudo_labels_are(seg, out, names, drop_pale=0.5)

    # the teacher with test-time augmentation (pseudo.tta): the pseudo stage is redone with its TTA predictions
    from wsiseg.api import set_tta

    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--recipe", "paper", "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet", "--stages", "pseudo",
                 "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", "pseudo.tta=4"]) == 0
    set_tta(seg, 4)
    _assert_pseudo_labels_are(seg, out, names)

    # the teacher sees the slide in the Kumar train images' stain (pseudo.stain_norm): the stage is redone, the
    # labels are its predictions on the normalised tiles, the images written are the tiles as they are
    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--recipe", "paper", "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet",
                 "--stages", "pseudo", "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", "pseudo.tta=4", "--set", "pseudo.stain_norm=true"]) == 0
    _assert_pseudo_labels_are(seg, out, names, stain_norm=True)

    # the teacher as an ensemble with the second round's student, with semantic fusion (pseudo.ensemble,
    # pseudo.semantic_fusion): the pseudo stage is redone with the ensemble's predictions
    from wsiseg.api import set_ensemble, set_semantic_fusion

    member = tmp_path / "member.safetensors"
    shutil.copyfile(out / "model.safetensors", member)
    assert main(["adapt", "--source", str(shared_data / "bbbc039"), "--target", str(tg), "--out", str(out),
                 "--recipe", "paper", "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25", "--quiet", "--stages", "pseudo",
                 "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={teacher}",
                 "--set", "pseudo.min_score=0.05", "--set", f"pseudo.ensemble=[{member}]",
                 "--set", "pseudo.semantic_fusion=true"]) == 0
    seg = load_model(str(teacher), device="cpu")
    set_min_score(seg, 0.05)
    set_ensemble(seg, [member])
    set_semantic_fusion(seg, True)
    _assert_pseudo_labels_are(seg, out, names)


def _assert_pseudo_labels_are(seg, out, names, drop_pale=0.0, stain_norm=False):
    """Every pseudo-label written under ``out`` equals ``seg``'s prediction of its tile (tiles in batches of 8, in
    the order the pseudo stage reads them) less its instances on white (pseudo.drop_white, the default) and, with
    ``drop_pale``, those far paler than the slide's (``names``: one slide's tiles); with ``stain_norm`` the tiles
    seg and the rules see are the slide's normalised ones. The images written are the tiles as they are."""
    import numpy as np

    from wsiseg.adapt.pseudo import drop_on_white, drop_pale as pale_rule, normalise_stain

    slide = [cv2.imread(str(out / "target" / "images" / n))[..., ::-1] for n in names]
    for n, tile in zip(names, slide):
        assert np.array_equal(cv2.imread(str(out / "pseudo" / "images" / n))[..., ::-1], tile)
    seen = normalise_stain(slide) if stain_norm else slide
    assert stain_norm == any(not np.array_equal(a, b) for a, b in zip(seen, slide))
    rgbs, raw, want = [], [], []
    for k in range(0, len(names), 8):
        tiles = np.stack(seen[k:k + 8])
        for tile, inst in zip(tiles, seg.predict(tiles)):
            rgbs.append(tile)
            raw.append(inst)
            want.append(drop_on_white(tile, inst.labels))
    white = sum(int(p.labels.max()) - int(w.max()) for p, w in zip(raw, want))  # (both numbered 1..n)
    pale = 0
    if drop_pale:
        fewer = pale_rule(rgbs, want, drop_pale)
        pale = sum(int(w.max()) - int(f.max()) for w, f in zip(want, fewer))
        want = fewer
    for name, lab in zip(names, want):
        assert np.array_equal(cv2.imread(str(out / "pseudo" / "labels" / name), cv2.IMREAD_UNCHANGED), lab)
    # what the rules left out, counted where they ran (the stage was redone from scratch: one call's counts)
    left = json.loads((out / "pseudo" / "left_out.json").read_text())
    assert left == {"labels": sum(int(w.max()) for w in want), "on_white": white, "pale": pale, "ragged": 0}


def test_missing_ensemble_member_is_one_line_error(tmp_path, capsys):
    teacher = tmp_path / "t.safetensors"
    teacher.write_bytes(b"x")
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--recipe", "paper", "--set", f"pseudo.teacher={teacher}", "--set", f"pseudo.ensemble=[{tmp_path / 'none.safetensors'}]"])
    err = capsys.readouterr().err
    assert code == 2 and "pseudo.ensemble" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_teacher_is_one_line_error(tmp_path, capsys):
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--recipe", "paper", "--set", "train.pseudo_fraction=0.5", "--set", f"pseudo.teacher={tmp_path / 'none.safetensors'}"])
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


def test_scientific_notation_is_a_number():
    assert load_config(None, ["cyclegan.lr=1e-4", "train.lr=2E-3"]).cyclegan.lr == 1e-4


def test_an_input_inside_out_or_an_out_that_is_a_file_is_refused_before_any_stage(tmp_path, capsys):
    """A rerun replaces its stage folders: slides kept in ``out/target`` were deleted. Inputs inside ``--out`` (or
    holding it) and an ``--out`` that is a file are one-line errors, and nothing is removed."""
    from wsiseg.adapt.pipeline import AdaptRun, adapt

    src = tmp_path / "bbbc"
    src.mkdir()
    slides = tmp_path / "run" / "target"
    slides.mkdir(parents=True)
    (slides / "slide.tif").write_bytes(b"keep")
    with pytest.raises(ConfigError, match="lies inside --out"):
        adapt(src, [slides], tmp_path / "run", load_config(TINY), AdaptRun(stages=("target",)))
    assert (slides / "slide.tif").read_bytes() == b"keep"
    with pytest.raises(ConfigError, match="holds --out"):
        adapt(src, [tmp_path], tmp_path / "run", load_config(TINY), AdaptRun(stages=("target",)))
    (tmp_path / "afile").write_text("x")
    code = main(["adapt", "--source", str(src), "--target", str(slides / "slide.tif"), "--out",
                 str(tmp_path / "afile"), "--config", str(TINY), "--device", "cpu", "--target-mpp", "0.25"])
    err = capsys.readouterr().err
    assert code == 5 and "a file, not a folder" in err and "Traceback" not in err


def test_tiles_of_inputs_that_share_a_name_do_not_clash():
    from wsiseg.adapt.target import tile_prefixes

    got = tile_prefixes(["hospA/slide1.tif", "hospB/slide1.tif", "hospA/other.svs"])
    assert got[2] == "other" and got[0] != got[1] and all(g.startswith("slide1-") for g in got[:2])


def test_a_stage_interrupted_with_another_config_starts_afresh(tmp_path):
    """A stage begun and not finished (Ctrl-C) resumes with the same configuration, and is redone with another:
    another target's tiles, a CycleGAN or a training begun with other settings were mixed in or refused."""
    from wsiseg.adapt.pipeline import _Stage

    _Stage(tmp_path, "target", {"targets": ["a.tif"]}, force=False).start()
    assert not _Stage(tmp_path, "target", {"targets": ["a.tif"]}, force=False).redo
    assert _Stage(tmp_path, "target", {"targets": ["b.tif"]}, force=False).redo
    st = _Stage(tmp_path, "target", {"targets": ["b.tif"]}, force=False)
    st.start()
    st.finish()
    assert not (tmp_path / ".target.started").exists() and st.done()


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


def test_recipes_fit_the_device():
    """finetune starts from the bundled default (its weights, its threshold, its inference tile) on either device, one
    round on a CPU and up to three on a GPU; paper trains from scratch, ResNet-18 on a CPU and the paper's ResNet-101
    on a GPU."""
    from wsiseg.adapt.recipes import CONFIGS, build_config
    from wsiseg.api import load_model, model_path
    from wsiseg.models.checkpoint import load_checkpoint
    from wsiseg.models.config import to_dict

    default = str(model_path("default"))
    start_config = load_checkpoint(default).config
    thr = float(load_model(default, device="cpu").model.roi_heads.score_thresh)
    for device, rounds in (("cpu", 1), ("cuda", 3)):
        cfg = build_config("finetune", device)
        assert (cfg.train.init, cfg.pseudo.teacher, cfg.rounds) == (default, default, rounds)
        assert cfg.pseudo.min_score == cfg.model.roi.score_thresh == pytest.approx(thr)
        assert cfg.model.tile_size == 384  # the student runs on the tiles its start was chosen with, not the base's 256
        assert to_dict(cfg.model) == start_config  # and with all of its start's model section
        assert cfg.source_only and cfg.train.pseudo_fraction > 0 and cfg.train.negative_fraction > 0
        assert cfg.model.backbone.depth == 18 and cfg.pseudo.tta == 4 and cfg.pseudo.drop_pale == 0.25
        assert cfg.pseudo.stain_norm  # the teacher sees each slide in the stain it knows
        assert (cfg.train.touching, cfg.train.touching_copies, cfg.train.iterations) == (1.0, 8, 1600)
    own = build_config("finetune", "cpu", config=CONFIGS / "kumar_lite.yaml")  # a --config brings its schedule
    assert (own.train.iterations, own.train.touching) == (800, 1.0)
    cpu, gpu = build_config("paper", "cpu"), build_config("paper", "cuda")
    assert (cpu.model.backbone.depth, cpu.train.iterations, cpu.train.init, cpu.source_only) == (18, 800, "", False)
    assert cpu.pseudo.drop_pale == 0.0 and not cpu.pseudo.stain_norm  # the paper's recipe as it was
    assert (gpu.model.backbone.depth, gpu.train.iterations, gpu.cyclegan.iterations) == (101, 24000, 20000)
    assert build_config("finetune", "cpu", overrides=["train.iterations=5"]).train.iterations == 5  # --set is last


def test_adapt_help_names_the_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "finetune:" in helptext and "paper:" in helptext and "--start" in helptext


def test_unknown_recipe_and_bad_start_are_one_line_errors(tmp_path, capsys):
    from wsiseg.adapt.recipes import build_config
    from wsiseg.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe"):
        build_config("nosuch", "cpu")
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--start", str(tmp_path / "none.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "--start" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--start", "watershed"])
    err = capsys.readouterr().err
    assert code == 2 and "not a PDAM model" in err


def test_finetune_rounds_end_to_end_tiny(tmp_path, shared_data, capsys):
    """The finetune recipe from a tiny model: two rounds, each labelled by the last kept model, each measured by the
    unlabelled report; out/model.safetensors is the kept model's file; a rerun skips every stage."""
    tg = tmp_path / "target"
    tg.mkdir()
    img = tifffile.imread(next((shared_data / "kumar" / "images").glob("*.tif")))[..., :3]
    cv2.imwrite(str(tg / "hospital.png"), img[:384, :384, ::-1])
    common = ["--source", str(shared_data / "bbbc039"), "--target", str(tg), "--config", str(TINY), "--device", "cpu",
              "--target-mpp", "0.25", "--quiet"]
    start = tmp_path / "start"
    assert main(["adapt", *common, "--out", str(start), "--recipe", "paper", "--stages", "source,target,translate,"
                 "inpaint,train", "--set", "model.tile_size=320", "--set", "model.rpn.post_nms_top_n_test=77"]) == 0
    out = tmp_path / "ft"
    args = ["adapt", *common, "--out", str(out), "--start", str(start / "model.safetensors"),
            "--set", "rounds=2", "--set", "report_tiles=2"]
    capsys.readouterr()
    assert main(args) == 0
    io = capsys.readouterr()
    assert "recipe finetune on cpu" in io.err and "estimated time" in io.err
    assert "mirror consistency" in io.out and "round 1:" in io.out
    rec = json.loads((out / "adapt_record.json").read_text())
    assert rec["recipe"] == "finetune" and rec["config"]["train"]["init"] == str(start / "model.safetensors")
    r1 = rec["rounds"][0]
    assert r1["teacher"] == str(start / "model.safetensors") and r1["student_measures"]["tiles"] == 2
    from wsiseg.api import load_model
    from wsiseg.models.checkpoint import load_checkpoint
    from wsiseg.segmenters.base import tile_for

    assert tile_for(load_model(r1["student"], device="cpu")) == 320  # the start's inference tile, kept
    # and the rest of its model section: settings the recipe's base (here --config) does not have
    assert load_checkpoint(r1["student"]).config["rpn"]["post_nms_top_n_test"] == 77
    assert set(r1["teacher_measures"]) == set(r1["student_measures"]) and 0 <= r1["agreement"] <= 1
    if r1["kept"] and not r1["stop"]:
        assert rec["rounds"][1]["teacher"] == str(out / "round1.safetensors")
        assert json.loads((out / ".round2.pseudo.done").read_text())["tiles"] >= 1
    kept = [r["student"] for r in rec["rounds"] if r["kept"]]
    chosen = Path(kept[-1]) if kept else start / "model.safetensors"
    assert rec["chosen"] == str(chosen) and (out / "model.safetensors").read_bytes() == chosen.read_bytes()
    assert set(rec["stage_seconds"]) >= {"source", "translate", "pseudo", "train", "report"}
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "running" not in err and err.count("skipped") >= 7
    # the rerun is quoted what it has left to do, not the whole run's time
    assert "estimated time left" in err and "none, every stage is complete" in err


def test_verdict_keeps_only_a_student_no_worse_on_every_measure():
    from wsiseg.adapt.report import Measures, verdict

    t = Measures(64, 1000, 2000.0, 0.01, 0.85, 0.9, 0.97, 0.99)

    def with_(**kw):
        return Measures(**{**t.as_dict(), **kw})

    assert verdict(t, with_(flip_consistency=0.86), 0.8)[:2] == (True, False)
    assert verdict(t, with_(), 0.96)[:2] == (True, True)  # converged: nothing more to learn from the teacher
    for bad, words in ((with_(share_on_white=0.02), "white"), (with_(flip_consistency=0.83), "mirroring"),
                       (with_(per_mm2=3200.0), "density"), (with_(per_mm2=1200.0), "density")):
        keep, stop, why = verdict(t, bad, 0.9)
        assert (keep, stop) == (False, True) and words in " ".join(why)


def test_verdict_refuses_a_student_that_covers_fewer_watershed_objects():
    """Coverage may fall by up to COVERAGE_MARGIN (a more precise student covers fewer too); more is a recall loss.
    A record without coverage (-1, written before the measure existed) is not judged by it."""
    from wsiseg.adapt.report import COVERAGE_MARGIN, Measures, verdict

    t = Measures(64, 1000, 2000.0, 0.01, 0.85, 0.9, 0.97, 0.99, coverage=0.79)

    def with_(**kw):
        return Measures(**{**t.as_dict(), **kw})

    assert verdict(t, with_(coverage=0.79 - COVERAGE_MARGIN + 0.005), 0.9)[0]
    keep, stop, why = verdict(t, with_(coverage=0.79 - COVERAGE_MARGIN - 0.005), 0.9)
    assert (keep, stop) == (False, True) and "watershed" in " ".join(why)
    assert verdict(with_(coverage=-1.0), with_(coverage=0.1), 0.9)[0]


def test_measure_on_constructed_tiles():
    """Discs on a pink background, mirror-symmetric: the watershed finds the same nuclei either way (consistency 1),
    none on white; density = detections / tile area."""
    import numpy as np

    from wsiseg.adapt.report import agreement, measure
    from wsiseg.api import load_model

    tile = np.full((128, 128, 3), (230, 170, 200), np.uint8)
    for x in (24, 64, 104):
        for y in (30, 90):
            cv2.circle(tile, (x, y), 9, (70, 40, 120), -1)
    tiles = np.stack([tile, tile])
    m, labels = measure(load_model("watershed"), tiles, 0.5)
    assert m.detections == 12 and m.share_on_white == 0 and m.flip_consistency == 1.0
    assert m.per_mm2 == pytest.approx(12 / (2 * (128 * 0.5 / 1000) ** 2), rel=1e-3)
    assert agreement(labels, labels) == 1.0
    assert m.coverage == -1.0  # no reference given


def test_coverage_counts_reference_objects_at_least_half_covered():
    """On constructed tiles: the watershed's own discs cover its reference wholly; a model that finds the discs of
    the left half only covers half of them; an object covered by exactly half counts, by less does not."""
    import numpy as np

    from wsiseg.adapt.report import coverage, measure, reference
    from wsiseg.api import load_model

    tile = np.full((128, 128, 3), (230, 170, 200), np.uint8)
    for x in (24, 64, 104):
        for y in (30, 90):
            cv2.circle(tile, (x, y), 9, (70, 40, 120), -1)
    tiles = np.stack([tile, tile])
    ref = reference(tiles)
    assert [int(r.max()) for r in ref] == [6, 6]
    m, labels = measure(load_model("watershed"), tiles, 0.5, ref)
    assert m.coverage == 1.0
    left = [np.where(lab > 0, lab, 0) * (np.arange(128)[None, :] < 44) for lab in labels]  # the x = 24 discs
    assert coverage(left, ref) == pytest.approx(2 / 6)
    r = np.zeros((4, 4), np.int32)
    r[:, :2] = 1
    r[:, 2:] = 2
    half = np.zeros((4, 4), np.int32)
    half[:2, :2] = 1  # half of object 1
    half[0, 2] = 2  # a quarter of object 2
    assert coverage([half], [r]) == 0.5
    assert coverage([half], [np.zeros((4, 4), np.int32)]) == 1.0


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """A 1 KB 'billion laughs' config (nested aliases) is a one-line config error before anything expands, and no
    error message quotes more than a short excerpt of a value."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ntrain: {iterations: *a8}\n")
    assert bomb.stat().st_size < 1500
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--recipe", "paper", "--config", str(bomb)])
    err = capsys.readouterr().err
    assert code == 2 and "aliases" in err and len(err.strip().splitlines()) == 1 and len(err) < 400
    # (the alias is refused by the parser, before any expansion: the 10^9-element value is never built)
    # a huge value given inline is quoted as an excerpt
    code = main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--recipe", "paper", "--set", "train.iterations=[" + ",".join(["1"] * 5000) + "]"])
    err = capsys.readouterr().err
    assert code == 2 and "iterations" in err and len(err) < 300
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    assert main(["adapt", "--source", str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--recipe", "paper", "--config", str(big)]) == 2
    assert "too large" in capsys.readouterr().err


def test_the_first_screens_estimate_reads_in_seconds_minutes_or_hours():
    from wsiseg.adapt.pipeline import _duration, _plan
    from wsiseg.adapt.recipes import build_config, estimate

    assert [_duration(s) for s in (3, 36, 89, 239, 1187, 9000)] == ["~3 s", "~40 s", "~90 s", "~4 min", "~20 min",
                                                                      "~2.5 h"]
    cfg = build_config("finetune", "cuda")
    tiny = _plan("finetune", "default", cfg, 2, "cuda", {"source": 5.0, "train": 20.0})
    assert "estimated time: ~20 s; a rerun" in tiny  # no stage of 30 s or more: no empty brackets
    gpu = _plan("finetune", "default", cfg, 16, "cuda", estimate(cfg, 16, "cuda"))
    assert "estimated time: ~7 min (translate ~40 s, train ~6 min)" in gpu  # the H200's measured rates


def test_fewer_slides_give_more_tiles_each_up_to_the_recipe_s_total(tmp_path, shared_data):
    """``target.min_tiles``: a run on one slide draws as many tissue tiles as the recipe's total (where the slide holds
    them), a run on many draws ``tiles_per_slide`` from each; the shipped recipes ask 256 in all, so the 16 Kumar
    images still give 16 each, and one slide up to 256."""
    from wsiseg.adapt.recipes import build_config
    from wsiseg.adapt.target import TargetConfig, sample_target

    names = sorted((shared_data / "kumar" / "images").glob("*.tif"))[:2]
    for p in names:  # two 1000 px Kumar images at 0.25 um/px: 16 tissue tiles of 256 px each
        cv2.imwrite(str(tmp_path / f"{p.stem}.png"), tifffile.imread(p)[..., 2::-1])
    slides = sorted(tmp_path.glob("*.png"))
    cfg = TargetConfig(tile=256, tiles_per_slide=2, min_tiles=8, mpp=0.25)
    assert (cfg.per_slide(1), cfg.per_slide(2), cfg.per_slide(3), cfg.per_slide(10)) == (8, 4, 3, 2)
    one = sample_target(slides[:1], tmp_path / "one", cfg, 0.25, progress=False)
    two = sample_target(slides, tmp_path / "two", cfg, 0.25, progress=False)
    assert len(list((one / "images").glob("*.png"))) == 8
    assert len(list((two / "images").glob("*.png"))) == 8  # 4 from each
    many = sample_target(slides[:1], tmp_path / "all", TargetConfig(tile=256, tiles_per_slide=2, min_tiles=100,
                                                                     mpp=0.25), 0.25, progress=False)
    assert len(list((many / "images").glob("*.png"))) == 16  # all the slide holds
    shipped = build_config("finetune", "cpu").target
    assert (shipped.per_slide(16), shipped.per_slide(1)) == (16, 256)


def test_remaining_counts_what_a_run_has_left(tmp_path):
    """The first screen's estimate counts only the stages a call will run: every stage of a new run, the selected
    ones of --stages, each round of several."""
    from wsiseg.adapt.pipeline import STAGES, remaining
    from wsiseg.adapt.recipes import build_config, estimate

    cfg = build_config("finetune", "cpu", overrides=["rounds=2"])
    targets = [tmp_path / "a.png"]
    new = remaining(tmp_path / "new", cfg, targets)
    assert set(new) == set(STAGES) and all(v == 1.0 for v in new.values())
    only = remaining(tmp_path / "new", cfg, targets, stages=("train", "report"))
    assert only["train"] == only["report"] == 1.0
    assert only["source"] == only["translate"] == only["pseudo"] == 0.0
    est = estimate(cfg, 1, "cpu")
    assert set(est) <= set(new)  # every stage the estimate names has a share


def test_a_slide_s_own_scale_is_never_overridden_by_target_mpp(tmp_path, shared_data):
    """``target.mpp`` (``--target-mpp``; 0.25 in the shipped recipes) is for inputs that do not say their scale: the
    bundled 20x sample (0.499 um/px) is read at its own scale, so its grid at the model's 0.25 um/px holds 18 x 24
    tiles (at 0.25 it would be 9 x 12, its nuclei half the size the teacher knows); a Kumar TIFF, which says
    nothing, takes ``target.mpp`` (at 0.4: 7 x 7 tiles), and without it the model's scale (4 x 4). The first
    screen's count of tiles to draw is bounded by each input's grid."""
    from wsiseg.adapt.target import TargetConfig, input_mpp, sample_target, tiles_to_draw
    from wsiseg.api import sample_slide
    from wsiseg.io.slide import open_slide

    kumar = sorted((shared_data / "kumar" / "images").glob("*.tif"))[0]
    sample = sample_slide()
    cfg = TargetConfig(tile=256, tiles_per_slide=1000, mpp=0.25)
    with open_slide(sample) as s, open_slide(kumar) as k:
        assert input_mpp(s, cfg.mpp, 0.25) == pytest.approx(0.499) and input_mpp(k, cfg.mpp, 0.25) == 0.25
        assert input_mpp(k, 0.4, 0.25) == 0.4
    assert tiles_to_draw([sample], cfg, 0.25) == 18 * 24
    assert tiles_to_draw([kumar], TargetConfig(tile=256, tiles_per_slide=1000, mpp=0.4), 0.25) == 7 * 7
    assert tiles_to_draw([kumar], TargetConfig(tile=256, tiles_per_slide=1000), 0.25) == 4 * 4
    assert tiles_to_draw([kumar, tmp_path / "missing.svs"], TargetConfig(tile=256, tiles_per_slide=10), 0.25) == 20
    out = sample_target([sample], tmp_path / "t", TargetConfig(tile=256, tiles_per_slide=8, mpp=0.25), 0.25,
                        progress=False)
    rows = [int(p.stem.split("_")[-2]) for p in (out / "images").glob("*.png")]
    assert len(rows) == 8 and max(rows) >= 12  # tiles from the 24-row grid: past the 12 rows of one at 0.25


def test_training_is_keyed_on_its_data_so_other_targets_train_again(tmp_path, shared_data):
    """A finished run's training stands for its own targets only: over other targets (or the same at another
    scale) the first screen counts the pseudo-labels and the training again, not just the target stage."""
    from wsiseg.adapt.pipeline import _Stage, _stage_name, _train_key, remaining
    from wsiseg.adapt.recipes import build_config

    names = sorted((shared_data / "kumar" / "images").glob("*.tif"))[:2]
    cfg = build_config("finetune", "cpu")
    out = tmp_path / "run"
    out.mkdir()
    _Stage(out, _stage_name(1, "train"), _train_key(cfg, names[:1]), False).finish()
    (out / "round1.safetensors").write_bytes(b"")
    assert remaining(out, cfg, names[:1], stages=("train",))["train"] == 0.0
    assert remaining(out, cfg, names, stages=("train",))["train"] == 1.0
    cfg.target.mpp = 0.4  # (the Kumar TIFFs say no scale: target.mpp is theirs, and the tiles change)
    assert remaining(out, cfg, names[:1], stages=("train",))["train"] == 1.0
