"""Hardening items 7 and 9 (issue 15): bad model and image files give one-line errors naming the file and
the problem (CLI exit 2, server 4xx), never tracebacks or 500s; non-finite weights are refused at load."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldmkit import checkpoint, cli
from ldmkit.checkpoint import CheckpointError
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_config(cfg: dict, **changes) -> str:
    cfg = json.loads(json.dumps(cfg))
    for path, value in changes.items():
        d = cfg
        *parents, last = path.split("__")
        for p in parents:
            d = d[p]
        d[last] = value
    return json.dumps(cfg)


# name -> (how to make it from the good file's tensors and config, what the error must say)
BAD_FILES = {
    "integer": (lambda sd, cfg: ({k: (v * 100).to(torch.int32) for k, v in sd.items()}, {}), "int32"),
    "nan": (lambda sd, cfg: ({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, {}), "NaN or infinite"),
    "one_inf": (lambda sd, cfg: ({**sd, next(iter(sd)): torch.full_like(next(iter(sd.values())), float("inf"))},
                                 {}), "NaN or infinite"),
    "meta_list": (lambda sd, cfg: (sd, {"ldmkit.config": "[1, 2]"}), "ldmkit.config"),
    "meta_str": (lambda sd, cfg: (sd, {"ldmkit.config": _with_config(cfg, unet__model_channels="32")}),
                 "model_channels"),
    "meta_section": (lambda sd, cfg: (sd, {"ldmkit.config": _with_config(cfg, vae="big")}), "vae"),
    "meta_int_list": (lambda sd, cfg: (sd, {"ldmkit.config": _with_config(cfg, unet__channel_mult=5)}),
                      "channel_mult"),
    "meta_negative": (lambda sd, cfg: (sd, {"ldmkit.config": _with_config(cfg, unet__num_heads=-2)}), "num_heads"),
    "meta_json": (lambda sd, cfg: (sd, {"ldmkit.config": "{not json"}), "ldmkit.config"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_models")
    torch.manual_seed(0)
    checkpoint.save_single_file(StableDiffusion(TINY), d / "good.safetensors")
    sd = load_file(d / "good.safetensors")
    with safe_open(d / "good.safetensors", "pt") as f:
        cfg = json.loads(f.metadata()["ldmkit.config"])
    for name, (make, _) in BAD_FILES.items():
        tensors, meta = make(sd, cfg)
        save_file(tensors, d / f"{name}.safetensors", metadata=meta or {"ldmkit.config": json.dumps(cfg)})
    return d


def _one_line(msg: str, path: Path) -> None:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    assert path.name in msg, msg


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_load_names_the_file_and_the_problem(files, name):
    path = files / f"{name}.safetensors"
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    _one_line(str(e.value), path)
    assert BAD_FILES[name][1] in str(e.value)


@pytest.mark.parametrize("name", ["integer", "meta_str", "nan"])
def test_cli_model_one_line_exit_2(files, name, capsys, tmp_path):
    path = files / f"{name}.safetensors"
    rc = cli.main(["generate", "x", "--model", str(path), "--steps", "1", "--width", "16", "--height", "16",
                   "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len([line for line in err if line.startswith("ldmkit: error")]) == 1 and "Traceback" not in "".join(err)
    _one_line([line for line in err if line.startswith("ldmkit: error")][0], path)


def _malformed_diffusers(tmp_path: Path, config) -> Path:
    folder = tmp_path / "diffusers"
    if not folder.exists():
        torch.manual_seed(0)
        checkpoint.save_diffusers(StableDiffusion(TINY), folder)
    (folder / "unet" / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


@pytest.mark.parametrize("config", ["[]", "{oops", {"block_out_channels": "wide", "cross_attention_dim": 32},
                                    {"_class_name": "UNet2DConditionModel", "layers_per_block": [1, 2]}])
def test_malformed_diffusers_config(tmp_path, config):
    folder = _malformed_diffusers(tmp_path, config)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(folder)
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg, msg


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that claims w x h pixels (IHDR) with no image data: PIL reads the size without decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_huge_init_image_cli(files, tmp_path, capsys):
    big = tmp_path / "huge.png"
    _png_header_only(big, 30000, 30000)
    rc = cli.main(["img2img", "x", "--init-image", str(big), "--model", str(files / "good.safetensors"),
                   "--steps", "1", "--width", "16", "--height", "16", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "huge.png" in err and "900000000 pixels" in err, err
    assert len(err.strip().splitlines()) == 1


def test_server_models_dir_bad_files_are_4xx(files):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    c = TestClient(create_app(files / "good.safetensors", models_dir=files))
    titles = {m["model_name"]: m["title"] for m in c.get("/sdapi/v1/sd-models").json()}
    for name in ("integer", "meta_str", "meta_list", "nan"):
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[name]})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert f"{name}.safetensors" in r.text, r.text
    r = c.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 16, "height": 16})  # the good model still serves
    assert r.status_code == 200, r.text


def test_model_file_extensions_are_case_insensitive(files, tmp_path):
    """Hardening 10: ``Upper.SAFETENSORS`` is listed by the server and must load like ``upper.safetensors``
    (its stored config and recommendations read from the header too)."""
    upper = tmp_path / "Upper.SAFETENSORS"
    upper.write_bytes((files / "good.safetensors").read_bytes())
    model = checkpoint.load(upper)
    assert model.cfg.unet == TINY.unet
    from ldmkit.recommended import file_recommended

    assert file_recommended(upper) == file_recommended(files / "good.safetensors")
    ckpt = tmp_path / "Old.CKPT"
    torch.save({"state_dict": load_file(files / "good.safetensors")}, ckpt)
    assert checkpoint.read_state_dict(ckpt)[0].keys() == load_file(files / "good.safetensors").keys()
