"""Key maps between the layouts Stable Diffusion weights are published in.

ldmkit's own modules use the original LDM (CompVis) names, so a single-file ``.safetensors``
only needs its prefixes stripped (:func:`split_ldm_checkpoint`). Diffusers folders use other
names; the functions here rename in both directions. Every function is a pure map over
``dict[str, Tensor]`` and fails on keys it does not recognise, naming them, rather than
dropping them: a silently half-converted checkpoint makes brown noise.

The U-Net and VAE maps are built from the config (block by block, the way both codebases
construct their modules), not by string substitution, so a config that does not match the
weights is caught here instead of at load time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .config import SD1_TEXT, SD2_TEXT, SDXL_ID_DIM, TextEncoderConfig, UNetConfig, VAEConfig

StateDict = dict[str, Tensor]
TextLayout = Literal["hf", "openclip", "none"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."  # SD1: transformers.CLIPTextModel names
OPENCLIP_TEXT_PREFIX = "cond_stage_model.model."  # SD2: open_clip names

# Keys of a single-file checkpoint that are not weights of the U-Net, VAE or text encoder.
# They are skipped on purpose by split_ldm_checkpoint; anything else unknown is an error.
SKIPPED_LDM_KEYS = frozenset({
    # DDPM schedule buffers, recomputed from beta_start/beta_end (config.ModelConfig)
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    # latent scale (0.18215), a config value; read by detect_family when present
    "scale_factor",
    # prediction markers some trainers add (ComfyUI convention); ldmkit.checkpoint reads "v_pred"
    "v_pred", "ztsnr",
    # CLIP position ids: arange(77), persisted by transformers < 4.31
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
    # OpenCLIP contrastive head: SD2 conditions on hidden states, never on the projected pooled
    # output. Keep them yourself and pass them to join_ldm_checkpoint(extra=...) to round-trip.
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale", "logit_scale",
})
# EMA copy of the U-Net (flattened names, "model_ema.diffusion_modelinput_blocks00weight")
# 512-depth-ema also holds the MiDaS (DPT-hybrid) estimator it was trained with: ldmkit.depth reads a map instead
SKIPPED_LDM_PREFIXES = ("model_ema.", "depth_model.")


def is_skipped_ldm_key(key: str) -> bool:
    """True for the training buffers / EMA keys that split_ldm_checkpoint drops on purpose."""
    return key in SKIPPED_LDM_KEYS or key.startswith(SKIPPED_LDM_PREFIXES)


def _fail_keys(what: str, problem: str, keys: list[str], hint: str = "") -> ValueError:
    shown = ", ".join(sorted(keys)[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
    return ValueError(f"{what}: {problem}: {shown}{'. ' + hint if hint else ''}")


# --------------------------------------------------------------------------------------------
# Block tables. A block pairs an LDM module path with the diffusers module path and says how the
# names *inside* it change ("kind"). Converting a key = find its block (longest matching prefix),
# rename the leaf.


@dataclass(frozen=True)
class _Block:
    ldm: str
    hf: str
    kind: Literal["plain", "res", "attn", "vres", "vattn"]


_UNET_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
            "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.15 AttentionBlock names, still found in old folders: accepted on input only
_VAE_ATTN_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
# SpatialTransformer (LDM) and Transformer2DModel (diffusers) use identical inner names
_UNET_ATTN_LEAF = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.0\.proj|ff\.net\.2|norm[123]))\.(weight|bias)"
)
_INV = {name: {v: k for k, v in table.items()} for name, table in
        (("res", _UNET_RES), ("vres", _VAE_RES), ("vattn", _VAE_ATTN))}


def _rename_leaf(kind: str, leaf: str, t: Tensor, to_ldm: bool) -> tuple[str, Tensor] | None:
    """New leaf name and tensor inside a block, or None if the leaf does not belong there."""
    module, _, param = leaf.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if kind == "plain":
        return (leaf, t) if module == "" else None
    if kind == "attn":
        return (leaf, t) if _UNET_ATTN_LEAF.fullmatch(leaf) else None
    if kind in ("res", "vres"):
        table = _INV[kind] if to_ldm else (_UNET_RES if kind == "res" else _VAE_RES)
        new = table.get(module)
        return None if new is None else (f"{new}.{param}", t)
    # vattn: the LDM VAE attention uses 1x1 convs, diffusers uses Linear layers
    if to_ldm:
        new = _INV["vattn"].get(module) or _VAE_ATTN_LEGACY.get(module)
        if new is not None and new != "norm" and param == "weight" and t.ndim == 2:
            t = t[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
    else:
        new = _VAE_ATTN.get(module)
        if new is not None and new != "group_norm" and param == "weight" and t.ndim == 4:
            t = t[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
    return None if new is None else (f"{new}.{param}", t)


def _convert(sd: Mapping[str, Tensor], blocks: list[_Block], to_ldm: bool, what: str) -> StateDict:
    by_src = {(b.hf if to_ldm else b.ldm): b for b in blocks}
    out: StateDict = {}
    unknown: list[str] = []
    seen: set[str] = set()
    for key, t in sd.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            block = by_src.get(".".join(parts[:n]))
            if block is not None:
                break
        else:
            unknown.append(key)
            continue
        renamed = _rename_leaf(block.kind, ".".join(parts[n:]), t, to_ldm)
        if renamed is None:
            unknown.append(key)
            continue
        new_key = f"{block.ldm if to_ldm else block.hf}.{renamed[0]}"
        if new_key in out:
            raise ValueError(f"{what}: two keys map to {new_key!r} (old and new attention names mixed?)")
        out[new_key] = renamed[1]
        seen.add(block.ldm)
    if unknown:
        raise _fail_keys(what, "keys that do not fit the config", unknown,
                         "Check the config (levels, num_res_blocks, attention_levels) against the weights")
    missing = [b.hf if to_ldm else b.ldm for b in blocks if b.ldm not in seen]
    if missing:
        raise _fail_keys(what, "no weights for these modules of the config", missing)
    return out


def _unet_blocks(cfg: UNetConfig) -> list[_Block]:
    levels, n_res = len(cfg.channel_mult), cfg.num_res_blocks
    if len(cfg.attention_levels) != levels:
        raise ValueError(f"attention_levels {cfg.attention_levels} must have one entry per channel_mult "
                         f"level {cfg.channel_mult}")
    blocks = [_Block("time_embed.0", "time_embedding.linear_1", "plain"),
              _Block("time_embed.2", "time_embedding.linear_2", "plain"),
              _Block("input_blocks.0.0", "conv_in", "plain"),
              _Block("out.0", "conv_norm_out", "plain"),
              _Block("out.2", "conv_out", "plain"),
              _Block("middle_block.0", "mid_block.resnets.0", "res"),
              _Block("middle_block.1", "mid_block.attentions.0", "attn"),
              _Block("middle_block.2", "mid_block.resnets.1", "res")]
    if cfg.time_cond_proj_dim:  # guidance-embedded LCM U-Net: the same name in both layouts
        blocks.append(_Block("time_embedding.cond_proj", "time_embedding.cond_proj", "plain"))
    if cfg.adm_in_channels:  # SDXL vector conditioning (diffusers' addition_embed_type "text_time")
        blocks += [_Block("label_emb.0.0", "add_embedding.linear_1", "plain"),
                   _Block("label_emb.0.2", "add_embedding.linear_2", "plain")]
    k = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(n_res):
            blocks.append(_Block(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if cfg.attention_levels[level]:
                blocks.append(_Block(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level != levels - 1:
            blocks.append(_Block(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            k += 1
    k = 0
    for i, level in enumerate(reversed(range(levels))):  # diffusers up_blocks.0 is the deepest level
        for j in range(n_res + 1):
            blocks.append(_Block(f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            pos = 1
            if cfg.attention_levels[level]:
                blocks.append(_Block(f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
                pos = 2
            if level != 0 and j == n_res:
                blocks.append(_Block(f"output_blocks.{k}.{pos}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
            k += 1
    return blocks


def _vae_blocks(cfg: VAEConfig) -> list[_Block]:
    levels, n_res = len(cfg.ch_mult), cfg.num_res_blocks
    blocks = [_Block(n, n, "plain") for n in ("quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        blocks += [_Block(f"{side}.conv_in", f"{side}.conv_in", "plain"),
                   _Block(f"{side}.norm_out", f"{side}.conv_norm_out", "plain"),
                   _Block(f"{side}.conv_out", f"{side}.conv_out", "plain"),
                   _Block(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", "vres"),
                   _Block(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", "vattn"),
                   _Block(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", "vres")]
    for i in range(levels):
        for j in range(n_res):
            blocks.append(_Block(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", "vres"))
        if i != levels - 1:
            blocks.append(_Block(f"encoder.down.{i}.downsample.conv",
                                 f"encoder.down_blocks.{i}.downsamplers.0.conv", "plain"))
    for i in range(levels):
        level = levels - 1 - i  # LDM numbers decoder levels by resolution, diffusers by order of use
        for j in range(n_res + 1):
            blocks.append(_Block(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", "vres"))
        if level != 0:
            blocks.append(_Block(f"decoder.up.{level}.upsample.conv",
                                 f"decoder.up_blocks.{i}.upsamplers.0.conv", "plain"))
    return blocks


def unet_diffusers_to_ldm(sd: Mapping[str, Tensor], cfg: UNetConfig) -> StateDict:
    """diffusers UNet2DConditionModel state dict -> LDM names (no ``model.diffusion_model.``)."""
    return _convert(sd, _unet_blocks(cfg), to_ldm=True, what="diffusers U-Net")


def unet_ldm_to_diffusers(sd: Mapping[str, Tensor], cfg: UNetConfig) -> StateDict:
    """LDM U-Net names (prefix stripped) -> diffusers UNet2DConditionModel state dict."""
    return _convert(sd, _unet_blocks(cfg), to_ldm=False, what="LDM U-Net")


def vae_diffusers_to_ldm(sd: Mapping[str, Tensor], cfg: VAEConfig) -> StateDict:
    """diffusers AutoencoderKL state dict -> LDM names (no ``first_stage_model.``).

    Accepts the pre-0.15 diffusers attention names (query/key/value/proj_attn) too.
    """
    return _convert(sd, _vae_blocks(cfg), to_ldm=True, what="diffusers VAE")


def vae_ldm_to_diffusers(sd: Mapping[str, Tensor], cfg: VAEConfig) -> StateDict:
    """LDM VAE names (prefix stripped) -> diffusers AutoencoderKL state dict (current names)."""
    return _convert(sd, _vae_blocks(cfg), to_ldm=False, what="LDM VAE")


# --------------------------------------------------------------------------------------------
# Text encoder: Hugging Face CLIPTextModel names <-> OpenCLIP names (SD2 single files).

_OC_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight",
           "ln_final.weight": "text_model.final_layer_norm.weight",
           "ln_final.bias": "text_model.final_layer_norm.bias"}
_OC_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OC_EXTRAS = ("text_projection", "logit_scale")
_HF_POSITION_IDS = "text_model.embeddings.position_ids"
TOKEN_MAP_KEY = "text_model.embeddings.token_map"  # ldmkit's compact vocabulary (TextEncoderConfig.token_rows)


def hf_text_keys(cfg: TextEncoderConfig) -> list[str]:
    """Every key of a CLIPTextModel checkpoint (``text_model.`` form) for this config."""
    keys = list(_OC_TOP.values())
    for i in range(cfg.layers):
        for module in (*_OC_LAYER.values(), "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            keys += [f"text_model.encoder.layers.{i}.{module}.weight", f"text_model.encoder.layers.{i}.{module}.bias"]
    if cfg.token_rows:
        keys.append(TOKEN_MAP_KEY)
    return keys


def _check_text(sd: Mapping[str, Tensor], cfg: TextEncoderConfig, what: str) -> None:
    expected = set(hf_text_keys(cfg))
    missing, unknown = expected - sd.keys(), sd.keys() - expected
    if unknown:
        raise _fail_keys(what, f"keys that do not fit a {cfg.layers}-layer text encoder", list(unknown))
    if missing:
        raise _fail_keys(what, "missing keys", list(missing))


def normalize_hf_text(sd: Mapping[str, Tensor]) -> StateDict:
    """HF CLIP text names in the on-disk ``text_model.`` form.

    Adds the ``text_model.`` prefix where it is missing (transformers >= 5.6 flattened
    ``CLIPTextModel``, whose in-memory state dict has no prefix; some old SD1 merges lack it too),
    leaves SDXL's ``text_projection.weight`` beside it, and drops the ``position_ids`` buffer (an arange
    that old transformers versions persisted).
    """
    out: StateDict = {}
    for key, t in sd.items():
        # CLIPTextModelWithProjection's projection sits beside text_model, not in it
        key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        if key != _HF_POSITION_IDS:
            out[key] = t
    return out


def openclip_to_hf_text(sd: Mapping[str, Tensor], cfg: TextEncoderConfig) -> tuple[StateDict, StateDict]:
    """OpenCLIP text tower (prefix ``cond_stage_model.model.`` stripped) -> (HF names, extras).

    ``extras`` holds ``text_projection`` and ``logit_scale`` unchanged when present: CLIPTextModel
    has no place for them and SD2 never uses them. Pass them back to :func:`hf_text_to_openclip`.
    """
    out: StateDict = {}
    extras: StateDict = {}
    unknown: list[str] = []
    layer = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
    for key, t in sd.items():
        if key in _OC_EXTRAS:
            extras[key] = t
        elif key in _OC_TOP:
            out[_OC_TOP[key]] = t
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            if t.shape[0] != 3 * cfg.width:
                raise ValueError(f"{key}: shape {tuple(t.shape)} is not a fused q,k,v of width {cfg.width}")
            p = f"text_model.encoder.layers.{m[1]}.self_attn"
            # clone: safetensors refuses to save tensors that share storage
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0), strict=True):
                out[f"{p}.{name}.{m[2]}"] = part.clone()
        elif (m := layer.fullmatch(key)) and m[2] in _OC_LAYER:
            out[f"text_model.encoder.layers.{m[1]}.{_OC_LAYER[m[2]]}.{m[3]}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise _fail_keys("OpenCLIP text encoder", "unknown keys", unknown)
    _check_text(out, cfg, "OpenCLIP text encoder")
    return out, extras


def hf_text_to_openclip(
    sd: Mapping[str, Tensor], cfg: TextEncoderConfig, extras: Mapping[str, Tensor] | None = None
) -> StateDict:
    """HF CLIPTextModel names (with or without ``text_model.``) -> OpenCLIP text tower names.

    ``extras`` (``text_projection``, ``logit_scale``) are copied through; without them the result
    lacks those two keys, which only matters to tools that rebuild the full OpenCLIP model.
    """
    sd = normalize_hf_text(sd)
    _check_text(sd, cfg, "HF text encoder")
    inv_top = {v: k for k, v in _OC_TOP.items()}
    out: StateDict = {inv_top[k]: sd[k] for k in inv_top}
    for i in range(cfg.layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{param}"] = torch.cat(
                [sd[f"{hf}self_attn.{n}_proj.{param}"] for n in "qkv"], dim=0)  # (3 * width, ...)
            for oc_name, hf_name in _OC_LAYER.items():
                out[f"{oc}{oc_name}.{param}"] = sd[f"{hf}{hf_name}.{param}"]
    for key, t in (extras or {}).items():
        if key not in _OC_EXTRAS:
            raise ValueError(f"extras: {key!r} is not one of {_OC_EXTRAS}")
        out[key] = t
    return out


# --------------------------------------------------------------------------------------------
# Single-file checkpoints (CompVis / A1111 / ComfyUI layout).


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    # .ckpt files nest the weights: {"state_dict": {...}, "global_step": ..., "epoch": ...}
    inner = sd.get("state_dict")
    return inner if isinstance(inner, Mapping) else sd


def _strip(sd: Mapping[str, Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _text_config_from_weights(text: Mapping[str, Tensor], layout: TextLayout) -> TextEncoderConfig:
    """Widths and depth from shapes. Heads and activation are not in the weights: CLIP convention
    (64-wide heads) and the layout's convention (OpenAI CLIP: quick_gelu, OpenCLIP: gelu)."""
    if layout == "hf":
        tok, pos = "text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"
        layer_re, fc1 = r"text_model\.encoder\.layers\.(\d+)\.", "text_model.encoder.layers.0.mlp.fc1.weight"
    else:
        tok, pos = "token_embedding.weight", "positional_embedding"
        layer_re, fc1 = r"transformer\.resblocks\.(\d+)\.", "transformer.resblocks.0.mlp.c_fc.weight"
    missing = [k for k in (tok, pos, fc1) if k not in text]
    if missing:
        raise _fail_keys(f"{layout} text encoder", "missing keys", missing)
    vocab, width = text[tok].shape
    layers = {int(m[1]) for k in text if (m := re.match(layer_re, k))}
    return TextEncoderConfig(
        vocab_size=vocab, max_positions=text[pos].shape[0], width=width, layers=len(layers),
        heads=max(1, width // 64), intermediate=text[fc1].shape[0],
        act="quick_gelu" if layout == "hf" else "gelu",
    )


def split_ldm_checkpoint(sd: Mapping[str, Tensor]) -> tuple[StateDict, StateDict, StateDict, TextLayout]:
    """Single-file state dict -> (unet, vae, text, text_layout), prefixes stripped.

    unet and vae keep LDM names (ldmkit's own). text is always in HF CLIPTextModel names
    (``text_model.…``); ``text_layout`` says what the file stored: "hf" (SD1), "openclip" (SD2,
    converted here) or "none" (no text encoder in the file, text is empty).
    Keys in SKIPPED_LDM_KEYS / SKIPPED_LDM_PREFIXES (EMA, schedule buffers, OpenCLIP's
    text_projection/logit_scale) are dropped on purpose; any other unknown key raises.
    """
    sd = _unwrap(sd)
    unet, vae, hf_text, oc_text = {}, {}, {}, {}
    unknown = []
    for key, t in sd.items():
        if is_skipped_ldm_key(key):
            continue
        for prefix, part in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (HF_TEXT_PREFIX, hf_text),
                             (OPENCLIP_TEXT_PREFIX, oc_text)):
            if key.startswith(prefix):
                part[key[len(prefix):]] = t
                break
        else:
            unknown.append(key)
    if unknown:
        raise _fail_keys("single-file checkpoint", "keys that belong to no part", unknown,
                         "Add them to convert.SKIPPED_LDM_KEYS if they are known training state")
    if not unet:
        raise _not_sd(sd)
    if hf_text and oc_text:
        raise ValueError("single-file checkpoint has both cond_stage_model.transformer.* (CLIP) and "
                         "cond_stage_model.model.* (OpenCLIP) text encoder keys")
    if oc_text:
        text, _ = openclip_to_hf_text(oc_text, _text_config_from_weights(oc_text, "openclip"))
        return unet, vae, text, "openclip"
    if hf_text:
        return unet, vae, normalize_hf_text(hf_text), "hf"
    return unet, vae, {}, "none"


