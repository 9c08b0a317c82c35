"""``ldmkit batch jobs.jsonl --out out/``: many images from a job file, resumable, locally or on Ray.

Each line of the job file is one ``ldmkit generate`` (:mod:`ldmkit.batch_jobs` reads it into generate's own
Namespace). Every line is checked before the first image (nothing runs while a line is bad, unless
``--skip-invalid``); lines run grouped by model so each model loads once. Image ``i`` of line 42 is
``out/000042.png`` (``000042-i.png`` when a line makes several), written atomically with its infotext, and
``out/manifest.jsonl`` gets a row per image as it completes::

    {"line": 42, "index": 0, "file": "000042.png", "seed": 7, "sha256": "<pixels>", "seconds": 1.9, "job": "<line>"}

``sha256`` is of the decoded pixels (RGB bytes, row by row), so it survives re-encoding; ``job`` is a hash of
the line as written. A rerun keeps a line only when all its files exist and hash as the manifest says (and the
line is unchanged); the rest, including a file cut short by a crash, is generated again. The same :class:`Runner`
makes the images in this process or in each Ray worker (:mod:`ldmkit.batch_ray`), and :class:`Output` writes
them in the driver, so both backends give the same files and manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ldmkit.batch_jobs import Job, JobError, JobReader, generate_parser, read_jobs

MANIFEST = "manifest.jsonl"
LOCK = ".ldmkit-batch.lock"
MAX_LISTED = 20  # errors listed one a line; the rest counted

EXAMPLES = """examples:
  ldmkit batch jobs.jsonl --out out/                  # one JSON object a line: {"prompt": "a red apple", "seed": 1}
  ldmkit batch jobs.jsonl --out out/                  # again after a crash or Ctrl-C: only what is missing
  ldmkit batch jobs.jsonl --out out/ --model sd15.safetensors --skip-invalid
  ldmkit batch jobs.jsonl --out out/ --ray --workers 2                   # Ray on this machine
  ldmkit batch jobs.jsonl --out /shared/out --ray --ray-address auto --workers 8 --gpus-per-worker 1
a line takes ldmkit generate's options with underscores (negative_prompt, sampler, scheduler, steps, cfg_scale,
seed, width, height, batch_size, lora/loras, vae, hires_scale, ...) and A1111's sampler_name, n_iter, enable_hr/hr_*;
docs/scaling.md"""


def pixel_sha256(image) -> str:
    """sha256 of an image's RGB pixels, row by row (not of the PNG file: its metadata and compression vary)."""
    import numpy as np

    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def file_sha256(path: Path) -> str | None:
    """:func:`pixel_sha256` of an image file; None when it is missing, cut short or not an image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return pixel_sha256(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


@dataclass
class Result:
    """One image of a job (or, with ``error``, a job that failed): what a worker hands the driver."""

    line: int
    index: int = 0
    file: str = ""
    seed: int = 0
    sha256: str = ""
    seconds: float = 0.0
    job: str = ""  # the job's digest
    png: bytes = field(default=b"", repr=False)
    error: str = ""
    notes: str = ""  # notes and warnings of the generation, one a line

    def manifest_row(self) -> dict:
        return {"line": self.line, "index": self.index, "file": self.file, "seed": self.seed, "sha256": self.sha256,
                "seconds": round(self.seconds, 3), "job": self.job}


class Runner:
    """Makes a job's images, keeping the last model it loaded (jobs come grouped by model)."""

    def __init__(self, device: str | None = None, low_memory: bool = False, vae_tiling: bool = False):
        self.defaults = generate_parser().parse_args([])
        self.run_level = {"device": device, "low_memory": low_memory, "vae_tiling": vae_tiling}
        self.key: str | None = None
        self.pipe = None

    def namespace(self, job: Job, k: int = 0) -> argparse.Namespace:
        return job.namespace(self.defaults, k, **self.run_level)

    def pipe_for(self, job: Job):
        from ldmkit.cli import load_pipeline

        if job.load_key != self.key:
            self.key = self.pipe = None
            gc.collect()  # the previous model's memory back before the next one loads
            self.pipe = load_pipeline(self.namespace(job))
            self.key = job.load_key
        return self.pipe

    def check(self, job: Job) -> None:
        """What needs the model: sizes, clip skip, memory, model family (raises ValueError)."""
        from ldmkit.cli import _params_from_args
        from ldmkit.core import validate
        from ldmkit.sdxl import check_txt2img

        pipe = self.pipe_for(job)
        validate(_params_from_args(self.namespace(job), pipe.model), pipe.model)
        check_txt2img(pipe.model)

    def run(self, job: Job) -> list[Result]:
        """The job's images, each encoded as the PNG ``ldmkit generate`` writes; a failure is one error Result."""
        from ldmkit.cli import prepare_generation, run_generation
        from ldmkit.infotext import png_bytes
        from ldmkit.networks import last_report

        results: list[Result] = []
        try:
            pipe = self.pipe_for(job)
            for k in range(job.n_iter):
                notes: list[str] = []
                ns = self.namespace(job, k)
                t0 = time.perf_counter()
                images = run_generation(ns, pipe, prepare_generation(ns, pipe, note=notes.append))
                seconds = (time.perf_counter() - t0) / len(images)
                notes += [f"warning: {w}" for w in last_report(pipe.model).warnings]
                for i, img in enumerate(images):
                    index = k * job.batch_size + i
                    results.append(Result(job.line, index, job.file(index), img.info["seed"], pixel_sha256(img),
                                          seconds, job.digest, png_bytes(img), notes="\n".join(notes) if i == 0
                                          else ""))
        except (ValueError, FileNotFoundError) as e:  # GenerationError, CheckpointError: the line's fault
            return [Result(job.line, job=job.digest, error=str(e))]
        return results


