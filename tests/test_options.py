"""The run's options written once (``wsiseg.options``): the command line, the API's keywords and a RunOptions give
the same run; the command line's options come from the fields; dicts round-trip; the journal records the fields
marked ``resume``."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest

from wsiseg.api import segment_slide
from wsiseg.cli import build_parser, main
from wsiseg.core.errors import ConfigError
from wsiseg.wsi.resume import journal_dir
from wsiseg.export.zarr_labels import read_zarr_labels
from wsiseg.options import Outputs, RunOptions, split_keywords
from helpers import interrupting_sink


@pytest.fixture(scope="module")
def crop(kumar_dir, tmp_path_factory):
    """400 x 400 px of real H&E at 0.25 um/px, as PNG."""
    import cv2
    import tifffile

    img = tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:400, :400, :3]
    p = tmp_path_factory.mktemp("options") / "crop.png"
    cv2.imwrite(str(p), np.ascontiguousarray(img[..., ::-1]))
    return p


def test_cli_api_keywords_and_run_options_give_the_same_outputs(tmp_path, crop):
    """The same options through ``wsiseg run``, ``segment_slide(**keywords)`` and ``segment_slide(path, Outputs,
    RunOptions)``: the GeoJSON byte for byte (ids included: seeded from the input and the options) and the labels."""
    flags = ["--mpp", "0.25", "--model", "watershed", "--tile-size", "128", "--overlap", "64", "--no-tissue-mask",
             "--batch-size", "3"]
    kw = dict(mpp=0.25, model="watershed", tile_size=128, overlap=64, use_tissue_mask=False, batch_size=3)
    cli = tmp_path / "cli"
    assert main(["run", str(crop), "--out", f"{cli}.geojson", "--zarr", f"{cli}.zarr", "--quiet", *flags]) == 0
    api = tmp_path / "api"
    s = segment_slide(crop, geojson=f"{api}.geojson", zarr=f"{api}.zarr", **kw)
    ro = tmp_path / "ro"
    out = Outputs(geojson=f"{ro}.geojson", zarr=f"{ro}.zarr")
    s2 = segment_slide(crop, out, RunOptions(**kw))
    assert s.nuclei == s2.nuclei > 20 and s.tiles_total > 4
    ref = (tmp_path / "cli.geojson").read_bytes()
    assert (tmp_path / "api.geojson").read_bytes() == ref == (tmp_path / "ro.geojson").read_bytes()
    lab = read_zarr_labels(tmp_path / "cli.zarr")
    assert np.array_equal(lab, read_zarr_labels(tmp_path / "api.zarr"))
    assert np.array_equal(lab, read_zarr_labels(ro.with_suffix(".zarr")))
    # keywords override the objects' fields; a path alone is the GeoJSON
    s3 = segment_slide(crop, str(tmp_path / "kw.geojson"), RunOptions(model="watershed", mpp=0.5), mpp=0.25,
                       tile_size=128, overlap=64, use_tissue_mask=False)
    assert s3.nuclei == s.nuclei and (tmp_path / "kw.geojson").read_bytes() == ref


def test_bad_keywords_and_objects_are_clear_errors(tmp_path, crop):
    with pytest.raises(TypeError, match="unexpected keyword argument 'tile'"):
        segment_slide(crop, geojson=tmp_path / "x.geojson", tile=128)
    with pytest.raises(TypeError, match="options must be a RunOptions"):
        segment_slide(crop, Outputs(geojson=tmp_path / "x.geojson"), {"model": "watershed"})
    with pytest.raises(ConfigError, match="zarr_image needs a zarr output"):
        segment_slide(crop, geojson=tmp_path / "x.geojson", zarr_image=True, model="watershed", mpp=0.25)
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="unknown option 'tiles'"):
        RunOptions.from_dict({"tiles": 3})


def test_dicts_round_trip():
    o = RunOptions(model="default", mpp=0.5, ensemble=["vesicular"], tta=8, min_score=0.7, precision="bf16",
                   tile_workers=2, uuid_seed=3)
    d = o.to_dict()
    assert json.loads(json.dumps(d)) == d and RunOptions.from_dict(d) == o and o.ensemble == ("vesicular",)
    assert [f.name for f in fields(RunOptions)] == list(d)
    out = Outputs(geojson="a.geojson", zarr="a.zarr", zarr_image=True)
    assert Outputs.from_dict(out.to_dict()) == out and out.main == "a.geojson"
    assert out.files() == {"geojson": "a.geojson", "zarr": "a.zarr"}
    with pytest.raises(TypeError, match="loaded segmenter"):
        RunOptions(model=object()).to_dict()
    assert split_keywords({"zarr": "z", "tta": 4}) == ({"zarr": "z"}, {"tta": 4})


def test_the_command_line_is_built_from_the_fields():
    """Every field with ``cli`` metadata is a ``wsiseg run`` option storing under the field's name, with a help
    line; parsed defaults equal the API's except where a field's ``cli`` says otherwise."""
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    dests = {a.dest: a for a in run._actions}
    for cls in (RunOptions, Outputs):
        for f in fields(cls):
            assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name
            assert f.metadata.get("resume") in (None, True, "resolved"), f.name
            if f.metadata["cli"]:
                assert f.name in dests and dests[f.name].help, f.name
    args = parser.parse_args(["run", "x.svs", "--out", "x.geojson"])
    o = RunOptions.from_args(args)
    assert {f.name for f in fields(RunOptions) if getattr(o, f.name) != getattr(RunOptions(), f.name)} == \
        {"precision"}  # auto (the API: as the model is); the batch size by device and tile in both
    args = parser.parse_args(["run", "x.svs", "--zarr", "x.zarr", "--no-tissue-mask", "--tta-views", "8",
                              "--ensemble", "a", "b", "--tile-size", "128", "--min-score", "0.9", "--zarr-image"])
    o = RunOptions.from_args(args)
    assert (o.use_tissue_mask, o.tta, o.ensemble, o.tile_size, o.min_score) == (False, 8, ("a", "b"), 128, 0.9)
    assert args.zarr == "x.zarr" and args.zarr_image and args.geojson is None


@pytest.mark.filterwarnings("ignore:.*larger than the overlap")
def test_the_journal_records_the_resume_fields_and_refuses_others(tmp_path, crop):
    """An interrupted run's journal holds the fields marked ``resume=True`` as given; a resume with another value
    of one (here the id seed) is refused, with the same one the run completes."""
    gj = tmp_path / "n.geojson"
    kw = dict(model="watershed", mpp=0.25, tile_size=128, overlap=32, use_tissue_mask=False, batch_size=2,
              uuid_seed=11)  # 4 x 4 tiles
    with pytest.raises(KeyboardInterrupt):
        segment_slide(crop, geojson=gj, sink=interrupting_sink(calls=8), **kw)
    params = json.loads((journal_dir(gj) / "params.json").read_text())["params"]
    given = RunOptions(**kw).resume_params()
    assert set(given) == {"min_score", "backend", "uuid_seed"}
    assert {k: params[k] for k in given} == given and params["tile_size"] == 128  # (resolved: asked, or the model's)
    with pytest.raises(ConfigError, match="uuid_seed"):
        segment_slide(crop, geojson=gj, resume=True, **{**kw, "uuid_seed": 12})
    segment_slide(crop, geojson=gj, resume=True, **kw)
    assert not journal_dir(gj).exists()
    segment_slide(crop, geojson=tmp_path / "ref.geojson", **kw)
    assert gj.read_bytes() == (tmp_path / "ref.geojson").read_bytes()
