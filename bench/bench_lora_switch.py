"""Time <lora:...> switching on an SD1.5-size model (random weights): first use, switch, cached switch, restore.

    flock /tmp/ldmkit-big.lock python bench/bench_lora_switch.py      (~5 GB of memory)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ldmkit.config import PRESETS
from ldmkit.lora import inject_lora, remove_lora, save_lora
from ldmkit.model import StableDiffusion
from ldmkit.networks import NetworkFolder, apply_networks
from ldmkit.prompt import NetworkTag


def main() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = StableDiffusion(PRESETS["sd15"])
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    d = Path(tempfile.mkdtemp(prefix="ldmkit-lora-switch-"))
    for name, seed in (("a", 1), ("b", 2)):  # rank 16 on kohya's default targets
        injected = inject_lora(model, rank=16, alpha=8)
        g = torch.Generator().manual_seed(seed)
        for mod in injected.values():
            mod.lora_up.weight.data.normal_(0, 0.01, generator=g)
        save_lora(injected, d / f"{name}.safetensors")
        remove_lora(model, injected)
    print(f"modules per LoRA {len(injected)}, file {(d / 'a.safetensors').stat().st_size / 2**20:.1f} MB")
    folder = NetworkFolder(d)

    def timed(tags: list[NetworkTag], label: str) -> None:
        t0 = time.perf_counter()
        apply_networks(model, tags, folder)
        print(f"{label}: {time.perf_counter() - t0:.2f} s")

    before = {k: v.clone() for k, v in model.state_dict().items() if "attn" in k}
    timed([NetworkTag("a", 0.8)], "first use of a (read, resolve, back up, merge)")
    timed([NetworkTag("a", 0.8)], "same set again")
    timed([NetworkTag("b", 0.8)], "switch to b (restore, read b, merge)")
    timed([NetworkTag("a", 0.8)], "switch back to a (cached)")
    timed([], "none (restore)")
    print("weights restored bit for bit:", all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()))


if __name__ == "__main__":
    main()
