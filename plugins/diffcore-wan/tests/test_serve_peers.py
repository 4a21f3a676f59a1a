"""Peers' video clients against `diffcore serve` on a tiny Wan TI2V (text- and image-to-video), over a real
socket on 127.0.0.1: SGLang's bench_serving (JSON, and multipart with the extra body as JSON text), SGLang's
test-helper `seconds` + `num_frames`, vLLM-Omni's multipart videos (width/height, or size) and
/v1/videos/sync, LiteLLM's video calls; and the OpenAI Videos surface (list pagination, prompt, expires_at,
thumbnail and spritesheet) with the official openai client. Request shapes: diffcore.testing.peers."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
imageio = pytest.importorskip("imageio.v2")

from wan_testlib import ours, random_image  # noqa: E402

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.peers import LiteLLM, SGLangBenchServing, SGLangTestHelpers, VLLMOmni  # noqa: E402
from diffcore.testing.serving import openai_client, png_bytes, running_server  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
EXTRA = {"seed": 3, "num_inference_steps": 2}
PROMPT = "a cat surfing"


@pytest.fixture(scope="module")
def server(wan_folders):
    gen = ours(wan_folders["ti2v"])
    with running_server(gen, ServeSettings(served_model_name="wan")) as (base, _):
        yield base, gen


@pytest.fixture
def sglang_bench_serving(server):
    return SGLangBenchServing(server[0])


@pytest.fixture
def sglang_test_helpers():
    return SGLangTestHelpers()


@pytest.fixture
def vllm_omni(server):
    return VLLMOmni(server[0])


@pytest.fixture
def litellm(server):
    return LiteLLM(server[0])


def frames(data: bytes, tmp_path, name: str = "got.mp4") -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data)
    return np.stack(list(imageio.mimread(str(path))))


def want(gen, tmp_path, **kwargs) -> np.ndarray:
    path = tmp_path / "want.mp4"
    gen.generate(prompt=PROMPT, height=32, width=32, num_frames=5, **{**EXTRA, **kwargs}).save(path)
    return np.stack(list(imageio.mimread(str(path))))


def content(base: str, job_id: str) -> bytes:
    response = httpx.get(f"{base}/v1/videos/{job_id}/content")
    assert response.status_code == 200, response.text
    return response.content


def test_sglang_bench_serving_text_and_image_to_video(server, sglang_bench_serving, tmp_path):
    base, gen = server
    info = sglang_bench_serving.model_info()
    assert info["task_type"] == "image-to-video" and info["is_video"] is True
    submit, job = sglang_bench_serving.video(info["model_path"], PROMPT, 32, 32, 5, 24, EXTRA)
    assert submit.status_code == 200 and job["status"] == "completed", (submit.text, job)
    np.testing.assert_array_equal(frames(content(base, job["id"]), tmp_path), want(gen, tmp_path))

    ref = random_image(32, 32, seed=1)
    submit, job = sglang_bench_serving.video("wan", PROMPT, 32, 32, 5, 24, EXTRA, image=png_bytes(ref))
    assert submit.status_code == 200 and job["status"] == "completed", (submit.text, job)
    np.testing.assert_array_equal(frames(content(base, job["id"]), tmp_path), want(gen, tmp_path, image=ref))

    submit, job = sglang_bench_serving.video("wan", PROMPT, 32, 32, 5, 24, EXTRA, num_outputs_per_prompt=2)
    assert submit.status_code == 400 and submit.json()["error"]["param"] == "num_outputs_per_prompt" and job is None


def test_sglang_seconds_with_num_frames_num_frames_wins(server, sglang_test_helpers, tmp_path):
    base, gen = server
    body = sglang_test_helpers.video_body("wan", PROMPT, "32x32", "2", 5, EXTRA)  # 2 s would be 49 frames
    response = httpx.post(base + "/v1/videos", json=body)
    assert response.status_code == 200, response.text
    assert "seconds=2 ignored: num_frames=5" in response.headers["x-diffcore-warnings"]
    job = VLLMOmni(base).poll(response.json()["id"])
    assert job["status"] == "completed" and job["seconds"] == "2"
    np.testing.assert_array_equal(frames(content(base, job["id"]), tmp_path), want(gen, tmp_path))


def test_vllm_omni_videos_form_and_sync(server, vllm_omni, tmp_path):
    base, gen = server
    expected = want(gen, tmp_path)
    fields = {"width": 32, "height": 32, "num_frames": 5, "fps": 24, **EXTRA}
    for form in (fields, {"size": "32x32", **{k: v for k, v in fields.items() if k not in ("width", "height")}}):
        response = vllm_omni.video_form(PROMPT, form)
        assert response.status_code == 200, response.text
        job = vllm_omni.poll(response.json()["id"])
        assert job["status"] == "completed" and job["size"] == "32x32"
        np.testing.assert_array_equal(frames(content(base, job["id"]), tmp_path), expected)
    sync = vllm_omni.video_form(PROMPT, fields, sync=True)
    assert sync.status_code == 200 and sync.headers["content-type"] == "video/mp4"
    assert float(sync.headers["x-inference-time-s"]) > 0
    np.testing.assert_array_equal(frames(sync.content, tmp_path, "sync.mp4"), expected)
    bad = vllm_omni.video_form(PROMPT, {**fields, "size": "64x64"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
    bad = vllm_omni.video_form(PROMPT, {**fields, "model": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"


def test_litellm_video_calls(server, litellm, tmp_path):
    base, _ = server
    created = litellm.video_generation("wan", PROMPT, seconds="0.17", size="32x32")  # 0.17 s x 24 fps + 1 = 5 frames
    assert created.status_code == 200, created.text
    job = litellm.video_status(created.json()["id"])
    assert job["status"] == "completed" and job["prompt"] == PROMPT
    got = litellm.video_content(job["id"])
    assert got.status_code == 200 and frames(got.content, tmp_path).shape == (5, 32, 32, 3)
    ref = litellm.video_generation("wan", PROMPT, seconds="0.17", size="32x32",
                                   input_reference=png_bytes(random_image(32, 32, seed=2)))
    assert litellm.video_status(ref.json()["id"])["status"] == "completed"


def test_openai_videos_surface(server):
    from PIL import Image

    base, _ = server
    client = openai_client(base)
    made = [client.videos.create(prompt=f"clip {i}", size="32x32", extra_body={**EXTRA, "num_frames": 5}) for i in range(3)]
    for video in made:
        assert client.videos.poll(video.id, poll_interval_ms=20).status == "completed"
    first = client.videos.list(limit=1)
    assert len(first.data) == 1 and first.has_more and first.data[0].id == made[-1].id  # newest first
    second = client.videos.list(limit=1, after=first.data[0].id)
    assert [v.id for v in second.data] == [made[-2].id]
    newest_first = [v.id for v in client.videos.list().data]
    assert [v.id for v in client.videos.list(order="asc").data] == newest_first[::-1]
    assert [v.id for v in client.videos.list(limit=1)] == newest_first  # the client pages on has_more / last_id

    video = client.videos.retrieve(made[0].id)
    assert video.prompt == "clip 0" and video.expires_at == video.completed_at + 3600
    thumb = client.videos.download_content(video.id, variant="thumbnail")
    assert Image.open(io.BytesIO(thumb.content)).format == "WEBP"
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").content))
    assert sheet.format == "JPEG" and sheet.size == (32 * 5, 32)
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.download_content(video.id, variant="poster")
    assert info.value.body["param"] == "variant"
