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
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..core.atomic import check_writable, copy_file, path_relation
from ..core.errors import ConfigError, InputError, OutputError
from ..models.config import to_dict

STAGES = ("source", "target", "translate", "inpaint", "pseudo", "negatives", "train", "report")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stage:
    def __init__(self, out: Path, name: str, cfg, force: bool) -> None:
        self.marker = out / f".{name}.done"
        self.started = out / f".{name}.started"  # (the configuration of a run of the stage that has not finished)
        self.key = _hash(cfg)
        self.force = force
        self.name = name
        # outputs left by a run with another configuration, finished or interrupted, are removed, not resumed (they
        # would be mixed in: another target's tiles, a CycleGAN or a training begun with other settings)
        self.redo = force or (self.marker.exists() and not self.done()) or self._started_otherwise()

    def _started_otherwise(self) -> bool:
        try:
            return json.loads(self.started.read_text()).get("config") != self.key
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True

    def start(self) -> None:
        self.started.write_text(json.dumps({"config": self.key}))

    def done(self) -> bool:
        if self.force or not self.marker.exists():
            return False
        try:
            return json.loads(self.marker.read_text()).get("config") == self.key
        except (OSError, ValueError):
            return False

    def finish(self, **info) -> None:
        self.marker.write_text(json.dumps({"config": self.key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}))
        self.started.unlink(missing_ok=True)


@dataclass(frozen=True)
class AdaptRun:
    """How an :func:`adapt` call runs: the ``stages`` to run (of :data:`STAGES`), ``force`` (redo finished ones),
    the ``device``, ``progress`` bars on stderr and the ``log`` of stage lines."""

    stages: tuple[str, ...] = STAGES
    force: bool = False
    device: str = "auto"
    progress: bool = True
    log: Callable[[str], None] = print


def adapt(source_dir: str | Path, targets: list[str | Path], out_dir: str | Path, cfg,
          run: AdaptRun = AdaptRun()) -> Path | None:
    """Run the requested stages (``run``); returns the model path once the train stage has run (else None)."""
    stages, force, device, progress, log = run.stages, run.force, run.device, run.progress, run.log
    out = Path(out_dir)
    _apart(out, source_dir, targets)
    _make_out(out)
    _keep_previous(out, cfg, targets, log)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {', '.join(bad)} (stages: {', '.join(STAGES)})")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))
    run = _Run(out, cfg, stages, force, device, progress, log)
    run.shared(source_dir, targets)
    if not {"pseudo", "train", "report"} & set(stages):
        return None
    start = cfg.train.init or ""
    teacher, chosen, rounds = cfg.pseudo.teacher, (Path(start) if start else None), []
    for k in range(1, max(1, cfg.rounds) + 1):
        cfg_k = _round_config(cfg, k, teacher, str(chosen) if chosen else start)
        student = run.train_round(k, cfg_k, targets)
        if student is None:  # training not selected (--stages) and not done before
            return None
        rec = run.report_round(k, cfg_k, teacher, student)
        rounds.append(rec)
        if rec["kept"]:
            chosen, teacher = student, str(student)
        if rec["stop"]:
            break
    model_path = out / "model.safetensors"
    if chosen is None:
        raise InputError("no model was trained")  # (unreachable: a model-less start keeps its first student)
    copy_file(chosen, model_path)
    if not rounds[0]["kept"]:
        log(f"[report] round 1's student was not kept ({'; '.join(rounds[0]['reasons'])}): {model_path} is the model "
            "the run started from, unchanged")
    record = {"command": " ".join(sys.argv), "source": str(source_dir), "targets": [str(t) for t in targets],
              "config": to_dict(cfg), **run.counts, "rounds": rounds, "model": str(model_path),
              "chosen": str(chosen), "stage_seconds": run.seconds}
    metrics = out / "pdam" / "metrics.json"
    if metrics.exists():
        record["validation"] = json.loads(metrics.read_text())
    (out / "adapt_record.json").write_text(json.dumps(record, indent=1, default=str))
    log(f"[train] model written to {model_path}")
    return model_path


