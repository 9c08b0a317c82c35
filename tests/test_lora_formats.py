"""LoRA files in every layout, written by diffusers'/PEFT's own code, merge in ldmkit as diffusers runs them.

Each case builds random PEFT adapters on a tiny random diffusers pipeline, writes them in one layout with
the reference's writer, loads that file in diffusers (``load_lora_weights``) or keeps PEFT's in-memory
model, and compares U-Net and text-encoder outputs (relative error <= 1e-4) and a txt2img image (<= 2/255)
with ldmkit after ``apply_lora``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference import rel_err, save_diffusers_pipeline

from ldmkit import checkpoint
from ldmkit.checkpoint import CheckpointError
from ldmkit.config import TINY
from ldmkit.lora import apply_lora, inject_lora, peft_names, relayout_lora, save_lora
from ldmkit.lora_formats import detect_lora_format, read_lora_file
from ldmkit.pipeline import GenerationParams, txt2img

pytest.importorskip("peft")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj",
                "downsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random tiny SD1 pipeline saved by diffusers (the base model of every LoRA here)."""
    path = tmp_path_factory.mktemp("pipe")
    save_diffusers_pipeline(TINY, path)
    return path


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder).to(torch.float32)


def _configs(dora=False, alpha=8, **unet_kw):
    from peft import LoraConfig

    ucfg = LoraConfig(r=4, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False, use_dora=dora,
                      **unet_kw)
    tcfg = LoraConfig(r=4, lora_alpha=2 if alpha != 4 else 4, target_modules=TE_TARGETS, init_lora_weights=False,
                      use_dora=dora)
    return ucfg, tcfg


def _add_adapters(pipe, ucfg, tcfg, seed=0):
    """Random PEFT LoRA (A and B both random) on the pipeline's U-Net and text encoder; their state dicts."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    inject_adapter_in_model(ucfg, pipe.unet, adapter_name="default")
    sds = {"unet": get_peft_model_state_dict(pipe.unet, adapter_name="default")}
    if tcfg is not None:
        inject_adapter_in_model(tcfg, pipe.text_encoder, adapter_name="default")
        sds["text_encoder"] = get_peft_model_state_dict(pipe.text_encoder, adapter_name="default")
    if ucfg.use_dora:  # a trained magnitude differs from the initial row norms
        g = torch.Generator().manual_seed(seed + 1)
        for part in sds:
            for mod in getattr(pipe, part).modules():
                if hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                    p = mod.lora_magnitude_vector["default"].weight
                    p.data.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            sds[part] = get_peft_model_state_dict(getattr(pipe, part), adapter_name="default")
    return sds


def _write_diffusers(pipe_folder, out, dora=False, metadata=True, multiplier=1.0):
    """peft layout through diffusers' save_lora_weights; returns the path and PEFT's in-memory pipeline."""
    from diffusers import StableDiffusionPipeline

    ucfg, tcfg = _configs(dora, rank_pattern={"to_k": 2}, alpha_pattern={"proj_in": 3})
    memory = _pipe(pipe_folder)
    sds = _add_adapters(memory, ucfg, tcfg)
    kw = dict(unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict()) \
        if metadata else {}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=sds["unet"],
                                              text_encoder_lora_layers=sds["text_encoder"], **kw)
    return out / "pytorch_lora_weights.safetensors", memory


def _diffusers_loaded(pipe_folder, path, multiplier=1.0):
    pipe = _pipe(pipe_folder)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    if multiplier != 1.0:
        pipe.set_adapters(["x"], adapter_weights=[multiplier])
    return pipe


def _ours(pipe_folder, path, multiplier=1.0):
    model = checkpoint.load(pipe_folder)
    apply_lora(model, path, multiplier)
    return model


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    return x, torch.tensor([10.0, 700.0]), ctx, ids


def _assert_same_model(pipe, model, base_folder, text=True):
    x, t, ctx, ids = _inputs()
    base = checkpoint.load(base_folder)
    with torch.no_grad():
        ref, ours = pipe.unet(x, t, ctx).sample, model.unet(x, t, ctx)
        assert rel_err(ours, ref) < 1e-4
        assert rel_err(base.unet(x, t, ctx), ref) > 1e-2  # the LoRA does change the output
        if text:
            ref_t, ours_t = pipe.text_encoder(ids).last_hidden_state, model.text_encoder(ids)
            assert rel_err(ours_t, ref_t) < 1e-4
            assert rel_err(base.text_encoder(ids), ref_t) > 1e-2


def _assert_same_image(pipe, model, steps=6):
    size, seed, prompt = (24, 16), 7, "a red apple"
    out = pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=5.0, height=size[1],
               width=size[0], generator=torch.Generator().manual_seed(seed), output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    ours = txt2img(model, GenerationParams(prompt, steps=steps, cfg_scale=5.0, sampler="Euler", scheduler="uniform",
                                           seed=seed, width=size[0], height=size[1]))[0]
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5


# ---------------------------------------------------------------- layouts written by diffusers / PEFT


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_layout_from_diffusers(folder, tmp_path, dora):
    """diffusers' save_lora_weights (unet./text_encoder. prefixes, alpha + rank/alpha patterns in the header)."""
    path, memory = _write_diffusers(folder, tmp_path, dora=dora)
    assert read_lora_file(path).layout == "peft"
    pipe, model = _diffusers_loaded(folder, path), _ours(folder, path)
    if dora:
        # diffusers 0.42 with transformers 5 leaves the text encoder's magnitudes unloaded ("UNEXPECTED
        # ...lora_magnitude_vector.x"); PEFT's in-memory text encoder is the reference there
        pipe.text_encoder = memory.text_encoder
    _assert_same_model(pipe, model, folder)
    _assert_same_image(pipe, model)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_multiplier_matches_adapter_weight(folder, tmp_path, dora):
    path, _ = _write_diffusers(folder, tmp_path, dora=dora)
    _assert_same_model(_diffusers_loaded(folder, path, 0.5), _ours(folder, path, 0.5), folder, text=not dora)


