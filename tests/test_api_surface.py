"""The Python API as users import it: ``from wsiseg import ...`` with the command line's defaults, typed."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest


def test_top_level_names_are_the_api_and_import_lazily():
    code = ("import sys, wsiseg; assert 'torch' not in sys.modules and 'wsiseg.api' not in sys.modules; "
            "from wsiseg import segment_slide, segment_image, image_nuclei, load_model, nuclei_labels, Nucleus; "
            "import wsiseg.api as api; assert segment_slide is api.segment_slide and load_model is api.load_model; "
            "print(sorted(wsiseg.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "segment_image" in out and "segment_slide" in out
    import wsiseg

    with pytest.raises(AttributeError):
        wsiseg.no_such_name  # noqa: B018


def test_in_memory_api_defaults_to_the_bundled_model_and_needs_the_scale():
    from wsiseg import image_nuclei, segment_image, segment_slide

    for fn in (segment_image, image_nuclei, segment_slide):
        assert inspect.signature(fn).parameters["model"].default == "default"
    for fn in (segment_image, image_nuclei):
        p = inspect.signature(fn).parameters["mpp"]
        assert p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.KEYWORD_ONLY
    import numpy as np

    with pytest.raises(TypeError, match="mpp"):
        segment_image(np.zeros((64, 64, 3), np.uint8))


def test_package_is_marked_typed():
    import wsiseg

    assert (Path(wsiseg.__file__).parent / "py.typed").is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject and '"configs/*.yaml"' in pyproject


@pytest.mark.slow
def test_progress_goes_to_stderr_only(tmp_path, shared_data):
    """`wsiseg run ... 2> terminal > out.txt`: the bar and the status lines on stderr (a terminal: a pty here), and
    nothing but the result line on stdout."""
    import os
    import pty

    import cv2
    import tifffile

    img = tifffile.imread(next((shared_data / "kumar" / "images").glob("*.tif")))[:300, :300, :3]
    src = tmp_path / "tile.png"
    cv2.imwrite(str(src), img[..., ::-1])
    master, slave = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")
    p = subprocess.run([sys.executable, "-m", "wsiseg.cli", "run", str(src), "--mpp", "0.25", "--model", "watershed",
                        "--out", str(tmp_path / "n.geojson"), "--device", "cpu"], stdout=subprocess.PIPE,
                       stderr=slave, text=True, env=env, timeout=300)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the pty's other end is closed and drained
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    assert p.returncode == 0
    err_text = err.decode(errors="replace")
    assert "tiles" in err_text and "loading model watershed" in err_text and "tissue mask" in err_text
    assert p.stdout.strip().startswith("tile.png:") and len(p.stdout.strip().splitlines()) == 1
    assert "━" not in p.stdout and "\x1b" not in p.stdout


def test_every_declared_dependency_is_used_by_the_package():
    """Each runtime dependency in pyproject.toml is imported by wsiseg (two are loaded by others: the OpenSlide
    library binary and tifffile's codecs); test-only readers live in the test extra."""
    import re
    import tomllib

    root = Path(__file__).parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in deps]
    module = {"openslide-python": "openslide", "scikit-image": "skimage", "opencv-python-headless": "cv2",
              "pyyaml": "yaml", "pillow": "PIL"}
    not_imported = {"openslide-bin", "imagecodecs"}
    source = "\n".join(p.read_text() for p in (root / "wsiseg").rglob("*.py"))
    for name in names:
        if name in not_imported:
            continue
        mod = module.get(name, name)
        assert re.search(rf"^\s*(import|from) {mod}\b", source, re.M), f"{name} is declared but never imported"
    assert "geojson" not in names and "ome-zarr" not in names  # only the tests read our outputs with them