def _apart(out: Path, source_dir: str | Path, targets: list[str | Path]) -> None:
    """ConfigError when an input lies inside ``out`` or holds it: the stages replace their folders there (a slide in
    ``out/target`` was deleted by a rerun), and a target folder holding ``out`` would take the run's tiles for
    slides."""
    for kind, p in [("--source", source_dir)] + [("--target", t) for t in targets]:
        where = path_relation(p, out)
        if where:
            raise ConfigError(f"{kind} {p} {where} --out {out}: keep the slides and BBBC039 apart from the run's "
                              "folder")


def _make_out(out: Path) -> None:
    """``out`` as a folder to write in; OutputError, in one line, when it is a file or cannot be made or written."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: a file, not a folder")
    check_writable(out / "adapt_record.json", overwrite=True)  # (makes the folder, and tries a file in it)


def _keep_previous(out: Path, cfg, targets: list[str | Path], log: Callable[[str], None]) -> None:
    """Where ``out`` holds a finished run with other settings or slides, which this one will redo in part and whose
    model it will replace (a rerun with other ``--set`` values lost an adapted model without a word): its model and
    record kept under ``out/previous/`` first, and a line that says so."""
    model, rec = out / "model.safetensors", out / "adapt_record.json"
    if not model.exists() or not rec.exists():
        return
    try:
        old = json.loads(rec.read_text())
    except (OSError, ValueError):
        return
    now = {"config": json.loads(json.dumps(to_dict(cfg), default=str)), "targets": [str(t) for t in targets]}
    if {"config": old.get("config"), "targets": old.get("targets")} == now:
        return
    keep = out / "previous" / time.strftime("%Y%m%d-%H%M%S")
    keep.mkdir(parents=True, exist_ok=True)
    copy_file(model, keep / model.name)
    copy_file(rec, keep / rec.name)
    log(f"[adapt] {out} held a finished run with other settings or slides: its model and record are kept in {keep}")


def _round_config(cfg, k: int, teacher: str, init: str):
    """Round ``k``'s configuration: round 1 is ``cfg`` itself; later rounds start from, and are labelled by, the
    last kept model, with the next seed."""
    if k == 1:
        return cfg
    return replace(cfg, pseudo=replace(cfg.pseudo, teacher=teacher),
                   train=replace(cfg.train, init=init, seed=cfg.train.seed + k - 1))


def _train_key(cfg, targets) -> tuple:
    """What a round's training depends on: the whole configuration but the rounds' count and the report's size, and
    the data it trains on (the target tiles and their pseudo-labels: :func:`_pseudo_key`), so that a run over other
    targets, or over a retrained teacher, trains again."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("rounds", "report_tiles")}, _pseudo_key(cfg, targets)


def _stage_name(k: int, stage: str) -> str:
    """Round ``k``'s name of a round stage (``pseudo``, ``train``, ``report``): its marker is ``.NAME.done``."""
    return stage if k == 1 else f"round{k}.{stage}"


def _shared_keys(cfg, targets) -> dict:
    """What each shared stage's outputs depend on (its marker's key): the flow and :func:`remaining` both use these."""
    target = (cfg.target, [str(t) for t in targets], cfg.model.mpp,  # what the target tiles depend on
              _input_scales(cfg, targets),  # (each one's scale: a file's own, or target.mpp where it says none)
              *((_teacher_digest(cfg),) if cfg.target.zoom else ()))  # (the teacher's probe picks each one's zoom)
    return {"source": cfg.source, "target": target, "translate": (cfg.source, cfg.target, cfg.cyclegan),
            "inpaint": (cfg.source, cfg.target, cfg.cyclegan, cfg.inpaint), "negatives": (*target, cfg.negatives)}


def _input_scales(cfg, targets) -> list:
    """Each target's level-0 um/px as the target stage reads it (:func:`wsiseg.adapt.target.input_mpp`); None for
    one that cannot be opened (the stage itself says why). Reads the files' headers, once each."""
    from .target import input_headers

    return [h and h[0] for h in input_headers(targets, cfg.target, cfg.model.mpp)]


