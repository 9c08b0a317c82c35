"""``shape_mix`` of ``ldmkit train controlnet``: an emoji moved INTO a shape, caption kept (ldmkit.train.shape_mix).

Closed forms: a filled square moved into a circle covers exactly the circle in the square's colour (white
outside); a two-colour square moved into a rectangle keeps its halves where the bounding boxes map them; the
nearest-colour fill against a brute-force nearest neighbour in numpy. In the trainer: shape_mix = 0 is the
batch the trainer made before the option, q > 0 replaces only the drawn images (captions, times and noise
unchanged), a resumed run equals an uninterrupted one with the option on, and bad settings are one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_controlnet_train import cn_cfg
from test_shape_augment import data, random_emojis, task  # noqa: F401  (data: the module's dataset fixture)
from train_runs import assert_same_weights, crash_and_resume

from ldmkit.train import TrainError, train
from ldmkit.train.runner import step_generator
from ldmkit.train.shape_augment import silhouettes
from ldmkit.train.shape_mix import mix, nearest_fill, warp_into

pytestmark = pytest.mark.usefixtures("one_thread")


def disc(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_filled_square_moved_into_a_circle_covers_exactly_the_circle() -> None:
    colour = np.array([200, 30, 40], np.uint8)
    image = np.full((64, 64, 3), 255, np.uint8)
    square = np.zeros((64, 64), bool)
    square[5:19, 40:54] = True  # off-centre, smaller than the circle
    image[square] = colour
    for cx, cy, r in [(32, 32, 20), (20.5, 40, 12.3), (45, 18, 9)]:
        circle = disc(64, cx, cy, r)
        out = warp_into(image, square, circle)
        assert (out[circle] == colour).all()  # every pixel of the circle, in the square's colour
        assert (out[~circle] == 255).all()  # white outside
        got = silhouettes(torch.from_numpy(out).permute(2, 0, 1)[None])[0, 0].numpy() > 0
        assert np.array_equal(got, circle)


def test_bounding_boxes_map_onto_each_other() -> None:
    """A square, left half red, right half blue, moved into a 16x40 rectangle: the rectangle's left 20 columns
    red and right 20 blue (bilinear blends only the one or two columns at the seam)."""
    red, blue = (220, 20, 20), (20, 20, 220)
    image = np.full((64, 64, 3), 255, np.uint8)
    image[10:30, 10:20], image[10:30, 20:30] = red, blue
    fg = np.zeros((64, 64), bool)
    fg[10:30, 10:30] = True
    rect = np.zeros((64, 64), bool)
    rect[40:56, 12:52] = True
    out = warp_into(image, fg, rect)
    assert (out[~rect] == 255).all()
    assert (out[40:56, 12:31] == red).all() and (out[40:56, 33:52] == blue).all()


def test_nearest_fill_matches_a_brute_force_nearest_neighbour() -> None:
    g = np.random.default_rng(0)
    for _ in range(5):
        image = g.integers(0, 256, (24, 24, 3)).astype(np.uint8)
        source = g.random((24, 24)) < 0.08
        out = nearest_fill(image, source)
        sy, sx = np.nonzero(source)
        yy, xx = np.mgrid[:24, :24]
        d2 = (yy[..., None] - sy) ** 2 + (xx[..., None] - sx) ** 2  # (24, 24, S)
        best = np.sqrt(d2.min(-1))
        # the colour given is that of a source pixel at (nearly) the nearest distance: OpenCV's 5x5 mask is
        # within 2% of the Euclidean distance
        match = (out[..., None, :] == image[sy, sx][None, None]).all(-1)  # (24, 24, S): sources of that colour
        chosen = np.sqrt(np.where(match, d2, 10**9).min(-1))
        assert (chosen <= best * 1.03 + 1e-9).all()
        assert (out[source] == image[source]).all()


def test_mix_is_a_function_of_the_generator_and_its_map_the_results_silhouette() -> None:
    images, alphas = random_emojis(6, 64, seed=3)
    fgs = torch.from_numpy(alphas.astype(np.uint8) * 255)[:, None]
    a = mix(images, fgs, torch.Generator().manual_seed(5))
    b = mix(images, fgs, torch.Generator().manual_seed(5))
    c = mix(images, fgs, torch.Generator().manual_seed(6), fgs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert torch.equal(a[1], silhouettes(a[0]))
    # the content is the image's: one-colour emojis fill their whole new shape with their colour
    colours = torch.tensor([[200, 30, 40], [30, 180, 60], [40, 60, 200], [230, 200, 20], [120, 40, 160], [0, 0, 0]],
                           dtype=torch.uint8)
    flat = torch.where(fgs > 0, colours[:, :, None, None], torch.full_like(images, 255))
    out, maps = mix(flat, fgs, torch.Generator().manual_seed(7))
    for i in range(6):
        fg = maps[i, 0] > 0
        assert fg.sum() >= 16 and (out[i][:, fg] == colours[i][:, None]).all() and (out[i][:, ~fg] == 255).all()


# ---------------------------------------------------------------- in the trainer


def test_q_replaces_only_the_drawn_images(data: Path, sd1_file: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    plain = task(cn_cfg(data, sd1_file), run)
    mixed = task(cn_cfg(data, sd1_file, shape_mix=0.5), run)
    both = task(cn_cfg(data, sd1_file, shape_mix=0.5, shape_augment=0.5), run)
    idx = torch.arange(10)
    for step in range(2):
        b0 = plain.make_batch(idx, step_generator(0, 0, step, 0), step)
        for t in (mixed, both):
            bq = t.make_batch(idx, step_generator(0, 0, step, 0), step)
            for k in ("ids", "t", "noise"):
                assert torch.equal(bq[k], b0[k]), k  # the captions stay: the caption gives the content
            same = (bq["latents"] == b0["latents"]).flatten(1).all(1)
            assert torch.equal(same, (bq["hint"] == b0["hint"]).flatten(1).all(1))
            assert 0 < int((~same).sum()) < len(idx)
            assert set(bq["hint"].unique().tolist()) <= {0.0, 1.0}
    full = task(cn_cfg(data, sd1_file, shape_mix=1.0), run)
    b1 = full.make_batch(idx, step_generator(0, 0, 0, 0), 0)
    b0 = plain.make_batch(idx, step_generator(0, 0, 0, 0), 0)
    assert not (b1["latents"] == b0["latents"]).flatten(1).all(1).any()


def test_resumed_run_matches_uninterrupted_with_shape_mix(data: Path, sd1_file: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    cfg = cn_cfg(data, sd1_file, total_steps=4, shape_mix=0.5, shape_augment=0.5, shape_augment_silhouettes=True)
    ca, cb, _ = crash_and_resume(cfg, tmp_path / "a", tmp_path / "b", 3, 2)
    assert_same_weights(ca, cb)


def test_bad_shape_mix_is_one_line(data: Path, sd1_file: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(TrainError, match="shape_mix is a probability") as e:
        train(cn_cfg(data, sd1_file, shape_mix=1.5), tmp_path / "r1")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(TrainError, match="shape_mix moves images"):
        train(cn_cfg(data, sd1_file, condition="canny", shape_mix=0.5), tmp_path / "r2")
    # shape_augment_silhouettes picks shape_mix's masks too: allowed without shape_augment
    train(cn_cfg(data, sd1_file, total_steps=1, shape_mix=0.5, shape_augment_silhouettes=True), tmp_path / "r3")
