"""Another lab's slides: the Kumar images re-stained or re-scanned, each scored paired against the image as it is.

    python benchmarks/shift.py --model default --split dev --out-json shift_default.json
    python benchmarks/shift.py --model watershed --split dev
    python benchmarks/shift.py --model default --split dev --shifts lab,lab+norm,none+norm   # a remedy, tried
    python benchmarks/shift.py --split test --shifts lab,x20 --write runs/shifted   # another lab's images, for adapt

A model adapted to some slides meets a new hospital's stain and scanner. This measures what that costs, on images
with labels: each shift is applied to every image, the model runs on the result as ``wsiseg run`` would (through
``wsiseg.api.segment_image``), and each figure is compared with the unshifted image's, per image (``paired.py``'s
mean difference, its standard error and on how many images the shifted run is ahead). Shifts (deterministic):

  none   the image as it is (the reference; always run)
  lab    re-stained as the bundled sample, a slide from another lab and scanner (CMU-1): Macenko stain vectors and
         99th-percentile stain amounts fitted on the sample's tissue, the image's own amounts mapped onto them
         (torchstain's Macenko normaliser)
  blue   every hue turned 20 degrees towards blue (OpenCV's full-range HSV): with ``lab>blue``, a lab whose nuclei
         are bluer than the sample's, as a bluer haematoxylin or scanner gives them
  yellowed  every pixel's blue at 0.86 times: the yellowed mounting medium of an old slide (its glass 0.15 saturated)
  bluish    red at 0.88 and green at 0.93 times: a scanner whose white is bluish
  pale   haematoxylin at 0.6 times its amount (an under-stained slide; scikit-image's HED unmixing)
  dark   both stains at 1.5 times
  x20    scanned at 20x: area-averaged to half the resolution and JPEG-compressed (quality 80; YCbCr with the
         chroma at half resolution each way, as most JPEG encoders write), then brought back to 40x by bilinear
         interpolation, as ``wsiseg run``'s reader brings a 20x slide to the model's 0.25 um/px; scored at 40x, as
         the GeoJSON's polygons keep the model's resolution
  x20svs the same as Aperio's SVS files store it: the JPEG of the R, G and B planes at full resolution (no YCbCr,
         no chroma subsampling), quality 70
  x20raw the same without any JPEG compression
  blur   out of focus: a Gaussian blur of sigma 0.5 um (2 px at 40x), a scan slightly off its focal plane
  blurry the same at 1 um (4 px): a region clearly out of focus, which a scanner's QC would flag
  gamma  another scanner's tone curve: every channel's value v (0..1) as v^1.5 (mid-tones darker)
  flat   the opposite, v^0.67 (mid-tones lighter, less contrast)
  noise  sensor noise: Gaussian, 6 grey levels, the same draw for every run (seed 0)
  S>T    shift S, then shift T: e.g. lab>x20, another lab's stain scanned at 20x
  S+wb   shift S applied to the image beside a strip of glass (grey 245), then the whole white-balanced by that glass
         as the tissue mask balances a tinted slide's overview (wsiseg.wsi.tissue.neutral_glass), and the strip cut
         off: what balancing a tinted slide's tiles by its glass would give (not done by wsiseg run)
  S@F    shift S on the image's right F of its width only (0 < F < 1; S shifted whole, so a blur sees its
         context, and the rest kept): a slide out of focus in parts, e.g. ``blurry@0.5``
  adobe  a scanner that stores its colours as Adobe RGB (1998), gamma 2.2, and says so in the ICC profile it embeds
         (the image converted from sRGB to it by LittleCMS, relative colorimetric with black point compensation):
         stored colours less saturated than they are
  linear a scanner that stores its camera's linear values (sRGB primaries, gamma 1.0) with a profile saying so:
         stored colours far darker than they are
  S+icc  shift S (holding adobe or linear), then converted back to sRGB by that profile, as
         ``wsiseg run --icc-profile apply`` converts a slide's tiles (wsiseg.io.colour.srgb_converter)
  S+norm shift S, then Macenko-normalised to the development images' pooled stain: stain normalisation, a common
         remedy for new labs, tried here; wsiseg run does not normalise (docs/precision.md, "Another lab's stain")

The test images are for the final report of a shipped model; choose on ``--split dev``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kumar import DEFAULT_DATA, dev_images, test_images  # noqa: E402
from paired import METRICS, paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = ("lab", "blue", "yellowed", "bluish", "pale", "dark", "x20", "x20svs", "x20raw", "blur", "blurry", "gamma",
          "flat", "noise", "adobe", "linear")
#: the scanners' colour spaces (primaries of wsiseg.io.colour.PRIMARIES, tone curve's gamma)
SCANNER_SPACES = {"adobe": ("adobe", 2.2), "linear": ("srgb", 1.0)}
#: the blue shift's turn of every hue, in degrees
BLUE_TURN = 20
#: the tint shifts' gains, per channel
TINTS = {"yellowed": (1.0, 1.0, 0.86), "bluish": (0.88, 0.93, 1.0)}
#: the grey level of the glass strip beside an image (S+wb)
GLASS = 245
#: the 20x scan's JPEG quality (x20)
JPEG_QUALITY = 80
#: x20svs's: Aperio's SVS files say "JPEG/RGB Q=70" in their description (TCGA's; the bundled sample's says Q=30)
SVS_QUALITY = 70
#: the out-of-focus shifts' Gaussian sigma, in pixels at 40x (0.25 um/px)
BLUR_SIGMA = {"blur": 2.0, "blurry": 4.0}
#: the tone-curve shifts' exponents
GAMMAS = {"gamma": 1.5, "flat": 0.67}
#: the noise shift's standard deviation, in grey levels
NOISE = 6.0


def macenko(rgb: np.ndarray):
    """A Macenko normaliser (torchstain, NumPy backend) fitted on the ``(H, W, 3)`` uint8 pixels ``rgb``."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    norm = NumpyMacenkoNormalizer()
    norm.fit(np.ascontiguousarray(rgb))
    return norm