def _pseudo_key(cfg, targets) -> tuple:
    return (*_shared_keys(cfg, targets)["target"], cfg.pseudo, _teacher_digest(cfg))


def remaining(out_dir: str | Path, cfg, targets, stages=STAGES, force: bool = False) -> dict[str, float]:
    """How much of each stage of :func:`wsiseg.adapt.recipes.estimate` an :func:`adapt` call over ``out_dir`` would
    run: 1 for a shared stage selected (``stages``) and not complete, 0 otherwise; for ``pseudo``, ``train`` and
    ``report`` the share of the rounds still to run (a round after one that runs is counted whole: its teacher may
    change). What the first screen's estimate counts, so that a resumed run is not quoted the whole run's time."""
    out = Path(out_dir)

    def done(name: str, key) -> bool:
        return name.rpartition(".")[2] not in stages or _Stage(out, name, key, force).done()

    share = {name: 0.0 if done(name, key) else 1.0 for name, key in _shared_keys(cfg, targets).items()}
    rounds = max(1, cfg.rounds)
    left = {"pseudo": 0, "train": 0, "report": 0}
    behind = False  # a stage of an earlier round runs: the later rounds run whole
    for k in range(1, rounds + 1):
        if k > 1 and not behind and _stopped(out / f".{_stage_name(k - 1, 'report')}.done"):
            break  # the last round's report ended the rounds, and it stands
        runs = {}
        for stage in ("pseudo", "train", "report"):
            if stage not in stages:
                runs[stage] = False
            elif behind or (k > 1 and force):
                runs[stage] = True
            elif k > 1:  # a later round's keys hold its teacher's digest, known once the round before has run
                runs[stage] = not (out / f".{_stage_name(k, stage)}.done").exists()
            elif stage == "pseudo":
                runs[stage] = not done("pseudo", _pseudo_key(cfg, targets))
            elif stage == "train":
                runs[stage] = not done("train", _train_key(cfg, targets)) or not (out / "round1.safetensors").exists()
            else:  # the report's key holds its student's digest
                student = out / "round1.safetensors"
                runs[stage] = runs["train"] or not student.exists() or not done("report", _report_key(cfg, student))
        for stage, r in runs.items():
            left[stage] += r
        behind = behind or any(runs.values())
    share.update({stage: n / rounds for stage, n in left.items()})
    return share


def _report_key(cfg, student: Path) -> tuple:
    return (cfg, _file_digest(str(student)), _teacher_digest(cfg))


def _stopped(marker: Path) -> bool:
    """Whether a report's marker records that its round ended the rounds."""
    try:
        return bool(json.loads(marker.read_text()).get("record", {}).get("stop"))
    except (OSError, ValueError, AttributeError):
        return False


