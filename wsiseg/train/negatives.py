"""Negatives for training: what is not a nucleus, so the detector learns that glass, fat and lumen are empty.

Why: every labelled crop the detector saw before this module came from tissue (BBBC039 crops with >= 3 nuclei
translated to H&E, and target tiles drawn from the tissue mask), so bright, unsaturated glass was never shown to it
as background. On a slide it fired there: 29% of its detections on the bundled sample without the tissue mask were
on blank glass. Two kinds of negatives fix that at the root, in the training data:

* :func:`glass`: a synthetic empty crop: near-white glass (a slight tint, uneven illumination, sensor noise),
  sometimes fat (white cells behind thin pale-pink membranes) or loose fibres, dust specks, the blur of an
  upsampled 20x scan and JPEG blocking. Its label image is empty.
* :func:`white_out`: a labelled crop with a few holes of that glass cut into it (lumen, fat, tears), each hole
  kept clear of the nuclei that stay, and the nuclei it covers removed from the labels. The detector sees glass
  beside tissue, as at every tissue edge and lumen, with the right answer.

* :func:`without_haematoxylin`: a tissue crop with its haematoxylin taken out (colour deconvolution): the same
  stroma, muscle, cytoplasm and red cells, eosin only, and no nucleus. The detector sees pink structures, which it
  drew outlines on, with the answer that they are not nuclei.

* :func:`gaps`: a labelled crop with a few nucleus-sized gaps cut into its tissue away from the nuclei: round or
  slit-like holes of pale glass with soft edges, as between collagen bundles, labels unchanged. The pale-interior
  nuclei of ``train.vesicular`` (a pale centre inside a dark haematoxylin rim) taught the detector that a pale blob
  with a rim is a nucleus, and on the bundled sample it outlined such gaps in the stroma (docs/precision.md); here it
  sees pale blobs whose rim is the tissue around them, with the answer that they are not nuclei.

* :func:`ink`: a crop with a deposit of tissue-marking dye (the green, teal, yellow or orange inks surgeons paint
  on margins): granular specks and clumps, some nucleus-sized, over a faint tint, on tissue or glass; the nuclei it
  covers are removed from the labels. The bundled model drew outlines on such specks of teal dye on the sample slide.

Target slides' own glass (tiles outside their tissue mask, :func:`wsiseg.adapt.target.sample_target`) is used as
it is: real negatives of the hospital's own scanner.
These functions draw only from ``rng`` (deterministic for a seed) and return uint8 RGB.
"""

from __future__ import annotations

