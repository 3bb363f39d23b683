"""Worker processes (``wsiseg.parallel.workers``): started as fresh interpreters that import this wsiseg."""

from __future__ import annotations

import warnings

import tifffile


def test_workers_ignore_a_wsiseg_in_the_current_directory(tmp_path, kumar_dir, monkeypatch):
    """A run started inside another checkout (a directory holding some other ``wsiseg``) gives its tile workers
    this package, as its main process has: ``python -m`` would put the current directory first on their path and
    import the other one. Here that other one cannot even be imported: the workers must never see it, and the
    outputs are those of a run without workers."""
    from wsiseg.api import segment_slide

    img = tmp_path / "crop.tif"
    tifffile.imwrite(img, tifffile.imread(sorted((kumar_dir / "images").glob("*.tif"))[0])[:512, :512, :3])
    ref = tmp_path / "ref.geojson"
    segment_slide(img, geojson=ref, model="watershed", mpp=0.25, tile_size=128, uuid_seed=3)
    checkout = tmp_path / "checkout"
    (checkout / "wsiseg" / "parallel").mkdir(parents=True)
    (checkout / "wsiseg" / "__init__.py").write_text("raise ImportError('the other checkout')\n")
    (checkout / "wsiseg" / "parallel" / "__init__.py").write_text("")
    monkeypatch.chdir(checkout)
    out = tmp_path / "workers.geojson"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a worker that failed to start would warn and fall back to the main process
        segment_slide(img, geojson=out, model="watershed", mpp=0.25, tile_size=128, uuid_seed=3, tile_workers=2)
    assert out.read_bytes() == ref.read_bytes()
