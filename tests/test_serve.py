"""`diffcore serve` routes over a real socket with the official openai client (toy model, fp32)."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, decode_image, openai_client, png_bytes, running_server  # noqa: E402

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def server(toy_gen):
    settings = ServeSettings(served_model_name="toy", max_body_bytes=64 * 1024, max_upload_bytes=32 * 1024)
    with running_server(toy_gen, settings) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server[0])


def solo(gen, seed, **kwargs):
    kwargs = {"prompt": PROMPT, "height": 32, "width": 32, "num_inference_steps": 2, **kwargs}
    return np.asarray(gen.generate(seed=seed, **kwargs).images[0])


def test_generation_b64_is_pixel_identical_to_generate(client, toy_gen):
    out = client.images.generate(model="toy", prompt=PROMPT, size="32x32",
                                 extra_body={"seed": 3, "num_inference_steps": 2, "guidance_scale": 4.0})
    assert len(out.data) == 1 and out.data[0].revised_prompt is None
    got = decode_b64(out.data[0])
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, solo(toy_gen, 3, guidance_scale=4.0))
    assert not np.array_equal(got, solo(toy_gen, 4, guidance_scale=4.0))  # the seed matters


def test_n_images_as_urls_each_equal_its_seed(client, toy_gen, server):
    out = client.images.generate(prompt=PROMPT, n=2, size="32x32", response_format="url",
                                 extra_body={"seed": 10, "num_inference_steps": 2})
    assert len(out.data) == 2
    for i, item in enumerate(out.data):
        assert item.url.startswith(server[0] + "/v1/images/files/")
        response = httpx.get(item.url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        got = decode_image(response.content).astype(int)  # the two may run as one batch: equal up to rounding
        assert np.abs(got - solo(toy_gen, 10 + i).astype(int)).max() <= 1
    assert httpx.get(server[0] + "/v1/images/files/" + "0" * 32).status_code == 404
    assert httpx.get(server[0] + "/v1/images/files/..%2F..%2Fetc%2Fpasswd").status_code == 404


@pytest.mark.parametrize("fmt,media", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_output_formats(client, server, fmt, media):
    out = client.images.generate(prompt=PROMPT, size="32x32", response_format="url", output_format=fmt,
                                 extra_body={"seed": 1, "num_inference_steps": 1})
    response = httpx.get(out.data[0].url)
    assert response.headers["content-type"] == media
    assert decode_image(response.content).shape == (32, 32, 3)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["toy"]
    assert client.models.retrieve("toy").owned_by == "diffcore"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


@pytest.mark.parametrize("kwargs,param,status", [
    (dict(size="big"), "size", 400),
    (dict(size="0x32"), "size", 400),
    (dict(n=11), "n", 400),
    (dict(response_format="gif"), "response_format", 400),
    (dict(extra_body={"num_inference_steps": 0}), "num_inference_steps", 400),
    (dict(extra_body={"seed": "x"}), "seed", 400),
    (dict(extra_body={"stepz": 3}), "stepz", 400),
    (dict(model="dall-e-3"), "model", 400),  # a request field naming another model: 400 (as vLLM-Omni and OpenAI)
])
def test_bad_parameters_are_openai_errors_naming_the_parameter(client, kwargs, param, status):
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(prompt=PROMPT, **kwargs)
    error = info.value
    assert error.status_code == status
    assert error.body["param"] == param and error.body["message"]
    assert error.response.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize("extra,param,text", [
    ({"size": "32x30"}, "size", "height=30 is not a multiple of 4"),  # under size_policy "error"
    ({"extra_body": {"timesteps": [999, 500]}}, "timesteps", "few-step"),  # a field every model has, not usable here
    ({"extra_body": {"loras": {"nope": 1.0}}}, "loras", "no adapter of that name is loaded"),
])
def test_what_the_checkpoint_refuses_is_a_400_before_queueing(server, client, toy_gen, monkeypatch, extra, param, text):
    """SamplingParams accepts these; the pipeline's input validation refuses them, at submit time."""
    submitted = []
    monkeypatch.setattr(server[1].state.diffcore.runner, "submit", lambda *a, **k: submitted.append(a))
    monkeypatch.setattr(toy_gen.config, "size_policy", "error")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt=PROMPT, **{"size": "32x32", **extra})
    assert info.value.body["param"] == param and text in info.value.body["message"]
    assert submitted == []  # refused before the queue