def join_ldm_checkpoint(
    unet: Mapping[str, Tensor], vae: Mapping[str, Tensor], text: Mapping[str, Tensor],
    text_layout: TextLayout, extra: Mapping[str, Tensor] | None = None,
) -> StateDict:
    """Inverse of split_ldm_checkpoint: LDM-named parts + HF-named text -> single-file layout.

    ``text_layout`` "openclip" writes SD2's OpenCLIP names; "none" requires an empty ``text``.
    ``extra`` entries (full single-file names, e.g. ``cond_stage_model.model.text_projection``)
    are written verbatim.
    """
    out: StateDict = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    if text_layout == "hf":
        out.update({HF_TEXT_PREFIX + k: v for k, v in normalize_hf_text(text).items()})
    elif text_layout == "openclip":
        text = normalize_hf_text(text)
        oc = hf_text_to_openclip(text, _text_config_from_weights(text, "hf"))
        out.update({OPENCLIP_TEXT_PREFIX + k: v for k, v in oc.items()})
    elif text_layout != "none" or text:
        raise ValueError(f"text_layout must be 'hf', 'openclip' or 'none' (with empty text), got {text_layout!r}")
    for key, t in (extra or {}).items():
        if key in out:
            raise ValueError(f"extra key {key!r} collides with a converted weight")
        out[key] = t
    return out


