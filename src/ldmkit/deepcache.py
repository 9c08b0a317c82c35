"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): reuse the U-Net's
deep up-path features between nearby sampler steps and recompute only its shallow branch.

The high-level features of the up path change little from one denoising step to the next, while the
skip connections carry the fine detail. So every ``interval``-th U-Net call runs in full and keeps the
feature entering output block ``L - 1 - branch`` (L = number of input blocks; for the deepest branch,
the middle block's output); the calls in between run only the shallow branch: input blocks
``0..branch`` and output blocks ``L - 1 - branch .. L - 1``, with the kept feature standing in for
everything deeper. This is the LDM form of DeepCache's ``replicate_layer`` (their
``experiments/ldm/.../openaimodel.py``); its SD1.5 defaults are interval 3 and branch 0 (the first
convolution and the last output block only).

The cache lives in one :class:`DeepCacheUNet`, made for one generation and dropped with it: never shared
between requests. A batched classifier-free guidance call is one call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldmkit.models.unet import UNetModel, up_size

DEFAULT_INTERVAL = 3  # DeepCache's SD1.5 default (cache_interval=3)
DEFAULT_BRANCH = 0  # ... and cache_branch_id=0: the shallowest branch, the largest saving


def branches(unet: UNetModel) -> int:
    """How many branches this U-Net has (valid branches are 0 .. branches - 1): one per skip connection."""
    return len(unet.input_blocks)


def check_settings(unet: UNetModel, interval: int, branch: int) -> None:
    """Raise a ValueError naming the bad DeepCache setting and the valid range."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"deepcache interval must be an integer of at least 1 (1 = off; 3 = the full U-Net every "
                         f"3rd call), got {interval!r}")
    n = branches(unet)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < n:
        raise ValueError(f"deepcache branch {branch!r} is beyond this U-Net's depth: use 0 to {n - 1} "
                         f"(0, the default, recomputes the fewest layers)")


def unet_forward(unet: UNetModel, x: Tensor, timesteps: Tensor, context: Tensor, branch: int,
                 cached: Tensor | None = None, guidance_emb: Tensor | None = None,
                 y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``unet(x, timesteps, context)`` that also returns the feature entering the branch's output block.

    With ``cached`` (that feature from an earlier call), only the shallow branch runs. The operations
    are UNetModel.forward's, in the same order, so a full call is bit-identical to it (tests check).
    """
    emb = unet.embed(x, timesteps, guidance_emb, y)  # y: SDXL's vector conditioning
    n = len(unet.input_blocks)
    first_up = n - 1 - branch  # the output block that reads the branch's skip
    hs: list[Tensor] = []
    h = x
    for block in unet.input_blocks[: n if cached is None else branch + 1]:
        h = block(h, emb, context)
        hs.append(h)
    if cached is None:
        h, start = unet.middle_block(h, emb, context), 0
    else:
        h, start = cached, first_up
    feature = h
    for j in range(start, n):
        if j == first_up:
            feature = h
        h = torch.cat([h, hs.pop()], dim=1)
        h = unet.output_blocks[j](h, emb, context, up_size(h, hs))
    return unet.out(h), feature


class DeepCacheUNet:
    """Stands in for ``unet(x, timesteps, context)`` during ONE generation: the full U-Net on calls
    0, N, 2N, ... and the shallow branch on the others, on the feature the last full call kept.

    A call whose input shape differs from the cached call's (another batch or size) runs in full.
    ``full_calls`` / ``shallow_calls`` count what ran.
    """

    def __init__(self, unet: UNetModel, interval: int = DEFAULT_INTERVAL, branch: int = DEFAULT_BRANCH):
        check_settings(unet, interval, branch)
        self.unet, self.interval, self.branch = unet, interval, branch
        self.calls = self.full_calls = self.shallow_calls = 0
        self._feature: Tensor | None = None
        self._key: tuple | None = None

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, guidance_emb: Tensor | None = None,
                 y: Tensor | None = None) -> Tensor:
        key = (tuple(x.shape), x.dtype, tuple(context.shape))
        reuse = self.calls % self.interval != 0 and self._feature is not None and key == self._key
        self.calls += 1
        if reuse:
            self.shallow_calls += 1
            out, _ = unet_forward(self.unet, x, timesteps, context, self.branch, self._feature, guidance_emb, y)
            return out
        self.full_calls += 1
        out, self._feature = unet_forward(self.unet, x, timesteps, context, self.branch, None, guidance_emb, y)
        self._key = key
        return out
