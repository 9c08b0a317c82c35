"""The A1111 ControlNet extension's unit settings (issue 16, part 1): control modes, resize modes, pixel perfect,
preprocessor resolution, infotext; each against a closed-form reimplementation of the extension's definition
(Mikubill/sd-webui-controlnet: scripts/hook.py, Script.detectmap_proc, external_code.pixel_perfect_resolution).
Guess mode against diffusers' guess_mode=True is in test_controlnet_pipeline.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import controlnet_a1111 as A
from ldmkit.config import TINY
from ldmkit.controlnet import ControlledUNet, ControlUnit
from ldmkit.model import StableDiffusion
from ldmkit.models.controlnet import ControlNet, ControlNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    unet = StableDiffusion(TINY).unet.eval()
    net = ControlNet(ControlNetConfig(TINY.unet, hint_channels=(8, 16))).eval()  # random zero convs: visible
    return unet, net


def _extension_call(unet, net, x, t, ctx, hint, weight, mode, cond_mark):
    """hook.py's forward for one ControlNet: residuals of the whole batch, soft scales 0.825^(12 - i) (here
    0.825^(K - i) for K skips), multiplied by the conditional mark under CFG injection; then the U-Net."""
    with torch.no_grad():
        r = net(x, hint.expand(x.shape[0], -1, -1, -1), t, ctx)
        control = [*r.down, r.mid]
        k = len(r.down)
        scales = [weight] * (k + 1)
        if mode != "Balanced":  # soft_injection = control_mode != BALANCED
            scales = [weight * 0.825 ** float(k - i) for i in range(k + 1)]
        if mode == "ControlNet is more important":  # cfg_injection = control_mode == CONTROL
            control = [c * cond_mark for c in control]
        control = [c * s for c, s in zip(control, scales, strict=True)]
        return unet(x, t, ctx, control=(control[:-1], control[-1]))


@pytest.mark.parametrize("mode", A.CONTROL_MODES)
def test_control_modes_match_the_extension(nets, mode):
    unet, net = nets
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 12, generator=g)  # a CFG batch: 2 unconditional rows, then 2 conditional
    t = torch.full((4,), 500.0)
    ctx = torch.randn(4, 7, TINY.unet.context_dim, generator=g)
    hint = torch.rand(1, 3, 16, 24, generator=g)
    mark = torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None, None, None]
    ref = _extension_call(unet, net, x, t, ctx, hint, 0.7, mode, mark)
    unit = ControlUnit(net, hint, 0.7, control_mode=mode)
    with torch.no_grad():
        ours = ControlledUNet(unet, [unit], torch.tensor([999.0, 500.0]), uncond_rows=2)(x, t, ctx)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and every mode differs from the others (the scales and rows matter)
        balanced = ControlledUNet(unet, [ControlUnit(net, hint, 0.7)], torch.tensor([999.0, 500.0]), 2)(x, t, ctx)
    if mode != "Balanced":
        assert (ours - balanced).abs().max() > 1e-3
    if mode == "ControlNet is more important":  # the unconditional rows are the plain U-Net's
        with torch.no_grad():
            plain = unet(x, t, ctx)
        assert torch.allclose(ours[:2], plain[:2], atol=1e-6)


def test_hires_options_and_forced_soft_injection(nets):
    """hook.py in the hires fix's second pass: hr_option turns a unit off in one pass; canny/mlsd units get the
    soft scales there whatever their mode (high_res_fix_forced_soft_injection)."""
    import torch.nn.functional as F

    unet, net = nets
    g = torch.Generator().manual_seed(2)
    hint = torch.rand(1, 3, 16, 24, generator=g)  # made at the first pass's size: latents 8x12
    mark = torch.ones(4)[:, None, None, None]
    for h, w in ((8, 12), (16, 24)):  # first pass, then a second pass at twice the size
        x = torch.randn(4, 4, h, w, generator=g)
        t = torch.full((4,), 300.0)
        ctx = torch.randn(4, 7, TINY.unet.context_dim, generator=g)
        big = F.interpolate(hint, size=[2 * h, 2 * w], mode="bilinear", align_corners=False) if h == 16 else hint
        with torch.no_grad():
            plain = unet(x, t, ctx)

        def run(unit, x=x, t=t, ctx=ctx):
            with torch.no_grad():
                return ControlledUNet(unet, [unit], torch.tensor([999.0, 300.0]), uncond_rows=2)(x, t, ctx)

        low = run(ControlUnit(net, hint, 0.9, hr_option="Low res only"))
        high = run(ControlUnit(net, hint, 0.9, hr_option="High res only"))
        balanced = _extension_call(unet, net, x, t, ctx, big, 0.9, "Balanced", mark)
        assert torch.allclose(low if h == 8 else high, balanced, atol=1e-5)
        assert torch.equal(high if h == 8 else low, plain)
        canny = run(ControlUnit(net, hint, 0.9, settings={"module": "canny"}))
        soft = _extension_call(unet, net, x, t, ctx, big, 0.9, "My prompt is more important", mark)
        assert torch.allclose(canny, soft if h == 16 else balanced, atol=1e-5)


def test_soft_scales_are_the_extensions_13():
    s = A.soft_scales(12)
    assert len(s) == 13 and s[-1] == 1.0 and s[0] == pytest.approx(0.825 ** 12)


@pytest.mark.parametrize("value,name", [(0, "Balanced"), (1, "My prompt is more important"),
                                        (2, "ControlNet is more important"), ("prompt", "My prompt is more important"),
                                        ("controlnet", "ControlNet is more important"), ("balanced", "Balanced")])
def test_control_mode_names(value, name):
    assert A.control_mode_name(value) == name


@pytest.mark.parametrize("value,name", [(0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"),
                                        (3, "Just Resize"), ("Inner Fit (Scale to Fit)", "Crop and Resize"),
                                        ("Envelope (Outer Fit)", "Resize and Fill"), ("crop-and-resize",
                                                                                      "Crop and Resize")])
def test_resize_mode_names(value, name):
    assert A.resize_mode_name(value) == name


def test_bad_mode_names_say_the_choices():
    with pytest.raises(ValueError, match="My prompt is more important"):
        A.control_mode_name(5)
    with pytest.raises(ValueError, match="Resize and Fill"):
        A.resize_mode_name("stretch")


def _three_colours(h, w):
    """A map of three colours: the extension resizes it with nearest neighbour (2 < colours < 200)."""
    rng = np.random.default_rng(0)
    palette = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 90]], dtype=np.uint8)
    return palette[rng.integers(0, 3, (h, w))]


def test_crop_and_resize_closed_form():
    a = _three_colours(4, 8)  # H=4, W=8 -> 16x16: k = max(16/4, 16/8) = 4: 16x32, centre 16 columns
    out = A.fit_map(a, 16, 16, "Crop and Resize")
    big = a.repeat(4, 0).repeat(4, 1)
    assert np.array_equal(out, big[:, 8:24])


def test_resize_and_fill_closed_form():
    a = _three_colours(4, 8)
    a[0, :] = a[-1, :] = a[:, 0] = a[:, -1] = [200, 30, 30]  # the border's median colour
    out = A.fit_map(a, 16, 16, "Resize and Fill")  # k = min(4, 2) = 2: 8x16 at rows 4..12
    expect = np.tile(np.array([200, 30, 30], dtype=np.uint8), (16, 16, 1))
    expect[4:12] = a.repeat(2, 0).repeat(2, 1)
    assert np.array_equal(out, expect)


def test_just_resize_stretches():
    a = _three_colours(4, 8)
    assert np.array_equal(A.fit_map(a, 16, 8, "Just Resize"), a.repeat(2, 0).repeat(2, 1))


def test_binary_map_stays_binary_when_resized():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    a[2:6, 2:6] = 255
    out = A.fit_map(a, 21, 21, "Just Resize")  # bicubic, then Otsu again: two values only
    assert set(np.unique(out)) == {0, 255}


def test_one_pixel_edges_stay_one_pixel_wide():
    """A one-pixel outline (Canny-like) upscaled 2x: thinned back to one pixel, as the extension's lvmin_thin."""
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    a[4, 4:12] = a[11, 4:12] = a[4:12, 4] = a[4:12, 11] = 255  # a square outline
    out = A.fit_map(a, 32, 32, "Just Resize")[..., 0] > 0
    assert set(np.unique(A.fit_map(a, 32, 32, "Just Resize"))) == {0, 255}
    for r in range(12, 20):  # rows through the middle cross the outline twice, one pixel each side
        cols = np.nonzero(out[r])[0]
        assert len(cols) == 2 and cols[0] < 12 and cols[1] > 20, (r, cols)
    wide = np.zeros((16, 16, 3), dtype=np.uint8)
    wide[4:12, 4:12] = 255  # a filled square is not an edge map: no thinning, just Otsu
    assert (A.fit_map(wide, 32, 32, "Just Resize")[10:22, 10:22] == 255).all()


