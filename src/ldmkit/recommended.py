"""Settings a model file recommends (sampler, schedule, steps, CFG scale), kept in its safetensors metadata.

A distilled few-step model is only good with the settings it was distilled for (an LCM model with
the LCM sampler, 4 steps, CFG 1). The file records them under ``ldmkit.recommended`` as JSON; the
CLI and the Python API use each one the user does not give.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

RECOMMENDED_METADATA_KEY = "ldmkit.recommended"


@dataclass(frozen=True)
class Recommended:
    """A model's recommended generation settings; None where the file recommends nothing."""

    sampler: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, sort_keys=True)


def _check(r: Recommended) -> Recommended:
    from ldmkit.samplers import resolve_sampler
    from ldmkit.schedules import SCHEDULES

    if r.sampler is not None:
        resolve_sampler(r.sampler)  # ValueError naming the valid samplers
    if r.scheduler is not None and r.scheduler.lower() not in SCHEDULES:
        raise ValueError(f"unknown schedule {r.scheduler!r}; valid schedules: {', '.join(SCHEDULES)}")
    if r.steps is not None and (not isinstance(r.steps, int) or r.steps < 1):
        raise ValueError(f"recommended steps must be an integer >= 1, got {r.steps!r}")
    if r.cfg_scale is not None and not isinstance(r.cfg_scale, int | float):
        raise ValueError(f"recommended cfg_scale must be a number, got {r.cfg_scale!r}")
    return r


def recommended_metadata(sampler: str, steps: int, cfg_scale: float, scheduler: str | None = None) -> dict[str, str]:
    """Metadata entries to merge into a safetensors file's metadata so that loaders use these settings.

    ``recommended_metadata("LCM", 4, 1.0)`` -> ``{"ldmkit.recommended": '{"cfg_scale": 1.0, ...}'}``.
    Raises ValueError for an unknown sampler or schedule, or steps < 1.
    """
    r = _check(Recommended(sampler=sampler, scheduler=scheduler, steps=steps, cfg_scale=float(cfg_scale)))
    return {RECOMMENDED_METADATA_KEY: r.to_json()}


def read_recommended(metadata: Mapping[str, str]) -> Recommended | None:
    """The recommendations in a safetensors file's metadata (None if it has none).

    Raises ValueError naming the problem when the entry is not valid JSON or names unknown settings.
    """
    text = metadata.get(RECOMMENDED_METADATA_KEY)
    if text is None:
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata {RECOMMENDED_METADATA_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"metadata {RECOMMENDED_METADATA_KEY!r} must be a JSON object, got {text!r}")
    unknown = set(d) - set(Recommended.__dataclass_fields__)
    if unknown:
        raise ValueError(f"metadata {RECOMMENDED_METADATA_KEY!r} has unknown settings: {', '.join(sorted(unknown))}")
    return _check(Recommended(**d))


def apply_recommended(options: Mapping[str, object], rec: Recommended | None) -> dict[str, object]:
    """``options`` with each recommended setting the user left out (absent or None) filled in.

    Explicit options always win. The recommended schedule comes only with the recommended sampler:
    a user who picks another sampler gets that sampler's own default schedule.
    """
    out = dict(options)
    if rec is None:
        return out
    sampler_given = out.get("sampler") is not None
    for name in ("sampler", "steps", "cfg_scale", "scheduler"):
        value = getattr(rec, name)
        if out.get(name) is None and value is not None and not (name == "scheduler" and sampler_given):
            out[name] = value
    return out


def implied_recommended(guidance_embedded: bool) -> Recommended | None:
    """What a file without recommendations implies: a guidance-embedded (full LCM) U-Net works only as a
    few-step consistency model, so LCM, 4 steps, guidance 8.5 (diffusers' LatentConsistencyModelPipeline)."""
    return Recommended(sampler="LCM", steps=4, cfg_scale=8.5) if guidance_embedded else None


def file_recommended(path: str | os.PathLike) -> Recommended | None:
    """The recommendations in a .safetensors file's header (None for other files or none stored), read
    without loading its tensors: an LCM-LoRA recommends the sampler it was distilled for."""
    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    try:
        return read_recommended(metadata)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
