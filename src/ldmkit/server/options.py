"""The server's A1111 options (``/sdapi/v1/options``): a fixed table of keys, each checked when it is set.

A1111 stores whatever a client posts; a server that does so can be filled with junk or poisoned with a value
that fails every later request. Here only the keys below exist: an unknown key is refused (422, naming it),
a value is checked before it is stored, and the stored options are always ones a generation accepts.

Keys that ldmkit honours change what it does; the others are A1111 settings of its UI that clients read and
post back (``send_seed``) or that ldmkit has no counterpart for and accepts only at A1111's default
(``eta_noise_seed_delta``), so a client never believes a setting took effect when it did not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError

from ldmkit.model import StableDiffusion
from ldmkit.previews import PREVIEW_TYPES
from ldmkit.server.generation import DEEPCACHE_OPTIONS, check_deepcache_option, field_error
from ldmkit.server.samples import SAMPLE_FORMATS
from ldmkit.upscale import DEFAULT_OVERLAP, DEFAULT_TILE

PREVIEW_IMAGE_FORMATS = ("png", "jpeg", "webp")  # A1111's live_previews_image_format


def check_clip_skip(value: Any, model: StableDiffusion, loc: tuple) -> int:
    """A 422 naming ``loc`` unless ``value`` is a clip skip this model has layers for."""
    n = model.cfg.text_layers
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
        raise field_error(loc, f"CLIP_stop_at_last_layers must be an integer from 1 to {n} (this model's text "
                               f"encoder has {n} layers; 1 = the last), got {value!r}", value)
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Option:
    default: Any
    ok: Callable[[Any], bool]
    expect: str  # what a valid value is, for the 422
    help: str = ""


def _choice(*values: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in values), f"one of: {', '.join(values)}"


def _deepcache(key: str) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        try:
            check_deepcache_option(key, v, (key,))
        except RequestValidationError:
            return False
        return True

    lo = 1 if key == "deepcache_interval" else 0
    return ok, f"an integer of at least {lo}" + (" (1 = off)" if lo else "")


_BOOL = (lambda v: isinstance(v, bool), "true or false")
_ETA = (lambda v: _is_number(v) and 0 <= v <= 10, "a number from 0 to 10")

# Settable options. sd_model_checkpoint, sd_vae and CLIP_stop_at_last_layers need the model or the VAE folder:
# the app checks them (they are listed in SPECIAL).
OPTIONS: dict[str, Option] = {
    "samples_format": Option("png", *_choice(*SAMPLE_FORMATS),
                             "format of the images save_images writes (jpg/webp carry the infotext in EXIF)"),
    "samples_save": Option(True, *_BOOL, "false: save_images requests save nothing"),
    "jpeg_quality": Option(80, lambda v: _is_int(v) and 1 <= v <= 100, "an integer from 1 to 100",
                           "quality of saved jpg/webp images"),
    "enable_pnginfo": Option(True, *_BOOL, "false: saved images carry no generation parameters"),
    "eta_ddim": Option(0.0, *_ETA, "eta of DDIM when a request gives none"),
    "eta_ancestral": Option(1.0, *_ETA, "eta of ancestral and SDE samplers when a request gives none"),
    "eta_noise_seed_delta": Option(0, lambda v: v == 0 and _is_int(v),
                                   "0 (ldmkit does not offset its noise seeds; A1111's default)"),
    "send_seed": Option(True, *_BOOL, "A1111 web UI setting; stored for clients"),
    "send_size": Option(True, *_BOOL, "A1111 web UI setting; stored for clients"),
    "live_previews_enable": Option(True, *_BOOL, "live previews in /sdapi/v1/progress"),
    "show_progress_every_n_steps": Option(1, lambda v: _is_int(v) and v >= -1,
                                          "an integer: steps between previews (-1: none while sampling)"),
    "show_progress_type": Option("Approx NN", *_choice(*PREVIEW_TYPES)),
    "live_previews_image_format": Option("png", *_choice(*PREVIEW_IMAGE_FORMATS)),
    # upscalers (/sdapi/v1/extra-single-image): tile size in input pixels (0: untiled) and tile overlap
    "ESRGAN_tile": Option(DEFAULT_TILE, lambda v: _is_int(v) and 0 <= v <= 4096, "an integer from 0 (untiled) "
                          "to 4096"),
    "ESRGAN_tile_overlap": Option(DEFAULT_OVERLAP, lambda v: _is_int(v) and 0 <= v <= 512,
                                  "an integer from 0 to 512"),
    **{k: Option(v, *_deepcache(k), "DeepCache: the full U-Net every N-th call / the branch between")
       for k, v in DEEPCACHE_OPTIONS.items()},
}
SPECIAL = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers")
# derived from the server's state: reported, and accepted back only unchanged (clients post GET's dict back)
READ_ONLY = ("sd_checkpoint_hash", "outdir_samples", "outdir_txt2img_samples", "outdir_img2img_samples",
             "outdir_extras_samples", "outdir_grids", "outdir_txt2img_grids", "outdir_img2img_grids", "outdir_save")


# the options a request's override_settings may set (the others apply server-wide only)
PER_REQUEST = (*SPECIAL, *DEEPCACHE_OPTIONS, "eta_ddim", "eta_ancestral")


def check_overrides(overrides: dict[str, Any]) -> None:
    """A 422 naming the first key of a request's override_settings that ldmkit would not apply to it."""
    for key, value in overrides.items():
        loc = ("override_settings", str(key)[:80])
        if key not in OPTIONS and key not in SPECIAL and key not in READ_ONLY:
            raise field_error(loc, f"unknown option {str(key)[:80]!r}; per request ldmkit applies: "
                                   f"{', '.join(PER_REQUEST)}", None)
        if key not in PER_REQUEST:
            raise field_error(loc, f"{key} applies server-wide only: set it with POST /sdapi/v1/options; per "
                                   f"request ldmkit applies: {', '.join(PER_REQUEST)}", value)
        opt = OPTIONS.get(key)
        if opt is not None and not opt.ok(value):
            raise field_error(loc, f"{key} must be {opt.expect}; got {value!r}", value)