def test_peft_layout_without_alpha_means_scale_one(folder, tmp_path):
    """No header: alpha = rank per module (diffusers' get_peft_kwargs), whatever the ranks."""
    path, _ = _write_diffusers(folder, tmp_path, metadata=False)
    lora = read_lora_file(path)
    assert {p.scale for p in lora.targets.values()} == {1.0}
    _assert_same_model(_diffusers_loaded(folder, path), _ours(folder, path), folder)


def test_kohya_layout_from_diffusers(folder, tmp_path):
    """diffusers' convert_state_dict_to_kohya (lora_unet_/lora_te1_, LoCon 3x3 convs), with alpha != rank."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    ucfg, tcfg = _configs(rank_pattern={"to_k": 2})
    sds = _add_adapters(_pipe(folder), ucfg, tcfg)
    peft_sd = {f"{part}.{k}": v for part, sd in sds.items() for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(peft_sd)
    # alpha != rank (and rank 2 vs 4 across modules). One alpha for all: diffusers 0.42 files per-module
    # alphas of attention layers under `attn1.processor.to_q`, a name its alpha_pattern then never matches
    # (per-module alphas are checked against the format definition in test_lora.py)
    kohya.update({k: torch.tensor(2.0) for k in kohya if k.endswith(".alpha")})
    path = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    assert read_lora_file(path).layout == "kohya"
    pipe, model = _diffusers_loaded(folder, path), _ours(folder, path)
    _assert_same_model(pipe, model, folder)
    _assert_same_image(pipe, model)


def test_old_diffusers_attention_processor_layout(folder, tmp_path):
    """diffusers < 0.23 names (processor.to_q_lora.down, .lora.down, lora_linear_layer), which diffusers
    still converts on load; written with the inverse of diffusers' own rename tables."""
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS
    from safetensors.torch import save_file

    ucfg, tcfg = _configs(alpha=4)  # that layout has no alpha: scale 1
    sds = _add_adapters(_pipe(folder), ucfg, tcfg)
    unet_inv = {v: k for k, v in UNET_TO_DIFFUSERS.items() if "magnitude" not in k}
    te_inv = {v: k for k, v in DIFFUSERS_OLD_TO_PEFT.items()}
    old = {}
    for k, v in sds["unet"].items():
        for new, was in sorted(unet_inv.items(), key=lambda kv: -len(kv[0])):
            if new in k:
                k = k.replace(new, was)
                break
        k = k.replace(".attn1.to_", ".attn1.processor.to_").replace(".attn2.to_", ".attn2.processor.to_")
        old[f"unet.{k}"] = v
    for k, v in sds["text_encoder"].items():
        for new, was in sorted(te_inv.items(), key=lambda kv: -len(kv[0])):
            if new in k:
                k = k.replace(new, was)
                break
        old[f"text_encoder.text_model.{k}"] = v
    assert any(".processor.to_q_lora.down.weight" in k for k in old) and any(".lora.down." in k for k in old)
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.items()}, path)
    assert read_lora_file(path).layout == "diffusers-old"
    _assert_same_model(_diffusers_loaded(folder, path), _ours(folder, path), folder)


