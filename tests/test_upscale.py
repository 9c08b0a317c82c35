"""Upscalers: each architecture re-implemented here from its published definition, with random weights, saved
in each key layout people have, must give the same output after ldmkit loads the file.

References written independently of ``ldmkit.models.esrgan``:
- new layout: BasicSR ``rrdbnet_arch.py`` / Real-ESRGAN ``srvgg_arch.py`` forward passes as plain functions
  over a dict of tensors;
- old layout: the original ESRGAN repository's ``nn.Sequential`` (``B.sequential`` flattens nested
  sequentials, so the upsampling convs land at ``model.3``, ``model.6``, ... and ``conv_block`` wraps each dense
  conv in a Sequential: ``RDB1.conv1.0``), as real modules whose own ``state_dict()`` gives the keys.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ldmkit.checkpoint import CheckpointError
from ldmkit.cli import main
from ldmkit.upscale import load_upscaler, run_network, upscale

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- references (published definitions)


def _conv(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], padding=1)


def basicsr_rrdbnet(p: dict, x: torch.Tensor, scale: int) -> torch.Tensor:
    """BasicSR RRDBNet.forward (scale 2: pixel_unshuffle 2; scale 1: pixel_unshuffle 4; then two x2 steps)."""
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    feat = F.pixel_unshuffle(x, {4: 1, 2: 2, 1: 4}[scale]) if scale != 4 else x
    feat = _conv(p, "conv_first", feat)
    body = feat
    nb = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("body."))
    for b in range(nb):
        rrdb_in = body
        for r in (1, 2, 3):
            n = f"body.{b}.rdb{r}"
            x1 = lrelu(_conv(p, f"{n}.conv1", body))
            x2 = lrelu(_conv(p, f"{n}.conv2", torch.cat((body, x1), 1)))
            x3 = lrelu(_conv(p, f"{n}.conv3", torch.cat((body, x1, x2), 1)))
            x4 = lrelu(_conv(p, f"{n}.conv4", torch.cat((body, x1, x2, x3), 1)))
            x5 = _conv(p, f"{n}.conv5", torch.cat((body, x1, x2, x3, x4), 1))
            body = x5 * 0.2 + body
        body = body * 0.2 + rrdb_in
    feat = feat + _conv(p, "conv_body", body)
    feat = lrelu(_conv(p, "conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(_conv(p, "conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return _conv(p, "conv_last", lrelu(_conv(p, "conv_hr", feat)))


def basicsr_params(nf: int, nb: int, gc: int, scale: int, seed: int, in_ch: int = 3, out_ch: int = 3) -> dict:
    """Random tensors with the shapes BasicSR RRDBNet.__init__ gives (num_in_ch x4 for scale 2, x16 for 1)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv_first": (nf, in_ch * {4: 1, 2: 4, 1: 16}[scale])}
    for b in range(nb):
        for r in (1, 2, 3):
            for i in range(1, 6):
                shapes[f"body.{b}.rdb{r}.conv{i}"] = (nf if i == 5 else gc, nf + (i - 1) * gc)
    shapes.update({k: (nf, nf) for k in ("conv_body", "conv_up1", "conv_up2", "conv_hr")})
    shapes["conv_last"] = (out_ch, nf)
    p = {}
    for name, (o, i) in shapes.items():
        p[f"{name}.weight"] = torch.randn(o, i, 3, 3, generator=g) * (1.0 / (3 * i**0.5))
        p[f"{name}.bias"] = torch.randn(o, generator=g) * 0.02
    return p


def realesrgan_srvgg(p: dict, x: torch.Tensor, num_conv: int, upscale_: int) -> torch.Tensor:
    """Real-ESRGAN SRVGGNetCompact.forward with act_type='prelu'."""
    out = x
    for i in range(num_conv + 1):
        out = F.prelu(_conv(p, f"body.{2 * i}", out), p[f"body.{2 * i + 1}.weight"])
    out = F.pixel_shuffle(_conv(p, f"body.{2 * num_conv + 2}", out), upscale_)
    return out + F.interpolate(x, scale_factor=upscale_, mode="nearest")


