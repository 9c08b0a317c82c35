"""T2I-Adapter (issue 16, part 2) against diffusers: the network (T2IAdapter, full / light / SDXL), the U-Net's
use of its features (down_intrablock_additional_residuals), whole images (StableDiffusionAdapterPipeline and
StableDiffusionXLAdapterPipeline, <= 2/255), the original TencentARC layout, the command line and bad input."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from reference import rel_err, save_diffusers_pipeline
from safetensors.torch import save_file
from test_controlnet_cli import SETTINGS, _run

import ldmkit
from ldmkit import checkpoint
from ldmkit.config import TINY, TINY_SD2, TINY_SDXL
from ldmkit.models.t2i_adapter import AdapterConfig, T2IAdapter
from ldmkit.pipeline import GenerationParams, txt2img
from ldmkit.t2i_adapter import AdapterError, AdapterUnit, adapter_map, load_adapter

SIZE = (24, 16)  # the tiny VAE halves: latents 12x8
PROMPT, NEGATIVE, STEPS, CFG, SEED = "a pencil sketch of a house", "blurry", 8, 6.0, 21
# tiny adapters for tiny U-Nets: the pixel unshuffle is the tiny VAE's factor 2 (SDXL: 2 x 2)
KINDS = {"full": dict(channels=[32, 64, 64], num_res_blocks=2, downscale_factor=2, adapter_type="full_adapter"),
         "light": dict(channels=[32, 64], num_res_blocks=2, downscale_factor=2, adapter_type="light_adapter"),
         "xl": dict(channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=4, adapter_type="full_adapter_xl")}


def three_levels(cfg):
    """The tiny config with SD's shape of levels for the adapters: widths 1, 2, 2 (SD: 320, 640, 1280, 1280, the
    light adapter repeating its last width) and no attention at the last level (SD's DownBlock2D)."""
    return cfg.replace(name=f"{cfg.name}-3", unet=dataclasses.replace(cfg.unet, channel_mult=(1, 2, 2),
                                                                      attention_levels=(True, True, False)))


TINY3, TINY3_SD2 = three_levels(TINY), three_levels(TINY_SD2)


def diffusers_adapter(kind: str, in_channels: int = 3, seed: int = 0):
    from diffusers import T2IAdapter as Ref

    torch.manual_seed(seed)
    return Ref(in_channels=in_channels, **KINDS[kind]).eval()


def _maps(n: int, channels: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shape = (SIZE[1], SIZE[0], 3) if channels == 3 else (SIZE[1], SIZE[0])
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------- the network and its files


@pytest.mark.parametrize("kind,in_channels", [("full", 3), ("full", 1), ("light", 3), ("xl", 3)])
def test_features_match_diffusers(kind, in_channels, tmp_path):
    """A diffusers T2IAdapter folder loads, and its features match diffusers' (relative error <= 1e-4)."""
    ref = diffusers_adapter(kind, in_channels)
    ref.save_pretrained(tmp_path / "ad")
    ours = load_adapter(tmp_path / "ad")
    assert ours.cfg.adapter_type == ref.config.adapter_type
    x = torch.rand(2, in_channels, 32, 48)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-4
    # the lone weights file (no config.json): the type from the names and the model it is used with (SDXL: xl)
    lone = load_adapter(tmp_path / "ad" / "diffusion_pytorch_model.safetensors", TINY_SDXL if kind == "xl" else TINY3)
    assert lone.cfg == ours.cfg


def _to_original(sd: dict, light: bool) -> dict:
    """diffusers names -> TencentARC's, as diffusers' scripts/convert_original_t2iadapter.py pairs them
    (full: body.{level * n + j}.block1, body.{level * n}.in_conv; light: body.N.body.M.block1)."""
    out = {}
    n = 1 + max(int(k.split(".")[4]) for k in sd if ".resnets." in k)
    for k, v in sd.items():
        k = k.removeprefix("adapter.")
        parts = k.split(".")
        if light:
            out[k.replace(".resnets.", ".body.")] = v
        elif parts[0] == "body" and parts[2] == "resnets":
            out[f"body.{int(parts[1]) * n + int(parts[3])}.{'.'.join(parts[4:])}"] = v
        elif parts[0] == "body" and parts[2] == "in_conv":
            out[f"body.{int(parts[1]) * n}.in_conv.{parts[3]}"] = v
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("kind,suffix", [("full", ".pth"), ("light", ".safetensors")])
def test_original_layout_equals_its_diffusers_conversion(kind, suffix, tmp_path):
    """TencentARC's single file (.pth read with weights_only=True, or .safetensors) gives the same features as
    the diffusers folder converted from it."""
    ref = diffusers_adapter("full", 1, seed=4) if kind == "full" else diffusers_adapter("light", seed=4)
    ref.save_pretrained(tmp_path / "diffusers")
    original = _to_original(ref.state_dict(), light=kind == "light")
    path = tmp_path / f"t2iadapter_sketch_sd15v2{suffix}"
    torch.save(original, path) if suffix == ".pth" else save_file(original, path)
    from_original = load_adapter(path, TINY3)
    from_diffusers = load_adapter(tmp_path / "diffusers", TINY3)
    x = torch.rand(1, from_original.cfg.in_channels, 16, 24)
    with torch.no_grad():
        for a, b in zip(from_original(x), from_diffusers(x), strict=True):
            assert torch.equal(a, b)


def test_released_sd15_layout():
    """The key names and shapes of the released SD1.5 adapters (t2iadapter_sketch_sd15v2: 4 levels x 2 blocks,
    1x1 in_conv at levels 1 and 2, greyscale input) map onto ldmkit's full adapter exactly."""
    shapes = {"conv_in.weight": (320, 64, 3, 3), "conv_in.bias": (320,)}
    widths = [320, 320, 640, 640, 1280, 1280, 1280, 1280]
    for i, c in enumerate(widths):
        shapes |= {f"body.{i}.block1.weight": (c, c, 3, 3), f"body.{i}.block1.bias": (c,),
                   f"body.{i}.block2.weight": (c, c, 1, 1), f"body.{i}.block2.bias": (c,)}
    shapes |= {"body.2.in_conv.weight": (640, 320, 1, 1), "body.2.in_conv.bias": (640,),
               "body.4.in_conv.weight": (1280, 640, 1, 1), "body.4.in_conv.bias": (1280,)}
    from ldmkit.t2i_adapter import _original_full, config_from_weights

    sd = _original_full({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    cfg = config_from_weights(sd)
    assert cfg == AdapterConfig(1, (320, 640, 1280, 1280), 2, 8, "full_adapter")
    with torch.device("meta"):
        ours = T2IAdapter(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_released_light_layout():
    """t2iadapter_color_sd14v1: 4 extractors body.N (1x1 in_conv to a quarter width, 4 blocks of two 3x3 convs,
    1x1 out_conv), widths 320, 640, 1280, 1280, RGB input."""
    from ldmkit.t2i_adapter import _original_light, config_from_weights

    shapes = {}
    for i, (c_in, c) in enumerate([(192, 320), (320, 640), (640, 1280), (1280, 1280)]):
        shapes |= {f"body.{i}.in_conv.weight": (c // 4, c_in, 1, 1), f"body.{i}.in_conv.bias": (c // 4,),
                   f"body.{i}.out_conv.weight": (c, c // 4, 1, 1), f"body.{i}.out_conv.bias": (c,)}
        for j in range(4):
            for b in ("block1", "block2"):
                name = f"body.{i}.body.{j}.{b}"
                shapes |= {f"{name}.weight": (c // 4, c // 4, 3, 3), f"{name}.bias": (c // 4,)}
    sd = _original_light({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    cfg = config_from_weights(sd)
    assert cfg == AdapterConfig(3, (320, 640, 1280), 4, 8, "light_adapter")
    with torch.device("meta"):
        ours = T2IAdapter(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_nested_pth_and_unreadable_variants(tmp_path):
    """A .pth holding {"adapter": weights} loads; the original variants diffusers cannot hold (convolutional
    downsampling, 3x3 second convolutions) are refused by name."""
    ref = diffusers_adapter("full", 1, seed=4)
    original = _to_original(ref.state_dict(), light=False)
    torch.save({"adapter": original}, tmp_path / "nested.pth")
    assert load_adapter(tmp_path / "nested.pth", TINY3).cfg.in_channels == 1
    save_file({**original, "body.2.down_opt.op.weight": torch.zeros(64, 32, 3, 3)}, tmp_path / "conv.safetensors")
    with pytest.raises(AdapterError, match="convolutional downsampling"):
        load_adapter(tmp_path / "conv.safetensors", TINY3)
    wide = {**original, "body.0.block2.weight": torch.zeros(32, 32, 3, 3)}
    save_file(wide, tmp_path / "k3.safetensors")
    with pytest.raises(AdapterError, match="ksize=3"):
        load_adapter(tmp_path / "k3.safetensors", TINY3)


# ---------------------------------------------------------------- the U-Net and whole images


@pytest.fixture(scope="module", params=[TINY3, TINY3_SD2], ids=lambda c: c.name)
def sd(request, tmp_path_factory):
    import diffusers

    cfg = request.param
    folder = tmp_path_factory.mktemp(f"ad-{cfg.name}")
    pipe = save_diffusers_pipeline(cfg, folder / "sd")
    pipe.scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace",
        prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon")
    adapters = {"full": diffusers_adapter("full", seed=1), "full2": diffusers_adapter("full", seed=2),
                "light": diffusers_adapter("light", seed=3)}
    for name, a in adapters.items():
        a.save_pretrained(folder / name)
    return folder, pipe, adapters


@pytest.mark.parametrize("h,w", [(8, 12), (7, 10)], ids=["even", "odd"])
def test_unet_with_features_matches_diffusers(sd, h, w):
    """The U-Net adds the features where diffusers' down_intrablock_additional_residuals go (also at an odd
    latent size, where the adapter's pooling and the U-Net's downsampling both round up)."""
    folder, pipe, adapters = sd
    model = checkpoint.load(folder / "sd")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        feats = [f * 0.7 for f in adapters["full"](torch.rand(1, 3, 2 * h, 2 * w, generator=g))]
        want = pipe.unet(x, t, ctx, down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
        plain = pipe.unet(x, t, ctx).sample
        got = model.unet(x, t, ctx, adapter=feats)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(plain, want) > 1e-2  # the features changed the output


def _diffusers_image(pipe, adapters, scales, maps):
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline

    comps = {k: v for k, v in pipe.components.items()
             if k in inspect.signature(StableDiffusionAdapterPipeline.__init__).parameters}
    multi = len(adapters) > 1
    p = StableDiffusionAdapterPipeline(**comps, adapter=MultiAdapter(adapters) if multi else adapters[0])
    out = p(PROMPT, image=maps if multi else maps[0], negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), width=SIZE[0], height=SIZE[1],
            adapter_conditioning_scale=scales if multi else scales[0], output_type="np")
    return (out.images[0] * 255).round().astype(np.int16)


def _params(units=()):
    return GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler",
                            scheduler="uniform", seed=SEED, width=SIZE[0], height=SIZE[1], controlnets=units)


@pytest.mark.parametrize("names,scales", [(["full"], [0.8]), (["light"], [1.0]), (["full", "full2"], [0.8, 0.5])],
                         ids=["full", "light", "two"])
def test_matches_diffusers_adapter_pipeline(sd, names, scales):
    folder, pipe, adapters = sd
    maps = _maps(len(names))
    ref = _diffusers_image(pipe, [adapters[n] for n in names], scales, maps)
    model = checkpoint.load(folder / "sd")
    units = []
    for n, w, m in zip(names, scales, maps, strict=True):
        net = load_adapter(folder / n, model.cfg)
        units.append(AdapterUnit(net, adapter_map(m, net.cfg, *SIZE), w))
    ours = np.asarray(txt2img(model, _params(units))[0]).astype(np.int16)
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    plain = np.asarray(txt2img(model, _params())[0]).astype(np.int16)
    assert np.abs(plain - ref).max() > 6 and ref.std() > 5  # the adapter changed the image


def test_sdxl_adapter_with_conditioning_factor(tmp_path):
    """SDXL's full_adapter_xl (4 features: 3 levels + the middle) vs StableDiffusionXLAdapterPipeline with
    adapter_conditioning_scale and adapter_conditioning_factor (= the unit's end)."""
    import diffusers
    from diffusers import StableDiffusionXLAdapterPipeline
    from test_sdxl import _diffusers_sdxl_folder

    pipe = _diffusers_sdxl_folder(TINY_SDXL, tmp_path)
    pipe.scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear", timestep_spacing="linspace")
    ref_adapter = diffusers_adapter("xl", seed=5)
    ref_adapter.save_pretrained(tmp_path / "xl-adapter")
    comps = {k: v for k, v in pipe.components.items()
             if k in inspect.signature(StableDiffusionXLAdapterPipeline.__init__).parameters}
    p = StableDiffusionXLAdapterPipeline(**comps, adapter=ref_adapter)
    m = _maps(1)[0]
    out = p(PROMPT, image=m, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
            generator=torch.Generator().manual_seed(SEED), width=SIZE[0], height=SIZE[1],
            adapter_conditioning_scale=2.0, adapter_conditioning_factor=0.25, output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    model = checkpoint.load(tmp_path / "model")
    net = load_adapter(tmp_path / "xl-adapter", model.cfg)
    unit = AdapterUnit(net, adapter_map(m, net.cfg, *SIZE), 2.0, 0.0, 0.25)
    ours = np.asarray(txt2img(model, _params([unit]))[0]).astype(np.int16)
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    plain = np.asarray(txt2img(model, _params())[0]).astype(np.int16)
    assert np.abs(plain - ref).max() > 6 and ref.std() > 5  # the adapter changed the image


def test_window_gives_features_to_its_steps_only():
    """end = 0.25 of 8 steps (diffusers' adapter_conditioning_factor: steps i < int(8 x 0.25)) feeds the
    features to the U-Net calls of steps 0 and 1 only; start = 0.5 to steps 4..7 only."""
    from ldmkit.core import model_schedule
    from ldmkit.denoisers import DiscreteDenoiser
    from ldmkit.samplers import sampler_spec
    from ldmkit.schedules import get_sigmas
    from ldmkit.t2i_adapter import AdaptedUNet

    class Model:
        cfg = TINY3

    sched = model_schedule(Model())
    sigmas = get_sigmas("uniform", 8, sched).float()
    net = T2IAdapter(AdapterConfig(3, (32, 64, 64), 1, 2)).eval()
    for start, end, steps in [(0.0, 0.25, [0, 1]), (0.5, 1.0, [4, 5, 6, 7])]:
        seen: list[bool] = []

        def unet(x, t, context, adapter=None, seen=seen):
            seen.append(adapter is not None)
            return torch.zeros_like(x)

        unit = AdapterUnit(net, torch.rand(1, 3, 16, 24), 1.0, start, end)
        den = DiscreteDenoiser(AdaptedUNet(unet, [unit], sched.sigma_to_t(sigmas[:-1]), 2), sched)
        with torch.no_grad():
            sampler_spec("Euler").fn(lambda x, s, den=den: den(x, s, context=torch.zeros(1, 7, 32)),
                                     torch.zeros(1, 4, 8, 12), sigmas)
        assert [i for i, on in enumerate(seen) if on] == steps


# ---------------------------------------------------------------- command line, API and bad input

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_controlnet import diffusers_controlnet

    d = tmp_path_factory.mktemp("ad-cli")
    save_diffusers_pipeline(TINY3, d / "sd")
    diffusers_adapter("full", seed=7).save_pretrained(d / "ad")
    diffusers_adapter("xl", seed=7).save_pretrained(d / "ad-xl")
    diffusers_controlnet(TINY3.unet, hint=(8, 16), seed=3).save_pretrained(d / "cn")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(d / "map.png")  # 48x32: resized
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(d / "map2.png")
    return d


def test_cli_equals_python_api(files, capsys, tmp_path):
    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "sd"), *SETTINGS,
                   "--adapter", str(files / "ad"), "--control-image", str(files / "map.png"),
                   "--control-weight", "0.8", "--control-end", "0.5", "-o", str(out))
    assert rc == 0, cap.err
    assert "resized to 24x16" in cap.err
    pipe = ldmkit.load(str(files / "sd"))
    unit = pipe.adapter_unit(files / "ad", Image.open(files / "map.png"), 24, 16, weight=0.8, end=0.5)
    kw = dict(steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24, height=16, cfg_scale=5)
    api = pipe.txt2img("a stone house", controlnets=[unit], **kw)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))
    plain = pipe.txt2img("a stone house", **kw)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(api))


def test_cli_units_pair_in_command_line_order(files, capsys, tmp_path):
    """--adapter before --controlnet: the first --control-image is the adapter's, the second the ControlNet's."""
    out = tmp_path / "both.png"
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "sd"), *SETTINGS,
                   "--adapter", str(files / "ad"), "--control-image", str(files / "map2.png"),
                   "--controlnet", str(files / "cn"), "--control-image", str(files / "map.png"), "-o", str(out))
    assert rc == 0, cap.err
    pipe = ldmkit.load(str(files / "sd"))
    units = [pipe.adapter_unit(files / "ad", Image.open(files / "map2.png"), 24, 16),
             pipe.control_unit(files / "cn", Image.open(files / "map.png"), 24, 16)]
    api = pipe.txt2img("a stone house", controlnets=units, steps=4, sampler="Euler", scheduler="uniform", seed=5,
                       width=24, height=16, cfg_scale=5)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))


def _sd_file(files, tmp_path):
    path = tmp_path / "sd.safetensors"
    checkpoint.save_single_file(checkpoint.load(files / "sd"), path)
    return path


def _unknown(files, tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, path)
    return path


def _cn_file(files, tmp_path):
    path = tmp_path / "control_sd15_canny.safetensors"  # original layout, by its key names alone
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, path)
    return path


def _style(files, tmp_path):
    path = tmp_path / "t2iadapter_style.safetensors"
    save_file({"style_embedding": torch.zeros(1, 8, 4), "transformer_layes.0.attn.in_proj_weight": torch.zeros(4)},
              path)
    return path


BAD = {
    "sdxl-adapter-on-sd1": (lambda f, t: f / "ad-xl", "for another model family"),
    "controlnet-as-adapter": (lambda f, t: f / "cn", "is a ControlNet, not a T2I-Adapter: pass it as --controlnet"),
    "controlnet-file-as-adapter": (_cn_file, "is a ControlNet, not a T2I-Adapter: pass it as --controlnet"),
    "checkpoint-as-adapter": (_sd_file, "not a T2I-Adapter: pass it as --model"),
    "unknown-layout": (_unknown, "is not a T2I-Adapter ldmkit reads"),
    "style-adapter": (_style, "style adapter"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_one_line(files, capsys, tmp_path, case):
    make, message = BAD[case]
    rc, cap = _run(capsys, "generate", "x", "--model", str(files / "sd"), *SETTINGS,
                   "--adapter", str(make(files, tmp_path)), "--control-image", str(files / "map.png"))
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len([ln for ln in lines if ln.startswith("ldmkit: error:")]) == 1 and "Traceback" not in cap.err
    assert message in lines[-1], lines[-1]


def test_missing_control_image_for_adapter(files, capsys):
    rc, cap = _run(capsys, "generate", "x", "--model", str(files / "sd"), *SETTINGS, "--adapter", str(files / "ad"))
    assert rc == 2 and "--control-image" in cap.err and "Traceback" not in cap.err


def test_info_describes_an_adapter(files, capsys):
    rc, cap = _run(capsys, "info", str(files / "ad"))
    assert rc == 0
    assert "T2I-Adapter (full_adapter): input channels 3, widths (32, 64, 64)" in cap.out


def test_adapter_error_is_a_checkpoint_error(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError):
        load_adapter(tmp_path / "a.safetensors")
