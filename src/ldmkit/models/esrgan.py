"""The ESRGAN family of image upscalers: RRDBNet (ESRGAN, Real-ESRGAN, BSRGAN, 4x-UltraSharp and other
community files) and Real-ESRGAN's compact SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3).

Attribute names are those of the published new layout (XPixelGroup/BasicSR ``rrdbnet_arch.py``,
xinntao/Real-ESRGAN ``srvgg_arch.py``), so BasicSR / Real-ESRGAN files load without conversion.
Two other layouts are converted by key (:func:`to_new_layout`):

- the original ESRGAN repository's (and most community files', e.g. 4x-UltraSharp): one
  ``nn.Sequential`` named ``model``: ``model.0`` first conv, ``model.1.sub.N.RDB1.conv1.0`` the blocks,
  ``model.1.sub.<num_block>`` the body conv, then per x2 step an (upsample, conv, lrelu) triple whose
  conv is ``model.3``, ``model.6``, ..., and finally the HR conv and the last conv two and four
  indices after the last upsampling conv;
- BSRGAN / RealSR: ``RRDB_trunk.N.RDB1.conv1``, ``trunk_conv``, ``upconv1``, ``HRconv``.

Configuration (width, blocks, growth channels, x2 steps, pixel-unshuffle factor, activation) is read
from the keys and shapes by :func:`detect`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

StateDict = dict[str, Tensor]


class UpscalerFormatError(ValueError):
    """A state dict that is not one of the architectures here; the message says what was found."""


# ---------------------------------------------------------------- RRDBNet (ESRGAN)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; the output is scaled by 0.2 and added (ESRGAN, Wang et al. 2018)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        for i in range(1, 6):
            out = num_feat if i == 5 else num_grow_ch
            setattr(self, f"conv{i}", nn.Conv2d(num_feat + (i - 1) * num_grow_ch, out, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, scaled by 0.2 and added."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator. ``num_upsample`` nearest-x2 + conv steps (BasicSR: always 2); Real-ESRGAN's x2
    and x1 models first pixel-unshuffle by ``unshuffle`` (2 or 4), so the network runs at lower resolution."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 23,
                 num_grow_ch: int = 32, num_upsample: int = 2, unshuffle: int = 1):
        super().__init__()
        self.num_upsample, self.unshuffle = num_upsample, unshuffle
        self.conv_first = nn.Conv2d(num_in_ch * unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        for i in range(1, num_upsample + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    @property
    def scale(self) -> float:
        return 2**self.num_upsample / self.unshuffle

    def forward(self, x: Tensor) -> Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)  # (B, C*u*u, H/u, W/u)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.num_upsample + 1):
            feat = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = F.leaky_relu(getattr(self, f"conv_up{i}")(feat), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


# ---------------------------------------------------------------- SRVGGNetCompact (Real-ESRGAN compact)


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact net: a plain conv/activation chain at low resolution, one pixel shuffle, plus the
    nearest-upsampled input (the net learns the residual). ``body`` indices are those of the published files."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_conv: int = 16,
                 upscale: int = 4, act_type: str = "prelu"):
        super().__init__()
        self.upscale = upscale

        def act() -> nn.Module:
            if act_type == "prelu":
                return nn.PReLU(num_parameters=num_feat)
            if act_type == "relu":
                return nn.ReLU()
            if act_type == "leakyrelu":
                return nn.LeakyReLU(0.1)
            raise ValueError(f"SRVGGNetCompact: unknown act_type {act_type!r}; expected prelu, relu or leakyrelu")

        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), act()]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), act()]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    @property
    def scale(self) -> float:
        return float(self.upscale)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.upscale)  # (B, C, H*s, W*s)
        return out + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


# ---------------------------------------------------------------- layouts and detection


@dataclass(frozen=True)
class UpscalerArch:
    """What :func:`detect` read from a state dict; ``build`` makes the matching module."""

    kind: str  # "ESRGAN" (RRDBNet) or "Compact" (SRVGGNetCompact)
    in_ch: int
    out_ch: int
    num_feat: int
    num_block: int  # RRDB blocks, or the compact net's num_conv
    scale: int
    num_grow_ch: int = 32
    num_upsample: int = 2
    unshuffle: int = 1
    layout: str = "new"  # the key layout of the file: new (BasicSR), old (ESRGAN repo), bsrgan, compact

    def describe(self) -> str:
        what = (f"ESRGAN/RRDBNet {self.num_block} blocks, {self.num_feat} features" if self.kind == "ESRGAN"
                else f"Real-ESRGAN compact (SRVGGNetCompact) {self.num_block} convs, {self.num_feat} features")
        extra = f", pixel-unshuffle {self.unshuffle}" if self.unshuffle > 1 else ""
        return f"{what}, x{self.scale}{extra}, {self.layout} key layout"

    def build(self) -> nn.Module:
        if self.kind == "Compact":
            return SRVGGNetCompact(self.in_ch, self.out_ch, self.num_feat, self.num_block, self.scale)
        return RRDBNet(self.in_ch, self.out_ch, self.num_feat, self.num_block, self.num_grow_ch,
                       self.num_upsample, self.unshuffle)


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_BSRGAN_RDB = re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)")
_NEW_RDB = re.compile(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)")


def layout_of(sd: StateDict) -> str | None:
    """"new", "old", "bsrgan", "compact", or None when the keys are none of these architectures."""
    keys = sd.keys()
    if "model.0.weight" in keys and "model.1.sub.0.RDB1.conv1.0.weight" in keys:
        return "old"
    if "conv_first.weight" in keys and "body.0.rdb1.conv1.weight" in keys:
        return "new"
    if "conv_first.weight" in keys and "RRDB_trunk.0.RDB1.conv1.weight" in keys:
        return "bsrgan"
    if "body.0.weight" in keys and "body.1.weight" in keys and sd["body.0.weight"].ndim == 4:
        return "compact"
    return None


def to_new_layout(sd: StateDict) -> tuple[StateDict, str]:
    """The state dict with BasicSR's key names, and the layout it came in."""
    layout = layout_of(sd)
    if layout in ("new", "compact"):
        return dict(sd), layout
    if layout == "bsrgan":
        names = {"trunk_conv": "conv_body", "HRconv": "conv_hr", "upconv1": "conv_up1", "upconv2": "conv_up2",
                 "upconv3": "conv_up3"}
        out = {}
        for k, v in sd.items():
            m = _BSRGAN_RDB.fullmatch(k)
            if m:
                out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
            else:
                head, _, tail = k.partition(".")
                out[f"{names.get(head, head)}.{tail}"] = v
        return out, layout
    if layout == "old":
        return _old_to_new(sd), layout
    raise UpscalerFormatError(_not_an_upscaler(sd))