@pytest.mark.slow
def test_run_json_summary_and_csv(tmp_path, shared_data):
    """--json prints per-input figures on stdout (and nothing else there); --summary-csv writes the same table;
    --debug is accepted after the subcommand."""
    import csv

    import cv2
    import tifffile

    img = tifffile.imread(next((shared_data / "kumar" / "images").glob("*.tif")))[:512, :512, :3]
    src = tmp_path / "tile.png"
    cv2.imwrite(str(src), img[..., ::-1])
    out, table = tmp_path / "n.geojson", tmp_path / "summary.csv"
    p = subprocess.run([sys.executable, "-m", "wsiseg.cli", "run", str(src), "--mpp", "0.25", "--model", "watershed",
                        "--out", str(out), "--json", "--summary-csv", str(table), "--quiet", "--debug"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    rows = json.loads(p.stdout)
    r = rows[0]
    n = len(json.loads(out.read_text(encoding="utf-8"))["features"])
    assert r["nuclei"] == n > 0 and r["outputs"] == {"geojson": str(out)}
    assert 0 < r["tissue_mm2"] <= round(512 * 512 * 0.25 ** 2 / 1e6, 4)  # the mask's area, at most the image's
    assert r["nuclei_per_mm2"] == pytest.approx(n / r["tissue_mm2"], rel=1e-3)
    areas = [f["properties"]["measurements"]["Area µm^2"] for f in json.loads(out.read_text())["features"]]
    assert r["mean_area_um2"] == pytest.approx(sum(areas) / len(areas), rel=1e-3)
    head = json.loads(out.read_text())["wsiseg"]  # provenance in the GeoJSON's header
    import wsiseg

    assert head["wsiseg_version"] == wsiseg.__version__ and head["mpp_source"] == "--mpp"
    assert head["model"] == "watershed" and head["model_source"] is None and head["min_score"] is None
    with open(table, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["nuclei"]) == n and float(row["nuclei_per_mm2"]) == pytest.approx(r["nuclei_per_mm2"], rel=1e-3)


class _PlainSegmenter:
    """A third-party segmenter with only what the Segmenter protocol asks: it finds no nucleus."""

    name = "plain"
    mpp = 0.25
    max_nucleus_px = 40

    def predict(self, tiles):
        from wsiseg.segmenters.base import TileInstances

        return [TileInstances.empty(t.shape[:2]) for t in tiles]


def test_a_plain_third_party_segmenter_runs_with_the_defaults(tmp_path, kumar_dir):
    """name, mpp, max_nucleus_px and predict are enough: describe() gives the defaults, the run writes them as
    provenance, and a model option it lacks is refused by name."""
    import json

    from wsiseg.api import ConfigError, segment_slide, set_ensemble, set_min_score, set_precision, set_tta
    from wsiseg.segmenters import base

    seg = _PlainSegmenter()
    assert isinstance(seg, base.Segmenter)
    assert base.describe(seg) == base.SegmenterInfo(name="plain", source=None, device="", threshold=None,
                                                    min_score=None, tta=0, semantic_fusion=False, precision=None,
                                                    member_sources=())
    assert not base.on_gpu(seg) and base.default_batch(seg) == 16
    # larger tiles than 384 px: as many as hold the pixels of 16 of 384 px (a batch's memory grows with its pixels)
    assert [base.default_batch(seg, t) for t in (384, 512, 1024, 4096)] == [16, 9, 2, 1]
    for proto in (base.SelfDescribing, base.Calibrating, base.ScoreThresholded, base.Augmenting,
                  base.SemanticFusing, base.Ensemble, base.MixedPrecision, base.Settable):
        assert not isinstance(seg, proto), proto
    with pytest.raises(ConfigError, match=r"^--min-score applies to PDAM models, not to plain$"):
        set_min_score(seg, 0.5)
    with pytest.raises(ConfigError, match=r"^--tta applies to PDAM models, not to plain$"):
        set_tta(seg, 4)
    with pytest.raises(ConfigError, match=r"^--precision bf16 applies to PDAM models, not to plain$"):
        set_precision(seg, "bf16")
    set_precision(seg, "fp32")  # the default: nothing to do
    set_precision(seg, "auto")  # (wsiseg run's default): fp32 for a segmenter without reduced arithmetic
    set_ensemble(seg, [])  # none: nothing to do

    image = sorted((kumar_dir / "images").glob("*.tif"))[0]
    out = tmp_path / "n.geojson"
    s = segment_slide(image, geojson=out, model=seg, mpp=0.25, device="cpu")
    assert s.nuclei == 0 and s.model == "plain" and s.tiles_segmented > 0
    head = json.loads(out.read_text(encoding="utf-8"))["wsiseg"]
    assert (head["model"], head["model_source"], head["min_score"], head["tta"], head["semantic_fusion"]) == \
        ("plain", None, None, 0, False)
    with pytest.raises(ConfigError, match=r"^--predict-process needs a PDAM model loaded from a file, not plain$"):
        segment_slide(image, geojson=tmp_path / "p.geojson", model=seg, mpp=0.25, predict_process=True)


def test_describe_reads_the_bundled_models_own_settings():
    """describe() of the bundled PDAM model: its checkpoint, device and detection threshold as they are, and as
    the model options change them; of the watershed: its threshold, no device."""
    from wsiseg.api import bundled_weights, load_model, set_min_score, set_semantic_fusion, set_tta
    from wsiseg.segmenters import base

    ws = load_model("watershed")
    assert base.describe(ws) == base.SegmenterInfo(name="watershed", threshold=ws.threshold)
    assert isinstance(ws, base.Calibrating) and not isinstance(ws, base.ScoreThresholded)
    if bundled_weights() is None:
        pytest.skip("no bundled weights in this installation")
    seg = load_model("default", device="cpu")
    info = base.describe(seg)
    assert info.name == seg.name and info.source == str(bundled_weights()) and info.device == "cpu"
    assert info.min_score == float(seg.model.roi_heads.score_thresh) == pytest.approx(0.80)
    assert (info.threshold, info.tta, info.semantic_fusion, info.precision, info.member_sources) == \
        (None, 0, False, None, ())
    for proto in (base.SelfDescribing, base.ScoreThresholded, base.Augmenting, base.SemanticFusing, base.Ensemble,
                  base.MixedPrecision, base.Settable):
        assert isinstance(seg, proto), proto
    assert not isinstance(seg, base.Calibrating)
    set_min_score(seg, 0.9)
    set_tta(seg, 8)
    set_semantic_fusion(seg, True)
    info = base.describe(seg)
    assert (info.min_score, info.tta, info.semantic_fusion) == (pytest.approx(0.9), 8, True)
    assert float(seg.model.roi_heads.score_thresh) == pytest.approx(0.9)


def test_every_progress_bar_is_drawn_on_stderr():
    """stdout holds results only (summaries, JSON): every rich ``Progress`` the package makes is given a console on
    stderr (rich's default console is stdout). Read from the source, so bars of long training stages count too."""
    import ast

    pkg = Path(__file__).resolve().parents[1] / "wsiseg"
    calls = []
    for path in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Progress":
                console = next((k.value for k in node.keywords if k.arg == "console"), None)
                on_stderr = isinstance(console, ast.Call) and any(
                    k.arg == "stderr" and getattr(k.value, "value", None) is True for k in console.keywords)
                calls.append((f"{path.relative_to(pkg)}:{node.lineno}", on_stderr))
    assert len(calls) >= 6
    assert [c for c, ok in calls if not ok] == []
