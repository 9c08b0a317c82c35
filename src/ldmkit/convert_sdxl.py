"""SDXL checkpoint layouts: the single file (Stability's sgm ``conditioner.embedders.*``) and diffusers folders.

Single file::

    model.diffusion_model.*                       U-Net, LDM names (ldmkit's own), with label_emb.0.0/0.2
    first_stage_model.*                           VAE, LDM names
    conditioner.embedders.{i}.transformer.*       CLIP-L in transformers' CLIPTextModel names (base: i = 0)
    conditioner.embedders.{i}.model.*             OpenCLIP bigG (base: i = 1, refiner: i = 0); fused
                                                  attn.in_proj_* and text_projection applied as x @ P

In ldmkit (and a diffusers folder) bigG is transformers' CLIPTextModelWithProjection: q/k/v split and
``text_projection.weight`` = P transposed. Every function fails on keys it does not place, naming them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from . import convert
from .config import SD1_TEXT, SDXL_VAE, TextEncoderConfig, VAEConfig

StateDict = dict[str, Tensor]
EMBEDDERS = "conditioner.embedders."
_PROJ = "text_projection.weight"  # transformers' name, (projection_dim, width)
# sgm buffers that are not weights: the discretised sigmas of its denoiser, OpenCLIP's logit scale
_SKIPPED = re.compile(r"denoiser\.sigmas|conditioner\.embedders\.\d+\.model\.logit_scale"
                      r"|conditioner\.embedders\.\d+\.transformer\.text_model\.embeddings\.position_ids")


def is_sdxl_checkpoint(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(EMBEDDERS) for k in sd)


def split_sdxl_checkpoint(sd: Mapping[str, Tensor]) -> tuple[StateDict, StateDict, list[StateDict], list[str]]:
    """Single SDXL file -> (unet, vae, text encoders in embedder order (ldmkit / transformers names),
    their layouts ("hf" or "openclip")), prefixes stripped. Unknown keys raise."""
    sd = convert._unwrap(sd)
    unet, vae = convert._strip(sd, convert.UNET_PREFIX), convert._strip(sd, convert.VAE_PREFIX)
    embedders: dict[int, StateDict] = {}
    unknown = []
    for key, t in sd.items():
        if key.startswith((convert.UNET_PREFIX, convert.VAE_PREFIX)) or _SKIPPED.fullmatch(key) \
                or convert.is_skipped_ldm_key(key):
            continue
        m = re.match(r"conditioner\.embedders\.(\d+)\.(.+)", key)
        if m is None:
            unknown.append(key)
            continue
        embedders.setdefault(int(m[1]), {})[m[2]] = t
    if unknown:
        raise convert._fail_keys("SDXL single file", "keys that belong to no part", unknown)
    if not unet:
        raise convert._not_sd(sd)
    if sorted(embedders) != list(range(len(embedders))) or not embedders:
        raise ValueError(f"SDXL single file: text encoders conditioner.embedders.{sorted(embedders)}; expected 0..n-1")
    texts, layouts = [], []
    for i in sorted(embedders):
        text, layout = _embedder_to_hf(embedders[i], i)
        texts.append(text)
        layouts.append(layout)
    return unet, vae, texts, layouts


def _embedder_to_hf(e: StateDict, i: int) -> tuple[StateDict, str]:
    hf = convert._strip(e, "transformer.")
    oc = convert._strip(e, "model.")
    stray = [k for k in e if not k.startswith(("transformer.", "model."))]
    if stray or (hf and oc):
        raise convert._fail_keys(f"SDXL text encoder conditioner.embedders.{i}",
                                 "neither CLIP (transformer.*) nor OpenCLIP (model.*) keys", stray or list(e)[:3])
    if hf:
        text = convert.normalize_hf_text(hf)
        proj = text.pop(_PROJ, None)
        convert._check_text(text, _text_config(text, "hf"), f"SDXL CLIP text encoder {i}")
        if proj is not None:
            text[_PROJ] = proj
        return text, "hf"
    cfg = convert._text_config_from_weights(oc, "openclip")
    text, extras = convert.openclip_to_hf_text(oc, cfg)
    if "text_projection" in extras:
        text[_PROJ] = extras["text_projection"].t().contiguous()  # OpenCLIP: x @ P; nn.Linear: x @ W.T
    return text, "openclip"


def join_sdxl_checkpoint(unet: Mapping[str, Tensor], vae: Mapping[str, Tensor], texts: list[Mapping[str, Tensor]],
                         layouts: list[str]) -> StateDict:
    """Inverse of :func:`split_sdxl_checkpoint`: the layout Stability ships and A1111/ComfyUI/diffusers read."""
    out: StateDict = {convert.UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({convert.VAE_PREFIX + k: v for k, v in vae.items()})
    for i, (text, layout) in enumerate(zip(texts, layouts, strict=True)):
        text = convert.normalize_hf_text(text)
        if layout == "hf":
            out.update({f"{EMBEDDERS}{i}.transformer.{k}": v for k, v in text.items()})
            continue
        if layout != "openclip":
            raise ValueError(f"text layout must be 'hf' or 'openclip', got {layout!r}")
        text = dict(text)
        proj = text.pop(_PROJ, None)
        extras = {"text_projection": proj.t().contiguous()} if proj is not None else {}
        oc = convert.hf_text_to_openclip(text, _text_config(text, "hf"), extras)
        out.update({f"{EMBEDDERS}{i}.model.{k}": v for k, v in oc.items()})
    return out


def _text_config(text: Mapping[str, Tensor], layout: convert.TextLayout) -> TextEncoderConfig:
    return convert._text_config_from_weights(text, layout)


def detect_sdxl(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """ModelConfig fields of an SDXL single file, from keys and shapes: family "sdxl" (base, or inpainting
    with 9 input channels) or "sdxl-refiner" (bigG alone, 1280-wide context)."""
    unet_sd, vae_sd, texts, layouts = split_sdxl_checkpoint(sd)
    cfgs = []
    for text, layout in zip(texts, layouts, strict=True):
        body = {k: v for k, v in text.items() if k != _PROJ}
        c = _text_config(body, "hf")
        # OpenAI CLIP-L uses quick_gelu, OpenCLIP bigG gelu: the layout tells which (not in the weights)
        c = TextEncoderConfig(**{**c.__dict__, "act": "gelu" if layout == "openclip" else SD1_TEXT.act,
                                 "projection_dim": text[_PROJ].shape[0] if _PROJ in text else 0})
        cfgs.append(c)
    if len(cfgs) > 2 or not cfgs[-1].projection_dim:
        raise ValueError(f"SDXL single file: {len(cfgs)} text encoders, the last without text_projection: "
                         "expected CLIP-L + OpenCLIP bigG (base) or bigG alone (refiner)")
    unet = convert._unet_config_from_weights(unet_sd, "sd2")  # 64-wide heads, like SD2
    unet = unet.__class__(**{**unet.__dict__, **_sdxl_unet_fields(unet_sd, unet.attention_levels)})
    width = sum(c.width for c in cfgs)
    if unet.context_dim != width:
        raise ValueError(f"U-Net context_dim {unet.context_dim} != text encoder widths {[c.width for c in cfgs]}")
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else SDXL_VAE.scale_factor
    vae = convert._vae_config_from_weights(vae_sd, scale) if vae_sd else VAEConfig(scale_factor=scale)
    return {
        "family": "sdxl" if len(cfgs) == 2 else "sdxl-refiner",
        "unet": unet, "vae": vae, "text": cfgs[0], "text2": cfgs[1] if len(cfgs) == 2 else None,
        "clip_skip": 2, "pad_with_eos": layouts[0] == "hf",
        "extra": {"text_layout": "+".join(layouts), "vae_in_file": bool(vae_sd)},
    }


def _sdxl_unet_fields(u: Mapping[str, Tensor], attn: tuple[bool, ...]) -> dict[str, Any]:
    """Per-level transformer depth, middle depth and label_emb width, which the SD1/SD2 detector does not read."""
    levels = len(attn)
    downs = sorted(int(k.split(".")[1]) for k in u if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    per_level = (downs[0] - 1) if downs else max(int(k.split(".")[1]) for k in u if k.startswith("input_blocks."))
    depths = []
    for level in range(levels):
        k = 1 + level * (per_level + 1)
        depths.append(convert._count(u, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.") if attn[level] else 0)
    if "label_emb.0.0.weight" not in u:
        raise ValueError("SDXL U-Net without label_emb.0.0.weight (the vector conditioning)")
    middle = convert._count(u, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    used = {d for d, a in zip(depths, attn, strict=True) if a} | {middle}
    return {  # one depth everywhere (the refiner's 4) is written as diffusers and sgm write it: an int
        "transformer_depth": used.pop() if len(used) == 1 else tuple(depths),
        "transformer_depth_middle": None if middle == max(depths) else middle,
        "adm_in_channels": u["label_emb.0.0.weight"].shape[1],
    }
