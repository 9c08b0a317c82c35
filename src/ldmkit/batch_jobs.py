"""``ldmkit batch`` job files: one JSON object a line, each read into the Namespace ``ldmkit generate`` parses.

A line names its options as ``ldmkit generate``'s flags, with underscores (``negative_prompt``, ``cfg_scale``,
``lora`` or ``loras``, ``hires_scale``, ...); a few of A1111's txt2img field names are accepted too
(:data:`A1111_NAMES`, ``n_iter``, ``enable_hr``). The values are checked against the generate parser's own
argument types and choices, so a job line and the command line cannot drift apart: the Namespace made here goes
through the same ``cli.load_pipeline`` / ``prepare_generation`` / ``run_generation`` as ``ldmkit generate``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ldmkit.core import MAX_SEED

# A1111 /sdapi/v1/txt2img field -> generate's option (the same meaning)
A1111_NAMES = {"sampler_name": "sampler", "sampler_index": "sampler", "sd_model_checkpoint": "model",
               "loras": "lora", "hr_scale": "hires_scale", "hr_upscaler": "hires_upscaler",
               "hr_second_pass_steps": "hires_steps"}
# options of ``ldmkit generate`` that are the batch's, not a line's
RUN_LEVEL = {"device": "--device", "low_memory": "--low-memory", "vae_tiling": "--vae-tiling"}
NOT_IN_A_LINE = {"output": "the batch names each file after its line (out/000042.png)",
                 "preview": "a batch shows a progress bar, not previews", "preview_vae": "see preview",
                 "from_png": "copy the image's settings into the line instead", "help": "not an option"}
# options that name files or folders: checked to exist before anything runs
FILE_OPTIONS = ("vae", "lora", "lora_dir", "embeddings_dir", "refiner", "controlnet", "control_image",
                "upscaler_dir")
LOAD_OPTIONS = ("model", "vae", "lora", "lora_dir", "embeddings_dir", "model_type", "lora_strict")


class JobError(ValueError):
    """A job line that cannot run; the message starts with its line number."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class Job:
    """One line of a job file: generate's options as given (plus the batch's --model), its seed resolved."""

    line: int  # 1-based, as an editor numbers it
    options: dict  # generate's option names (dests) -> JSON values
    seed: int  # resolved: never -1
    n_iter: int = 1  # A1111's batch count: n_iter batches of batch_size images, seeds seed + k * batch_size
    digest: str = ""  # sha256 of the options as written (seed -1 included): a changed line is generated again

    @property
    def batch_size(self) -> int:
        return int(self.options.get("batch_size", 1))

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    def file(self, index: int) -> str:
        """The output file of image ``index`` (0-based) of this line: 000042.png, or 000042-1.png of several."""
        return f"{self.line:06d}.png" if self.images == 1 else f"{self.line:06d}-{index}.png"

    @property
    def load_key(self) -> str:
        """What loading the model depends on: jobs with equal keys share one loaded model."""
        return json.dumps({k: self.options.get(k) for k in LOAD_OPTIONS}, sort_keys=True)

    def namespace(self, defaults: argparse.Namespace, k: int = 0, **run_level: object) -> argparse.Namespace:
        """The Namespace ``ldmkit generate`` would parse for batch ``k`` of this line."""
        ns = copy.deepcopy(defaults)
        for key, value in self.options.items():
            setattr(ns, key, list(value) if isinstance(value, list) else value)
        for key, value in run_level.items():
            setattr(ns, key, value)
        ns.command = "generate"
        ns.seed = (self.seed + k * self.batch_size) % (MAX_SEED + 1)
        return ns

    def to_json(self) -> str:
        return json.dumps({"line": self.line, "options": self.options, "seed": self.seed, "n_iter": self.n_iter,
                           "digest": self.digest})

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


def generate_parser() -> argparse.ArgumentParser:
    """``ldmkit generate``'s own argument parser."""
    from ldmkit.cli import build_parser

    for action in build_parser("generate")._actions:  # (without the feature modules' subcommands)
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["generate"]
    raise RuntimeError("ldmkit's parser has no generate command")


