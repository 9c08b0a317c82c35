"""Exponential moving average of a module's trainable parameters (Polyak averaging)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copies in float32, updated after every optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` (LDM's ``LitEma``), so early
    averages are not dominated by the random initial weights. ``decay = 0`` tracks the raw weights.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        params = dict(module.named_parameters())
        shadows = list(self.shadow.values())
        current = [params[n].detach().float() for n in self.shadow]
        torch._foreach_lerp_(shadows, current, 1.0 - self.current_decay())

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (which has the same parameter names)."""
        params = dict(module.named_parameters())
        for n, s in self.shadow.items():
            params[n].copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: {len(missing)} differing names, e.g. "
                             f"{sorted(missing)[:3]}")
        self.num_updates = int(state["num_updates"])
        for n, s in state["shadow"].items():
            self.shadow[n] = s.to(self.shadow[n].device, torch.float32).clone()