class _Run:
    """The stages of one ``adapt`` call over ``out``: shared ones once, then the pseudo/train/report of each round
    (round 1 in ``out/pseudo``, ``out/pdam``; round k > 1 in ``out/round{k}/``). ``seconds``: each stage's wall time."""

    def __init__(self, out: Path, cfg, stages, force: bool, device: str, progress: bool, log) -> None:
        self.out, self.cfg, self.stages, self.force = out, cfg, stages, force
        self.device, self.progress, self.log = device, progress, log
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def stage(self, name: str, conf) -> _Stage | None:
        st = _Stage(self.out, name, conf, self.force)
        if name.rpartition(".")[2] not in self.stages:
            return None
        if st.done():
            self.log(f"[{name}] complete, skipped (use --force to redo)")
            self._recorded_seconds(st)
            return None
        self.log(f"[{name}] running" + (" (what a run with other settings left is removed)" if st.redo and
                                         not self.force else ""))
        st.start()
        st.t0 = time.perf_counter()
        return st

    def _recorded_seconds(self, st: _Stage) -> None:
        """A skipped stage's time as its marker recorded it (markers of older versions have none)."""
        try:
            secs = json.loads(st.marker.read_text()).get("seconds")
        except (OSError, ValueError):
            secs = None
        if secs is not None:
            self.seconds[st.name] = secs

    def finish(self, st: _Stage, **info) -> None:
        self.seconds[st.name] = round(time.perf_counter() - st.t0, 1)
        st.finish(seconds=self.seconds[st.name], **info)

    def shared(self, source_dir, targets) -> None:
        from .inpaint import inpaint_dir
        from .source import prepare_source
        from .target import sample_target
        from .translate import train_cyclegan, translate_dir

        out, cfg, device, progress = self.out, self.cfg, self.device, self.progress
        keys = _shared_keys(cfg, targets)
        if st := self.stage("source", keys["source"]):
            if st.redo:
                shutil.rmtree(out / "source", ignore_errors=True)
            for split in ("train", "val"):
                prepare_source(source_dir, out / "source" / split, cfg.source, split=split, progress=progress)
            self.finish(st)
        if st := self.stage("target", keys["target"]):
            if st.redo:
                shutil.rmtree(out / "target", ignore_errors=True)
            zoom_model = None
            if cfg.target.zoom:
                from ..api import load_model

                zoom_model = load_model(cfg.pseudo.teacher, device=device)
            sample_target(targets, out / "target", cfg.target, cfg.model.mpp, progress=progress, zoom_model=zoom_model)
            self.finish(st, tiles=len(list((out / "target" / "images").glob("*.png"))))
        if st := self.stage("translate", keys["translate"]):
            if st.redo:
                for d in ("cyclegan", "synth"):
                    shutil.rmtree(out / d, ignore_errors=True)
            _need(out / "source" / "train" / "images", "source")
            _need(out / "target" / "images", "target")
            gen = train_cyclegan(out / "source" / "train", out / "target" / "images", out / "cyclegan", cfg.cyclegan,
                                 resume=True, device=device, progress=progress)
            for split in ("train", "val"):
                translate_dir(out / "source" / split, gen, out / "synth" / split, device=device, progress=progress)
            self.finish(st)
        if st := self.stage("inpaint", keys["inpaint"]):
            if st.redo:
                shutil.rmtree(out / "inpainted", ignore_errors=True)
            _need(out / "synth" / "train" / "images", "translate")
            for split in ("train", "val"):
                inpaint_dir(out / "synth" / split, out / "inpainted" / split, radius=cfg.inpaint.radius,
                            mode=cfg.inpaint.mode, progress=progress)
            self.finish(st)
        if cfg.train.negative_fraction > 0 and (st := self.stage("negatives", keys["negatives"])):
            from .target import sample_background

            if st.redo:
                shutil.rmtree(out / "negatives", ignore_errors=True)
            n = sample_background(targets, out / "negatives", cfg.target, cfg.model.mpp, cfg.negatives.per_slide,
                                  cfg.negatives.min_white)
            self.log(f"[negatives] {n} glass tiles of the target slides (the rest of the negatives are synthetic)")
            self.finish(st, tiles=n)

    def _dir(self, k: int) -> Path:
        return self.out if k == 1 else self.out / f"round{k}"

    def train_round(self, k: int, cfg, targets) -> Path | None:
        """Round ``k``'s pseudo-labels (when the recipe uses them) and training; returns its student's file (None when
        training was not selected and has not been done)."""
        from ..train.trainer import TrainData, load_image_dir, load_pair_dir, train

        out, rdir = self.out, self._dir(k)
        if cfg.train.pseudo_fraction > 0 and (st := self.stage(_stage_name(k, "pseudo"),
                                                              _pseudo_key(cfg, targets))):
            if st.redo:
                shutil.rmtree(rdir / "pseudo", ignore_errors=True)
            _need(out / "target" / "images", "target")
            _pseudo_label(out / "target" / "images", rdir / "pseudo", cfg, self.device, self.progress)
            tiles = len(list((rdir / "pseudo" / "labels").glob("*.png")))
            left = json.loads((rdir / "pseudo" / "left_out.json").read_text())
            self.log(f"[{st.name}] {left['labels']} labels on {tiles} tiles; left out: {left['on_white']} on white, "
                     f"{left['pale']} far paler than their slide, {left['ragged']} ragged")
            self.finish(st, tiles=tiles, left_out=left)
        student = out / f"round{k}.safetensors"
        st = _Stage(out, _stage_name(k, "train"), _train_key(cfg, targets), self.force)
        src_root = out / ("inpainted" if cfg.inpaint.enabled else "synth")
        self.counts = {"source_images": len(list((src_root / "train" / "images").glob("*.png")))}
        if st.done() and student.exists():
            self.log(f"[{st.name}] complete, skipped (use --force to redo)")
            self._recorded_seconds(st)
            return student
        if "train" not in self.stages:
            return None
        self.log(f"[{st.name}] running")
        st.t0 = time.perf_counter()
        _need(src_root / "train" / "images", "inpaint" if cfg.inpaint.enabled else "translate")
        source = load_pair_dir(src_root / "train")
        val = load_pair_dir(src_root / "val")
        if cfg.val_images:
            val = val[:cfg.val_images]
        target = None if cfg.source_only else load_image_dir(out / "target" / "images")
        pseudo = None
        if cfg.train.pseudo_fraction > 0:
            _need(rdir / "pseudo" / "labels", "pseudo")
            pseudo = load_pair_dir(rdir / "pseudo")
        negatives = None
        if cfg.train.negative_fraction > 0 and (out / "negatives").is_dir() and any((out / "negatives").glob("*.png")):
            negatives = load_image_dir(out / "negatives")
        if st.redo:
            shutil.rmtree(rdir / "pdam", ignore_errors=True)
        data = TrainData(source, target, val=val, pseudo=pseudo, negatives=negatives)
        final = train(cfg.model, cfg.train, data, rdir / "pdam", resume=True, device=self.device,
                      progress=self.progress)
        copy_file(Path(final), student)
        self.counts = {"source_images": len(source), "target_images": len(target or []),
                       "pseudo_images": len(pseudo or []), "negative_images": len(negatives or []),
                       "val_images": len(val)}
        self.finish(st)
        return student

    def report_round(self, k: int, cfg, teacher: str, student: Path) -> dict:
        """The unlabelled report of round ``k`` (:mod:`wsiseg.adapt.report`): its measures, and whether the student
        is kept and the rounds stop. Without a teacher model (the paper's recipe) the student is kept."""
        rec = {"round": k, "teacher": teacher or None, "student": str(student), "kept": True, "stop": False,
               "reasons": []}
        marker = self.out / f".{_stage_name(k, 'report')}.done"
        st = self.stage(_stage_name(k, "report"), _report_key(cfg, student))
        if st is None:
            old = json.loads(marker.read_text()).get("record") if marker.exists() else None
            if old:
                return old
            rec["stop"] = k >= self.cfg.rounds
            rec["reasons"].append("not measured (report stage not run)")
            return rec
        from ..api import load_model
        from .report import agreement, measure, reference, report_tiles, verdict

        tiles = report_tiles(self.out / "target" / "images", cfg.report_tiles)
        ref = reference(tiles)
        seg = load_model(str(student), device=self.device)
        ms, labels = measure(seg, tiles, cfg.model.mpp, ref)
        rec["student_measures"] = ms.as_dict()
        if teacher:
            t = load_model(teacher, device=self.device)
            mt, tlabels = measure(t, tiles, cfg.model.mpp, ref)
            rec["teacher_measures"] = mt.as_dict()
            rec["agreement"] = agreement(tlabels, labels)
            rec["kept"], rec["stop"], rec["reasons"] = verdict(mt, ms, rec["agreement"])
        else:
            rec["reasons"].append("no teacher model to compare with (trained from scratch): kept")
        rec["stop"] = rec["stop"] or k >= self.cfg.rounds
        self.log(f"[{st.name}] student {'kept' if rec['kept'] else 'not kept'}: {'; '.join(rec['reasons']) or '-'}")
        self.finish(st, record=rec)
        return rec