_VAE_FILE_PREFIXES = ("first_stage_model.", "encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _not_sd(sd: Mapping[str, Any]) -> ValueError:
    from ldmkit import file_kind

    kind = file_kind.kind_of_keys(sd)  # a LoRA, ControlNet, upscaler, ... file says what it is
    if kind == file_kind.VAE and not all(k.startswith(_VAE_FILE_PREFIXES) for k in sd):
        kind = None  # VAE weights beside others: a checkpoint without its U-Net
    # a checkpoint's own kinds, and diffusers parts (the hint below), are not misplaced
    own = (file_kind.SD, file_kind.SDXL, file_kind.UNET, file_kind.TEXT_ENCODER)
    if why := file_kind.misplaced(kind, "a Stable Diffusion checkpoint", own):
        return ValueError(why)
    sample = ", ".join(list(sd)[:5])
    return ValueError(
        "this state dict does not look like a Stable Diffusion checkpoint: no model.diffusion_model.* keys "
        f"(first keys: {sample or 'none'}). A diffusers folder (unet/diffusion_pytorch_model.safetensors) "
        "needs unet_diffusers_to_ldm instead."
    )


def _count(keys: Any, pattern: str) -> int:
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def _unet_config_from_weights(u: Mapping[str, Tensor], family: str) -> UNetConfig:
    try:
        model_channels, in_channels = u["input_blocks.0.0.weight"].shape[:2]
        out_channels = u["out.2.weight"].shape[0]
        to_k = u["middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
        proj_in = u["middle_block.1.proj_in.weight"]
    except KeyError as e:
        raise ValueError(f"U-Net weights lack {e.args[0]!r}: not an SD U-Net with spatial transformers") from e
    n_inputs = 1 + max(int(k.split(".")[1]) for k in u if k.startswith("input_blocks."))
    downs = sorted(int(k.split(".")[1]) for k in u if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    n_res = downs[0] - 1 if downs else n_inputs - 1
    levels = len(downs) + 1
    if n_inputs != 1 + levels * n_res + len(downs):
        raise ValueError(f"U-Net input_blocks ({n_inputs}) do not form {levels} levels of {n_res} blocks")
    firsts = [1 + level * (n_res + 1) for level in range(levels)]
    mult = tuple(u[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] // model_channels for k in firsts)
    # Heads are not in the weights (q, k, v are (C, C) whatever the split): family convention.
    heads = {"num_heads": None, "head_dim": 64} if family == "sd2" else {"num_heads": 8, "head_dim": None}
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        channel_mult=mult, num_res_blocks=n_res,
        attention_levels=tuple(f"input_blocks.{k}.1.proj_in.weight" in u for k in firsts),
        context_dim=to_k.shape[1], transformer_depth=_count(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        use_linear_in_transformer=proj_in.ndim == 2, **heads,
        time_cond_proj_dim=u["time_embedding.cond_proj.weight"].shape[1] if "time_embedding.cond_proj.weight" in u
        else None,
    )


def _vae_config_from_weights(v: Mapping[str, Tensor], scale_factor: float) -> VAEConfig:
    try:
        ch, in_channels = v["encoder.conv_in.weight"].shape[:2]
        out_channels = v["decoder.conv_out.weight"].shape[0]
        z_channels = v["decoder.conv_in.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"VAE weights lack {e.args[0]!r}") from e
    levels = _count(v, r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=in_channels, out_channels=out_channels, ch=ch, z_channels=z_channels,
        ch_mult=tuple(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)),
        num_res_blocks=_count(v, r"encoder\.down\.0\.block\.(\d+)\."), scale_factor=scale_factor,
    )


def detect_family(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture of a single-file checkpoint, from key names and shapes.

    Returns the ModelConfig fields the weights determine, so ``ModelConfig(name=..., **result)``
    works: family, unet, vae, text, clip_skip, pad_with_eos, and extra={"text_layout": ...}.
    OpenCLIP text -> SD2 conventions (64-wide heads, penultimate layer, pad with 0); CLIP text ->
    SD1 conventions (8 heads, last layer, pad with end token). Not in the weights, so by convention:
    heads, GroupNorm group count (32), CLIP activation, and scale_factor (0.18215 unless the file
    stores a ``scale_factor`` buffer).

    ``prediction`` is left to the caller: SD2-768 (v) and SD2-base (eps) have identical keys and
    shapes. diffusers guesses from the .ckpt's top-level ``global_step`` (875000 -> eps, else v);
    A1111 runs one U-Net forward pass on a constant input and checks which parameterisation gives
    a plausible output, or reads a .yaml next to the file.
    """
    sd = _unwrap(sd)
    unet = _strip(sd, UNET_PREFIX)
    if not unet:
        raise _not_sd(sd)
    vae = _strip(sd, VAE_PREFIX)
    hf_text, oc_text = _strip(sd, HF_TEXT_PREFIX), _strip(sd, OPENCLIP_TEXT_PREFIX)
    context_dim = unet["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] \
        if "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in unet else None
    layout: TextLayout
    if oc_text:
        layout, text = "openclip", _text_config_from_weights(oc_text, "openclip")
    elif hf_text:
        layout, text = "hf", _text_config_from_weights(normalize_hf_text(hf_text), "hf")
    elif context_dim in (768, 1024):  # U-Net-only file: assume the stock encoder
        layout, text = "none", SD1_TEXT if context_dim == 768 else SD2_TEXT
    else:
        raise ValueError(f"no text encoder weights, and context_dim {context_dim} matches neither SD1 "
                         "(768) nor SD2 (1024): cannot tell the text encoder")
    family = "sd2" if layout == "openclip" or (layout == "none" and context_dim == 1024) else "sd1"
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else VAEConfig.scale_factor
    unet_cfg = _unet_config_from_weights(unet, family)
    if unet_cfg.context_dim != text.width:
        raise ValueError(f"U-Net context_dim {unet_cfg.context_dim} != text encoder width {text.width}")
    return {
        "family": family,
        "unet": unet_cfg,
        "vae": _vae_config_from_weights(vae, scale) if vae else VAEConfig(scale_factor=scale),
        "text": text,
        "clip_skip": 2 if family == "sd2" else 1,
        "pad_with_eos": family != "sd2",
        "extra": {"text_layout": layout, "vae_in_file": bool(vae)},
    }


# --------------------------------------------------------------------------------------------
# config.json dicts for diffusers / transformers, and back.


def diffusers_unet_config(cfg: UNetConfig, sample_size: int = 64) -> dict[str, Any]:
    """Kwargs for ``diffusers.UNet2DConditionModel`` (its config.json) matching ``cfg``.

    ``sample_size`` is the latent size (64 for 512-px models, 96 for SD2-768); diffusers uses it
    only as the pipeline's default resolution.
    """
    block_out = [cfg.model_channels * m for m in cfg.channel_mult]
    # diffusers quirk: "attention_head_dim" is the NUMBER of heads (SD1: 8 everywhere). SD2's
    # fixed 64-wide heads become a per-level list of counts, e.g. [5, 10, 20, 20].
    heads: int | list[int] = cfg.num_heads if cfg.head_dim is None else [c // cfg.heads_at(c)[1] for c in block_out]
    return {
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "flip_sin_to_cos": True,  # LDM's timestep embedding is [cos, sin]
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)],
        "block_out_channels": block_out,
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": _diffusers_depths(cfg),
        "attention_head_dim": heads,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_ID_DIM,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels} if cfg.adm_in_channels else {}),
    }


def _diffusers_depths(cfg: UNetConfig) -> int | list[int]:
    """diffusers' transformer_layers_per_block: its mid block takes the last level's entry, so levels without
    attention (whose entry diffusers ignores) carry the middle depth."""
    if isinstance(cfg.transformer_depth, int) and cfg.transformer_depth_middle in (None, cfg.transformer_depth):
        return cfg.transformer_depth
    depths = [cfg.depth_at(i) if a else cfg.middle_depth for i, a in enumerate(cfg.attention_levels)]
    if depths[-1] != cfg.middle_depth:
        raise ValueError(f"diffusers cannot express a middle depth {cfg.middle_depth} different from the last "
                         f"level's {depths[-1]}")
    return depths


# diffusers options that change the architecture away from an SD1/SD2 U-Net, with their defaults
_UNET_UNSUPPORTED = {
    "class_embed_type": None, "encoder_hid_dim": None, "num_class_embeds": None,
    "only_cross_attention": False, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "conv_in_kernel": 3,
    "conv_out_kernel": 3, "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu", "downsample_padding": 1,
}


def _uniform(d: Mapping[str, Any], key: str, default: Any) -> Any:
    v = d.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"{key}={v}: per-level values are not supported by UNetConfig")
        v = v[0]
    return v


def unet_config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
    """UNetConfig from a diffusers ``unet/config.json`` dict (missing keys take diffusers' defaults)."""
    odd = {k: d[k] for k, default in _UNET_UNSUPPORTED.items() if d.get(k, default) != default}
    adm = d.get("projection_class_embeddings_input_dim")
    if d.get("addition_embed_type") is not None:  # SDXL: only "text_time" with 256-wide id embeddings
        if d["addition_embed_type"] != "text_time" or d.get("addition_time_embed_dim") != SDXL_ID_DIM or not adm:
            odd |= {k: d.get(k) for k in ("addition_embed_type", "addition_time_embed_dim",
                                          "projection_class_embeddings_input_dim")}
    else:
        adm = None
    if odd:
        raise ValueError(f"diffusers U-Net options not supported by ldmkit: {odd}")
    block_out = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    attn = tuple(t == "CrossAttnDownBlock2D" for t in down)
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or up != expected_up:
        raise ValueError(f"block types {down} / {up} are not an SD U-Net (expected up blocks {expected_up})")
    mc = block_out[0]
    if any(c % mc for c in block_out):
        raise ValueError(f"block_out_channels {block_out} are not multiples of the first")
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    head_cfg: dict[str, int | None]
    if isinstance(heads, int) or len(set(heads)) == 1:  # same count everywhere: SD1 style
        head_cfg = {"num_heads": heads if isinstance(heads, int) else heads[0], "head_dim": None}
    else:
        widths = {c // h for c, h in zip(block_out, heads, strict=True)}
        if len(widths) != 1:
            raise ValueError(f"attention heads {heads} give neither a fixed head count nor a fixed head width")
        head_cfg = {"num_heads": None, "head_dim": widths.pop()}
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=mc,
        channel_mult=tuple(c // mc for c in block_out), num_res_blocks=_uniform(d, "layers_per_block", 2),
        attention_levels=attn, context_dim=_uniform(d, "cross_attention_dim", 1280),
        **_depths_from_diffusers(d.get("transformer_layers_per_block", 1), attn), adm_in_channels=adm,
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        norm_groups=d.get("norm_num_groups", 32), time_cond_proj_dim=d.get("time_cond_proj_dim"), **head_cfg,
    )


def _depths_from_diffusers(layers: int | list[int], attn: tuple[bool, ...]) -> dict[str, Any]:
    if isinstance(layers, int) or len(set(layers)) == 1:
        return {"transformer_depth": layers if isinstance(layers, int) else layers[0]}
    if any(isinstance(x, (list, tuple)) for x in layers):
        raise ValueError(f"transformer_layers_per_block={layers}: per-block depths are not supported")
    depths = tuple(n if a else 0 for n, a in zip(layers, attn, strict=True))
    return {"transformer_depth": depths, "transformer_depth_middle": None if layers[-1] == max(depths) else layers[-1]}


def diffusers_vae_config(cfg: VAEConfig, sample_size: int = 512) -> dict[str, Any]:
    """Kwargs for ``diffusers.AutoencoderKL`` (its config.json) matching ``cfg``."""
    n = len(cfg.ch_mult)
    return {
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scale_factor,
        # per-channel normalisation (latent_norm): null, as diffusers writes it, when the model has none
        "latents_mean": list(cfg.latents_mean) if cfg.latents_mean is not None else None,
        "latents_std": list(cfg.latents_std) if cfg.latents_std is not None else None,
    }


def vae_config_from_diffusers(d: Mapping[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers ``vae/config.json`` dict (missing keys take diffusers' defaults)."""
    block_out = list(d.get("block_out_channels", (64,)))
    n = len(block_out)
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"]))
    if down != ["DownEncoderBlock2D"] * n or up != ["UpDecoderBlock2D"] * n:
        raise ValueError(f"VAE block types {down} / {up} are not an SD AutoencoderKL")
    odd = {k: d[k] for k in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
            if d.get(k, True) is not True}
    if d.get("act_fn", "silu") != "silu":
        odd["act_fn"] = d["act_fn"]
    if odd:
        raise ValueError(f"diffusers VAE options not supported by ldmkit: {odd}")
    ch = block_out[0]
    return VAEConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), ch=ch,
        ch_mult=tuple(c // ch for c in block_out), num_res_blocks=d.get("layers_per_block", 1),
        z_channels=d.get("latent_channels", 4), norm_groups=d.get("norm_num_groups", 32),
        scale_factor=d.get("scaling_factor", 0.18215),
        latents_mean=d.get("latents_mean"), latents_std=d.get("latents_std"),  # checked by VAEConfig
    )


def hf_text_config(cfg: TextEncoderConfig) -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` kwargs (text_encoder/config.json) matching ``cfg``."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_positions,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate,
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.layer_norm_eps,
        # CLIP BPE <|startoftext|> / <|endoftext|>; the pooled output is taken at the first eos
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def text_config_from_hf(d: Mapping[str, Any]) -> TextEncoderConfig:
    """TextEncoderConfig from a CLIPTextConfig dict (or a full CLIPConfig with ``text_config``)."""
    d = d.get("text_config", d)
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"hidden_act {act!r} is not supported (quick_gelu or gelu)")
    return TextEncoderConfig(
        vocab_size=d.get("vocab_size", 49408), max_positions=d.get("max_position_embeddings", 77),
        width=d.get("hidden_size", 512), layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 8), intermediate=d.get("intermediate_size", 2048),
        act=act, layer_norm_eps=d.get("layer_norm_eps", 1e-5),
    )
