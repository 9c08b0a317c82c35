"""One worker thread runs queued jobs (generations, model switches) one at a time.

Requests never share settings: each job carries its own frozen parameters, and only the worker
touches the model, so two clients cannot interleave. The queue is bounded; a full queue refuses
new jobs at once (HTTP 503) instead of letting them pile up in memory.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch import Tensor

from ldmkit.model import StableDiffusion
from ldmkit.previews import TinyPreview
from ldmkit.server.checkpoints import CheckpointInfo

log = logging.getLogger("ldmkit.server")


class QueueFullError(RuntimeError):
    """The queue holds its maximum number of waiting jobs."""


class Interrupted(Exception):  # noqa: N818 - a signal, not an error
    """Raised inside a step callback to stop the running generation."""


class Skipped(Interrupted):
    """Raised inside a step callback to end the running batch; the request goes on with its next one."""


# jobs that do not need the current model's weights (a model switch loads its own)
NO_MODEL_JOBS = ("unload checkpoint", "load model")
PREVIEW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # A1111's live_previews_image_format


def encode_preview(image: Image.Image, fmt: str = "png") -> str:
    """Base64 PNG, JPEG or WebP of a live preview."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=PREVIEW_FORMATS[fmt])
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 PNG, with A1111's ``parameters`` text chunk when given."""
    from PIL import PngImagePlugin

    meta = None
    if parameters:
        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Job:
    fn: Callable[[JobContext], Any]
    kind: str  # "txt2img", "img2img", "load", "explain", ...
    task_id: str
    future: Future = field(default_factory=Future)


@dataclass
class _State:
    """What /sdapi/v1/progress reports about the running job."""

    task_id: str | None = None
    kind: str = ""
    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    timestamp: str = ""
    current_image: str | None = None


class JobContext:
    """Given to a running job: the current model, step callbacks, and the interrupt flag."""

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.job = worker, job
        self.last_denoised: Tensor | None = None  # for the partial result of an interrupted job
        self._next_preview = float("-inf")
        self._preview_step = 0  # the step of the last preview in this batch (A1111's current_image_sampling_step)

    @property
    def model(self) -> StableDiffusion:
        return self.worker.model

    @property
    def interrupted(self) -> bool:
        return self.worker._interrupt.is_set()

    def set_model(self, model: StableDiffusion, info: CheckpointInfo) -> None:
        self.worker.model, self.worker.checkpoint = model, info
        self.worker.unloaded = False

    def step_callback(self, job_no: int, job_count: int, steps: int) -> Callable[[dict], None]:
        """The pipeline's per-step callback: progress, a preview now and then, and interruption."""
        w = self.worker
        self._preview_step = 0
        self.last_denoised = None  # a skip before this batch's first step has nothing of it to return
        with w._lock:
            w._state.job_no, w._state.job_count = job_no, job_count
            w._state.sampling_step, w._state.sampling_steps = 0, steps

        def callback(d: dict) -> None:
            self.last_denoised = d["denoised"]
            preview = self._preview(d["denoised"], d["i"] + 1)
            with w._lock:
                w._state.sampling_step = d["i"] + 1
                if preview is not None:
                    w._state.current_image = preview
            if self.interrupted:
                raise Interrupted
            if w._skip.is_set():
                w._skip.clear()
                raise Skipped

        return callback

    def _preview(self, denoised: Tensor, step: int) -> str | None:
        """A preview of the first image after ``step`` steps, when the options and the time budget allow one."""
        from ldmkit import previews

        w, o = self.worker, self.worker.options
        every = int(o.get("show_progress_every_n_steps", 1))
        if w.preview_interval is None or not o.get("live_previews_enable", True) or every == -1:
            return None  # -1: A1111's "only after the batch", which the result itself shows
        now = time.monotonic()
        if step - self._preview_step < every or now < self._next_preview:
            return None
        try:
            decoder = previews.resolve(str(o.get("show_progress_type", "Approx NN")), self.model, w.tiny_preview)
            image = encode_preview(decoder(denoised[:1])[0], str(o.get("live_previews_image_format", "png")))
        except Exception:  # noqa: BLE001 - a preview is a nicety: it must never fail the generation
            log.exception("live preview failed; generation goes on without it")
            image = None
        self._preview_step = step
        if w.preview_interval > 0:
            # a VAE decode can cost as much as a step (big images on CPU): keep previews under ~20% of the time
            done = time.monotonic()
            self._next_preview = done + max(w.preview_interval, 4 * (done - now))
        return image


