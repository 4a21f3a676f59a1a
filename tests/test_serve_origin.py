"""A server without --api-key is safe from other web sites: forged Origin / Host / Content-Type requests over a
real socket are refused, and the same server still answers its own clients identically (issue 30 item 3)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")

from diffcore.errors import ConfigError  # noqa: E402
from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, running_server  # noqa: E402

BODY = {"prompt": "a red circle", "size": "32x32", "seed": 3, "num_inference_steps": 2}
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def server(toy_gen):
    settings = ServeSettings(served_model_name="toy", cors_origins=("http://friend.example",),
                             allowed_hosts=("diffcore.lan",))
    with running_server(toy_gen, settings) as (base, app):
        yield base


def _image(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    from types import SimpleNamespace

    return decode_b64(SimpleNamespace(b64_json=response.json()["data"][0]["b64_json"]))


def _lora() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"transformer.proj_out.lora_A.weight": torch.zeros(2, 32),
                 "transformer.proj_out.lora_B.weight": torch.zeros(16 * 4, 2)})


def test_cross_origin_form_post_cannot_upload_a_lora(server):
    files = {"file": ("a.safetensors", io.BytesIO(_lora()))}
    r = httpx.post(server + "/v1/loras", files=files, data={"name": "evil"}, headers={"Origin": EVIL})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin" and EVIL in r.text
    r = httpx.post(server + "/v1/loras", files=files, data={"name": "evil"}, headers={"Origin": "null"})
    assert r.status_code == 403
    assert httpx.get(server + "/v1/loras").json()["data"] == []  # nothing was loaded
    assert httpx.delete(server + "/v1/loras/x", headers={"Origin": EVIL}).status_code == 403


def test_json_sent_as_text_plain_is_refused(server, toy_gen):
    data = json.dumps(BODY)
    for ctype in ("text/plain", "text/plain;charset=UTF-8", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(server + "/v1/images/generations", content=data, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", ctype
    again = _image(httpx.post(server + "/v1/images/generations", json=BODY))
    np.testing.assert_array_equal(again, np.asarray(toy_gen.generate(prompt=BODY["prompt"], height=32, width=32,
                                                                     num_inference_steps=2, seed=3).images[0]))


def test_cross_origin_json_generation_is_refused_but_friends_and_own_pages_pass(server):
    r = httpx.post(server + "/v1/images/generations", json=BODY, headers={"Origin": EVIL})
    assert r.status_code == 403
    first = _image(httpx.post(server + "/v1/images/generations", json=BODY, headers={"Origin": "http://friend.example"}))
    own = server.replace("http://", "")
    second = _image(httpx.post(server + "/v1/images/generations", json=BODY, headers={"Origin": f"http://{own}"}))
    np.testing.assert_array_equal(first, second)
    assert httpx.get(server + "/v1/models", headers={"Origin": EVIL}).status_code == 200  # reads carry no risk


@pytest.mark.parametrize("host", ["evil.example", "evil.example:30010", "127.0.0.1.evil.example", "10.0.0.1"])
def test_foreign_host_header_is_refused(server, host):
    for method, path in (("GET", "/"), ("GET", "/v1/models"), ("POST", "/v1/images/generations")):
        r = httpx.request(method, server + path, json=BODY if method == "POST" else None, headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (method, path)
        assert "--allowed-host" in r.json()["error"]["message"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:1234", "[::1]:80", "diffcore.lan", "DIFFCORE.LAN:8080"])
def test_own_and_configured_host_names_pass(server, host):
    assert httpx.get(server + "/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_host_star_answers_any_name(toy_gen):
    with running_server(toy_gen, ServeSettings(allowed_hosts=("*",))) as (base, _):
        assert httpx.get(base + "/v1/models", headers={"Host": "anything.example"}).status_code == 200


def test_deeply_nested_json_is_a_400(server):
    r = httpx.post(server + "/v1/images/generations", content="[" * 100_000 + "]" * 100_000,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("key", ["", "   "])
def test_empty_api_key_is_refused(key):
    with pytest.raises(ConfigError, match="must not be empty"):
        ServeSettings(api_key=key)


def test_empty_api_key_on_the_command_line_exits_2(capsys, monkeypatch):
    from diffcore.cli import main

    monkeypatch.delenv("DIFFCORE_API_KEY", raising=False)
    assert main(["serve", "--model", "demo", "--api-key", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must not be empty" in err
    monkeypatch.setenv("DIFFCORE_API_KEY", "")
    assert main(["serve", "--model", "demo"]) == 2


def test_an_image_field_on_generations_is_a_400_not_ignored(server):
    for field in ("image", "image[]"):
        r = httpx.post(server + "/v1/images/generations", json={**BODY, field: "data:image/png;base64,AAAA"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "image", r.text
        assert "takes no input image" in r.json()["error"]["message"]


@pytest.mark.parametrize("mode,array", [("I;16", np.full((8, 8), 40000, np.uint16)),
                                        ("F", np.full((8, 8), 0.5, np.float32))])
def test_16_bit_and_float_uploads_are_refused_not_clipped(mode, array):
    from PIL import Image

    from diffcore.serve.errors import APIError
    from diffcore.serve.schemas import decode_upload

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    with pytest.raises(APIError, match="16-bit or floating-point") as e:
        decode_upload(buf.getvalue(), "image", 10**6, 10**6)
    assert e.value.status == 400 and e.value.param == "image"
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb, format="TIFF")
    assert decode_upload(rgb.getvalue(), "image", 10**6, 10**6).mode == "RGB"


def test_an_uploaded_lora_with_a_nan_is_a_400_and_the_server_is_unchanged(server, toy_gen):
    import torch
    from safetensors.torch import save

    layer = toy_gen.components["transformer"].get_submodule("proj_out")
    up = torch.zeros(layer.out_features, 2)
    up[0, 0] = float("nan")
    data = save({"transformer.proj_out.lora_A.weight": torch.ones(2, layer.in_features), "transformer.proj_out.lora_B.weight": up})
    before = _image(httpx.post(server + "/v1/images/generations", json=BODY))
    r = httpx.post(server + "/v1/loras", files={"file": ("nan.safetensors", io.BytesIO(data))}, data={"name": "nan"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file" and "NaN" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/loras").json()["data"] == []
    np.testing.assert_array_equal(_image(httpx.post(server + "/v1/images/generations", json=BODY)), before)
