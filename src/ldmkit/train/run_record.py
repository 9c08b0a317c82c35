"""The record a trainer that starts from a model keeps beside its checkpoint (``<kind>_run.json``: the model's
path and weight fingerprint, and the settings that shape the trained weights), checked when the run resumes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldmkit.train.config import TrainError
from ldmkit.train.runner import CHECKPOINT

Record = dict[str, Any]


def fingerprint(model: Any) -> str:
    """An identity of the model's weights from a few whole tensors (hashing a 4 GB file is slow)."""
    h = hashlib.sha256()
    for part in (model.unet, model.text_encoder):
        params = list(part.parameters())
        for p in (params[0], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def keep_record(run_dir: Path, run_file: str, record: Record, command: str,
                check: Callable[[Record, Record, Path], None], is_main: bool) -> None:
    """A resumed run (a checkpoint in ``run_dir``) must hold a ``run_file`` that ``check(old, record, run_dir)``
    accepts (it raises TrainError otherwise); then the main rank writes ``record`` there."""
    from ldmkit.checkpoint import atomic_write_text

    if (run_dir / CHECKPOINT).exists():
        if not (run_dir / run_file).exists():
            raise TrainError(f"{run_dir}: no {run_file}; is it a `ldmkit train {command}` run folder?")
        check(read_record(run_dir / run_file), record, run_dir)
    if is_main:
        atomic_write_text(run_dir / run_file, json.dumps(record, indent=1) + "\n")


def read_record(path: Path) -> Record:
    """A run record as written by :func:`keep_record`, or a TrainError naming the file (damaged JSON, another
    kind of content) instead of a JSON or TypeError traceback on resume."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        old, why = None, " ".join(str(e).split())
    else:
        why = "not the JSON object ldmkit writes, with init_from and fingerprint"
    if not isinstance(old, dict) or not {"init_from", "fingerprint"} <= old.keys():
        raise TrainError(f"{path}: damaged run record ({why}); restore it, or start a new run with another --out")
    return old


def check_same_model(old: Record, new: Record, started: str) -> None:
    """The model a run resumes with has the weights it started from (``started``: "the model RUN was started
    on"), or a TrainError naming both."""
    if old["fingerprint"] != new["fingerprint"]:
        raise TrainError(f"--model {new['init_from']} has other weights than {started} ({old['init_from']}); "
                         "resume with that model")