# ---------------------------------------------------------------- the output folder (driver side)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Ctrl-C waits until the block is done (an image and its manifest row are written together)."""
    got: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda sig, frame: got.append(sig))
    except ValueError:  # not the main thread
        yield
        return
    if previous == signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, `cmd &`): keep ignoring it here too
        signal.signal(signal.SIGINT, previous)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if got:
            raise KeyboardInterrupt


class Output:
    """The output folder: images, manifest, and the lock that keeps a second batch out of it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = self.folder / MANIFEST
        self._lock = None

    def lock(self) -> None:
        from ldmkit.atomic import remove_leftovers

        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / LOCK, "a+")  # noqa: SIM115  (held until the process ends)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{self.folder}: another ldmkit batch is writing there; wait for it or use another "
                             "--out") from None
        remove_leftovers(self.folder)  # half-written images of a killed run

    def rows(self) -> list[dict]:
        """The manifest's rows; a line cut short by a crash (or otherwise unreadable) is left out."""
        rows = []
        if self.manifest.exists():
            for text in self.manifest.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("line"), int):
                    rows.append(row)
        return rows

    def done(self, jobs: list[Job]) -> set[int]:
        """The lines whose every image exists and hashes as its manifest row says; the manifest is rewritten
        to hold exactly one row per such image (and the rows of lines not in ``jobs``, as they were)."""
        by_line: dict[int, dict[int, dict]] = {}
        for row in self.rows():
            by_line.setdefault(row["line"], {})[row.get("index", 0)] = row  # the last row of an image wins
        done, keep = set(), []
        current = {job.line for job in jobs}
        listed = [(job, [by_line.get(job.line, {}).get(i) for i in range(job.images)]) for job in jobs]
        listed = [(job, rows) for job, rows in listed if all(
            r is not None and r.get("job") == job.digest and r.get("file") == job.file(i) for i, r in enumerate(rows))]
        files = [self.folder / r["file"] for _, rows in listed for r in rows]
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PNG decoding (zlib) runs outside the GIL
            hashes = iter(pool.map(file_sha256, files, chunksize=16))
        for job, rows in listed:
            if all([next(hashes) == r["sha256"] for r in rows]):  # (a list: every hash consumed)
                done.add(job.line)
                keep += rows
        keep += [r for line, rs in by_line.items() if line not in current for r in rs.values()]
        keep.sort(key=lambda r: (r["line"], r.get("index", 0)))
        text = "".join(json.dumps(r) + "\n" for r in keep)
        old = self.manifest.read_text(encoding="utf-8", errors="replace") if self.manifest.exists() else ""
        if text != old:
            from ldmkit.atomic import replacing

            with replacing(self.manifest) as tmp:
                Path(tmp).write_text(text, encoding="utf-8")
        return done

    def write(self, result: Result) -> None:
        """The image file (atomically), then its manifest row (appended, flushed to disk)."""
        from ldmkit.atomic import replacing

        with deferred_interrupt():
            with replacing(self.folder / result.file) as tmp:
                Path(tmp).write_bytes(result.png)
            with open(self.manifest, "a", encoding="utf-8") as f:
                f.write(json.dumps(result.manifest_row()) + "\n")
                f.flush()
                os.fsync(f.fileno())


# ---------------------------------------------------------------- the command


