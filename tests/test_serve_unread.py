"""Over HTTP, a field the served model does not take is a 400 naming it (issue 30 item 6): the core's one
rule (diffcore.ignored, diffcore.notices) decides, the server (diffcore.serve.unread) refuses; a documented
allow-list of harmless peer fields is a warning instead; Python keeps warning; after a refusal the same
server gives the identical picture."""
from __future__ import annotations

import json
import logging
import weakref

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")

from diffcore import ignored  # noqa: E402
from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_image, running_server  # noqa: E402

BODY = {"prompt": "a red circle", "size": "32x32", "seed": 3, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(toy_gen):
    with running_server(toy_gen, ServeSettings(served_model_name="toy")) as (base, app):
        yield base


@pytest.fixture
def fresh_ledger(monkeypatch):
    """No earlier run's knowledge (other tests share the toy model): the first request must run to be judged."""
    monkeypatch.setattr(ignored, "_LEDGERS", weakref.WeakKeyDictionary())


@pytest.fixture
def transformer_calls(toy_gen):
    calls = []
    hook = toy_gen.components["transformer"].register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    hook.remove()


def _post(server, **fields):
    return httpx.post(server + "/v1/images/generations", json={**BODY, **fields}, timeout=60)


def _refused(response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "unused_parameter", error
    assert param in error["message"]
    return error["message"]


def _picture(response) -> np.ndarray:
    import base64

    assert response.status_code == 200, response.text
    return np.asarray(decode_image(base64.b64decode(response.json()["data"][0]["b64_json"])))


def test_a_field_no_stage_reads_is_400_after_its_run_then_on_arrival(server, fresh_ledger, transformer_calls):
    """The toy model has no true CFG: true_cfg_scale is never read. The first request cannot be judged before
    it runs (it runs, then is refused); the next one is refused on arrival, before any transformer call."""
    message = _refused(_post(server, true_cfg_scale=4.0), "true_cfg_scale")
    assert "nothing read it" in message
    assert transformer_calls  # the first one ran
    transformer_calls.clear()
    message = _refused(_post(server, true_cfg_scale=4.0, seed=9), "true_cfg_scale")
    assert "earlier request" in message
    assert transformer_calls == []  # refused before any compute


def test_validation_notices_are_400_on_arrival(server, transformer_calls):
    _refused(_post(server, num_frames=9), "num_frames")  # an image model: "makes images, not videos"
    _refused(httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "a red circle"}],
        "extra_body": {"height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}}), "fps")
    assert transformer_calls == []


def test_fields_the_model_reads_are_served(server, toy_gen):
    r = _post(server, guidance_scale=4.0, negative_prompt="blurry", max_sequence_length=64)
    solo = toy_gen.generate(prompt=BODY["prompt"], height=32, width=32, num_inference_steps=2, seed=3,
                            guidance_scale=4.0, negative_prompt="blurry", max_sequence_length=64).images[0]
    np.testing.assert_array_equal(_picture(r), np.asarray(solo))
    assert "x-diffcore-warnings" not in r.headers


def test_an_allowed_peer_field_is_a_warning_not_an_error(server, toy_gen):
    """negative_prompt with guidance off changes nothing; peers' clients send one to every model: allowed,
    and said in the x-diffcore-warnings header."""
    r = _post(server, negative_prompt="blurry", guidance_scale=1.0)
    assert "negative_prompt ignored" in r.headers["x-diffcore-warnings"]
    np.testing.assert_array_equal(_picture(r), _picture(_post(server, guidance_scale=1.0)))


def test_after_a_refusal_the_server_gives_the_identical_picture(server):
    before = _picture(_post(server))
    _refused(_post(server, true_cfg_scale=4.0), "true_cfg_scale")
    _refused(_post(server, num_frames=9), "num_frames")
    np.testing.assert_array_equal(_picture(_post(server)), before)


def test_python_keeps_warning_and_the_result_names_the_field(toy_gen, caplog):
    with caplog.at_level(logging.WARNING):
        result = toy_gen.generate(prompt="a red circle", height=32, width=32, num_inference_steps=2,
                                  true_cfg_scale=4.0, output_type="np")
    assert result.ignored_parameters == ("true_cfg_scale",)
    assert any("true_cfg_scale is ignored" in r.getMessage() for r in caplog.records)
    assert toy_gen.generate(prompt="a red circle", height=32, width=32, num_inference_steps=2,
                            guidance_scale=3.0, output_type="np").ignored_parameters == ()


def test_a_streamed_request_gets_the_same_refusals(server, fresh_ledger):
    """stream=true answers server-sent events: the refusal on arrival is the 400 itself, the one after the run
    is the stream's error event."""
    r = _post(server, stream=True, true_cfg_scale=4.0)
    events = [json.loads(line[len("data:"):]) for line in r.text.splitlines() if line.startswith("data:")]
    assert r.status_code == 200 and events[-1]["type"] == "error", r.text[:500]
    assert events[-1]["error"]["code"] == "unused_parameter" and events[-1]["error"]["param"] == "true_cfg_scale"
    _refused(_post(server, stream=True, true_cfg_scale=4.0), "true_cfg_scale")
    _refused(_post(server, stream=True, num_frames=9), "num_frames")


def test_a_notice_about_a_default_value_refuses_nothing(server, monkeypatch):
    """A notice names a parameter the client did not set (a model's default true_cfg_scale without a negative
    prompt, as Qwen-Image-Layered's): nothing to leave out, so the request is served."""
    from diffcore.stages import input_validation

    def default_notice(cfg, p, do_cfg):
        input_validation.notice(input_validation.log, "true_cfg_scale=%s is ignored: true CFG needs a negative_prompt",
                                4.0, ignored="true_cfg_scale")

    monkeypatch.setattr(input_validation, "_warn_ignored", default_notice)
    _picture(_post(server))
    _refused(_post(server, true_cfg_scale=4.0), "true_cfg_scale")


def test_a_field_sent_at_the_models_default_is_served(server, fresh_ledger):
    """The playground (and clients that fill every field with the defaults they were shown) sends e.g. the default
    guidance of a model that never reads it: that changes nothing, so it is served; another value is refused."""
    default = _post(server, true_cfg_scale=1.0)  # the toy's default true_cfg_scale, which it never reads
    np.testing.assert_array_equal(_picture(default), _picture(_post(server)))
    _refused(_post(server, true_cfg_scale=4.0), "true_cfg_scale")
    _picture(_post(server, true_cfg_scale=1.0))  # still served once the rule has learned the field