def restain(rgb: np.ndarray, norm) -> np.ndarray:
    """``rgb`` with its stains mapped onto those ``norm`` was fitted on (uint8)."""
    out = norm.normalize(I=np.ascontiguousarray(rgb), stains=False)[0]
    return np.clip(out, 0, 255).astype(np.uint8)


def hed_scaled(rgb: np.ndarray, h: float, e: float) -> np.ndarray:
    """``rgb`` with its haematoxylin amount times ``h`` and its eosin times ``e`` (scikit-image's HED unmixing)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed[..., 0] *= h
    hed[..., 1] *= e
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def _base(shift: str) -> str:
    """``shift`` without its part ``@F``, ``+norm`` and ``+wb``: ``"lab>linear+icc+norm@0.5"`` -> lab>linear+icc."""
    return shift.split("@")[0].removesuffix("+norm").removesuffix("+wb")


def parts(shift: str) -> list[str]:
    """The shifts ``shift`` applies one after the other, before any ``+icc``, ``+norm`` or ``+wb`` and on any part
    ``@F``: ``"lab>x20+norm"`` -> lab, x20."""
    return _base(shift).removesuffix("+icc").split(">")


def part_of(shift: str) -> float:
    """The share of the image's width (its right part) that ``shift`` applies to: F of ``S@F``, else 1."""
    return float(shift.split("@")[1]) if "@" in shift else 1.0