def srvgg_params(nf: int, num_conv: int, upscale_: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = {}
    for i in range(num_conv + 2):
        cin = 3 if i == 0 else nf
        cout = 3 * upscale_**2 if i == num_conv + 1 else nf
        p[f"body.{2 * i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (1.0 / (3 * cin**0.5))
        p[f"body.{2 * i}.bias"] = torch.randn(cout, generator=g) * 0.02
        if i <= num_conv:
            p[f"body.{2 * i + 1}.weight"] = 0.25 + 0.1 * torch.randn(nf, generator=g)  # PReLU slopes
    return p


class OldRDB(nn.Module):
    """ESRGAN repo block.ResidualDenseBlock_5C: conv_block = Sequential(conv[, LeakyReLU(0.2)])."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for i in range(1, 6):
            act = [nn.LeakyReLU(0.2)] if i < 5 else []
            setattr(self, f"conv{i}", nn.Sequential(nn.Conv2d(nf + (i - 1) * gc, gc if i < 5 else nf, 3, 1, 1), *act))

    def forward(self, x):
        xs = [x]
        for i in range(1, 6):
            xs.append(getattr(self, f"conv{i}")(torch.cat(xs, 1)))
        return xs[-1] * 0.2 + x


class OldRRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = OldRDB(nf, gc), OldRDB(nf, gc), OldRDB(nf, gc)

    def forward(self, x):
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class ShortcutBlock(nn.Module):
    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return x + self.sub(x)


class OldESRGAN(nn.Module):
    """ESRGAN repo architecture.RRDBNet: model = sequential(fea_conv, ShortcutBlock(RRDBs + LR_conv),
    [Upsample, conv, lrelu] per x2 step, HR_conv0 + lrelu, HR_conv1); ``unshuffle``: a Real-ESRGAN x2/x1
    file converted to this layout."""

    def __init__(self, nf: int, nb: int, gc: int, n_up: int, unshuffle: int = 1):
        super().__init__()
        self.unshuffle = unshuffle
        layers = [nn.Conv2d(3 * unshuffle**2, nf, 3, 1, 1),
                  ShortcutBlock(nn.Sequential(*(OldRRDB(nf, gc) for _ in range(nb)), nn.Conv2d(nf, nf, 3, 1, 1)))]
        for _ in range(n_up):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(nf, nf, 3, 1, 1), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(nf, 3, 3, 1, 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x)


def _old_esrgan(nf, nb, gc, n_up, unshuffle=1, seed=0) -> OldESRGAN:
    torch.manual_seed(seed)
    m = OldESRGAN(nf, nb, gc, n_up, unshuffle).eval()
    with torch.no_grad():  # default init makes dense blocks tiny; smaller weights keep outputs in range
        for prm in m.parameters():
            prm.mul_(0.5)
    return m


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _save(sd: dict, path, wrapper: str | None = None):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({wrapper: sd} if wrapper else sd, str(path))
    return path


# ---------------------------------------------------------------- parity through every layout


@pytest.mark.parametrize("scale", [4, 2, 1])
@pytest.mark.parametrize("fmt", ["params_ema.pth", "params.pth", "plain.pth", "safetensors"])
def test_new_layout_rrdbnet_matches_basicsr(tmp_path, scale, fmt):
    p = basicsr_params(nf=8, nb=2, gc=4, scale=scale, seed=scale)
    wrapper = fmt.split(".")[0] if fmt.endswith(".pth") and not fmt.startswith("plain") else None
    path = _save(p, tmp_path / f"model.{fmt.split('.')[-1]}", wrapper)
    up = load_upscaler(path)
    a = up.arch
    assert (a.kind, up.scale, a.num_block, a.num_feat, a.num_grow_ch) == ("ESRGAN", scale, 2, 8, 4)
    assert up.arch.unshuffle == {4: 1, 2: 2, 1: 4}[scale] and up.arch.layout == "new"
    x = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    ref = basicsr_rrdbnet(p, x, scale)
    assert ref.shape == (1, 3, 12 * scale, 16 * scale)
    assert _rel(run_network(up.module, x, tile=0), ref) <= 1e-5


@pytest.mark.parametrize("n_up,unshuffle,scale", [(2, 1, 4), (1, 1, 2), (3, 1, 8), (2, 2, 2), (0, 1, 1)])
@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_old_layout_esrgan_matches_original_arch(tmp_path, n_up, unshuffle, scale, ext):
    ref = _old_esrgan(nf=8, nb=2, gc=4, n_up=n_up, unshuffle=unshuffle, seed=n_up)
    sd = ref.state_dict()
    assert "model.1.sub.0.RDB1.conv1.0.weight" in sd and "model.1.sub.2.weight" in sd  # the published keys
    up = load_upscaler(_save(sd, tmp_path / f"old.{ext}"))
    assert (up.arch.layout, up.scale, up.arch.num_block, up.arch.unshuffle) == ("old", scale, 2, unshuffle)
    x = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(x)
    assert _rel(run_network(up.module, x, tile=0), expected) <= 1e-5


def _renamed(p: dict, names: dict, rdb: str) -> dict:
    """BasicSR-named tensors under another layout's names: ``names`` for the top-level convs, ``rdb`` (a format
    of b, r, c: block, dense block, conv) for the dense blocks' convs."""
    out = {}
    for k, v in p.items():
        head, kind = k.rsplit(".", 1)
        if head.startswith("body."):
            _, b, r, c = head.split(".")
            out[f"{rdb.format(b=b, r=r[-1], c=c)}.{kind}"] = v
        else:
            out[f"{names.get(head, head)}.{kind}"] = v
    return out


def test_old_and_new_layouts_of_the_same_weights_agree(tmp_path):
    """The x4 old layout converted by ldmkit equals BasicSR's forward on the same tensors renamed as
    spandrel/A1111 rename them (conv_up1 -> model.3, conv_up2 -> model.6, conv_hr -> model.8, conv_last -> model.10)."""
    p = basicsr_params(nf=8, nb=3, gc=4, scale=4, seed=7)
    names = {"conv_first": "model.0", "conv_body": "model.1.sub.3", "conv_up1": "model.3", "conv_up2": "model.6",
             "conv_hr": "model.8", "conv_last": "model.10"}
    old = _renamed(p, names, "model.1.sub.{b}.RDB{r}.{c}.0")
    up = load_upscaler(_save(old, tmp_path / "old.pth"))
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    assert _rel(run_network(up.module, x, tile=0), basicsr_rrdbnet(p, x, 4)) <= 1e-5


def test_bsrgan_layout(tmp_path):
    """BSRGAN / RealSR files name the same tensors RRDB_trunk.N.RDBr.convc, trunk_conv, upconv1/2, HRconv."""
    p = basicsr_params(nf=8, nb=2, gc=4, scale=4, seed=8)
    names = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}
    renamed = _renamed(p, names, "RRDB_trunk.{b}.RDB{r}.{c}")
    up = load_upscaler(_save(renamed, tmp_path / "BSRGAN.pth"))
    assert (up.arch.layout, up.scale, up.arch.num_block) == ("bsrgan", 4, 2)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    assert _rel(run_network(up.module, x, tile=0), basicsr_rrdbnet(p, x, 4)) <= 1e-5