@pytest.mark.parametrize("size,target,mode,expect", [
    ((48, 32), (24, 16), "Crop and Resize", 16),
    ((30, 20), (64, 64), "Crop and Resize", 64),  # max(64/20, 64/30) x 20
    ((30, 20), (64, 64), "Resize and Fill", 43),  # min(...) x 20 = 42.67
    ((30, 20), (64, 64), "Just Resize", 64),
])
def test_pixel_perfect_resolution(size, target, mode, expect):
    assert A.pixel_perfect_resolution(size, *target, mode) == expect


def test_processor_res_scales_the_input_first():
    """Canny at processor_res 64 on a 16x16 square image: the map is 64x64 (short side 64), edges of the
    4x larger square."""
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    a[4:12, 4:12] = 255
    out = np.asarray(A.run_preprocessor("canny", Image.fromarray(a), processor_res=64))
    assert out.shape == (64, 64, 3)
    rows = np.nonzero(out[..., 0].any(1))[0]
    assert 14 <= rows.min() <= 17 and 46 <= rows.max() <= 49


def test_pixel_perfect_map_is_made_at_the_output_size(nets):
    img = Image.fromarray(_three_colours(10, 30))
    logs = []
    hint, res = A.control_image(img, 24, 16, "canny", "Resize and Fill", pixel_perfect=True, log=logs.append)
    assert res == 8 and hint.size == (24, 16)  # min(16/10, 24/30) x 10
    assert logs == ["control image 30x10 resized to 24x16 (resize and fill; canny ran at 24x8)"]