def test_a_request_is_made_and_validated_once_and_queued_as_it_is(server, client, toy_gen, monkeypatch):
    """The route makes the validated Request on arrival; the runner gets that Request (not keywords to parse
    again), and neither the parameters nor the input validation run a second time."""
    from diffcore.request import Request
    from diffcore.stages.input_validation import InputValidationStage

    parsed, validated, queued = [], [], []
    params_cls, runner = toy_gen.sampling_params_cls, server[1].state.diffcore.runner
    from_user, forward, submit = params_cls.from_user, InputValidationStage.forward, runner.submit
    monkeypatch.setattr(params_cls, "from_user", classmethod(lambda cls, **kw: parsed.append(kw) or from_user(**kw)))
    monkeypatch.setattr(InputValidationStage, "forward", lambda self, req: validated.append(req) or forward(self, req))
    monkeypatch.setattr(runner, "submit", lambda req, **kw: queued.append(req) or submit(req, **kw))
    out = client.images.generate(prompt=PROMPT, n=2, size="32x32", extra_body={"seed": 5, "num_inference_steps": 2})
    assert len(out.data) == 2 and len(parsed) == 2 and len(validated) == 2
    assert all(isinstance(r, Request) for r in queued) and validated == queued


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_guidance_is_refused(server, literal):
    """The openai client refuses to send NaN; other clients send the JSON literal, which Python parses."""
    body = f'{{"prompt": "x", "guidance_scale": {literal}}}'.encode()
    response = _post(server[0], "/v1/images/generations", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "guidance_scale"


def test_edits_on_a_model_without_image_input_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", png_bytes(np.zeros((8, 8, 3), np.uint8)), "image/png"), prompt=PROMPT)
    assert info.value.body["param"] == "image" and "takes no input image" in info.value.body["message"]


def _post(base, path, content, ctype="application/json", **kw):
    return httpx.post(base + path, content=content, headers={"content-type": ctype, **kw.pop("headers", {})}, **kw)


@pytest.mark.parametrize("body,code", [(b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json"), (b"", "invalid_json")])
def test_malformed_bodies(server, body, code):
    response = _post(server[0], "/v1/images/generations", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and set(error) >= {"message", "type", "param", "code"}


def test_body_over_the_cap_is_413(server):
    big = json.dumps({"prompt": "x" * 70_000}).encode()
    response = _post(server[0], "/v1/images/generations", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunks():  # no content-length: the cap is counted while reading
        for _ in range(20):
            yield b"x" * 8192

    response = httpx.post(server[0] + "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_unknown_route_and_method_use_the_error_shape(server):
    response = httpx.get(server[0] + "/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = httpx.get(server[0] + "/v1/images/generations")
    assert response.status_code == 405


def test_health_playground_and_metrics(server, client):
    base = server[0]
    assert httpx.get(base + "/health").json()["status"] == "ok"
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "<title>diffcore playground</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert httpx.get(base + "/playground.js").headers["content-type"].startswith("text/javascript")
    client.images.generate(prompt=PROMPT, size="32x32", extra_body={"seed": 0, "num_inference_steps": 2})
    text = httpx.get(base + "/metrics").text
    assert 'diffcore_requests_total{route="/v1/images/generations",status="200"}' in text
    assert 'diffcore_requests_total{route="/v1/images/generations",status="400"}' in text
    assert "diffcore_queue_depth 0.0" in text
    count = [ln for ln in text.splitlines() if ln.startswith("diffcore_batch_size_count")]
    assert count and float(count[0].split()[-1]) >= 1
    steps = [ln for ln in text.splitlines() if ln.startswith("diffcore_step_latency_seconds_count")]
    assert steps and float(steps[0].split()[-1]) >= 1
    assert "diffcore_request_latency_seconds_bucket" in text


def test_api_key_guards_v1_and_metrics_but_not_the_page(toy_gen):
    with running_server(toy_gen, ServeSettings(api_key="s3cret", served_model_name="toy")) as (base, _):
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(base + path)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base + "/").status_code == 200 and httpx.get(base + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai_client(base, api_key="wrong").models.list()
        good = openai_client(base, api_key="s3cret")
        assert [m.id for m in good.models.list().data] == ["toy"]
        assert httpx.get(base + "/metrics", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_cors_is_off_by_default_and_on_for_listed_origins(toy_gen, server):
    origin = {"origin": "http://elsewhere.example", "access-control-request-method": "POST"}
    response = httpx.options(server[0] + "/v1/images/generations", headers=origin)
    assert "access-control-allow-origin" not in response.headers
    settings = ServeSettings(cors_origins=["http://elsewhere.example"], api_key="k")
    with running_server(toy_gen, settings) as (base, _):
        response = httpx.options(base + "/v1/images/generations", headers=origin)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://elsewhere.example"


def test_health_is_503_until_the_model_is_loaded(toy_gen):
    release = threading.Event()

    def loader():
        release.wait(30)
        return toy_gen

    with running_server(settings=ServeSettings(served_model_name="toy"), loader=loader, wait_ready=False) as (base, app):
        response = httpx.get(base + "/health")
        assert response.status_code == 503 and response.json()["status"] == "loading"
        response = _post(base, "/v1/images/generations", json.dumps({"prompt": "x"}).encode())
        assert response.status_code == 503 and response.json()["error"]["code"] == "loading"
        release.set()
        assert app.state.diffcore.ready.wait(30)
        assert httpx.get(base + "/health").status_code == 200


def test_request_timeout_and_disconnect_drop_queued_requests(toy_gen):
    """One long request holds the engine; a request whose client leaves, and one past its timeout,
    are dropped from the queue without running."""
    start = time.perf_counter()
    toy_gen.generate(prompt=PROMPT, height=96, width=96, num_inference_steps=20)
    steps = min(1000, int(20 * 5.0 / (time.perf_counter() - start)))  # ~5 s of engine time (1000: the step budget)
    # one request at a time: with room, the short request would run beside the long one (step batches)
    with running_server(toy_gen, ServeSettings(request_timeout=1.5, max_batch_size=1)) as (base, app):
        # straight to the engine: over HTTP it would pass --request-timeout too, and stop at its next step
        runner = app.state.diffcore.runner
        holder = runner.submit(toy_gen.request(dict(prompt=PROMPT, height=96, width=96, num_inference_steps=steps, seed=0)))
        deadline, registry = time.monotonic() + 10, app.state.diffcore.metrics.registry
        while not registry.get_sample_value("diffcore_batch_size_count") and time.monotonic() < deadline:
            time.sleep(0.01)  # until the long one is in the engine
        short = json.dumps({"prompt": PROMPT, "size": "32x32", "num_inference_steps": 1, "seed": 1}).encode()
        with pytest.raises(httpx.ReadTimeout):
            _post(base, "/v1/images/generations", short, timeout=0.4)
        response = _post(base, "/v1/images/generations", short, timeout=30)
        runner.cancel(holder)  # stops at its next step
        metrics = httpx.get(base + "/metrics").text
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert 'diffcore_requests_dropped_total{reason="disconnect"} 1.0' in metrics
    assert 'diffcore_requests_dropped_total{reason="timeout"} 1.0' in metrics


def test_videos_on_an_image_model_is_400(client):
    import warnings

    with warnings.catch_warnings(), pytest.raises(openai.BadRequestError) as info:
        warnings.simplefilter("ignore", DeprecationWarning)
        client.videos.create(prompt=PROMPT)
    assert "/v1/images/generations" in info.value.body["message"]