def _pseudo_label(images: Path, out: Path, cfg, device: str, progress: bool) -> None:
    from .pseudo import LabelRules, pseudo_label_dir

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
    rules = LabelRules(cfg.pseudo.min_solidity, cfg.inpaint.radius, cfg.pseudo.drop_white, cfg.pseudo.drop_pale)
    pseudo_label_dir(images, out, teacher=teacher, rules=rules, progress=progress, stain_norm=cfg.pseudo.stain_norm)


def _teacher_digest(cfg) -> str:
    """The content hash of the teacher's files (a retrained teacher or ensemble member at the same path redoes the
    pseudo stage); "" without."""
    if not cfg.pseudo.teacher:
        return ""
    from ..api import model_path

    digests = [_file_digest(model_path(p)) for p in (cfg.pseudo.teacher, *cfg.pseudo.ensemble)]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    """The content hash of the file ``path``, read once while it stays as it is (memoised on its real path, size and
    modification time: the stage keys ask for a teacher's many times a run, about 20 ms a read of the bundled one)."""
    st = os.stat(path)
    return _content_digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _need(p: Path, stage: str) -> None:
    if not p.is_dir() or not any(p.iterdir()):
        raise InputError(f"{p}: missing; run the '{stage}' stage first")


# ------------------------------------------------------------------------------------------------- command line
def add_parser(subparsers) -> argparse.ArgumentParser:
    from .recipes import RECIPES

    a = subparsers.add_parser("adapt", help="adapt a model to a hospital's unlabelled slides (default: fine-tune the "
                                            "bundled model by self-training; --recipe paper: CyC-PDAM from scratch)")
    a.add_argument("--source", required=True, help="BBBC039 directory (images/, masks/, splits/)")
    a.add_argument("--target", nargs="+", required=True,
                   help="the hospital's slides (SVS, NDPI, TIFF, ...) or images, or directories of them; tiles are "
                        "drawn from their tissue, their labels never read")
    a.add_argument("--out", required=True, help="working/output directory (out/model.safetensors, "
                                                "out/adapt_record.json; rerun the same command to resume)")
    a.add_argument("--recipe", default="finetune", choices=list(RECIPES),
                   help="; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()) +
                        ". Sized for the device: on a 2-core CPU about 15 min for 16 slides run alone (finetune, "
                        "one round of 1,600 iterations; two runs at once: OMP_NUM_THREADS=1 for each); on a GPU "
                        "finetune runs up to 3 rounds (16 slides: about 7 min on an H200, estimated) and paper the "
                        "paper's ResNet-101 configuration")
    a.add_argument("--start", default="default", metavar="MODEL",
                   help="finetune: the model to start from and label the target with (a bundled name or a file; "
                        "default: default)")
    a.add_argument("--config", default=None,
                   help="a YAML config replacing the recipe's base configuration (sizes, schedule), e.g. "
                        "configs/kumar_r101.yaml; the recipe's settings and --set apply over it")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config value (repeatable), e.g. --set inpaint.enabled=false "
                        "--set train.iterations=1200 --set rounds=2")
    a.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    a.add_argument("--force", action="store_true", help="redo the selected stages")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (auto: a GPU when there is one); the recipe's sizes follow it")
    a.add_argument("--target-mpp", type=float, help="um/px of target images that do not say (Kumar: 0.25)")
    a.add_argument("--quiet", action="store_true", help="no progress bars (stage lines and the summary remain)")
    return a


