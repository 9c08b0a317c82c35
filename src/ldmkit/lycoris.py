"""LyCORIS networks (KohakuBlueleaf/LyCORIS) as A1111's Lora extension merges them.

Each module of such a file stores its own parametrisation of a weight update ``ΔW``; the file keys are
kohya's (``lora_unet_<module>.<role>``). With ``s`` the module's scale (``alpha / dim`` when the file
has an alpha and the kind has a rank ``dim``, else 1; a ``scale`` tensor overrides it) and ``m`` the
user's multiplier, the merged weight is ``W + m · s · ΔW`` (A1111 ``NetworkModule.finalize_updown``):

LoCon/Tucker  ``lora_down`` (r, in, 1, 1), ``lora_mid`` (r, r, kh, kw), ``lora_up`` (out, r, 1, 1):
              ``ΔW[i,j,k,l] = Σ mid[n,m,k,l] up[i,n] down[m,j]``; dim = r.
LoHa          ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` (Hadamard product of two low-rank products), each factor
              pair optionally Tucker-decomposed by ``hada_t1``/``hada_t2``:
              ``W_i[r,j,k,l] = Σ t[a,b,k,l] w_b[b,j] w_a[a,r]``; dim = ``hada_w1_b.shape[0]``.
LoKr          ``kron(w1, w2)`` with ``w1`` = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, ``w2`` = ``lokr_w2``,
              ``lokr_w2_a @ lokr_w2_b``, or Tucker ``lokr_t2`` over ``w2_a``/``w2_b``; for a conv, ``w1`` gets
              1x1 kernel axes and the product is reshaped to the conv weight; dim = the rank of the
              decomposed factor (``w2_b``, else ``w1_b``), none when both are full (scale 1).
(IA)³         ``W ⊙ w`` per output row (``on_input`` 0) or per input column (``on_input`` 1); scale 1.
full          ``diff`` is ΔW itself (``diff_b`` the bias update, times ``m`` only); scale 1.
norm          a LayerNorm/GroupNorm's ``w_norm`` and ``b_norm`` are its weight and bias updates; scale 1.

``dora_scale`` (DoRA) then rescales ``W + s·ΔW`` as :func:`ldmkit.lora.merged_weight` describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["locon-tucker", "loha", "lokr", "ia3", "full", "norm"]
# the roles of each kind in a kohya-style file (``<name>.<role>``)
ROLES: dict[str, Kind] = {
    "lora_mid.weight": "locon-tucker",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "weight": "ia3", "on_input": "ia3",
    "diff": "full", "diff_b": "full",
    "w_norm": "norm", "b_norm": "norm",
}
KIND_NAMES: dict[Kind, str] = {"locon-tucker": "LoCon (Tucker)", "loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)³",
                               "full": "full-diff", "norm": "norm"}
# tensors that may accompany any kind
COMMON = ("alpha", "scale", "dora_scale")
_REQUIRED: dict[Kind, tuple[str, ...]] = {
    "locon-tucker": ("lora_down.weight", "lora_mid.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": (),  # checked in lokr_factors: w1 or w1_a/w1_b, and w2 or w2_a/w2_b
    "ia3": ("weight",),
    "full": ("diff",),
    "norm": ("w_norm", "b_norm"),
}


def tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS ``make_weight_cp``: core ``t`` (a, b, kh, kw) with ``wa`` (a, r) and ``wb`` (b, j) -> (r, j, kh, kw)."""
    return torch.einsum("abkl,bj,ar->rjkl", t, wb, wa)


def _low_rank(up: Tensor, down: Tensor) -> Tensor:
    """``up @ down`` with every axis after the first flattened (conv factors store kernels in ``down``)."""
    return up.flatten(1) @ down.flatten(1)


