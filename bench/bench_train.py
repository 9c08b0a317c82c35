"""Training throughput: one U-Net step (forward + backward + AdamW), ldmkit vs diffusers.

Both models get the same weights (converted with ldmkit.convert), the same batch and the same
loss; the script prints images/second for each and their ratio (> 1: ldmkit is faster).

    python bench/bench_train.py                          # tiny preset, CPU, < 1 minute
    python bench/bench_train.py --preset small --batch 4 # the 25M-parameter from-scratch U-Net
    python bench/bench_train.py --device cuda --preset sd15 --latent 64 --batch 8 --amp bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldmkit import convert
from ldmkit.models.unet import UNetModel
from ldmkit.train.config import TRAIN_PRESETS


def step_fn(model: torch.nn.Module, call: Callable, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
            target: torch.Tensor, amp: torch.dtype | None) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.mse_loss(call(model, x, t, ctx).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved_times(steps: dict[str, Callable[[], None]], warmup: int, repeats: int,
                      device: torch.device) -> dict[str, float]:
    """Median seconds per step of each function, run in turns so background load hits all alike."""
    def timed(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=list(TRAIN_PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", type=int, default=16, help="latent height and width")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per model (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype (CUDA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared machine more threads mostly measure contention)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel

    device = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    cfg = TRAIN_PRESETS[args.preset].unet
    torch.manual_seed(0)
    ours = UNetModel(cfg)
    theirs = UNet2DConditionModel(**convert.diffusers_unet_config(cfg, sample_size=args.latent))
    theirs.load_state_dict(convert.unet_ldm_to_diffusers(ours.state_dict(), cfg))
    ours.to(device).train()
    theirs.to(device).train()

    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.latent
    x = torch.randn(b, cfg.in_channels, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    ctx = torch.randn(b, 77, cfg.context_dim, generator=g).to(device)
    target = torch.randn(b, cfg.out_channels, s, s, generator=g).to(device)
    with torch.no_grad():  # same weights, same function: the comparison is like for like
        diff = (ours(x, t, ctx) - theirs(x, t, encoder_hidden_states=ctx).sample).abs().max().item()

    n_params = sum(p.numel() for p in ours.parameters())
    print(f"U-Net preset {args.preset}: {n_params / 1e6:.1f}M parameters, batch {b}, latent {s}x{s}, "
          f"device {device}, amp {args.amp}, threads {torch.get_num_threads()}\n"
          f"same weights, same input: max |ldmkit - diffusers| output {diff:.2e}")
    sec = interleaved_times({
        "ldmkit": step_fn(ours, lambda m, *a: m(*a), x, t, ctx, target, amp),
        "diffusers": step_fn(theirs, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample, x, t, ctx, target,
                             amp),
    }, args.warmup, args.steps, device)
    ips_ours, ips_theirs = b / sec["ldmkit"], b / sec["diffusers"]
    print(f"ldmkit    {ips_ours:8.2f} images/s")
    print(f"diffusers {ips_theirs:8.2f} images/s")
    print(f"ratio ldmkit/diffusers: {ips_ours / ips_theirs:.3f}")


if __name__ == "__main__":
    main()
