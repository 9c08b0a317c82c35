"""Textual inversion (Gal et al. 2022): ``ldmkit train embedding`` learns vectors for a new word.

The model (``--model``) is frozen; only ``vectors`` (n, width) learn. Every training image's caption is
a template with the new word (``a photo of {caption}``, the word filling ``{caption}``), tokenized as at
generation: the word's tokens become n placeholder positions whose token embeddings are the vectors
(:func:`ldmkit.prompt.tokenize_chunks` with an embedding matcher), so the loss sees exactly what a prompt
with the word will. The vectors start as the token embeddings of ``init_text`` (A1111's ``*`` by default),
repeated to n.

The run folder holds ``<token>.safetensors`` (A1111's ``emb_params`` layout: copy it into an
``--embeddings-dir``, where its file name is the word), rewritten at every checkpoint, and a
``checkpoint.pt`` with only the vectors (plus optimizer, RNG and data position) for an exact ``--resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.embeddings import Embedding, EmbeddingMatcher
from ldmkit.model import StableDiffusion
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.prompt import tokenize_chunks
from ldmkit.schedules import sd_alphas_cumprod
from ldmkit.train.config import TrainConfig, TrainError
from ldmkit.train.data import save_grid
from ldmkit.train.runner import DistInfo
from ldmkit.train.sources import load_model
from ldmkit.train.unet import UNetTask, apply_template, copy_sharing_frozen, resolve_objective

RUN_FILE = "embedding_run.json"
# A1111's subject templates, shortened: the word alone and in a few framings
DEFAULT_TEMPLATES = ["a photo of {caption}", "a rendering of {caption}", "a picture of {caption}",
                     "a close-up photo of {caption}", "{caption}"]
_RECORDED = ("token", "vectors")


def _check_record(old: dict, new: dict, run_dir: Path) -> None:
    diffs = [f"{k}: {old.get(k)!r} in the run, {new[k]!r} now" for k in ("fingerprint", *_RECORDED)
             if old.get(k) != new[k]]
    if diffs:
        raise TrainError(f"{run_dir} was started on another model or word: " + "; ".join(diffs))


class _Frozen:
    """The frozen model, kept out of the net's parameters and state dict."""

    def __init__(self, model: StableDiffusion):
        self.model = model


class EmbeddingNet(nn.Module):
    """The denoising loss of the frozen model with the new word's vectors in the prompt."""

    def __init__(self, model: StableDiffusion, vectors: Tensor, objective: str):
        super().__init__()
        self.vectors = nn.Parameter(vectors.clone())  # (n, width): the only trained tensor
        c = model.cfg
        ac = sd_alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end).float()
        self.register_buffer("sqrt_ab", ac.sqrt(), persistent=False)
        self.register_buffer("sqrt_1mab", (1 - ac).sqrt(), persistent=False)
        self.objective = objective
        self.frozen = _Frozen(model.requires_grad_(False).eval())

    def forward(self, latents: Tensor, ids: Tensor, slots: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, dict]:
        """``slots`` (B, 77): which vector sits at each position (-1: the token's own embedding)."""
        model = self.frozen.model
        enc = model.text_encoder
        with torch.no_grad():
            tokens = enc.text_model.embeddings.lookup(ids)
        x = torch.where(slots[..., None] >= 0, self.vectors[slots.clamp(min=0)].to(tokens.dtype), tokens)
        context = enc(ids, clip_skip=model.cfg.clip_skip, embeddings=x)
        a, s = self.sqrt_ab[t].view(-1, 1, 1, 1), self.sqrt_1mab[t].view(-1, 1, 1, 1)
        pred = model.unet(a * latents + s * noise, t, context)
        target = noise if self.objective == "eps" else a * noise - s * latents
        return F.mse_loss(pred.float(), target.float()), {}

    def __deepcopy__(self, memo: dict) -> EmbeddingNet:
        """A copy with its own vectors that shares the frozen model (the runner's EMA copy)."""
        return copy_sharing_frozen(self, self.frozen.model, memo)


class _OneEmbedding:
    """An embeddings table of the word being trained, for sample images during training."""

    def __init__(self, name: str, vectors: Tensor):
        self.embedding = Embedding(name, {"": vectors})

    def matcher(self, tok: CLIPTokenizer, width: int, prefer: str = "") -> EmbeddingMatcher:
        return EmbeddingMatcher([self.embedding], tok, width, prefer)


def initial_vectors(model: StableDiffusion, init_text: str, n: int) -> Tensor:
    """The token embeddings of ``init_text`` repeated to ``n`` vectors (A1111's initialisation)."""
    ids = model.tokenizer.encode(init_text) or [model.tokenizer.eos_id]
    with torch.no_grad():
        emb = model.text_encoder.text_model.embeddings.lookup(torch.tensor([ids]))[0].float()
    return emb[torch.arange(n) % len(ids)].clone()


