"""Streamed images (stream=true, partial_images) over a real socket with the official openai client: OpenAI's
event names and shapes, the completed image equal to the non-streamed one, batching, a disconnect or a timeout
cancelling at the next step, and the 400s (toy model, fp32; edits on the demo model's image-to-image)."""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.concurrency import count_denoiser_calls, mark_cancels  # noqa: E402
from diffcore.testing.serving import decode_b64, decode_image, openai_client, png_bytes, running_server  # noqa: E402

EXTRA = {"seed": 3, "num_inference_steps": 6}


@pytest.fixture(scope="module")
def server(toy_gen):
    with running_server(toy_gen, ServeSettings(served_model_name="toy")) as (base, app):
        yield base, app


def _stream(client, **kwargs):
    return list(client.images.generate(model="toy", prompt="a toy", size="32x32", stream=True, **kwargs))


def test_the_openai_client_streams_previews_then_the_image_equal_to_the_unstreamed_one(server, toy_gen):
    client = openai_client(server[0])
    events = _stream(client, partial_images=2, extra_body=EXTRA)
    assert [type(e).__name__ for e in events] == ["ImageGenPartialImageEvent"] * 2 + ["ImageGenCompletedEvent"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert e.size == "32x32" and e.output_format == "png" and e.background == "auto" and e.quality == "auto"
        assert isinstance(e.created_at, int) and decode_b64(e).shape == (32, 32, 3)
    done = events[-1]
    assert done.type == "image_generation.completed" and done.usage.total_tokens == 0
    plain = client.images.generate(model="toy", prompt="a toy", size="32x32", extra_body=EXTRA)
    assert done.b64_json == plain.data[0].b64_json  # the same PNG: pixel for pixel
    solo = toy_gen.generate(prompt="a toy", height=32, width=32, **EXTRA)
    np.testing.assert_array_equal(decode_b64(done), np.asarray(solo.images[0]))
    previews = []
    toy_gen.generate(prompt="a toy", height=32, width=32, **EXTRA, on_preview=previews.append, partial_images=2)
    for event, preview in zip(events, previews):  # the previews are generate()'s
        np.testing.assert_array_equal(decode_b64(event), np.asarray(preview.images[0]))
    assert not np.array_equal(decode_b64(events[0]), decode_b64(done))


def test_the_wire_format_is_named_server_sent_events(server):
    body = {"prompt": "a toy", "size": "32x32", "stream": True, "partial_images": 1, "n": 2, **EXTRA}
    with httpx.stream("POST", server[0] + "/v1/images/generations", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [dict(line.split(": ", 1) for line in chunk.splitlines()) for chunk in text.strip().split("\n\n")]
    assert all(json.loads(e["data"])["type"] == e["event"] for e in events)
    kinds = sorted((json.loads(e["data"])["output_index"], e["event"]) for e in events)  # n=2: says which image
    assert kinds == [(0, "image_generation.completed"), (0, "image_generation.partial_image"),
                     (1, "image_generation.completed"), (1, "image_generation.partial_image")]
    seeds = {json.loads(e["data"]).get("seed") for e in events if e["event"].endswith("completed")}
    assert seeds == {3, 4}


def test_partial_images_zero_streams_only_the_image(server):
    events = _stream(openai_client(server[0]), partial_images=0, extra_body=EXTRA)
    assert [e.type for e in events] == ["image_generation.completed"]


def test_streamed_requests_batch_with_others(toy_gen):
    settings = ServeSettings(served_model_name="toy", max_batch_size=2, batch_wait_ms=3000)
    with running_server(toy_gen, settings) as (base, app):
        sizes, observe = [], app.state.diffcore.runner.on_batch
        app.state.diffcore.runner.on_batch = lambda n: (sizes.append(n), observe(n))
        client, out = openai_client(base), {}
        streamed = threading.Thread(target=lambda: out.update(events=_stream(client, partial_images=2, extra_body=EXTRA)))
        streamed.start()
        plain = client.images.generate(model="toy", prompt="another", size="32x32", extra_body={**EXTRA, "seed": 8})
        streamed.join(60)
    assert sizes == [2]  # one batch of both
    assert [e.type for e in out["events"]].count("image_generation.partial_image") == 2
    solo = np.asarray(toy_gen.generate(prompt="a toy", height=32, width=32, **EXTRA).images[0]).astype(int)
    assert np.abs(decode_b64(out["events"][-1]).astype(int) - solo).max() <= 1  # batched: equal up to rounding
    assert decode_b64(plain.data[0]).shape == (32, 32, 3)


@pytest.mark.parametrize("why", ["disconnect", "timeout"])
def test_a_stream_abandoned_mid_way_stops_at_the_next_step(toy_gen, why):
    """The client reads the first preview and leaves (or the stream passes --request-timeout): the request stops
    within one step (two transformer calls: CFG), far before its 400 steps."""
    calls, remove = count_denoiser_calls(toy_gen)
    # 10 ms per transformer call: the 400 steps (800 calls) take >= 8 s, past the 3 s timeout on any machine (an idle
    # one ran the toy's 400 steps in 1.5 s, so the request finished before its timeout and nothing was cancelled)
    slow = [m.register_forward_pre_hook(lambda *a: time.sleep(0.01))
            for m in toy_gen.pipeline.stage("denoising").transformers] if why == "timeout" else []
    settings = ServeSettings(served_model_name="toy", request_timeout=3.0 if why == "timeout" else 600.0)
    try:
        with running_server(toy_gen, settings) as (base, app):
            marks = mark_cancels(app.state.diffcore.runner, calls)
            body = {"prompt": "long", "size": "32x32", "stream": True, "partial_images": 3 if why == "disconnect" else 0,
                    "num_inference_steps": 400, "seed": 0}
            with httpx.stream("POST", base + "/v1/images/generations", json=body, timeout=60) as response:
                lines = response.iter_lines()
                first = next(lines)  # "event: ..." of the first preview (or the timeout's error)
                rest = "\n".join(lines) if why == "timeout" else ""
            deadline = time.monotonic() + 30
            while app.state.diffcore.runner.queue_depth and time.monotonic() < deadline:
                time.sleep(0.01)
            stopped_at = len(calls)
            metrics = httpx.get(base + "/metrics").text
    finally:
        remove()
        for handle in slow:
            handle.remove()
    assert marks, "the server never cancelled the request"
    assert stopped_at - marks[0] <= 2 and stopped_at < 400 * 2
    assert f'diffcore_requests_cancelled_total{{reason="{why}"}} 1.0' in metrics
    if why == "timeout":
        assert first == "event: error" and '"code": "timeout"' in rest
    else:
        assert first == "event: image_generation.partial_image"


@pytest.mark.parametrize("body, param", [
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": True, "partial_images": -1}, "partial_images"),
    ({"stream": True, "partial_images": "two"}, "partial_images"),
    ({"stream": "maybe"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream": True, "response_format": "url"}, "response_format"),
])
def test_bad_streaming_fields_are_400s_naming_them(server, body, param):
    response = httpx.post(server[0] + "/v1/images/generations", json={"prompt": "a toy", **body}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_model_that_cannot_preview_refuses_partial_images_but_streams_the_image(server, toy_gen, monkeypatch):
    monkeypatch.setattr(type(toy_gen.config), "previews", False)
    client = openai_client(server[0])
    with pytest.raises(openai.BadRequestError) as info:
        _stream(client, partial_images=1, extra_body=EXTRA)
    assert info.value.body["param"] == "stream" and "cannot stream partial images" in info.value.body["message"]
    assert [e.type for e in _stream(client, partial_images=0, extra_body=EXTRA)] == ["image_generation.completed"]


def test_video_jobs_are_not_streamed(toy_gen):
    from diffcore.serve import schemas
    from diffcore.serve.errors import APIError

    with pytest.raises(APIError) as info:  # a POST /v1/videos body
        schemas.video_spec({"prompt": "a toy", "stream": True}, "toy", toy_gen.sampling_params_cls, fps=16)
    assert info.value.status == 400 and info.value.param == "stream" and "GET /v1/videos" in info.value.message


def test_an_edit_streams_image_edit_events():
    """Image-to-image on the demo model through /v1/images/edits (multipart: stream and partial_images are form
    fields): image_edit.partial_image events, then image_edit.completed equal to the unstreamed edit."""
    from diffcore import DiffGenerator

    demo = DiffGenerator.from_pretrained("demo", progress=False)
    source = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    extra = {"seed": 1, "num_inference_steps": 8, "strength": 0.75}
    with running_server(demo, ServeSettings(served_model_name="demo")) as (base, _):
        client = openai_client(base)
        events = list(client.images.edit(image=("in.png", source, "image/png"), prompt="a red circle on a blue "
                                         "background", size="64x64", stream=True, partial_images=2, extra_body=extra))
        plain = client.images.edit(image=("in.png", source, "image/png"), prompt="a red circle on a blue background",
                                   size="64x64", extra_body=extra)
    assert [type(e).__name__ for e in events] == ["ImageEditPartialImageEvent"] * 2 + ["ImageEditCompletedEvent"]
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert events[-1].b64_json == plain.data[0].b64_json
    assert decode_image(base64.b64decode(events[0].b64_json)).shape == (64, 64, 3)


def test_the_async_openai_client_streams_too(server):
    import asyncio

    async def collect():
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)
        stream = await client.images.generate(model="toy", prompt="a toy", size="32x32", stream=True,
                                              partial_images=1, extra_body=EXTRA)
        return [event.type async for event in stream]

    assert asyncio.run(collect()) == ["image_generation.partial_image", "image_generation.completed"]