def run(args: argparse.Namespace) -> int:
    from ..core.runtime import resolve_device
    from ..io.slide import expand_inputs
    from .recipes import build_config, estimate
    from .target import tiles_to_draw

    device = str(resolve_device(args.device))
    cfg = build_config(args.recipe, device, args.config, args.overrides, start=args.start)
    if args.target_mpp is not None:
        if not 0.05 <= args.target_mpp <= 4:  # (wsiseg run's range; checked before any stage)
            raise ConfigError(f"--target-mpp {args.target_mpp}: expected micrometres per pixel in 0.05..4 (40x: 0.25)")
        cfg.target.mpp = args.target_mpp
    src = Path(args.source)
    if not src.is_dir():
        raise InputError(f"{src}: not a directory (expected BBBC039's images/, masks/, splits/)")
    targets = expand_inputs(args.target)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    err = lambda m: print(m, file=sys.stderr)  # noqa: E731
    whole = estimate(cfg, len(targets), device, tiles_to_draw(targets, cfg.target, cfg.model.mpp))
    share = remaining(args.out, cfg, targets, stages, args.force)  # a rerun is quoted what it has left to do
    est = {k: v * share.get(k, 1.0) for k, v in whole.items()}
    err(_plan(args.recipe, args.start, cfg, len(targets), device, est, resumed=est != whole))
    path = adapt(src, targets, args.out, cfg, AdaptRun(stages=stages, force=args.force, device=device,
                                                       progress=not args.quiet and sys.stderr.isatty(), log=err))
    if path is not None:
        rec = json.loads((Path(args.out) / "adapt_record.json").read_text())
        rec["recipe"], rec["device"], rec["estimate_seconds"] = args.recipe, device, {k: round(v) for k, v in est.items()}
        (Path(args.out) / "adapt_record.json").write_text(json.dumps(rec, indent=1, default=str))
        print(summary(rec))
        print(f"model: {path}   (use: wsiseg run SLIDE --model {path} --out nuclei.geojson)")
    return 0


