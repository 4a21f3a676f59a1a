"""Video jobs are durable: `diffcore serve` (a real process, tiny Wan) is SIGKILLed with a completed job, a
running one and a queued one, then started again on the same state folder. The completed job and its content
(mp4, thumbnail, spritesheet) are served as before until they expire; the others come back failed, saying
the server restarted. SIGTERM then stops it without deleting finished content."""
from __future__ import annotations

import io
import signal
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")

from diffcore.testing.serving import serve_process  # noqa: E402

FAST = {"size": "32x32", "seed": 3, "num_inference_steps": 2, "num_frames": 5}


def wait(base: str, job_id: str, statuses: tuple, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{base}/v1/videos/{job_id}").json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def content(base: str, job_id: str) -> dict:
    out = {}
    for variant in ("video", "thumbnail", "spritesheet"):
        response = httpx.get(f"{base}/v1/videos/{job_id}/content", params={"variant": variant})
        assert response.status_code == 200, response.text
        out[variant] = (response.headers["content-type"], response.content)
    return out


def test_sigkill_then_restart_serves_completed_jobs_and_fails_unfinished_ones(wan_folders, tmp_path):
    from PIL import Image

    state = tmp_path / "state"
    flags = ("--model", str(wan_folders["t2v21"]), "--dtype", "float32", "--state-dir", str(state),
             "--file-ttl", "600", "--log-level", "warning")
    proc, base = serve_process(*flags)
    try:
        done = httpx.post(base + "/v1/videos", json={"prompt": "a cat surfing", **FAST})
        assert done.status_code == 200, done.text
        done = done.json()
        done = wait(base, done["id"], ("completed", "failed"))
        assert done["status"] == "completed" and done["prompt"] == "a cat surfing"
        assert done["expires_at"] - done["completed_at"] == 600
        before = content(base, done["id"])
        assert before["video"][0] == "video/mp4" and before["thumbnail"][0] == "image/webp"
        thumb = Image.open(io.BytesIO(before["thumbnail"][1]))
        sheet = Image.open(io.BytesIO(before["spritesheet"][1]))
        assert thumb.size == (32, 32) and sheet.size == (32 * 5, 32)  # 5 frames, one row

        running = httpx.post(base + "/v1/videos", json={"prompt": "a long one", **FAST,
                                                        "num_inference_steps": 250}).json()
        queued = httpx.post(base + "/v1/videos", json={"prompt": "behind it", **FAST,
                                                       "num_inference_steps": 250}).json()
        assert wait(base, running["id"], ("in_progress",))["status"] == "in_progress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()

    proc, base = serve_process(*flags)
    try:
        listed = httpx.get(base + "/v1/videos", params={"order": "asc"}).json()["data"]
        assert [v["id"] for v in listed] == [done["id"], running["id"], queued["id"]]
        again = listed[0]
        assert again["status"] == "completed" and again["expires_at"] == done["expires_at"]
        assert content(base, done["id"]) == before  # the same bytes, from the state folder
        for job, was in ((listed[1], ("in progress",)), (listed[2], ("queued", "in progress"))):  # (it may have
            assert job["status"] == "failed" and job["error"]["code"] == "server_restarted"  # joined the batch)
            assert any(f"the server restarted while this job was {w}" in job["error"]["message"] for w in was)
            assert job["expires_at"] is not None
            assert httpx.get(f"{base}/v1/videos/{job['id']}/content").status_code == 409
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(list((state / "files").iterdir())) == 3  # SIGTERM deleted nothing: mp4, thumbnail, spritesheet
