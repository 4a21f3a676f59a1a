"""Video jobs: queued -> in_progress -> completed | failed, with progress from the denoising steps.

Every job is a row in the state database (store.py), written on each change of status, so a restarted
server still lists and serves the jobs that completed before it stopped, until they expire. A job that was
queued or running when the process died cannot be resumed (its request lived in memory): it comes back
``failed`` with the code ``server_restarted``.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import secrets
import threading
import time
from typing import Callable, Optional

import attrs

from .errors import APIError, bad_param, from_exception
from . import unread
from .files import FileStore
from .store import StateStore

log = logging.getLogger("diffcore.serve")
ACTIVE = ("queued", "in_progress")
LIST_LIMIT = 100


@attrs.define
class VideoJob:
    id: str
    model: str
    prompt: str
    size: Optional[str]
    seconds: Optional[str]
    created_at: int
    status: str = "queued"
    progress: int = 0  # percent of the denoising steps done
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    error: Optional[dict] = None
    files: dict = attrs.field(factory=dict)  # variant ("video", "thumbnail", "spritesheet") -> file id
    has_audio: bool = False  # the mp4 carries a sound track (the model generates one)
    future: Optional[cf.Future] = attrs.field(default=None, eq=False)
    deleted: bool = False

    RECORD = ("id", "model", "prompt", "size", "seconds", "created_at", "status", "progress", "completed_at",
              "expires_at", "error", "files", "has_audio")

    def record(self) -> dict:
        return {k: getattr(self, k) for k in self.RECORD}

    @classmethod
    def from_record(cls, record: dict) -> "VideoJob":
        return cls(**{k: record.get(k) for k in cls.RECORD if k in record})

    def to_json(self) -> dict:
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "prompt": self.prompt, "size": self.size, "seconds": self.seconds,
                "error": self.error, "remixed_from_video_id": None, "has_audio": self.has_audio}


class VideoJobs:
    """The job table. Results are encoded (the mp4 and its previews) off the engine thread, then kept in
    the FileStore; ``encoders`` maps each content variant to ``(write(result, path), media_type, suffix)``."""

    def __init__(self, runner, files: FileStore, store: StateStore, model: str, max_jobs: int, ttl: float,
                 encoders: dict, on_step: Optional[Callable] = None):
        self.runner, self.files, self.store, self.model = runner, files, store, model
        self.max_jobs, self.ttl, self.encoders, self.on_step = max_jobs, ttl, encoders, on_step
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        self._encoder = cf.ThreadPoolExecutor(1, thread_name_prefix="diffcore-serve-encode")
        self._restore()

    def _restore(self) -> None:
        """Load the jobs a previous server left; those it never finished become failed jobs."""
        now = int(time.time())
        for record in self.store.videos():
            job = VideoJob.from_record(record)
            if job.status in ACTIVE:
                job.error = {"code": "server_restarted",
                             "message": f"the server restarted while this job was {job.status.replace('_', ' ')}; "
                                        "its request was lost: create the video again"}
                job.status, job.completed_at, job.expires_at = "failed", now, int(now + self.ttl)
                self._save(job)
            self._jobs[job.id] = job
        self.sweep()

    def _save(self, job: VideoJob) -> None:
        if not job.deleted:
            self.store.save_video(job.id, job.record())

    def create(self, request, size: Optional[str], seconds: Optional[str], has_audio: bool = False) -> VideoJob:
        """Queue ``request`` (a validated Request: ``model.request(kwargs)``) as a new job."""
        prompt = request.params.prompt
        job = VideoJob(id="video_" + secrets.token_hex(12), model=self.model, prompt=prompt,
                       size=size, seconds=seconds, created_at=int(time.time()), has_audio=has_audio)
        with self._lock:
            self._make_room()
            self._jobs[job.id] = job
        self._save(job)

        def progress(step: int, steps: int) -> None:
            if job.status == "queued":
                job.status = "in_progress"
                self._save(job)
            job.progress = min(99, int(100 * step / max(steps, 1)))  # 100 only once the mp4 is written
            if self.on_step is not None:
                self.on_step(step, steps)

        try:
            job.future = self.runner.submit(request, on_step=progress)
        except BaseException:
            with self._lock:
                self._jobs.pop(job.id, None)
            self.store.drop_video(job.id)
            raise
        job.future.add_done_callback(lambda f: self._finished(job, f))
        return job

    def _make_room(self) -> None:
        if len(self._jobs) < self.max_jobs:
            return
        done = [j for j in self._jobs.values() if j.status not in ACTIVE]
        if not done:
            raise APIError(429, f"{len(self._jobs)} video jobs are active (limit {self.max_jobs}); retry later",
                           type="rate_limit_error", code="too_many_jobs")
        self._drop(min(done, key=lambda j: j.created_at))

    def _drop(self, job: VideoJob) -> None:
        """Forget a job and delete its files (callers hold the lock)."""
        self._jobs.pop(job.id, None)
        self.store.drop_video(job.id)
        for file_id in job.files.values():
            self.files.remove(file_id)

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
        try:
            unread.check_result(future.result(), [])
        except APIError as error:  # it set a field nothing read (serve.unread)
            self._fail(job, error)
            return
        self._encoder.submit(self._write, job, future.result())

    def _write(self, job: VideoJob, result) -> None:
        written = {}
        try:
            for variant, (write, media_type, suffix) in self.encoders.items():
                written[variant] = self.files.write(lambda path, w=write: w(result, path), media_type, suffix)
        except Exception as exc:
            log.error("video job %s: writing its %s failed", job.id, variant, exc_info=exc)
            for file_id in written.values():
                self.files.remove(file_id)
            self._fail(job, from_exception(exc))
            return
        if job.deleted:
            for file_id in written.values():
                self.files.remove(file_id)
            return
        now = int(time.time())
        job.files = written
        job.has_audio = getattr(result, "audios", None) is not None
        job.progress, job.status, job.completed_at, job.expires_at = 100, "completed", now, int(now + self.ttl)
        self._save(job)

    def _fail(self, job: VideoJob, error: APIError) -> None:
        now = int(time.time())
        job.error = {"code": error.code or "failed", "message": error.message}
        job.status, job.completed_at, job.expires_at = "failed", now, int(now + self.ttl)
        self._save(job)

    def get(self, job_id: str) -> VideoJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None and job.expires_at is not None and job.expires_at <= time.time():
            self.sweep()
            job = None
        if job is None:
            raise APIError(404, f"no video job {job_id!r} (unknown, deleted or expired)", param="video_id",
                           code="not_found")
        return job

    def list(self, limit: Optional[int] = None, after: Optional[str] = None, order: str = "desc") -> tuple[list, bool]:
        """A page of jobs: ``order`` "desc" (newest first, the default) or "asc"; ``after`` a job id from
        the previous page; at most ``limit`` (1-100; all when None). Returns (jobs, has_more)."""
        if order not in ("asc", "desc"):
            raise bad_param("order", f"order must be 'asc' or 'desc', got {order!r}")
        if limit is not None and not 1 <= limit <= LIST_LIMIT:
            raise bad_param("limit", f"limit must be between 1 and {LIST_LIMIT}, got {limit}")
        self.sweep()
        with self._lock:
            jobs = list(self._jobs.values())  # oldest first
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise bad_param("after", f"after={after!r} is not a video job on this server (unknown or expired)")
            jobs = jobs[ids.index(after) + 1:]
        if limit is None:
            return jobs, False
        return jobs[:limit], len(jobs) > limit

    def delete(self, job_id: str) -> VideoJob:
        """Forget a job: a queued one leaves the queue; a running one stops at its next denoising step."""
        job = self.get(job_id)
        job.deleted = True
        if job.future is not None and not job.future.done():
            self.runner.cancel(job.future)
        with self._lock:
            self._drop(job)
        return job

    def sweep(self) -> int:
        """Delete finished jobs past their expires_at, with their files; returns how many."""
        now = time.time()
        with self._lock:
            expired = [j for j in self._jobs.values() if j.expires_at is not None and j.expires_at <= now]
            for job in expired:
                self._drop(job)
        return len(expired)

    def close(self) -> None:
        self._encoder.shutdown(wait=True)
