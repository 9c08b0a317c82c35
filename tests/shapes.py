"""A tiny captioned dataset for the training tests: coloured squares and circles ("a red square")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def write_shapes(root: Path, count: int, size: int = 16, transparent: bool = False) -> Path:
    """``count`` images in ``root`` (images/ + metadata.jsonl, as `ldmkit data` writes), on white or,
    with ``transparent``, on a transparent background."""
    (root / "images").mkdir()
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    lines = []
    for i in range(count):
        color, shape = list(COLORS)[i % 3], ("square", "circle")[i // 3 % 2]
        r = 3 + i % 4
        mask = (abs(xx - c) < r) & (abs(yy - c) < r) if shape == "square" else (xx - c) ** 2 + (yy - c) ** 2 < r * r
        if transparent:
            img = np.zeros((size, size, 4), np.uint8)
            img[mask] = (*COLORS[color], 255)
        else:
            img = np.full((size, size, 3), 255, np.uint8)
            img[mask] = COLORS[color]
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"images/{i:03d}.png", "text": f"a {color} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def expected_lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """The weight change a LoRA pair makes, written out independently of ldmkit.lora:
    ``scale * up @ down`` over flattened kernels (``scale`` = multiplier * alpha / rank)."""
    return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def assert_merge_delta(base: torch.nn.Module, merged: torch.nn.Module, pairs: dict[str, tuple], scale: float) -> None:
    """``merged`` differs from ``base`` by exactly each LoRA pair's delta on the weights named in ``pairs``
    (parameter name -> (down, up)) and not at all elsewhere."""
    base_params = dict(base.named_parameters())
    for name, param in merged.named_parameters():
        delta = param - base_params[name]
        if name not in pairs:
            assert torch.equal(delta, torch.zeros_like(delta)), name
            continue
        down, up = pairs[name]
        torch.testing.assert_close(delta, expected_lora_delta(down, up, scale, param.shape), rtol=1e-5, atol=1e-7)