class EmbeddingTask(UNetTask):
    """A new word's vectors on a frozen model; latents and data order as the U-Net trainer's."""

    arch_parts = ("unet", "text", "vae")

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: DistInfo):
        from ldmkit.networks import check_name

        self.cfg, self.run_dir, self.device = cfg, run_dir, d.device
        try:
            check_name(cfg.token, "embedding")  # the file <token>.safetensors is written in the run folder
        except ValueError as e:
            raise TrainError(str(e)) from None
        model = load_model(cfg.init_from, "--model")
        if model.cfg.is_sdxl or model.cfg.is_inpainting:
            raise TrainError(f"--model {cfg.init_from}: ldmkit trains embeddings for SD1/SD2 base models only")
        objective = resolve_objective(cfg, model.cfg)
        self.start_from_model(model, d, RUN_FILE, "embedding", {k: getattr(cfg, k) for k in _RECORDED},
                              _check_record)
        self.captions = [cfg.token] * self.train_size  # every image is the new word
        self.model_cfg = model.cfg.replace(name=run_dir.name, extra={"image_size": cfg.size})
        self.width = model.text_encoder.cfg.width
        self.tokenize(model.tokenizer)
        self.sample_prompts = cfg.sample_prompts or [apply_template("a photo of {caption}", cfg.token)]
        vectors = initial_vectors(model, cfg.init_text, cfg.vectors)
        self.net = EmbeddingNet(model.to(d.device), vectors.to(d.device), objective)

    def tokenize(self, tokenizer: CLIPTokenizer) -> None:
        """Token ids and vector slots of every template: (templates, 77) each, the same for every image."""
        self.tokenizer = tokenizer
        placeholder = EmbeddingMatcher([Embedding(self.cfg.token, {"": torch.zeros(self.cfg.vectors, self.width)})],
                                       tokenizer, self.width)
        rows, slots = [], []
        for template in self.cfg.caption_templates or DEFAULT_TEMPLATES:
            chunks = tokenize_chunks(tokenizer, apply_template(template, self.cfg.token), placeholder)
            if len(chunks) != 1 or len(chunks[0].fixes) != 1:
                raise TrainError(f"caption template {template!r} must hold the word once within 75 tokens")
            (offset, vec), = chunks[0].fixes
            slot = torch.full((len(chunks[0].tokens),), -1, dtype=torch.long)
            slot[offset + 1: offset + 1 + vec.shape[0]] = torch.arange(vec.shape[0])
            rows.append(torch.tensor(chunks[0].tokens))
            slots.append(slot)
        self.template_ids, self.template_slots = torch.stack(rows), torch.stack(slots)
        self.empty_ids = tokenizer([""])[0]

    def make_batch(self, idx: Tensor, gen: torch.Generator, step: int) -> dict[str, Any]:
        b = len(idx)
        latents = self.sample_latents(idx, gen)
        t = torch.randint(0, self.model_cfg.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        pick = torch.randint(0, len(self.template_ids), (b,), generator=gen)
        return {"latents": latents, "ids": self.template_ids[pick], "slots": self.template_slots[pick], "t": t,
                "noise": noise}

    def evaluate(self, eval_net: nn.Module, step: int) -> dict[str, float]:
        """A grid of the sample prompts with the word's current vectors."""
        from ldmkit.pipeline import GenerationParams, txt2img

        assert isinstance(eval_net, EmbeddingNet)
        model = eval_net.frozen.model
        before = model.__dict__.get("embedding_table")
        model.embedding_table = _OneEmbedding(self.cfg.token, eval_net.vectors.detach().float())
        try:
            images = []
            for i, prompt in enumerate(self.sample_prompts):
                params = GenerationParams(prompt=prompt, steps=self.cfg.sample_steps,
                                          cfg_scale=self.cfg.sample_cfg_scale, seed=self.cfg.seed + i,
                                          width=self.cfg.size, height=self.cfg.size)
                images += txt2img(model, params)
        finally:
            model.embedding_table = before
        save_grid(images, min(4, len(images)), self.run_dir / "samples" / f"step_{step:07d}.png")
        return {}

    def state(self) -> dict[str, Any]:
        # written with each checkpoint (main rank): the trained vectors as an embedding file
        save_embedding(self.net.vectors.detach(), self.run_dir / f"{self.cfg.token}.safetensors", self.cfg)
        if self.cfg.embedding_file:  # --out FILE.safetensors: the file the user named, written atomically
            save_embedding(self.net.vectors.detach(), Path(self.cfg.embedding_file), self.cfg)
        return {"token": self.cfg.token}


def save_embedding(vectors: Tensor, path: Path, cfg: TrainConfig) -> None:
    """A1111's .safetensors embedding layout (``emb_params``), which A1111, ComfyUI and ldmkit read."""
    from ldmkit.checkpoint import atomic_save_safetensors

    atomic_save_safetensors({"emb_params": vectors.float().cpu().contiguous()}, path,
                            {"name": cfg.token, "sd_checkpoint_name": Path(cfg.init_from).name,
                             "ldmkit_training": "ldmkit train embedding"})