def test_ultrasharp_style_file_detected(tmp_path):
    """4x-UltraSharp and most community ESRGAN files: old layout, 23 blocks, 64 features, x4."""
    ref = _old_esrgan(nf=64, nb=23, gc=32, n_up=2, seed=5)
    up = load_upscaler(_save(ref.state_dict(), tmp_path / "4x-UltraSharp.pth"))
    assert up.name == "4x-UltraSharp"
    a = up.arch
    assert (a.kind, a.layout, a.num_block, a.num_feat, a.num_grow_ch, a.scale) == ("ESRGAN", "old", 23, 64, 32, 4)
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(run_network(up.module, x, tile=0), ref(x)) <= 1e-5


@pytest.mark.parametrize("num_conv,scale", [(4, 4), (2, 2), (32, 4)])
@pytest.mark.parametrize("fmt", ["params.pth", "safetensors"])
def test_compact_srvgg_matches_realesrgan(tmp_path, num_conv, scale, fmt):
    """realesr-general-x4v3: SRVGGNetCompact(num_feat=64, num_conv=32, upscale=4), saved as {"params": ...}."""
    nf = 64 if num_conv == 32 else 8
    p = srvgg_params(nf, num_conv, scale, seed=num_conv)
    path = _save(p, tmp_path / f"compact.{fmt.split('.')[-1]}", "params" if fmt.endswith("pth") else None)
    up = load_upscaler(path)
    assert (up.arch.kind, up.scale, up.arch.num_block, up.arch.num_feat) == ("Compact", scale, num_conv, nf)
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(5))
    assert _rel(run_network(up.module, x, tile=0), realesrgan_srvgg(p, x, num_conv, scale)) <= 1e-5


