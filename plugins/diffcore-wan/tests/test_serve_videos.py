"""Video jobs over HTTP with the official openai client: create (T2V and I2V), poll, progress, download,
list, delete (queued and running)."""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
imageio = pytest.importorskip("imageio.v2")

from wan_testlib import ours, random_image  # noqa: E402

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import openai_client, png_bytes, running_server  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
EXTRA = {"seed": 3, "num_inference_steps": 2}


def frames(path) -> np.ndarray:
    return np.stack(list(imageio.mimread(str(path))))


@pytest.fixture(scope="module")
def server(wan_folders):
    gen = ours(wan_folders["ti2v"])  # TI2V: text-to-video, and image-to-video with an input image
    # one job at a time: with room, a queued job would join the running one at its next step (step batching)
    with running_server(gen, ServeSettings(served_model_name="wan", max_batch_size=1)) as (base, app):
        yield base, app, gen


def test_text_and_image_to_video_jobs(server, tmp_path):
    base, app, gen = server
    client = openai_client(base)
    job = client.videos.create(model="wan", prompt="a cat surfing", size="32x32", seconds="0.17", extra_body=EXTRA)
    assert job.object == "video" and job.status in ("queued", "in_progress", "completed") and job.model == "wan"
    assert job.size == "32x32" and job.seconds == "0.17"
    done = client.videos.poll(job.id, poll_interval_ms=20)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    got = tmp_path / "got.mp4"
    got.write_bytes(client.videos.download_content(job.id).content)
    want = tmp_path / "want.mp4"  # round(0.17 s * 24 fps) + 1 = 5 frames
    gen.generate(prompt="a cat surfing", height=32, width=32, num_frames=5, **EXTRA).save(want)
    assert frames(got).shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(frames(got), frames(want))

    ref = random_image(32, 32, seed=1)
    i2v = client.videos.create(prompt="a cat surfing", size="32x32", input_reference=("ref.png", png_bytes(ref), "image/png"),
                               extra_body={**EXTRA, "num_frames": 5})
    assert client.videos.poll(i2v.id, poll_interval_ms=20).status == "completed"
    (tmp_path / "i2v.mp4").write_bytes(client.videos.download_content(i2v.id).content)
    gen.generate(prompt="a cat surfing", image=ref, height=32, width=32, num_frames=5, **EXTRA).save(tmp_path / "want2.mp4")
    np.testing.assert_array_equal(frames(tmp_path / "i2v.mp4"), frames(tmp_path / "want2.mp4"))
    assert not np.array_equal(frames(tmp_path / "i2v.mp4"), frames(got))  # the image conditions the video

    listed = [v.id for v in client.videos.list().data]
    assert listed[:2] == [i2v.id, job.id]  # newest first
    assert client.videos.delete(job.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(job.id)


def test_progress_then_delete_a_running_and_a_queued_job(server):
    base, app, _ = server
    client = openai_client(base)
    long = client.videos.create(prompt="a long one", size="32x32", extra_body={"seed": 0, "num_inference_steps": 60,
                                                                                "num_frames": 5})
    queued = client.videos.create(prompt="never runs", size="32x32", extra_body={**EXTRA, "num_frames": 5})
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        video = client.videos.retrieve(long.id)
        seen.add(video.progress)
        if 0 < video.progress < 100 and video.status == "in_progress":
            break
        time.sleep(0.01)
    assert any(0 < p < 100 for p in seen), f"no partial progress seen: {seen}"
    with pytest.raises(openai.APIStatusError) as info:  # not finished: no content yet
        client.videos.download_content(long.id)
    assert info.value.status_code == 409
    future = app.state.diffcore.jobs.get(queued.id).future
    assert client.videos.delete(queued.id).deleted and future.cancelled()  # left the queue without running
    assert client.videos.delete(long.id).deleted
    for job_id in (long.id, queued.id):
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(job_id)


def test_video_errors(server):
    base, _, _ = server
    client = openai_client(base)
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="x", size="32", extra_body=EXTRA)
    assert info.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="x", seconds="soon", extra_body=EXTRA)
    assert info.value.body["param"] == "seconds"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_nope")
    assert httpx.get(base + "/v1/images/files/" + "a" * 32).status_code == 404
    response = httpx.post(base + "/v1/images/generations", json={"prompt": "x"})  # a video model: no images API
    assert response.status_code == 400 and "/v1/videos" in response.json()["error"]["message"]