def hue_turned(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """``rgb`` (uint8) with every hue turned by ``degrees`` (negative: from purple towards blue), saturation and
    value kept (OpenCV's full-range HSV, 256 hue steps)."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + round(degrees * 256 / 360)) % 256
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


def scanner_profile(space: str) -> bytes:
    """The ICC profile of the scanner space ``space`` (:data:`SCANNER_SPACES`)."""
    from wsiseg.io.colour import PRIMARIES, matrix_profile

    primaries, gamma = SCANNER_SPACES[space]
    return matrix_profile(PRIMARIES[primaries], gamma=gamma, description=f"scanner ({space})")


def shifted(rgb: np.ndarray, shift: str, lab=None, ref=None) -> np.ndarray:
    """``rgb`` (uint8) under ``shift`` (see the module's docstring); ``lab``: :func:`macenko` of the sample's tissue
    (for ``lab``), ``ref``: of the development images (for ``+norm``)."""
    from wsiseg.train.trainer import scanned_at_20x

    if "@" in shift:  # (the whole image shifted, then its left part put back)
        out = shifted(rgb, shift.split("@")[0], lab, ref)
        keep = int(round(rgb.shape[1] * (1 - part_of(shift))))
        out[:, :keep] = rgb[:, :keep]
        return out
    if shift.endswith("+wb"):  # beside a strip of glass, shifted with it, balanced by it, the strip cut off
        from wsiseg.wsi.tissue import neutral_glass

        h, w = rgb.shape[:2]
        slide = np.concatenate([rgb, np.full((h, w // 2 + 1, 3), GLASS, np.uint8)], axis=1)
        return np.ascontiguousarray(neutral_glass(shifted(slide, shift.removesuffix("+wb"), lab, ref))[:, :w])
    for base in parts(shift):
        if base == "lab":
            rgb = restain(rgb, lab)
        elif base == "blue":
            rgb = hue_turned(rgb, -BLUE_TURN)
        elif base in TINTS:
            rgb = np.clip(np.round(rgb * np.float32(TINTS[base])), 0, 255).astype(np.uint8)
        elif base == "pale":
            rgb = hed_scaled(rgb, 0.6, 1.0)
        elif base == "dark":
            rgb = hed_scaled(rgb, 1.5, 1.5)
        elif base in ("x20", "x20raw"):
            rgb = scanned_at_20x(rgb, JPEG_QUALITY if base == "x20" else None)
        elif base == "x20svs":
            rgb = scanned_at_20x(rgb, SVS_QUALITY, rgb_jpeg=True)
        elif base in BLUR_SIGMA:
            import cv2

            rgb = cv2.GaussianBlur(np.ascontiguousarray(rgb), (0, 0), BLUR_SIGMA[base], borderType=cv2.BORDER_REFLECT)
        elif base in GAMMAS:
            rgb = np.round(255 * (rgb / 255.0) ** GAMMAS[base]).astype(np.uint8)
        elif base == "noise":
            noise = np.random.default_rng(0).normal(0, NOISE, rgb.shape)
            rgb = np.clip(np.round(rgb + noise), 0, 255).astype(np.uint8)
        elif base in SCANNER_SPACES:
            from wsiseg.io.colour import stored_as

            rgb = stored_as(rgb, scanner_profile(base))
    if _base(shift).endswith("+icc"):
        from wsiseg.io.colour import srgb_converter

        spaces = [b for b in parts(shift) if b in SCANNER_SPACES]
        if spaces:
            rgb = srgb_converter(scanner_profile(spaces[-1]), shift)(rgb)
    return restain(rgb, ref) if shift.endswith("+norm") else rgb


def sample_tissue() -> np.ndarray:
    """The bundled sample's tissue pixels (not white: grey level below the slide level's ``LEVEL_WHITE``), ``(n, 1,
    3)`` uint8, every second row and column."""
    import cv2

    from wsiseg.io.slide import open_slide
    from wsiseg.wsi.stains import LEVEL_WHITE

    slide = open_slide(str(ROOT / "wsiseg" / "data" / "sample.svs"))
    rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[::2, ::2, :3]
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(rgb[grey < LEVEL_WHITE][:, None, :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model name or checkpoint (wsiseg.api.segment_image)")
    ap.add_argument("--split", choices=("test", "dev"), default="dev",
                    help="dev: the 16 train images, whose labels choose settings (default); test: the 14 test images")
    ap.add_argument("--shifts", default=",".join(SHIFTS), help=f"comma-separated, of {', '.join(SHIFTS)}, none, "
                    "S>T (one after the other), S+icc, S+norm and S@F (the right F of the width; default: each of "
                    "them alone)")
    ap.add_argument("--zoom", default="auto", help="the slide shown this many times larger (wsiseg run --zoom; "
                    "default auto)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="PDAM checkpoints: the network's arithmetic (wsiseg run --precision; default fp32, the API's)")
    ap.add_argument("--images", type=int, default=0, help="only the first N images (0: all; for a quick look)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"Kumar folder (default {DEFAULT_DATA})")
    ap.add_argument("--out-json", type=Path, default=None, help="write per-image figures and the paired differences")
    ap.add_argument("--write", type=Path, default=None, metavar="DIR",
                    help="write each shifted image as DIR/<shift>/<name>.png (40x, 0.25 um/px) instead of scoring: "
                    "another lab's images for wsiseg adapt --target DIR/<shift> --target-mpp 0.25")
    args = ap.parse_args(argv)
    shifts = [s for s in args.shifts.split(",") if s]
    for s in shifts:
        try:
            known = all(part in (*SHIFTS, "none") for part in parts(s)) and 0 < part_of(s) <= 1
        except ValueError:
            known = False
        if not known:
            ap.error(f"unknown shift {s!r}")
    if not (args.data / "split.csv").is_file():
        print(f"shift.py: error: {args.data}: no Kumar split.csv here", file=sys.stderr)
        return 3

    import tifffile
    from skimage import io

    from wsiseg.api import RunOptions, configured_model, segment_image
    from wsiseg.eval.metrics import ELONGATED, elongated_recall, evaluate_pair

    model = args.model if args.precision == "fp32" else configured_model(RunOptions(model=args.model,
                                                                                    precision=args.precision))

    names = [i for i, _ in test_images(args.data)] if args.split == "test" else dev_images(args.data)
    names = names[:args.images] if args.images else names
    images = {n: tifffile.imread(args.data / "images" / f"{n}.tif")[..., :3] for n in names}
    lab = macenko(sample_tissue()) if any("lab" in parts(s) for s in shifts) else None
    ref = None
    if any(s.endswith("+norm") for s in shifts):  # the development images' pooled stain, whatever --split
        ref = macenko(np.concatenate([tifffile.imread(args.data / "images" / f"{n}.tif")[::4, ::4, :3]
                                      for n in dev_images(args.data)]))
    runs = {}
    for shift in ["none"] + [s for s in shifts if s != "none"]:
        rows = []
        for k, name in enumerate(names):
            print(f"\r{shift}: {k + 1}/{len(names)}", end="", file=sys.stderr, flush=True)
            rgb = shifted(images[name], shift, lab, ref)
            if args.write is not None:
                (args.write / shift).mkdir(parents=True, exist_ok=True)
                io.imsave(args.write / shift / f"{name}.png", rgb, check_contrast=False)
                continue
            zoom = args.zoom if args.zoom == "auto" else float(args.zoom)
            pred = np.asarray(segment_image(rgb, model=model, mpp=0.25, zoom=zoom)).astype(np.int32)
            truth = io.imread(args.data / "labels" / f"{name}.png")
            rows.append({"name": name, **evaluate_pair(pred, truth), **elongated_recall(pred, truth)})
        print(file=sys.stderr)
        runs[shift] = {"images": rows}
    if args.write is not None:
        print(f"wrote {len(names)} images for each of {', '.join(runs)} under {args.write}", file=sys.stderr)
        return 0
    print(f"{args.model} on the {len(names)} {args.split} images: shifted minus as is, per image (mean +- se, "
          f"shifted ahead on; elongated: the true nuclei at least {ELONGATED}x as long as wide that are found)")
    print("| shift | AJI | d AJI | object F1 | d object F1 | d precision | d recall | elongated found |\n"
          "|---|---|---|---|---|---|---|---|")
    out = {"model": args.model, "split": args.split, "runs": runs, "paired": {}}
    for shift, run in runs.items():
        found = sum(r["long_found"] for r in run["images"])
        long = f"{found} of {sum(r['long_true'] for r in run['images'])}"
        if shift == "none":
            m = {k: float(np.mean([r[k] for r in run["images"]])) for k in METRICS}
            print(f"| none | {m['aji']:.4f} | | {m['object_f1']:.4f} | | | | {long} |")
            continue
        p = paired(runs["none"], run)
        out["paired"][shift] = p
        d = lambda k: f"{p[k]['diff']:+.4f} +- {p[k]['se']:.4f} ({p[k]['wins']}/{p[k]['n']})"  # noqa: E731
        print(f"| {shift} | {p['aji']['b']:.4f} | {d('aji')} | {p['object_f1']['b']:.4f} | {d('object_f1')} | "
              f"{p['object_precision']['diff']:+.4f} | {p['object_recall']['diff']:+.4f} | {long} |")
    if args.out_json is not None:
        args.out_json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
