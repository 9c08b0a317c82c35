"""Control-map preprocessors that need no downloaded weights (issue 16, part 4).

OpenCV is not a dependency of ldmkit (nor installed in its environment), so these are written with
numpy and Pillow only. ``canny`` follows OpenCV's ``cv2.Canny(image, low, high)`` as the A1111 ControlNet
extension calls it (low 100, high 200, no blur, 3x3 Sobel, L1 gradient magnitude, per-pixel maximum over
the colour channels, non-maximum suppression in four directions, hysteresis with 8-connectivity); it is
close to OpenCV's output, not bit-identical (tie-breaking of the direction sectors differs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps


def _sobel(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of a (H, W) float array, border replicated as OpenCV's BORDER_REPLICATE."""
    p = np.pad(a, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def canny_edges(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edge map (white edges on black, RGB) of ``image``; thresholds on the 8-bit Sobel magnitude."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    grads = [_sobel(a[..., c]) for c in range(3)]
    mags = np.stack([np.abs(gx) + np.abs(gy) for gx, gy in grads])  # (3, H, W)
    pick = mags.argmax(0)[None]
    mag = np.take_along_axis(mags, pick, 0)[0]
    gx = np.take_along_axis(np.stack([g[0] for g in grads]), pick, 0)[0]
    gy = np.take_along_axis(np.stack([g[1] for g in grads]), pick, 0)[0]
    # non-maximum suppression along the gradient direction, quantised to 0, 45, 90, 135 degrees
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = ((angle + 22.5) // 45).astype(int) % 4
    p = np.pad(mag, 1)
    h, w = mag.shape
    neighbours = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for s, ((dy1, dx1), (dy2, dx2)) in neighbours.items():
        n1 = p[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        n2 = p[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (sector == s) & (mag > n1) & (mag >= n2)
    thin = np.where(keep, mag, 0.0)
    # hysteresis: weak edges survive only when 8-connected to a strong one (grown until nothing changes)
    weak, edges = thin > low, thin > high
    while True:
        p = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for dy in range(3):
            for dx in range(3):
                near |= p[dy:dy + h, dx:dx + w]
        grown = edges | (weak & near)
        if np.array_equal(grown, edges):
            break
        edges = grown
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def threshold(image: Image.Image, level: int = 127) -> Image.Image:
    """Binary map: white where the grey level is above ``level`` (scribble / silhouette inputs)."""
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(((grey > level) * 255).astype(np.uint8)).convert("RGB")


def otsu_level(grey: np.ndarray) -> int:
    """Otsu's threshold (1979): the grey level that maximises the between-class variance of the histogram."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)  # pixels at or below each level
    m0 = np.cumsum(hist * np.arange(256))
    w1, total = w0[-1] - w0, m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (total - m0) / w1) ** 2
    return int(np.nanargmax(np.where(w1 > 0, between, np.nan)))


def binary(image: Image.Image) -> Image.Image:
    """Binary map at Otsu's threshold (the A1111 extension's "binary" with threshold 0)."""
    return threshold(image, otsu_level(np.asarray(image.convert("L"))))


def blur(image: Image.Image, radius: float = 5.0) -> Image.Image:
    """Gaussian blur (the tile / blur ControlNets' input): detail removed, layout and colour kept."""
    from PIL import ImageFilter

    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


# how far (in every channel, 0-255) from white a pixel may be and still count as background
BACKGROUND_TOLERANCE = 24


def foreground_mask(image: Image.Image, tolerance: int = BACKGROUND_TOLERANCE) -> np.ndarray:
    """(H, W) bool: what is drawn on a white background, as ldmkit's datasets define it.

    The datasets draw every image on white (transparent pixels are composited onto white, ``ldmkit data``
    and ``train.data``), so background = pixels within ``tolerance`` of white in every channel that are
    4-connected to the image border; foreground = everything else, so white inside a shape (eyes, a
    keycap's face) stays foreground. The same definition serves training maps and evaluation of outputs.
    """
    import cv2

    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    whiteish = ((255 - a).max(-1) <= tolerance).astype(np.uint8)
    _, labels = cv2.connectedComponents(whiteish, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0]) & (whiteish > 0)
    return ~background


def silhouette(image: Image.Image) -> Image.Image:
    """White foreground on black (:func:`foreground_mask`): the map of the emoji silhouette ControlNet."""
    return Image.fromarray((foreground_mask(image) * 255).astype(np.uint8)).convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    """Black lines on white -> white lines on black, as line-art/scribble ControlNets expect."""
    return ImageOps.invert(image.convert("RGB"))


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda image: image.convert("RGB"),
    "canny": canny_edges,
    "invert": invert,
    "threshold": threshold,
    "binary": binary,
    "blur": blur,
    "silhouette": silhouette,
}


def check_name(name: str) -> None:
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}: choose one of {', '.join(PREPROCESSORS)}")


def preprocess(name: str, image: Image.Image) -> Image.Image:
    """The control map the preprocessor ``name`` makes from ``image`` (same size, RGB)."""
    check_name(name)
    return PREPROCESSORS[name](image)


def register(add: Callable[..., object]) -> None:
    """``ldmkit preprocess NAME IMAGE -o MAP.png``: the control map a preprocessor makes, to look at or reuse."""
    p = add("preprocess", "turn an image into a ControlNet control map (canny edges, invert, threshold)",
            "example:\n  ldmkit preprocess canny photo.jpg -o edges.png")
    p.add_argument("name", help=f"preprocessor: {', '.join(PREPROCESSORS)}")  # type: ignore[attr-defined]
    p.add_argument("image", help="input image")  # type: ignore[attr-defined]
    p.add_argument("-o", "--output", default=None,  # type: ignore[attr-defined]
                   help="output PNG (default: <image>_<name>.png beside it)")
    p.set_defaults(func=cmd_preprocess)  # type: ignore[attr-defined]


def cmd_preprocess(args: object) -> None:
    from pathlib import Path

    from ldmkit.pipeline import open_image

    check_name(args.name)  # type: ignore[attr-defined]
    src = Path(args.image)  # type: ignore[attr-defined]
    out = Path(args.output or src.with_name(f"{src.stem}_{args.name}.png"))  # type: ignore[attr-defined]
    preprocess(args.name, open_image(src)).save(out)  # type: ignore[attr-defined]
    print(out)
