"""ControlNet training (Zhang, Rao & Agrawala 2023): ``ldmkit train controlnet``.

The model named by ``init_from`` (``--model``) is loaded on every start and frozen. The ControlNet is a
copy of its U-Net's time embedding, encoder and middle block (the copy starts with exactly the U-Net's
weights), with a hint encoder (random, its last convolution zero) and zero-initialised 1x1 convolutions
to the skips, as ``cldm.py`` builds it; so at step 0 the controlled model is exactly the model. Only the
ControlNet is trained, on the U-Net trainer's denoising loss, with its residuals added to the frozen
U-Net's skips and middle block.

Each training image gives its control map (``condition``): ``silhouette``, its foreground on the white
background (:func:`ldmkit.preprocess.foreground_mask`), or ``canny`` / ``edges``, its Canny edges. The
maps are made once on the first start (``conditions.safetensors``, beside the U-Net trainer's latent
cache, with the held-out images' maps for evaluation), mirrored with the latents. Every ``sample_every``
steps the EMA ControlNet draws the held-out images' captions in their maps (``samples/``: map | output
pairs) and, for silhouettes, the mean IoU of the outputs' foreground with the maps goes to metrics.jsonl.

``ldmkit export RUN out.safetensors`` writes the EMA ControlNet in the original layout
(``control_model.*``), which :func:`ldmkit.controlnet.load_controlnet` and the A1111 extension read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ldmkit import latent_norm
from ldmkit.model import StableDiffusion
from ldmkit.models.controlnet import HINT_CHANNELS, ControlNet, ControlNetConfig
from ldmkit.models.unet import UNetModel
from ldmkit.schedules import sd_alphas_cumprod
from ldmkit.train.config import TrainConfig, TrainError
from ldmkit.train.data import load_dataset, save_grid, split_holdout
from ldmkit.train.lora import fingerprint
from ldmkit.train.runner import CHECKPOINT, DistInfo, read_checkpoint
from ldmkit.train.sources import load_model
from ldmkit.train.unet import LatentDiffusionNet, UNetTask, _Shared, check_size, prepare_files, resolve_objective

CONDITIONS_FILE = "conditions.safetensors"
RUN_FILE = "controlnet_run.json"
# the preprocessor (ldmkit.preprocess) that makes each condition's map
PREPROCESSOR = {"silhouette": "silhouette", "canny": "canny", "edges": "canny"}
METADATA_KEY = "ldmkit.controlnet"
EVAL_IMAGES = 8  # held-out maps drawn (and measured) at each evaluation


def controlnet_from_unet(unet: UNetModel, downscale: int = 8, hint_in_channels: int = 3) -> ControlNet:
    """A ControlNet for ``unet`` as ControlNet training starts it (cldm.py; diffusers'
    ``ControlNetModel.from_unet``): time embedding, encoder and middle block copied from the U-Net, the
    zero convolutions and the hint encoder's last convolution zero, the rest of the hint encoder random.
    The hint encoder halves the map once per factor 2 of the VAE's ``downscale`` (SD's 8: the released
    16/32/96/256 widths; fewer stages, the first of those widths, for smaller factors)."""
    halvings = downscale.bit_length() - 1
    if downscale != 2**halvings or not 1 <= halvings < len(HINT_CHANNELS):
        raise TrainError(f"a VAE downscale of {downscale}: the ControlNet's hint encoder needs 2, 4 or 8")
    net = ControlNet(ControlNetConfig(unet.cfg, hint_in_channels, HINT_CHANNELS[:halvings + 1]))
    own = net.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k.startswith(("time_embed.", "input_blocks.",
                                                                          "middle_block."))}
    missing = [k for k in own if k.startswith(("time_embed.", "input_blocks.", "middle_block.")) and k not in copied]
    if missing:
        raise TrainError(f"the U-Net has no {missing[0]!r}: cannot copy its encoder into a ControlNet")
    net.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for zero in [*net.zero_convs, net.middle_block_out, net.input_hint_block[-1]]:
            for p in zero.parameters():
                p.zero_()
    return net


def condition_maps(images: Tensor, condition: str) -> Tensor:
    """(N, 1, H, W) uint8 maps of (N, 3, H, W) uint8 images (both conditions give grey maps)."""
    from PIL import Image

    from ldmkit.preprocess import preprocess

    out = [np.asarray(preprocess(PREPROCESSOR[condition], Image.fromarray(im.permute(1, 2, 0).numpy())).convert("L"))
           for im in images]
    return torch.from_numpy(np.stack(out))[:, None] if out else torch.zeros(0, 1, *images.shape[-2:], dtype=torch.uint8)


def prepare_conditions(cfg: TrainConfig, run_dir: Path) -> None:
    """The maps of the training images (in the latent cache's order) and of the held-out ones, made once."""
    from ldmkit.checkpoint import atomic_save_safetensors, read_safetensors

    path = run_dir / CONDITIONS_FILE
    if path.exists():
        sd, meta = read_safetensors(path)
        uses_images = cfg.shape_augment or cfg.shape_mix
        if meta.get("condition") == cfg.condition and (not uses_images or "train_images" in sd):
            return
    train, held = split_holdout(load_dataset(cfg.data, cfg.size), cfg.data, cfg.holdout)
    _, meta = read_safetensors(run_dir / "latents.safetensors")
    if json.loads(meta["keys"]) != train.keys:
        raise TrainError(f"{run_dir}: its latent cache holds other images than {cfg.data}; start a new run")
    held_n = min(EVAL_IMAGES, len(held))
    maps = {"train": condition_maps(train.images, cfg.condition),
            "held": condition_maps(held.images[:held_n], cfg.condition)}
    if cfg.shape_augment or cfg.shape_mix:  # the augmentations use the images; a resumed run needs no dataset
        maps["train_images"] = train.images.contiguous()
    meta = {"condition": cfg.condition, "held_captions": json.dumps(held.captions[:held_n]),
            "held_keys": json.dumps(held.keys[:held_n])}
    atomic_save_safetensors(maps, path, meta)


class ControlNetNet(nn.Module):
    """The U-Net trainer's denoising loss on a frozen model, with the ControlNet's residuals added.

    Only the ControlNet is registered here (``controlnet.*``), so the optimizer, the EMA and the
    checkpoint hold just it; the model is shared by the runner's EMA copy, not duplicated.
    """

    def __init__(self, controlnet: ControlNet, model: StableDiffusion, objective: str, high_noise_weight: float = 0.0):
        super().__init__()
        self.controlnet = controlnet
        c = model.cfg
        ac = sd_alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end)
        loss = LatentDiffusionNet(model.unet.requires_grad_(False), model.text_encoder, False, c.clip_skip, ac,
                                  objective)
        loss.high_noise_weight = high_noise_weight
        self.frozen = _Shared(loss.to(model.device).eval())
        self.base = _Shared(model)

    def forward(self, latents: Tensor, ids: Tensor, t: Tensor, noise: Tensor, hint: Tensor) -> tuple[Tensor, dict]:
        return self.frozen.module(latents, ids, t, noise, hint=hint, controlnet=self.controlnet)