def grouped(jobs: Iterable[Job]) -> list[list[Job]]:
    """Jobs by model (in order of first appearance), in line order within each."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.load_key, []).append(job)
    return list(groups.values())


def _listing(errors: list[JobError]) -> str:
    lines = [f"  {e}" for e in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
    return "\n".join(lines)


def check_with_models(runner: Runner, groups: list[list[Job]]) -> list[JobError]:
    """Each pending line checked against its loaded model, each model loaded once; the last group checked is
    the first to run, so its model stays loaded."""
    errors = []
    for group in reversed(groups):
        try:
            runner.pipe_for(group[0])
        except (ValueError, FileNotFoundError) as e:
            errors += [JobError(job.line, f"model: {e}") for job in group]
            continue
        for job in group:
            try:
                runner.check(job)
            except (ValueError, FileNotFoundError) as e:
                errors.append(JobError(job.line, str(e)))
    return sorted(errors, key=lambda e: e.line)


def validated(args: argparse.Namespace) -> list[Job]:
    """The job file read and checked: its valid jobs (every line valid unless --skip-invalid)."""
    jobs, errors = read_jobs(args.jobs, JobReader(args.model))
    if errors and not args.skip_invalid:
        raise ValueError(f"{len(errors)} invalid line(s) in {args.jobs}; nothing was generated (fix them, or "
                         f"pass --skip-invalid to run the rest):\n{_listing(errors)}")
    if errors:
        print(f"skipping {len(errors)} invalid line(s):\n{_listing(errors)}", file=sys.stderr)
    return jobs


def cmd_batch(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if not args.ray and (args.ray_address or args.workers != 1 or args.gpus_per_worker):
        raise ValueError("--ray-address, --workers and --gpus-per-worker are for the Ray backend: add --ray")
    if args.ray:
        from ldmkit.batch_ray import require_ray

        require_ray()  # a clear line before any work when Ray is missing
    jobs = validated(args)
    output = Output(args.out)
    output.lock()
    done = output.done(jobs)
    pending = [job for job in jobs if job.line not in done]
    groups = grouped(pending)
    runner = None
    if not args.ray and pending:  # (Ray workers check their lines when they load the model)
        runner = Runner(args.device, args.low_memory, args.vae_tiling)
        errors = check_with_models(runner, groups)
        if errors and not args.skip_invalid:
            raise ValueError(f"{len(errors)} line(s) cannot run with their model; nothing was generated (fix "
                             f"them, or pass --skip-invalid):\n{_listing(errors)}")
        bad = {e.line for e in errors}
        if bad:
            print(f"skipping {len(bad)} line(s):\n{_listing(errors)}", file=sys.stderr)
        groups = [g for g in ([j for j in group if j.line not in bad] for group in groups) if g]
        pending = [job for group in groups for job in group]
    total = sum(job.images for job in pending)
    print(f"{len(jobs)} job(s): {len(done)} already done, {len(pending)} to run ({total} image(s), "
          f"{len(groups)} model(s)) -> {output.folder}", file=sys.stderr)
    if not pending:
        return
    bar = tqdm(total=total, desc="batch", unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
    failed: list[JobError] = []
    written = 0
    try:
        if args.ray:
            from ldmkit.batch_ray import run_ray

            results = run_ray([job for group in groups for job in group], args)
        else:
            results = (r for group in groups for job in group for r in runner.run(job))
        for result in results:
            if result.error:
                failed.append(JobError(result.line, result.error))
                bar.write(f"line {result.line}: {result.error}")
                continue
            for note in filter(None, result.notes.split("\n")):
                bar.write(f"line {result.line}: {note}")
            output.write(result)
            written += 1
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(f"stopped: {written} of {total} image(s) written to {output.folder}; run the same command again "
              "to make the rest", file=sys.stderr)
        raise
    bar.close()
    if failed:
        raise ValueError(f"{len(failed)} line(s) failed (the other {written} image(s) are written; fix them and "
                         f"run the same command again):\n{_listing(sorted(failed, key=lambda e: e.line))}")


def register(add) -> None:
    p = add("batch", "many images from a JSONL job file (one generate per line), resumable; locally or on Ray",
            EXAMPLES)
    p.add_argument("jobs", help="JSONL file: one JSON object a line, {\"prompt\": ..., any generate option}")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: 000042.png for line 42, and manifest.jsonl")
    p.add_argument("--model", default=None, help="model for the lines that name none (default: emoji)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="run the valid lines even if some are invalid (they are listed); default: run nothing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--low-memory", action="store_true", help="as ldmkit generate --low-memory")
    p.add_argument("--vae-tiling", action="store_true", help="as ldmkit generate --vae-tiling")
    r = p.add_argument_group("Ray (pip install 'ldmkit[ray]')")
    r.add_argument("--ray", action="store_true", help="run the jobs on Ray Data (a local Ray without --ray-address)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="cluster to join: auto (the cluster this machine belongs to) or ray://HOST:10001")
    r.add_argument("--workers", type=int, default=1, help="Ray workers, each with its own copy of the model")
    r.add_argument("--gpus-per-worker", type=float, default=0, metavar="G",
                   help="GPUs each worker reserves (1: one GPU per model copy; 0.5: two copies share a GPU)")
    p.set_defaults(func=cmd_batch)


def manifest_rows(folder: str | Path) -> list[dict]:
    """The manifest of an output folder (for tests and scripts)."""
    return Output(folder).rows()
