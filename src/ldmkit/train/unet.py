"""Latent diffusion training (Rombach et al. 2022): a U-Net denoising VAE latents, conditioned on a
text encoder trained jointly from scratch (as in the LDM paper) or loaded and frozen.

A run folder is self-contained once started: ``vae.safetensors`` (the VAE, its config and latent
scale factor in the metadata), ``latents.safetensors`` (the posterior of every training image,
encoded once), ``text_encoder.safetensors`` for a frozen text encoder, and ``checkpoint.pt``.
So ``--resume`` needs neither the dataset nor the VAE run.

Fine-tuning (``init_from``): the U-Net, its architecture, noise schedule and prediction type, the
VAE and the text encoder (trained jointly unless ``text_encoder`` names a frozen one) come from a
Stable Diffusion model instead of a preset and random weights. Its config is kept in
``init_model.json``, so a resumed run needs neither the model file (the checkpoint has the weights).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit import latent_norm
from ldmkit.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldmkit.data.datasets import encode_in_batches
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import UNetModel
from ldmkit.models.vae import AutoencoderKL
from ldmkit.schedules import sd_alphas_cumprod
from ldmkit.train.config import TrainConfig, TrainError, base_model_config
from ldmkit.train.data import flip_allowed, load_dataset, save_grid, split_holdout
from ldmkit.train.run_record import fingerprint, keep_record
from ldmkit.train.runner import CHECKPOINT, DistInfo, rng_unchanged
from ldmkit.train.sources import load_init_model, load_model, load_vae_source
from ldmkit.train.stream import (
    STREAM_FILE,
    is_streamed,
    read_stream,
    stream_batch,
    stream_head,
    stream_source,
    write_stream_file,
)

VAE_FILE = "vae.safetensors"
LATENTS_FILE = "latents.safetensors"
TEXT_FILE = "text_encoder.safetensors"
INIT_FILE = "init_model.json"
VAE_KEY, TEXT_KEY = "ldmkit.vae_config", "ldmkit.text_config"


class _Shared:
    """Holds a module outside its owner's parameters, state dict and DDP; deepcopy shares it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


def copy_sharing_frozen(net: nn.Module, model: nn.Module, memo: dict) -> Any:
    """``copy.deepcopy(net)`` for a trainer's net around the frozen ``model`` (LoRA, LCM-LoRA, embedding): the copy
    shares the model's frozen tensors and tokenizer(s) and copies only what trains, or the runner's EMA copy would
    duplicate the whole model."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not t.requires_grad:
            memo[id(t)] = t
    for tok in getattr(model, "tokenizers", [model.tokenizer]):
        memo[id(tok)] = tok
    new = type(net).__new__(type(net))
    memo[id(net)] = new
    new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in net.__dict__.items()})
    return new


class LatentDiffusionNet(nn.Module):
    """U-Net (+ trainable text encoder) with the denoising loss as its forward."""

    # > 0 (train controlnet's high_noise_weight = g): each sample's MSE times clamp(1/SNR(t), 1, g)
    high_noise_weight: float = 0.0

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextModel, train_text: bool, clip_skip: int,
                 alphas_cumprod: Tensor, objective: str):
        super().__init__()
        self.unet = unet
        if train_text:
            self.text_encoder = text_encoder
        else:
            self.frozen_text = _Shared(text_encoder.requires_grad_(False).eval())
        self.clip_skip, self.objective = clip_skip, objective
        self.register_buffer("sqrt_ab", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_1mab", (1 - alphas_cumprod).sqrt().float(), persistent=False)

    @property
    def text(self) -> CLIPTextModel:
        return self.text_encoder if hasattr(self, "text_encoder") else self.frozen_text.module

    def encode_text(self, ids: Tensor) -> Tensor:
        if hasattr(self, "text_encoder"):
            return self.text_encoder(ids, clip_skip=self.clip_skip)
        with torch.no_grad():
            return self.frozen_text.module(ids, clip_skip=self.clip_skip)

    def forward(self, latents: Tensor, ids: Tensor, t: Tensor, noise: Tensor, hint: Tensor | None = None,
                controlnet: nn.Module | None = None) -> tuple[Tensor, dict]:
        """DDPM forward process x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, then MSE on eps or
        v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022). With ``controlnet`` (``train controlnet``)
        its residuals for the control map ``hint`` are added to the U-Net's skips and middle."""
        a, s = self.sqrt_ab[t].view(-1, 1, 1, 1), self.sqrt_1mab[t].view(-1, 1, 1, 1)
        x_t = a * latents + s * noise
        context = self.encode_text(ids)
        control = controlnet(x_t, hint, t, context) if controlnet is not None else None
        pred = self.unet(x_t, t, context, control=control)
        target = noise if self.objective == "eps" else a * noise - s * latents
        if self.high_noise_weight:  # eps: the x0-space error (|x0 err|^2 = |eps err|^2 / SNR) where 1 <= 1/SNR <= g
            w = (s / a).square().flatten().clamp(1.0, self.high_noise_weight)
            return ((pred.float() - target.float()).square().mean((1, 2, 3)) * w).mean(), {}
        return F.mse_loss(pred.float(), target.float()), {}


