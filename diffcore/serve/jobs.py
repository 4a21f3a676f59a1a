"""Video jobs: queued -> in_progress -> completed | failed, with progress from the denoising steps."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import secrets
import threading
import time
from typing import Callable, Optional

import attrs

from .errors import APIError, from_exception
from .files import FileStore

log = logging.getLogger("diffcore.serve")


@attrs.define
class VideoJob:
    id: str
    model: str
    size: Optional[str]
    seconds: Optional[str]
    created_at: int
    status: str = "queued"
    progress: int = 0  # percent of the denoising steps done
    completed_at: Optional[int] = None
    error: Optional[dict] = None
    file_id: Optional[str] = None
    future: Optional[cf.Future] = None
    deleted: bool = False
    has_audio: bool = False  # the mp4 carries a sound track (the model generates one)

    def to_json(self) -> dict:
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": None, "size": self.size, "seconds": self.seconds, "error": self.error,
                "remixed_from_video_id": None, "has_audio": self.has_audio}


class VideoJobs:
    """The job table. Results are encoded to mp4 off the engine thread, then kept in the FileStore."""

    def __init__(self, runner, files: FileStore, model: str, max_jobs: int, encode: Callable,
                 on_step: Optional[Callable] = None):
        self.runner, self.files, self.model, self.max_jobs = runner, files, model, max_jobs
        self.encode, self.on_step = encode, on_step
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        self._encoder = cf.ThreadPoolExecutor(1, thread_name_prefix="diffcore-serve-encode")

    def create(self, kwargs: dict, size: Optional[str], seconds: Optional[str]) -> VideoJob:
        job = VideoJob(id="video_" + secrets.token_hex(12), model=self.model, size=size, seconds=seconds,
                       created_at=int(time.time()))
        with self._lock:
            self._make_room()
            self._jobs[job.id] = job

        def progress(step: int, steps: int) -> None:
            job.status = "in_progress"
            job.progress = min(99, int(100 * step / max(steps, 1)))  # 100 only once the mp4 is written
            if self.on_step is not None:
                self.on_step(step, steps)

        try:
            job.future = self.runner.submit(kwargs, on_step=progress)
        except BaseException:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise
        job.future.add_done_callback(lambda f: self._finished(job, f))
        return job

    def _make_room(self) -> None:
        if len(self._jobs) < self.max_jobs:
            return
        done = [j for j in self._jobs.values() if j.status in ("completed", "failed")]
        if not done:
            raise APIError(429, f"{len(self._jobs)} video jobs are active (limit {self.max_jobs}); retry later",
                           type="rate_limit_error", code="too_many_jobs")
        oldest = min(done, key=lambda j: j.created_at)
        self._drop(oldest)

    def _drop(self, job: VideoJob) -> None:
        self._jobs.pop(job.id, None)
        if job.file_id:
            self.files.remove(job.file_id)

    def _finished(self, job: VideoJob, future: cf.Future) -> None:
        if future.cancelled() or job.deleted:
            return
        exc = future.exception()
        if exc is not None:
            error = from_exception(exc)
            if error.status >= 500:
                log.error("video job %s failed", job.id, exc_info=exc)
            self._fail(job, error)
            return
        self._encoder.submit(self._write, job, future.result())

    def _write(self, job: VideoJob, result) -> None:
        try:
            file_id = self.files.write(lambda path: self.encode(result, path), "video/mp4", ".mp4")
            job.has_audio = getattr(result, "audios", None) is not None
            if job.deleted:
                self.files.remove(file_id)
                return
            job.file_id = file_id
            job.progress, job.status, job.completed_at = 100, "completed", int(time.time())
        except Exception as exc:
            log.error("video job %s: writing the mp4 failed", job.id, exc_info=exc)
            self._fail(job, from_exception(exc))

    def _fail(self, job: VideoJob, error: APIError) -> None:
        job.error = {"code": error.code or "failed", "message": error.message}
        job.status, job.completed_at = "failed", int(time.time())

    def get(self, job_id: str) -> VideoJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no video job {job_id!r}", param="video_id", code="not_found")
        return job

    def list(self) -> list[VideoJob]:
        with self._lock:
            return list(reversed(self._jobs.values()))  # newest first

    def delete(self, job_id: str) -> VideoJob:
        """Forget a job: a queued one leaves the queue; a running one finishes, and its result is dropped."""
        job = self.get(job_id)
        job.deleted = True
        if job.future is not None and not job.future.done():
            self.runner.cancel(job.future)
        with self._lock:
            self._drop(job)
        return job

    def close(self) -> None:
        self._encoder.shutdown(wait=True)
