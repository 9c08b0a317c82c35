"""Explain one generation: an HTML page that shows every stage of Stable Diffusion on a real image.

``build_explain_page(model, prompt, out_dir)`` runs one txt2img generation and records what each
stage produced: the prompt's tokens, the starting noise, the predicted clean image at every step,
the forward (noising) process on the result, per-token cross-attention heat maps and the latent
itself. ``explain`` computes, ``write_page`` renders; the page is one ``index.html`` with inline
CSS and no scripts, its images PNG files beside it.

The heat maps follow DAAM (Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using
Cross Attention"): the softmax of every cross-attention layer, conditional half of the CFG batch,
averaged over heads, upsampled to the latent size and summed over layers and steps.
"""

from __future__ import annotations

import argparse
import html
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ldmkit import pipeline as P
from ldmkit.infotext import save_png
from ldmkit.model import StableDiffusion
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import Attention, BasicTransformerBlock, SpatialTransformer
from ldmkit.prompt import tokenize_chunks
from ldmkit.tiling import per_generation

# t = 0 .. 999 for SD's 1000 training steps; scaled for models trained with another count
FORWARD_TIMESTEPS = (0, 100, 250, 500, 750, 999)
TokenKind = Literal["start", "prompt", "end", "padding"]


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenRow:
    position: int  # index into the text embeddings that cross-attention reads (chunk * 77 + i)
    token: str  # BPE string; "</w>" marks the end of a word
    id: int
    kind: TokenKind
    weight: float = 1.0  # A1111 emphasis, "(word:1.3)"


def token_rows(tokenizer: CLIPTokenizer, prompt: str) -> list[TokenRow]:
    """The token sequence the text encoder reads for ``prompt``, every chunk, start/end/padding marked."""
    rows: list[TokenRow] = []
    offset = 0
    for chunk in tokenize_chunks(tokenizer, prompt):
        end = chunk.tokens.index(tokenizer.eos_id, 1)  # the chunk's prompt tokens lie between start and end
        for i, (tid, w) in enumerate(zip(chunk.tokens, chunk.weights, strict=True)):
            kind: TokenKind = "start" if i == 0 else "prompt" if i < end else "end" if i == end else "padding"
            rows.append(TokenRow(offset + i, tokenizer.decoder[tid], tid, kind, w))
        offset += len(chunk.tokens)
    return rows


# ---------------------------------------------------------------- cross-attention capture