# ---------------------------------------------------------------- run-folder files


def check_size(size: int, vae_cfg: VAEConfig, unet_cfg: UNetConfig) -> None:
    latent = size // vae_cfg.downscale
    if latent % 2 ** (len(unet_cfg.channel_mult) - 1):
        raise TrainError(f"size {size} gives {latent}-px latents, which the U-Net's "
                         f"{len(unet_cfg.channel_mult)} levels can't halve evenly; use a multiple of "
                         f"{vae_cfg.downscale * 2 ** (len(unet_cfg.channel_mult) - 1)}")


def read_init_config(run_dir: Path) -> ModelConfig:
    path = run_dir / INIT_FILE
    if not path.exists():
        raise TrainError(f"{run_dir} was not started from a model (no {INIT_FILE}); resume it without --init-from")
    return ModelConfig.from_json(path.read_text())


def resolve_objective(cfg: TrainConfig, init: ModelConfig | None) -> str:
    """``auto``: what the model being fine-tuned predicts (eps from scratch)."""
    if cfg.objective != "auto":
        return cfg.objective
    return init.prediction if init is not None else "eps"


def _config_json(c: Any) -> str:
    return json.dumps(dataclasses.asdict(c))


def _config_from_json(cls: type, text: str) -> Any:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})


def read_vae_file(run_dir: Path) -> tuple[VAEConfig, dict[str, Tensor]]:
    from ldmkit.checkpoint import read_safetensors

    sd, meta = read_safetensors(run_dir / VAE_FILE)
    return _config_from_json(VAEConfig, meta[VAE_KEY]), sd


def read_text_file(run_dir: Path) -> tuple[TextEncoderConfig, dict[str, Tensor], dict[str, str]]:
    from ldmkit.checkpoint import read_safetensors

    sd, meta = read_safetensors(run_dir / TEXT_FILE)
    return _config_from_json(TextEncoderConfig, meta[TEXT_KEY]), sd, meta


def build_latent_cache(vae: AutoencoderKL, images: Tensor, flip: bool, batch: int = 32) -> dict[str, Tensor]:
    """Posterior mean and std of every image (and of its mirror image when ``flip``), float32 on CPU."""
    device = next(vae.parameters()).device

    def posterior(x: Tensor) -> dict[str, Tensor]:
        mean, logvar = vae.encode(x.to(device))
        return {"mean": mean, "std": torch.exp(0.5 * logvar)}

    return encode_in_batches(lambda a, b: images[a:b].float().div(127.5).sub(1.0), len(images), posterior,
                             flip=flip, batch_size=batch)


def _posterior_samples(cache: dict[str, Tensor], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=g)


def measure_scale_factor(cache: dict[str, Tensor], seed: int) -> float:
    """1 / std of posterior samples, as SD chose 0.18215, so the U-Net sees unit-variance latents."""
    return float(1.0 / _posterior_samples(cache, seed).double().std())


