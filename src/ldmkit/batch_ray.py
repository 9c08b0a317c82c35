"""``ldmkit batch --ray``: the job lines on Ray Data, one model copy per worker.

The driver has read and checked the job file (:mod:`ldmkit.batch`); Ray Data takes the pending jobs
(``from_items``, one block a job so that results stream back as they finish) and ``map_batches`` them over
:class:`RayWorker`, an actor pool of ``--workers`` actors, each holding its :class:`~ldmkit.batch.Runner` and so
loading its model once. Workers return the encoded PNGs and their pixel hashes; the driver writes them into the
same folder and manifest as the local backend, so the output folder needs no shared filesystem. The images
equal the local backend's: both run the same ``Runner`` on the same resolved seeds (on the same kind of
hardware and the same thread count: float summation order differs between CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator

from ldmkit.batch import Result, Runner
from ldmkit.batch_jobs import Job

RESULT_COLUMNS = ("line", "index", "file", "seed", "sha256", "seconds", "job", "png", "error", "notes")


def require_ray():
    """The ``ray`` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray[data]: pyarrow, pandas)
    except ImportError as e:
        raise ValueError(f"--ray needs Ray Data ({e}): pip install 'ldmkit[ray]' (or 'ray[data]>=2.9'), "
                         "or run without --ray") from None
    return ray


class RayWorker:
    """A Ray Data actor: a batch of job lines -> one row per image (or per failed line). The batch's
    --device/--low-memory/--vae-tiling come with each row (constructor arguments would sit in the object store)."""

    def __init__(self) -> None:
        self.runner: Runner | None = None

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = []
        for text, run_level in zip(batch["job"], batch["run"], strict=True):
            if self.runner is None:
                self.runner = Runner(**json.loads(str(run_level)))
            results += self.runner.run(Job.from_json(str(text)))
        return {c: np.array([getattr(r, c) for r in results], dtype=object) for c in RESULT_COLUMNS}


def run_ray(jobs: list[Job], args: argparse.Namespace) -> Iterator[Result]:
    """The jobs' results as the workers finish them (any order). Starts a local Ray unless one is running
    or ``--ray-address`` names a cluster."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    for name in ("ray", "ray.data"):  # Ray Data's plan and executor lines; warnings still show
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the batch's own bar counts images
    run_level = json.dumps({"device": args.device, "low_memory": args.low_memory, "vae_tiling": args.vae_tiling})
    ds = ray.data.from_items([{"job": job.to_json(), "run": run_level} for job in jobs],
                             override_num_blocks=len(jobs))
    out = ds.map_batches(RayWorker, batch_size=1, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=args.workers), num_cpus=1,
                         num_gpus=args.gpus_per_worker or None)
    try:
        for row in out.iter_rows():
            yield Result(**{c: _plain(row[c]) for c in RESULT_COLUMNS})
    except ray.exceptions.RayError as e:  # a worker died (out of memory, a node lost): what is written stays
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the Ray run failed ({first}); the images written so far are kept: run the same "
                         "command again to finish") from None


def _plain(value: object) -> object:
    """numpy scalars (how Arrow columns come back) as Python values."""
    return value.item() if hasattr(value, "item") and not isinstance(value, bytes | str) else value