def _plan(recipe: str, start: str, cfg, n: int, device: str, est: dict[str, float], resumed: bool = False) -> str:
    what = (f"fine-tunes {start} (threshold {cfg.model.roi.score_thresh:g}) for up to {cfg.rounds} round(s) of "
            f"{cfg.train.iterations} iterations" if cfg.train.init else
            f"trains ResNet-{cfg.model.backbone.depth} PDAM from scratch for {cfg.train.iterations} iterations")
    stages = ", ".join(f"{k} {_duration(v)}" for k, v in est.items() if v >= 30)
    return (f"wsiseg adapt: recipe {recipe} on {device}, {n} target slide(s)/image(s): CycleGAN "
            f"{cfg.cyclegan.iterations} iterations, then {what}.\n"
            f"  estimated time{' left (the stages still to run)' if resumed else ''}: "
            f"{_duration(sum(est.values())) if sum(est.values()) > 0 else 'none, every stage is complete'}"
            f"{f' ({stages})' if stages else ''}; a rerun resumes where it stopped")


def _duration(seconds: float) -> str:
    """``~40 s`` under a minute and a half, ``~3 min`` up to two hours, else ``~2.5 h``."""
    if seconds < 90:
        return f"~{max(1, round(seconds / 10) * 10) if seconds >= 10 else max(1, round(seconds))} s"
    if seconds < 7200:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def summary(rec: dict) -> str:
    """One screen: each round's unlabelled measures beside its teacher's, and which model was kept."""
    rows = [("detections / mm^2", "per_mm2", "{:.0f}"), ("on white", "share_on_white", "{:.1%}"),
            ("mirror consistency", "flip_consistency", "{:.3f}"), ("watershed covered", "coverage", "{:.1%}"),
            ("score median", "score_p50", "{:.2f}")]
    secs = sum(rec.get("stage_seconds", {}).values())
    lines = [f"adapted to {len(rec['targets'])} target slide(s)/image(s); stages took {secs / 60:.0f} min in all "
             "(adapt_record.json: stage_seconds, rounds)"]
    for r in rec.get("rounds", []):
        cols = [("teacher", r.get("teacher_measures")), (f"round {r['round']}", r.get("student_measures"))]
        cols = [(n, m) for n, m in cols if m]
        if cols:
            lines.append(f"  {'':22s}" + "".join(f"{n:>14s}" for n, _ in cols))
            for title, key, fmt in rows:
                lines.append(f"  {title:22s}" + "".join(
                    f"{fmt.format(m[key]) if m.get(key, -1) >= 0 else '-':>14s}" for _, m in cols))  # (-1: not measured)
        if "agreement" in r:
            lines.append(f"  {'agreement w/ teacher':22s}{'':14s}{r['agreement']:>14.3f}")
        lines.append(f"  round {r['round']}: {'kept' if r['kept'] else 'NOT kept'} ({'; '.join(r['reasons'])})")
    return "\n".join(lines)
