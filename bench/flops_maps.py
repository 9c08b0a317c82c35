"""Cost of a T2I-Adapter next to the U-Net it conditions, in FLOPs (torch's FlopCounterMode on the meta device:
no weights, no timing, the same count on any machine).

    python bench/flops_maps.py [--size 512] [--steps 20]

SD1.5 sizes: the full adapter (sketch, 1-channel input) and the light (colour) adapter run once per image on the
map; the U-Net runs once per step on the CFG batch of 2.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.config import SD15
from ldmkit.models.t2i_adapter import AdapterConfig, T2IAdapter
from ldmkit.models.unet import UNetModel


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    n = args.size
    with torch.device("meta"):
        unet = UNetModel(SD15.unet)
        x, ctx, t = torch.randn(2, 4, n // 8, n // 8), torch.randn(2, 77, 768), torch.full((2,), 500.0)
        per_step = flops(lambda: unet(x, t, ctx))
        print(f"U-Net (batch 2), {n}x{n}: {per_step / 1e9:.0f} GFLOP per step, {args.steps * per_step / 1e12:.1f} "
              f"TFLOP for {args.steps} steps")
        adapters = {"full adapter (sketch)": AdapterConfig(1),
                    "light adapter (colour)": AdapterConfig(3, (320, 640, 1280), 4, 8, "light_adapter")}
        for name, cfg in adapters.items():
            net = T2IAdapter(cfg)
            once = flops(lambda net=net, cfg=cfg: net(torch.randn(1, cfg.in_channels, n, n)))
            params = sum(p.numel() for p in net.parameters())
            print(f"{name}: {params / 1e6:.1f}M parameters, {once / 1e9:.1f} GFLOP once per image = "
                  f"{100 * once / (args.steps * per_step):.2f}% of the U-Net's {args.steps} steps")


if __name__ == "__main__":
    main()