def measure_latent_norm(cache: dict[str, Tensor], seed: int, how: str) -> dict[str, Any]:
    """The VAEConfig fields that normalise the U-Net's latents, measured on the same seeded posterior draw:
    ``scale``: scale_factor = 1 / std; ``channel``: per-channel latents_mean / latents_std (unbiased, as
    torch.std) with scale_factor 1, so the U-Net sees every channel at zero mean and unit variance."""
    if how == "scale":
        return {"scale_factor": measure_scale_factor(cache, seed)}
    z = _posterior_samples(cache, seed).double().transpose(0, 1).flatten(1)  # (C, N*h*w)
    return {"scale_factor": 1.0, "latents_mean": tuple(z.mean(1).tolist()), "latents_std": tuple(z.std(1).tolist())}


def _cache_source(cfg: TrainConfig) -> str:
    """What the cached files were made from; a fresh run reuses them only when this matches."""
    keys = ("data", "vae", "text_encoder", "init_from", "size", "flip", "holdout", "seed")
    # latent_norm: the VAE file keeps the measured normalisation (named only when not the default, so
    # files made before the option still match)
    keys += ("latent_norm",) if cfg.latent_norm != "scale" else ()
    return json.dumps({k: getattr(cfg, k) for k in keys})


@rng_unchanged()  # the RNG stream must not depend on whether the cache was built in this process
def prepare_files(cfg: TrainConfig, run_dir: Path, device: torch.device, init: Any = None,
                   vae_file: bool = True) -> None:
    """First start of a run (rank 0): copy the VAE and text encoder in, encode the dataset once.

    ``init`` is the loaded ``init_from`` model, whose VAE is used unless ``cfg.vae`` names another.
    Files left by an earlier start that never reached a checkpoint are reused when they were made
    from the same settings (encoding a large dataset is slow), and replaced otherwise.
    """
    from ldmkit.checkpoint import atomic_save_safetensors, read_safetensors

    if not (run_dir / CHECKPOINT).exists() and (run_dir / LATENTS_FILE).exists():
        if read_safetensors(run_dir / LATENTS_FILE)[1].get("source") != _cache_source(cfg):
            for name in (LATENTS_FILE, VAE_FILE, TEXT_FILE):
                (run_dir / name).unlink(missing_ok=True)
    if not (run_dir / CHECKPOINT).exists() and stream_source(run_dir) not in (None, _cache_source(cfg)):
        for name in (STREAM_FILE, VAE_FILE, TEXT_FILE):
            (run_dir / name).unlink(missing_ok=True)
    if cfg.text_encoder and not (run_dir / TEXT_FILE).exists():
        same = init is not None and cfg.text_encoder == cfg.init_from
        model = init if same else load_model(cfg.text_encoder, "--text-encoder")
        meta = {TEXT_KEY: _config_json(model.cfg.text), "clip_skip": str(model.cfg.clip_skip),
                "pad_with_eos": json.dumps(model.cfg.pad_with_eos), "source": cfg.text_encoder}
        atomic_save_safetensors(model.text_encoder.state_dict(), run_dir / TEXT_FILE, meta)
    if (run_dir / LATENTS_FILE).exists() or (run_dir / STREAM_FILE).exists():
        return
    if init is not None and not cfg.vae:
        vae_cfg, vae_sd, fresh = init.cfg.vae, init.vae.state_dict(), False
    else:
        vae_cfg, vae_sd, fresh = load_vae_source(cfg.vae)
    streamed = is_streamed(cfg)
    if streamed:  # its first samples give the scale factor and sample prompts; batches are encoded as they come
        train = stream_head(cfg)
        held = train.subset([])
    else:
        data = load_dataset(cfg.data, cfg.size)
        train, held = split_holdout(data, cfg.data, cfg.holdout)
    if cfg.size % vae_cfg.downscale:
        raise TrainError(f"size {cfg.size} is not a multiple of the VAE's downscale factor {vae_cfg.downscale}")
    vae = AutoencoderKL(vae_cfg)
    vae.load_state_dict(vae_sd)
    cache = build_latent_cache(vae.to(device).eval(), train.images, cfg.flip)
    if fresh or (cfg.latent_norm == "channel" and init is None):  # a trained model's own normalisation is kept
        vae_cfg = dataclasses.replace(vae_cfg, **measure_latent_norm(cache, cfg.seed, cfg.latent_norm))
    if vae_file:
        atomic_save_safetensors(vae.state_dict(), run_dir / VAE_FILE, {VAE_KEY: _config_json(vae_cfg)})
    prompts = [c for c in dict.fromkeys(held.captions + train.captions) if c][:4] or [""]
    if streamed:
        write_stream_file(cfg, run_dir, prompts, _cache_source(cfg))
        return
    meta = {"captions": json.dumps(train.captions), "keys": json.dumps(train.keys),
            "sample_prompts": json.dumps(prompts), "size": str(cfg.size), "source": _cache_source(cfg)}
    if train.caption_lists is not None:  # metadata.jsonl's "captions", for caption_choice = random
        meta["caption_lists"] = json.dumps(train.caption_lists)
    if train.weights is not None:  # its "weight"s, for balanced sampling
        meta["weights"] = json.dumps(train.weights.tolist())
    atomic_save_safetensors(cache, run_dir / LATENTS_FILE, meta)


