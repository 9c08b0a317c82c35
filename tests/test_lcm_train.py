"""``ldmkit train lcm``: the consistency target against a closed form written out here (DDIM step of the
guided teacher, the boundary scalings of diffusers' LCMScheduler, pseudo-Huber), exact resume with the
EMA target network, the LCM-LoRA against diffusers' loader, train -> export -> generate, bad input.

Tiny models, 16-px images, a few steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from reference import rel_err
from shapes import write_shapes
from train_runs import assert_same_weights, crash_and_resume, tiny_model_file

from ldmkit import cli
from ldmkit.checkpoint import load, read_safetensors, save_single_file
from ldmkit.config import TINY, TINY_SD2
from ldmkit.lora import apply_lora
from ldmkit.train import defaults, export_run, train
from ldmkit.train.lcm import LCM_LORA_FILE, LCMTask
from ldmkit.train.runner import DistInfo, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("data"), 8, SIZE)


def lcm_cfg(data: Path, model: Path, **kw):
    base = dict(data=str(data), init_from=str(model), size=SIZE, batch_size=3, total_steps=4, warmup_steps=1,
                lr=1e-3, log_every=1, sample_every=0, checkpoint_every=2, device="cpu", w_min=2.0, w_max=6.0,
                num_ddim_timesteps=10, target_decay=0.5, ema_decay=0.9)
    return defaults("lcm").replace(**{**base, **kw})


# ---------------------------------------------------------------- the target, in closed form


# eps- and v-prediction teachers; a student with LCM's guidance embedding
@pytest.mark.parametrize("model, w_embedding", [("sd1_file", False), ("sd2_file", False), ("sd1_file", True)])
def test_consistency_target_and_loss_match_the_closed_form(data: Path, model: str, w_embedding: bool, request,
                                                           tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler

    path = request.getfixturevalue(model)
    cfg = lcm_cfg(data, path, w_embedding=w_embedding)
    task = LCMTask(cfg, tmp_path / "run", DistInfo(0, 1, torch.device("cpu")))
    net = task.net
    teacher = copy.deepcopy(net.frozen_teacher.module)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # online, target and teacher all different, so a swapped network shows
        for m, s in ((net.unet, 0.02), (net.target_unet, 0.05)):
            for p in m.parameters():
                p.add_(s * torch.randn(p.shape, generator=g))
    batch = task.make_batch(torch.arange(3), torch.Generator().manual_seed(7), step=0)
    with torch.no_grad():
        loss, _ = net(**batch)
        _, _, _, target = net.targets(batch["latents"], batch["ids"], batch["index"], batch["noise"], batch["w"])

    # the same, written out: diffusers' training schedule and LCM scalings, DDIM step of the guided teacher
    prediction = load(path).cfg.prediction
    ab = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    lcm = LCMScheduler(timestep_scaling=10.0)
    k = 1000 // 10
    t_start = [(int(n) + 1) * k - 1 for n in batch["index"]]  # 99, 199, ..., 999
    t_end = [max(t - k, 0) for t in t_start]
    text = task.model.text_encoder
    # the student's guidance input: diffusers' embedding of w (the LCM pipeline's), or none
    w_emb = (LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, batch["w"], embedding_dim=256)
             if w_embedding else None)
    assert (net.unet.cfg.time_cond_proj_dim == 256) == w_embedding
    with torch.no_grad():
        cond = text(batch["ids"], clip_skip=task.model_cfg.clip_skip)
        uncond = text(task.empty_ids.expand(3, -1), clip_skip=task.model_cfg.clip_skip)
    expected_target, expected_pred = [], []

    def x0_eps(out, x, t):
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        if prediction == "eps":
            return (x - s * out) / a, out
        return a * x - s * out, s * x + a * out

    for i in range(3):
        ts, te, w = t_start[i], t_end[i], float(batch["w"][i])
        x = ab[ts].sqrt() * batch["latents"][i:i + 1] + (1 - ab[ts]).sqrt() * batch["noise"][i:i + 1]
        with torch.no_grad():
            x0_c, eps_c = x0_eps(teacher(x, torch.tensor([ts]), cond[i:i + 1]), x, ts)
            x0_u, eps_u = x0_eps(teacher(x, torch.tensor([ts]), uncond[i:i + 1]), x, ts)
            x0_g, eps_g = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
            x_prev = ab[te].sqrt() * x0_g + (1 - ab[te]).sqrt() * eps_g  # DDIM, eta = 0
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(te)
            emb = w_emb[i:i + 1] if w_embedding else None
            out = net.target_unet(x_prev, torch.tensor([te]), cond[i:i + 1], emb)
            expected_target.append(c_skip * x_prev + c_out * x0_eps(out, x_prev, te)[0])
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(ts)
            out = net.unet(x, torch.tensor([ts]), cond[i:i + 1], emb)
            expected_pred.append(c_skip * x + c_out * x0_eps(out, x, ts)[0])
    expected_target, expected_pred = torch.cat(expected_target), torch.cat(expected_pred)
    assert rel_err(target, expected_target) < 1e-5
    huber = (torch.sqrt((expected_pred - expected_target) ** 2 + 0.001**2) - 0.001).mean()
    assert abs(loss.item() - huber.item()) <= 1e-5 * huber.item()


def test_boundary_condition_at_t0() -> None:
    from ldmkit.schedules import lcm_boundary_scalings

    c_skip, c_out = lcm_boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[2] < 1e-6 and abs(c_out[2] - 1) < 1e-6


# ---------------------------------------------------------------- resume


def test_resumed_run_matches_uninterrupted(data: Path, sd1_file: Path, tmp_path: Path) -> None:
    # stopped after step 3's update, before a checkpoint: the last one is step 2
    ca, cb, _ = crash_and_resume(lcm_cfg(data, sd1_file, total_steps=5), tmp_path / "a", tmp_path / "b", 3, 2)
    assert_same_weights(ca, cb)
    assert int(ca["net"]["target_step"]) == 4
    # the target network is an EMA of the online one: it moved, and lags behind
    teacher = load(sd1_file).unet.state_dict()
    key = "out.2.weight"
    online, target = ca["net"]["unet." + key], ca["net"]["target_unet." + key]
    assert not torch.equal(target, teacher[key]) and not torch.equal(target, online)


def test_init_student_continues_from_an_exported_model(data: Path, sd1_file: Path, tmp_path: Path, capsys) -> None:
    """--init-student: online and target U-Nets start as the given model's, the teacher stays the teacher."""
    teacher = load(sd1_file)
    student = load(sd1_file)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    student_file = tmp_path / "student.safetensors"
    save_single_file(student, student_file)
    task = LCMTask(lcm_cfg(data, sd1_file, init_student=str(student_file)), tmp_path / "run",
                   DistInfo(0, 1, torch.device("cpu")))
    want, orig = student.unet.state_dict(), teacher.unet.state_dict()
    for net in (task.net.unet, task.net.target_unet):
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, orig[k]) for k, v in task.net.frozen_teacher.module.state_dict().items())
    assert cli.main(["train", "lcm", "--model", str(sd1_file), "--init-student", str(tmp_path / "other"),
                     "--data", str(data), "--out", str(tmp_path / "r"), "--size", str(SIZE), "--device", "cpu"]) == 2
    assert "--init-student" in capsys.readouterr().err
    sd2 = tiny_model_file(tmp_path / "sd2.safetensors", TINY_SD2, 1)
    assert cli.main(["train", "lcm", "--model", str(sd1_file), "--init-student", str(sd2), "--data", str(data),
                     "--out", str(tmp_path / "r2"), "--size", str(SIZE), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its U-Net is not the student's" in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------- outputs


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    with torch.no_grad():
        out = unet(x, torch.tensor([99.0, 699.0]), ctx)
    return out.sample if hasattr(out, "sample") else out


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lcm_lora_loads_in_diffusers_with_the_same_delta(layout: str, data: Path, sd1_file: Path,
                                                         tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from ldmkit import checkpoint
    from ldmkit.lora import relayout_lora

    run = tmp_path / "lora"
    train(lcm_cfg(data, sd1_file, lora_rank=4, lora_alpha=2.0, total_steps=3, lr=1e-2), run)
    path = run / LCM_LORA_FILE
    sd, meta = read_safetensors(path)
    assert sd and all(k.startswith("lora_unet_") for k in sd)  # U-Net only, kohya names
    assert any(v.abs().max() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))  # it trained
    ckpt = read_checkpoint(run)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    assert torch.equal(sd[key], ckpt["ema"]["shadow"]["lora." + key])  # the file holds the EMA weights

    base = load(sd1_file)
    if layout == "peft":  # the published LCM-LoRA layout: unet.<diffusers path>.lora_A/lora_B
        relayout_lora(path, "peft", base.cfg)
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in read_safetensors(path)[0])
    merged = copy.deepcopy(base)
    apply_lora(merged, path)
    ours = _unet_out(merged.unet) - _unet_out(base.unet)
    folder = tmp_path / "pipe"
    checkpoint.save_diffusers(base, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    before = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    ref = _unet_out(pipe.unet) - before
    assert ref.abs().max() > 1e-4  # the LoRA does change the output
    assert rel_err(ours, ref) < 1e-3


def test_train_export_generate(data: Path, sd1_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "full"
    train(lcm_cfg(data, sd1_file, total_steps=2), run)
    out = tmp_path / "lcm.safetensors"
    assert cli.main(["export", str(run), str(out), "--half"]) == 0
    model = load(out)
    ckpt = read_checkpoint(run)
    for k, v in model.unet.state_dict().items():  # the EMA of the student, stored as float16
        assert torch.equal(v, ckpt["ema"]["shadow"]["unet." + k].half().to(v.dtype)), k
    teacher = load(sd1_file)
    for k, v in model.vae.state_dict().items():  # the teacher's autoencoder and text encoder
        assert torch.equal(v, teacher.vae.state_dict()[k].half().to(v.dtype)), k
    _, meta = read_safetensors(out)
    assert "LCM" in json.dumps(meta)  # the settings to sample with are recorded
    from ldmkit.samplers import SAMPLERS

    sampler = "LCM" if "LCM" in SAMPLERS else "Euler"
    png = tmp_path / "a.png"
    assert cli.main(["generate", "a red square", "--model", str(out), "--sampler", sampler, "--steps", "4",
                     "--cfg-scale", "1", "--width", str(SIZE), "--height", str(SIZE), "--output", str(png)]) == 0
    assert png.exists()


def test_guidance_embedded_student_exports_with_its_cfg(data: Path, sd1_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "w"
    train(lcm_cfg(data, sd1_file, total_steps=2, w_embedding=True), run)
    model = load(export_run(run, tmp_path / "w.safetensors"))
    assert model.cfg.unet.time_cond_proj_dim == 256
    ckpt = read_checkpoint(run)
    key = "time_embedding.cond_proj.weight"
    assert torch.equal(model.unet.state_dict()[key], ckpt["ema"]["shadow"]["unet." + key])
    assert ckpt["ema"]["shadow"]["unet." + key].abs().max() > 0  # zero at the start, trained since
    # sampled with the CFG scale 1 + w at mid-range (w in [2, 6]), which feeds the embedding
    assert (model.recommended.sampler, model.recommended.steps, model.recommended.cfg_scale) == ("LCM", 4, 5.0)


def test_builtin_emoji_lcm_is_the_teacher_with_a_distilled_unet(tmp_path: Path) -> None:
    from ldmkit import api

    path = api.builtin_model_path("emoji-lcm")
    if path is None:
        pytest.skip("the emoji-lcm asset is not installed")
    lcm, teacher = load(path), load(api.builtin_model_path("emoji"))
    rec = lcm.recommended
    assert (rec.sampler, rec.steps, rec.cfg_scale) == ("LCM", 4, 1.0)
    assert lcm.cfg.unet == teacher.cfg.unet
    for part in ("vae", "text_encoder"):
        a, b = getattr(lcm, part).state_dict(), getattr(teacher, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert not torch.equal(lcm.unet.state_dict()["out.2.weight"], teacher.unet.state_dict()["out.2.weight"])
    # `ldmkit generate --model emoji-lcm`: its recorded settings, not the defaults, at its native 64 px
    png = tmp_path / "apple.png"
    assert cli.main(["generate", "a red apple", "--model", "emoji-lcm", "--seed", "1", "--output", str(png)]) == 0
    image = Image.open(png)
    assert image.size == (64, 64)
    assert "Steps: 4, Sampler: LCM, Schedule type: LCM, CFG scale: 1," in image.info["parameters"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, message", [
    ([], "pass the teacher with --model"),
    (["--model", "MODEL", "--w-min", "5", "--w-max", "3"], "w_min <= w_max"),
    (["--model", "MODEL", "--num-ddim-timesteps", "7"], "must divide the model's 1000 training timesteps"),
    (["--model", "MODEL", "--lora-rank", "-1"], "lora_rank must be 0"),
    (["--model", "MODEL", "--lora-rank", "4", "--w-embedding"], "drop --w-embedding or use --lora-rank 0"),
    (["--model", "MODEL", "--lora-rank", "4", "--init-student", "MODEL"], "drop --init-student or use --lora-rank 0"),
    (["--model", "no/such/model.safetensors"], "no such run folder, model file or built-in model"),
])
def test_bad_flags_are_one_line_errors(flags, message, data: Path, sd1_file: Path, tmp_path: Path, capsys) -> None:
    flags = [str(sd1_file) if f == "MODEL" else f for f in flags]
    argv = ["train", "lcm", "--data", str(data), "--out", str(tmp_path / "r"), "--size", str(SIZE), "--device", "cpu"]
    assert cli.main(argv + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_export_with_vae_is_refused(data: Path, sd1_file: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "full"
    train(lcm_cfg(data, sd1_file, total_steps=1), run)
    assert cli.main(["export", str(run), str(tmp_path / "o.safetensors"), "--vae", str(sd1_file)]) == 2
    assert "--vae applies to U-Net runs" in capsys.readouterr().err
