"""DELETE of a running video job stops it at the next denoising step (tiny Wan, real socket on 127.0.0.1);
the next job then costs only its own transformer calls."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")

from wan_testlib import ours  # noqa: E402

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.concurrency import count_denoiser_calls, mark_cancels  # noqa: E402
from diffcore.testing.serving import running_server  # noqa: E402

NEXT = {"prompt": "the next one", "size": "32x32", "seed": 3, "num_inference_steps": 2, "num_frames": 5}


def test_delete_of_a_running_job_stops_it_at_the_next_step(wan_folders):
    gen = ours(wan_folders["ti2v"])
    calls, remove = count_denoiser_calls(gen)
    try:
        gen.generate(prompt=NEXT["prompt"], height=32, width=32, num_frames=5, seed=3, num_inference_steps=2)
        next_calls = len(calls)
        per_step = next_calls // 2
        with running_server(gen, ServeSettings(served_model_name="wan")) as (base, app):
            runner = app.state.diffcore.runner
            marks = mark_cancels(runner, calls)
            long = httpx.post(base + "/v1/videos", json={"prompt": "a long one", "size": "32x32", "seed": 0,
                                                         "num_inference_steps": 250, "num_frames": 5}).json()
            deadline = time.monotonic() + 60
            while len(calls) < next_calls + 3 * per_step and time.monotonic() < deadline:
                time.sleep(0.01)  # a few steps in
            assert httpx.delete(f"{base}/v1/videos/{long['id']}").json()["deleted"] is True
            deadline = time.monotonic() + 30
            while runner.queue_depth and time.monotonic() < deadline:
                time.sleep(0.01)
            stopped_at = len(calls)
            job = httpx.post(base + "/v1/videos", json=NEXT).json()
            while httpx.get(f"{base}/v1/videos/{job['id']}").json()["status"] not in ("completed", "failed"):
                assert time.monotonic() < deadline + 60
                time.sleep(0.02)
            done = httpx.get(f"{base}/v1/videos/{job['id']}").json()
            metrics = httpx.get(base + "/metrics").text
    finally:
        remove()
    assert runner.queue_depth == 0
    assert marks, "DELETE did not cancel the job"
    assert stopped_at - marks[0] <= per_step, f"{stopped_at - marks[0]} calls after the cancellation: over one step"
    assert stopped_at - next_calls < 250 * per_step  # it did not run to its end
    assert done["status"] == "completed" and len(calls) - stopped_at == next_calls
    assert 'diffcore_requests_cancelled_total{reason="delete"} 1.0' in metrics
