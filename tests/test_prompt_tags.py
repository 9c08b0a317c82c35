"""``<lora:NAME:W>`` / ``<lyco:NAME:W>`` in the prompt: the same image as ``--lora NAME.safetensors:W``,
switching LoRAs between generations leaves no trace (each image equals a fresh load), and names that are
missing, unsafe or for another model are warnings in the infotext while generation goes on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import save_diffusers_pipeline
from safetensors.torch import save_file

from ldmkit import api, checkpoint
from ldmkit.config import TINY
from ldmkit.networks import NetworkNameError, last_report
from ldmkit.prompt import NetworkTag, extract_network_tags

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
GEN = dict(steps=4, sampler="Euler", scheduler="uniform", seed=3, width=24, height=16, cfg_scale=5.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    save_diffusers_pipeline(TINY, path)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A folder with a kohya LoRA ("style"), a LoHa ("Shape", upper case) and an SD2-width LoRA."""
    d = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{q}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.3,
               f"{q}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.3, f"{q}.alpha": torch.tensor(2.0),
               f"{te}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.3,
               f"{te}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.3}, d / "style.safetensors")
    (d / "sub").mkdir()
    loha = {f"{k}.hada_w{i}_{ab}": torch.randn(*((64, 2) if ab == "a" else (2, 32)), generator=g) * 0.7
            for i in (1, 2) for ab in "ab"}
    save_file(loha | {f"{k}.alpha": torch.tensor(1.0)}, d / "sub" / "Shape.safetensors")
    save_file({f"{k}.lora_down.weight": torch.zeros(4, 1024), f"{k}.lora_up.weight": torch.zeros(64, 4)},
              d / "sd2only.safetensors")
    return d


def _png(img) -> np.ndarray:
    return np.asarray(img)


def test_extract_network_tags():
    text, tags, warnings = extract_network_tags("a castle, <lora:watercolor:0.7>, <lyco:x>, <LORA:y:0.5:0.2> "
                                                "<lora:z:te=0.3:unet=0.9> <lora:bad:high> <hypernet:h:1>")
    assert text == "a castle, , ,    <hypernet:h:1>"
    assert tags == [NetworkTag("watercolor", 0.7), NetworkTag("x", 1.0), NetworkTag("y", 0.5, 0.2),
                    NetworkTag("z", 0.3, 0.9)]
    assert len(warnings) == 1 and "<lora:bad:high>" in warnings[0]


def test_tag_equals_lora_flag(folder, loras):
    merged = api.load(folder, loras=[(str(loras / "style.safetensors"), 0.7)])
    tagged = api.load(folder, lora_dir=loras)
    a = merged.txt2img("a red apple", **GEN)[0]
    b = tagged.txt2img("a red apple <lora:style:0.7>", **GEN)[0]
    assert np.array_equal(_png(a), _png(b))
    assert "Lora hashes: \"style: " in b.info["parameters"]
    assert b.info["parameters"].startswith("a red apple <lora:style:0.7>")  # the prompt keeps its tag
    # LyCORIS through <lyco:...>, found in a subfolder, any case
    merged = api.load(folder, loras=[(str(loras / "sub" / "Shape.safetensors"), 1.0)])
    c = tagged.txt2img("a red apple <lyco:shape>", **GEN)[0]
    assert np.array_equal(_png(merged.txt2img("a red apple", **GEN)[0]), _png(c))