def test_infotext_line_as_the_extension_writes_it():
    settings = {"module": "canny", "model": "control_sd15_canny [fef5e48e]", "weight": 0.8,
                "resize_mode": "Crop and Resize", "processor_res": 512, "threshold_a": 100.0, "threshold_b": 200.0,
                "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False, "control_mode": "Balanced"}
    text = A.unit_infotext(settings)
    assert text == ('"Module: canny, Model: control_sd15_canny [fef5e48e], Weight: 0.8, Resize Mode: Crop and '
                    'Resize, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, '
                    'Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"')
    from ldmkit.infotext import parse_infotext

    fields = parse_infotext(f"a house\nSteps: 4, Sampler: Euler, ControlNet 0: {text}, Version: x")
    assert fields["ControlNet 0"].startswith("Module: canny, Model: control_sd15_canny [fef5e48e]")


def test_a1111_model_hash(tmp_path):
    import hashlib

    data = bytes(range(256)) * 8192  # 2 MiB
    (tmp_path / "cn.safetensors").write_bytes(data)
    assert A.a1111_model_hash(tmp_path / "cn.safetensors") == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert A.model_title(tmp_path / "cn.safetensors").startswith("cn [")


# ---------------------------------------------------------------- the command line


from test_controlnet_cli import SETTINGS, _run, files  # noqa: E402, F401 - the tiny SD + ControlNet files


def test_cli_a1111_unit_flags_equal_the_python_api(files, capsys, tmp_path):  # noqa: F811
    import ldmkit
    from ldmkit.cli import main  # noqa: F401
    from ldmkit.infotext import read_parameters

    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "sd"), *SETTINGS,
                   "--controlnet", str(files / "cn"), "--control-image", str(files / "map.png"),
                   "--preprocessor", "canny", "--control-mode", "prompt", "--resize-mode", "crop-and-resize",
                   "--pixel-perfect", "--control-threshold-a", "50", "-o", str(out))
    assert rc == 0, cap.err
    pipe = ldmkit.load(str(files / "sd"))
    unit = pipe.control_unit(files / "cn", Image.open(files / "map.png"), 24, 16, preprocessor="canny",
                             control_mode="My prompt is more important", resize_mode="Crop and Resize",
                             pixel_perfect=True, threshold_a=50)
    api = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24, height=16,
                       cfg_scale=5, controlnets=[unit])[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))
    balanced = pipe.control_unit(files / "cn", Image.open(files / "map.png"), 24, 16, preprocessor="canny",
                                 resize_mode="Crop and Resize", pixel_perfect=True, threshold_a=50)
    other = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24,
                         height=16, cfg_scale=5, controlnets=[balanced])[0]
    assert not np.array_equal(np.asarray(other), np.asarray(api))  # the mode changed the image
    text = read_parameters(out)
    title = A.model_title(files / "cn")  # "cn [8 hex digits]": A1111's short hash of the weights file
    assert (f'ControlNet 0: "Module: canny, Model: {title}, Weight: 1.0, Resize Mode: Crop and Resize, '
            'Processor Res: 16, Threshold A: 50.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, '
            'Pixel Perfect: True, Control Mode: My prompt is more important"') in text, text


