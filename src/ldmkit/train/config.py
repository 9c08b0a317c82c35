"""A training run's settings: one dataclass, saved as ``run_dir/config.toml``.

Precedence, lowest first: the dataclass defaults (with per-kind defaults for the VAE), a
``--config`` file, the run's own ``config.toml`` on ``--resume``, then command-line flags.
The architecture is a named preset plus field overrides (``[arch.unet]`` etc. in the TOML).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ldmkit.config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

Kind = Literal["vae", "unet", "lora", "lcm", "taesd", "embedding", "controlnet"]
KINDS: tuple[str, ...] = typing.get_args(Kind)
ARCH_PARTS: dict[str, type] = {"unet": UNetConfig, "vae": VAEConfig, "text": TextEncoderConfig}


class TrainError(ValueError):
    """A run that can't start or resume; the message names the setting or file and the fix."""


# A from-scratch model for 64-px images: f=4 VAE (16x16 latents), ~25M-parameter U-Net.
SMALL = ModelConfig(
    name="small", family="custom",
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(False, True, True),
                    num_heads=4, context_dim=256),
    vae=VAEConfig(ch=64, ch_mult=(1, 2, 4), num_res_blocks=2),
    text=TextEncoderConfig(width=256, layers=4, heads=4, intermediate=1024),
)
TRAIN_PRESETS: dict[str, ModelConfig] = {"small": SMALL, **PRESETS}


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Every setting of a VAE, U-Net or LoRA training run; all have defaults.

    A help text that starts with kinds (``unet/lora: ...``) marks a setting only those kinds use.
    """

    kind: Kind = _help("what is trained: vae, unet, lora or lcm", "unet")
    data: str = _help("dataset folder (images/ + metadata.jsonl, as `ldmkit data` writes); unet: also WebDataset tar "
                      "shards, streamed: 'shards/{00000..00099}.tar' or a folder of .tar (`ldmkit data shards`)", "")
    model: str = _help(f"vae/unet: architecture preset: {', '.join(TRAIN_PRESETS)} (unet: unused with --init-from)",
                       "small")
    arch: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"help": "architecture field overrides"})
    init_from: str = _help("vae/unet/lora/lcm/taesd/embedding/controlnet: a model to start from. vae: a `ldmkit "
                           "train vae` run folder or a model file, continued with its architecture; unet: a Stable "
                           "Diffusion model (file, diffusers folder or built-in name) whose U-Net (and text encoder) "
                           "is fine-tuned with its architecture and VAE; lora: the model LoRA modules are trained on, "
                           "frozen (required); lcm: the teacher (required); taesd: the model whose autoencoder is "
                           "distilled (required); embedding: the model the new word is learnt for, frozen "
                           "(required); controlnet: the model the ControlNet controls, frozen; its U-Net's encoder "
                           "starts the ControlNet (required)",
                           "")
    freeze_encoder: bool = _help("vae: train only the decoder (as SD's ft-MSE VAE), so latents of a U-Net trained "
                                 "on the --init-from VAE stay valid", False)
    vae: str = _help("unet: the VAE, a `ldmkit train vae` run folder or a model file (default with --init-from: "
                     "that model's)", "")
    text_encoder: str = _help("unet: '' trains a text encoder jointly (from scratch, or from --init-from's "
                              "weights); a model file/name loads its text encoder frozen", "")
    vocab: Literal["full", "data"] = _help(
        "unet: text encoder vocabulary when trained from scratch: full (CLIP's 49,408 token rows) or data (rows for "
        "the training captions' tokens only, one shared row for all others: a much smaller, faster model)", "full")
    size: int = _help("training image size in pixels (images are resized and centre-cropped)", 64)
    flip: bool = _help("random horizontal flips", True)
    holdout: int = _help("images held out for evaluation when the dataset has no holdout.json", 16)
    data_workers: int = _help("unet: processes reading --data tar shards (DataLoader workers; 0: the training "
                              "process itself)", 0)
    shuffle_buffer: int = _help("unet: samples each tar-shard reader shuffles at a time (memory: one buffer per "
                                "reader)", 1000)
    batch_size: int = _help("images per device per micro-batch", 16)
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    total_steps: int = _help("optimizer steps in the whole run", 20000)
    lr: float = _help("peak learning rate", 1e-4)
    min_lr_ratio: float = _help("cosine decay ends at lr * min_lr_ratio", 0.0)
    warmup_steps: int = _help("linear warm-up steps", 500)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    grad_clip: float = _help("clip the gradient norm to this (0: off)", 1.0)
    ema_decay: float = _help("EMA decay of the trained weights (0: EMA = raw weights)", 0.9999)
    objective: Literal["auto", "eps", "v"] = _help(
        "unet/lora: predict the noise (eps) or v (Salimans & Ho 2022); auto: what --init-from's model predicts, "
        "else eps", "auto")
    latent_norm: Literal["scale", "channel"] = _help(
        "unet: how the U-Net's latents are normalised, measured from the posterior samples of the latent cache "
        "when --vae is a VAE run: scale (one scale_factor = 1/std, as SD's 0.18215) or channel (per-channel "
        "latents_mean / latents_std, diffusers' convention, scale_factor 1: zero mean, unit variance per channel; "
        "for autoencoders whose latents are far from zero mean)", "scale")
    caption_dropout: float = _help("unet/lora/controlnet: probability of training on the empty caption (for CFG)", 0.1)
    timestep_sampling: Literal["uniform", "cubic"] = _help(
        "unet/lora/controlnet: how each sample's training timestep t is drawn: uniform over 0..T-1 (DDPM), or "
        "cubic, biased towards high noise as T2I-Adapter trains (Mou et al. 2023, sec. 3.4; diffusers' "
        "train_t2i_adapter_sdxl.py): t = floor(T (1 - u^3)), u ~ U[0, 1), so P(t >= k) = (1 - k/T)^(1/3) "
        "(half the samples at t >= 0.875 T), where a sample's colours and layout are decided", "uniform")
    caption_templates: list[str] = field(default_factory=list, metadata={
        "help": "unet/lcm/embedding/controlnet: each training caption (embedding: the word) is put, at random per "
                "sample, into one of these, e.g. "
                "'{caption}' '{a} {caption}' 'an emoji of {a} {caption}' ({a}: 'a' or 'an' to suit the caption), "
                "so the model learns prompts phrased as people type them, not only bare captions (default: bare)"})
    balanced: bool = _help(
        "vae/unet/lcm: class-balanced sampling: each epoch draws as many samples as the training set has, with "
        "replacement, in proportion to metadata.jsonl's per-image \"weight\" (as `ldmkit data emoji --balance` "
        "writes; 0: never drawn), from the epoch's seeded generator; off: every image once per epoch", False)
    caption_choice: Literal["first", "random"] = _help(
        "unet/lcm: which caption of an image trains: first (metadata.jsonl's \"text\") or random (one of the "
        "line's \"captions\" list, drawn per sample per step, as `ldmkit data emoji --augment-captions` writes)",
        "first")
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", False)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "autocast dtype on CUDA; auto = bf16 where supported. CPU always trains in fp32", "auto")
    device: str = _help("auto, cpu, cuda (torchrun ranks use cuda:LOCAL_RANK)", "auto")
    deterministic: bool = _help("deterministic CUDA kernels, so a resumed GPU run repeats bit for bit (slower); "
                                "CPU runs always do", False)
    seed: int = _help("seed of the initial weights, data order and noise", 0)
    checkpoint_every: int = _help("steps between checkpoints (one is always written at the end)", 1000)
    sample_every: int = _help("steps between sample grids / evaluation, and at the end (0: never)", 1000)
    log_every: int = _help("steps between metrics lines", 10)
    sample_prompts: list[str] = field(default_factory=list, metadata={
        "help": "unet/lora/lcm/embedding/controlnet: prompts of the sample grid (default: captions of held-out "
                "images; controlnet: with their control maps)"})
    sample_steps: int = _help("unet/lora/lcm/embedding/controlnet: sampler steps for the sample grid", 20)
    sample_cfg_scale: float = _help("unet/lora/lcm/embedding/controlnet: guidance scale for the sample grid", 4.0)
    rec_loss: Literal["l1", "l2"] = _help("vae/taesd: pixel reconstruction loss (taesd: l2 = MSE against the KL "
                                          "decoder's output, what PSNR measures; l1 = L1 + MSE)", "l1")
    kl_weight: float = _help("vae: KL weight, relative to the per-pixel loss summed over pixels as in LDM", 1e-6)
    perceptual_weight: float = _help("vae: weight of the multi-scale SSIM + gradient loss (offline LPIPS stand-in)",
                                     1.0)
    disc_start: int = _help("vae: step at which the patch discriminator starts (-1: no discriminator)", -1)
    disc_weight: float = _help("vae: weight of the adversarial loss", 0.5)
    lora_rank: int = _help("lora/lcm: rank of the LoRA matrices (kohya's network_dim); lcm: 0 distils the whole "
                           "U-Net, R > 0 trains an LCM-LoRA of rank R", 8)
    lora_alpha: float = _help("lora/lcm: the update is scaled by alpha / rank (kohya's network_alpha)", 8.0)
    text_encoder_lora: bool = _help("lora: LoRA modules in the text encoder too, not only the U-Net", True)
    conv_lora: bool = _help("lora/lcm: LoRA modules in the U-Net's 3x3 convolutions too (LoCon)", False)
    token: str = _help("embedding: the new word (the embedding file's name), e.g. mycat", "")
    vectors: int = _help("embedding: vectors the word stands for (each takes one of a chunk's 75 token places)", 1)
    init_text: str = _help("embedding: the vectors start as the token embeddings of this text", "*")
    embedding_file: str = _help("embedding: also write the embedding here at every checkpoint (set by "
                                "--out FILE.safetensors, whose run folder is then .FILE.run beside it)", "")

    w_min: float = _help("lcm: lowest teacher guidance w (w ~ U(w_min, w_max); the teacher's CFG scale is 1 + w). "
                         "The U-Net takes no w, so the range is baked into the student: w_min = w_max picks one",
                         3.0)
    w_max: float = _help("lcm: highest teacher guidance w", 3.0)
    num_ddim_timesteps: int = _help("lcm: steps N of the skipping-step DDIM solver (each skips T / N timesteps)", 50)
    target_decay: float = _help("lcm: EMA decay of the target network (whole U-Net; an LCM-LoRA's target is the "
                                "online network)", 0.95)
    huber_c: float = _help("lcm: c of the pseudo-Huber loss sqrt(d^2 + c^2) - c", 0.001)
    w_embedding: bool = _help("lcm: give the student LCM's guidance embedding (time_cond_proj_dim 256), so it learns "
                              "every w in the range and is sampled with CFG scale 1 + w (one U-Net call a step); off: "
                              "the guidance is baked in and the model is sampled with CFG 1 (whole U-Net only)", False)
    init_student: str = _help("lcm: start the student (and its target network) from this model's U-Net instead of "
                              "the teacher's, e.g. --init-student emoji-lcm to continue a distillation from an "
                              "exported model (whole U-Net only; --resume continues a run exactly)", "")
    taesd_width: int = _help("taesd: channels at every level of the tiny autoencoder (TAESD: 64)", 64)
    taesd_parts: str = _help("taesd: which halves to distil: encoder,decoder or decoder (the decoder learns from "
                             "the model's own latents either way)", "encoder,decoder")

    condition: Literal["silhouette", "canny", "edges"] = _help(
        "controlnet: the control map made from each training image: silhouette (its foreground on the white "
        "background, white on black: ldmkit.preprocess.foreground_mask) or canny / edges (Canny edges, 100/200)",
        "silhouette")
    shape_augment: float = _help(
        "controlnet (silhouette): share of training images moved (random scale/shift) and cut by a random blob or "
        "irregular polygon on white, the map being the result's silhouette, so the map and not the caption gives "
        "the shape (ldmkit.train.shape_augment); 0 = off", 0.0)
    shape_augment_silhouettes: bool = _help(
        "controlnet: shape_augment also cuts by other training images' silhouettes (moved; a third of the "
        "masks), teaching detailed outlines as well as blobs and polygons", False)
    shape_mix: float = _help(
        "controlnet (silhouette): share of training images moved INTO a random shape (a blob, an irregular polygon "
        "or, with shape_augment_silhouettes, another training image's silhouette): the emoji's bounding box scaled "
        "onto the shape's, the rest of the shape filled with its nearest colour, caption kept, so the caption "
        "gives the content and the map the shape (ldmkit.train.shape_mix; drawn before shape_augment, which "
        "then applies to the rest); 0 = off", 0.0)
    high_noise_weight: float = _help(
        "controlnet: g > 0 multiplies each sample's loss by clamp(1/SNR(t), 1, g), SNR = abar/(1-abar): for an eps "
        "model that is the error of the predicted x0 where 1 <= 1/SNR <= g (t >= ~430 of 1000 on SD's schedule), "
        "so the high-noise steps where colours and layout are decided weigh up to g times more; 0 = off", 0.0)
    init_controlnet: str = _help(
        "controlnet: start the ControlNet from this ControlNet run folder (its EMA weights) or file (e.g. an "
        "exported .safetensors) instead of the model's U-Net copy; --resume continues a run exactly", "")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# The LDM autoencoder recipe: Adam(0.5, 0.9), no weight decay, smaller batches, no EMA by default.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": {"adam_beta1": 0.5, "adam_beta2": 0.9, "weight_decay": 0.0, "batch_size": 8, "ema_decay": 0.0,
            "total_steps": 10000, "warmup_steps": 100},
    "unet": {},
    # kohya-like: every image trains (no holdout), no EMA, no caption dropout, SD1's 512 px
    "lora": {"size": 512, "batch_size": 4, "holdout": 0, "total_steps": 2000, "warmup_steps": 100, "ema_decay": 0.0,
             "caption_dropout": 0.0, "checkpoint_every": 500, "sample_every": 500},
    # LCM's recipe (diffusers' train_lcm_distill_sd_wds.py): lr 1e-6 there is for SD1.5's 860M U-Net with
    # batch 12 x 8 GPUs; small models take a larger one. Every image trains, no caption dropout (the
    # teacher's CFG needs no trained-in empty caption beyond what the teacher has)
    "lcm": {"lora_rank": 0, "lora_alpha": 8.0, "holdout": 0, "total_steps": 4000, "warmup_steps": 100,
            "lr": 1e-5, "ema_decay": 0.95, "caption_dropout": 0.0, "weight_decay": 0.0, "checkpoint_every": 250,
            "sample_every": 500, "flip": False},
    # textual inversion (A1111's defaults: lr 5e-3, no EMA); every image trains
    "embedding": {"size": 512, "batch_size": 4, "holdout": 0, "total_steps": 2000, "warmup_steps": 0, "lr": 5e-3,
                  "ema_decay": 0.0, "weight_decay": 0.0, "caption_dropout": 0.0, "checkpoint_every": 250,
                  "sample_every": 500},
    # ControlNet (Zhang et al. 2023): AdamW 1e-5 there is for SD's 860M U-Net; half the captions empty, so the
    # ControlNet learns to read the map alone (their recipe); no EMA in theirs, a light one here for short runs
    "controlnet": {"total_steps": 5000, "warmup_steps": 100, "lr": 1e-4, "caption_dropout": 0.5, "ema_decay": 0.99,
                   "weight_decay": 0.0, "checkpoint_every": 250, "sample_every": 500},
    # TAESD: a small plain conv net; no EMA (short runs), no weight decay
    "taesd": {"batch_size": 16, "total_steps": 10000, "warmup_steps": 100, "lr": 1e-3, "weight_decay": 0.0,
              "ema_decay": 0.0, "checkpoint_every": 250, "sample_every": 500, "rec_loss": "l2"},
}


def defaults(kind: Kind) -> TrainConfig:
    return TrainConfig(kind=kind, **KIND_DEFAULTS[kind])


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------- validation


def validate(cfg: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise TrainError(msg)

    need(cfg.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    need(cfg.model in TRAIN_PRESETS, f"unknown model preset {cfg.model!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    for name in ("size", "batch_size", "grad_accum", "total_steps", "log_every", "sample_steps"):
        need(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "checkpoint_every", "sample_every", "holdout", "grad_clip", "lr", "weight_decay"):
        need(getattr(cfg, name) >= 0, f"{name} must not be negative, got {getattr(cfg, name)}")
    need(0.0 <= cfg.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    need(0.0 <= cfg.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {cfg.caption_dropout}")
    need(cfg.timestep_sampling in ("uniform", "cubic"),
         f"timestep_sampling must be uniform or cubic, got {cfg.timestep_sampling!r}")
    need(cfg.kind == "controlnet" or not cfg.high_noise_weight, "high_noise_weight is read by `ldmkit train "
         "controlnet` only; drop it")
    need(cfg.objective in ("auto", "eps", "v"), f"objective must be auto, eps or v, got {cfg.objective!r}")
    need(cfg.latent_norm in ("scale", "channel"), f"latent_norm must be scale or channel, got {cfg.latent_norm!r}")
    need(cfg.precision in ("auto", "fp32", "bf16", "fp16"),
         f"precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    need(cfg.rec_loss in ("l1", "l2"), f"rec_loss must be l1 or l2, got {cfg.rec_loss!r}")
    need(cfg.caption_choice in ("first", "random"), f"caption_choice must be first or random, got "
         f"{cfg.caption_choice!r}")
    need(cfg.data_workers >= 0, f"data_workers must not be negative, got {cfg.data_workers}")
    need(cfg.shuffle_buffer >= 1, f"shuffle_buffer must be at least 1, got {cfg.shuffle_buffer}")
    if cfg.data:
        from ldmkit.data.shards import is_shard_source, list_shards

        if is_shard_source(cfg.data):
            try:
                list_shards(cfg.data)  # every shard the pattern names is there
            except ValueError as e:
                raise TrainError(str(e)) from None
            need(cfg.kind == "unet", f"--data {cfg.data}: tar shards are streamed by `ldmkit train unet` only; "
                 f"{cfg.kind} reads an image folder (pass the folder the shards were written from)")
            need(cfg.vocab != "data", "vocab = data needs every caption before training; a shard stream is read "
                 "as it goes: use vocab = full")
            need(not cfg.balanced and cfg.caption_choice == "first", "balanced and caption_choice = random read "
                 "metadata.jsonl's weights and caption lists; a shard stream has neither: train on the folder")
    for part, overrides in cfg.arch.items():
        need(part in ARCH_PARTS, f"[arch.{part}]: unknown part; use {', '.join(ARCH_PARTS)}")
        known = {f.name for f in dataclasses.fields(ARCH_PARTS[part])}
        for k in overrides:
            need(k in known, f"arch.{part}.{k}: no such field{_suggest(k, known)}")
    if cfg.kind == "lora":
        need(bool(cfg.init_from), "a LoRA is trained on a model: pass --model, e.g. --model sd15.safetensors")
        need(not (cfg.vae or cfg.text_encoder), "lora uses its model's own VAE and text encoder; drop vae and "
             "text_encoder (bake another VAE into the model file first if you need one)")
        need(cfg.lora_rank >= 1, f"lora_rank must be at least 1, got {cfg.lora_rank}")
        need(cfg.lora_alpha > 0, f"lora_alpha must be positive, got {cfg.lora_alpha}")
    if cfg.kind == "lcm":
        need(bool(cfg.init_from), "LCM distils a model: pass the teacher with --model, e.g. --model emoji")
        need(not (cfg.vae or cfg.text_encoder), "lcm uses its teacher's own VAE and text encoder; drop vae and "
             "text_encoder")
        need(cfg.lora_rank >= 0, f"lora_rank must be 0 (the whole U-Net) or a LoRA rank >= 1, got {cfg.lora_rank}")
        need(cfg.lora_alpha > 0, f"lora_alpha must be positive, got {cfg.lora_alpha}")
        need(0.0 <= cfg.w_min <= cfg.w_max, f"the guidance range needs 0 <= w_min <= w_max, got w_min {cfg.w_min}, "
             f"w_max {cfg.w_max}")
        need(cfg.num_ddim_timesteps >= 1, f"num_ddim_timesteps must be at least 1, got {cfg.num_ddim_timesteps}")
        need(0.0 <= cfg.target_decay < 1.0, f"target_decay must be in [0, 1), got {cfg.target_decay}")
        need(cfg.huber_c > 0, f"huber_c must be positive, got {cfg.huber_c}")
        need(not (cfg.w_embedding and cfg.lora_rank), "w_embedding adds a layer to the U-Net, which an LCM-LoRA "
             "can't; drop --w-embedding or use --lora-rank 0")
        need(not (cfg.init_student and cfg.lora_rank), "init_student starts a whole-U-Net student; an LCM-LoRA "
             "starts from zero: drop --init-student or use --lora-rank 0")
    if cfg.kind == "embedding":
        need(bool(cfg.init_from), "an embedding is trained for a model: pass --model, e.g. --model sd15.safetensors")
        need(bool(cfg.token.strip()), "pass the new word with --token, e.g. --token mycat")
        need(1 <= cfg.vectors <= 75, f"vectors must be between 1 and 75 (a chunk's token places), got {cfg.vectors}")
        need(not (cfg.vae or cfg.text_encoder), "embedding uses its model's own VAE and text encoder; drop vae and "
             "text_encoder")
    if cfg.kind == "controlnet":
        need(bool(cfg.init_from), "a ControlNet is trained for a model: pass --model, e.g. --model emoji")
        need(not (cfg.vae or cfg.text_encoder), "controlnet uses its model's own VAE and text encoder; drop vae and "
             "text_encoder")
        need(cfg.condition in ("silhouette", "canny", "edges"),
             f"condition must be silhouette, canny or edges, got {cfg.condition!r}")
        need(0.0 <= cfg.shape_augment <= 1.0, f"shape_augment is a probability, got {cfg.shape_augment}")
        need(0.0 <= cfg.shape_mix <= 1.0, f"shape_mix is a probability, got {cfg.shape_mix}")
        need(cfg.high_noise_weight == 0 or cfg.high_noise_weight >= 1,
             f"high_noise_weight caps the 1/SNR weight: 0 (off) or at least 1, got {cfg.high_noise_weight}")
        need(cfg.shape_augment > 0 or cfg.shape_mix > 0 or not cfg.shape_augment_silhouettes,
             "shape_augment_silhouettes chooses masks for shape_augment; set shape_augment too, e.g. 0.6")
        need(cfg.shape_augment == 0.0 or cfg.condition == "silhouette",
             "shape_augment cuts images into random shapes for silhouette maps; drop it for canny/edges")
        need(cfg.shape_mix == 0.0 or cfg.condition == "silhouette",
             "shape_mix moves images into random shapes for silhouette maps; drop it for canny/edges")
    if cfg.kind == "taesd":
        need(bool(cfg.init_from), "a tiny autoencoder is distilled from a model's VAE: pass --model, "
             "e.g. --model emoji")
        need(cfg.taesd_width >= 1, f"taesd_width must be at least 1, got {cfg.taesd_width}")
        need(set(cfg.taesd_parts.replace(" ", "").split(",")) in ({"encoder", "decoder"}, {"decoder"}, {"encoder"}),
             f"taesd_parts must be encoder,decoder or decoder, got {cfg.taesd_parts!r}")
    if cfg.vocab == "data":
        need(cfg.kind == "unet" and not cfg.init_from and not cfg.text_encoder,
             "vocab = data sizes a text encoder trained from scratch; drop it with --init-from or --text-encoder")
    for t in cfg.caption_templates:
        need(t.count("{caption}") == 1, f"caption template {t!r} must contain {{caption}} exactly once")
        try:
            t.format(caption="x", a="a")
        except (KeyError, IndexError, ValueError) as e:
            raise TrainError(f"caption template {t!r}: only the fields {{caption}} and {{a}} are allowed "
                             f"(write {{{{ and }}}} for braces): {e!r}") from None
    if cfg.freeze_encoder:
        need(cfg.kind == "vae" and bool(cfg.init_from),
             "freeze_encoder keeps a trained encoder: pass the VAE to continue with --init-from RUN_DIR|MODEL")
    if cfg.init_from:
        need(not any(cfg.arch.values()), f"the architecture comes from init_from {cfg.init_from!r}; "
             "drop the arch overrides")


def _suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------- architecture


def base_model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset with ``cfg.arch`` overrides applied (before the trainers tie the parts together)."""
    base = TRAIN_PRESETS[cfg.model]
    return base.replace(**{part: dataclasses.replace(getattr(base, part), **cfg.arch.get(part, {}))
                           for part in ARCH_PARTS})