class ClientGone(Exception):
    """The request's client disconnected while its job waited in the queue; the job was dropped."""


async def await_job(future: Future, is_disconnected: Callable[[], Awaitable[bool]] | None = None,
                    poll: float = 0.25) -> Any:
    """The job's result. While it is still queued, ``is_disconnected`` (Starlette's
    ``request.is_disconnected``) is polled: when the client has gone, the job is cancelled, so the worker
    skips it (issue 15, hardening 10), and ``ClientGone`` is raised. A job already running is left to finish:
    a half-done generation would be lost either way."""
    waiter = asyncio.wrap_future(future)
    if is_disconnected is None:
        return await waiter
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=poll)
        if done:
            return waiter.result()
        if not future.running() and await is_disconnected() and future.cancel():
            raise ClientGone("the client disconnected before its request left the queue")


class Worker:
    """A bounded job queue and the thread that empties it."""

    def __init__(self, model: StableDiffusion, checkpoint: CheckpointInfo, *, queue_size: int = 16,
                 preview_interval: float | None = 1.0, options: dict[str, Any] | None = None,
                 tiny_preview: TinyPreview | None = None):
        if queue_size < 1:
            raise ValueError(f"queue size must be at least 1, got {queue_size}")
        self.model, self.checkpoint = model, checkpoint
        self.queue_size = queue_size
        self.preview_interval = preview_interval  # seconds between previews (0: every step); None: no previews
        self.options = options if options is not None else {}  # the server's live A1111 options (previews)
        self.tiny_preview = tiny_preview  # the "TAESD" preview decoder, if the server has one
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._state = _State()
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        # /sdapi/v1/unload-checkpoint frees the weights; the next job that needs them reloads them with loader
        self.loader: Callable[[CheckpointInfo], StableDiffusion] | None = None
        self.unloaded = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ldmkit-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[JobContext], Any], kind: str, task_id: str | None = None) -> Future:
        """Queue ``fn(ctx)``; its result or exception arrives in the returned future."""
        job = Job(fn, kind, task_id or f"task({uuid.uuid4().hex[:12]})")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the server is busy: {self.queue_size} requests are already waiting; retry later"
            ) from None
        return job.future

    def interrupt(self) -> None:
        """Stop the running job (it returns what it has so far); queued jobs still run."""
        with self._lock:
            if self._state.task_id is not None:
                self._interrupt.set()

    def skip(self) -> None:
        """End the running batch (it returns its image so far); the request's next batch runs."""
        with self._lock:
            if self._state.task_id is not None:
                self._skip.set()

    def waiting(self) -> int:
        return self._queue.qsize()

    def progress(self, skip_current_image: bool = False) -> dict:
        """A1111's /sdapi/v1/progress body."""
        with self._lock:
            s = self._state
            progress = 0.0
            if s.task_id is not None and s.job_count > 0:
                progress = s.job_no / s.job_count
                if s.sampling_steps > 0:
                    progress += s.sampling_step / s.sampling_steps / s.job_count
            elapsed = time.monotonic() - s.started if s.task_id else 0.0
            eta = elapsed / progress - elapsed if progress > 0 else 0.0
            return {
                "progress": min(progress, 1.0),
                "eta_relative": eta,
                "state": {
                    "skipped": self._skip.is_set(), "interrupted": self._interrupt.is_set(),
                    "stopping_generation": False,
                    "job": s.kind, "job_count": s.job_count, "job_timestamp": s.timestamp, "job_no": s.job_no,
                    "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps,
                    "task_id": s.task_id, "queued": self._queue.qsize(),
                },
                "current_image": None if skip_current_image else s.current_image,
                "textinfo": None,
            }

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._interrupt.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if not job.future.set_running_or_notify_cancel():
                continue  # its client gave up while it waited
            with self._lock:
                self._interrupt.clear()
                self._skip.clear()
                self._state = _State(task_id=job.task_id, kind=job.kind, started=time.monotonic(),
                                     timestamp=time.strftime("%Y%m%d%H%M%S"))
            try:
                if self.unloaded and job.kind not in NO_MODEL_JOBS:
                    self._reload()
                result = job.fn(JobContext(self, job))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._state = _State()
                    self._interrupt.clear()
                    self._skip.clear()

    def _reload(self) -> None:
        if self.loader is None:
            raise RuntimeError("the model was unloaded and this worker has no loader to bring it back")
        self.model = self.loader(self.checkpoint)
        self.unloaded = False
