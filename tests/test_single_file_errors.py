"""SD1 and SDXL single files name themselves in every key, config or metadata error (one helper,
checkpoint.errors_naming / from_single_file, for both loaders)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmkit import checkpoint, checkpoint_sdxl
from ldmkit.checkpoint import CheckpointError
from ldmkit.config import TINY, TINY_SDXL
from ldmkit.model import StableDiffusion
from ldmkit.recommended import RECOMMENDED_METADATA_KEY
from ldmkit.sdxl import StableDiffusionXL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    torch.manual_seed(0)
    checkpoint.save_single_file(StableDiffusion(TINY).eval(), d / "sd1.safetensors")
    checkpoint_sdxl.save_sdxl_single_file(StableDiffusionXL(TINY_SDXL).eval(), d / "xl.safetensors")
    return d


def _rewrite(src, dst, meta=None, extra=None):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = {**f.metadata(), **(meta or {})}
    save_file({**load_file(src), **(extra or {})}, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("family", ["sd1", "xl"])
def test_recommended_metadata_and_model_type_errors_name_the_file(files, family, tmp_path):
    bad = _rewrite(files / f"{family}.safetensors", tmp_path / f"{family}-bad.safetensors",
                   meta={RECOMMENDED_METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_single_file(bad)
    assert str(e.value).startswith(f"{bad}: metadata 'ldmkit.recommended' is not valid JSON"), e.value
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_single_file(files / f"{family}.safetensors", model_type="no-such-type")
    assert "unknown" in str(e.value) and "no-such-type" in str(e.value)
    good = checkpoint.load_single_file(_rewrite(files / f"{family}.safetensors", tmp_path / "ok.safetensors",
                                                meta={RECOMMENDED_METADATA_KEY: json.dumps({"steps": 3})}))
    assert (good.source_name, good.source_path, good.recommended.steps) == ("ok", str(tmp_path / "ok.safetensors"), 3)


def test_an_unknown_key_names_the_file(files, tmp_path):
    bad = _rewrite(files / "xl.safetensors", tmp_path / "xl-extra.safetensors",
                   extra={"conditioner.embedders.7.model.whatever": torch.zeros(1)})
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_single_file(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value), e.value
