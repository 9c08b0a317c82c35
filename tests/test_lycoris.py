"""LyCORIS files (LoCon with Tucker, LoHa with and without hada_t1/t2, LoKr with full, low-rank and Tucker
factors, (IA)³, full diff, dora_scale) merge in ldmkit as their published definitions say.

Each file is built by hand with kohya's key names; the test merges the same update into a diffusers
pipeline with its own code, written from LyCORIS' definitions (and A1111's ``finalize_updown`` for alpha
scaling), and compares U-Net/text-encoder outputs and a txt2img image (<= 2/255) with ldmkit's merge.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import rel_err, save_diffusers_pipeline
from test_lora_formats import _assert_same_image, _inputs, _pipe

from ldmkit import checkpoint
from ldmkit.checkpoint import CheckpointError
from ldmkit.config import TINY
from ldmkit.lora import apply_lora
from ldmkit.lora_formats import read_lora_file

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# diffusers module -> kind of layer; every shape class the U-Net and CLIP have
UNET_MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # Linear 32x32
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",  # Linear 64x32 (context)
                "down_blocks.0.resnets.0.conv1",  # Conv 3x3 32->32
                "up_blocks.1.attentions.0.proj_in",  # Conv 1x1
                "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]  # Linear 64x256
TE_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    save_diffusers_pipeline(TINY, path)
    return path


def _kohya(part: str, name: str) -> str:
    return ("lora_unet_" if part == "unet" else "lora_te_text_model_") + name.replace(".", "_")


def _split(n: int) -> tuple[int, int]:
    """A Kronecker factorisation n = a * b with a small (LyCORIS picks a similar one)."""
    a = 4 if n % 4 == 0 else 1
    return a, n // a


def _build(kind: str, shape: torch.Size, g: torch.Generator, variant: int) -> dict[str, torch.Tensor]:
    """Random tensors of one module of ``kind`` for a layer of ``shape``, laid out as LyCORIS saves them."""
    def r(*s, std=0.3):
        return torch.randn(*s, generator=g) * std

    out, inp = shape[0], shape[1]
    conv = len(shape) == 4 and shape[2] > 1
    kk = shape[2:] if len(shape) == 4 else ()
    rank = 4
    if kind == "loha":
        if conv and variant % 2 == 0:  # Tucker: cores (r, r, kh, kw), factors (r, out) / (r, in)
            return {"hada_w1_a": r(rank, out), "hada_w1_b": r(rank, inp), "hada_t1": r(rank, rank, *kk),
                    "hada_w2_a": r(rank, out), "hada_w2_b": r(rank, inp), "hada_t2": r(rank, rank, *kk),
                    "alpha": torch.tensor(2.0)}
        flat = inp * (shape[2] * shape[3] if len(shape) == 4 else 1)
        return {"hada_w1_a": r(out, rank), "hada_w1_b": r(rank, flat), "hada_w2_a": r(out, rank),
                "hada_w2_b": r(rank, flat), "alpha": torch.tensor(3.0)}
    if kind == "lokr":
        (o1, o2), (i1, i2) = _split(out), _split(inp)
        if conv:
            if variant % 2 == 0:  # lokr_t2: Tucker core over the kernel
                return {"lokr_w1": r(o1, i1), "lokr_w2_a": r(rank, o2), "lokr_w2_b": r(rank, i2),
                        "lokr_t2": r(rank, rank, *kk), "alpha": torch.tensor(2.0)}
            return {"lokr_w1": r(o1, i1), "lokr_w2_a": r(o2, rank), "lokr_w2_b": r(rank, i2 * kk[0] * kk[1]),
                    "alpha": torch.tensor(2.0)}
        if len(shape) == 4:  # 1x1 conv: a 4-D full w2
            return {"lokr_w1": r(o1, i1), "lokr_w2": r(o2, i2, 1, 1, std=0.1), "alpha": torch.tensor(7.0)}
        if variant % 2:  # w1 decomposed, w2 full
            return {"lokr_w1_a": r(o1, 2), "lokr_w1_b": r(2, i1), "lokr_w2": r(o2, i2, std=0.1),
                    "alpha": torch.tensor(1.0)}
        return {"lokr_w1": r(o1, i1), "lokr_w2_a": r(o2, rank), "lokr_w2_b": r(rank, i2), "alpha": torch.tensor(8.0)}
    if kind == "ia3":
        on_input = variant % 2
        return {"weight": 1 + r(inp if on_input else out), "on_input": torch.tensor(on_input)}
    if kind == "full":
        return {"diff": r(*shape, std=0.05), "diff_b": r(out, std=0.05)}
    if kind == "locon-tucker":
        if not conv:  # LyCORIS writes a plain LoRA pair there
            return {"lora_down.weight": r(rank, inp, *kk), "lora_up.weight": r(out, rank, *kk),
                    "alpha": torch.tensor(2.0)}
        return {"lora_down.weight": r(rank, inp, 1, 1), "lora_mid.weight": r(rank, rank, *kk),
                "lora_up.weight": r(out, rank, 1, 1), "alpha": torch.tensor(2.0)}
    raise AssertionError(kind)


def _reference_delta(kind: str, w: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW·scale from the definitions, element by element where it is cheap (independent of ldmkit's einsums)."""
    shape = weight.shape
    if kind == "loha":
        def factor(a, b, t):
            if t is None:
                return (a @ b).reshape(shape)
            # W[o, i, k, l] = sum_{p,q} t[p, q, k, l] * a[p, o] * b[q, i]
            return (t[:, :, None, None] * a[:, None, :, None, None, None] * b[None, :, None, :, None, None]
                    ).sum((0, 1))
        d = factor(w["hada_w1_a"], w["hada_w1_b"], w.get("hada_t1")) * \
            factor(w["hada_w2_a"], w["hada_w2_b"], w.get("hada_t2"))
        return d * (w["alpha"] / w["hada_w1_b"].shape[0])
    if kind == "lokr":
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_t2" in w:
            t, a, b = w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"]
            w2 = (t[:, :, None, None] * a[:, None, :, None, None, None] * b[None, :, None, :, None, None]).sum((0, 1))
        elif "lokr_w2" in w:
            w2 = w["lokr_w2"]
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
            # kron: block (a, b) of the result is w1[a, b] * w2
            d = (w1[:, None, :, None, None, None] * w2[None, :, None, :, :, :]).reshape(shape)
        else:
            d = (w1[:, None, :, None] * w2[None, :, None, :]).reshape(shape)
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        return d * (w["alpha"] / dim if dim else 1.0)
    if kind == "ia3":
        v = w["weight"]
        if int(w["on_input"]):
            return weight * v.reshape(1, -1, *[1] * (weight.ndim - 2))
        return weight * v.reshape(-1, *[1] * (weight.ndim - 1))
    if kind == "full":
        return w["diff"]
    if kind == "locon-tucker" and "lora_mid.weight" not in w:
        return (w["lora_up.weight"].flatten(1) @ w["lora_down.weight"].flatten(1)).reshape(shape) * (w["alpha"] / 4)
    if kind == "locon-tucker":
        up, mid, down = w["lora_up.weight"][:, :, 0, 0], w["lora_mid.weight"], w["lora_down.weight"][:, :, 0, 0]
        d = torch.zeros(shape)
        for n in range(mid.shape[0]):
            for m in range(mid.shape[1]):
                d += up[:, n, None, None, None] * down[None, m, :, None, None] * mid[n, m]
        return d * (w["alpha"] / down.shape[0])
    raise AssertionError(kind)


