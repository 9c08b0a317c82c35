"""Control-map preprocessors that need no downloaded weights (issue 16, part 4).

Each takes a PIL image and returns a map of the same size (RGB). Where the A1111 ControlNet extension
defines a preprocessor with OpenCV calls (canny, color, scribble_xdog, tile_resample, shuffle), ldmkit makes
the same calls (``opencv-python-headless``), so the maps are the extension's. The classical stand-ins for the
extension's neural preprocessors carry their method in their names: ``softedge_sobel`` is a blurred Sobel
gradient magnitude (not HED/PiDiNet), ``lineart_adaptive`` an adaptive-threshold line drawing (not the
lineart model), ``seg_palette`` a k-means colour quantisation (not a segmentation network, its colours are
not ADE20K classes).
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
    """Canny edge map (white edges on black, RGB): ``cv2.Canny(image, low, high)`` on the RGB image, as the
    A1111 extension calls it (no blur, 3x3 Sobel, L1 magnitude, the strongest channel per pixel)."""
    import cv2

    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image.convert("RGB"))), float(low), float(high))
    return Image.fromarray(edges).convert("RGB")


def threshold(image: Image.Image, level: int = 127) -> Image.Image:
    """Binary map: white where the grey level is above ``level`` (scribble / silhouette inputs)."""
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(((grey > level) * 255).astype(np.uint8)).convert("RGB")


def otsu_level(grey: np.ndarray) -> int:
    """Otsu's threshold (1979): the grey level that maximises the between-class variance of the histogram.
    A flat image (one grey level, nothing to split) gives 0, as ``cv2.threshold(..., THRESH_OTSU)`` does."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    if np.count_nonzero(hist) < 2:
        return 0
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
    """White foreground on black (:func:`foreground_mask`): the map of the emoji silhouette ControlNet. An
    image whose border is mostly dark is taken as a silhouette already (white shape on black) and thresholded
    at 127, so a mask passes through unchanged."""
    grey = np.asarray(image.convert("L"))
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    mask = grey > 127 if border.mean() < 128 else foreground_mask(image)
    return Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def _rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")