def test_what_the_checkpoint_refuses_is_a_400_at_submit_not_a_failed_job(server, monkeypatch):
    base, app, gen = server
    client = openai_client(base)
    before = len(client.videos.list().data)
    monkeypatch.setattr(gen.config, "size_policy", "error")
    with pytest.raises(openai.BadRequestError) as info:  # Wan needs 4k+1 frames
        client.videos.create(prompt="x", size="32x32", extra_body={**EXTRA, "num_frames": 6})
    assert info.value.body["param"] == "num_frames" and "4k+1" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # 30 is no multiple of the VAE scale x patch
        client.videos.create(prompt="x", size="32x30", extra_body={**EXTRA, "num_frames": 5})
    assert info.value.body["param"] == "size" and "height=30" in info.value.body["message"]
    assert len(client.videos.list().data) == before


def test_an_image_to_video_model_without_input_reference_is_a_400_naming_it(wan_folders):
    with running_server(ours(wan_folders["i2v21"]), ServeSettings(served_model_name="i2v")) as (base, _):
        client = openai_client(base)
        with pytest.raises(openai.BadRequestError) as info:
            client.videos.create(prompt="x", size="32x32", extra_body={**EXTRA, "num_frames": 5})
        assert info.value.body["param"] == "input_reference" and "at least 1" in info.value.body["message"]
        assert client.videos.list().data == []


def test_a_two_expert_model_takes_guidance_scale_2_and_a_single_expert_one_refuses_it(wan_folders, server, tmp_path):
    """The server's extras are the model's SamplingParams fields: Wan 2.2 A14B's second guidance scale reaches
    the low-noise expert; the single-expert TI2V has the field but its config refuses it, before queueing."""
    gen = ours(wan_folders["t2v22"])
    kw = dict(prompt="a cat surfing", height=32, width=32, num_frames=5, guidance_scale=4.0, **EXTRA)
    with running_server(gen, ServeSettings(served_model_name="wan22")) as (base, _):
        client = openai_client(base)
        job = client.videos.create(prompt="a cat surfing", size="32x32", extra_body={
            **EXTRA, "num_frames": 5, "guidance_scale": 4.0, "guidance_scale_2": 1.5})
        assert client.videos.poll(job.id, poll_interval_ms=20).status == "completed"
        (tmp_path / "got.mp4").write_bytes(client.videos.download_content(job.id).content)
    gen.generate(**kw, guidance_scale_2=1.5).save(tmp_path / "want.mp4")
    gen.generate(**kw).save(tmp_path / "both.mp4")  # guidance_scale_2 left out: 4.0 for both experts
    np.testing.assert_array_equal(frames(tmp_path / "got.mp4"), frames(tmp_path / "want.mp4"))
    assert not np.array_equal(frames(tmp_path / "got.mp4"), frames(tmp_path / "both.mp4"))

    client = openai_client(server[0])  # TI2V-5B: one expert
    with pytest.raises(openai.BadRequestError) as info:  # refused at submit: the job is never created
        client.videos.create(prompt="x", size="32x32", extra_body={**EXTRA, "num_frames": 5, "guidance_scale_2": 1.5})
    assert info.value.body["param"] == "guidance_scale_2" and "two-expert" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # a name no Wan model has
        client.videos.create(prompt="x", size="32x32", extra_body={**EXTRA, "guidance_scale_3": 1.0})
    assert info.value.body["param"] == "guidance_scale_3"


def test_a_field_the_video_model_does_not_read_fails_its_job_then_is_a_400(server, monkeypatch):
    """Wan guides with guidance_scale, never true_cfg_scale: a job that sets it is judged when it ran (it cannot be
    known before), and fails with the 400's error naming it; the next request that sets it is a 400 on arrival
    (diffcore.serve.unread)."""
    import weakref

    from diffcore import ignored

    monkeypatch.setattr(ignored, "_LEDGERS", weakref.WeakKeyDictionary())  # no earlier run's knowledge
    base, _, _ = server
    body = {"prompt": "a cat surfing", "size": "32x32", "num_frames": 5, "true_cfg_scale": 4.0, **EXTRA}
    job = httpx.post(base + "/v1/videos", json=body, timeout=60).json()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = httpx.get(f"{base}/v1/videos/{job['id']}", timeout=10).json()
    assert job["status"] == "failed" and job["error"]["code"] == "unused_parameter", job
    again = httpx.post(base + "/v1/videos", json=body, timeout=60)
    assert again.status_code == 400 and again.json()["error"]["param"] == "true_cfg_scale", again.text