@pytest.mark.parametrize("bare", [False, True], ids=["peft-folder", "bare-unet-adapter"])
def test_peft_folder_and_bare_unet_adapter(folder, tmp_path, bare):
    """PEFT's save_pretrained layout: adapter_config.json (lora_alpha, alpha_pattern, use_rslora) beside
    adapter_model.safetensors with base_model.model.* keys; or the bare keys of one U-Net adapter.
    The reference is PEFT's own in-memory adapter model."""
    from safetensors.torch import save_file

    ucfg, _ = _configs(alpha=6, alpha_pattern={"conv1": 3}, use_rslora=True)
    pipe = _pipe(folder)
    sd = _add_adapters(pipe, ucfg, None)["unet"]
    out = tmp_path / "adapter"
    out.mkdir()
    ucfg.save_pretrained(out)  # writes adapter_config.json
    prefix = "" if bare else "base_model.model."
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, out / "adapter_model.safetensors")
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    model = _ours(folder, out if not bare else out / "adapter_model.safetensors")
    _assert_same_model(pipe, model, folder, text=False)


def test_kohya_dora_scale_merges_as_a1111(folder, tmp_path):
    """kohya/LyCORIS DoRA (dora_scale per input column): W + m·(dora_scale·V/‖V‖_col - W), V = W + s·ΔW,
    written out here from A1111's network.apply_weight_decompose (diffusers drops dora_scale)."""
    from safetensors.torch import save_file

    base = checkpoint.load(folder)
    w = base.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.detach().clone()  # (32, 32)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1
    dora_scale = torch.rand(1, 32, generator=g) + 0.5
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "dora.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0),
               f"{name}.dora_scale": dora_scale}, path)
    merged = _ours(folder, path, 0.7).unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    updown = (up @ down) * (2.0 / 4)
    m1 = updown + w
    norm = m1.transpose(0, 1).reshape(m1.shape[1], -1).norm(dim=1, keepdim=True).reshape(m1.shape[1], 1).transpose(0, 1)
    expected = w + 0.7 * (m1 * (dora_scale / norm) - w)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- ldmkit's PEFT writer


def test_our_peft_writer_loads_in_diffusers(folder, tmp_path):
    base = checkpoint.load(folder)
    injected = inject_lora(base, rank=4, alpha=2.0, conv=True)
    g = torch.Generator().manual_seed(1)
    for m in injected.values():  # as if trained
        m.lora_up.weight.data.normal_(0, 0.05, generator=g)
    path = tmp_path / "ours_peft.safetensors"
    save_lora(injected, path, layout="peft")
    assert detect_lora_format(checkpoint.read_state_dict(path)[0]) == "peft"
    assert peft_names(TINY) == {k: m.peft_name for k, m in injected.items()} | {
        k: v for k, v in peft_names(TINY).items() if k not in injected}
    pipe = _diffusers_loaded(folder, path)
    x, t, ctx, ids = _inputs()
    with torch.no_grad():  # against ldmkit's unmerged LoRA modules, and against the merge of the file
        assert rel_err(base.unet(x, t, ctx), pipe.unet(x, t, ctx).sample) < 1e-4
        assert rel_err(base.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state) < 1e-4
    merged = _ours(folder, path)
    _assert_same_model(pipe, merged, folder)
    _assert_same_image(pipe, merged)
    # a kohya file rewritten in the PEFT layout (`ldmkit export RUN --layout peft`) is the same file
    kohya = tmp_path / "ours_kohya.safetensors"
    save_lora(injected, kohya)
    relayout_lora(kohya, "peft", TINY)
    a, b = checkpoint.read_state_dict(kohya), checkpoint.read_state_dict(path)
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert json.loads(a[1]["lora_adapter_metadata"]) == json.loads(b[1]["lora_adapter_metadata"])


# ---------------------------------------------------------------- bad files


def test_not_a_lora(folder, tmp_path):
    from safetensors.torch import save_file

    model_file = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, model_file)
    with pytest.raises(CheckpointError, match="full Stable Diffusion checkpoint.*not a LoRA"):
        read_lora_file(model_file)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, loha)
    with pytest.raises(CheckpointError, match="LoHa"):
        read_lora_file(loha)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_lora_file(corrupt)