def _check_record(old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    if old["fingerprint"] != new["fingerprint"]:
        raise TrainError(f"--model {new['init_from']} has other weights than the model {run_dir} was started on "
                         f"({old['init_from']}); resume with that model")
    if old["condition"] != new["condition"]:
        raise TrainError(f"{run_dir} trains a {old['condition']} ControlNet; resume without --condition, or start "
                         "a new run with another --out")


class ControlNetTask(UNetTask):
    """A ControlNet on a frozen model; latents, captions and caption dropout as the U-Net trainer's."""

    arch_parts = ("unet", "text", "vae")  # the model's: resuming on another architecture fails early

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: DistInfo):
        from ldmkit.checkpoint import read_safetensors
        from ldmkit.train.run_record import keep_record

        self.cfg, self.run_dir, self.device = cfg, run_dir, d.device
        model = load_model(cfg.init_from, "--model")
        if model.cfg.unet.in_channels != model.cfg.unet.out_channels or model.cfg.is_sdxl:  # inpainting, depth
            raise TrainError(f"--model {cfg.init_from}: ControlNets are trained here for SD1/SD2-style text-to-image "
                             "models, not inpainting, depth (512-depth-ema) or SDXL ones")
        objective = resolve_objective(cfg, model.cfg)
        if objective != model.cfg.prediction:
            raise TrainError(f"--model {cfg.init_from} predicts {model.cfg.prediction}; drop --objective "
                             f"{cfg.objective}")
        check_size(cfg.size, model.cfg.vae, model.cfg.unet)
        condition = "canny" if cfg.condition == "edges" else cfg.condition
        record = {"init_from": cfg.init_from, "fingerprint": fingerprint(model), "condition": condition}
        keep_record(run_dir, RUN_FILE, record, "controlnet", _check_record, d.is_main)  # checked on resume
        if d.is_main:
            prepare_files(cfg, run_dir, d.device, model, vae_file=False)  # the model's VAE encodes the data
            prepare_conditions(cfg.replace(condition=condition), run_dir)
        d.barrier()
        self.read_latents()
        self.tokenize(model.tokenizer)
        self.model_cfg = model.cfg.replace(name=run_dir.name, extra={"image_size": cfg.size})
        maps, meta = read_safetensors(run_dir / CONDITIONS_FILE)
        self.maps, self.held_maps = maps["train"], maps["held"]
        self.images = maps.get("train_images")
        self.held_captions: list[str] = json.loads(meta["held_captions"])
        self.condition = condition
        self.record = record

        controlnet = controlnet_from_unet(model.unet, model.cfg.vae.downscale)
        if cfg.init_controlnet and not (run_dir / CHECKPOINT).exists():  # a resumed run has its own weights
            controlnet.load_state_dict(init_weights(cfg.init_controlnet, controlnet))
        self.net = ControlNetNet(controlnet, model.to(d.device), objective, cfg.high_noise_weight)

    def make_batch(self, idx: Tensor, gen: torch.Generator, step: int, flips: Tensor | None = None) -> dict[str, Any]:
        flips = self.draw_flips(idx, gen)
        batch = super().make_batch(idx, gen, step, flips)
        maps = self.maps[idx]
        if flips is not None:
            maps = torch.where(flips[:, None, None, None], maps.flip(-1), maps)
        if self.cfg.shape_augment or self.cfg.shape_mix:  # drawn after everything above: p = 0 leaves the stream
            batch["latents"], maps = self.shape_augment(idx, gen, flips, batch["latents"], maps)
        return {**batch, "hint": maps.float().div(255.0).expand(-1, 3, -1, -1).contiguous()}

    def shape_augment(self, idx: Tensor, gen: torch.Generator, flips: Tensor | None, latents: Tensor,
                      maps: Tensor) -> tuple[Tensor, Tensor]:
        """``shape_mix``: each image with that probability moved into a random shape, caption kept
        (:mod:`ldmkit.train.shape_mix`); ``shape_augment``: each other image with that probability moved and
        cut into a random shape (:mod:`ldmkit.train.shape_augment`). The changed images are re-encoded by the
        model's VAE (a posterior sample, as the cache's), their maps the results' silhouettes."""
        from ldmkit.train.shape_augment import augment
        from ldmkit.train.shape_mix import mix

        assert self.images is not None
        none = torch.zeros(len(idx), dtype=torch.bool)  # shape_mix = 0 draws nothing: the stream before the option
        mixed = torch.rand(len(idx), generator=gen) < self.cfg.shape_mix if self.cfg.shape_mix else none
        pick = torch.rand(len(idx), generator=gen) < self.cfg.shape_augment if self.cfg.shape_augment else none
        pick = pick & ~mixed
        changed = pick | mixed
        if not changed.any():
            return latents, maps
        images = self.images[idx]
        if flips is not None:
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        outlines = self.maps if self.cfg.shape_augment_silhouettes else None
        new_images, new_maps = images.clone(), maps.clone()
        if pick.any():
            new_images[pick], new_maps[pick] = augment(images[pick], gen, outlines)
        if mixed.any():  # maps are the images' own silhouettes (flipped alike): their foregrounds
            new_images[mixed], new_maps[mixed] = mix(images[mixed], maps[mixed], gen, outlines)
        images, new_maps = new_images[changed], new_maps[changed]
        vae = self.net.base.module.vae
        with torch.no_grad():
            mean, logvar = vae.encode(images.float().div(127.5).sub(1.0).to(self.device))
        mean, std = mean.float().cpu(), torch.exp(0.5 * logvar).float().cpu()
        z = latent_norm.to_unet(self.model_cfg.vae, mean + std * torch.randn(mean.shape, generator=gen))
        latents, maps = latents.clone(), maps.clone()
        latents[changed], maps[changed] = z.to(latents.dtype), new_maps
        return latents, maps

    def evaluate(self, eval_net: nn.Module, step: int) -> dict[str, float]:
        """Held-out captions drawn by the EMA ControlNet, each in another held-out image's map: ``samples/``
        (map | output pairs) and, for silhouettes, the outputs' mean foreground IoU with the maps."""
        from PIL import Image

        from ldmkit.controlnet import ControlUnit
        from ldmkit.pipeline import GenerationParams, txt2img
        from ldmkit.preprocess import foreground_mask

        assert isinstance(eval_net, ControlNetNet)
        model = eval_net.base.module
        tiles, ious = [], []
        # each caption in the next image's map: the map, not the caption, must decide the shape
        prompts = self.cfg.sample_prompts or self.held_captions[1:] + self.held_captions[:1]
        for i, (prompt, hint) in enumerate(zip(prompts, self.held_maps, strict=False)):
            unit = ControlUnit(eval_net.controlnet, hint[None].float().div(255.0).expand(-1, 3, -1, -1))
            params = GenerationParams(prompt=prompt, steps=self.cfg.sample_steps, cfg_scale=self.cfg.sample_cfg_scale,
                                      seed=self.cfg.seed + i, width=self.cfg.size, height=self.cfg.size,
                                      controlnets=(unit,))
            out = txt2img(model, params)[0]
            tiles += [Image.fromarray(hint[0].numpy()).convert("RGB"), out]
            if self.condition == "silhouette":
                ious.append(iou(foreground_mask(out), hint[0].numpy() > 127))
        if tiles:
            save_grid(tiles, min(8, len(tiles)), self.run_dir / "samples" / f"step_{step:07d}.png")
        return {"silhouette_iou": float(np.mean(ious))} if ious else {}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "controlnet": self.record}