# ---------------------------------------------------------------- tiling


def test_tiled_equals_untiled(tmp_path):
    """A compact net with 2 body convs sees 4 pixels around each pixel; with overlap 16 (a quarter of it, 4 px,
    is context only) the tiled output equals the untiled everywhere up to float rounding, and exactly where one
    tile covers a pixel (56 px in tiles of 32 with overlap 16: tiles start at 0, 12, 24)."""
    p = srvgg_params(8, 2, 2, seed=11)
    up = load_upscaler(_save(p, tmp_path / "c.safetensors"))
    x = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    whole = run_network(up.module, x, tile=0)
    tiled = run_network(up.module, x, tile=32, overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 112, 112)
    assert (tiled - whole).abs().max().item() <= 1e-5
    # input rows/columns 0..11 lie in the first tile only: exactly that tile's output (the whole image's output
    # differs from a crop's by float rounding alone, ~2e-7: conv kernels block differently by size)
    first_tile = run_network(up.module, x[..., :32, :32], tile=0)
    assert torch.equal(tiled[..., :24, :24], first_tile[..., :24, :24])
    assert (tiled[..., :24, :24] - whole[..., :24, :24]).abs().max().item() <= 1e-6


def test_tiled_rrdb_with_unshuffle_keeps_pixel_grouping(tmp_path):
    """Real-ESRGAN x2plus groups 2x2 pixels; a tile starting on an odd pixel would change every pixel it makes.
    201 px in tiles of 120 with overlap 40: tiles at 0, 40 and 80 (81 unaligned). One RRDB block sees ~37 input
    pixels, so pixels 165.. (85 from the last tile's edge, covered by it alone) match the whole image."""
    p = basicsr_params(nf=8, nb=1, gc=4, scale=2, seed=3)
    up = load_upscaler(_save(p, tmp_path / "x2.pth", "params_ema"))
    x = torch.rand(1, 3, 201, 199, generator=torch.Generator().manual_seed(7))  # odd sizes: padded, cropped
    whole = run_network(up.module, x, tile=0)
    tiled = run_network(up.module, x, tile=120, overlap=40)
    assert tiled.shape == whole.shape == (1, 3, 402, 398)
    assert _rel(tiled[..., 330:, 330:], whole[..., 330:, 330:]) <= 1e-5
    assert _rel(tiled[..., :80, :80], whole[..., :80, :80]) <= 1e-5  # the first tile's own part
    assert (tiled - whole).abs().mean().item() < 0.01  # near the seams: blended, close


# ---------------------------------------------------------------- images, A1111's size rules, built-ins


