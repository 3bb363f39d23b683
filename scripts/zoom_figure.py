"""docs/zoom_kidney.png: the kidney development image TCGA-HE-7129 (a 200 px window, 3x) segmented by the bundled
`default` at the image's own scale and with `--zoom auto`, its outlines in red over the labels in green.

    python scripts/zoom_figure.py
"""
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from wsiseg.api import segment_image

ROOT = Path(__file__).resolve().parents[1]
KUMAR = Path(os.environ.get("WSISEG_SHARED_DATA", ROOT.parent / "shared" / "data")) / "kumar"
name = 'TCGA-HE-7129-01Z-00-DX1'
img = tifffile.imread(KUMAR / 'images' / f'{name}.tif')[..., :3]
lab = np.array(Image.open(KUMAR / 'labels' / f'{name}.png'))
panels = []
for zoom in (1, 'auto'):
    pred = segment_image(img, model='default', mpp=0.25, zoom=zoom)
    title = f'zoom {zoom}: {len(np.unique(pred)) - 1:,} outlines'
    y0, x0, w, k = 250, 250, 200, 3
    vis = np.array(Image.fromarray(img[y0:y0+w, x0:x0+w]).resize((w*k, w*k), Image.BICUBIC))
    for arr, col in ((lab, (0, 220, 0)), (pred, (255, 30, 0))):
        a = np.kron(arr[y0:y0+w, x0:x0+w], np.ones((k, k), arr.dtype))
        vis[find_boundaries(a, mode='inner') & (a > 0)] = col
    p = Image.fromarray(vis)
    d = ImageDraw.Draw(p); d.rectangle((0, 0, 600, 18), fill=(255, 255, 255))
    d.text((4, 3), title + ' in red; the labels in green', fill=(0, 0, 0))
    panels.append(p)
out = Image.new('RGB', (1206, 600), (255, 255, 255))
out.paste(panels[0], (0, 0)); out.paste(panels[1], (606, 0))
out.quantize(128).save(ROOT / 'docs' / 'zoom_kidney.png', optimize=True)