class JobReader:
    """Reads job lines with ``ldmkit generate``'s parser: its option names, types, choices and defaults."""

    def __init__(self, model: str | None = None):
        self.parser = generate_parser()
        self.defaults = self.parser.parse_args([])
        self.actions = {a.dest: a for a in self.parser._actions if a.dest not in ("help", "command")}
        self.model = model  # the batch's --model: for lines that name none

    def read(self, text: str, line: int) -> Job:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise JobError(line, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise JobError(line, f"a job is a JSON object ({{\"prompt\": ...}}), got {type(obj).__name__}")
        written = json.dumps(obj, sort_keys=True)
        options, n_iter = self._options(obj, line)
        if self.model is not None:
            options.setdefault("model", self.model)
        seed = options.pop("seed", -1)
        check_static(options, line)
        if seed < 0:
            seed = random.randint(0, MAX_SEED)
        elif seed > MAX_SEED:
            raise JobError(line, f"seed {seed} is larger than {MAX_SEED}; use -1 for a random one")
        digest = hashlib.sha256((written + json.dumps(options.get("model"))).encode()).hexdigest()
        return Job(line, options, seed, n_iter, digest)

    def _options(self, obj: dict, line: int) -> tuple[dict, int]:
        obj = dict(obj)
        n_iter = obj.pop("n_iter", 1)
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise JobError(line, f"n_iter must be an integer of at least 1, got {n_iter!r}")
        _enable_hr(obj, line)
        options: dict = {}
        for key, value in obj.items():
            dest = A1111_NAMES.get(key, key)
            if dest in RUN_LEVEL:
                raise JobError(line, f"{key!r} is set for the whole batch: ldmkit batch ... {RUN_LEVEL[dest]}")
            if dest in NOT_IN_A_LINE:
                raise JobError(line, f"{key!r} cannot be set in a job line: {NOT_IN_A_LINE[dest]}")
            action = self.actions.get(dest)
            if action is None:
                close = difflib.get_close_matches(key, [*self._line_options(), *A1111_NAMES], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise JobError(line, f"unknown option {key!r}; {hint}a line takes ldmkit generate's options with "
                                     f"underscores: {', '.join(sorted(self._line_options()))}")
            if dest in options:
                raise JobError(line, f"{key!r} gives {dest!r} a second time")
            options[dest] = _value(action, key, value, line)
        if not isinstance(options.get("prompt"), str) or not options["prompt"].strip():
            raise JobError(line, 'no prompt: every line needs "prompt": "..."')
        return options, n_iter

    def _line_options(self) -> list[str]:
        return [d for d in self.actions if d not in RUN_LEVEL and d not in NOT_IN_A_LINE]


def _enable_hr(obj: dict, line: int) -> None:
    """A1111's hires switch: enable_hr true turns the hr_* fields on (hr_scale 2 unless given, and
    denoising_strength is the second pass's); false drops them, as A1111 ignores them then."""
    if "enable_hr" not in obj:
        return
    on = obj.pop("enable_hr")
    if not isinstance(on, bool):
        raise JobError(line, f"enable_hr must be true or false, got {on!r}")
    hr = [k for k in obj if k.startswith("hr_") or k == "denoising_strength"]
    if not on:
        for k in hr:
            obj.pop(k)
        return
    if "hr_scale" not in obj and "hires_scale" not in obj and "hires_resize" not in obj:
        obj["hr_scale"] = 2.0
    if "denoising_strength" in obj:
        obj["hires_denoise"] = obj.pop("denoising_strength")


def _value(action: argparse.Action, key: str, value: object, line: int) -> object:
    """A JSON value for ``action`` (a flag of generate), checked as strictly as argparse checks text."""
    if action.nargs == 0:  # store_true flags
        if not isinstance(value, bool):
            raise JobError(line, f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [_scalar(action, key, v, line) for v in values]
    return _scalar(action, key, value, line)


def _scalar(action: argparse.Action, key: str, value: object, line: int) -> object:
    kind = action.type or str
    if value is None and action.default is None:
        return None
    if kind is str:
        if not isinstance(value, str):
            raise JobError(line, f"{key} must be a string, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(line, f"{key} must be an integer, got {value!r}")
    else:  # float, guards.finite_float
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JobError(line, f"{key} must be a number, got {value!r}")
        try:
            value = kind(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise JobError(line, f"{key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise JobError(line, f"{key} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def check_static(options: dict, line: int) -> None:
    """Everything about a line that can be checked without loading its model: names, ranges, files."""
    from ldmkit.api import BUILTIN_MODELS, BUILTIN_VAES, resolve_model_path
    from ldmkit.checkpoint import CheckpointError
    from ldmkit.controlnet import check_args
    from ldmkit.samplers import sampler_spec
    from ldmkit.schedules import SCHEDULES, schedule_short_name

    try:
        if options.get("sampler") is not None:
            sampler_spec(options["sampler"])
        scheduler = options.get("scheduler")
        if scheduler is not None and schedule_short_name(scheduler) not in (*SCHEDULES, "automatic"):
            raise ValueError(f"unknown scheduler {scheduler!r}; valid schedulers: {', '.join(SCHEDULES)}")
        for name, low in (("steps", 1), ("batch_size", 1), ("width", 8), ("height", 8)):
            v = options.get(name)
            if v is not None and v < low:
                raise ValueError(f"{name} must be at least {low}, got {v}")
        check_args(argparse.Namespace(**{k: options.get(k, []) for k in
                                         ("controlnet", "control_image", "control_weight", "control_start",
                                          "control_end", "preprocessor")}))
        model = options.get("model")
        path = resolve_model_path(model)
        if model not in BUILTIN_MODELS and not path.exists():
            raise ValueError(f"model {model}: no such file or folder")
        for name in FILE_OPTIONS:
            values = options.get(name)
            for v in values if isinstance(values, list) else [values]:
                if v is None or (name == "vae" and v in BUILTIN_VAES) or (name == "refiner" and v in BUILTIN_MODELS):
                    continue
                if name == "lora":
                    from ldmkit.lora import parse_lora_arg

                    v = parse_lora_arg(v)[0]
                if not Path(v).exists():
                    raise ValueError(f"{name} {v}: no such file or folder")
    except (ValueError, CheckpointError) as e:
        raise JobError(line, str(e)) from None


def read_jobs(path: str | Path, reader: JobReader) -> tuple[list[Job], list[JobError]]:
    """Every job of a JSONL file, and every line's error (blank lines are skipped, still counted)."""
    jobs, errors = [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such job file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"{path}: cannot read the job file ({e.strerror})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            jobs.append(reader.read(line, n))
        except JobError as e:
            errors.append(e)
    return jobs, errors
