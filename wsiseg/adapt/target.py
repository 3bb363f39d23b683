"""Stage 2 of ``wsiseg adapt``: unlabelled target tiles from a hospital's own slides or images.

Uses the inference pipeline's own parts (never a second copy): :func:`wsiseg.io.slide.open_slide`, the tissue mask of
:mod:`wsiseg.wsi.tissue`, and the tile grid/reader of :mod:`wsiseg.wsi.grid`, so the tiles are exactly what ``wsiseg
run`` will show the model: RGB at the model's microns per pixel, over tissue. Writes ``out_dir/images/<slide>_<r>_<c>.png``.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.atomic import write_png
from ..core.errors import ConfigError, InputError


@dataclass
class TargetConfig:
    tile: int = 256
    tiles_per_slide: int = 500  # at most; all tissue tiles when fewer
    # at least this many tiles in all, where the slides hold them: a run on fewer slides draws more from each, so
    # that one slide gives the student as much of its tissue as many slides do (0: tiles_per_slide each)
    min_tiles: int = 0
    seed: int = 0
    mpp: float | None = None  # level-0 um/px of the target images when the files do not say (Kumar: 0.25)
    # each slide's tiles at the zoom wsiseg run --zoom auto would show it at, as the teacher (pseudo.teacher) sees
    # it (wsiseg.wsi.scale.probe): a slide whose nuclei look much smaller than the teacher's own is sampled larger.
    # Off: on a lab whose scale is 1.5x misstated its student was no better than without it (+0.0025 +- 0.0027 AJI,
    # both run with --zoom auto, which wins back the scale either way; docs/adapt.md, "A lab whose nuclei look small")
    zoom: bool = False

    def validate(self) -> None:
        if self.tile < 32 or self.tiles_per_slide < 1 or self.min_tiles < 0:
            raise ConfigError("target: tile must be >= 32, tiles_per_slide >= 1 and min_tiles >= 0")

    def per_slide(self, n_slides: int) -> int:
        """How many tissue tiles to draw from each of ``n_slides`` slides (at most; all of a slide's when fewer):
        ``tiles_per_slide``, or more when that many slides would give fewer than ``min_tiles`` in all."""
        return max(self.tiles_per_slide, -(-self.min_tiles // max(1, n_slides)))


def tile_prefixes(paths: Sequence[str | Path]) -> list[str]:
    """The name each input's tiles begin with: its file's stem, or where two inputs share one (``hospA/slide1.tif``
    and ``hospB/slide1.tif``), the stem and a digest of its folder; shared names made the second input's tiles be
    taken for the first's, already written, and never sampled."""
    import hashlib

    stems = [Path(p).stem for p in paths]
    return [st if stems.count(st) == 1 else
            f"{st}-{hashlib.sha1(str(Path(p).resolve().parent).encode()).hexdigest()[:8]}"
            for st, p in zip(stems, paths)]


def input_mpp(slide, mpp: float | None, model_mpp: float) -> float:
    """Level-0 micrometres per pixel of a target input: what the file says; where it says nothing, ``mpp``
    (``target.mpp``, ``--target-mpp``: Kumar's 0.25 in the bundled configurations), else the model's own scale. A
    slide's own scale is never overridden: read at another, its nuclei would not have the size the teacher knows."""
    from ..io.slide import resolve_mpp

    return resolve_mpp(slide, mpp if slide.mpp is None else None, model_mpp)


def input_headers(paths: Sequence[str | Path], cfg: TargetConfig, model_mpp: float) -> list[tuple[float, int] | None]:
    """For each input, its level-0 um/px as the target stage reads it (:func:`input_mpp`) and how many tiles its grid
    at the model's scale holds; ``None`` for one that cannot be opened or has no usable scale (the target stage says
    why, in its own words). Reads headers only, and each file once as it stands (its path, size and modification
    time): the first screen and the stage keys of ``wsiseg adapt`` ask for them several times a run."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append(_header(str(path), st.st_size, st.st_mtime_ns, cfg.mpp, cfg.tile, model_mpp))
    return out


@functools.lru_cache(maxsize=4096)
def _header(path: str, size: int, mtime_ns: int, mpp: float | None, tile: int, model_mpp: float
            ) -> tuple[float, int] | None:
    from ..io.slide import open_slide
    from ..wsi.grid import TileGrid

    try:
        with open_slide(path) as slide, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale = input_mpp(slide, mpp, model_mpp)
            grid = TileGrid.for_slide(slide.dimensions, scale, model_mpp, tile, 0)
            return scale, grid.rows * grid.cols
    except Exception:  # noqa: BLE001 (headers for keys and an estimate: the target stage reports a bad input)
        return None


def tiles_to_draw(paths: Sequence[str | Path], cfg: TargetConfig, model_mpp: float) -> int:
    """How many tiles :func:`sample_target` will draw from ``paths`` at most, for the first screen's estimate: from
    each input :meth:`TargetConfig.per_slide`, or its whole grid of tiles at the model's scale where that holds fewer
    (an image smaller than that many tiles; its tissue, unknown until the stage reads it, may hold fewer still).
    An input that cannot be opened or has no scale counts as ``per_slide`` (the stage itself will say what is
    wrong)."""
    per_slide = cfg.per_slide(len(paths))
    return sum(per_slide if h is None else min(per_slide, h[1]) for h in input_headers(paths, cfg, model_mpp))


def sample_target(paths: Sequence[str | Path], out_dir: str | Path, cfg: TargetConfig, model_mpp: float,
                  progress: bool = True, zoom_model=None) -> Path:
    """Write up to :meth:`TargetConfig.per_slide` tissue tiles of each input (deterministic per slide name and
    seed); with ``zoom_model`` (a segmenter), each input at the zoom :func:`wsiseg.wsi.scale.probe` gives for it with
    that model, as ``wsiseg run --zoom auto`` would show it to the model."""
    from ..io.slide import open_slide
    from ..wsi.grid import TileGrid, read_tile
    from ..wsi.scale import probe
    from ..wsi.tissue import tissue_mask

    cfg.validate()
    out = Path(out_dir) / "images"
    out.mkdir(parents=True, exist_ok=True)
    if not paths:
        raise InputError("adapt: no target slides or images given")
    written, per_slide = 0, cfg.per_slide(len(paths))
    unscaled = []
    for path, prefix in zip(paths, tile_prefixes(paths)):
        with open_slide(path) as slide, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mpp = input_mpp(slide, cfg.mpp, model_mpp)
            if slide.mpp is None:
                unscaled.append(Path(path).name)
            tissue = tissue_mask(slide)

            @functools.cache  # (each zoom's grid and tissue tiles made once: the probe's looks and the sampling)
            def grid_at(zoom: float) -> tuple[TileGrid, list]:
                g = TileGrid.for_slide(slide.dimensions, mpp, model_mpp / zoom, cfg.tile, 0)
                return g, g.tiles(tissue)

            zoom = 1.0
            if zoom_model is not None:
                zoom = probe(zoom_model, lambda z: (functools.partial(read_tile, slide, grid_at(z)[0]),
                                                    grid_at(z)[1])).zoom
                if progress and zoom != 1.0:
                    print(f"[target] {Path(path).name}: its nuclei look small, sampled {zoom:g}x larger",
                          file=sys.stderr, flush=True)
            grid, tiles = grid_at(zoom)
            if not tiles:
                warnings.warn(f"{Path(path).name}: no tissue tile", stacklevel=2)
                continue
            rng = np.random.default_rng([cfg.seed, zlib.crc32(Path(path).name.encode())])
            pick = sorted(rng.permutation(len(tiles))[:per_slide].tolist())
            for i in pick:
                r, c = tiles[i]
                f = out / f"{prefix}_{r:04d}_{c:04d}.png"
                if f.exists():
                    continue
                write_png(f, read_tile(slide, grid, r, c))
                written += 1
    if unscaled:  # (as wsiseg run says it: a wrong scale shows the teacher nuclei of the wrong size)
        what = "target.mpp" if cfg.mpp is not None else "the model's own scale"
        warnings.warn(f"{len(unscaled)} target input(s) give no scale ({', '.join(unscaled[:3])}"
                      f"{', ...' if len(unscaled) > 3 else ''}): read at {cfg.mpp or model_mpp:g} um/px ({what}); "
                      "pass --target-mpp if that is not theirs", stacklevel=2)
    if not any(out.glob("*.png")):
        raise InputError("adapt: the target inputs hold no tissue tile")
    return Path(out_dir)


def sample_background(paths: Sequence[str | Path], out_dir: str | Path, cfg: TargetConfig, model_mpp: float,
                      per_slide: int, min_white: float = 0.95) -> int:
    """Write up to ``per_slide`` glass tiles of each input: tiles outside its tissue mask of which at least
    ``min_white`` of the pixels are white (:func:`wsiseg.eval.background.white_mask`), at the model's resolution, as
    ``out_dir/<slide>_<r>_<c>.png``. They are negatives for training (no nucleus). Returns how many exist; an input
    without glass (an image that is all tissue) gives none. Deterministic per slide name and seed."""
    from ..eval.background import white_mask
    from ..io.slide import open_slide
    from ..wsi.grid import TileGrid, read_tile
    from ..wsi.tissue import tissue_mask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path, prefix in zip(paths, tile_prefixes(paths)):
        with open_slide(path) as slide, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mpp = input_mpp(slide, cfg.mpp, model_mpp)
            grid = TileGrid.for_slide(slide.dimensions, mpp, model_mpp, cfg.tile, 0)
            tissue = set(grid.tiles(tissue_mask(slide)))
            outside = [t for t in grid.tiles(None) if t not in tissue]
            rng = np.random.default_rng([cfg.seed, 1, zlib.crc32(Path(path).name.encode())])
            found = 0
            for i in rng.permutation(len(outside))[:4 * per_slide].tolist():  # at most 4 reads per tile wanted
                if found >= per_slide:
                    break
                r, c = outside[i]
                f = out / f"{prefix}_{r:04d}_{c:04d}.png"
                if not f.exists():
                    t = read_tile(slide, grid, r, c)
                    if white_mask(t).mean() < min_white:
                        continue
                    write_png(f, t)
                found += 1
    return len(list(out.glob("*.png")))