def arch_differences(old: ModelConfig, new: ModelConfig, parts: typing.Iterable[str]) -> list[str]:
    """'unet.model_channels: 32 (run) != 64 (now)' for every architecture field that differs."""
    diffs = []
    for part in parts:
        a, b = dataclasses.asdict(getattr(old, part)), dataclasses.asdict(getattr(new, part))
        for k in a:
            if k in ("scale_factor", "latents_mean", "latents_std"):  # measured from the data, not architecture
                continue
            if a[k] != b.get(k):
                diffs.append(f"{part}.{k}: {a[k]!r} in the run, {b.get(k)!r} now")
    return diffs


def parse_arch_override(text: str) -> tuple[str, str, Any]:
    """'unet.channel_mult=1,2,4' -> ('unet', 'channel_mult', (1, 2, 4)), typed by the config field."""
    key, sep, raw = text.partition("=")
    part, dot, name = key.strip().partition(".")
    if not sep or not dot:
        raise TrainError(f"--arch {text!r}: expected PART.FIELD=VALUE, e.g. unet.model_channels=64")
    if part not in ARCH_PARTS:
        raise TrainError(f"--arch {text!r}: unknown part {part!r}; use {', '.join(ARCH_PARTS)}")
    hints = typing.get_type_hints(ARCH_PARTS[part])
    if name not in hints:
        raise TrainError(f"--arch {text!r}: {part} has no field {name!r}{_suggest(name, hints)}")
    return part, name, _parse_value(raw.strip(), hints[name], f"--arch {key}")


