"""``ldmkit batch``: job lines read as ``ldmkit generate`` reads its flags, a run killed with SIGKILL and rerun
gives every image exactly once and each equal to ``ldmkit generate`` of its line, invalid lines stop the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit import cli
from ldmkit.batch import MANIFEST, file_sha256, manifest_rows
from ldmkit.batch_jobs import JobReader, generate_parser

pytestmark = pytest.mark.usefixtures("one_thread")

# emoji model, few steps; different samplers, schedules and CFG scales, a batch of two, a second model file
JOBS = [
    {"prompt": "a red apple", "seed": 11, "steps": 3},
    {"prompt": "a smiling face", "seed": 12, "steps": 3, "sampler_name": "Euler a", "cfg_scale": 5},
    {"prompt": "a cat", "negative_prompt": "blurry", "seed": 13, "steps": 4, "sampler": "DPM++ 2M",
     "scheduler": "karras"},
    {"prompt": "a dog", "seed": 14, "steps": 3, "batch_size": 2},
    {"prompt": "a green tree", "seed": 15, "steps": 3, "sampler": "DDIM", "eta": 0.5},
    {"prompt": "a blue car", "seed": 16, "steps": 3, "model": "emoji-lcm"},
]


def write_jobs(path: Path, jobs: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(j) for j in jobs]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def generate_argv(job: dict) -> list[str]:
    """The ``ldmkit generate`` command line of a job (written out here by hand, independent of batch_jobs)."""
    flags = {"sampler_name": "--sampler"}
    argv = ["generate", job["prompt"]]
    for key, value in job.items():
        if key != "prompt":
            argv += [flags.get(key, "--" + key.replace("_", "-")), str(value)]
    return argv


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_a_line_is_the_namespace_generate_parses(tmp_path):
    """Every option, CLI-named or A1111-named, lands where generate's own parser puts the flag."""
    lora = tmp_path / "style.safetensors"
    lora.touch()  # (checked to exist before anything runs)
    line = {"prompt": "a red apple", "negative_prompt": "green", "sampler_name": "Euler a", "scheduler": "karras",
            "steps": 7, "cfg_scale": 4.5, "seed": 3, "width": 64, "height": 48, "batch_size": 2, "clip_skip": 2,
            "loras": f"{lora}:0.5", "tiling": True, "deepcache": 2, "hires_scale": 1.5}
    argv = ["a red apple", "--negative-prompt", "green", "--sampler", "Euler a", "--scheduler", "karras", "--steps",
            "7", "--cfg-scale", "4.5", "--seed", "3", "--width", "64", "--height", "48", "--batch-size", "2",
            "--clip-skip", "2", "--lora", f"{lora}:0.5", "--tiling", "--deepcache", "2", "--hires-scale",
            "1.5"]
    reader = JobReader()
    job = reader.read(json.dumps(line), 1)
    expected = generate_parser().parse_args(argv)
    expected.command = "generate"
    assert vars(job.namespace(reader.defaults)) == vars(expected)
    # A1111's batch count: n_iter batches, the k-th starting at seed + k * batch_size (as the server does)
    job = reader.read(json.dumps({"prompt": "x", "seed": 3, "batch_size": 2, "n_iter": 3}), 2)
    assert job.images == 6 and job.namespace(reader.defaults, 2).seed == 7
    assert [job.file(i) for i in (0, 5)] == ["000002-0.png", "000002-5.png"]
    hr = reader.read(json.dumps({"prompt": "x", "enable_hr": True, "denoising_strength": 0.4}), 3).options
    assert hr["hires_scale"] == 2.0 and hr["hires_denoise"] == 0.4
    assert "hires_scale" not in reader.read(json.dumps({"prompt": "x", "enable_hr": False, "hr_scale": 3}), 4).options
    # seed -1: a random seed, resolved when the line is read (the workers and the manifest get it)
    assert 0 <= reader.read('{"prompt": "x"}', 5).seed <= 2**32 - 1


