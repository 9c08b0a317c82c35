"""Builders for the reference implementations (diffusers, transformers) with ldmkit's configs."""

from __future__ import annotations

from pathlib import Path

import torch

from ldmkit import convert
from ldmkit.config import ModelConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the parity targets are stated in."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def diffusers_unet(cfg: ModelConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**convert.diffusers_unet_config(cfg.unet)).eval()
    _perturb_norms(unet)
    return unet


def diffusers_vae(cfg: ModelConfig, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**convert.diffusers_vae_config(cfg.vae)).eval()
    _perturb_norms(vae)
    return vae


def hf_text_encoder(cfg: ModelConfig, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**convert.hf_text_config(cfg.text))).eval()
    _perturb_norms(model)
    return model


def _perturb_norms(model: torch.nn.Module) -> None:
    """Fresh norms are exactly 1/0; randomise them so a swapped or missing norm can't hide."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.add_(0.1 * torch.randn(p.shape, generator=g))


def hf_tokenizer_files(folder: Path, pad_with_eos: bool = True) -> None:
    """Write a transformers CLIPTokenizer to ``folder`` from the vendored BPE vocabulary."""
    from transformers import CLIPTokenizer

    from ldmkit.models.tokenizer import CLIPTokenizer as Ours

    ours = Ours.default(pad_with_eos=pad_with_eos)
    ours.save(folder)
    # reload and resave through transformers so the files are exactly what it writes
    tok = CLIPTokenizer.from_pretrained(folder)
    tok.save_pretrained(folder)


def save_diffusers_pipeline(cfg: ModelConfig, folder: Path, scheduler=None, seed: int = 0):
    """A random StableDiffusionPipeline of ``cfg`` saved by diffusers itself; returns the pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet = diffusers_unet(cfg, seed)
    tok_dir = folder / "_tok"
    hf_tokenizer_files(tok_dir, cfg.pad_with_eos)
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon", timestep_spacing="linspace",
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=diffusers_vae(cfg, seed + 1), text_encoder=hf_text_encoder(cfg, seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def encode_to_posterior_mean(pipe, monkeypatch) -> None:
    """Make a diffusers pipeline's VAE encode images to the posterior's mean, as ldmkit does (diffusers samples
    it with the pipeline's generator): the std is zeroed."""
    original = pipe.vae.encode

    def mean_only(*args, **kwargs):
        out = original(*args, **kwargs)
        out.latent_dist.std = torch.zeros_like(out.latent_dist.std)
        return out

    monkeypatch.setattr(pipe.vae, "encode", mean_only)


def img2img_noise_as_diffusers(monkeypatch) -> None:
    """Give ldmkit's img2img the noise diffusers' seeded generator draws second (its first draw is the posterior
    sample, which :func:`encode_to_posterior_mean` makes irrelevant)."""
    from ldmkit import pipeline as P

    def diffusers_order_noise(seeds, shape, device):
        g = torch.Generator().manual_seed(seeds[0])
        torch.randn((1, *shape), generator=g)  # the posterior sample's draw
        return torch.randn((1, *shape), generator=g)

    monkeypatch.setattr(P, "initial_noise", diffusers_order_noise)