def _parse_value(raw: str, tp: Any, what: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin in (typing.Union, types.UnionType):
            if raw.lower() == "none" and type(None) in args:
                return None
            return _parse_value(raw, next(a for a in args if a is not type(None)), what)
        if origin is tuple:
            return tuple(_parse_value(v.strip(), args[0], what) for v in raw.split(",") if v.strip())
        if origin is Literal:
            if raw not in args:
                raise ValueError(f"choose one of {', '.join(map(str, args))}")
            return raw
        if tp is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1", "yes")
        return tp(raw)
    except (ValueError, TypeError) as e:
        raise TrainError(f"{what}={raw!r}: {e}") from None


# ---------------------------------------------------------------- TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if v is None:
        return '"none"'  # TOML has no null; read back by _coerce
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: TrainConfig) -> str:
    lines = ["# ldmkit training run; edit and pass with --config, or resume with --resume RUN_DIR"]
    for f in dataclasses.fields(TrainConfig):
        if f.name != "arch":
            lines.append(f"{f.name} = {_toml_value(getattr(cfg, f.name))}")
    for part, overrides in cfg.arch.items():
        if overrides:
            lines += ["", f"[arch.{part}]"] + [f"{k} = {_toml_value(v)}" for k, v in overrides.items()]
    return "\n".join(lines) + "\n"


