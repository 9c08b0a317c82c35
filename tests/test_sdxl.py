"""SDXL networks and checkpoints against the references: diffusers' UNet2DConditionModel with
``added_cond_kwargs``, transformers' CLIPTextModel / CLIPTextModelWithProjection, diffusers'
StableDiffusionXLPipeline (prompt encoding, from_single_file), with weights moved through the on-disk layouts.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from reference import _perturb_norms, rel_err
from safetensors.torch import load_file

from ldmkit import checkpoint, convert, convert_sdxl
from ldmkit.config import SDXL_BASE, SDXL_INPAINT, SDXL_REFINER, TINY_SDXL, TINY_SDXL_REFINER, ModelConfig
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.unet import UNetModel, sdxl_vector

TOL = 1e-4
TINY_SDXL_INPAINT = TINY_SDXL.replace(name="tiny-sdxl-inpainting",
                                      unet=dataclasses.replace(TINY_SDXL.unet, in_channels=9))
TINY_CONFIGS = [TINY_SDXL, TINY_SDXL_REFINER, TINY_SDXL_INPAINT]

pytestmark = pytest.mark.usefixtures("one_thread")


def _n_ids(cfg: ModelConfig) -> int:
    return 5 if cfg.family == "sdxl-refiner" else 6  # refiner: size, crop, aesthetic score


def _unet_inputs(cfg: ModelConfig, size: int, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.unet.in_channels, size, size, generator=g)
    t = torch.tensor([981.0, 24.5])[:batch]
    ctx = torch.randn(batch, 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.unet.adm_in_channels - 256 * _n_ids(cfg), generator=g)
    if cfg.family == "sdxl-refiner":  # original size, crop top-left, aesthetic score
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 512.0, 0.0, 0.0, 2.5]])
    else:  # original size, crop top-left, target size
        ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 832.0, 1216.0]])
    return x, t, ctx, pooled, ids[:batch]


def _diffusers_unet(cfg: ModelConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**convert.diffusers_unet_config(cfg.unet)).eval()
    _perturb_norms(unet)
    return unet


@pytest.mark.parametrize("cfg", TINY_CONFIGS, ids=lambda c: c.name)
def test_unet_parity(cfg: ModelConfig, tmp_path):
    ref = _diffusers_unet(cfg)
    ref.save_pretrained(tmp_path / "unet")
    x, t, ctx, pooled, ids = _unet_inputs(cfg, 16)
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    del ref

    # diffusers folder -> ldmkit
    ucfg = convert.unet_config_from_diffusers(json.loads((tmp_path / "unet" / "config.json").read_text()))
    assert ucfg == cfg.unet
    with torch.device("meta"):
        ours = UNetModel(ucfg)
    sd = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    checkpoint.load_strict(ours, convert.unet_diffusers_to_ldm(sd, ucfg), "unet")
    with torch.no_grad():
        got = ours(x, t, ctx, y=sdxl_vector(pooled, ids))
    assert rel_err(got, expected) <= TOL

    # ldmkit single-file names -> diffusers' own converter -> diffusers model
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path = tmp_path / "unet.safetensors"
    checkpoint.atomic_save_safetensors({f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}, path)
    dcfg = convert.diffusers_unet_config(cfg.unet)
    with torch.device("meta"):
        back = UNet2DConditionModel(**dcfg)
    back.load_state_dict(convert_ldm_unet_checkpoint(load_file(path), dcfg), strict=True, assign=True)
    with torch.no_grad():
        again = back.eval()(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert rel_err(again, expected) <= TOL
    # and our LDM -> diffusers table gives diffusers' exact keys
    assert convert.unet_ldm_to_diffusers(ours.state_dict(), cfg.unet).keys() == back.state_dict().keys()


def test_unet_needs_y():
    unet = UNetModel(TINY_SDXL.unet)
    x, t, ctx, _, _ = _unet_inputs(TINY_SDXL, 8)
    with pytest.raises(ValueError, match="vector conditioning y"):
        unet(x, t, ctx)


def test_full_configs_match_diffusers_layout():
    """The presets give diffusers' published SDXL U-Net configs (stabilityai/stable-diffusion-xl-*/unet/config.json)."""
    base = convert.diffusers_unet_config(SDXL_BASE.unet)
    assert base["block_out_channels"] == [320, 640, 1280]
    assert base["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert base["attention_head_dim"] == [5, 10, 20] and base["cross_attention_dim"] == 2048
    assert base["transformer_layers_per_block"][1:] == [2, 10]
    assert base["projection_class_embeddings_input_dim"] == 2816 and base["addition_time_embed_dim"] == 256
    published = {"block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24],
                 "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
                 "projection_class_embeddings_input_dim": 2560, "use_linear_projection": True,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}
    refiner = convert.diffusers_unet_config(SDXL_REFINER.unet)
    assert {k: refiner[k] for k in published} == published
    assert convert.unet_config_from_diffusers({**refiner, **published}) == SDXL_REFINER.unet
    assert convert.unet_config_from_diffusers({**base, "transformer_layers_per_block": [1, 2, 10]}) == SDXL_BASE.unet
    assert SDXL_INPAINT.unet.in_channels == 9 and SDXL_BASE.vae.scale_factor == 0.13025


# ------------------------------------------------------------------------- text encoders


def _hf_encoder(tcfg, seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from transformers import CLIPTextModel as HFText

    torch.manual_seed(seed)
    hf_cfg = CLIPTextConfig(**convert.hf_text_config(tcfg), projection_dim=tcfg.projection_dim or 512)
    model = (CLIPTextModelWithProjection if projection else HFText)(hf_cfg).eval()
    _perturb_norms(model)
    return model


def _ids(pad_id: int) -> torch.Tensor:
    from ldmkit.models.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.default(pad_with_eos=pad_id != 0)
    return tok(["a photograph of an astronaut riding a horse", "x"])


@pytest.mark.parametrize("which", ["clip-l", "bigg"])
def test_text_encoder_parity(which: str, tmp_path):
    """Hidden states (last, penultimate) and the projected pooled output vs transformers, with the weights
    moved through the diffusers folder layout and through the SDXL single-file layout (OpenCLIP names for bigG)."""
    tcfg = TINY_SDXL.text if which == "clip-l" else TINY_SDXL.text2
    ref = _hf_encoder(tcfg, 3, projection=which == "bigg")
    ref.save_pretrained(tmp_path / "te")
    ids = _ids(0 if which == "bigg" else 49407)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    sd = convert.normalize_hf_text(load_file(tmp_path / "te" / "model.safetensors"))
    layout = "openclip" if which == "bigg" else "hf"
    single = convert_sdxl.join_sdxl_checkpoint({}, {}, [sd], [layout])
    prefix = "conditioner.embedders.0." + ("model." if which == "bigg" else "transformer.")
    assert all(k.startswith(prefix) for k in single)
    if which == "bigg":  # OpenCLIP's fused q/k/v and x @ P projection
        assert f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in single
        assert torch.equal(single[f"{prefix}text_projection"], sd["text_projection.weight"].t())
    _, _, (back,), (back_layout,) = convert_sdxl.split_sdxl_checkpoint(
        {**single, "model.diffusion_model.x": torch.zeros(1)})
    assert back_layout == layout and back.keys() == sd.keys()
    for state in (sd, back):
        ours = CLIPTextModel(tcfg)
        checkpoint.load_strict(ours, state, which)
        with torch.no_grad():
            hidden, pooled = ours.hidden_and_pooled(ids, skip=2)
            last = ours(ids, clip_skip=1)
        assert rel_err(hidden, out.hidden_states[-2]) <= TOL  # penultimate, no final norm
        assert rel_err(last, out.last_hidden_state) <= TOL
        if which == "bigg":
            assert rel_err(pooled, out.text_embeds) <= TOL
        else:
            assert pooled is None


# ------------------------------------------------------------------------- whole models on disk


def _diffusers_sdxl_folder(cfg: ModelConfig, folder):
    """A random tiny SDXL pipeline saved by diffusers itself (StableDiffusionXLPipeline / Img2Img for the refiner)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from reference import diffusers_vae, hf_tokenizer_files
    from transformers import CLIPTokenizer

    hf_tokenizer_files(folder / "_tok", pad_with_eos=True)
    hf_tokenizer_files(folder / "_tok2", pad_with_eos=False)
    bigg = cfg.text2 or cfg.text
    parts = dict(unet=_diffusers_unet(cfg), vae=diffusers_vae(cfg, 1), scheduler=EulerDiscreteScheduler(
        beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="scaled_linear"),
        text_encoder_2=_hf_encoder(bigg, 3, projection=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "_tok2"))
    if cfg.text2 is not None:
        parts |= dict(text_encoder=_hf_encoder(cfg.text, 2, projection=False),
                      tokenizer=CLIPTokenizer.from_pretrained(folder / "_tok"))
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                requires_aesthetics_score=True)
    pipe.save_pretrained(folder / "model")
    return pipe


def _check_against_pipe(model, pipe, cfg: ModelConfig) -> None:
    prompt = "a red apple on a wooden table"
    with torch.no_grad():
        ctx, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                               **({"prompt_2": prompt} if cfg.text2 else {}))
    got_ctx, got_pooled = model.encode([prompt])
    assert got_ctx.shape == (1, 77, cfg.unet.context_dim)
    assert rel_err(got_ctx, ctx) <= TOL and rel_err(got_pooled, pooled) <= TOL
    x, t, c, p, ids = _unet_inputs(cfg, 16)
    with torch.no_grad():
        expected = pipe.unet(x, t, c, added_cond_kwargs={"text_embeds": p, "time_ids": ids}).sample
        assert rel_err(model.unet(x, t, c, y=sdxl_vector(p, ids)), expected) <= TOL
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        assert rel_err(model.vae.decode(z), pipe.vae.decode(z).sample) <= TOL


@pytest.mark.parametrize("cfg", [TINY_SDXL, TINY_SDXL_REFINER], ids=lambda c: c.name)
def test_diffusers_folder_and_single_file(cfg: ModelConfig, tmp_path):
    """A diffusers-saved folder loads in ldmkit; ldmkit's single file and folder load back in ldmkit and
    in diffusers (from_single_file with the folder as its offline config, from_pretrained)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from ldmkit import checkpoint_sdxl

    pipe = _diffusers_sdxl_folder(cfg, tmp_path)
    model = checkpoint.load(tmp_path / "model")
    assert model.cfg.family == cfg.family and model.cfg.unet == cfg.unet and model.cfg.text2 == cfg.text2
    assert checkpoint_sdxl.sdxl_kind(tmp_path / "model") == checkpoint_sdxl.describe(cfg)
    _check_against_pipe(model, pipe, cfg)

    single = tmp_path / "ours.safetensors"
    checkpoint_sdxl.save_sdxl_single_file(model, single)
    assert checkpoint_sdxl.sdxl_kind(single) == checkpoint_sdxl.describe(cfg)
    # without the stored config: detection from keys and shapes alone
    stripped = tmp_path / "stripped.safetensors"
    checkpoint.atomic_save_safetensors(load_file(single), stripped)
    again = checkpoint.load(single)
    assert again.cfg.family == cfg.family and again.cfg.unet == cfg.unet
    assert again.cfg.text == cfg.text and again.cfg.text2 == cfg.text2
    _check_against_pipe(again, pipe, cfg)
    # heads and GroupNorm groups are not in the weights: detection assumes SDXL's (64-wide heads, 32 groups),
    # which the tiny configs do not follow; everything else must be found
    det = convert_sdxl.detect_sdxl(load_file(stripped))
    conventions = {"head_dim": 64, "norm_groups": 32}
    assert det["family"] == cfg.family and det["unet"] == dataclasses.replace(cfg.unet, **conventions)
    for got, want in zip([det["text"], det["text2"]], [cfg.text, cfg.text2], strict=True):
        assert got == (want and dataclasses.replace(want, heads=want.width // 64 or 1))

    cls = StableDiffusionXLPipeline if cfg.text2 else StableDiffusionXLImg2ImgPipeline
    theirs = cls.from_single_file(str(stripped), config=str(tmp_path / "model"), local_files_only=True)
    _check_against_pipe(model, theirs, cfg)

    checkpoint_sdxl.save_sdxl_diffusers(model, tmp_path / "ours")
    _check_against_pipe(model, cls.from_pretrained(tmp_path / "ours"), cfg)
    _check_against_pipe(checkpoint.load(tmp_path / "ours"), pipe, cfg)


def test_long_prompt_chunks_and_emphasis():
    """A1111's chunking for both encoders: 77 tokens per chunk, pooled from the first chunk; emphasis
    scales each encoder's states (mean-preserving), never the pooled vector."""
    from ldmkit.sdxl import StableDiffusionXL

    torch.manual_seed(0)
    model = StableDiffusionXL(TINY_SDXL).eval()
    from ldmkit.prompt import tokenize_chunks

    long = ", ".join(["a red apple"] * 20)  # 79 tokens: two chunks
    ctx, pooled = model.encode([long, "a red apple"])
    assert ctx.shape == (2, 154, 80)
    chunks = tokenize_chunks(model.tokenizers[1], long)
    assert len(chunks) == 2 and chunks[1].tokens[-1] == 0  # bigG pads with 0
    with torch.no_grad():
        _, first_pooled = model.text_encoder_2.hidden_and_pooled(torch.tensor([chunks[0].tokens]))
    assert torch.allclose(pooled[:1], first_pooled, atol=1e-6)
    assert torch.equal(pooled[1:], model.encode_chunks("a red apple")[1])
    assert torch.equal(ctx[1:, 77:], model.encode_chunks("")[0])  # padded with the empty prompt's chunk
    weighted, weighted_pooled = model.encode(["a (red:1.5) apple"])
    plain, plain_pooled = model.encode(["a red apple"])
    assert torch.equal(weighted_pooled, plain_pooled) and not torch.equal(weighted, plain)
    for sl in (slice(0, 32), slice(32, 80)):  # each encoder keeps its own mean
        assert torch.allclose(weighted[..., sl].mean(), plain[..., sl].mean(), atol=1e-6)


def test_cli_info_and_generate(tmp_path, capsys):
    from PIL import Image

    from ldmkit import checkpoint_sdxl
    from ldmkit.cli import main
    from ldmkit.sdxl import StableDiffusionXL

    torch.manual_seed(0)
    path = tmp_path / "tiny-xl.safetensors"
    checkpoint_sdxl.save_sdxl_single_file(StableDiffusionXL(TINY_SDXL_INPAINT).eval(), path)
    assert main(["info", str(path)]) == 0
    assert "family: sdxl (SDXL inpainting)" in capsys.readouterr().out
    out = tmp_path / "out.png"
    assert main(["generate", "an apple", "--model", str(path), "--steps", "2", "--width", "32", "--height", "24",
                 "--seed", "5", "-o", str(out)]) == 0
    info = Image.open(out).info["parameters"]
    assert info.startswith("an apple\nSteps: 2, ") and "Size: 32x24" in info and "Model: tiny-xl" in info
    with pytest.raises(checkpoint.CheckpointError, match="weights are SDXL inpainting"):
        checkpoint.load(path, model_type="sdxl-refiner")


def test_refiner_as_base_is_named(tmp_path, capsys):
    """txt2img with a refiner is one line naming it and the way to use it (img2img)."""
    from ldmkit import checkpoint_sdxl
    from ldmkit.cli import main
    from ldmkit.sdxl import StableDiffusionXL

    torch.manual_seed(0)
    path = tmp_path / "refiner.safetensors"
    checkpoint_sdxl.save_sdxl_single_file(StableDiffusionXL(TINY_SDXL_REFINER).eval(), path)
    assert main(["generate", "an apple", "--model", str(path), "--steps", "2", "--width", "32", "--height", "24",
                 "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refiner is an SDXL refiner" in err
    assert "ldmkit img2img --model REFINER" in err


def test_truncated_sdxl_file_is_named(tmp_path):
    from ldmkit import checkpoint_sdxl
    from ldmkit.sdxl import StableDiffusionXL

    model = StableDiffusionXL(TINY_SDXL).eval()
    path = tmp_path / "xl.safetensors"
    checkpoint_sdxl.save_sdxl_single_file(model, path)
    sd = load_file(path)
    sd.pop("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight")
    checkpoint.atomic_save_safetensors(sd, tmp_path / "cut.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="in_proj|q_proj"):
        checkpoint.load(tmp_path / "cut.safetensors")


# full-size networks (slow tier): tests/test_sdxl_full.py


def test_python_api_default_size_is_native():
    """ldmkit.load(sdxl).txt2img(prompt) draws at SDXL's 1024² unless told otherwise (SD1 keeps 512)."""
    from ldmkit.api import Pipeline
    from ldmkit.sdxl import StableDiffusionXL

    pipe = Pipeline(StableDiffusionXL(TINY_SDXL))
    assert (pipe._params("x", {}).width, pipe._params("x", {}).height) == (1024, 1024) == (SDXL_BASE.native_size,) * 2
    assert pipe._params("x", {"width": 64}).width == 64