def test_upscale_image_sizes_and_builtins(tmp_path):
    p = srvgg_params(8, 1, 4, seed=2)
    up = load_upscaler(_save(p, tmp_path / "c.pth", "params"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    out = upscale(img, up)
    assert out.size == (120, 80)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = (realesrgan_srvgg(p, x, 1, 4).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(out).astype(np.float32) - ref).max() <= 1  # only rounding of ties
    # A1111: scale 2 with a x4 net runs it once, then Lanczos down to the target
    assert upscale(img, up, 2).size == (60, 40)
    assert upscale(img, up, 2, multiple_of=8).size == (56, 40)
    # x8 with a x4 net: two passes
    assert upscale(img, up, 8).size == (240, 160)
    lanczos = upscale(img, load_upscaler("Lanczos"), 2)
    assert np.array_equal(np.asarray(lanczos), np.asarray(img.resize((60, 40), Image.Resampling.LANCZOS)))
    nearest = upscale(img, load_upscaler("nearest"), 3)
    assert np.array_equal(np.asarray(nearest), np.asarray(img).repeat(3, 0).repeat(3, 1))
    # transparency survives (alpha by Lanczos)
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    assert upscale(rgba, up).mode == "RGBA"
    # a palette image with a transparent colour, and 16-bit greyscale (by range, not clipped to white)
    pal = img.convert("P")
    pal.info["transparency"] = 0
    assert upscale(pal, up).mode == "RGBA"
    grey16 = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    assert grey16.mode.startswith("I;16")
    big = upscale(grey16, load_upscaler("Lanczos"), 2)
    assert np.array_equal(np.asarray(big), np.asarray(img.convert("L").resize((60, 40), Image.Resampling.LANCZOS)))


# ---------------------------------------------------------------- bad input: one line


def _sd_checkpoint(path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    return path


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_files(tmp_path) -> dict:
    files = {}
    files["not a model"] = tmp_path / "notes.pth"
    files["not a model"].write_text("hello, I am a text file")
    files["sd checkpoint"] = _sd_checkpoint(tmp_path / "sd15.safetensors")
    truncated = tmp_path / "truncated.pth"
    torch.save({"params_ema": basicsr_params(8, 1, 4, 4, 0)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:3000])
    files["corrupt"] = truncated
    evil = tmp_path / "evil.pth"
    torch.save({"params": {"x": torch.zeros(1)}, "hook": Evil()}, str(evil))
    files["pickled code"] = evil
    files["lora"] = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, str(files["lora"]))
    files["missing"] = tmp_path / "nope.pth"
    plus = _old_esrgan(8, 1, 4, 2).state_dict()
    plus["model.1.sub.0.RDB1.conv1x1.weight"] = torch.zeros(4, 8, 1, 1)  # ESRGAN+ adds 1x1 convs
    files["esrgan plus"] = _save(plus, tmp_path / "esrganplus.pth")
    odd = basicsr_params(8, 1, 4, 4, 0)
    odd["conv_hr.weight"] = torch.zeros(8, 9, 3, 3)
    files["bad shapes"] = _save(odd, tmp_path / "odd.pth", "params_ema")
    return files


@pytest.mark.parametrize("kind,needle", [
    ("not a model", "not a readable .pth"), ("sd checkpoint", "Stable Diffusion checkpoint, not an upscaler"),
    ("corrupt", "corrupt"), ("pickled code", "weights_only"), ("lora", "LoRA, not an upscaler"),
    ("missing", "no such upscaler file"), ("esrgan plus", "unexpected keys"),
    ("bad shapes", "ldmkit does not read this variant")])
def test_bad_upscaler_files_one_line(tmp_path, capsys, kind, needle):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as e:
        load_upscaler(path)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(path.name) in str(e.value)
    img = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["upscale", str(img), "--upscaler", str(path), "-o", str(tmp_path / "big.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldmkit: error:") and needle in err and "\n" not in err
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "big.png").exists()


def test_zip_of_wrong_contents_is_not_a_crash(tmp_path):
    bad = tmp_path / "weird.pth"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="weird.pth"):
        load_upscaler(bad)


# ---------------------------------------------------------------- CLI


def test_cli_upscale(tmp_path, capsys):
    p = basicsr_params(nf=8, nb=1, gc=4, scale=2, seed=9)
    model = _save(p, tmp_path / "RealESRGAN_x2plus.pth", "params_ema")
    src = tmp_path / "small.png"
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a castle\nSteps: 20, Seed: 1")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(src, pnginfo=meta)
    out = tmp_path / "big.png"
    assert main(["upscale", str(src), "--upscaler", str(model), "-o", str(out), "--tile", "16"]) == 0
    with Image.open(out) as im:
        assert im.size == (40, 48)
        assert im.info["parameters"] == "a castle\nSteps: 20, Seed: 1"
        assert im.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: RealESRGAN_x2plus"
    assert main(["upscale", str(src), "--upscaler", "Lanczos", "--scale", "1.5", "-o", str(out)]) == 0
    assert Image.open(out).size == (30, 36)
    assert main(["upscale", str(src), "--upscaler", "Lanczos", "-o", str(out)]) == 2
    assert "give --scale" in capsys.readouterr().err
    # several images: -o is a folder
    second = tmp_path / "second.jpg"
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(second)
    assert main(["upscale", str(src), str(second), "--upscaler", str(model), "-o", str(tmp_path / "big")]) == 0
    assert Image.open(tmp_path / "big" / "small_x2.png").size == (40, 48)
    assert Image.open(tmp_path / "big" / "second_x2.png").size == (20, 16)
    assert main(["upscale", str(src), str(second), "--upscaler", str(model), "-o", str(out)]) == 2
    assert "names a folder" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["upscale", str(tmp_path / "broken.png"), "--upscaler", "Lanczos", "--scale", "2"]) == 2
    assert "broken.png" in capsys.readouterr().err


