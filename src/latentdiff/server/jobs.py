"""The generation queue: one worker thread, a bounded waiting line, per-step progress events, cancel.

Jobs run one at a time (the models share one CPU/GPU); a job waiting past ``max_waiting`` others is
refused at submission (``QueueFull``), never dropped later. Ids are generated here, never taken from clients.
Only the newest ``max_kept`` finished jobs are remembered, so a long-running server's memory stays bounded.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

WAITING, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class QueueFull(Exception):
    """The waiting line is at its bound: the client should retry later."""


class Cancelled(Exception):
    """Raised inside a running job's progress callback once its cancel flag is set."""


@dataclass
class Job:
    """One generation request and what became of it; ``events`` grow as it runs (read by SSE streams)."""

    id: str
    model: str
    settings: dict[str, Any]
    status: str = WAITING
    done: int = 0
    total: int = 0
    images: list[Path] = field(default_factory=list)
    error: Optional[str] = None
    created: float = field(default_factory=time.time)
    finished: Optional[float] = None
    events: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)  # tensors for the runner (input image, mask); freed at the end
    preview: Optional[bytes] = None  # the latest preview PNG, set by the runner

    def emit(self, kind: str, **data: Any) -> None:
        """Append an event; list.append is atomic, so readers in other threads may poll ``events``."""
        self.events.append({"event": kind, **data})

    def summary(self) -> dict[str, Any]:
        """The JSON the API answers with (no filesystem paths: images by index)."""
        return {"id": self.id, "model": self.model, "status": self.status, "done": self.done, "total": self.total,
                "settings": self.settings, "error": self.error, "created": self.created, "finished": self.finished,
                "images": [f"/api/jobs/{self.id}/images/{i}" for i in range(len(self.images))],
                "preview": f"/api/jobs/{self.id}/preview" if self.preview is not None else None}


Runner = Callable[[Job, Callable[[int, int], None]], list[Path]]


class JobQueue:
    """A single worker draining a bounded FIFO; ``runner(job, progress)`` does the work and returns PNG paths."""

    def __init__(self, runner: Runner, max_waiting: int, max_kept: int = 200) -> None:
        self.runner = runner
        self.max_waiting = max_waiting
        self.max_kept = max_kept
        self.jobs: dict[str, Job] = {}
        self._line: deque[Job] = deque()  # waiting jobs only: a cancelled one leaves at once, freeing its place
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="latentdiff-jobs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and let the worker end."""
        for job in list(self.jobs.values()):
            self.cancel(job.id)
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, model: str, settings: dict[str, Any], inputs: Optional[dict[str, Any]] = None) -> Job:
        """Queue a job, or raise QueueFull when ``max_waiting`` jobs already wait."""
        job = Job(uuid.uuid4().hex, model, settings, inputs=inputs or {})
        with self._changed:
            if len(self._line) >= self.max_waiting:
                raise QueueFull(f"busy: {len(self._line)} jobs are already waiting (the limit); retry later")
            self._line.append(job)
            self.jobs[job.id] = job
            job.emit("queued", position=len(self._line))
            self._changed.notify_all()
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop: a waiting one never starts, a running one stops at its next step."""
        job = self.jobs[job_id]
        with self._changed:
            if job.status == WAITING:
                job.cancel_requested = True
                self._line.remove(job)
                self._finish(job, CANCELLED)
            elif job.status == RUNNING:
                job.cancel_requested = True
        return job

    def all(self) -> list[Job]:
        """A snapshot of the remembered jobs (safe while the worker adds and forgets jobs)."""
        with self._changed:
            return list(self.jobs.values())

    def waiting(self) -> int:
        """Jobs in the line, not counting the running one."""
        return len(self._line)

    def _finish(self, job: Job, status: str, error: Optional[str] = None) -> None:
        job.status, job.error, job.finished, job.inputs = status, error, time.time(), {}
        job.emit(status, **({"error": error} if error else {}), images=job.summary()["images"])
        with self._changed:  # forget the oldest finished jobs past max_kept (dicts keep insertion order)
            finished = [j.id for j in self.jobs.values() if j.status in FINISHED]
            for old in finished[:max(0, len(finished) - self.max_kept)]:
                del self.jobs[old]

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._line or self._stopping)
                if self._stopping:
                    return
                job = self._line.popleft()
                job.status = RUNNING
            job.emit("started")

            def progress(done: int, total: int, job: Job = job) -> None:
                if job.cancel_requested:
                    raise Cancelled
                job.done, job.total = done, total
                job.emit("progress", done=done, total=total)

            try:
                job.images = self.runner(job, progress)
                self._finish(job, DONE)
            except Cancelled:
                self._finish(job, CANCELLED)
            except Exception as e:  # the job fails, the server lives on; the message is the client's answer
                self._finish(job, FAILED, f"{type(e).__name__}: {e}" if not _is_user_error(e) else str(e))


def _is_user_error(e: Exception) -> bool:
    from latentdiff.errors import UserError

    return isinstance(e, UserError)