def test_switching_loras_equals_fresh_loads(folder, loras):
    pipe = api.load(folder, lora_dir=loras)
    original = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    first = pipe.txt2img("a red apple <lora:style:1>", **GEN)[0]
    second = pipe.txt2img("a red apple <lora:shape:0.5> <lora:style:-0.3:0.6>", **GEN)[0]
    third = pipe.txt2img("a red apple", **GEN)[0]
    assert all(torch.equal(original[k], v) for k, v in pipe.model.state_dict().items())  # no trace left
    fresh1 = api.load(folder, loras=[(str(loras / "style.safetensors"), 1.0)]).txt2img("a red apple", **GEN)[0]
    fresh2_model = checkpoint.load(folder)
    from ldmkit.lora import apply_lora
    from ldmkit.pipeline import GenerationParams, txt2img

    apply_lora(fresh2_model, loras / "sub" / "Shape.safetensors", 0.5)
    apply_lora(fresh2_model, loras / "style.safetensors", -0.3, unet_multiplier=0.6)
    fresh2 = txt2img(fresh2_model, GenerationParams("a red apple", **GEN))[0]
    fresh3 = api.load(folder).txt2img("a red apple", **GEN)[0]
    for got, want in ((first, fresh1), (second, fresh2), (third, fresh3)):
        assert np.array_equal(_png(got), _png(want))
    assert not np.array_equal(_png(first), _png(third)) and not np.array_equal(_png(second), _png(third))
    assert "Lora" not in third.info["parameters"]


@pytest.mark.parametrize("name,message", [("nope", "LoRA not found: 'nope'"), ("../style", "is refused"),
                                          ("sd2only", "SD2.x")])
def test_bad_names_are_warnings_and_generation_goes_on(folder, loras, name, message):
    pipe = api.load(folder, lora_dir=loras)
    base = pipe.txt2img("a red apple", **GEN)[0]
    img = pipe.txt2img(f"a red apple <lora:{name}:1>", **GEN)[0]
    assert np.array_equal(_png(base), _png(img))
    assert "Prompt warnings: " in img.info["parameters"] and message in img.info["parameters"]
    assert any(message in w for w in last_report(pipe.model).warnings)
    pipe.model.lora_strict = True
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        pipe.txt2img(f"a red apple <lora:{name}:1>", **GEN)


def test_refused_names():
    from ldmkit.networks import check_name

    for bad in ("../x", "a/b", "a\\b", "..", "", "C:x", "x\0"):
        with pytest.raises(NetworkNameError):
            check_name(bad)
    assert check_name("my style v2.1") == "my style v2.1"


