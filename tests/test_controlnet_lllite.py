"""kohya's ControlNet-LLLite (issue 16, "loads the files they own"). No diffusers reference exists, so:

(a) closed form: a file whose ``up`` layers are zero (sd-scripts' zero-conv init, bias zeroed too) gives exactly the
    image without it, on the command line; a non-zero one changes it and the CLI equals the Python API;
(b) an independent re-statement: one LLLite module on one Linear, and one module inside a tiny SDXL U-Net, equal
    the formula of sd-scripts' ``networks/control_net_lllite.py`` (conditioning1 convs on the map in [-1, 1] ->
    tokens; cat[cond, relu(down(x))] -> relu(mid) -> up, x multiplier, added to the Linear's input) written here
    with torch.nn.functional;
(c) the released SDXL key set (136 modules: attn1 q/k/v and attn2 q of input blocks 4, 5, 7, 8 and the middle block,
    cond_emb_dim 32, mlp_dim 64; meta tensors) maps every key onto SDXL's U-Net with the file's shapes, and an SD1.5
    U-Net refuses it in one line.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from test_controlnet_cli import _run

from ldmkit import checkpoint, checkpoint_sdxl, file_kind
from ldmkit.config import SD15, SDXL_BASE, TINY, TINY_SDXL
from ldmkit.controlnet_lllite import LLLiteError, LLLiteUnit, applied, build, load_lllite
from ldmkit.models.unet import UNetModel
from ldmkit.sdxl import StableDiffusionXL

SIZE = (32, 24)  # multiples of 8: the tiny VAE halves, so the coarsest level is 8x smaller than the image
GEN = ["--steps", "4", "--sampler", "Euler", "--scheduler", "uniform", "--seed", "5", "--width", str(SIZE[0]),
       "--height", str(SIZE[1]), "--cfg-scale", "5"]
# sd-scripts' targets (ATTN1_2_ONLY, ATTN_QKV_ONLY, SKIP_OUTPUT_BLOCKS): attn1 q/k/v, attn2 q; input + middle blocks
TARGET = re.compile(r"^(input_blocks\.\d+|middle_block)\.1\.transformer_blocks\.\d+\.(attn1\.to_[qkv]|attn2\.to_q)$")


def lllite_file(unet: torch.nn.Module, vae_downscale: int, cond: int = 8, mlp: int = 6, seed: int = 0,
                zero_up: bool = False, meta: bool = False, only: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict sd-scripts saves for ``unet`` (sgm names): one module per target, named lllite_unet_<layer
    with underscores>; the conditioning strides (kernel = stride) bring the map to each level's resolution."""
    g = torch.Generator().manual_seed(seed)
    levels = len(unet.cfg.channel_mult)
    per = unet.cfg.num_res_blocks + 1

    def t(*shape):
        return torch.empty(shape, device="meta") if meta else torch.randn(*shape, generator=g) * 0.3

    sd = {}
    for name, mod in unet.named_modules():
        if not TARGET.match(name) or (only and name != only):
            continue
        level = levels - 1 if name.startswith("middle") else (int(name.split(".")[1]) - 1) // per
        total = vae_downscale * 2 ** level  # 4, 2 (the other variants: 4, 4 and 4, 4, 2)
        kernels = [total // 2, 2] if total <= 16 else [4, 4, 2]
        k = "lllite_unet_" + name.replace(".", "_")
        chans = [3] + [cond // 2] * (len(kernels) - 1) + [cond]
        for j, ks in enumerate(kernels):
            sd[f"{k}.conditioning1.{2 * j}.weight"] = t(chans[j + 1], chans[j], ks, ks)
            sd[f"{k}.conditioning1.{2 * j}.bias"] = t(chans[j + 1])
        d = mod.in_features
        sd |= {f"{k}.down.0.weight": t(mlp, d), f"{k}.down.0.bias": t(mlp), f"{k}.mid.0.weight": t(mlp, mlp + cond),
               f"{k}.mid.0.bias": t(mlp), f"{k}.up.0.weight": t(d, mlp), f"{k}.up.0.bias": t(d)}
        if zero_up and not meta:
            sd[f"{k}.up.0.weight"].zero_()
            sd[f"{k}.up.0.bias"].zero_()
    return sd


def reference_delta(sd: dict, k: str, x: torch.Tensor, cmap: torch.Tensor, weight: float) -> torch.Tensor:
    """sd-scripts' LLLiteModule.forward for a Linear target, restated: what is added to the Linear's input."""
    c = cmap * 2.0 - 1.0  # ComfyUI / sd-scripts feed the map in [-1, 1]
    j = 0
    while f"{k}.conditioning1.{j}.weight" in sd:
        if j:
            c = F.relu(c)
        w = sd[f"{k}.conditioning1.{j}.weight"]
        c = F.conv2d(c, w, sd[f"{k}.conditioning1.{j}.bias"], stride=w.shape[-1])
        j += 2
    n, ch, h, w_ = c.shape
    c = c.view(n, ch, h * w_).permute(0, 2, 1).repeat(x.shape[0] // n, 1, 1)  # b,c,h,w -> b,h*w,c; both CFG halves
    h = F.relu(F.linear(x, sd[f"{k}.down.0.weight"], sd[f"{k}.down.0.bias"]))
    h = F.relu(F.linear(torch.cat([c, h], dim=2), sd[f"{k}.mid.0.weight"], sd[f"{k}.mid.0.bias"]))
    return F.linear(h, sd[f"{k}.up.0.weight"], sd[f"{k}.up.0.bias"]) * weight


def one_linear():
    """(generator, a root with one Linear "proj" 6 -> 5, its module name, an LLLite state dict for it: condition
    8 wide, embedded 8x smaller, module width 3)."""
    g = torch.Generator().manual_seed(1)
    root = torch.nn.ModuleDict({"proj": torch.nn.Linear(6, 5)})
    k = "lllite_unet_proj"
    sd = {f"{k}.conditioning1.0.weight": torch.randn(4, 3, 4, 4, generator=g),
          f"{k}.conditioning1.0.bias": torch.randn(4, generator=g),
          f"{k}.conditioning1.2.weight": torch.randn(8, 4, 2, 2, generator=g),
          f"{k}.conditioning1.2.bias": torch.randn(8, generator=g),
          f"{k}.down.0.weight": torch.randn(3, 6, generator=g), f"{k}.down.0.bias": torch.randn(3, generator=g),
          f"{k}.mid.0.weight": torch.randn(3, 11, generator=g), f"{k}.mid.0.bias": torch.randn(3, generator=g),
          f"{k}.up.0.weight": torch.randn(6, 3, generator=g), f"{k}.up.0.bias": torch.randn(6, generator=g)}
    return g, root, k, sd


def test_one_module_on_one_linear_matches_the_formula():
    g, root, k, sd = one_linear()
    net = build(sd, root, 8)
    assert net.targets == {k: "proj"}
    cmap = torch.rand(1, 3, 16, 24, generator=g)  # 8x smaller: 2 x 3 = 6 tokens
    x = torch.randn(2, 6, 6, generator=g)  # a CFG batch of 2, one map
    unit = LLLiteUnit(net, cmap, 0.7)
    with torch.no_grad(), applied(root, [(net, unit.embeddings((16, 24), x.device), 0.7)]):
        ours = root["proj"](x)
    with torch.no_grad():
        plain = root["proj"](x)  # the hook is gone after the block
        ref = F.linear(x + reference_delta(sd, k, x, cmap, 0.7), root["proj"].weight, root["proj"].bias)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(plain, root["proj"](x)) and not torch.allclose(plain, ours, atol=1e-3)


def test_one_module_in_an_sdxl_unet_matches_the_formula():
    """The module placed by its name inside a tiny SDXL U-Net (latent 12x16 -> level 1 tokens 6x8) == a hook written
    here that adds the restated formula to that Linear's input; the other layers untouched."""
    torch.manual_seed(0)
    unet = UNetModel(TINY_SDXL.unet).eval()
    layer = "input_blocks.3.1.transformer_blocks.0.attn1.to_k"
    sd = lllite_file(unet, 2, seed=3, only=layer)
    assert len(sd) == 10
    net = build(sd, unet, 2)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 12, 16, generator=g), torch.tensor([500.0, 500.0])
    ctx, y = torch.randn(2, 5, 80, generator=g), torch.randn(2, TINY_SDXL.unet.adm_in_channels, generator=g)
    cmap = torch.rand(1, 3, 24, 32, generator=g)
    unit = LLLiteUnit(net, cmap, 0.8)
    with torch.no_grad():
        with applied(unet, [(net, unit.embeddings((24, 32), x.device), 0.8)]):
            ours = unet(x, t, ctx, y=y)
        k = "lllite_unet_" + layer.replace(".", "_")
        h = dict(unet.named_modules())[layer].register_forward_pre_hook(
            lambda _m, a: (a[0] + reference_delta(sd, k, a[0], cmap, 0.8),))
        try:
            ref = unet(x, t, ctx, y=y)
        finally:
            h.remove()
        plain = unet(x, t, ctx, y=y)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3


def test_released_sdxl_key_set_maps_every_key():
    """sd-scripts' SDXL file (cond_emb_dim 32, mlp_dim 64): input blocks 4, 5 (2 transformer blocks, 640 wide,
    depth 2: 16x), 7, 8 and the middle block (10 blocks, 1280 wide, depth 3: 32x); meta tensors."""
    sd = {}
    for block, n, dim, kernels in [*((f"input_blocks_{i}_1", 2, 640, (4, 4)) for i in (4, 5)),
                                   *((f"input_blocks_{i}_1", 10, 1280, (4, 4, 2)) for i in (7, 8)),
                                   ("middle_block_1", 10, 1280, (4, 4, 2))]:
        for tb in range(n):
            for proj in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q"):
                k = f"lllite_unet_{block}_transformer_blocks_{tb}_{proj}"
                chans = [3] + [16] * (len(kernels) - 1) + [32]
                for j, ks in enumerate(kernels):
                    sd[f"{k}.conditioning1.{2 * j}.weight"] = torch.empty(chans[j + 1], chans[j], ks, ks, device="meta")
                    sd[f"{k}.conditioning1.{2 * j}.bias"] = torch.empty(chans[j + 1], device="meta")
                for part, shape in (("down", (64, dim)), ("mid", (64, 96)), ("up", (dim, 64))):
                    sd[f"{k}.{part}.0.weight"] = torch.empty(shape, device="meta")
                    sd[f"{k}.{part}.0.bias"] = torch.empty(shape[0], device="meta")
    assert file_kind.kind_of_keys(sd) == file_kind.LLLITE
    with torch.device("meta"):
        xl, sd15 = UNetModel(SDXL_BASE.unet), UNetModel(SD15.unet)
    net = build(sd, xl, SDXL_BASE.vae.downscale)
    assert len(net.items()) == 136
    mine = net.state_dict()
    assert set(mine) == set(sd) and all(mine[k].shape == v.shape for k, v in sd.items())
    layers = dict(xl.named_modules())
    assert all(layers[t].in_features == m.down[0].in_features for (n, m), t in
               ((item, net.targets[item[0]]) for item in net.items()))
    assert net.targets["lllite_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_q"] == \
        "input_blocks.7.1.transformer_blocks.9.attn2.to_q"
    with pytest.raises(LLLiteError, match="the model \\(SD1.x\\) lacks") as e:  # SD1.5 has 1 transformer per block
        build(sd, sd15, SD15.vae.downscale)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lllite")
    torch.manual_seed(0)
    model = StableDiffusionXL(TINY_SDXL).eval()
    checkpoint_sdxl.save_sdxl_single_file(model, d / "xl.safetensors")
    save_file(lllite_file(model.unet, 2, seed=1), d / "lllite.safetensors")
    save_file(lllite_file(model.unet, 2, seed=1, zero_up=True), d / "zero.safetensors")
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(d / "map.png")
    return d


def _image(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_zero_up_gives_the_base_image_and_cli_equals_api(files, capsys, tmp_path):
    import ldmkit

    base = ["generate", "a stone house", "--model", str(files / "xl.safetensors"), *GEN]
    rc, cap = _run(capsys, *base, "-o", str(tmp_path / "plain.png"))
    assert rc == 0, cap.err
    rc, cap = _run(capsys, *base, "--controlnet", str(files / "zero.safetensors"), "--control-image",
                   str(files / "map.png"), "-o", str(tmp_path / "zero.png"))
    assert rc == 0, cap.err
    assert np.array_equal(_image(tmp_path / "plain.png"), _image(tmp_path / "zero.png"))
    rc, cap = _run(capsys, *base, "--controlnet", str(files / "lllite.safetensors"), "--control-image",
                   str(files / "map.png"), "--control-weight", "0.8", "--control-end", "0.5",
                   "-o", str(tmp_path / "cli.png"))
    assert rc == 0, cap.err
    cli = _image(tmp_path / "cli.png")
    assert np.abs(cli.astype(int) - _image(tmp_path / "plain.png")).max() > 3  # it acts
    pipe = ldmkit.load(str(files / "xl.safetensors"))
    unit = pipe.control_unit(files / "lllite.safetensors", Image.open(files / "map.png"), *SIZE, weight=0.8, end=0.5)
    assert isinstance(unit, LLLiteUnit)
    api = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=SIZE[0],
                       height=SIZE[1], cfg_scale=5, controlnets=[unit])[0]
    assert np.array_equal(cli, np.asarray(api.convert("RGB")))
    # weight 0 and an empty window are the base image too
    off = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=SIZE[0],
                       height=SIZE[1], cfg_scale=5,
                       controlnets=[pipe.control_unit(files / "lllite.safetensors", Image.open(files / "map.png"),
                                                      *SIZE, weight=0.0)])[0]
    assert np.array_equal(np.asarray(off.convert("RGB")), _image(tmp_path / "plain.png"))


def test_info_and_kind(files, capsys):
    assert file_kind.kind_of(files / "lllite.safetensors") == file_kind.LLLITE
    rc, cap = _run(capsys, "info", str(files / "lllite.safetensors"))
    assert rc == 0, cap.err
    assert "ControlNet-LLLite" in cap.out and "20 modules" in cap.out and "1/4, 1/8" in cap.out, cap.out


def test_bad_files_and_families_one_line(files, capsys, tmp_path):
    broken = {k: v for k, v in lllite_file(StableDiffusionXL(TINY_SDXL).unet, 2).items()
              if not k.endswith("transformer_blocks_0_attn1_to_q.down.0.weight")}
    save_file(broken, tmp_path / "broken.safetensors")
    foreign = dict(lllite_file(StableDiffusionXL(TINY_SDXL).unet, 2))
    foreign["lllite_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(2, 2)
    save_file(foreign, tmp_path / "foreign.safetensors")
    sd1 = tmp_path / "sd1.safetensors"
    checkpoint.save_single_file(_tiny_sd1(), sd1)
    cases = {
        "broken": (files / "xl.safetensors", tmp_path / "broken.safetensors", "a broken or truncated file"),
        "foreign": (files / "xl.safetensors", tmp_path / "foreign.safetensors", "not a ControlNet-LLLite weight"),
        "family": (sd1, files / "lllite.safetensors", "lacks"),
        "odd-size": (files / "xl.safetensors", files / "lllite.safetensors", "multiple of 8"),
    }
    for case, (model, cn, says) in cases.items():
        size = ["--width", "36"] if case == "odd-size" else []
        rc, cap = _run(capsys, "generate", "a house", "--model", str(model), *GEN, *size, "--controlnet", str(cn),
                       "--control-image", str(files / "map.png"), "-o", str(tmp_path / "x.png"))
        err = "\n".join(line for line in cap.err.strip().splitlines() if not line.startswith("note:"))  # resize notes
        assert rc != 0 and "Traceback" not in err, (case, err)
        assert says in err and len(err.splitlines()) == 1, (case, err)
    with pytest.raises(LLLiteError, match="for another model"):
        load_lllite(files / "lllite.safetensors", _tiny_sd1())


def _tiny_sd1():
    from ldmkit.model import StableDiffusion

    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


def test_a1111_unit_from_the_controlnet_dir(files, capsys, tmp_path):
    """An LLLite file in --controlnet-dir: listed, and an alwayson_scripts unit naming it gives the CLI's image
    (weight 0.8, end 0.5) with its infotext line; another control mode gives the same image (the A1111
    extension ignores control modes for LLLite)."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import shutil

    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    (tmp_path / "cn").mkdir()
    shutil.copy(files / "lllite.safetensors", tmp_path / "cn" / "lllite-tiny.safetensors")
    app = create_app(files / "xl.safetensors", controlnet_dir=tmp_path / "cn", preview_interval=None, device="cpu")
    client = TestClient(app, raise_server_exceptions=False)
    buf = io.BytesIO()
    Image.open(files / "map.png").save(buf, format="PNG")
    unit = {"module": "none", "model": "lllite-tiny", "image": base64.b64encode(buf.getvalue()).decode(),
            "weight": 0.8, "guidance_end": 0.5, "resize_mode": "Just Resize"}
    body = {"prompt": "a stone house", "steps": 4, "seed": 5, "width": SIZE[0], "height": SIZE[1], "cfg_scale": 5,
            "sampler_name": "Euler", "scheduler": "Uniform", "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    try:
        listed = client.get("/controlnet/model_list").json()["model_list"]
        assert any(m.startswith("lllite-tiny") for m in listed), listed
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert "ControlNet 0" in r.json()["info"]
        # another control mode: the extension's LLLite patch ignores it (same image), the infotext keeps it
        soft = client.post("/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"controlnet": {"args": [
            unit | {"control_mode": "ControlNet is more important"}]}}})
        assert soft.status_code == 200 and "Control Mode: ControlNet is more important" in soft.json()["info"]
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(Image.open(io.BytesIO(base64.b64decode(
            soft.json()["images"][0]))).convert("RGB")))
    finally:
        app.state.worker.stop()
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "xl.safetensors"), *GEN,
                   "--controlnet", str(files / "lllite.safetensors"), "--control-image", str(files / "map.png"),
                   "--control-weight", "0.8", "--control-end", "0.5", "-o", str(tmp_path / "cli.png"))
    assert rc == 0, cap.err
    assert np.array_equal(np.asarray(got.convert("RGB")), _image(tmp_path / "cli.png"))


def test_hires_fix_and_explain_with_an_lllite(files, capsys, tmp_path):
    """The hires fix's larger second pass: the map is embedded again at that size (and with a zero-up file the
    image equals the plain hires image); the explain page runs with an LLLite unit and gives the generated image."""
    hires = ["--hires-scale", "2", "--hires-upscaler", "Lanczos"]
    base = ["generate", "a stone house", "--model", str(files / "xl.safetensors"), *GEN, *hires]
    for name, extra in (("plain", []), ("zero", ["--controlnet", str(files / "zero.safetensors")]),
                        ("lllite", ["--controlnet", str(files / "lllite.safetensors")])):
        img = ["--control-image", str(files / "map.png")] if extra else []
        rc, cap = _run(capsys, *base, *extra, *img, "-o", str(tmp_path / f"{name}.png"))
        assert rc == 0, cap.err
    assert Image.open(tmp_path / "lllite.png").size == (2 * SIZE[0], 2 * SIZE[1])
    assert np.array_equal(_image(tmp_path / "plain.png"), _image(tmp_path / "zero.png"))
    assert not np.array_equal(_image(tmp_path / "plain.png"), _image(tmp_path / "lllite.png"))

    from ldmkit.explain import explain
    from ldmkit.pipeline import GenerationParams, txt2img

    model = checkpoint.load(files / "xl.safetensors")
    unit = LLLiteUnit(load_lllite(files / "lllite.safetensors", model),
                      torch.rand(1, 3, SIZE[1], SIZE[0], generator=torch.Generator().manual_seed(0)), 0.9)
    params = GenerationParams("a house", steps=3, sampler="Euler", seed=2, width=SIZE[0], height=SIZE[1],
                              cfg_scale=4, controlnets=(unit,))
    assert np.array_equal(np.asarray(explain(model, params).image), np.asarray(txt2img(model, params)[0]))


def test_pth_files_by_name(files, tmp_path):
    """A pickled LLLite is probed only when its name says lllite (other .pth ControlNets are not read twice)."""
    from safetensors.torch import load_file

    from ldmkit.controlnet_lllite import is_lllite_path

    sd = load_file(files / "lllite.safetensors")
    torch.save(sd, tmp_path / "canny_lllite.pth")
    torch.save(sd, tmp_path / "canny.pth")
    assert is_lllite_path(tmp_path / "canny_lllite.pth") and not is_lllite_path(tmp_path / "canny.pth")
    assert is_lllite_path(files / "lllite.safetensors") and not is_lllite_path(files / "xl.safetensors")
    assert not is_lllite_path(object()) and not is_lllite_path("x" * 5000)
