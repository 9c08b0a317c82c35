"""train/run_record.py: a resumed run keeps the record it started with (the LoRA and LCM trainers' run files)."""

import json

import pytest

from ldmkit.train import TrainError
from ldmkit.train.lora import _check_record
from ldmkit.train.run_record import check_same_model, keep_record
from ldmkit.train.runner import CHECKPOINT

RECORD = {"init_from": "a.safetensors", "fingerprint": "f00d", "lora_rank": 4, "lora_alpha": 2.0,
          "text_encoder_lora": False, "conv_lora": False}


def _rejects(old: dict, new: dict, run_dir) -> None:
    raise TrainError(f"{run_dir}: {old['lora_rank']} != {new['lora_rank']}")


def test_new_run_writes_the_record_on_the_main_rank_only(tmp_path):
    keep_record(tmp_path / "r1", "x_run.json", RECORD, "lora", _rejects, is_main=False)
    assert not (tmp_path / "r1" / "x_run.json").exists()
    (tmp_path / "r2").mkdir()
    keep_record(tmp_path / "r2", "x_run.json", RECORD, "lora", _rejects, is_main=True)
    assert json.loads((tmp_path / "r2" / "x_run.json").read_text()) == RECORD


def test_resume_checks_the_stored_record(tmp_path):
    (tmp_path / CHECKPOINT).write_bytes(b"")
    with pytest.raises(TrainError, match=r"no x_run\.json; is it a `ldmkit train lcm` run folder\?"):
        keep_record(tmp_path, "x_run.json", RECORD, "lcm", _rejects, is_main=True)
    (tmp_path / "x_run.json").write_text(json.dumps(RECORD))
    with pytest.raises(TrainError, match="4 != 8"):
        keep_record(tmp_path, "x_run.json", {**RECORD, "lora_rank": 8}, "lora", _rejects, is_main=True)
    keep_record(tmp_path, "x_run.json", {**RECORD, "lora_rank": 8}, "lora", lambda *a: None, is_main=True)
    assert json.loads((tmp_path / "x_run.json").read_text())["lora_rank"] == 8


def test_other_weights_are_refused_naming_both_models(tmp_path):
    check_same_model(RECORD, dict(RECORD), "the model R was started on")
    with pytest.raises(TrainError) as e:
        check_same_model(RECORD, {**RECORD, "init_from": "b.safetensors", "fingerprint": "beef"},
                         "the model R was started on")
    assert str(e.value) == ("--model b.safetensors has other weights than the model R was started on "
                            "(a.safetensors); resume with that model")
    with pytest.raises(TrainError, match=f"than the model {tmp_path} was started on"):
        _check_record(RECORD, {**RECORD, "fingerprint": "beef"}, tmp_path)
