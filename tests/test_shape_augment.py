"""``shape_augment`` and ``init_controlnet`` of ``ldmkit train controlnet``: closed forms for the cut and the move
(the silhouette of an image cut by a mask is mask AND the image's alpha; an integer shift is a roll on white),
p = 0 is the batch the trainer made before the option, p > 0 replaces only the drawn images, a resumed run
equals an uninterrupted one with the augmentation on, and a run started from another run's or file's
ControlNet starts with exactly its EMA weights. Tiny SD1 model, 16-px images, a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes import write_shapes
from test_controlnet_train import SIZE, cn_cfg  # the ControlNet trainer tests' image size and settings
from train_runs import assert_same_weights, crash_and_resume

from ldmkit.checkpoint import atomic_save_safetensors
from ldmkit.preprocess import foreground_mask
from ldmkit.train import TrainError, export_run, train
from ldmkit.train.controlnet import ControlNetTask
from ldmkit.train.runner import DistInfo, read_checkpoint, step_generator
from ldmkit.train.shape_augment import augment, blob_mask, cut, move, polygon_mask, silhouette_mask, silhouettes
from ldmkit.train.unet import UNetTask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data"), 12, SIZE, transparent=True)



def random_emojis(n: int, size: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` (3, size, size) uint8 images on white: random blobs of saturated colours (no pixel near white
    inside), with their alpha."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, alphas = [], []
    for _ in range(n):
        cx, cy, r = g.uniform(size * 0.3, size * 0.7, 2).tolist() + [g.uniform(size * 0.2, size * 0.45)]
        alpha = (xx - cx) ** 2 / r**2 + (yy - cy) ** 2 / (r * g.uniform(0.6, 1.2)) ** 2 < 1
        colour = g.integers(0, 200, (size, size, 3))  # every channel <= 199: far from white
        im = np.where(alpha[..., None], colour, 255).astype(np.uint8)
        images.append(torch.from_numpy(im).permute(2, 0, 1))
        alphas.append(alpha)
    return torch.stack(images), np.stack(alphas)


# ---------------------------------------------------------------- closed forms


def test_silhouette_of_the_cut_image_is_mask_and_alpha() -> None:
    images, alphas = random_emojis(24, 64, seed=0)
    g = torch.Generator().manual_seed(0)
    masks = np.stack([blob_mask(g, 64) if i % 2 else polygon_mask(g, 64) for i in range(24)])
    out = cut(images, masks)
    maps = silhouettes(out)
    assert maps.dtype == torch.uint8 and set(maps.unique().tolist()) <= {0, 255}
    for i in range(24):
        assert np.array_equal(maps[i, 0].numpy() > 0, masks[i] & alphas[i]), i
        assert np.array_equal(foreground_mask(Image.fromarray(out[i].permute(1, 2, 0).numpy())), masks[i] & alphas[i])
        # inside the mask the image is unchanged, outside it is white
        assert torch.equal(out[i][:, masks[i]], images[i][:, masks[i]])
        assert (out[i][:, ~masks[i]] == 255).all()
    # the masks are real shapes: neither empty nor the whole image
    areas = masks.reshape(24, -1).mean(1)
    assert areas.min() > 0.02 and areas.max() < 0.95


@pytest.mark.parametrize("dx, dy", [(3, 0), (-5, 2), (0, -7)])
def test_move_by_whole_pixels_is_a_shift_on_white(dx: int, dy: int) -> None:
    images, _ = random_emojis(3, 32, seed=1)
    out = move(images, torch.ones(3, dtype=torch.float64), torch.tensor([[dx / 32, dy / 32]] * 3, dtype=torch.float64))
    expected = torch.full_like(images, 255)
    ys, yd = (slice(0, 32 - dy), slice(dy, 32)) if dy >= 0 else (slice(-dy, 32), slice(0, 32 + dy))
    xs, xd = (slice(0, 32 - dx), slice(dx, 32)) if dx >= 0 else (slice(-dx, 32), slice(0, 32 + dx))
    expected[:, :, yd, xd] = images[:, :, ys, xs]
    assert torch.equal(out, expected)


def test_move_doubling_about_the_centre() -> None:
    """Scale 2 about the centre: output pixel (y, x) samples the input at ((y + 0.5) / 2 + size / 4 - 0.5, ...),
    the bilinear mean of a 2x2 neighbourhood for even sizes' pixel pairs (closed form with numpy)."""
    images, _ = random_emojis(2, 16, seed=2)
    out = move(images, torch.full((2,), 2.0, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    src = images.double().numpy()
    coord = (np.arange(16) + 0.5) / 2 + 16 / 4 - 0.5  # input coordinate of each output row/column
    lo = np.floor(coord).astype(int)
    w = coord - lo
    rows = src[:, :, lo, :] * (1 - w)[None, None, :, None] + src[:, :, lo + 1, :] * w[None, None, :, None]
    both = rows[:, :, :, lo] * (1 - w) + rows[:, :, :, lo + 1] * w
    assert np.abs(out.double().numpy() - np.round(both)).max() <= 1


def test_augment_is_a_function_of_the_generator() -> None:
    images, _ = random_emojis(8, 64, seed=3)
    a = augment(images, torch.Generator().manual_seed(5))
    b = augment(images, torch.Generator().manual_seed(5))
    c = augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert torch.equal(a[1], silhouettes(a[0]))  # the map is the result's silhouette


def test_silhouette_masks_are_moved_training_silhouettes() -> None:
    """With ``maps`` (shape_augment_silhouettes) a mask is one of them zoomed 0.8-1.2x and shifted <= 10%: a
    20-px square map gives a filled square of 16-24 px (+-1 for the resampling) near the centre."""
    square = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    square[..., 22:42, 22:42] = 255
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        m = silhouette_mask(g, square)
        ys, xs = np.nonzero(m)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.97  # a filled rectangle (corners resampled)
        assert 15 <= h <= 25 and abs(h - w) <= 1, (h, w)
        assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 0.1 * 64 + 1
    # drawn among blobs and polygons by augment: some masks are the map's square
    images, _ = random_emojis(12, 64, seed=4)
    full = torch.full((1, 1, 64, 64), 255, dtype=torch.uint8)  # a silhouette mask of the whole image
    a = augment(images, torch.Generator().manual_seed(1), full)
    b = augment(images, torch.Generator().manual_seed(1))
    assert not torch.equal(a[1], b[1])


# ---------------------------------------------------------------- in the trainer


def task(cfg, run: Path) -> ControlNetTask:
    return ControlNetTask(cfg, run, DistInfo(0, 1, torch.device("cpu")))


def test_p0_is_the_old_batch_and_p_replaces_only_the_drawn_images(data: Path, sd1_file: Path,
                                                                   tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    plain = task(cn_cfg(data, sd1_file), run)
    aug = task(cn_cfg(data, sd1_file, shape_augment=0.5), run)  # adds the images to the run's maps
    idx = torch.arange(10)
    for step in range(2):
        b0 = plain.make_batch(idx, step_generator(0, 0, step, 0), step)
        # the U-Net trainer's batch with the same flips, and the cached maps mirrored alike: the code before the option
        g = step_generator(0, 0, step, 0)
        flips = plain.draw_flips(idx, g)
        old = UNetTask.make_batch(plain, idx, g, step, flips)
        maps = torch.where(flips[:, None, None, None], plain.maps[idx].flip(-1), plain.maps[idx])
        for k in old:
            assert torch.equal(b0[k], old[k]), k
        assert torch.equal(b0["hint"], maps.float().div(255).expand(-1, 3, -1, -1))

        bp = aug.make_batch(idx, step_generator(0, 0, step, 0), step)
        for k in ("ids", "t", "noise"):
            assert torch.equal(bp[k], b0[k]), k
        same = (bp["latents"] == b0["latents"]).flatten(1).all(1)
        assert torch.equal(same, (bp["hint"] == b0["hint"]).flatten(1).all(1))
        assert 0 < int((~same).sum()) < len(idx)  # p = 0.5 of 10 images: some, not all (these seeds)
        assert set(bp["hint"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("outlines", [False, True])
def test_resumed_run_matches_uninterrupted_with_shape_augment(outlines: bool, data: Path, sd1_file: Path,
                                                              tmp_path: Path) -> None:
    # stopped after step 3's update, before a checkpoint: the last one is step 2
    cfg = cn_cfg(data, sd1_file, total_steps=4, shape_augment=0.5, shape_augment_silhouettes=outlines)
    ca, cb, _ = crash_and_resume(cfg, tmp_path / "a", tmp_path / "b", 3, 2)
    assert_same_weights(ca, cb)


# ---------------------------------------------------------------- init_controlnet


def test_init_controlnet_starts_from_a_runs_ema_or_a_file(data: Path, sd1_file: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(cn_cfg(data, sd1_file, total_steps=2), first)
    ema = {k.removeprefix("controlnet."): v for k, v in read_checkpoint(first)["ema"]["shadow"].items()}
    file = export_run(first, tmp_path / "first.safetensors")
    for source in (first, file):
        run = tmp_path / f"from_{Path(source).name}"
        train(cn_cfg(data, sd1_file, total_steps=1, lr=0.0, init_controlnet=str(source)), run)  # lr 0: unchanged
        net = read_checkpoint(run)["net"]
        assert len(net) == len(ema)
        for k, v in ema.items():
            assert torch.equal(net["controlnet." + k], v), (source, k)
    # a resumed run needs no init source: its checkpoint has the weights
    run = tmp_path / "from_first"
    file.unlink()
    import shutil

    shutil.rmtree(first)
    train(cn_cfg(data, sd1_file, total_steps=2, lr=0.0, init_controlnet=str(first)), run, resume=True)
    assert read_checkpoint(run)["step"] == 2


def test_init_controlnet_bad_sources_are_one_line_errors(data: Path, sd1_file: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="no such run folder or file"):
        train(cn_cfg(data, sd1_file, init_controlnet=str(tmp_path / "nope")), tmp_path / "r1")
    atomic_save_safetensors({"control_model.other.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(TrainError, match="another ControlNet layout") as e:
        train(cn_cfg(data, sd1_file, init_controlnet=str(tmp_path / "other.safetensors")), tmp_path / "r2")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(TrainError, match="shape_augment cuts images"):
        train(cn_cfg(data, sd1_file, condition="canny", shape_augment=0.5), tmp_path / "r3")
    with pytest.raises(TrainError, match="probability"):
        train(cn_cfg(data, sd1_file, shape_augment=1.5), tmp_path / "r4")
    with pytest.raises(TrainError, match="set shape_augment too"):
        train(cn_cfg(data, sd1_file, shape_augment_silhouettes=True), tmp_path / "r5")