def _coerce(value: Any, tp: Any, what: str) -> Any:
    """A TOML value as the dataclass field type (tuples from arrays, None from "none")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value == "none" and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list):
        return value
    if origin is Literal:
        return value
    expected = tp if isinstance(tp, type) else None
    if expected is not None and not isinstance(value, expected):
        raise TrainError(f"{what}: expected {expected.__name__}, got {value!r}")
    return value


def from_mapping(d: dict[str, Any], base: TrainConfig, source: str) -> TrainConfig:
    """``base`` with the settings in ``d`` (a parsed TOML document) applied."""
    hints = field_types()
    changes: dict[str, Any] = {}
    for k, v in d.items():
        if k not in hints:
            raise TrainError(f"{source}: unknown setting {k!r}{_suggest(k, hints)}")
        if k == "arch":
            if not isinstance(v, dict):
                raise TrainError(f"{source}: arch must be a table ([arch.unet] ...)")
            arch = {p: dict(o) for p, o in base.arch.items()}
            for part, overrides in v.items():
                if part not in ARCH_PARTS:
                    raise TrainError(f"{source}: [arch.{part}]: unknown part; use {', '.join(ARCH_PARTS)}")
                part_hints = typing.get_type_hints(ARCH_PARTS[part])
                for name, value in overrides.items():
                    if name not in part_hints:
                        raise TrainError(f"{source}: arch.{part}.{name}: no such field{_suggest(name, part_hints)}")
                    arch.setdefault(part, {})[name] = _coerce(value, part_hints[name], f"{source}: arch.{part}.{name}")
            changes["arch"] = arch
        else:
            changes[k] = _coerce(v, hints[k], f"{source}: {k}")
    return base.replace(**changes)


def load_toml(path: str | Path, base: TrainConfig) -> TrainConfig:
    p = Path(path)
    try:
        d = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise TrainError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainError(f"{p}: invalid TOML ({e})") from None
    return from_mapping(d, base, str(p))