def softedge_sobel(image: Image.Image, sigma: float = 1.0) -> Image.Image:
    """Soft edges by classical filters (a stand-in for the extension's HED/PiDiNet soft-edge maps, not them):
    the grey image blurred (Gaussian, ``sigma``), then its 3x3 Sobel gradient magnitude sqrt(gx^2 + gy^2),
    scaled so the strongest edge is white (a flat image gives black)."""
    import cv2

    grey = _grey(image)
    if sigma > 0:
        grey = cv2.GaussianBlur(grey, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    gx, gy = _sobel(grey)
    mag = np.hypot(gx, gy)
    return _rgb(mag * (255.0 / mag.max()) if mag.max() > 1e-6 else mag * 0)


def lineart_adaptive(image: Image.Image, block: int = 9, offset: float = 8.0) -> Image.Image:
    """Line art by classical means (not the extension's lineart models): white where a pixel is darker than
    the mean of its ``block`` x ``block`` neighbourhood (edges replicated) by ``offset`` grey levels or more
    (OpenCV's adaptive mean threshold, inverted to the white-on-black lines line-art ControlNets read)."""
    if block < 3 or block % 2 == 0:
        raise ValueError(f"lineart_adaptive block must be an odd number >= 3, got {block}")
    grey = _grey(image)
    r = block // 2
    p = np.pad(grey, r, mode="edge")
    c = np.pad(p.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image
    h, w = grey.shape
    total = c[block:block + h, block:block + w] - c[:h, block:block + w] - c[block:block + h, :w] + c[:h, :w]
    mean = np.round(total / (block * block))
    return _rgb((grey <= mean - offset) * 255.0)


def scribble_xdog(image: Image.Image, level: float = 32.0) -> Image.Image:
    """The extension's ``scribble_xdog``: difference of Gaussians (sigma 0.5 and 5) per colour channel, the
    strongest darkening kept, white where twice it exceeds ``level`` (thick, scribble-like strokes)."""
    import cv2

    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    g1 = cv2.GaussianBlur(a, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(a, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros(a.shape[:2], np.uint8)
    out[2 * (255 - dog.astype(np.int32)) > level] = 255
    return Image.fromarray(out).convert("RGB")


def color_grid(image: Image.Image) -> Image.Image:
    """The extension's ``color`` (T2I-Adapter colour): the image shrunk 64x (bicubic), then blown back up with
    nearest neighbour, a grid of flat colour cells (at least one cell per side for small images)."""
    import cv2

    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    small = cv2.resize(a, (max(1, w // 64), max(1, h // 64)), interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))


def seg_palette(image: Image.Image, colors: int = 8, iterations: int = 10) -> Image.Image:
    """Flat-colour regions by k-means colour quantisation (not a segmentation network: the colours are the
    image's, not ADE20K's classes). Deterministic: farthest-point initial centres (from the pixel nearest the
    mean colour), then ``iterations`` Lloyd steps; each pixel takes its centre's colour.

    Run on the image's distinct colours weighted by their pixel counts (a photo has far fewer colours than
    pixels), ties broken by the first pixel of each colour, so the centres are those of the pixel-by-pixel
    algorithm at a fraction of its time and memory (a 4 MP map took 70 s and 0.8 GB)."""
    rgb = np.asarray(image.convert("RGB"))
    packed = ((rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]).ravel()
    seen = np.zeros(1 << 24, dtype=bool)
    seen[packed] = True
    keys = np.flatnonzero(seen).astype(np.uint32)  # the distinct colours, in packed order
    lut = np.zeros(1 << 24, dtype=np.int32)
    lut[keys] = np.arange(len(keys), dtype=np.int32)
    inverse = lut[packed]  # each pixel's colour index
    del seen, lut
    count = np.bincount(inverse, minlength=len(keys)).astype(np.float64)
    first = np.full(len(keys), len(packed), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(packed)))  # each colour's first pixel (pixel-order ties)
    a = np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=1).astype(np.float64)

    def first_of(score: np.ndarray, best: float) -> int:  # the colour of the first pixel scoring ``best``
        tied = np.flatnonzero(score == best)
        return int(tied[np.argmin(first[tied])])

    mean = (a * count[:, None]).sum(0) / count.sum()
    d0 = ((a - mean) ** 2).sum(1)
    centres = [a[first_of(d0, d0.min())]]
    dist = ((a - centres[0]) ** 2).sum(1)
    while len(centres) < colors and dist.max() > 0:
        centres.append(a[first_of(dist, dist.max())])
        dist = np.minimum(dist, ((a - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)

    def assign() -> np.ndarray:
        return np.stack([((a - ck) ** 2).sum(1) for ck in c]).argmin(0)

    for _ in range(iterations):
        label = assign()
        for k in range(len(c)):
            w = count[label == k]
            if w.size:
                c[k] = (a[label == k] * w[:, None]).sum(0) / w.sum()
    return _rgb(c[assign()][inverse].reshape(rgb.shape))


def tile_resample(image: Image.Image, rate: float = 1.0) -> Image.Image:
    """The extension's ``tile_resample``: the image shrunk by ``rate`` (area averaging; rate < 1.1 leaves it
    as it is), here scaled back to its size (bicubic) as the extension's resize to the output does."""
    import cv2

    a = np.asarray(image.convert("RGB"))
    if rate < 1.1:
        return Image.fromarray(a)
    h, w = a.shape[:2]
    small = cv2.resize(a, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=cv2.INTER_AREA)
    return Image.fromarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))


def shuffle(image: Image.Image, seed: int = 0, f: int = 256) -> Image.Image:
    """The extension's content ``shuffle``: the image remapped through a smooth random flow (noise on a grid
    ``f`` pixels wide, bicubic), so colours and textures stay and the layout goes. Seeded: the same map each time."""
    import cv2

    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    rng = np.random.default_rng(seed)

    def noise_disk() -> np.ndarray:
        n = rng.uniform(0, 1, size=(h // f + 2, w // f + 2)).astype(np.float64)
        n = cv2.resize(n, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
        n = n - n.min()
        return n / n.max() if n.max() > 0 else n

    x, y = noise_disk() * (w - 1), noise_disk() * (h - 1)
    return Image.fromarray(cv2.remap(a, x.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR))


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
    "softedge_sobel": softedge_sobel,
    "lineart_adaptive": lineart_adaptive,
    "scribble_xdog": scribble_xdog,
    "color": color_grid,
    "seg_palette": seg_palette,
    "tile_resample": tile_resample,
    "shuffle": shuffle,
}


def check_name(name: str) -> None:
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}: choose one of {', '.join(PREPROCESSORS)}")


def as_rgb(image: Image.Image) -> Image.Image:
    """The RGB image a preprocessor reads, as the A1111 extension's ``HWC3`` reads one: 16-bit and float greyscale
    by their range (``images.to_8bit``, not clipped to white), transparent pixels over white
    (colour x alpha + 255 x (1 - alpha)), so a line drawing on a transparent background is not a black image."""
    from ldmkit.images import to_8bit

    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        a = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = a[..., 3:] / 255.0
        return Image.fromarray((a[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def preprocess(name: str, image: Image.Image) -> Image.Image:
    """The control map the preprocessor ``name`` makes from ``image`` (same size, RGB; read by :func:`as_rgb`)."""
    check_name(name)
    return PREPROCESSORS[name](as_rgb(image))


def register(add: Callable[..., object]) -> None:
    """``ldmkit preprocess NAME IMAGE -o MAP.png``: the control map a preprocessor makes, to look at or reuse."""
    p = add("preprocess", "turn an image into a ControlNet control map (canny edges, soft edges, scribble, ...)",
            "example:\n  ldmkit preprocess canny photo.jpg -o edges.png")
    p.add_argument("name", help=f"preprocessor: {', '.join(PREPROCESSORS)}")  # type: ignore[attr-defined]
    p.add_argument("image", help="input image")  # type: ignore[attr-defined]
    p.add_argument("-o", "--output", default=None,  # type: ignore[attr-defined]
                   help="output PNG (default: <image>_<name>.png beside it)")
    for flag, what in (("--control-threshold-a", "slider 1 (A1111's threshold_a): canny low, threshold level, ..."),
                       ("--control-threshold-b", "slider 2 (A1111's threshold_b): canny high")):
        p.add_argument(flag, type=float, default=None, metavar="X",  # type: ignore[attr-defined]
                       help=f"the preprocessor's {what}, as `generate --controlnet` takes it")
    p.add_argument("--processor-res", type=int, default=None, metavar="N",  # type: ignore[attr-defined]
                   help="scale the image so its short side is N first, as `generate` does (the map is that size)")
    p.set_defaults(func=cmd_preprocess)  # type: ignore[attr-defined]


def cmd_preprocess(args: object) -> None:
    from pathlib import Path

    from ldmkit.atomic import replacing
    from ldmkit.controlnet_a1111 import module_name, run_preprocessor
    from ldmkit.pipeline import open_image

    module_name(args.name)  # type: ignore[attr-defined] # ldmkit's names or the extension's (blur_gaussian)
    src = Path(args.image)  # type: ignore[attr-defined]
    image = open_image(src)  # a missing, foreign or huge file: one line before anything is written
    out = Path(args.output or src.with_name(f"{src.stem}_{args.name}.png"))  # type: ignore[attr-defined]
    if out.is_dir():  # -o FOLDER: the default name inside it
        out = out / f"{src.stem}_{args.name}.png"  # type: ignore[attr-defined]
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"-o {out}: {repr(out.suffix) if out.suffix else 'no extension'}, not an image format "
                         "ldmkit can write; name the map .png (or .jpg, .webp)")
    result = run_preprocessor(args.name, image, getattr(args, "processor_res", None),  # type: ignore[attr-defined]
                              getattr(args, "control_threshold_a", None), getattr(args, "control_threshold_b", None))
    try:
        with replacing(out) as tmp:  # atomic: an existing map is never left half-written
            result.save(tmp, format=fmt)
    except OSError as e:  # a read-only folder, a full disk, a file where a folder should be
        raise ValueError(f"-o {out}: cannot write the map ({e.strerror or e}); choose another output path") from None
    print(out)