def test_invalid_lines_are_listed_and_nothing_is_generated(tmp_path, capsys):
    bad = [
        {"prompt": "a red apple", "seed": 1, "steps": 2},
        {"prompt": "a cat", "steps": "20"},  # 2: wrong type
        {"negative_prompt": "x"},  # 3: no prompt
        {"prompt": "x", "sampler": "Eulr"},  # 4: bad sampler
        {"prompt": "x", "model": str(tmp_path / "missing.safetensors")},  # 5: missing model file
        {"prompt": "x", "colour": "red"},  # 6: unknown key
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", bad)
    with open(jobs, "a") as f:
        f.write("{not json\n")  # 7
    out = tmp_path / "out"
    assert cli.main(["batch", str(jobs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "6 invalid line(s)" in err and "nothing was generated" in err
    for n, what in [(2, "steps must be an integer"), (3, "no prompt"), (4, "unknown sampler 'Eulr'"),
                    (5, f"model {tmp_path / 'missing.safetensors'}: no such file"), (6, "unknown option 'colour'"),
                    (7, "not valid JSON")]:
        assert f"line {n}: {what}" in err
    assert "line 1:" not in err and not out.exists()
    # a line its model cannot run (clip skip beyond the text encoder): found before any image too
    jobs = write_jobs(tmp_path / "jobs2.jsonl", [bad[0], {"prompt": "x", "clip_skip": 40}])
    assert cli.main(["batch", str(jobs), "--out", str(out)]) == 2
    assert "line 2: clip skip 40 is out of range" in capsys.readouterr().err
    assert not list(out.glob("*.png"))
    # --skip-invalid: the valid line runs
    assert cli.main(["batch", str(jobs), "--out", str(out), "--skip-invalid"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000001.png"]


def _kill_when(proc: subprocess.Popen, manifest: Path, rows: int, timeout: float = 120) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if manifest.exists() and manifest.read_text().count("\n") >= rows:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return manifest.read_text().count("\n")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the batch ended (rc {proc.returncode}) or stalled before writing {rows} manifest rows")


def test_sigkill_then_rerun_gives_every_image_once_equal_to_generate(tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS, blank_after=3)  # a blank line: line numbers still count it
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", "batch", str(jobs), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = _kill_when(proc, out / MANIFEST, 2)
    total = 1 + sum(j.get("batch_size", 1) for j in JOBS)
    assert killed_at < total
    assert cli.main(["batch", str(jobs), "--out", str(out)]) == 0
    assert "already done" in capsys.readouterr().err
    rows = manifest_rows(out)
    lines = [n for n in range(1, len(JOBS) + 2) if n != 4]  # line 4 is blank
    expected = {(n, i) for n, j in zip(lines, JOBS, strict=True) for i in range(j.get("batch_size", 1))}
    assert sorted((r["line"], r["index"]) for r in rows) == sorted(expected)  # each image exactly once
    assert len(rows) == len(expected) == total - 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for r in rows:
        assert file_sha256(out / r["file"]) == r["sha256"]
    # each image equals `ldmkit generate` of its line (its infotext too)
    for n, job in zip(lines, JOBS, strict=True):
        ref = tmp_path / f"ref{n}.png"
        assert cli.main([*generate_argv(job), "-o", str(ref)]) == 0
        refs = [ref] if job.get("batch_size", 1) == 1 else [ref.with_name(f"ref{n}-{job['seed'] + i}.png")
                                                              for i in range(job["batch_size"])]
        for i, r in enumerate(refs):
            name = f"{n:06d}.png" if len(refs) == 1 else f"{n:06d}-{i}.png"
            np.testing.assert_array_equal(pixels(out / name), pixels(r))
            with Image.open(out / name) as a, Image.open(r) as b:
                assert a.info["parameters"] == b.info["parameters"]
    # a file cut short and a torn manifest row: that line alone is made again, the same image
    before = {r["file"]: r["sha256"] for r in rows}
    target = out / "000002.png"
    target.write_bytes(target.read_bytes()[:200])
    with open(out / MANIFEST, "a") as f:
        f.write('{"line": 3, "ind')
    capsys.readouterr()
    assert cli.main(["batch", str(jobs), "--out", str(out)]) == 0
    assert f"{len(JOBS) - 1} already done, 1 to run" in capsys.readouterr().err
    after = manifest_rows(out)
    assert {r["file"]: r["sha256"] for r in after} == before and len(after) == len(rows)
    # an edited line is generated again; the others stay
    edited = [dict(j) for j in JOBS]
    edited[0]["seed"] = 99
    write_jobs(jobs, edited, blank_after=3)
    assert cli.main(["batch", str(jobs), "--out", str(out)]) == 0
    assert "1 to run" in capsys.readouterr().err
    assert [r["seed"] for r in manifest_rows(out) if r["line"] == 1] == [99]


def test_second_batch_on_the_same_folder_is_refused(tmp_path, capsys):
    from ldmkit.batch import Output

    first = Output(tmp_path / "out")
    first.lock()
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:1])
    assert cli.main(["batch", str(jobs), "--out", str(tmp_path / "out")]) == 2
    assert "another ldmkit batch is writing there" in capsys.readouterr().err


def test_ctrl_c_stops_between_images(tmp_path):
    """SIGINT: the image being made is dropped, every written image has its manifest row, exit status 130."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", "batch", str(jobs), "--out", str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            # Ctrl-C as a terminal delivers it, even when the suite runs in the background (`cmd &`
                            # starts children with SIGINT ignored, and the batch then rightly keeps ignoring it)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.monotonic()
    while not ((out / MANIFEST).exists() and (out / MANIFEST).read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() - t0 < 120, "the batch ended before its first image"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "stopped: " in err and "run the same command again" in err and "Traceback" not in err
    rows = manifest_rows(out)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in rows)
    assert all(file_sha256(out / r["file"]) == r["sha256"] for r in rows)


def test_ctrl_c_ignored_by_the_parent_stays_ignored():
    """A batch started with SIGINT ignored (nohup, `cmd &`) keeps ignoring it, inside an image's block too;
    with Python's default handler a Ctrl-C in the block waits for the block's end, then stops."""
    from ldmkit.batch import deferred_interrupt

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        done = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                done.append(1)
        assert done == [1]
    finally:
        signal.signal(signal.SIGINT, previous)
