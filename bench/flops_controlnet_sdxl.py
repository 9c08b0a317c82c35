"""Cost of an SDXL ControlNet next to the SDXL U-Net it controls, in FLOPs (torch's FlopCounterMode on the meta
device: no weights, no timing, the same count on any machine).

    python bench/flops_controlnet_sdxl.py [--size 1024]

Per U-Net call on the CFG batch of 2: the SDXL base U-Net, and the ControlNets of diffusers' SDXL releases
(transformer depth (0, 2, 10) as the U-Net), and two with fewer transformer blocks, as diffusers' lighter SDXL
ControlNets have (their exact depths are not checked here), beside SD1.5's
U-Net and ControlNet at 512x512 for scale. A ControlNet runs at every step it is active.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from flops_maps import flops  # the FLOP counter of the maps benchmark (bench/ is on sys.path when run)

from ldmkit.config import SD15, SDXL_BASE
from ldmkit.models.controlnet import ControlNet, ControlNetConfig
from ldmkit.models.unet import UNetModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    rows = []
    for name, cfg, n in (("SD1.5", SD15.unet, 512), ("SDXL", SDXL_BASE.unet, args.size)):
        with torch.device("meta"):
            x, t = torch.randn(2, 4, n // 8, n // 8), torch.full((2,), 500.0)
            ctx = torch.randn(2, 77, cfg.context_dim)
            y = torch.randn(2, cfg.adm_in_channels) if cfg.adm_in_channels else None
            unet = UNetModel(cfg)
            kw = {"y": y} if y is not None else {}
            u = flops(lambda unet=unet, x=x, t=t, ctx=ctx, kw=kw: unet(x, t, ctx, **kw))
            rows.append((f"{name} U-Net, {n}x{n}", sum(p.numel() for p in unet.parameters()), u, None))
            del unet
            variants = {"ControlNet": cfg}
            if y is not None:
                variants |= {"ControlNet, depth (0, 0, 1)": dataclasses.replace(cfg, transformer_depth=(0, 0, 1),
                                                                               transformer_depth_middle=1),
                             "ControlNet, depth (0, 0, 0)": dataclasses.replace(cfg, transformer_depth=0,
                                                                                 transformer_depth_middle=0)}
            for label, c in variants.items():
                net = ControlNet(ControlNetConfig(c))
                hint = torch.randn(2, 3, n, n)
                f = flops(lambda net=net, x=x, hint=hint, t=t, ctx=ctx, y=y: net(x, hint, t, ctx, y))
                rows.append((f"{name} {label}", sum(p.numel() for p in net.parameters()), f, u))
    for label, params, f, u in rows:
        extra = f" = {100 * f / u:.0f}% of its U-Net's call" if u else ""
        print(f"{label}: {params / 1e6:.0f}M parameters, {f / 1e9:.0f} GFLOP per call (batch 2){extra}")


if __name__ == "__main__":
    main()
