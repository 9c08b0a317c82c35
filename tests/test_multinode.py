"""Multi-node training (issue 18, part 4), simulated on this machine: two torchrun launches of one process each
(`--nnodes 2 --nproc-per-node 1`, c10d rendezvous on localhost, gloo on CPU) keep identical weights on both ranks
and log the same losses as one launch of two processes (`--standalone --nproc-per-node 2`); the run then resumes
on a single process."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

# the training tests' tiny dataset, configs and VAE run
from test_train import data, losses, vae_run  # noqa: E402, F401

from ldmkit.train import load_run_config, train
from ldmkit.train.runner import read_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # ~40-60 s: four processes on two cores

WORKER = """
import hashlib, json, os, sys
from ldmkit.train import defaults, train

data, vae, run, out = sys.argv[1:5]
cfg = defaults("unet").replace(model="tiny", size=16, data=data, vae=vae, batch_size=2, total_steps=4, holdout=0,
                               warmup_steps=1, lr=1e-3, log_every=1, sample_every=0, checkpoint_every=3,
                               ema_decay=0.9, device="cpu")
record = {"rank": int(os.environ["RANK"]), "node": os.environ.get("GROUP_RANK"), "losses": []}

def hook(step, info):
    sd = info["net"].state_dict()
    record["hash"] = hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()
    record["losses"].append(float(info["loss"]))

train(cfg, run, stop_after=3, on_step=hook)
with open(os.path.join(out, f"rank{record['rank']}.json"), "w") as f:
    json.dump(record, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights_hash(sd: dict) -> str:
    return hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()


def test_two_nodes_equal_one_node_of_two_processes(data: Path, vae_run: Path, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]
    args = lambda name: [str(tmp_path / "worker.py"), str(data), str(vae_run), str(tmp_path / name),  # noqa: E731
                         str((tmp_path / f"out-{name}").mkdir() or tmp_path / f"out-{name}")]
    port = _free_port()
    # the commands of docs/scaling.md, with localhost for the first machine's address
    node = [*run, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"localhost:{port}", "--rdzv-id", "ldmkit-test", *args("multi")]
    procs = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    single = subprocess.run([*run, "--standalone", "--nproc-per-node", "2", *args("single")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]

    r0, r1 = (json.loads((tmp_path / "out-multi" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert {r0["node"], r1["node"]} == {"0", "1"}  # two nodes of one process each
    assert r0["hash"] == r1["hash"]  # identical weights on both ranks after every step's all-reduce
    assert r0["losses"] != r1["losses"]  # each rank trained on its own half of the data
    ckpt = read_checkpoint(tmp_path / "multi")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3 and _weights_hash(ckpt["net"]) == r0["hash"]
    # the same run as one node of two processes: same losses (the mean over ranks), same weights
    multi, single_losses = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert list(multi) == list(single_losses) == [1, 2, 3]
    assert max(abs(multi[s] - single_losses[s]) for s in multi) <= 1e-6, (multi, single_losses)
    other = read_checkpoint(tmp_path / "single")["net"]
    assert max(float((v - other[k]).abs().max()) for k, v in ckpt["net"].items()) <= 1e-6
    assert not list((tmp_path / "multi").glob(".*.tmp"))  # rank 0 wrote it atomically, nothing half-written

    # resumed on one process: the data order restarts at the next epoch (the split changed), the rest is exact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_run_config(tmp_path / "multi"), tmp_path / "multi", resume=True)
    assert any("on 2 ranks, now 12 on 1" in str(w.message) for w in caught), [str(w.message) for w in caught]
    after = read_checkpoint(tmp_path / "multi")
    assert after["step"] == 4 and after["world_size"] == 1 and list(losses(tmp_path / "multi")) == [1, 2, 3, 4]
