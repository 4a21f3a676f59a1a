"""Peers' clients against `diffcore serve` on the toy text-to-image model, over a real socket on 127.0.0.1:
SGLang's bench_serving and test-helper expectations, vLLM-Omni's chat-completions image route and
invalid-parameter expectations, LiteLLM's image call; plus the rest of the OpenAI surface (image response
id, background, HEAD /health, /v1/model_info, /favicon.ico). The request shapes are in
diffcore.testing.peers, one fixture per peer."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.peers import SGLangBenchServing, SGLangTestHelpers, VLLMOmni  # noqa: E402
from diffcore.testing.serving import decode_b64, decode_image, openai_client, running_server  # noqa: E402

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def server(toy_gen):
    with running_server(toy_gen, ServeSettings(served_model_name="toy")) as (base, app):
        yield base


@pytest.fixture
def sglang_bench_serving(server):
    return SGLangBenchServing(server)


@pytest.fixture
def sglang_test_helpers():
    return SGLangTestHelpers()


@pytest.fixture
def vllm_omni(server):
    return VLLMOmni(server)


@pytest.fixture
def litellm(server):
    return openai_client(server)  # LiteLLM's OpenAI provider sends images through the openai client


def b64(item: dict):
    return decode_image(base64.b64decode(item["b64_json"]))


def solo(gen, seed, **kwargs):
    kwargs = {"prompt": PROMPT, "height": 32, "width": 32, "num_inference_steps": 2, **kwargs}
    return np.asarray(gen.generate(seed=seed, **kwargs).images[0])


def test_sglang_bench_serving_text_to_image(sglang_bench_serving, sglang_test_helpers, toy_gen):
    info = sglang_bench_serving.model_info()
    assert info["model_path"] == str(toy_gen.model) and info["task_type"] == "text-to-image"
    # bench_serving sends model=model_path (the folder), not the served name: both are this model
    response = sglang_bench_serving.image(info["model_path"], PROMPT, 32, 32, {"seed": 5, "num_inference_steps": 2})
    assert response.status_code == 200, response.text
    sglang_test_helpers.check_image_response(response.json())
    np.testing.assert_array_equal(b64(response.json()["data"][0]), solo(toy_gen, 5))

    two = sglang_bench_serving.image("toy", PROMPT, 32, 32, {"seed": 5, "num_inference_steps": 2},
                                     num_outputs_per_prompt=2).json()
    assert [d["seed"] for d in two["data"]] == [5, 6]  # num_outputs_per_prompt is n


def test_vllm_omni_chat_completions_image(vllm_omni, toy_gen):
    extra = {"height": 32, "width": 32, "num_inference_steps": 2, "seed": 7, "guidance_scale": 4.0,
             "negative_prompt": "blurry", "num_outputs_per_prompt": 1}
    response, images = vllm_omni.chat_image("toy", PROMPT, extra)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert len(images) == 1
    want = solo(toy_gen, 7, guidance_scale=4.0, negative_prompt="blurry")
    np.testing.assert_array_equal(decode_image(images[0]), want)

    response, images = vllm_omni.chat_image(None, PROMPT, {**extra, "num_outputs_per_prompt": 2})
    assert len(images) == 2 and not np.array_equal(decode_image(images[1]), want)  # image i has seed 7 + i

    response, _ = vllm_omni.chat_image("toy", PROMPT, {**extra, "boundary_ratio": 0.9})  # would change a result
    assert response.status_code == 400 and response.json()["error"]["param"] == "boundary_ratio"
    response, _ = vllm_omni.chat_image("toy", PROMPT, {**extra, "num_outputs_per_prompt": 2, "n": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "num_outputs_per_prompt"


def test_vllm_omni_invalid_parameters(vllm_omni, server):
    response, _ = vllm_omni.chat_image("some/other-model", PROMPT, {"num_inference_steps": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    for params, param in (({"limit": 0}, "limit"), ({"limit": "many"}, "limit"), ({"order": "sideways"}, "order"),
                          ({"after": "video_nope"}, "after")):
        response = httpx.get(server + "/v1/videos", params=params)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, params
    response = httpx.post(server + "/v1/videos/sync", json={"prompt": "x"})
    assert response.status_code == 400 and "generates images" in response.json()["error"]["message"]
    response = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_harmless_peer_fields_are_accepted_with_a_warning(server, toy_gen):
    body = {"prompt": PROMPT, "size": "32x32", "num_inference_steps": 2, "seed": 2, "bot_task": "image"}
    response = httpx.post(server + "/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert "bot_task ignored" in response.headers["x-diffcore-warnings"]
    np.testing.assert_array_equal(b64(response.json()["data"][0]), solo(toy_gen, 2))
    response = httpx.post(server + "/v1/images/generations", json={**body, "height": 32, "width": 64})
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"  # disagrees with size


def test_litellm_image_generation(litellm, toy_gen):
    out = litellm.images.generate(model="toy", prompt=PROMPT, n=1, size="32x32",
                                  extra_body={"seed": 9, "num_inference_steps": 2})
    np.testing.assert_array_equal(decode_b64(out.data[0]), solo(toy_gen, 9))


def test_openai_surface(server):
    client = openai_client(server)
    out = client.images.generate(model="toy", prompt=PROMPT, size="32x32", background="opaque",
                                 extra_body={"seed": 1, "num_inference_steps": 1})
    assert out.to_dict()["id"].startswith("img_") and out.created > 0
    with pytest.raises(openai.BadRequestError) as info:  # the toy model has no alpha channel
        client.images.generate(prompt=PROMPT, background="transparent")
    assert info.value.body["param"] == "background" and "transparent" in info.value.body["message"]

    head = httpx.head(server + "/health")
    assert head.status_code == 200 and head.content == b""
    info = httpx.get(server + "/v1/model_info").json()
    assert info["served_model_name"] == "toy" and info["is_video"] is False and info["max_images"] == 0
    icon = httpx.get(server + "/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in icon.content and io.BytesIO(icon.content).read(5) == b"<svg "


def test_transparent_background_where_the_model_has_alpha(server, toy_gen, monkeypatch):
    """A model whose config says has_alpha takes background="transparent" (in png or webp, not jpeg)."""
    monkeypatch.setattr(type(toy_gen.config), "has_alpha", True, raising=False)
    body = {"prompt": PROMPT, "size": "32x32", "num_inference_steps": 1, "seed": 1, "background": "transparent"}
    assert httpx.post(server + "/v1/images/generations", json=body).status_code == 200
    response = httpx.post(server + "/v1/images/generations", json={**body, "output_format": "jpeg"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "output_format"
    assert httpx.get(server + "/v1/model_info").json()["has_alpha"] is True
