"""Live previews (CLI ``--preview``, the A1111 ``/sdapi/v1/progress`` ``current_image``) and the ``sd_vae`` option.

Approx cheap is checked against its closed form (A1111's 4x3 matrix written out here); server previews are
read over HTTP from inside the step callback, so "mid-generation" is exact, not a race with a poller.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldmkit import checkpoint, cli, convert, previews
from ldmkit import pipeline as P
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion
from ldmkit.models.taesd import TAESDConfig, TinyAutoencoder
from ldmkit.models.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")

# AUTOMATIC1111 modules/sd_vae_approx.py, cheap_approximation(): latent channel (row) -> R, G, B
A1111_CHEAP = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                        [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])


def closed_form_cheap(latent: np.ndarray) -> np.ndarray:
    """(4, h, w) -> (h, w, 3) uint8 as A1111's single_sample_to_image does for "Approx cheap"."""
    rgb = np.einsum("lxy,lr->xyr", latent.astype(np.float64), A1111_CHEAP)
    return (255.0 * np.clip(rgb * 0.5 + 0.5, 0, 1)).astype(np.uint8)


def test_approx_cheap_is_a1111s_linear_map():
    # one latent pixel per channel direction: the image is the matrix row, mapped from [-1, 1] to 0..255
    unit = torch.zeros(1, 4, 1, 4)
    for c in range(4):
        unit[0, c, 0, c] = 1.0
    got = np.asarray(previews.approx_cheap(unit)[0])
    assert got.shape == (1, 4, 3)
    assert got[0, 0].tolist() == [165, 153, 154]  # 255 * (0.5 + 0.5 * (0.298, 0.207, 0.208)), truncated
    np.testing.assert_array_equal(got[0], (255.0 * (A1111_CHEAP * 0.5 + 0.5)).astype(np.uint8))
    # a random latent batch: every image is the closed form (truncation may differ by one at a boundary)
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * 1.5
    for img, lat in zip(previews.approx_cheap(z), z.numpy(), strict=True):
        assert img.size == (5, 6) and img.mode == "RGB"
        diff = np.abs(np.asarray(img).astype(int) - closed_form_cheap(lat).astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    with pytest.raises(ValueError, match="maps 4 latent channels to RGB, but this model's latents have 16"):
        previews.approx_cheap(torch.zeros(1, 16, 2, 2))


def test_resolve_preview_types():
    model = StableDiffusion(TINY)
    z = torch.randn(1, 4, 3, 3)
    cheap = np.asarray(previews.approx_cheap(z)[0])
    assert previews.cheap_map(model) == (previews.APPROX_CHEAP_SD, None)  # SD's latent space: A1111's matrix
    np.testing.assert_array_equal(np.asarray(previews.resolve("Approx cheap", model)(z)[0]), cheap)
    np.testing.assert_array_equal(np.asarray(previews.resolve("Approx NN", model)(z)[0]), cheap)  # no tiny one
    tiny = previews.TinyPreview(TinyAutoencoder(TAESDConfig.of_width(8, levels=2)))  # f = 2, as this model
    assert previews.resolve("TAESD", model, tiny) is tiny and previews.resolve("Approx NN", model, tiny) is tiny
    # a tiny decoder made for another model (f = 8; a server may switch models): Approx cheap instead
    other = previews.TinyPreview(TinyAutoencoder(TAESDConfig.of_width(8)))
    np.testing.assert_array_equal(np.asarray(previews.resolve("TAESD", model, other)(z)[0]), cheap)
    z = torch.randn(1, 4, 4, 4)
    full = previews.resolve("Full", model)(z)[0]
    assert np.array_equal(np.asarray(full), np.asarray(P.decode_latents(model, z)[0]))
    with pytest.raises(ValueError, match="unknown preview type 'Fast'; valid: Approx cheap, Approx NN, TAESD, Full"):
        previews.resolve("Fast", model)


def test_approx_cheap_fitted_for_another_latent_space():
    """The built-in emoji model has its own autoencoder: A1111's matrix is meaningless there, a fitted one is not."""
    from ldmkit import api

    if api.builtin_model_path("emoji") is None:
        pytest.skip("the built-in emoji model is not installed")
    model = api.load(device="cpu").model
    assert model.cfg.vae.scale_factor != previews.SD_SCALE_FACTOR
    last = {}
    final = P.txt2img(model, P.GenerationParams(prompt="a red apple", seed=1, steps=12, width=64, height=64),
                      callback=lambda d: last.update(z=d["denoised"]))[0]
    z = last["z"]
    want = np.asarray(final.resize((z.shape[3], z.shape[2]), Image.Resampling.BOX)).astype(float)

    def rmse(img: Image.Image) -> float:
        return float(np.sqrt(((np.asarray(img).astype(float) - want) ** 2).mean()))

    coeffs, bias = previews.cheap_map(model)
    assert coeffs.shape == (4, 3) and bias.shape == (3,)
    fitted, a1111 = rmse(previews.resolve("Approx cheap", model)(z)[0]), rmse(previews.approx_cheap(z)[0])
    assert fitted < 60 and a1111 > 2 * fitted  # measured: 49 and 138 (of 255)
    # the best any linear map with a bias could do on this very latent: least squares, numpy
    x = np.concatenate([z[0].reshape(4, -1).T.numpy(), np.ones((z.shape[2] * z.shape[3], 1))], axis=1)
    w = np.linalg.lstsq(x, want.reshape(-1, 3) / 127.5 - 1, rcond=None)[0]
    best = np.sqrt(((np.clip((x @ w) * 0.5 + 0.5, 0, 1) * 255 - want.reshape(-1, 3)) ** 2).mean())
    assert best <= fitted < 2 * best


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    checkpoint.save_single_file(StableDiffusion(TINY), d / "tiny.safetensors")
    return d / "tiny.safetensors"


def test_cli_preview_written_after_every_step(tiny_file, tmp_path, monkeypatch, capsys):
    seen: list[bytes] = []
    real = previews.preview_writer

    def recording(path, decoder):
        write = real(path, decoder)

        def step(d):
            write(d)
            seen.append(Path(path).read_bytes())  # what a viewer reloading the file sees after this step
            # the matching closed form of this step's denoised latent
            np.testing.assert_allclose(np.asarray(Image.open(io.BytesIO(seen[-1]))),
                                       closed_form_cheap(d["denoised"][0].numpy()), atol=1)

        return step

    monkeypatch.setattr(previews, "preview_writer", recording)
    preview = tmp_path / "preview.png"
    rc = cli.main(["generate", "a red apple", "--model", str(tiny_file), "--steps", "5", "--sampler", "Euler",
                   "--width", "16", "--height", "16", "--seed", "3", "-o", str(tmp_path / "out.png"),
                   "--preview", str(preview)])
    assert rc == 0
    assert len(seen) == 5 and len(set(seen)) >= 4  # written after every step, and it changes
    assert Image.open(preview).size == (8, 8)  # Approx cheap: one pixel per latent (this model's f = 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "preview.png"]  # no temporary files left
    lines = [line for line in capsys.readouterr().err.split("\n") if line.strip()]
    assert len(lines) == 2 and lines[0].lstrip("\r").startswith("generate:") and lines[1].startswith("done in")


def test_cli_preview_vae_is_the_tiny_decoder(tiny_file, vae_dir, tmp_path, monkeypatch):
    ref = taesd_reference(vae_dir / "taesd-tiny")
    shots = []
    real = previews.preview_writer

    def recording(path, decoder):
        write = real(path, decoder)

        def step(d):
            write(d)
            shots.append((np.asarray(Image.open(path).convert("RGB")), d["denoised"][0].clone()))

        return step

    monkeypatch.setattr(previews, "preview_writer", recording)
    rc = cli.main(["generate", "a red apple", "--model", str(tiny_file), "--steps", "3", "--sampler", "Euler",
                   "--width", "16", "--height", "16", "--seed", "3", "-o", str(tmp_path / "out.png"),
                   "--preview", str(tmp_path / "p.png"), "--preview-vae", str(vae_dir / "taesd-tiny")])
    assert rc == 0 and len(shots) == 3
    for got, latent in shots:
        assert got.shape == (16, 16, 3)  # full size, unlike Approx cheap
        diff = np.abs(got.astype(int) - reference_preview(ref, latent).astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_cli_preview_vae_with_wrong_latent_channels(tiny_file, tmp_path, capsys):
    taesd_reference(tmp_path / "taesd16", latent_channels=16)
    rc = cli.main(["generate", "x", "--model", str(tiny_file), "--steps", "1", "--preview", str(tmp_path / "p.png"),
                   "--preview-vae", str(tmp_path / "taesd16")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"ldmkit: error: --preview-vae {tmp_path / 'taesd16'}: a tiny autoencoder with 16 latent "
                          "channels, but tiny uses 4 ")


def test_cli_preview_vae_without_preview_is_an_error(tiny_file, capsys):
    rc = cli.main(["generate", "x", "--model", str(tiny_file), "--steps", "1", "--preview-vae", "taesd/"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("ldmkit: error: --preview-vae needs --preview FILE.png "
                                               "(where to write the preview)")


# ---------------------------------------------------------------- server

fastapi = pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
requests = pytest.importorskip("requests")

from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402

DEFAULTS = {"live_previews_enable": True, "show_progress_every_n_steps": 1, "show_progress_type": "Approx NN",
            "live_previews_image_format": "png", "sd_vae": "Automatic"}


def kl_vae_file(path, seed: int) -> None:
    """A random KL VAE for the tiny model, in the LDM standalone layout (keys without a prefix)."""
    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in AutoencoderKL(TINY.vae).state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vaes")
    kl_vae_file(d / "kl-a.safetensors", 10)
    # the same weights as a diffusers folder
    sd, _ = checkpoint.read_state_dict(d / "kl-a.safetensors")
    folder = d / "kl-a-diffusers"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in convert.vae_ldm_to_diffusers(sd, TINY.vae).items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(convert.diffusers_vae_config(TINY.vae)))
    (d / "notes.txt").write_text("not a VAE")
    taesd_reference(d / "taesd-tiny")
    return d


def taesd_reference(folder: Path, latent_channels: int = 4):
    """A random diffusers ``AutoencoderTiny`` for the tiny model (f = 2: two levels), saved as a folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(3)
    ref = diffusers.AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                                    latent_channels=latent_channels).eval()
    if not folder.exists():
        ref.save_pretrained(folder)
    return ref


def reference_preview(ref, latent: torch.Tensor) -> np.ndarray:
    """diffusers' tiny decode of one scaled latent, converted to 8 bits as A1111 converts previews."""
    with torch.no_grad():
        x = ref.decode(latent[None]).sample[0]
    return (255.0 * np.clip(x.permute(1, 2, 0).double().numpy() * 0.5 + 0.5, 0, 1)).astype(np.uint8)


@pytest.fixture(scope="module")
def server(tiny_file, vae_dir):
    app = create_app(tiny_file, preview_interval=0, device="cpu", vae_dir=vae_dir)
    with BackgroundServer(app) as url:
        yield app, url


@pytest.fixture
def url(server):
    _, url = server
    yield url
    assert requests.post(f"{url}/sdapi/v1/options", json=DEFAULTS, timeout=60).ok


@pytest.fixture
def polled(server, monkeypatch):
    """txt2img whose step callback reads /sdapi/v1/progress over HTTP after each step."""
    _, url = server
    seen: list[dict] = []
    real = P.txt2img

    def txt2img(model, params, callback=None):
        def cb(d):
            callback(d)
            seen.append(requests.get(f"{url}/sdapi/v1/progress", timeout=30).json())

        return real(model, params, callback=cb)

    monkeypatch.setattr(P, "txt2img", txt2img)
    return seen


def generate(url: str, steps: int = 6, **kw) -> requests.Response:
    body = {"prompt": "a red apple", "seed": 5, "steps": steps, "width": 16, "height": 16, "sampler_name": "Euler",
            **kw}
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)


def set_options(url: str, **options) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/options", json=options, timeout=60)


def image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_progress_has_current_image_mid_generation(url, polled):
    assert set_options(url, show_progress_type="Approx cheap").ok
    assert generate(url).ok
    assert [p["state"]["sampling_step"] for p in polled] == [1, 2, 3, 4, 5, 6]
    shots = [p["current_image"] for p in polled]
    assert all(shots) and len(set(shots)) >= 5  # a new preview every step
    assert {image(s).size for s in shots} == {(8, 8)} and image(shots[0]).format == "PNG"
    assert requests.get(f"{url}/sdapi/v1/progress", timeout=30).json()["current_image"] is None  # idle


def test_preview_types_and_formats(url, polled):
    assert set_options(url, show_progress_type="Full", live_previews_image_format="jpeg").ok
    assert generate(url, steps=2).ok
    assert image(polled[-1]["current_image"]).format == "JPEG" and image(polled[-1]["current_image"]).size == (16, 16)
    assert set_options(url, show_progress_type="Approx NN", live_previews_image_format="webp").ok
    assert generate(url, steps=2).ok
    shot = image(polled[-1]["current_image"])
    assert shot.format == "WEBP" and shot.size == (8, 8)  # no tiny decoder given: Approx NN is the cheap map


def test_skip_current_image(url, server, monkeypatch):
    seen = []
    real = P.txt2img

    def txt2img(model, params, callback=None):
        def cb(d):
            callback(d)
            seen.append(requests.get(f"{url}/sdapi/v1/progress", params={"skip_current_image": "true"},
                                     timeout=30).json())

        return real(model, params, callback=cb)

    monkeypatch.setattr(P, "txt2img", txt2img)
    assert generate(url, steps=2).ok
    assert [p["current_image"] for p in seen] == [None, None] and seen[-1]["state"]["sampling_step"] == 2


def test_live_previews_disabled(url, polled):
    assert set_options(url, live_previews_enable=False).ok
    assert generate(url, steps=3).ok
    assert [p["current_image"] for p in polled] == [None, None, None]
    assert [p["state"]["sampling_step"] for p in polled] == [1, 2, 3]  # progress still reported


def test_show_progress_every_n_steps(url, polled):
    assert set_options(url, show_progress_every_n_steps=3, show_progress_type="Approx cheap").ok
    assert generate(url, steps=10).ok
    shots = [p["current_image"] for p in polled]
    changes = [i + 1 for i in range(10) if shots[i] is not None and (i == 0 or shots[i] != shots[i - 1])]
    assert shots[:2] == [None, None] and changes == [3, 6, 9]
    polled.clear()
    assert set_options(url, show_progress_every_n_steps=-1).ok  # A1111: none while sampling
    assert generate(url, steps=3).ok
    assert [p["current_image"] for p in polled] == [None, None, None]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("show_progress_type", "Fast", "show_progress_type must be one of: Approx cheap, Approx NN, TAESD, Full"),
    ("live_previews_image_format", "gif", "live_previews_image_format must be one of: png, jpeg, webp"),
    ("show_progress_every_n_steps", -2, "show_progress_every_n_steps must be an integer"),
    ("live_previews_enable", "yes", "live_previews_enable must be true or false"),
])
def test_bad_preview_options_are_422(url, option, value, message):
    r = set_options(url, **{option: value})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", option] and message in r.json()["detail"][0]["msg"]


def test_sd_vae_list(url, vae_dir):
    items = requests.get(f"{url}/sdapi/v1/sd-vae", timeout=30).json()
    names = ["kl-a-diffusers", "kl-a.safetensors", "taesd-tiny"]
    assert items == [{"model_name": n, "filename": str((vae_dir / n).resolve())} for n in names]
    assert requests.get(f"{url}/sdapi/v1/options", timeout=30).json()["sd_vae"] == "Automatic"


def pixels(b64: str) -> np.ndarray:
    return np.asarray(image(b64).convert("RGB"))


def test_sd_vae_switches_the_decoder(url, tiny_file, vae_dir):
    params = P.GenerationParams(prompt="a red apple", seed=5, steps=3, width=16, height=16, sampler="Euler")
    own = P.txt2img(checkpoint.load(tiny_file), params)[0]
    # the reference: the standalone-VAE loading that `ldmkit generate --vae` uses
    swapped = P.txt2img(checkpoint.load(tiny_file, vae=vae_dir / "kl-a.safetensors"), params)[0]
    assert not np.array_equal(np.asarray(own), np.asarray(swapped))

    r = generate(url, steps=3)
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), np.asarray(own))
    for name in ("kl-a.safetensors", "kl-a-diffusers"):
        assert set_options(url, sd_vae=name).ok
        assert requests.get(f"{url}/sdapi/v1/options", timeout=30).json()["sd_vae"] == name
        r = generate(url, steps=3)
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), np.asarray(swapped))
        assert json.loads(r.json()["info"])["sd_vae_name"] == name
    for default in ("None", "Automatic"):
        assert set_options(url, sd_vae=default).ok
        np.testing.assert_array_equal(pixels(generate(url, steps=3).json()["images"][0]), np.asarray(own))
    # a per-request override, as A1111's override_settings
    r = generate(url, steps=3, override_settings={"sd_vae": "kl-a.safetensors"})
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), np.asarray(swapped))