import cv2
import numpy as np


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1] of ``(size, size)``: ``cells x cells`` noise upsampled bicubically."""
    f = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC), -1, 1)


def glass(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 crop holding no nucleus: glass, sometimes with fat, fibres or dust."""
    base = rng.uniform(222, 250) + rng.normal(0, 3, 3)  # near white, slightly tinted per channel
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    img += _smooth_field(rng, size, int(rng.integers(2, 5)))[..., None] * rng.uniform(0, 6)  # uneven illumination
    kind = rng.random()
    if kind < 0.35:  # fat: white polygonal cells behind thin pale-pink membranes (a Voronoi diagram's edges)
        n = int(rng.integers(3, 12))
        pts = rng.uniform(0, size, (n, 2)).astype(np.float32)
        d = np.stack([np.hypot(*(np.mgrid[0:size, 0:size][::-1] - p[:, None, None])) for p in pts])
        d.sort(0)
        edge = (d[1] - d[0]) < rng.uniform(1.0, 3.0)
        pink = np.array([rng.uniform(205, 235), rng.uniform(150, 200), rng.uniform(190, 225)], np.float32)
        img[edge] = img[edge] * 0.3 + pink * 0.7
    elif kind < 0.6:  # loose fibres: a few thin pale eosin curves
        canvas = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            p = rng.uniform(0, size, (int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.polylines(canvas, [p], False, 255, int(rng.integers(1, 4)), cv2.LINE_AA)
        a = canvas.astype(np.float32)[..., None] / 255.0 * rng.uniform(0.2, 0.6)
        pink = np.array([rng.uniform(200, 235), rng.uniform(120, 190), rng.uniform(170, 215)], np.float32)
        img = img * (1 - a) + pink * a
    if rng.random() < 0.5:  # dust and debris on the glass: small grey-brown specks, not purple
        for _ in range(int(rng.integers(1, 6))):
            c = tuple(int(v) for v in rng.integers(0, size, 2))
            r = int(rng.integers(1, 4))
            grey = float(rng.uniform(90, 200))
            cv2.circle(img, c, r, (grey + 10, grey, grey - 10), -1, cv2.LINE_AA)
    img += rng.normal(0, rng.uniform(0.5, 3.0), img.shape).astype(np.float32)  # sensor noise
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # the blur of a 20x scan shown at 40x
        small = cv2.resize(out, (size // 2, size // 2), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:  # a scanner's JPEG tiles
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(out)


def white_out(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, holes: int = 3
              ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with up to ``holes`` blobs of :func:`glass` cut in (lumen, fat, tears) and ``labels`` to match.

    A nucleus that a blob would cover by more than a third is removed from the labels and lies under the glass;
    the blob is then kept 2 px clear of every nucleus that stays, so no nucleus is cut by glass. The edge is blended
    over about 2 px. Returns new arrays (the inputs are not changed).
    """
    h, w = labels.shape
    blob = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, holes + 1))):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.uniform(0.08, 0.3) * w), int(rng.uniform(0.08, 0.3) * h))
        cv2.ellipse(blob, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    wobble = _smooth_field(rng, max(h, w), 6)[:h, :w]
    blob = cv2.dilate(blob, np.ones((5, 5), np.uint8)) & (wobble > -0.6) | (blob & (wobble > -0.2))
    blob = blob.astype(bool)
    if not blob.any():
        return image, labels
    n = int(labels.max())
    area = np.bincount(labels.ravel(), minlength=n + 1)
    covered = np.bincount(labels.ravel(), weights=blob.ravel(), minlength=n + 1)
    gone = covered > area / 3.0
    gone[0] = False
    labels = np.where(gone[labels], 0, labels)
    keep = cv2.dilate((labels > 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    blob &= ~keep
    alpha = cv2.GaussianBlur(blob.astype(np.float32), (5, 5), 1.0)
    alpha[keep] = 0.0
    g = glass(rng, max(h, w))[:h, :w].astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha[..., None]) + g * alpha[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), labels


def gaps(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, count: tuple[int, int] = (3, 10)
         ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with ``count[0]..count[1]`` nucleus-sized gaps of pale glass cut in away from the nuclei; ``labels``
    unchanged (returned as given). New image array (the input is not changed).

    Each gap is an ellipse with a semi-major axis of 4-14 px (nuclei at the model's 0.25 um/px are 8-30 px across),
    as round as a nucleus or a slit a third as wide, at any angle, filled with :func:`glass` at opacity 0.6-1 (some
    gaps are pale pink, not white), its edge blended over about 2 px. Gaps are kept 3 px clear of every labelled
    nucleus, so no nucleus is changed and the labels stay right.
    """
    h, w = labels.shape
    blob = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        a = float(rng.uniform(4, 14))
        b = a * float(rng.uniform(0.3, 1.0))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.ellipse(blob, centre, (max(int(a), 1), max(int(b), 1)), float(rng.uniform(0, 180)), 0, 360,
                    float(rng.uniform(0.6, 1.0)), -1)
    keep = cv2.dilate((labels > 0).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    blob[keep] = 0.0
    if not blob.any():
        return image, labels
    alpha = cv2.GaussianBlur(blob, (5, 5), 1.0)
    alpha[keep] = 0.0
    g = glass(rng, max(h, w))[:h, :w].astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha[..., None]) + g * alpha[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), labels


#: marking-dye colours (RGB) away from haematoxylin's purple-blue and eosin's pink: green, teal, yellow, orange
INKS = ((40, 140, 80), (30, 140, 140), (60, 160, 170), (215, 195, 50), (225, 135, 45))


def ink(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with a deposit of marking dye and ``labels`` to match; new arrays (the inputs are not changed).

    In an ellipse covering 10-40% of the crop (its edge wobbled), a tint of one :data:`INKS` colour (jittered) at
    opacity 0.05-0.3, and 30-400 specks of it (discs of radius 1-5 px, darker or lighter than the tint, opacity
    0.6-1), scattered or clumped. A nucleus whose pixels the specks cover by more than a third is removed from the
    labels (it lies under the dye); the specks are kept 2 px clear of every nucleus that stays, so no labelled
    nucleus is cut by dye, while the faint tint lies over everything, nuclei included.
    """
    h, w = labels.shape
    colour = np.clip(np.array(INKS[int(rng.integers(len(INKS)))], np.float32) + rng.normal(0, 12, 3), 0, 255)
    region = np.zeros((h, w), np.uint8)
    c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
    axes = (int(rng.uniform(0.15, 0.45) * w), int(rng.uniform(0.15, 0.45) * h))
    cv2.ellipse(region, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    wobble = _smooth_field(rng, max(h, w), 6)[:h, :w]
    region = region.astype(bool) & (wobble > -0.5)
    if not region.any():
        return image, labels
    specks = np.zeros((h, w), np.float32)
    shade = np.zeros((h, w), np.float32)
    ys, xs = np.nonzero(region)
    n = int(rng.integers(30, 401))
    centres = rng.integers(0, len(ys), n)
    if rng.random() < 0.5:  # clumped: specks gathered around a few points
        hubs = rng.integers(0, len(ys), int(rng.integers(2, 8)))
        pick = hubs[rng.integers(0, len(hubs), n)]
        cy = np.clip(ys[pick] + rng.normal(0, 6, n), 0, h - 1).astype(int)
        cx = np.clip(xs[pick] + rng.normal(0, 6, n), 0, w - 1).astype(int)
    else:
        cy, cx = ys[centres], xs[centres]
    for x, y, r, a, d in zip(cx.tolist(), cy.tolist(), rng.integers(1, 6, n).tolist(), rng.uniform(0.6, 1.0, n).tolist(),
                             rng.uniform(0.45, 1.15, n).tolist()):
        cv2.circle(specks, (x, y), r, a, -1, cv2.LINE_AA)
        cv2.circle(shade, (x, y), r, d, -1)
    n_lab = int(labels.max())
    if n_lab:
        area = np.bincount(labels.ravel(), minlength=n_lab + 1)
        covered = np.bincount(labels.ravel(), weights=(specks > 0.5).ravel(), minlength=n_lab + 1)
        gone = covered > area / 3.0
        gone[0] = False
        labels = np.where(gone[labels], 0, labels)
        keep = cv2.dilate((labels > 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        specks[keep] = 0.0
    tint = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 3.0) * float(rng.uniform(0.05, 0.3))
    out = image.astype(np.float32)
    out = out * (1 - tint[..., None]) + colour * tint[..., None]
    speck_colour = np.clip(colour[None, None] * np.where(shade > 0, shade, 1.0)[..., None], 0, 255)
    out = out * (1 - specks[..., None]) + speck_colour * specks[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), labels


def without_haematoxylin(image: np.ndarray) -> np.ndarray:
    """``image`` (uint8 RGB tissue) with its haematoxylin density lowered to the crop's 5th percentile everywhere
    (``skimage.color.rgb2hed`` / ``hed2rgb``): eosin stays, nuclei and the blue tinge of cytoplasm go. The third
    (DAB) channel, which in an H&E image only holds what the unmixing left of dark nuclei, is flattened the same
    way, so no brown ghost of a nucleus remains."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.ascontiguousarray(image[..., :3]))
    for c in (0, 2):
        hed[..., c] = np.minimum(hed[..., c], np.percentile(hed[..., c], 5))
    return (np.clip(hed2rgb(hed), 0, 1) * 255 + 0.5).astype(np.uint8)


__all__ = ["gaps", "glass", "ink", "white_out", "without_haematoxylin"]