def _old_to_new(sd: StateDict) -> StateDict:
    out: StateDict = {}
    blocks = {int(m[1]) for k in sd if (m := _OLD_RDB.fullmatch(k))}
    num_block = max(blocks) + 1
    top = sorted({int(k.split(".")[1]) for k in sd if re.fullmatch(r"model\.\d+\.(weight|bias)", k)})
    # model.0 first conv; then upsampling convs at 3, 6, ...; HR conv and last conv at the two highest
    if len(top) < 3 or top[0] != 0:
        raise UpscalerFormatError(f"old-layout ESRGAN file with unexpected top-level layers model.{top}")
    *ups, hr, last = top[1:]
    if ups != [3 * (i + 1) for i in range(len(ups))] or hr != (ups[-1] if ups else 0) + 2 or last != hr + 2:
        raise UpscalerFormatError(f"old-layout ESRGAN file with unexpected top-level layers model.{top}; "
                                  "expected model.0, model.3, model.6, ..., then the HR and last convs")
    names = {0: "conv_first", hr: "conv_hr", last: "conv_last", **{u: f"conv_up{i + 1}" for i, u in enumerate(ups)}}
    for k, v in sd.items():
        m = _OLD_RDB.fullmatch(k)
        if m:
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
        elif k.startswith(f"model.1.sub.{num_block}."):
            out["conv_body." + k.rsplit(".", 1)[1]] = v
        elif (m2 := re.fullmatch(r"model\.(\d+)\.(weight|bias)", k)) and int(m2[1]) in names:
            out[f"{names[int(m2[1])]}.{m2[2]}"] = v
        else:
            out[k] = v  # left for the strict load to name
    return out