def apply_template(template: str, caption: str) -> str:
    """``template`` with ``{caption}`` and its article ``{a}`` filled in ("a red apple", "an apple")."""
    article = "an" if caption[:1].lower() in "aeiou" and caption[:1] else "a"
    return template.format(caption=caption, a=article)


def compact_vocab(ids: Tensor, vocab_size: int) -> Tensor:
    """A token map for ``vocab = data``: every id in ``ids`` gets its own row (1, 2, ... in id order), all
    other ids share row 0. ``ids`` are the tokenized captions, so start/end/padding ids are among them."""
    used = torch.unique(ids)
    token_map = torch.zeros(vocab_size, dtype=torch.long)
    token_map[used] = torch.arange(1, len(used) + 1)
    return token_map


# ---------------------------------------------------------------- the task


class UNetTask:
    arch_parts = ("unet", "text", "vae")

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: DistInfo):
        from ldmkit.checkpoint import atomic_write_text

        self.cfg, self.run_dir, self.device = cfg, run_dir, d.device
        init = load_init_model(cfg, run_dir)  # every rank: each starts from the model's weights
        if d.is_main:
            if init is not None:
                atomic_write_text(run_dir / INIT_FILE, init.cfg.to_json())
            prepare_files(cfg, run_dir, d.device, init)
        d.barrier()
        vae_cfg, _ = read_vae_file(run_dir)
        self.read_latents()
        init_cfg = read_init_config(run_dir) if cfg.init_from else None

        train_text = not cfg.text_encoder
        if not train_text:
            text_cfg, text_sd, text_meta = read_text_file(run_dir)
            clip_skip, pad_with_eos = int(text_meta["clip_skip"]), json.loads(text_meta["pad_with_eos"])
        elif init_cfg is not None:
            text_cfg, clip_skip, pad_with_eos = init_cfg.text, init_cfg.clip_skip, init_cfg.pad_with_eos
        else:
            text_cfg, clip_skip, pad_with_eos = base_model_config(cfg).text, 1, True
        tied = {"in_channels": vae_cfg.z_channels, "out_channels": vae_cfg.z_channels, "context_dim": text_cfg.width}
        if init_cfg is not None:
            unet_cfg = init_cfg.unet
            wrong = {k: getattr(unet_cfg, k) for k, v in tied.items() if getattr(unet_cfg, k) != v}
            if wrong:
                raise TrainError(f"--init-from {cfg.init_from}: its U-Net ({wrong}) does not fit the VAE/text "
                                 f"encoder, which need {tied}; inpainting models can't be fine-tuned here")
        else:
            for k, v in tied.items():
                given = cfg.arch.get("unet", {}).get(k)
                if given is not None and given != v:
                    raise TrainError(f"arch.unet.{k}={given} contradicts the VAE/text encoder, which need {v}")
            unet_cfg = dataclasses.replace(base_model_config(cfg).unet, **tied)
        check_size(cfg.size, vae_cfg, unet_cfg)
        objective = resolve_objective(cfg, init_cfg)
        # a fine-tuned model keeps its family (the file layout export writes) and noise schedule
        start = init_cfg or ModelConfig(name=run_dir.name, family="custom", unet=unet_cfg, vae=vae_cfg, text=text_cfg)
        self.model_cfg = start.replace(name=run_dir.name, unet=unet_cfg, vae=vae_cfg, text=text_cfg,
                                       prediction=objective, clip_skip=clip_skip, pad_with_eos=pad_with_eos,
                                       extra={"image_size": cfg.size})
        self.tokenize(CLIPTokenizer.default(pad_with_eos, text_cfg.max_positions))
        token_map = None
        if cfg.vocab == "data":
            token_map = compact_vocab(torch.cat([self.ids.flatten(0, 1), self.empty_ids[None]]), text_cfg.vocab_size)
            text_cfg = dataclasses.replace(text_cfg, token_rows=int(token_map.max()) + 1)
            self.model_cfg = self.model_cfg.replace(text=text_cfg)

        # fine-tuning starts from the model's modules; a resumed run's weights come from its checkpoint
        unet = init.unet.requires_grad_(True) if init is not None else UNetModel(unet_cfg)
        text = init.text_encoder if init is not None and train_text else CLIPTextModel(text_cfg)
        if not train_text:
            text.load_state_dict(text_sd)
            text.to(d.device)
        if token_map is not None:
            text.text_model.embeddings.token_map.copy_(token_map)
            with torch.no_grad():  # the shared row of words never seen in training: blank, not noise
                text.text_model.embeddings.token_embedding.weight[0].zero_()
        unet.gradient_checkpointing = text.gradient_checkpointing = cfg.gradient_checkpointing
        ac = sd_alphas_cumprod(self.model_cfg.num_train_timesteps, self.model_cfg.beta_start, self.model_cfg.beta_end)
        self.net = LatentDiffusionNet(unet, text.requires_grad_(train_text), train_text, clip_skip, ac, objective)
        self._viewer: Any = None

    def start_from_model(self, model: Any, d: DistInfo, run_file: str, command: str, settings: dict[str, Any],
                         check: Callable[[dict, dict, Path], None]) -> None:
        """The start of a trainer on a model's frozen weights (LoRA, LCM, embedding): the image size checked
        against the model, the run record kept (:func:`~ldmkit.train.run_record.keep_record`: the model's path
        and weight fingerprint, then ``settings``, which ``check`` compares on resume), the training images
        encoded once by the model's own VAE (main rank), then read by every rank."""
        cfg, run_dir = self.cfg, self.run_dir
        check_size(cfg.size, model.cfg.vae, model.cfg.unet)
        record = {"init_from": cfg.init_from, "fingerprint": fingerprint(model), **settings}
        keep_record(run_dir, run_file, record, command, check, d.is_main)
        if d.is_main:
            prepare_files(cfg, run_dir, d.device, model, vae_file=False)  # the model's VAE encodes the data
        d.barrier()
        self.read_latents()

    def read_latents(self) -> None:
        """The encoded training set (``latents.safetensors``), its captions and sample prompts."""
        from ldmkit.checkpoint import read_safetensors

        cfg, run_dir = self.cfg, self.run_dir
        if (run_dir / STREAM_FILE).exists():
            return read_stream(self)
        self.cache, meta = read_safetensors(run_dir / LATENTS_FILE)
        self.captions: list[str] = json.loads(meta["captions"])
        self.sample_prompts = cfg.sample_prompts or json.loads(meta["sample_prompts"])
        if int(meta["size"]) != cfg.size:
            raise TrainError(f"{run_dir}: its latents were encoded at size {meta['size']}, not {cfg.size}; "
                             "start a new run to train at another size")
        self.train_size = len(self.captions)
        self.caption_lists: list[list[str]] | None = json.loads(meta["caption_lists"]) if "caption_lists" in meta \
            else None
        self.sample_weights = torch.tensor(json.loads(meta["weights"]), dtype=torch.float64) if "weights" in meta \
            else None
        if cfg.caption_choice == "random":
            if self.caption_lists is None:
                raise TrainError(f"{run_dir}: caption_choice = random needs a \"captions\" list per image in "
                                 "metadata.jsonl (`ldmkit data emoji --augment-captions` writes them), and a run "
                                 "started on such data; or use caption_choice = first")
            # no image is mirrored when any of its captions says left or right
            self.flippable = torch.tensor([all(flip_allowed(c) for c in cs) for cs in self.caption_lists])
        else:
            self.flippable = torch.tensor([flip_allowed(c) for c in self.captions])
        self.flip = cfg.flip and "mean_flip" in self.cache
        if cfg.flip and not self.flip:
            warnings.warn(f"{run_dir}: its latents were cached without mirror images; training without flips",
                          stacklevel=2)

    def tokenize(self, tokenizer: CLIPTokenizer) -> None:
        """Token ids of every caption in every template: ``self.ids`` is (templates, captions, context).
        With caption_choice = random, every caption of every image's list, image i's at rows
        ``caption_start[i]`` to ``caption_start[i] + caption_count[i] - 1``."""
        self.tokenizer = tokenizer
        self.caption_start = self.caption_count = None
        if not self.captions:  # streamed: captions are tokenized per batch
            self.empty_ids = tokenizer([""])[0]
            return
        captions = self.captions
        if self.cfg.caption_choice == "random" and getattr(self, "caption_lists", None) is not None:
            lists = self.caption_lists
            self.caption_count = torch.tensor([len(cs) for cs in lists])
            self.caption_start = torch.cumsum(self.caption_count, 0) - self.caption_count
            captions = [c for cs in lists for c in cs]
        templates = self.cfg.caption_templates or ["{caption}"]
        texts = [[apply_template(t, c) if c else "" for c in captions] for t in templates]
        longest = max(len(tokenizer.encode(x)) for row in texts for x in row) + 2  # + start/end
        if longest > tokenizer.context_length:
            warnings.warn(f"the longest templated caption has {longest} tokens; the text encoder's context "
                          f"is {tokenizer.context_length}, so it is cut (raise arch.text.max_positions)",
                          stacklevel=2)
        self.ids = torch.stack([tokenizer(row) for row in texts])
        self.empty_ids = tokenizer([""])[0]

    def draw_flips(self, idx: Tensor, gen: torch.Generator) -> Tensor | None:
        """Which images of ``idx`` are mirrored in this batch (None when the run does not flip)."""
        return ((torch.rand(len(idx), generator=gen) < 0.5) & self.flippable[idx]) if self.flip else None

    def sample_latents(self, idx: Tensor, gen: torch.Generator, flips: Tensor | None = None) -> Tensor:
        """Scaled latents of the images ``idx``: a posterior sample of each (or of its mirror image).
        ``flips``: already drawn by :meth:`draw_flips` (a trainer that mirrors something else too)."""
        mean, std = self.cache["mean"][idx], self.cache["std"][idx]
        if self.flip:
            flip = (self.draw_flips(idx, gen) if flips is None else flips)[:, None, None, None]
            mean = torch.where(flip, self.cache["mean_flip"][idx], mean)
            std = torch.where(flip, self.cache["std_flip"][idx], std)
        return latent_norm.to_unet(self.model_cfg.vae, mean + std * torch.randn(mean.shape, generator=gen))

    def caption_rows(self, idx: Tensor, gen: torch.Generator) -> Tensor:
        """Which caption of each image of ``idx`` trains (rows of ``self.ids``): its own (caption_choice =
        first, no draw) or one of its list, uniformly, drawn from the step's generator (random)."""
        if getattr(self, "caption_count", None) is None:  # (a subclass with its own tokenize has none)
            return idx
        count = self.caption_count[idx]
        pick = (torch.rand(len(idx), generator=gen, dtype=torch.float64) * count).long().clamp_max(count - 1)
        return self.caption_start[idx] + pick

    def caption_ids(self, idx: Tensor, gen: torch.Generator, drop: Tensor) -> Tensor:
        """Token ids of the captions of ``idx``, each in a random template; the empty caption where ``drop``."""
        rows = self.caption_rows(idx, gen)
        # one template per sample; no draw without templates, so such runs resume on the same random stream
        many = len(self.ids) > 1
        pick = torch.randint(0, len(self.ids), (len(idx),), generator=gen) if many else torch.zeros_like(idx)
        return torch.where(drop[:, None], self.empty_ids, self.ids[pick, rows])

    def draw_timesteps(self, b: int, gen: torch.Generator) -> Tensor:
        """``b`` training timesteps (``timestep_sampling``): uniform, one ``randint`` draw as always; cubic
        (T2I-Adapter), ``floor(T (1 - u^3))`` of one ``rand`` draw, clamped to T - 1."""
        n = self.model_cfg.num_train_timesteps
        if getattr(self.cfg, "timestep_sampling", "uniform") == "uniform":
            return torch.randint(0, n, (b,), generator=gen)
        u = torch.rand(b, generator=gen)
        return ((1.0 - u**3) * n).long().clamp(0, n - 1)

    def make_batch(self, idx: Tensor, gen: torch.Generator, step: int, flips: Tensor | None = None) -> dict[str, Any]:
        if isinstance(idx, list):  # samples streamed from tar shards
            return stream_batch(self, idx, gen)
        b = len(idx)
        latents = self.sample_latents(idx, gen, flips)
        t = self.draw_timesteps(b, gen)
        noise = torch.randn(latents.shape, generator=gen)
        drop = torch.rand(b, generator=gen) < self.cfg.caption_dropout
        ids = self.caption_ids(idx, gen, drop)
        return {"latents": latents, "ids": ids, "t": t, "noise": noise}

    def viewer(self, eval_net: nn.Module) -> Any:
        """A StableDiffusion around the EMA networks, for ldmkit.pipeline."""
        assert isinstance(eval_net, LatentDiffusionNet)
        if self._viewer is None:
            from ldmkit.model import StableDiffusion

            with torch.device("meta"):
                sd = StableDiffusion(self.model_cfg, tokenizer=self.tokenizer)
            vae_cfg, vae_sd = read_vae_file(self.run_dir)
            sd.vae = AutoencoderKL(vae_cfg)
            sd.vae.load_state_dict(vae_sd)
            sd.vae.to(self.device).eval()
            sd.unet, sd.text_encoder = eval_net.unet, eval_net.text
            self._viewer = sd
        return self._viewer

    def evaluate(self, eval_net: nn.Module, step: int) -> dict[str, float]:
        """A grid of the sample prompts, generated with the EMA weights."""
        from ldmkit.pipeline import GenerationParams, txt2img

        model = self.viewer(eval_net)
        images = []
        for i, prompt in enumerate(self.sample_prompts):
            params = GenerationParams(prompt=prompt, steps=self.cfg.sample_steps, cfg_scale=self.cfg.sample_cfg_scale,
                                      seed=self.cfg.seed + i, width=self.cfg.size, height=self.cfg.size)
            images += txt2img(model, params)
        save_grid(images, min(4, len(images)), self.run_dir / "samples" / f"step_{step:07d}.png")
        return {}

    def state(self) -> dict[str, Any]:
        vae = self.model_cfg.vae
        norm = {"latents_mean": vae.latents_mean, "latents_std": vae.latents_std} if vae.latents_mean else {}
        return {"scale_factor": vae.scale_factor, **norm}
