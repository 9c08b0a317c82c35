"""The SDXL autoencoder against diffusers' AutoencoderKL with the SDXL config (scaling_factor 0.13025), and a
standalone SDXL VAE given with ``--vae`` in each layout people download: a diffusers folder in fp16 (as
madebyollin/sdxl-vae-fp16-fix ships; the fix is only other weights), the LDM single file A1111 reads
(``sdxl_vae.safetensors``) and a diffusers-named single file.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import _perturb_norms, rel_err
from safetensors.torch import load_file, save_file

from ldmkit import checkpoint, convert
from ldmkit.config import SDXL_BASE, TINY_SDXL, VAEConfig
from ldmkit.models.vae import AutoencoderKL

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_vae(cfg: VAEConfig, seed: int):
    from diffusers import AutoencoderKL as Ref

    torch.manual_seed(seed)
    ref = Ref(**convert.diffusers_vae_config(cfg, sample_size=1024)).eval()
    _perturb_norms(ref)
    return ref


def _check(ours: AutoencoderKL, ref, size: int) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, size, size, generator=g)
    x = torch.rand(1, 3, 8 * size, 8 * size, generator=g) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= TOL
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL


def test_sdxl_vae_config_is_diffusers():
    """SDXL's autoencoder is SD's architecture with latents scaled by 0.13025 (sd_xl_base.yaml scale_factor,
    diffusers' vae/config.json scaling_factor)."""
    d = convert.diffusers_vae_config(SDXL_BASE.vae, sample_size=1024)
    assert d["scaling_factor"] == 0.13025 and d["block_out_channels"] == [128, 256, 512, 512]
    assert convert.vae_config_from_diffusers(d) == SDXL_BASE.vae


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    from ldmkit.checkpoint_sdxl import save_sdxl_single_file
    from ldmkit.sdxl import StableDiffusionXL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors"
    save_sdxl_single_file(StableDiffusionXL(TINY_SDXL).eval(), path)
    return path


@pytest.mark.parametrize("layout", ["folder-fp16", "ldm-file", "diffusers-file"])
def test_standalone_sdxl_vae(layout: str, tiny_xl, tmp_path):
    ref = _reference_vae(TINY_SDXL.vae, seed=4)
    if layout == "folder-fp16":  # weights in fp16 as the fp16-fix VAE ships them; compared in fp32
        ref = ref.half()
        ref.save_pretrained(tmp_path / "sdxl-vae-fp16-fix")
        ref = ref.float()
        vae_path = tmp_path / "sdxl-vae-fp16-fix"
    else:
        sd = ref.state_dict()
        if layout == "ldm-file":
            sd = convert.vae_diffusers_to_ldm(ref.state_dict(), TINY_SDXL.vae)
        vae_path = tmp_path / "sdxl_vae.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, vae_path)
        if layout == "ldm-file":  # the LDM names are the ones diffusers' own single-file reader takes
            from diffusers import AutoencoderKL as Ref

            theirs = Ref.from_single_file(str(vae_path), config=_folder_config(ref, tmp_path), local_files_only=True)
            _check(_ldm_vae(vae_path), theirs, 4)
    model = checkpoint.load(tiny_xl, vae=vae_path)
    assert model.cfg.vae.scale_factor == ref.config.scaling_factor == 0.13025
    _check(model.vae, ref, 4)


def _folder_config(ref, tmp_path) -> str:
    folder = tmp_path / "vae-config"
    ref.save_config(folder)
    return str(folder)


def _ldm_vae(path) -> AutoencoderKL:
    vae = AutoencoderKL(TINY_SDXL.vae)
    checkpoint.load_strict(vae, load_file(path), "vae")
    return vae.eval()


def test_sd1_vae_folder_on_sdxl_is_named(tiny_xl, tmp_path):
    """A VAE folder whose scaling_factor is SD1's is refused on an SDXL model (same shapes, other latents)."""
    ref = _reference_vae(dataclasses.replace(TINY_SDXL.vae, scale_factor=0.18215), seed=4)
    ref.save_pretrained(tmp_path / "sd-vae")
    with pytest.raises(checkpoint.CheckpointError, match="scaled by 0.18215.*0.13025"):
        checkpoint.load(tiny_xl, vae=tmp_path / "sd-vae")


@pytest.mark.slow
def test_full_sdxl_vae():
    """The full-size SDXL autoencoder (84 M parameters) vs diffusers, weights through the LDM layout."""
    ref = _reference_vae(SDXL_BASE.vae, seed=9)
    with torch.device("meta"):
        ours = AutoencoderKL(SDXL_BASE.vae)
    checkpoint.load_strict(ours, convert.vae_diffusers_to_ldm(ref.state_dict(), SDXL_BASE.vae), "vae")
    _check(ours.eval(), ref, 4)


def test_fp16_model_keeps_sdxl_vae_in_fp32(tiny_xl, tmp_path):
    """An fp16 SDXL model decodes with its autoencoder in fp32 (the SDXL VAE overflows in fp16: diffusers'
    force_upcast); a --vae folder that says force_upcast false (the fp16-fix VAE) stays in fp16."""
    import numpy as np

    from ldmkit import api
    from ldmkit.pipeline import GenerationParams, txt2img

    params = GenerationParams("an apple", steps=2, sampler="Euler", seed=3, width=32, height=32)
    half = api.load(tiny_xl, device="cpu", dtype=torch.float16).model
    assert half.unet.out[2].weight.dtype == torch.float16 and half.vae.decoder.conv_out.weight.dtype == torch.float32
    full = api.load(tiny_xl, device="cpu").model
    a, b = (np.asarray(txt2img(m, params)[0]).astype(int) for m in (half, full))
    assert np.abs(a - b).max() <= 3  # fp16 U-Net, fp32 decoder: close to the fp32 image

    ref = _reference_vae(TINY_SDXL.vae, seed=4).half()
    ref.register_to_config(force_upcast=False)
    ref.save_pretrained(tmp_path / "fp16-fix")
    fixed = api.load(tiny_xl, vae=tmp_path / "fp16-fix", device="cpu", dtype=torch.float16).model
    assert fixed.vae.decoder.conv_out.weight.dtype == torch.float16 and fixed.vae_dtype == torch.float16
    assert txt2img(fixed, params)[0].size == (32, 32)