# ---------------------------------------------------------------- server: A1111's upscaler routes


@pytest.fixture(scope="module")
def upscaler_server(tmp_path_factory):
    pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
    from fastapi.testclient import TestClient

    from ldmkit.config import TINY
    from ldmkit.model import StableDiffusion
    from ldmkit.server.app import create_app

    d = tmp_path_factory.mktemp("upscalers")
    p2 = basicsr_params(nf=8, nb=1, gc=4, scale=2, seed=21)
    _save(p2, d / "RealESRGAN_x2plus.pth", "params_ema")
    _save(_old_esrgan(nf=8, nb=1, gc=4, n_up=2, seed=22).state_dict(), d / "4x-Old.pth")
    (d / "sub").mkdir()
    _save(srvgg_params(8, 2, 4, seed=23), d / "sub" / "compact.safetensors")
    _sd_checkpoint(d / "sd15.safetensors")  # not an upscaler: left out with a warning
    (d / "broken.pth").write_bytes(b"PK\x03\x04 not really")
    torch.manual_seed(0)
    app = create_app(StableDiffusion(TINY), upscaler_dir=d, device="cpu", preview_interval=None)
    with TestClient(app) as client:
        yield client, d, p2


def _b64(img: Image.Image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unb64(data: str) -> Image.Image:
    import base64
    import io

    return Image.open(io.BytesIO(base64.b64decode(data)))


def _image(w=20, h=12, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_server_lists_upscalers(upscaler_server, caplog):
    client, d, _ = upscaler_server
    items = client.get("/sdapi/v1/upscalers").json()
    by_name = {i["name"]: i for i in items}
    assert list(by_name)[:3] == ["None", "Lanczos", "Nearest"]
    assert set(by_name) == {"None", "Lanczos", "Nearest", "4x-Old", "RealESRGAN_x2plus", "sub/compact",
                            "R-ESRGAN 2x+"}  # A1111's name for RealESRGAN_x2plus.pth
    assert by_name["R-ESRGAN 2x+"]["model_path"] == by_name["RealESRGAN_x2plus"]["model_path"]
    assert by_name["RealESRGAN_x2plus"]["scale"] == 2 and by_name["4x-Old"]["scale"] == 4
    assert by_name["sub/compact"]["scale"] == 4 and by_name["sub/compact"]["model_name"] == "Real-ESRGAN"
    assert by_name["RealESRGAN_x2plus"]["model_path"] == str((d / "RealESRGAN_x2plus.pth").resolve())
    assert set(by_name["None"]) == {"name", "model_name", "model_path", "model_url", "scale"}
    from ldmkit.server.extras import UpscalerCatalogue

    with caplog.at_level(logging.WARNING, logger="ldmkit.server"):
        UpscalerCatalogue(d).scan()  # files that fail to load: a warning naming each, no crash
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "sd15.safetensors" in warned and "not an upscaler" in warned and "broken.pth" in warned


def test_server_extra_single_image_matches_direct_call(upscaler_server):
    client, d, p2 = upscaler_server
    img = _image()
    r = client.post("/sdapi/v1/extra-single-image",
                    json={"image": _b64(img), "upscaler_1": "RealESRGAN_x2plus", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    out = _unb64(r.json()["image"])
    assert out.size == (40, 24)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = (basicsr_rrdbnet(p2, x, 2).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(out, dtype=np.float32) - ref).max() <= 1
    assert "Postprocess upscale by: 2, Postprocess upscaler: RealESRGAN_x2plus" in r.json()["html_info"]
    assert out.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: RealESRGAN_x2plus"
    alias = client.post("/sdapi/v1/extra-single-image",
                        json={"image": _b64(img), "upscaler_1": "R-ESRGAN 2x+", "upscaling_resize": 2}).json()
    assert alias["image"] != r.json()["image"] and "Postprocess upscaler: R-ESRGAN 2x+" in alias["html_info"]
    assert np.array_equal(np.asarray(_unb64(alias["image"])), np.asarray(out))
    # "None": the image back unchanged, as A1111
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(img), "upscaler_1": "None"})
    assert np.array_equal(np.asarray(_unb64(r.json()["image"])), np.asarray(img))


def test_server_resize_to_crop_and_second_upscaler(upscaler_server):
    client, _, _ = upscaler_server
    img = _image(20, 12, seed=1)
    body = {"image": _b64(img), "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64,
            "upscaling_crop": True, "upscaler_1": "4x-Old", "upscaler_2": "Lanczos",
            "extras_upscaler_2_visibility": 0.5}
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    out = _unb64(r.json()["image"])
    assert out.size == (64, 64)  # by max(64/20, 64/12) = 5.33 -> 104x64, centred and cropped
    up = load_upscaler("Lanczos")
    lanczos = upscale(img, up, 64 / 12, multiple_of=8)
    crop = Image.new("RGB", (64, 64))
    crop.paste(lanczos, (32 - lanczos.width // 2, 32 - lanczos.height // 2))
    net = upscale(img, load_upscaler(upscaler_server[1] / "4x-Old.pth"), 64 / 12, multiple_of=8)
    first = Image.new("RGB", (64, 64))
    first.paste(net, (32 - net.width // 2, 32 - net.height // 2))
    expected = Image.blend(first, crop, 0.5)
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1
    info = r.json()["html_info"]
    assert "Postprocess upscale to: 64x64" in info and "Postprocess crop to: 64x64" in info
    assert "Postprocess upscaler 2: Lanczos" in info


def test_server_extra_batch_images(upscaler_server):
    client, _, _ = upscaler_server
    imgs = [_image(16, 16, seed=s) for s in (2, 3)]
    r = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": _b64(im), "name": f"{i}.png"} for i, im in enumerate(imgs)],
        "upscaler_1": "sub/compact", "upscaling_resize": 4})
    assert r.status_code == 200, r.text
    outs = [_unb64(b) for b in r.json()["images"]]
    assert [o.size for o in outs] == [(64, 64), (64, 64)]
    single = client.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(imgs[1]), "upscaler_1": "sub/compact", "upscaling_resize": 4}).json()["image"]
    assert np.array_equal(np.asarray(outs[1]), np.asarray(_unb64(single)))


@pytest.mark.parametrize("body,status,needle", [
    ({"upscaler_1": "nope"}, 422, "no upscaler 'nope'"),
    ({"upscaler_1": "../RealESRGAN_x2plus"}, 422, "valid: None, Lanczos, Nearest"),
    ({"upscaler_1": "sd15"}, 422, "no upscaler 'sd15'"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "broken"}, 422, "no upscaler 'broken'"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, 422, "face restoration"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, 422, "upscaling_resize"),
    ({"upscaler_1": "Lanczos", "image": "@@@"}, 422, "base64"),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 9000, "upscaling_resize_h": 9000}, 413,
     "MP"),
])
def test_server_extras_bad_requests(upscaler_server, body, status, needle):
    client, _, _ = upscaler_server
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_image()), **body})
    assert r.status_code == status, r.text
    assert needle in r.text