@pytest.mark.parametrize("argv,expect", [
    (["--control-mode", "loud"], "unknown control mode 'loud'"),
    (["--resize-mode", "stretch"], "unknown resize mode 'stretch'"),
    (["--pixel-perfect", "maybe"], "--pixel-perfect takes on or off"),
    (["--control-hr-option", "sometimes"], "unknown hires-fix option 'sometimes'"),
    (["--control-hr-option", "low", "--hires-scale", "2", "--hires-upscaler", "Lanczos"], None),
    (["--preprocessor", "blur_gaussian", "--control-mode", "1", "--processor-res", "8"], None),
])
def test_cli_unit_flag_errors_are_one_line(files, capsys, tmp_path, argv, expect):  # noqa: F811
    rc, cap = _run(capsys, "generate", "a house", "--model", str(files / "sd"), *SETTINGS, "--controlnet",
                   str(files / "cn"), "--control-image", str(files / "map.png"), *argv, "-o", str(tmp_path / "o.png"))
    if expect is None:  # the extension's module name and an int mode are accepted
        assert rc == 0, cap.err
        return
    assert rc == 2
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("ldmkit: error")]
    assert len(lines) == 1 and expect in lines[0], cap.err
    assert "Traceback" not in cap.err


def test_cli_guess_mode_is_diffusers_guess_mode(files, capsys, tmp_path):  # noqa: F811
    """--control-mode guess: diffusers' guess_mode (its parity with diffusers: test_controlnet_pipeline)."""
    import ldmkit

    out = tmp_path / "guess.png"
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "sd"), *SETTINGS, "--controlnet",
                   str(files / "cn"), "--control-image", str(files / "map.png"), "--control-mode", "guess",
                   "-o", str(out))
    assert rc == 0, cap.err
    pipe = ldmkit.load(str(files / "sd"))
    unit = pipe.control_unit(files / "cn", Image.open(files / "map.png"), 24, 16, guess_mode=True)
    api = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24, height=16,
                       cfg_scale=5, controlnets=[unit])[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))
