"""Shape augmentation for silhouette ControlNet training (``shape_augment = p``).

Every emoji's silhouette is a round blob its caption already predicts, so a ControlNet trained on the
images alone can lean on the caption and still lower its loss. With probability ``p`` a training image is
moved (random scale and shift, on white) and cut by a random shape mask (onto white): the target's
foreground is then the given map whatever the caption says. The map is the silhouette of the result
(:func:`ldmkit.preprocess.foreground_mask`), so target and map agree exactly; where no white inside the
emoji is uncovered by the cut, that is ``mask AND the moved emoji's foreground``.

The masks are random smoothed-noise blobs and irregular (non-convex, 5-12 vertices, random radii)
polygons; no circles, squares, triangles or stars are drawn as such (the evaluation's shapes). With
``shape_augment_silhouettes`` a third of the masks are other *training* images' silhouettes, moved (never the
held-out images', whose silhouettes the evaluation uses). Every random number comes from the batch's
generator in a fixed order, so a resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SCALE = (0.75, 1.3)  # the image's random zoom
SHIFT = 0.15  # its random shift, a fraction of the size each way
CUT = 0.8  # share of the augmented images that are also cut by a shape mask (the rest are only moved)
AREA = (0.25, 0.7)  # a blob mask's share of the image


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int = 1) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def move(images: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 images zoomed by ``scale`` (N,) about the centre and shifted by ``shift`` (N, 2),
    fractions of the size (x, y), on white; bilinear."""
    n = len(images)
    theta = torch.zeros(n, 2, 3, dtype=torch.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale.float()
    theta[:, :, 2] = -2.0 * shift.float() / scale.float()[:, None]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = images.float().div(255.0).sub(1.0)  # white = 0, so zero padding pads white
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add(1.0).mul(255.0).round().clamp(0, 255).to(torch.uint8)


def blob_mask(gen: torch.Generator, size: int) -> np.ndarray:
    """A smoothed-noise blob: a coarse random grid (3-5 cells) upsampled bicubically, its top 25-70%."""
    cells = int(torch.randint(3, 6, (1,), generator=gen))
    noise = torch.rand(1, 1, cells, cells, generator=gen, dtype=torch.float64).float()
    area = float(_uniform(gen, *AREA))
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    return (field >= torch.quantile(field.flatten(), 1.0 - area)).numpy()


def polygon_mask(gen: torch.Generator, size: int) -> np.ndarray:
    """An irregular polygon: 5-12 vertices at random sorted angles, each at its own random radius."""
    import cv2

    n = int(torch.randint(5, 13, (1,), generator=gen))
    angles = torch.sort(torch.rand(n, generator=gen, dtype=torch.float64) * 2 * math.pi).values
    radius = float(_uniform(gen, 0.3, 0.5)) * size
    radii = radius * _uniform(gen, 0.45, 1.0, n)
    cx, cy = (size / 2 + _uniform(gen, -0.1, 0.1, 2) * size).tolist()
    pts = np.stack([cx + radii.numpy() * np.cos(angles.numpy()), cy + radii.numpy() * np.sin(angles.numpy())], -1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask > 0


def silhouette_mask(gen: torch.Generator, maps: Tensor) -> np.ndarray:
    """One of ``maps`` ((M, 1, H, W) uint8 silhouettes: the training images', never the held-out ones), picked at
    random, zoomed 0.8-1.2x and shifted up to 10% of the size."""
    j = int(torch.randint(0, len(maps), (1,), generator=gen))
    scale, shift = _uniform(gen, 0.8, 1.2), _uniform(gen, -0.1, 0.1, 2).view(1, 2)
    inverted = (255 - maps[j : j + 1]).expand(-1, 3, -1, -1)  # black shape on white: move() pads white
    return (move(inverted, scale, shift)[0, 0] < 128).numpy()


def shape_mask(gen: torch.Generator, size: int, maps: Tensor | None = None) -> np.ndarray:
    """(size, size) bool: a blob or an irregular polygon, half and half; with ``maps``, a third each of those
    and of :func:`silhouette_mask`."""
    if maps is None:
        return blob_mask(gen, size) if float(torch.rand(1, generator=gen)) < 0.5 else polygon_mask(gen, size)
    kind = int(torch.randint(0, 3, (1,), generator=gen))
    return (blob_mask, polygon_mask)[kind](gen, size) if kind < 2 else silhouette_mask(gen, maps)


def cut(images: Tensor, masks: np.ndarray) -> Tensor:
    """(N, 3, H, W) uint8 images where ``masks`` (N, H, W) hold, white elsewhere."""
    keep = torch.from_numpy(np.asarray(masks, dtype=bool))[:, None]
    return torch.where(keep, images, torch.full_like(images, 255))


def silhouettes(images: Tensor) -> Tensor:
    """(N, 1, H, W) uint8 silhouette maps (255 foreground) of (N, 3, H, W) uint8 images."""
    from PIL import Image

    from ldmkit.preprocess import foreground_mask

    out = [foreground_mask(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images]
    return torch.from_numpy(np.stack(out).astype(np.uint8) * 255)[:, None]


def augment(images: Tensor, gen: torch.Generator, maps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each (N, 3, H, W) uint8 image moved and, with probability ``CUT``, cut by a random shape (with
    ``maps``, also by other images' silhouettes); returns the new images and their silhouette maps
    (N, 1, H, W). Draws from ``gen`` in a fixed order per image."""
    n, size = len(images), images.shape[-1]
    scale = _uniform(gen, *SCALE, n)
    shift = _uniform(gen, -SHIFT, SHIFT, 2 * n).view(n, 2)
    out = move(images, scale, shift)
    masks = np.ones((n, size, size), bool)
    for i in range(n):
        if float(torch.rand(1, generator=gen)) < CUT:
            masks[i] = shape_mask(gen, size, maps)
    out = cut(out, masks)
    return out, silhouettes(out)