def defaults() -> dict[str, Any]:
    """The stored options of a new server (those the app checks against the model included)."""
    return {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", **{k: o.default for k, o in OPTIONS.items()}}


def read_only_values(output_dir: str | None, checkpoint_hash: str | None) -> dict[str, Any]:
    out = output_dir or ""
    return {"sd_checkpoint_hash": checkpoint_hash, **{k: out for k in READ_ONLY if k.startswith("outdir_")}}


def check_update(update: dict[str, Any], current_read_only: dict[str, Any]) -> dict[str, Any]:
    """The plain options of ``update`` checked (a 422 naming the first bad one); special keys are left out.

    Unknown keys are refused all together, before anything is stored."""
    unknown = sorted(k for k in update if k not in OPTIONS and k not in SPECIAL and k not in READ_ONLY)
    if unknown:
        shown = ", ".join(repr(k[:80]) for k in unknown[:10]) + (f" and {len(unknown) - 10} more"
                                                                 if len(unknown) > 10 else "")
        raise field_error((unknown[0][:80],), f"unknown option{'s' * (len(unknown) > 1)} {shown}; GET "
                          "/sdapi/v1/options lists the options this server has", None)
    for key in READ_ONLY:
        if key in update and update[key] != current_read_only.get(key):
            raise field_error((key,), f"{key} is read-only here (it follows the server: --output-dir, the "
                                      f"loaded model); it is {current_read_only.get(key)!r}", update[key])
    checked = {}
    for key, value in update.items():
        opt = OPTIONS.get(key)
        if opt is None:
            continue
        if not opt.ok(value):
            raise field_error((key,), f"{key} must be {opt.expect}; got {value!r}", value)
        checked[key] = value
    return checked