def test_sd_vae_tiny_autoencoder(url, tiny_file, vae_dir):
    params = P.GenerationParams(prompt="a red apple", seed=5, steps=3, width=16, height=16, sampler="Euler")
    # the reference: `ldmkit generate --vae taesd-tiny/` (the tiny autoencoder as the final decoder)
    want = P.txt2img(checkpoint.load(tiny_file, vae=vae_dir / "taesd-tiny"), params)[0]
    assert set_options(url, sd_vae="taesd-tiny").ok
    r = generate(url, steps=3)
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), np.asarray(want))
    # img2img encodes with it too
    init = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    body = {"prompt": "a red apple", "seed": 5, "steps": 4, "width": 16, "height": 16, "sampler_name": "Euler",
            "init_images": [base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.5}
    r = requests.post(f"{url}/sdapi/v1/img2img", json=body, timeout=120)
    want = P.img2img(checkpoint.load(tiny_file, vae=vae_dir / "taesd-tiny"), params.replace(steps=4, strength=0.5),
                     init)[0]
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), np.asarray(want))


def test_bad_sd_vae_is_422_naming_the_valid_ones(url):
    r = set_options(url, sd_vae="missing.safetensors")
    assert r.status_code == 422
    msg = r.json()["detail"][0]["msg"]
    assert msg.startswith("no VAE 'missing.safetensors' in ")
    assert msg.endswith("valid: Automatic, None, kl-a-diffusers, kl-a.safetensors, taesd-tiny")
    assert requests.get(f"{url}/sdapi/v1/options", timeout=30).json()["sd_vae"] == "Automatic"  # unchanged
    r = generate(url, steps=1, override_settings={"sd_vae": "nope"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "override_settings", "sd_vae"]


def test_sd_vae_for_another_architecture_is_refused(url, vae_dir):
    wrong = vae_dir / "wrong.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(wrong))
    taesd_reference(vae_dir / "taesd16", latent_channels=16)
    try:
        r = set_options(url, sd_vae="wrong.safetensors")
        assert r.status_code == 400 and "VAE wrong.safetensors:" in r.json()["detail"]
        r = set_options(url, sd_vae="taesd16")
        assert r.status_code == 400
        assert "a tiny autoencoder with 16 latent channels, but tiny uses 4" in r.json()["detail"]
        assert requests.get(f"{url}/sdapi/v1/options", timeout=30).json()["sd_vae"] == "Automatic"
    finally:
        wrong.unlink()
        shutil.rmtree(vae_dir / "taesd16")


def test_no_vae_dir(tiny_file):
    app = create_app(tiny_file, device="cpu")
    with BackgroundServer(app) as url:
        assert requests.get(f"{url}/sdapi/v1/sd-vae", timeout=30).json() == []
        r = set_options(url, sd_vae="x.safetensors")
        assert r.status_code == 422
        assert r.json()["detail"][0]["msg"] == ("no VAE 'x.safetensors' (start the server with --vae-dir DIR); "
                                                "valid: Automatic, None")


def test_server_preview_vae(tiny_file, vae_dir, monkeypatch):
    ref = taesd_reference(vae_dir / "taesd-tiny")
    app = create_app(tiny_file, device="cpu", preview_interval=0, preview_vae=vae_dir / "taesd-tiny")
    with BackgroundServer(app) as url:
        assert requests.get(f"{url}/sdapi/v1/options", timeout=30).json()["show_progress_type"] == "Approx NN"
        seen = []
        real = P.txt2img

        def txt2img(model, params, callback=None):
            def cb(d):
                callback(d)
                seen.append((requests.get(f"{url}/sdapi/v1/progress", timeout=30).json(), d["denoised"][0].clone()))

            return real(model, params, callback=cb)

        monkeypatch.setattr(P, "txt2img", txt2img)
        assert generate(url, steps=3).ok
    assert len(seen) == 3
    for progress, latent in seen:
        got = pixels(progress["current_image"])
        assert got.shape == (16, 16, 3)
        diff = np.abs(got.astype(int) - reference_preview(ref, latent).astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