def attention_probs(attn: Attention, x: Tensor, context: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) per head, as scaled_dot_product_attention computes it: (B, heads, N, T)."""
    q, k = attn.to_q(x).float(), attn.to_k(context).float()
    b, n, inner = q.shape
    hd = inner // attn.heads
    q = q.view(b, n, attn.heads, hd).transpose(1, 2)  # (B, heads, N, hd)
    k = k.view(b, -1, attn.heads, hd).transpose(1, 2)  # (B, heads, T, hd)
    return (q @ k.transpose(-1, -2) * hd**-0.5).softmax(dim=-1)


class CrossAttentionMaps:
    """Forward hooks on every cross-attention (``attn2``) of a U-Net, summing DAAM heat maps.

    Hooks exist only inside ``with`` and only read, so the U-Net's outputs are unchanged. They record
    calls from the thread that entered (a server may run other generations on the same model), and
    the last batch row only: CFGDenoiser batches ``[uncond | cond]``, so that is the prompt's half.
    ``keep`` names one layer whose raw inputs, probabilities and output are kept, for checking.
    """

    def __init__(self, unet: nn.Module, size: tuple[int, int], keep: str | None = None):
        self.unet, self.size, self.keep = unet, size, keep
        self.total: Tensor | None = None  # (T, h, w): sum over layers and calls of head-averaged probabilities
        self.count = 0  # number of (layer, call) maps in ``total``
        self.kept: list[dict[str, Tensor]] = []
        self._handles: list = []
        self._hw: dict[nn.Module, tuple[int, int]] = {}
        self._thread = -1
        self.layers: dict[str, tuple[Attention, SpatialTransformer]] = {}
        for name, mod in unet.named_modules():
            if isinstance(mod, SpatialTransformer):
                for j, block in enumerate(mod.transformer_blocks):
                    assert isinstance(block, BasicTransformerBlock)
                    self.layers[f"{name}.transformer_blocks.{j}.attn2"] = (block.attn2, mod)

    def __enter__(self) -> CrossAttentionMaps:
        self._thread = threading.get_ident()
        for st in {st for _, st in self.layers.values()}:
            # the token sequence is a flattened (h, w) grid: remember its shape, it differs per level
            self._handles.append(st.register_forward_pre_hook(self._grid))
        for name, (attn, st) in self.layers.items():
            self._handles.append(attn.register_forward_hook(self._make_hook(name, st), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hw.clear()

    def _grid(self, module: nn.Module, args: tuple) -> None:
        if threading.get_ident() == self._thread:
            self._hw[module] = tuple(args[0].shape[-2:])

    def _make_hook(self, name: str, st: SpatialTransformer) -> Callable:
        def hook(module: Attention, args: tuple, kwargs: dict, output: Tensor) -> None:
            if threading.get_ident() != self._thread:
                return
            x = args[0][-1:]
            context = (args[1] if len(args) > 1 else kwargs["context"])[-1:]
            probs = attention_probs(module, x, context)  # (1, heads, h*w, T)
            h, w = self._hw[st]
            m = probs[0].mean(0).T.reshape(-1, h, w)  # (T, h, w)
            # bilinear is a convex combination: every pixel's weights still sum to 1 over tokens
            m = F.interpolate(m[None], size=self.size, mode="bilinear", align_corners=False)[0]
            self.total = m if self.total is None else self.total + m
            self.count += 1
            if name == self.keep:
                self.kept.append({"x": x.float().clone(), "context": context.float().clone(),
                                  "probs": probs.clone(), "output": output[-1:].float().clone()})

        return hook

    def maps(self) -> Tensor:
        """(T, h, w): the average attention of every latent pixel over the tokens; sums to 1 over T."""
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded: run the U-Net inside `with CrossAttentionMaps(...)`")
        return self.total / self.count


# ---------------------------------------------------------------- one explained generation


@dataclass(frozen=True)
class Step:
    i: int
    sigma: float
    t: float  # the training timestep of sigma
    image: Image.Image  # the decoded predicted clean image (denoised)


@dataclass(frozen=True)
class ForwardStep:
    t: int
    alpha_bar: float
    image: Image.Image


@dataclass
class Explanation:
    """Everything the page shows, computed from one real generation."""

    params: P.GenerationParams  # seed, width and height resolved
    sampler_name: str
    schedule_name: str
    tokens: list[TokenRow]
    noise: Tensor  # (C, h, w) standard normal starting noise
    noise_image: Image.Image  # the noise decoded as if it were a latent
    steps: list[Step]
    latent: Tensor  # (C, h, w) final latent
    image: Image.Image  # the final image, with its infotext
    forward: list[ForwardStep]
    forward_source: str
    attention: Tensor  # (T, h, w), see CrossAttentionMaps.maps
    attention_layers: int
    unet_calls: int
    model_name: str
    control: list = field(default_factory=list)  # ldmkit.controlnet_explain.ControlView per ControlNet
    tokens2: list[TokenRow] = field(default_factory=list)  # SDXL base: the second (bigG) tokenizer's, same positions
    added: dict = field(default_factory=dict)  # SDXL: the added conditioning (see added_conditioning)

    @property
    def compression(self) -> float:
        c, h, w = self.latent.shape
        return self.params.width * self.params.height * 3 / (c * h * w)

    def token_share(self, position: int) -> float:
        """The fraction of all cross-attention (every pixel, layer, step) that went to one token."""
        return float(self.attention[position].mean())


def _resolve(model: StableDiffusion, params: P.GenerationParams) -> P.GenerationParams:
    size = model.cfg.native_size
    return params.replace(seed=P.resolve_seeds(params.seed, 1)[0], batch_size=1,
                          width=params.width or size, height=params.height or size)


@per_generation  # params.tiling: circular padding for this generation only
def explain(model: StableDiffusion, params: P.GenerationParams, init_image: Image.Image | None = None,
            callback: P.StepCallback | None = None) -> Explanation:
    """Run ``params`` as txt2img (``pipeline.txt2img``'s own path, so the same image) and record every stage
    through the sampler's step callback and cross-attention hooks."""
    params = _resolve(model, params)
    recorded: list[tuple[int, float, Tensor]] = []

    def record(info: dict) -> None:
        recorded.append((info["i"], float(info["sigma"]), info["denoised"][-1:].detach().float().clone()))
        if callback is not None:
            callback(info)

    f = model.cfg.vae.downscale
    from ldmkit.controlnet import trace_residuals

    with CrossAttentionMaps(model.unet, (params.height // f, params.width // f)) as cap, trace_residuals() as trace:
        job, latents = P.txt2img_latents(model, params, callback=record)
    noise = job.noise
    sampler_name, schedule_name = job.plan.infotext_names
    image = P.finish(model, params, latents, job.seeds, job.plan)[0]
    schedule = P.model_schedule(model)
    decoded = P.decode_latents(model, torch.cat([d for _, _, d in recorded]))
    steps = [Step(i, s, float(schedule.sigma_to_t(s)), img) for (i, s, _), img in zip(recorded, decoded, strict=True)]

    # forward diffusion x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, with the run's own noise as eps
    if init_image is None:
        x0, source = latents, "the generated image"
    else:
        x0 = P.encode_pixels(model, P.image_to_tensor(init_image, params.width, params.height))
        source = "the image you gave"
    n_t = model.cfg.num_train_timesteps
    ts = sorted({min(n_t - 1, round(t * n_t / 1000)) for t in FORWARD_TIMESTEPS})
    ab = [float(schedule.alphas_cumprod[t]) for t in ts]
    xt = torch.cat([a**0.5 * x0 + (1 - a) ** 0.5 * noise for a in ab])
    forward = [ForwardStep(t, a, img) for t, a, img in zip(ts, ab, P.decode_latents(model, xt), strict=True)]

    tokens2, added = [], {}
    if model.cfg.is_sdxl:  # two encoders (the refiner: bigG alone), pooled vector and size ids
        tokens2 = [row for tok in model.tokenizers[1:] for row in token_rows(tok, params.prompt)]
        added = added_conditioning(model, job.cond, job.uncond)
    return Explanation(
        params=params, sampler_name=sampler_name, schedule_name=schedule_name,
        tokens=token_rows(model.tokenizer, params.prompt), noise=noise[0].cpu(),
        noise_image=P.decode_latents(model, noise)[0], steps=steps, latent=latents[0].float().cpu(), image=image,
        forward=forward, forward_source=source, attention=cap.maps().cpu(), attention_layers=len(cap.layers),
        unet_calls=cap.count // max(1, len(cap.layers)), model_name=model.source_name,
        control=_control_views(params, trace), tokens2=tokens2, added=added,
    )


def added_conditioning(model: StableDiffusion, cond, uncond) -> dict:
    """What SDXL adds to the timestep embedding, as the run built it: the size/crop ids (refiner: aesthetic
    score) of the prompt and the negative prompt, the pooled bigG vector's size and length, the context width."""
    names = ["original height", "original width", "crop top", "crop left"]
    names += ["aesthetic score"] if model.cfg.family == "sdxl-refiner" else ["target height", "target width"]
    ids, neg_ids = getattr(cond, "ids", None), getattr(uncond, "ids", None)
    pooled, neg_pooled = getattr(cond, "pooled", None), getattr(uncond, "pooled", None)
    if ids is None or pooled is None:  # prompt editing: a schedule of conditionings, not one
        return {}
    return {"names": names, "ids": [float(v) for v in ids[0]],
            "neg_ids": [float(v) for v in neg_ids[0]] if neg_ids is not None else [],
            "pooled_dim": int(pooled.shape[-1]), "pooled_norm": float(pooled[0].float().norm()),
            "neg_pooled_norm": float(neg_pooled[0].float().norm()) if neg_pooled is not None else 0.0,
            "adm": model.cfg.unet.adm_in_channels, "widths": [enc.cfg.width for enc in model.encoders],
            "context": model.cfg.unet.context_dim}


def _control_views(params: P.GenerationParams, trace: list) -> list:
    if not params.controlnets:
        return []
    from ldmkit.controlnet_explain import control_views

    return control_views(params.controlnets, trace, params.steps)


# ---------------------------------------------------------------- images


def _grey(channel: Tensor, lo: float, hi: float) -> Image.Image:
    a = ((channel.float() - lo) / max(hi - lo, 1e-8)).clamp(0, 1) * 255
    return Image.fromarray(a.round().to(torch.uint8).numpy(), mode="L")


# a perceptually ordered dark-to-bright colour scale (close to matplotlib's "inferno")
_INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def heatmap_overlay(image: Image.Image, heat: Tensor, alpha: float = 0.55) -> Image.Image:
    """``heat`` (h, w) stretched from its minimum to its maximum (as DAAM shows it), coloured, over ``image``."""
    w, h = image.size
    heat = heat.float() - heat.min()
    heat = heat / heat.max().clamp_min(1e-12)
    up = F.interpolate(heat[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    pos = up.clamp(0, 1).numpy() * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (pos - lo)[..., None]
    colour = _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac
    out = np.asarray(image.convert("RGB"), dtype=np.float32) * (1 - alpha) + colour * alpha
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def heatmaps(ex: Explanation) -> list[tuple[TokenRow, Image.Image]]:
    """One overlay per prompt token (start, end and padding skipped)."""
    return [(row, heatmap_overlay(ex.image, ex.attention[row.position])) for row in ex.tokens if row.kind == "prompt"]


# ---------------------------------------------------------------- the page


def _fig(src: str, caption: str, cls: str = "") -> str:
    return (f'<figure class="{cls}"><a href="{src}"><img src="{src}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{caption}</figcaption></figure>")


def _table(head: list[str], rows: list[list[str]], row_cls: list[str] | None = None) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(
        f'<tr class="{c}">' + "".join(f"<td>{v}</td>" for v in r) + "</tr>"
        for r, c in zip(rows, row_cls or [""] * len(rows), strict=True)
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _section(sid: str, title: str, text: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{title}</h2><p class="lead">{text}</p>{body}</section>'


def _token_table(ex: Explanation, tok_text: Callable[[int], str]) -> str:
    rows, classes = [], []
    show_w = any(r.weight != 1.0 for r in ex.tokens)
    toks = ex.tokens
    second = ex.tokens2 if len(ex.tokens2) == len(toks) else []  # SDXL: bigG's id at each position

    def same(a: int, b: int) -> bool:
        return toks[a].id == toks[b].id and (not second or second[a].id == second[b].id)

    i = 0
    while i < len(toks):
        r = toks[i]
        j = i
        while r.kind == "padding" and j + 1 < len(toks) and toks[j + 1].kind == "padding" and same(j + 1, i):
            j += 1  # a run of padding is one row
        pos = str(r.position) if j == i else f"{r.position}–{toks[j].position}"
        kind = r.kind if j == i else f"padding ×{j - i + 1}"
        share = sum(ex.token_share(toks[k].position) for k in range(i, j + 1))
        cells = [pos, f"<code>{html.escape(r.token)}</code>", html.escape(tok_text(r.id)), str(r.id)]
        cells += [str(second[i].id)] if second else []
        rows.append(cells + [kind] + ([f"{r.weight:g}"] if show_w else []) + [f"{share:.1%}"])
        classes.append(r.kind)
        i = j + 1
    ids = ["CLIP-L id", "bigG id"] if second else ["id"]
    head = ["position", "token", "text", *ids, "kind"] + (["weight"] if show_w else []) + ["share of attention"]
    return _table(head, rows, classes)


def _sdxl_tokens_text(ex: Explanation) -> str:
    a = ex.added
    if not a:
        return ""
    widths = a["widths"]
    if len(widths) == 1:  # the refiner
        return (f" This SDXL refiner reads the prompt with one text encoder, OpenCLIP ViT-bigG ({widths[0]} numbers "
                "per position, taken from its second-to-last layer).")
    return (" SDXL reads the prompt with two text encoders, CLIP ViT-L and OpenCLIP ViT-bigG. They share the "
            "vocabulary, so the tokens are the same; only the padding differs (CLIP-L pads with the end token, bigG "
            f"with id 0, both columns above). Each encoder's second-to-last layer gives {widths[0]} and {widths[1]} "
            f"numbers per position; side by side that is {sum(widths)} numbers per position, what cross-attention "
            "reads.")


def _added_section(ex: Explanation) -> str:
    a = ex.added
    rows = [[html.escape(n), f"{v:g}", f"{w:g}" if a["neg_ids"] else ""]
            for n, v, w in zip(a["names"], a["ids"], a["neg_ids"] or a["ids"], strict=True)]
    rows.append(["pooled text vector", f"{a['pooled_dim']} numbers, length {a['pooled_norm']:.3g}",
                 f"length {a['neg_pooled_norm']:.3g}" + (" (zeros: empty negative prompt, as A1111)"
                                                         if a["neg_pooled_norm"] == 0 else "")])
    n = len(a["names"])
    return _section(
        "added", "1b. What SDXL adds: size, crop and a summary of the prompt",
        "Besides the token vectors, SDXL's U-Net gets one more vector per image, added to its timestep embedding in "
        "every residual block. It holds bigG's pooled output (the end token's state, projected) and the image's "
        "micro-conditioning: during training SDXL was told each picture's original size and where it was cropped, so "
        "at generation these numbers ask for an uncropped picture of this size (A1111's defaults: original size = "
        "target size = the image's, crop 0, 0). Each number becomes 256 sine/cosine features, as the timestep does: "
        f"{a['pooled_dim']} + {n} × 256 = {a['adm']} numbers.",
        _table(["added conditioning", "prompt", "negative prompt"], rows))


_CSS = """
body{font:16px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;background:#fdfdfb}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.lead{max-width:75ch} code{background:#f1f1ee;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.15em .6em;text-align:left}
th{background:#f4f4f0} tr.start td,tr.end td{background:#eef4ff} tr.padding td{color:#999}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.8em;color:#555}
figure img{width:128px;height:auto;display:block;border:1px solid #ccc}
figure.big img{width:256px} .px img{image-rendering:pixelated}
nav a{margin-right:1em} pre{white-space:pre-wrap;background:#f4f4f0;padding:.5em}
"""


def render_html(ex: Explanation, files: dict[str, str], tok_text: Callable[[int], str]) -> str:
    p = ex.params
    c, h, w = ex.latent.shape
    f = p.width // w
    ctx = max(r.position for r in ex.tokens) + 1
    sections = []

    settings = [["model", html.escape(ex.model_name)], ["prompt", html.escape(p.prompt)],
                ["negative prompt", html.escape(p.negative_prompt) or "<i>(empty)</i>"],
                ["sampler", f"{ex.sampler_name} ({ex.schedule_name} schedule)"], ["steps", str(p.steps)],
                ["CFG scale", f"{p.cfg_scale:g}"], ["seed", str(p.seed)], ["size", f"{p.width}×{p.height} pixels"],
                ["latent", f"{c}×{h}×{w}"], ["U-Net evaluations", f"{ex.unet_calls} (each on a batch of prompt "
                                                                    "and negative prompt)"]]
    body = ('<div class="row">' + _fig(files["final"], "the result", "big") + _table(["setting", "value"], settings)
            + "</div><p>PNG parameters (<code>ldmkit generate --from-png final.png</code> makes it again):</p>"
            f"<pre>{html.escape(ex.image.info.get('parameters', ''))}</pre>")
    sections.append(_section("parameters", "The run", "Every picture on this page comes from this one generation; "
                             "nothing is illustrative. The same model and settings give the same image.", body))

    sections.append(_section(
        "tokens", "1. The prompt becomes numbers",
        "The model does not read letters. The tokenizer cuts the prompt into pieces from a fixed vocabulary "
        "(byte-pair encoding; <code>&lt;/w&gt;</code> marks the end of a word) and replaces each piece by its "
        f"number. A start token goes first and an end token last, and the sequence is padded to {ctx} positions "
        "because the text encoder always reads the same length. The text encoder turns each position into a vector "
        "that the image model can look at. The last column says how much of the image model's attention went to "
        "each position; the start token usually takes most, a place to put attention that no word needs."
        + _sdxl_tokens_text(ex), _token_table(ex, tok_text)))
    if ex.added:
        sections.append(_added_section(ex))

    chans = "".join(_fig(files[f"noise{k}"], f"channel {k}", "px") for k in range(c))
    sections.append(_section(
        "noise", "2. It starts as random noise",
        f"Every image begins as {c}×{h}×{w} random numbers from a normal distribution (mean "
        f"{ex.noise.mean():.2f}, standard deviation {ex.noise.std():.2f}), drawn by a generator seeded with "
        f"{p.seed}: the same seed gives the same noise, hence the same image. Left, the {c} channels as grey "
        "images (black = −3, white = +3); right, what the decoder makes of this noise if asked to decode it.",
        f'<div class="row">{chans}{_fig(files["noise_decoded"], "decoded")}</div>'))

    strip = "".join(_fig(files[f"step{s.i}"], f"step {s.i + 1}<br>σ = {s.sigma:.3g}, t ≈ {s.t:.0f}")
                    for s in ex.steps)
    sections.append(_section(
        "steps", "3. Removing the noise, step by step",
        f"The sampler ({ex.sampler_name}, {len(ex.steps)} steps) walks from pure noise to a clean image. At each "
        "step the U-Net looks at the current noisy latent and predicts the noise in it; taking that away gives its "
        "guess of the finished image, shown here decoded to pixels. Early guesses are blurry averages of everything "
        "the prompt could be; later ones commit to details. Each step runs the U-Net with the prompt and with the "
        f"negative prompt and pushes the result {p.cfg_scale:g}× further towards the prompt (classifier-free "
        "guidance). σ is the noise level at that step (noise relative to the image); t is the matching training "
        "timestep, 999 = pure noise, 0 = clean.", f'<div class="row">{strip}</div>'))

    fwd = "".join(_fig(files[f"fwd{s.t}"], f"t = {s.t}<br>√ᾱ = {s.alpha_bar ** 0.5:.2f}") for s in ex.forward)
    sections.append(_section(
        "forward", "4. The other direction: how training adds noise",
        f"Training runs the film backwards: take a clean image (here {ex.forward_source}), mix in noise, "
        "x<sub>t</sub> = √ᾱ<sub>t</sub>·x<sub>0</sub> + √(1−ᾱ<sub>t</sub>)·ε, and teach the U-Net to find ε again. "
        "Like an ink drop spreading in water, the picture dissolves gradually: fine detail goes first, large shapes "
        "last, and at the end almost nothing of it is left. √ᾱ is how much of the image remains. The noise ε used "
        "here is the starting noise of section 2.", f'<div class="row">{fwd}</div>'))

    maps = heatmaps(ex)
    figs = "".join(_fig(files[f"attn{r.position}"],
                        f"<code>{html.escape(r.token)}</code> ({ex.token_share(r.position):.1%})") for r, _ in maps)
    sections.append(_section(
        "attention", "5. Where each word was looked at",
        "Inside the U-Net every latent pixel asks the prompt's tokens which of them concern it (cross-attention). "
        f"Adding up those attention weights over all {ex.attention_layers} cross-attention layers (each resolution "
        f"scaled to {h}×{w}) and all {ex.unet_calls} U-Net evaluations gives one heat map per token, bright where the "
        "model looked at that word while painting (the DAAM method, Tang et al. 2022, arXiv:2210.04885). Each map "
        "is stretched from its own minimum (dark purple) to its maximum (yellow); the percentage "
        "is the token's share of all attention. Only the prompt's half of the guidance batch is used."
        + (f" In SDXL each position is {ex.added['context']} numbers (both encoders side by side), and the U-Net has "
           "no attention at its highest resolution, so the maps come from the coarser levels."
           if ex.added.get("context") and len(ex.added.get("widths", [])) > 1 else ""),
        f'<div class="row">{figs}</div>' if figs else "<p><i>The prompt has no tokens.</i></p>"))

    lat = "".join(_fig(files[f"latent{k}"], f"channel {k}", "px") for k in range(c))
    sections.append(_section(
        "latent", "6. The latent: a small picture the U-Net works on",
        f"The U-Net never sees pixels. It works on a compressed latent: {c} channels of {h}×{w} numbers instead of "
        f"3 colour channels of {p.width}×{p.height} pixels, {ex.compression:g}× fewer numbers "
        f"({p.width}·{p.height}·3 / ({h}·{w}·{c})). The VAE decoder turns each latent position into a {f}×{f} "
        "patch of pixels. That compression is what makes latent diffusion fast enough for a home computer. Each "
        "channel is shown stretched from its own minimum (black) to maximum (white).",
        f'<div class="row">{lat}{_fig(files["final"], f"decoded: {p.width}×{p.height}×3")}</div>'))

    links = [("parameters", "run"), ("tokens", "tokens"), *([("added", "size & pooled")] if ex.added else []),
             ("noise", "noise"), ("steps", "steps"), ("forward", "forward"), ("attention", "attention"),
             ("latent", "latent")]
    if ex.control:  # the map(s) and the residuals' strength per block and step
        from ldmkit.controlnet_explain import render_section

        at = [sid for sid, _ in links].index("steps")  # sections and links in the same order
        sections.insert(at, render_section(ex.control, files))
        links.insert(at, ("controlnet", "ControlNet"))
    nav = "".join(f'<a href="#{s}">{t}</a>' for s, t in links)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>ldmkit explain: '
            f"{html.escape(p.prompt)}</title><style>{_CSS}</style></head><body><h1>How this image was made</h1>"
            f"<p>“{html.escape(p.prompt)}”, one Stable Diffusion run followed from the words to the pixels.</p>"
            f"<nav>{nav}</nav>{''.join(sections)}</body></html>\n")


def write_page(ex: Explanation, out_dir: str | Path, tokenizer: CLIPTokenizer) -> Path:
    """The PNGs and ``index.html`` into ``out_dir``; returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Image.Image] = {"noise_decoded": ex.noise_image}
    for k in range(ex.latent.shape[0]):
        images[f"noise{k}"] = _grey(ex.noise[k], -3.0, 3.0)
        ch = ex.latent[k]
        images[f"latent{k}"] = _grey(ch, float(ch.min()), float(ch.max()))
    images.update({f"step{s.i}": s.image for s in ex.steps})
    images.update({f"fwd{s.t}": s.image for s in ex.forward})
    images.update({f"attn{r.position}": img for r, img in heatmaps(ex)})
    if ex.control:
        from ldmkit.controlnet_explain import images as control_images

        images.update(control_images(ex.control))
    files = {"final": save_png(ex.image, out / "final.png").name}
    for key, img in images.items():
        name = f"{key}.png"
        img.save(out / name)
        files[key] = name
    page = out / "index.html"
    page.write_text(render_html(ex, files, lambda i: tokenizer.decode([i])), encoding="utf-8")
    return page


def build_explain_page(model: StableDiffusion, prompt: str, out_dir: str | Path, *, seed: int = 42, steps: int = 20,
                       sampler: str = "Euler", cfg_scale: float = 7.0, width: int | None = None,
                       height: int | None = None, negative_prompt: str = "", init_image: Image.Image | None = None,
                       callback: P.StepCallback | None = None, controlnets: tuple = ()) -> Path:
    """Generate ``prompt`` once and write ``out_dir/index.html`` explaining it; returns that path.

    ``width``/``height`` default to the model's native size; ``init_image`` replaces the generated image
    in the forward-diffusion strip; ``callback`` gets the sampler's per-step dict (for progress); ``controlnets``:
    ControlNet units (made at ``width`` x ``height``), shown with their maps and residuals per block.
    """
    params = P.GenerationParams(prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
                                sampler=sampler, seed=seed, width=width or 0, height=height or 0,
                                controlnets=tuple(controlnets))
    return write_page(explain(model, params, init_image, callback), out_dir, model.tokenizer)


def _cli_params(args: argparse.Namespace) -> P.GenerationParams:
    """The command line's settings; width/height 0 = the model's native size (filled in by ``explain``)."""
    return P.GenerationParams(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                              cfg_scale=args.cfg_scale, sampler=args.sampler, seed=args.seed,
                              width=args.width or 0, height=args.height or 0)


# ---------------------------------------------------------------- command line

EXAMPLES = """examples:
  ldmkit explain "a red apple" -o explain/            # built-in model; open explain/index.html
  ldmkit explain "a red apple on a table" --model v1-5-pruned-emaonly.safetensors --steps 20 --seed 42
  ldmkit explain "a watercolor fox" --init-image fox.png -o fox/   # forward-diffusion strip of your image"""


def cmd_explain(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from ldmkit import api

    params = _cli_params(args)  # a bad sampler name stops here, before anything is loaded
    from ldmkit.controlnet import check_args

    check_args(args)  # unpaired or bad --controlnet options: before anything is loaded
    init = P.open_image(args.init_image) if args.init_image else None
    pipe = api.load(args.model, vae=args.vae, model_type=args.model_type, device=args.device)
    if args.controlnet:  # the map and the residuals per block get their own section
        from ldmkit.controlnet import units_from_args

        size = pipe.model.cfg.native_size
        params = params.replace(controlnets=units_from_args(args, pipe.model, params.width or size,
                                                            params.height or size))
    with tqdm(total=args.steps, desc="explain", unit="step", dynamic_ncols=True) as bar:
        ex = explain(pipe.model, params, init, callback=lambda info: bar.update(1))
    print(write_page(ex, args.output, pipe.model.tokenizer))


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("explain", "write an HTML page that shows, step by step, how one image is generated", EXAMPLES)
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", default="explain", help="output folder for index.html and its PNGs")
    p.add_argument("--model", default=None, help="checkpoint file, diffusers folder, or built-in name (default: emoji)")
    p.add_argument("--vae", default=None, help="standalone VAE file to use instead of the model's")
    p.add_argument("--model-type", default=None, choices=["sd1", "sd2", "sd2-v"])
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=42, help="-1 for random")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="Euler", help='e.g. "Euler", "DPM++ 2M", "DDIM"')
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--init-image", default=None, help="image for the forward-diffusion strip (default: the result)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    from ldmkit.controlnet import add_controlnet_args

    add_controlnet_args(p)  # --controlnet FILE --control-image MAP ...: the page shows the map and its pull
    p.set_defaults(func=cmd_explain)