def test_server_with_a1111_client(upscaler_server):
    """The webuiapi package (an A1111 client) lists the upscalers and upscales through them, over HTTP."""
    webuiapi = pytest.importorskip("webuiapi")
    from ldmkit.server.app import BackgroundServer

    client, _, _ = upscaler_server
    img = _image(24, 16, seed=4)
    with BackgroundServer(client.app) as url:
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
        assert "RealESRGAN_x2plus" in [u["name"] for u in api.get_upscalers()]
        result = api.extra_single_image(img, upscaler_1="RealESRGAN_x2plus", upscaling_resize=3)
        batch = api.extra_batch_images([img, img], upscaler_1="Nearest", upscaling_resize=2)
    assert result.image.size == (72, 48)  # x2 net twice (A1111: until large enough), Lanczos down to x3
    assert [im.size for im in batch.images] == [(48, 32), (48, 32)]
    assert np.array_equal(np.asarray(batch.images[0].convert("RGB")), np.asarray(img).repeat(2, 0).repeat(2, 1))


def test_server_upscaler_file_broken_after_listing(tmp_path):
    """A listed file replaced by garbage: probed again (a new version), left out: a 422, never a 500."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.config import TINY
    from ldmkit.model import StableDiffusion
    from ldmkit.server.app import create_app

    _save(srvgg_params(8, 1, 2, seed=1), tmp_path / "a.pth", "params")
    _save(srvgg_params(8, 1, 2, seed=2), tmp_path / "b.pth", "params")
    app = create_app(StableDiffusion(TINY), upscaler_dir=tmp_path, device="cpu", preview_interval=None)
    with TestClient(app) as client:
        assert {"a", "b"} <= {u["name"] for u in client.get("/sdapi/v1/upscalers").json()}
        (tmp_path / "b.pth").write_bytes(b"garbage")
        r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_image()), "upscaler_1": "a"})
        assert r.status_code == 200
        os.utime(tmp_path / "b.pth", ns=(1, 1))  # a new version of the file: probed again, left out
        r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_image()), "upscaler_1": "b"})
        assert r.status_code == 422 and "no upscaler 'b'" in r.text


def test_info_describes_upscaler_files(tmp_path, capsys):
    _save(basicsr_params(nf=8, nb=2, gc=4, scale=2, seed=1), tmp_path / "x2.pth", "params_ema")
    _save(srvgg_params(8, 2, 4, seed=1), tmp_path / "c.safetensors")
    assert main(["info", str(tmp_path / "x2.pth")]) == 0
    out = capsys.readouterr().out
    assert "upscaler: ESRGAN/RRDBNet 2 blocks, 8 features, x2, pixel-unshuffle 2, new key layout" in out
    assert main(["info", str(tmp_path / "c.safetensors")]) == 0
    assert "Real-ESRGAN compact (SRVGGNetCompact) 2 convs, 8 features, x4" in capsys.readouterr().out
    assert main(["info", str(_sd_checkpoint(tmp_path / "sd.safetensors"))]) == 2  # not an upscaler: the SD path