def test_cli_tag_and_lora_flag_give_the_same_png(folder, loras, tmp_path, capsys):
    from PIL import Image

    from ldmkit.cli import main

    common = ["--model", str(folder), "--steps", "3", "--sampler", "Euler", "--seed", "5", "--width", "24",
              "--height", "16"]
    assert main(["generate", "a red apple", *common, "--lora", f"{loras / 'style.safetensors'}:0.6",
                 "-o", str(tmp_path / "a.png")]) in (0, None)
    assert main(["generate", "a red apple <lora:style:0.6>", *common, "--lora-dir", str(loras),
                 "-o", str(tmp_path / "b.png")]) in (0, None)
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    assert main(["generate", "a red apple <lora:missing:1>", *common, "--lora-dir", str(loras),
                 "-o", str(tmp_path / "c.png")]) in (0, None)
    err = capsys.readouterr().err
    assert "warning: LoRA not found: 'missing'" in err
    code = main(["generate", "a red apple <lora:missing:1>", *common, "--lora-dir", str(loras), "--lora-strict",
                 "-o", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert code == 2 and "LoRA not found: 'missing'" in err and "Traceback" not in err


# ---------------------------------------------------------------- server


def _server_image(client, prompt: str):
    import base64
    import io
    import json

    from PIL import Image

    r = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 3, "sampler_name": "Euler", "seed": 11,
                                               "width": 24, "height": 16, "cfg_scale": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    return np.asarray(img.convert("RGB")), json.loads(body["info"])["infotexts"][0]


def test_server_routes_and_switching_loras(folder, loras, tmp_path):
    """Two requests with different LoRAs, then one without: each image equals a server whose model had that
    LoRA merged at load (a fresh process), and the last equals a server without any."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.lora import apply_lora
    from ldmkit.server.app import create_app

    emb = tmp_path / "emb"
    emb.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, emb / "mystyle.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, emb / "wide.pt")
    (emb / "broken.safetensors").write_bytes(b"garbage")
    app = create_app(checkpoint.load(folder), lora_dir=loras, embeddings_dir=emb, preview_interval=None,
                     device="cpu")
    with TestClient(app) as c:
        names = {item["name"] for item in c.get("/sdapi/v1/loras").json()}
        assert names == {"style", "Shape", "sd2only"}
        e = c.get("/sdapi/v1/embeddings").json()
        assert set(e["loaded"]) == {"mystyle"} and e["loaded"]["mystyle"]["vectors"] == 2
        assert set(e["skipped"]) == {"wide", "broken"} and "broken" in e["skipped"]["broken"]["error"]
        a, info_a = _server_image(c, "a red apple <lora:style:1>")
        b, _ = _server_image(c, "a red apple <lora:shape:0.5>")
        none, info_none = _server_image(c, "a red apple")
        missing, info_missing = _server_image(c, "a red apple <lora:../style:1>")
        assert "Lora hashes" in info_a and "Lora" not in info_none
        assert "is refused" in info_missing and np.array_equal(missing, none)
        save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.diff": torch.zeros(32, 32)},
                  loras / "later.safetensors")
        assert "later" not in {i["name"] for i in c.get("/sdapi/v1/loras").json()}
        assert c.post("/sdapi/v1/refresh-loras").status_code == 200
        assert "later" in {i["name"] for i in c.get("/sdapi/v1/loras").json()}
        (loras / "later.safetensors").unlink()
        assert c.post("/sdapi/v1/refresh-embeddings").status_code == 200
    for image, lora, w in ((a, "style.safetensors", 1.0), (b, "sub/Shape.safetensors", 0.5), (none, None, 0)):
        model = checkpoint.load(folder)
        if lora:
            apply_lora(model, loras / lora, w)
        with TestClient(create_app(model, preview_interval=None, device="cpu")) as fresh:
            assert np.array_equal(image, _server_image(fresh, "a red apple")[0])


def test_files_are_read_once_and_a_repeated_set_changes_nothing(folder, loras, monkeypatch):
    """Switching between LoRAs reads each file once (the parsed files are cached); the same set again does
    no merge at all; an edited file (new mtime) is read again."""
    import os

    from ldmkit import networks

    reads, merges = [], []
    real_read, real_merge = networks.read_lora_file, networks.merge_into
    monkeypatch.setattr(networks, "read_lora_file", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(networks, "merge_into", lambda *a: merges.append(1) or real_merge(*a))
    pipe = api.load(folder, lora_dir=loras)
    for prompt in ("x <lora:style:1>", "x <lora:shape:1>", "x", "x <lora:style:1>", "x <lora:shape:1>"):
        pipe.txt2img(prompt, **GEN)
    assert len(reads) == 2
    n = len(merges)
    pipe.txt2img("y <lora:shape:1>", **GEN)  # the set on the weights already
    assert len(merges) == n
    st = (loras / "style.safetensors").stat()
    os.utime(loras / "style.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    pipe.txt2img("x <lora:style:1>", **GEN)
    assert len(reads) == 3


def test_alias_from_the_trainers_output_name(folder, loras, tmp_path):
    """A1111 also finds a LoRA by the ss_output_name in its header; the file stem wins a clash, and an alias
    two files share names neither."""
    import shutil

    d = tmp_path / "aliased"
    d.mkdir()
    sd, _ = checkpoint.read_state_dict(loras / "style.safetensors")
    save_file(sd, d / "v2_final.safetensors", metadata={"ss_output_name": "Watercolor"})
    save_file(sd, d / "a.safetensors", metadata={"ss_output_name": "twice"})
    save_file(sd, d / "b.safetensors", metadata={"ss_output_name": "twice"})
    shutil.copy(loras / "sub" / "Shape.safetensors", d / "watercolor2.safetensors")
    pipe = api.load(folder, lora_dir=d)
    img = pipe.txt2img("a red apple <lora:watercolor:0.7>", **GEN)[0]
    assert "Lora hashes: \"watercolor: " in img.info["parameters"]
    merged = api.load(folder, loras=[(str(loras / "style.safetensors"), 0.7)]).txt2img("a red apple", **GEN)[0]
    assert np.array_equal(_png(img), _png(merged))
    assert "LoRA not found: 'twice'" in pipe.txt2img("x <lora:twice>", **GEN)[0].info["parameters"]