def init_weights(source: str, controlnet: ControlNet) -> dict[str, Tensor]:
    """``init_controlnet``: the weights of a ControlNet run folder (EMA), an exported file, a built-in ControlNet's
    name or a diffusers ControlNet folder, float32, checked against ``controlnet``'s layout."""
    from ldmkit.api import builtin_controlnet_path
    from ldmkit.checkpoint import read_safetensors
    from ldmkit.train.export import ema_weights

    path = builtin_controlnet_path(source) or Path(source)  # the built-in emoji-silhouette too
    if path.is_dir() and not (path / CHECKPOINT).exists():  # a diffusers ControlNetModel folder
        from ldmkit.controlnet import read_controlnet

        sd = read_controlnet(path)
    elif path.is_dir():
        ckpt = read_checkpoint(path)
        if ckpt["kind"] != "controlnet":
            raise TrainError(f"--init-controlnet {source}: a {ckpt['kind']} run, not a ControlNet run")
        sd = ema_weights(ckpt, "controlnet.")
    elif path.is_file():
        raw, meta = read_safetensors(path)
        if json.loads(meta.get(METADATA_KEY, "{}")).get("scale", 1.0) != 1.0:
            raise TrainError(f"--init-controlnet {source}: exported with --scale; start from its run or a file "
                             "exported at scale 1")
        sd = {k.removeprefix("control_model."): v for k, v in raw.items()}
    else:
        raise TrainError(f"--init-controlnet {source}: no such run folder or file, nor a built-in ControlNet "
                         "(emoji-silhouette)")
    own = controlnet.state_dict()
    wrong = sorted(set(own) ^ set(sd)) or [k for k in own if own[k].shape != sd[k].shape]
    if wrong:
        raise TrainError(f"--init-controlnet {source}: another ControlNet layout than --model's ({wrong[0]!r} "
                         "differs); start from a ControlNet trained for this model")
    return {k: v.float() for k, v in sd.items()}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def export_controlnet(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = False,
                      scale: float = 1.0) -> Path:
    """A ControlNet run's EMA weights (the trained ones when EMA is off) in the original single-file layout
    (``control_model.*``), with the model and condition it was trained for in the metadata. ``scale``
    multiplies the zero convolutions (weights and biases), hence every residual: the file at weight 1 acts
    as the run at ``--control-weight scale``."""
    from ldmkit.checkpoint import atomic_save_safetensors
    from ldmkit.train.export import ema_weights, safetensors_path

    out = safetensors_path(out, "ControlNet files are .safetensors")
    ckpt = read_checkpoint(Path(run_dir))
    if ckpt["kind"] != "controlnet":
        raise TrainError(f"{run_dir} is a {ckpt['kind']} run, not a ControlNet run")
    sd = ema_weights(ckpt, "controlnet.")
    if scale != 1.0:
        sd = {k: v * scale if k.startswith(("zero_convs.", "middle_block_out.")) else v for k, v in sd.items()}
    dtype = torch.float16 if half else torch.float32
    sd = {"control_model." + k: v.to(dtype).contiguous() for k, v in sd.items()}
    record = ckpt["task"]["controlnet"]
    meta = {METADATA_KEY: json.dumps({"base_model": Path(record["init_from"]).name, "condition": record["condition"],
                                      "preprocessor": PREPROCESSOR[record["condition"]], "steps": ckpt["step"],
                                      "scale": scale})}
    atomic_save_safetensors(sd, out, meta)
    return out
