"""Request and response bodies of the A1111-compatible API (field names as A1111's ``modules/api/models.py``).

Fields ldmkit does not implement (hires fix, face restoration, scripts, ...) are declared so that
A1111 clients validate and the ``parameters`` echo looks like A1111's, but they are ignored.
Unknown fields are dropped, as A1111 does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IGNORED = "accepted for A1111 compatibility; ignored by ldmkit"
MAX_PROMPT_CHARS = 20_000  # far beyond any real prompt (75-token chunks), short of a memory problem


def find_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, the character) of the first lone UTF-16 surrogate in a JSON value's strings, or None.

    JSON's ``\\ud800`` escapes decode to such characters, which no UTF-8 text (a prompt, a file name, the
    response that echoes the request) can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # only surrogates fail to encode
            return f"{path or 'value'} (character {e.start})", value[e.start]
    elif isinstance(value, dict):
        for k, v in value.items():
            found = find_surrogate(k, f"{path}.{k!r}" if path else repr(k)) or find_surrogate(
                v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = find_surrogate(v, f"{path}.{i}")
            if found:
                return found
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        found = find_surrogate(data)
        if found:
            where, ch = found
            raise ValueError(f"{where} holds a lone UTF-16 surrogate ({ch.encode('unicode_escape').decode()}), "
                             "which is not a character; send valid Unicode text")
        return data


class GenerationRequest(_Request):
    """Settings shared by txt2img and img2img."""

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] | None = Field(None, description="prompt styles (/sdapi/v1/prompt-styles) applied in order")
    seed: int = Field(-1, description="-1 (any negative) for random; image i of the request uses seed + i")
    subseed: int = Field(-1, description=IGNORED)
    subseed_strength: float = Field(0.0, description=IGNORED)
    seed_resize_from_h: int = Field(-1, description=IGNORED)
    seed_resize_from_w: int = Field(-1, description=IGNORED)
    sampler_name: str | None = Field(None, description='e.g. "Euler a", "DPM++ 2M"; see /sdapi/v1/samplers')
    sampler_index: str = Field("Euler", description="the sampler if sampler_name is not given (A1111's old field)")
    scheduler: str | None = Field(None, description='"automatic" or a name/label from /sdapi/v1/schedulers')
    batch_size: int = Field(1, ge=1, description="images generated together")
    n_iter: int = Field(1, ge=1, description="batches generated one after another")
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, description="classifier-free guidance scale")
    width: int = Field(512, ge=1)
    height: int = Field(512, ge=1)
    restore_faces: bool | None = Field(None, description=IGNORED)
    tiling: bool | None = Field(None, description="seamless texture: circular padding in the U-Net and VAE")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = Field(False, description=IGNORED)
    eta: float | None = Field(None, description="noise of ancestral/SDE samplers and DDIM; ignored by the others")
    s_min_uncond: float | None = Field(None, description=IGNORED)
    s_churn: float | None = Field(None, description=IGNORED)
    s_tmax: float | None = Field(None, description=IGNORED)
    s_tmin: float | None = Field(None, description=IGNORED)
    s_noise: float | None = Field(None, description=IGNORED)
    override_settings: dict[str, Any] | None = Field(
        None, description="per-request options: sd_model_checkpoint, CLIP_stop_at_last_layers, sd_vae, "
                          "deepcache_interval (DeepCache: the full U-Net every N-th call; 1 = off), deepcache_branch")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(None, description="SDXL txt2img: a model (as sd_model_checkpoint names "
                                                             "it) that finishes the image from refiner_switch_at")
    refiner_switch_at: float | None = Field(None, description="fraction of the steps before the refiner takes "
                                                              "over (default 0.8)")
    disable_extra_networks: bool = Field(False, description=IGNORED)
    comments: dict[str, Any] | None = Field(None, description=IGNORED)
    script_name: str | None = Field(None, description="ldmkit has no selectable scripts: a name is a 422")
    script_args: list[Any] = Field(default_factory=list, description=IGNORED)
    send_images: bool = Field(True, description="false: return no images (only info)")
    save_images: bool = Field(False, description="also save the PNGs in the server's --output-dir, if it has one")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description=(
        'always-on scripts (/sdapi/v1/script-info): {"deepcache": {"args": [interval, branch]}}; others are a 422'))
    force_task_id: str | None = Field(None, max_length=200,
                                      description="id to recognise this job in /sdapi/v1/progress (state.task_id)")
    infotext: str | None = Field(None, description=IGNORED)

    @field_validator("force_task_id")
    @classmethod
    def _printable_task_id(cls, v: str | None) -> str | None:
        if v is not None and not v.isprintable():
            raise ValueError("force_task_id must be printable text (no control characters such as NUL)")
        return v


class Txt2ImgRequest(GenerationRequest):
    enable_hr: bool = Field(False, description="hires fix: generate at width x height, upscale, refine")
    denoising_strength: float | None = Field(None, description="hires fix: second-pass strength (0.7)")
    firstphase_width: int = Field(0, description=IGNORED)
    firstphase_height: int = Field(0, description=IGNORED)
    hr_scale: float = Field(2.0, description="hires fix: upscale factor (1-8)")
    hr_upscaler: str | None = Field(None, description="hires fix: a Latent mode or a /sdapi/v1/upscalers name")
    hr_second_pass_steps: int = Field(0, description="hires fix: second-pass steps (0: as steps)")
    hr_resize_x: int = Field(0, description="hires fix: target width instead of hr_scale (0: from height)")
    hr_resize_y: int = Field(0, description="hires fix: target height instead of hr_scale (0: from width)")
    hr_checkpoint_name: str | None = Field(None, description=IGNORED)
    hr_sampler_name: str | None = Field(None, description=IGNORED)
    hr_scheduler: str | None = Field(None, description=IGNORED)
    hr_prompt: str = Field("", description=IGNORED)
    hr_negative_prompt: str = Field("", description=IGNORED)


class Img2ImgRequest(GenerationRequest):
    init_images: list[str] = Field(..., min_length=1, description="base64 images (PNG/JPEG, data: URLs allowed)")
    resize_mode: int = Field(0, description="ignored: the image is resized to width x height")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, description=(
        "how much of the schedule to run; 0: one step at the lowest noise level, as A1111 (the image back)"))
    image_cfg_scale: float | None = Field(None, description=IGNORED)
    mask: str | None = Field(None, description="base64 mask for inpainting: white is repainted")
    mask_blur_x: int = Field(4, description="Gaussian blur of the mask, horizontal (pixels)")
    mask_blur_y: int = Field(4, description="Gaussian blur of the mask, vertical (pixels)")
    mask_blur: int | None = Field(None, description="sets mask_blur_x and mask_blur_y")
    mask_round: bool = Field(True, description=IGNORED)
    inpainting_fill: int = Field(0, description="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="only masked: repaint the mask's region at the full size")
    inpaint_full_res_padding: int = Field(0, description="only masked: pixels around the mask's region")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint the black part of the mask")
    initial_noise_multiplier: float | None = Field(None, description="scales the starting noise (default 1)")
    latent_mask: str | None = Field(None, description=IGNORED)
    include_init_images: bool = Field(False, description="echo init_images and mask in `parameters`")


class ImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs carrying their infotext")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seed, all_seeds, all_prompts, infotexts, sampler_name, ...")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the running request")
    eta_relative: float = Field(description="estimated seconds left")
    state: dict[str, Any]
    current_image: str | None = Field(None, description=(
        "base64 live preview of the running request (options: live_previews_enable, show_progress_every_n_steps, "
        "show_progress_type, live_previews_image_format png/jpeg/webp); null when skip_current_image"))
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class PNGInfoRequest(_Request):
    image: str = Field(description="base64 image")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the generation parameters text")
    items: dict[str, Any] = Field(description="the image's other text chunks")
    parameters: dict[str, Any] = Field(description="the parameters text parsed into fields")
