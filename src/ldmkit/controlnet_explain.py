"""The explain page's ControlNet section: each unit's control map and how hard its residuals pushed on the U-Net,
per block and step (root-mean-square of each residual, recorded by :func:`ldmkit.controlnet.trace_residuals`
while ``explain`` runs the generation's own path)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ControlView:
    index: int
    name: str  # the ControlNet's name (and hash)
    settings: str  # weight, window, mode, ...
    map_image: Image.Image  # the map the ControlNet read
    rms: np.ndarray  # (steps, blocks): mean RMS over the step's U-Net calls, NaN where the unit was off
    kind: str = "controlnet"  # or "adapter": a T2I-Adapter, whose blocks are its feature levels; or "lllite"
    blocks: tuple[str, ...] = ()  # a ControlNet-LLLite's: the U-Net blocks its modules act in ("input 4", ...)


def control_views(units: Sequence[object], rows: Sequence[tuple[object, int, list[float]]], steps: int
                  ) -> list[ControlView]:
    """The views of ``units`` (ControlUnits, T2I-Adapter AdapterUnits, LLLiteUnits) from the trace ``rows``."""
    from ldmkit.controlnet_lllite import LLLiteUnit
    from ldmkit.controlnet_lllite import blocks as lllite_blocks
    from ldmkit.t2i_adapter import AdapterUnit, feature_shapes

    views = []
    for k, unit in enumerate(units):
        image = getattr(unit, "image", None)
        adapter, lllite = isinstance(unit, AdapterUnit), isinstance(unit, LLLiteUnit)
        if image is None or not (adapter or lllite or hasattr(unit, "control_mode")):
            continue
        mine = [(i, rms) for u, i, rms in rows if u is unit]
        names = tuple(lllite_blocks(unit.model)) if lllite else ()  # type: ignore[attr-defined]
        blocks = (len(mine[0][1]) if mine else len(names) if lllite
                  else len(feature_shapes(unit.model.cfg)) if adapter  # type: ignore[attr-defined]
                  else len(getattr(unit.model, "zero_convs", [])) + 1)  # type: ignore[attr-defined]
        table = np.full((steps, blocks), np.nan)
        count = np.zeros(steps)
        for i, rms in mine:
            if i < steps:
                table[i] = np.nan_to_num(table[i]) + np.asarray(rms)
                count[i] += 1
        table[count > 0] /= count[count > 0, None]
        maps = torch.cat(image[0].split(3), dim=2)  # a ControlNet Union's several maps: side by side
        if maps.shape[0] == 1:  # a grey map (sketch adapters)
            maps = maps.expand(3, -1, -1)
        a = (maps.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        s = getattr(unit, "settings", None) or {}
        name = str(s.get("model") or getattr(unit.model, "source_name", f"ControlNet {k}"))  # type: ignore[attr-defined]
        mode = (f"T2I-Adapter ({unit.model.cfg.adapter_type})" if adapter  # type: ignore[attr-defined]
                else f"ControlNet-LLLite, CFG rows: {unit.batch}" if lllite  # type: ignore[attr-defined]
                else unit.control_mode)  # type: ignore[attr-defined]
        text = (f"weight {unit.weight:g}, steps {unit.start:g}–{unit.end:g} of the run, "  # type: ignore[attr-defined]
                f"{mode}"
                + (f", preprocessor {s['module']}, {s['resize_mode']}" if s else "")
                + _union_text(unit))
        views.append(ControlView(k, name, text, Image.fromarray(a), table,
                                 "adapter" if adapter else "lllite" if lllite else "controlnet", names))
    return views


def _union_text(unit: object) -> str:
    types = getattr(unit, "control_types", ())
    if not types:
        return ""
    from ldmkit.models.controlnet_union import UNION_TYPES

    text = ", ControlNet Union: " + " + ".join("auto (no type)" if t < 0 else UNION_TYPES[t] if t < len(UNION_TYPES)
                                               else str(t) for t in types)
    weights, windows = getattr(unit, "map_weights", ()), getattr(unit, "map_windows", ())
    if weights:  # each map's own weight and window
        text += ", per map: " + " + ".join(f"weight {w:g} in {s:g}–{e:g}" for w, (s, e) in zip(weights, windows,
                                                                                              strict=True))
    return text


def images(views: Sequence[ControlView]) -> dict[str, Image.Image]:
    return {f"control{v.index}": v.map_image for v in views}


def render_section(views: Sequence[ControlView], files: dict[str, str]) -> str:
    """The HTML section (explain.py's helpers) for ``views``."""
    from ldmkit.explain import _fig, _section, _table

    body = []
    for v in views:
        steps, blocks = v.rms.shape
        if v.kind == "adapter":
            head = ["step"] + [f"level {b + 1}" for b in range(blocks)]
        elif v.kind == "lllite":
            head = ["step"] + [f"{b} block" for b in v.blocks]
        else:
            head = ["step"] + [f"skip {b + 1}" for b in range(blocks - 1)] + ["middle"]
        peak = np.nanmax(v.rms) if np.isfinite(v.rms).any() else 1.0
        rows = []
        for i in range(steps):
            cells = [str(i + 1)]
            for x in v.rms[i]:
                if np.isnan(x):
                    cells.append('<span class="off">off</span>')
                else:  # shaded by its share of the largest value on the table
                    a = 0.08 + 0.6 * float(x) / float(peak or 1.0)
                    cells.append(f'<span style="background:rgba(230,120,40,{a:.2f})">{x:.3g}</span>')
            rows.append(cells)
        what = {"adapter": "T2I-Adapter", "lllite": "ControlNet-LLLite"}.get(v.kind, "ControlNet")
        body.append(f"<h3>{what} {v.index}: {html.escape(v.name)}</h3><p>{html.escape(v.settings)}</p>"
                    f'<div class="row">{_fig(files[f"control{v.index}"], "the control map it read", "px")}'
                    f"{_table(head, rows)}</div>")
    return _section(
        "controlnet", "ControlNet: a second network that follows the map",
        "A ControlNet is a copy of the U-Net's encoder that also reads the control map. At every step it runs on "
        "the same noisy latent and adds one residual to each of the U-Net's skip connections and to its middle "
        "block. The table gives the root-mean-square of each residual (after its weight and control mode) per "
        "step, averaged over the step's U-Net calls: large numbers are where the map pulls hardest on the "
        "image; 'off' marks steps outside its start–end window. Skip 1 is the finest resolution (the first "
        "encoder block), the middle the coarsest. A T2I-Adapter instead encodes the map once into one feature "
        "per U-Net level, added to the encoder's output there at every active step: its table gives each "
        "level's feature RMS (after its weight), level 1 the finest. A ControlNet-LLLite adds a small module's "
        "output to the input of attention layers inside the U-Net's blocks: its table gives the RMS of what its "
        "modules added in each block (after its weight), over all their layers and the call's rows.",
        "".join(body))


__all__ = ["ControlView", "control_views", "images", "render_section"]
