"""Caption-driven shape targets for silhouette ControlNet training (``shape_mix = q``).

``shape_augment`` cuts an emoji by a mask: a red heart cut by a star is heart AND star, never a whole star, so
the only training images that fill a star completely are star emoji, and a star map draws a yellow star
whatever the caption says. With probability ``q`` a training image X (its caption kept) is instead *moved
into* another shape S: X's foreground bounding box is scaled (per axis) onto S's bounding box, the pixels
inside S are kept, the parts of S that X's moved foreground does not cover take the colour of X's nearest
foreground pixel, and outside S is the data's white background. The target is then "X, shaped like S" (a red
heart as a red star): the caption gives the content, the map the shape.

S is drawn as ``shape_augment``'s masks are (:func:`ldmkit.train.shape_augment.shape_mask`: smoothed-noise
blobs, irregular polygons and, with ``shape_augment_silhouettes``, other training images' silhouettes, moved;
never the evaluation's circles, squares, triangles or stars as such). The map is the result's silhouette, so
target and map agree exactly. Every random number comes from the batch's generator in a fixed order, so a
resumed run draws the same targets as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ldmkit.train.shape_augment import shape_mask, silhouettes

MIN_SHAPE = 16  # pixels: a drawn mask smaller than this is replaced by the whole moved emoji's own silhouette


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def nearest_fill(image: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(H, W, 3) ``image`` with every pixel outside ``source`` (H, W) bool given the colour of the nearest
    ``source`` pixel (OpenCV's distance transform with per-pixel labels: L2 with the 5x5 mask, the labelled
    variant has no exact mode)."""
    import cv2

    if source.all():
        return image.copy()
    _, labels = cv2.distanceTransformWithLabels((~source).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    # DIST_LABEL_PIXEL gives each zero pixel (a source) its own label; read each label's source back
    ys, xs = np.nonzero(source)
    lut_y = np.zeros(len(ys) + 1, np.int64)
    lut_x = np.zeros(len(xs) + 1, np.int64)
    lut_y[labels[ys, xs]], lut_x[labels[ys, xs]] = ys, xs
    return image[lut_y[labels], lut_x[labels]]


def warp_into(image: np.ndarray, fg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 ``image`` whose foreground is ``fg`` (H, W) bool, moved into ``mask`` (H, W) bool: the
    foreground's bounding box scaled (bilinear, per axis) onto the mask's, the background first filled with the
    nearest foreground colour (so no white bleeds in), kept inside ``mask``, white outside. The colour
    sources are the foreground shrunk by one pixel (its anti-aliased rim is part white) where anything is
    left of it."""
    import cv2

    if not fg.any() or not mask.any():
        return np.where(mask[..., None], image, 255).astype(np.uint8)
    core = cv2.erode(fg.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0) > 0
    filled = nearest_fill(image, core if core.sum() >= 4 else fg)
    y0, y1, x0, x1 = _bbox(fg)
    t0, t1, s0, s1 = _bbox(mask)
    crop = np.ascontiguousarray(filled[y0:y1, x0:x1])
    placed = np.full_like(image, 255)
    placed[t0:t1, s0:s1] = cv2.resize(crop, (s1 - s0, t1 - t0), interpolation=cv2.INTER_LINEAR)
    return np.where(mask[..., None], placed, 255).astype(np.uint8)


def mix(images: Tensor, fgs: Tensor, gen: torch.Generator, maps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each (N, 3, H, W) uint8 image, its foreground ``fgs`` (N, 1, H, W) uint8 (255 = foreground), moved into a
    shape drawn from ``gen`` (:func:`ldmkit.train.shape_augment.shape_mask`, with ``maps`` also other training
    silhouettes); returns the new images and their silhouette maps (N, 1, H, W)."""
    n, size = len(images), images.shape[-1]
    out = []
    for i in range(n):
        mask = shape_mask(gen, size, maps)
        im = images[i].permute(1, 2, 0).numpy()
        fg = fgs[i, 0].numpy() > 127
        if mask.sum() < MIN_SHAPE:
            mask = fg
        out.append(torch.from_numpy(warp_into(im, fg, mask)).permute(2, 0, 1))
    result = torch.stack(out) if out else images.clone()
    return result, silhouettes(result)
