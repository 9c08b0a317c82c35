"""``timestep_sampling`` of the U-Net, LoRA and ControlNet trainers: uniform (DDPM, the default) or cubic
(T2I-Adapter, Mou et al. 2023 sec. 3.4: t = floor(T (1 - u^3)), biased towards high noise); and the ControlNet
trainer's ``high_noise_weight`` g: each sample's loss times clamp(1/SNR(t), 1, g).

Closed forms: with u ~ U[0, 1), P(t >= k) = (1 - k/T)^(1/3) for k = 0..T, and E[t] = sum_k P(t >= k) for
k = 1..T; the default draws what ``torch.randint(0, T)`` draws from the step's generator, bit for bit; in the
ControlNet trainer the cubic draw takes the place of the uniform one in the batch's stream (after the latents,
before the noise), a resumed run equals an uninterrupted one, and a bad value is one line. The weighted loss
equals the mean of the unweighted per-sample losses (each computed alone) times the closed-form weights.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_controlnet_train import cn_cfg
from test_shape_augment import data, task  # noqa: F401  (data: the module's dataset fixture)
from train_runs import assert_same_weights, crash_and_resume

from ldmkit import cli
from ldmkit.schedules import sd_alphas_cumprod
from ldmkit.train import TrainError, train
from ldmkit.train.config import defaults
from ldmkit.train.runner import step_generator
from ldmkit.train.unet import UNetTask

pytestmark = pytest.mark.usefixtures("one_thread")
T = 1000


def draw(sampling: str, n: int, gen: torch.Generator) -> torch.Tensor:
    fake = SimpleNamespace(cfg=defaults("unet").replace(timestep_sampling=sampling),
                           model_cfg=SimpleNamespace(num_train_timesteps=T))
    return UNetTask.draw_timesteps(fake, n, gen)  # type: ignore[arg-type]


def test_cubic_matches_its_closed_form_distribution() -> None:
    n = 400_000
    t = draw("cubic", n, torch.Generator().manual_seed(0)).numpy()
    assert t.dtype == np.int64 and t.min() >= 0 and t.max() == T - 1
    k = np.arange(T + 1)
    survival = (1.0 - k / T) ** (1.0 / 3.0)  # P(t >= k)
    empirical = np.array([(t >= kk).mean() for kk in k])
    # a proportion's standard deviation is at most 0.5 / sqrt(n) = 0.0008; the largest of 1001 within 6 of them
    assert np.abs(empirical - survival).max() < 0.005
    # half the samples at t >= 0.875 T; a quarter at t >= T - T/64
    assert abs((t >= 875).mean() - 0.5) < 0.005 and abs((t >= T - T // 64).mean() - 0.25) < 0.005
    assert abs(t.mean() - survival[1:].sum()) < 1.0  # E[t] = sum_{k>=1} P(t >= k) = 749.5...; sd of the mean 0.4


def test_cubic_is_t2i_adapters_formula_and_uniform_is_randint_bit_for_bit() -> None:
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    u = torch.rand((64,), generator=b)  # diffusers' train_t2i_adapter_sdxl.py, written out
    ref = ((1 - u**3) * T).long().clamp(0, T - 1)
    assert torch.equal(draw("cubic", 64, a), ref)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))  # one draw per sample
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(draw("uniform", 64, a), torch.randint(0, T, (64,), generator=b))
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_cubic_takes_the_uniform_draws_place_in_the_batch(data: Path, sd1_file: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    plain = task(cn_cfg(data, sd1_file), run)
    cubic = task(cn_cfg(data, sd1_file, timestep_sampling="cubic"), run)
    idx = torch.arange(10)
    n = plain.model_cfg.num_train_timesteps
    for step in range(3):
        b0 = plain.make_batch(idx, step_generator(0, 0, step, 0), step)
        b1 = cubic.make_batch(idx, step_generator(0, 0, step, 0), step)
        g = step_generator(0, 0, step, 0)
        latents = plain.sample_latents(idx, g)  # the batch's first draws: flips, posterior sample
        assert torch.equal(latents, b0["latents"]) and torch.equal(b1["latents"], b0["latents"])
        assert torch.equal(b1["t"], ((1 - torch.rand(len(idx), generator=g) ** 3) * n).long().clamp(0, n - 1))
        assert torch.equal(b1["noise"], torch.randn(b1["noise"].shape, generator=g))


def test_resumed_run_matches_uninterrupted_with_cubic_timesteps(data: Path, sd1_file: Path,  # noqa: F811
                                                                tmp_path: Path) -> None:
    cfg = cn_cfg(data, sd1_file, total_steps=4, shape_mix=0.5, timestep_sampling="cubic")
    ca, cb, _ = crash_and_resume(cfg, tmp_path / "a", tmp_path / "b", 3, 2)
    assert_same_weights(ca, cb)


def test_bad_timestep_sampling_is_one_line(data: Path, sd1_file: Path, tmp_path: Path,  # noqa: F811
                                           capsys) -> None:
    with pytest.raises(TrainError, match="timestep_sampling must be uniform or cubic") as e:
        train(cn_cfg(data, sd1_file, timestep_sampling="logit"), tmp_path / "r1")
    assert len(str(e.value).splitlines()) == 1
    argv = ["train", "controlnet", "--data", str(data), "--model", str(sd1_file), "--timestep-sampling", "cube",
            "--out", str(tmp_path / "r2")]
    with pytest.raises(SystemExit) as ex:
        cli.main(argv)
    assert ex.value.code == 2 and "cubic" in capsys.readouterr().err


def test_high_noise_weight_is_clamped_inverse_snr_per_sample(data: Path, sd1_file: Path,  # noqa: F811
                                                             tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    g = 25.0
    plain = task(cn_cfg(data, sd1_file), run)
    weighted = task(cn_cfg(data, sd1_file, high_noise_weight=g), run)
    weighted.net.controlnet.load_state_dict(plain.net.controlnet.state_dict())
    b = plain.make_batch(torch.arange(8), step_generator(0, 0, 0, 0), 0)
    t = torch.tensor([0, 100, 300, 430, 500, 700, 850, 999])
    c = plain.net.base.module.cfg
    ab = sd_alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end).double()[t]
    w = ((1 - ab) / ab).clamp(1.0, g)
    assert w[0] == 1 and w[-1] == g and 1 < w[4] < g  # both clamps and the middle are exercised
    with torch.no_grad():
        per = torch.stack([plain.net(b["latents"][i:i + 1], b["ids"][i:i + 1], t[i:i + 1], b["noise"][i:i + 1],
                                     b["hint"][i:i + 1])[0] for i in range(8)]).double()
        loss = weighted.net(b["latents"], b["ids"], t, b["noise"], b["hint"])[0]
        unweighted = plain.net(b["latents"], b["ids"], t, b["noise"], b["hint"])[0]
    assert torch.allclose(loss.double(), (per * w).mean(), rtol=1e-5)
    assert torch.allclose(unweighted.double(), per.mean(), rtol=1e-5)


def test_bad_high_noise_weight_is_one_line(data: Path, sd1_file: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(TrainError, match="0 \\(off\\) or at least 1") as e:
        train(cn_cfg(data, sd1_file, high_noise_weight=0.5), tmp_path / "r1")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(TrainError, match="read by `ldmkit train controlnet` only"):
        train(defaults("unet").replace(data=str(data), high_noise_weight=5.0), tmp_path / "r2")