def _module(pipe, part: str, name: str) -> torch.nn.Module:
    root = getattr(pipe, part)
    return root.get_submodule(name if part == "unet" or not hasattr(root, "text_model") else f"text_model.{name}")


def _make(folder, tmp_path, kind: str, te_mult: float = 1.0, unet_mult: float = 1.0, dora: bool = False):
    """Write a file of ``kind`` over every test module; return it and diffusers' pipeline with it merged."""
    from safetensors.torch import save_file

    pipe = _pipe(folder)
    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    sd = {}
    with torch.no_grad():
        targets = [("unet", n) for n in UNET_MODULES] + [("text_encoder", n) for n in TE_MODULES]
        for i, (part, name) in enumerate(targets):
            mod = _module(pipe, part, name)
            w = _build(kind, mod.weight.shape, g, i)
            if mod.bias is None:
                w.pop("diff_b", None)
            if dora:  # LyCORIS' dora_scale: one magnitude per input column, near the column norms of W
                col = mod.weight.transpose(0, 1).flatten(1).norm(dim=1)
                col = col * (1 + 0.3 * torch.rand(col.shape, generator=g))
                w["dora_scale"] = col.reshape(1, -1, *[1] * (mod.weight.ndim - 2))
            sd.update({f"{_kohya(part, name)}.{k}": v.contiguous() for k, v in w.items()})
            m = unet_mult if part == "unet" else te_mult
            delta = _reference_delta(kind, w, mod.weight)
            if dora:  # A1111 apply_weight_decompose: magnitude per input column, then times the multiplier
                v = mod.weight + delta
                norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (v.ndim - 2))
                delta = v * (w["dora_scale"].reshape(norm.shape) / norm) - mod.weight
            mod.weight += m * delta
            if "diff_b" in w:
                mod.bias += m * w["diff_b"]
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, path)
    return path, pipe


