"""Training data: folder datasets, deterministic augmentation, bad input, latent cache (tar shards: test_shards)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data import ImageCaptionDataset, Transform, encode_in_batches, split_holdout
from ldmkit.data.datasets import flip_allowed


def _image(seed: int, w: int = 24, h: int = 20) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _folder(root, captions: dict[str, str | None], size=(24, 20)):
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(captions.items()):
        _image(i, *size).save(root / f"{name}.png")
        if caption is not None:
            (root / f"{name}.txt").write_text(caption, encoding="utf-8")
    return root


@pytest.fixture
def folder(tmp_path):
    return _folder(tmp_path / "ds", {f"img{i:02d}": f"a photo number {i}" for i in range(12)})


def test_sidecar_captions(tmp_path, caplog):
    root = _folder(tmp_path / "ds", {"b": "a blue bird", "a": "a red apple", "c": None})
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(root, 16)
    assert ds.keys == ["a", "b", "c"]
    assert ds.captions == ["a red apple", "a blue bird", ""]
    assert "1 of 3 images have no caption" in caplog.text
    item = ds[0]
    assert item["key"] == "a" and item["caption"] == "a red apple"
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].std() > 0.2


def test_metadata_jsonl(tmp_path):
    root = tmp_path / "hf"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        _image(i).save(root / "images" / f"{i:04d}.png")
    lines = [{"file_name": "images/0000.png", "text": "zero"}, {"file_name": "images/0001.png", "caption": "one"},
             {"file_name": "images/0002.png", "text": "two", "extra": 1}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    (root / "holdout.json").write_text(json.dumps({"keys": ["0001"]}))
    ds = ImageCaptionDataset(root, 8)
    assert (ds.keys, ds.captions) == (["0000", "0001", "0002"], ["zero", "one", "two"])
    assert ImageCaptionDataset(root, 8, split="train").keys == ["0000", "0002"]
    assert ImageCaptionDataset(root, 8, split="holdout").keys == ["0001"]
    assert ImageCaptionDataset(root, 8, exclude={"0000"}).keys == ["0001", "0002"]
    assert split_holdout(ds.keys, {"0001"}) == ([0, 2], [1])


def test_resize_and_center_crop(tmp_path):
    # 40 x 20: left quarter black, middle white, right quarter black -> the centre crop is all white
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 255
    (tmp_path / "d").mkdir()
    Image.fromarray(a).save(tmp_path / "d" / "x.png")
    img = ImageCaptionDataset(tmp_path / "d", 10)[0]["image"]
    assert img.shape == (3, 10, 10)
    assert img[:, :, 1:-1].min() > 0.9  # Lanczos rings slightly at the crop edge only


def test_flip_never_for_left_right(tmp_path):
    a = np.zeros((16, 16, 3), np.uint8)
    a[:, :8] = 255  # white left half
    root = tmp_path / "d"
    root.mkdir()
    for name, cap in [("l", "a left arrow"), ("r", "Right hand"), ("w", "leftwards arrow"), ("c", "a cat")]:
        Image.fromarray(a).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(cap)
    ds = ImageCaptionDataset(root, 16, flip=True)
    flipped = {k: 0 for k in ds.keys}
    for epoch in range(40):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            it = ds[i]
            flipped[it["key"]] += bool(it["image"][0, 0, 0] < 0)  # left column now black
    assert flipped["l"] == flipped["r"] == flipped["w"] == 0
    assert 8 <= flipped["c"] <= 32  # p = 0.5
    assert flip_allowed("a bright light") and not flip_allowed("turn LEFT")


def test_determinism_across_epochs_and_instances(folder):
    kw = dict(crop="random", flip=True, caption_dropout=0.3, seed=7)
    a, b = ImageCaptionDataset(folder, 12, **kw), ImageCaptionDataset(folder, 12, **kw)
    a.set_epoch(3)
    b.set_epoch(3)
    for i in (0, 5, 11):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    # order of access does not matter; another epoch or seed gives other crops
    a.set_epoch(4)
    ref = [a[i]["image"] for i in range(len(a))]
    assert all(torch.equal(a[i]["image"], ref[i]) for i in reversed(range(len(a))))
    b.set_epoch(3)
    assert sum(not torch.equal(b[i]["image"], ref[i]) for i in range(len(a))) >= len(a) // 2
    c = ImageCaptionDataset(folder, 12, **{**kw, "seed": 8})
    c.set_epoch(4)
    assert sum(not torch.equal(c[i]["image"], ref[i]) for i in range(len(a))) >= len(a) // 2


def test_caption_dropout_rate(folder):
    t = Transform(8, caption_dropout=0.2, seed=1)
    drops = [t.augment(e, i, "x").drop_caption for e in range(4) for i in range(1000)]
    assert abs(np.mean(drops) - 0.2) < 0.03  # 4000 draws: sd 0.0063
    assert not any(Transform(8, caption_dropout=0.0).augment(0, i, "x").drop_caption for i in range(500))
    ds = ImageCaptionDataset(folder, 8, caption_dropout=0.5, seed=1)
    caps = [ds[i]["caption"] for i in range(len(ds))]
    assert "" in caps and any(caps)


def test_bad_image_skipped_with_warning(folder, caplog):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "broken.txt").write_text("never seen")
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(folder, 8)
    assert len(ds) == 12 and "broken" not in ds.keys
    assert "broken.png" in caplog.text and "cannot decode" in caplog.text


def test_lazy_decode_failure_uses_next_image(folder, caplog):
    ds = ImageCaptionDataset(folder, 8, verify=False)
    ds.records[0].path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["key"] == ds.keys[1] and "img00.png" in caplog.text


def test_empty_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no training images.*name\.txt.*metadata\.jsonl"):
        ImageCaptionDataset(tmp_path / "empty", 8)


def test_caption_bad_encoding_warns(tmp_path, caplog):
    root = _folder(tmp_path / "d", {"x": None})
    (root / "x.txt").write_bytes("café crème".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(root, 8)
    assert ds.captions == ["caf\ufffd cr\ufffdme"]
    assert "x.txt" in caplog.text and "UTF-8" in caplog.text


def test_metadata_bad_line(tmp_path):
    root = _folder(tmp_path / "d", {"a": None, "b": None})
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": \n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 2: not valid JSON"):
        ImageCaptionDataset(root, 8)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png"}\n\n{"file_name": "zzz.png"}\n')
    with pytest.raises(ValueError, match=r"line 3: image 'zzz.png' not found"):
        ImageCaptionDataset(root, 8)


# ---------------------------------------------------------------- latent cache


def test_latent_cache_encodes_mirror_images_exactly(folder):
    """The trainers' latent cache (encode_in_batches): each batch once, mirrored images encoded themselves."""
    ds = ImageCaptionDataset(folder, 16)
    images = torch.stack([ds.plain(i)["image"] for i in range(len(ds))])
    calls = []

    def pool(x: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(len(x))
        return {"mean": torch.nn.functional.avg_pool2d(x, 4), "first": x[:, :1, :2, :2].double()}

    cache = encode_in_batches(lambda a, b: images[a:b], len(images), pool, flip=True, batch_size=5)
    assert calls == [5, 5, 5, 5, 2, 2]  # 12 images in batches of 5, plain and mirrored
    assert set(cache) == {"mean", "first", "mean_flip", "first_flip"} and cache["first"].dtype == torch.float32
    torch.testing.assert_close(cache["mean"], torch.nn.functional.avg_pool2d(images, 4))
    torch.testing.assert_close(cache["mean_flip"], torch.nn.functional.avg_pool2d(images.flip(-1), 4))
    plain = encode_in_batches(lambda a, b: images[a:b], len(images), lambda x: x[:, :, ::4, ::4], batch_size=32)
    assert list(plain) == ["latents"] and plain["latents"].shape == (12, 3, 4, 4)
