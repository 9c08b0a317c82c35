"""``train unet --data "shards/{00000..00099}.tar"``: the U-Net trained on a stream of tar shards.

A folder run encodes every image once into ``latents.safetensors``; a streamed run keeps nothing that
grows with the dataset. Its run folder holds ``stream.json`` (the shard list, the sample prompts and what
they were made from) and the VAE, which encodes each batch as it arrives: the same posterior sample, flip
and caption draws as a folder run, from the step's generator, so ``--resume`` is exact here too (the
checkpoint holds every reader's position in the stream; see ``ldmkit.data.shards``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit import latent_norm
from ldmkit.data.datasets import flip_allowed
from ldmkit.train.config import TrainConfig, TrainError
from ldmkit.train.data import ImageSet, StreamOrder

STREAM_FILE = "stream.json"
HEAD = 256  # samples read at the first start: the VAE's scale factor, the sample prompts


def is_streamed(cfg: TrainConfig) -> bool:
    from ldmkit.data.shards import is_shard_source

    return bool(cfg.data) and is_shard_source(cfg.data)


def shard_list(cfg: TrainConfig) -> list[Path]:
    from ldmkit.data.shards import list_shards

    try:
        return list_shards(cfg.data)
    except ValueError as e:
        raise TrainError(str(e)) from None


def stream_head(cfg: TrainConfig) -> ImageSet:
    """The first samples a single reader streams (epoch 0), as an in-memory set."""
    from ldmkit.data.shards import ShardStream

    stream = ShardStream(shard_list(cfg), cfg.size, seed=cfg.seed, buffer=cfg.shuffle_buffer, epochs=1)
    items = [x for _, x in zip(range(HEAD), stream, strict=False)]
    if not items:
        raise TrainError(f"--data {cfg.data}: the shards hold no samples with an image (key.png/jpg/webp)")
    return ImageSet(torch.stack([x["image"] for x in items]), [x["caption"] for x in items],
                    [x["key"] for x in items])


def write_stream_file(cfg: TrainConfig, run_dir: Path, prompts: list[str], source: str) -> None:
    from ldmkit.checkpoint import atomic_write_text

    info = {"shards": [str(p) for p in shard_list(cfg)], "sample_prompts": prompts, "size": cfg.size,
            "source": source}
    atomic_write_text(run_dir / STREAM_FILE, json.dumps(info, indent=1) + "\n")


def stream_source(run_dir: Path) -> str | None:
    """What a run's stream.json was made from (None: no such file)."""
    path = run_dir / STREAM_FILE
    return json.loads(path.read_text()).get("source") if path.exists() else None


def read_stream(task: Any) -> None:
    """Set a U-Net task up for streamed batches (instead of ``read_latents``'s cache)."""
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.train.unet import read_vae_file

    cfg, run_dir = task.cfg, task.run_dir
    info = json.loads((run_dir / STREAM_FILE).read_text())
    if int(info["size"]) != cfg.size:
        raise TrainError(f"{run_dir}: its stream was set up at size {info['size']}, not {cfg.size}; "
                         "start a new run to train at another size")
    task.shards = [Path(p) for p in info["shards"]]
    task.sample_prompts = cfg.sample_prompts or info["sample_prompts"]
    task.captions, task.train_size, task.flip = [], 0, cfg.flip
    vae_cfg, vae_sd = read_vae_file(run_dir)
    task.stream_vae = AutoencoderKL(vae_cfg)
    task.stream_vae.load_state_dict(vae_sd)
    task.stream_vae.to(task.device).eval().requires_grad_(False)
    task.stream_order = lambda d: StreamOrder(task.shards, cfg.size, cfg.seed, d.rank, d.world_size,
                                              cfg.data_workers, cfg.shuffle_buffer)


@torch.no_grad()
def stream_batch(task: Any, samples: list[dict[str, Any]], gen: torch.Generator) -> dict[str, Any]:
    """A U-Net batch from streamed samples; the draws follow ``UNetTask.make_batch``'s order."""
    from ldmkit.train.unet import apply_template

    b = len(samples)
    captions = [s["caption"] for s in samples]
    x = torch.stack([s["image"] for s in samples]).float() / 127.5 - 1.0
    if task.flip:
        flip = (torch.rand(b, generator=gen) < 0.5) & torch.tensor([flip_allowed(c) for c in captions])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean, logvar = task.stream_vae.encode(x.to(task.device))
    mean, std = mean.float().cpu(), torch.exp(0.5 * logvar).float().cpu()
    latents = latent_norm.to_unet(task.model_cfg.vae, mean + std * torch.randn(mean.shape, generator=gen))
    t = task.draw_timesteps(b, gen)
    noise = torch.randn(latents.shape, generator=gen)
    drop = torch.rand(b, generator=gen) < task.cfg.caption_dropout
    templates = task.cfg.caption_templates or ["{caption}"]
    pick = torch.randint(0, len(templates), (b,), generator=gen) if len(templates) > 1 else torch.zeros(b, dtype=int)
    texts = ["" if drop[i] or not c else apply_template(templates[int(pick[i])], c) for i, c in enumerate(captions)]
    ids: Tensor = task.tokenizer(texts)
    return {"latents": latents, "ids": ids, "t": t, "noise": noise}