def _not_an_upscaler(sd: StateDict) -> str:
    keys = sorted(sd)
    sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return "this is a Stable Diffusion checkpoint, not an upscaler; pass it as --model"
    from ldmkit import file_kind  # a LoRA, ControlNet, VAE, ... file says what it is and the option that takes it

    if why := file_kind.misplaced(file_kind.kind_of_keys(keys), "an upscaler", (file_kind.UPSCALER,)):
        return f"this is {why}"
    if any(k.startswith("lora_") or ".lora_" in k for k in keys):
        return "this is a LoRA, not an upscaler"
    if any(".conv1x1." in k for k in keys):
        return "ESRGAN+ (conv1x1 in the dense blocks) is not supported; supported: ESRGAN/RRDBNet, Real-ESRGAN"
    return (f"not an ESRGAN-family upscaler (keys {sample}); supported: ESRGAN/RRDBNet (old and new key "
            "layouts, 4x-UltraSharp-style files), Real-ESRGAN x4plus/x2plus, Real-ESRGAN compact (SRVGG)")


def _shape(sd: StateDict, key: str, ndim: int = 4) -> tuple[int, ...]:
    if key not in sd:
        raise UpscalerFormatError(f"missing key {key}")
    t = sd[key]
    if t.ndim != ndim:
        raise UpscalerFormatError(f"{key} has shape {tuple(t.shape)}; expected {ndim} dimensions")
    return tuple(t.shape)


def detect(sd: StateDict) -> tuple[UpscalerArch, StateDict]:
    """The architecture of ``sd`` (any supported layout) and the state dict in the new (module) layout."""
    new, layout = to_new_layout(sd)
    if layout == "compact":
        n = 1 + max(int(m[1]) for k in new if (m := re.fullmatch(r"body\.(\d+)\.weight", k)))
        num_feat, in_ch = _shape(new, "body.0.weight")[:2]
        last = _shape(new, f"body.{n - 1}.weight")[0]
        if n < 3 or n % 2 == 0:
            raise UpscalerFormatError(f"compact net with {n} body layers; expected conv, PReLU pairs and a last conv")
        # the last conv feeds a pixel shuffle: out_ch * scale^2 channels; the input is added, so out_ch = in_ch
        scale = round((last / in_ch) ** 0.5)
        if in_ch * scale * scale != last:
            raise UpscalerFormatError(f"compact net's last conv has {last} channels, not {in_ch} x scale^2")
        return UpscalerArch("Compact", in_ch, in_ch, num_feat, (n - 3) // 2, scale, layout=layout), new
    num_block = 1 + max(int(m[1]) for k in new if (m := _NEW_RDB.fullmatch(k)))
    num_feat, first_in = _shape(new, "conv_first.weight")[:2]
    num_grow_ch = _shape(new, "body.0.rdb1.conv1.weight")[0]
    out_ch = _shape(new, "conv_last.weight")[0]
    num_upsample = sum(1 for k in new if re.fullmatch(r"conv_up\d\.weight", k))
    # Real-ESRGAN x2plus / x1: pixel-unshuffle before conv_first (in_ch 12 = 3*2*2, 48 = 3*4*4)
    unshuffle = next((u for u in (1, 2, 4) if first_in == out_ch * u * u), 1)
    in_ch = first_in // (unshuffle * unshuffle)
    if 2**num_upsample % unshuffle:
        raise UpscalerFormatError(f"ESRGAN with {num_upsample} x2 steps after a pixel-unshuffle by {unshuffle}")
    scale = 2**num_upsample // unshuffle
    return UpscalerArch("ESRGAN", in_ch, out_ch, num_feat, num_block, scale, num_grow_ch, num_upsample, unshuffle,
                        layout), new