def _assert_same_model(pipe, model, base, text=True):
    x, t, ctx, ids = _inputs()
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
        assert rel_err(model.unet(x, t, ctx), ref) < 1e-4
        assert rel_err(base.unet(x, t, ctx), ref) > 1e-2
        if text:
            ref_t = pipe.text_encoder(ids).last_hidden_state
            assert rel_err(model.text_encoder(ids), ref_t) < 1e-4
            assert rel_err(base.text_encoder(ids), ref_t) > 1e-2


KINDS = ["loha", "lokr", "ia3", "full", "locon-tucker"]


@pytest.mark.parametrize("kind", KINDS)
def test_lycoris_kind_matches_its_definition(folder, tmp_path, kind):
    path, pipe = _make(folder, tmp_path, kind)
    lora = read_lora_file(path)
    kinds = {getattr(m, "kind", "lora") for m in lora.targets.values()}
    assert kinds == {kind} | ({"lora"} if "locon" in kind else set())
    base = checkpoint.load(folder)
    model = copy.deepcopy(base)
    assert apply_lora(model, path) == len(UNET_MODULES) + len(TE_MODULES)
    _assert_same_model(pipe, model, base)
    _assert_same_image(pipe, model)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_separate_text_and_unet_multipliers(folder, tmp_path, kind):
    """A1111's <lora:name:te:unet>: the text encoder's updates weigh te, the U-Net's unet."""
    path, pipe = _make(folder, tmp_path, kind, te_mult=0.4, unet_mult=-0.7)
    base = checkpoint.load(folder)
    model = copy.deepcopy(base)
    apply_lora(model, path, 0.4, unet_multiplier=-0.7)
    _assert_same_model(pipe, model, base)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_dora_scale_on_lycoris(folder, tmp_path, kind):
    path, pipe = _make(folder, tmp_path, kind, te_mult=0.6, unet_mult=0.6, dora=True)
    base = checkpoint.load(folder)
    model = copy.deepcopy(base)
    apply_lora(model, path, 0.6)
    _assert_same_model(pipe, model, base)
    _assert_same_image(pipe, model)


def test_incomplete_or_wrong_lycoris_is_one_clear_error(folder, tmp_path):
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = tmp_path / "half.safetensors"
    save_file({f"{name}.lokr_w1": torch.zeros(4, 4)}, bad)
    with pytest.raises(CheckpointError, match=r"LoKr module without lokr_w2 \(or lokr_w2_a and lokr_w2_b\)"):
        read_lora_file(bad)
    wrong = tmp_path / "wrong.safetensors"  # LoKr factors for a 48x48 layer on a 32x32 one
    save_file({f"{name}.lokr_w1": torch.zeros(4, 4), f"{name}.lokr_w2": torch.zeros(12, 12)}, wrong)
    with pytest.raises(CheckpointError, match=r"don't fit the layer \(32, 32\)"):
        apply_lora(checkpoint.load(folder), wrong)
    oft = tmp_path / "oft.safetensors"
    save_file({f"{name}.oft_blocks": torch.zeros(4, 8, 8)}, oft)
    with pytest.raises(CheckpointError, match="OFT"):
        read_lora_file(oft)


def test_norm_layer_updates(folder, tmp_path):
    """LyCORIS w_norm/b_norm (A1111 network_norm): the weight and bias updates of GroupNorm/LayerNorm layers,
    scale 1, times the multiplier."""
    from safetensors.torch import save_file

    pipe = _pipe(folder)
    g = torch.Generator().manual_seed(5)
    sd = {}
    norms = [("unet", "down_blocks.0.resnets.0.norm1"), ("unet", "mid_block.attentions.0.norm"),
             ("unet", "up_blocks.0.attentions.0.transformer_blocks.0.norm2"),
             ("text_encoder", "encoder.layers.1.layer_norm1")]
    with torch.no_grad():
        for part, name in norms:
            mod = _module(pipe, part, name)
            w, b = torch.randn(mod.weight.shape, generator=g) * 0.3, torch.randn(mod.bias.shape, generator=g) * 0.3
            sd |= {f"{_kohya(part, name)}.w_norm": w, f"{_kohya(part, name)}.b_norm": b,
                   f"{_kohya(part, name)}.alpha": torch.tensor(4.0)}  # no rank: alpha does not scale
            mod.weight += 0.8 * w
            mod.bias += 0.8 * b
    path = tmp_path / "norm.safetensors"
    save_file(sd, path)
    base = checkpoint.load(folder)
    model = copy.deepcopy(base)
    assert apply_lora(model, path, 0.8) == len(norms)
    _assert_same_model(pipe, model, base)
    _assert_same_image(pipe, model)