def test_lora_matching_no_layer_or_another_family(folder, tmp_path):
    from safetensors.torch import save_file

    model = checkpoint.load(folder)
    nomatch = tmp_path / "nomatch.safetensors"
    save_file({f"unet.blocks.{i}.attn.qkv.lora_A.weight": torch.zeros(4, 8) for i in range(3)}
              | {f"unet.blocks.{i}.attn.qkv.lora_B.weight": torch.zeros(8, 4) for i in range(3)}, nomatch)
    with pytest.raises(CheckpointError, match=r"none of its 3 targets match a layer of this model \(e.g. unet:blocks"):
        apply_lora(model, nomatch)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4)}, sdxl)
    with pytest.raises(CheckpointError, match="SDXL"):
        apply_lora(model, sdxl)
    sd2 = tmp_path / "sd2.safetensors"
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{name}.lora_A.weight": torch.zeros(4, 1024), f"{name}.lora_B.weight": torch.zeros(32, 4)}, sd2)
    with pytest.raises(CheckpointError, match=r"SD2.x \(cross-attention width 1024\) and this model is sd1"):
        apply_lora(model, sd2)


def test_cli_bad_lora_is_one_line_exit_2(folder, tmp_path, capsys):
    from safetensors.torch import save_file

    from ldmkit.cli import main

    bad = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(2)}, bad)
    code = main(["generate", "x", "--model", str(folder), "--lora", f"{bad}:0.8", "--steps", "1", "--width", "16",
                 "--height", "16", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "not a LoRA" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_kohya_with_ldm_names(folder, tmp_path):
    """kohya files of LDM-named U-Nets (lora_unet_input_blocks_1_1_proj_in, as sd-scripts' extraction
    writes) merge as their diffusers-named twin, which the test above checks against diffusers."""
    from ldmkit.lora import lora_targets

    base = checkpoint.load(folder)
    injected = inject_lora(base, rank=4, alpha=2.0, conv=True)
    for m in injected.values():
        m.lora_up.weight.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "diffusers_names.safetensors"
    save_lora(injected, path)
    to_ldm = {t.kohya: "lora_unet_" + t.where.removeprefix("unet.").replace(".", "_")
              for t in lora_targets(checkpoint.load(folder)) if t.where.startswith("unet.")}
    sd, _ = checkpoint.read_state_dict(path)
    renamed = {to_ldm.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in renamed
    ldm = tmp_path / "ldm_names.safetensors"
    from safetensors.torch import save_file

    save_file(renamed, ldm)
    a, b = _ours(folder, path).state_dict(), _ours(folder, ldm).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sampler,cls,steps,cfg,eta", [("LCM", "LCMScheduler", 4, 1.0, None),
                                                       ("TCD", "TCDScheduler", 4, 1.5, 0.3)])
def test_few_step_sampler_with_peft_lora_matches_diffusers(folder, tmp_path, sampler, cls, steps, cfg, eta):
    """The LCM-LoRA / TCD-LoRA recipe: a PEFT-layout LoRA and the LCM (TCD) sampler give diffusers'
    LCMScheduler (TCDScheduler) + load_lora_weights image within 2/255."""
    import diffusers

    path, _ = _write_diffusers(folder, tmp_path)
    pipe, model = _diffusers_loaded(folder, path), _ours(folder, path)
    pipe.scheduler = getattr(diffusers, cls)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    size, seed, prompt = (24, 16), 11, "a red apple"
    # ldmkit draws the starting noise from the seed and the per-step noise from seed + 1
    latents = torch.randn((1, 4, size[1] // 2, size[0] // 2), generator=torch.Generator().manual_seed(seed))
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, height=size[1], width=size[0], latents=latents,
               generator=torch.Generator().manual_seed(seed + 1), output_type="np",
               **({"eta": eta} if eta is not None else {}))
    ref = (out.images[0] * 255).round().astype(np.int16)
    ours = txt2img(model, GenerationParams(prompt, sampler=sampler, steps=steps, cfg_scale=cfg, eta=eta, seed=seed,
                                           width=size[0], height=size[1]))[0]
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5


def test_text_layers_the_model_does_not_have_are_skipped(folder, tmp_path):
    """SD2 diffusers folders keep 23 of OpenCLIP's 24 text layers; a LoRA of all 24 still merges."""
    from safetensors.torch import save_file

    model = checkpoint.load(folder)  # 2 text layers
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in (1, 2):  # layer 2 is beyond the model
        name = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        sd |= {f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{name}.lora_up.weight": torch.randn(32, 2, generator=g)}
    save_file(sd, tmp_path / "te.safetensors")
    assert apply_lora(model, tmp_path / "te.safetensors") == 1