@dataclass(frozen=True)
class LycoModule:
    """One target's LyCORIS update: its kind and the file's tensors by role."""

    kind: Kind
    w: dict[str, Tensor] = field(repr=False)

    @property
    def alpha(self) -> float | None:
        return float(self.w["alpha"].item()) if "alpha" in self.w else None

    @property
    def dim(self) -> int | None:
        """The rank that alpha is divided by; None for kinds without one."""
        w = self.w
        if self.kind == "locon-tucker":
            return w["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return w["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for role in ("lokr_w2_b", "lokr_w1_b"):
                if role in w:
                    return w[role].shape[0]
        return None

    @property
    def scale(self) -> float:
        if "scale" in self.w:
            return float(self.w["scale"].item())
        dim, alpha = self.dim, self.alpha
        return alpha / dim if dim is not None and alpha is not None else 1.0

    @property
    def magnitude(self) -> Tensor | None:
        return self.w.get("dora_scale")

    @property
    def dora(self) -> Literal["kohya"] | None:
        return "kohya" if "dora_scale" in self.w else None

    @property
    def in_features(self) -> int | None:
        """The layer's input width where the tensors alone show it (to name a LoRA's model family)."""
        w = self.w
        if self.kind == "full":
            return w["diff"].shape[1]
        if self.kind == "loha" and "hada_t1" not in w:
            return w["hada_w1_b"].shape[1] if w["hada_w1_b"].ndim == 2 else None
        if self.kind == "lokr":
            w1, w2 = lokr_factors(w)
            return w1.shape[1] * w2.shape[1] if w2.ndim == 2 else None
        if self.kind == "locon-tucker":
            return w["lora_down.weight"].shape[1]
        return None

    def delta(self, weight: Tensor) -> Tensor:
        """``s · ΔW`` in float32, shaped like ``weight`` (without the user's multiplier)."""
        w = {k: v.float() for k, v in self.w.items()}
        shape = weight.shape
        if self.kind == "locon-tucker":
            up, down = w["lora_up.weight"].flatten(1), w["lora_down.weight"].flatten(1)
            d = torch.einsum("nmkl,in,mj->ijkl", w["lora_mid.weight"], up, down)
        elif self.kind == "loha":
            d1 = tucker(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"]) if "hada_t1" in w else \
                _low_rank(w["hada_w1_a"], w["hada_w1_b"])
            d2 = tucker(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"]) if "hada_t2" in w else \
                _low_rank(w["hada_w2_a"], w["hada_w2_b"])
            d = d1.reshape(shape) * d2.reshape(shape)
        elif self.kind == "lokr":
            w1, w2 = lokr_factors(w)
            if w2.ndim == 4:  # conv: the scale factor w1 gets 1x1 kernel axes
                w1 = w1[:, :, None, None]
            # a 2-D w2 of a conv holds the kernel in its columns (in · kh · kw): the reshape below places it
            d = torch.kron(w1, w2.contiguous())
        elif self.kind == "ia3":
            v = w["weight"]
            on_input = bool(w["on_input"].item()) if "on_input" in w else False
            v = v.reshape(1, -1, *[1] * (len(shape) - 2)) if on_input else v.reshape(-1, *[1] * (len(shape) - 1))
            d = weight.float() * v
        elif self.kind == "norm":
            d = w["w_norm"]
        else:
            d = w["diff"]
        if d.numel() != math.prod(shape):
            raise ValueError(f"a {self.kind} update of shape {tuple(d.shape)} does not fit the layer {tuple(shape)}")
        return d.reshape(shape) * self.scale

    def bias_delta(self) -> Tensor | None:
        """The bias update (full-diff ``diff_b``, norm ``b_norm``), not scaled: A1111 multiplies it by the
        multiplier only."""
        b = self.w.get("diff_b", self.w.get("b_norm"))
        return None if b is None else b.float()


def lokr_factors(w: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """LoKr's two Kronecker factors, each full or rebuilt from its low-rank (or Tucker) parts."""
    w = {k: v.float() for k, v in w.items()}
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        w1 = w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    elif "lokr_t2" in w:
        w2 = tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    return w1, w2


def module_from_roles(name: str, roles: dict[str, Tensor]) -> LycoModule:
    """The LyCORIS module a target's tensors describe; ValueError naming what is missing or mixed."""
    kinds = {ROLES[r] for r in roles if r in ROLES}
    if len(kinds) != 1:
        raise ValueError(f"{name} mixes LyCORIS kinds ({', '.join(sorted(kinds))})" if kinds
                         else f"{name} has no LyCORIS weights (only {', '.join(sorted(roles))})")
    kind = kinds.pop()
    missing = [r for r in _REQUIRED[kind] if r not in roles]
    if kind == "lokr":
        if "lokr_w1" not in roles and not {"lokr_w1_a", "lokr_w1_b"} <= roles.keys():
            missing.append("lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        if "lokr_w2" not in roles and not {"lokr_w2_a", "lokr_w2_b"} <= roles.keys():
            missing.append("lokr_w2 (or lokr_w2_a and lokr_w2_b)")
    if missing:
        raise ValueError(f"{name} is a LyCORIS {KIND_NAMES[kind]} module without {', '.join(missing)}; "
                         "the file is incomplete")
    return LycoModule(kind, dict(roles))
