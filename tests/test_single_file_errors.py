"""SD1 and SDXL single files name themselves in every key, config or metadata error (one helper,
checkpoint.errors_naming / from_single_file, for both loaders)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_sdxl_errors import models  # noqa: F401 - the tiny sd15 / xl / xl-refiner files

from ldmkit import checkpoint
from ldmkit.checkpoint import CheckpointError
from ldmkit.recommended import RECOMMENDED_METADATA_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


def _rewrite(src, dst, meta=None, extra=None):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = {**f.metadata(), **(meta or {})}
    save_file({**load_file(src), **(extra or {})}, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("family", ["sd15", "xl"])
def test_recommended_metadata_and_model_type_errors_name_the_file(models, family, tmp_path):  # noqa: F811
    bad = _rewrite(models / f"{family}.safetensors", tmp_path / f"{family}-bad.safetensors",
                   meta={RECOMMENDED_METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_single_file(bad)
    assert str(e.value).startswith(f"{bad}: metadata 'ldmkit.recommended' is not valid JSON"), e.value
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_single_file(models / f"{family}.safetensors", model_type="no-such-type")
    assert "unknown" in str(e.value) and "no-such-type" in str(e.value)
    good = checkpoint.load_single_file(_rewrite(models / f"{family}.safetensors", tmp_path / "ok.safetensors",
                                                meta={RECOMMENDED_METADATA_KEY: json.dumps({"steps": 3})}))
    assert (good.source_name, good.source_path, good.recommended.steps) == ("ok", str(tmp_path / "ok.safetensors"), 3)


def test_an_unknown_key_names_the_file(models, tmp_path):  # noqa: F811
    bad = _rewrite(models / "xl.safetensors", tmp_path / "xl-extra.safetensors",
                   extra={"conditioner.embedders.7.model.whatever": torch.zeros(1)})
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_single_file(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value), e.value
