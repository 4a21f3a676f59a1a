"""DELETE /v1/loras/NAME while requests use the adapter is a 409, and the request gets the adapter's picture
(issue 29 item 4, issue 30 item 7): never 200 with a picture that is neither the adapter's nor the base's."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
httpx = pytest.importorskip("httpx")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, running_server  # noqa: E402

BODY = {"prompt": "a red circle", "size": "32x32", "seed": 3, "num_inference_steps": 3}
KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=3, seed=3)


@pytest.fixture
def gen(toy_folder, toy_manager):
    import torch

    from diffcore import DiffGenerator

    g = DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager)
    gen_ = torch.Generator().manual_seed(1)
    layer = g.components["transformer"].get_submodule("proj_out")
    g.load_lora({"transformer.proj_out.lora_A.weight": torch.randn(2, layer.in_features, generator=gen_),
                 "transformer.proj_out.lora_B.weight": torch.randn(layer.out_features, 2, generator=gen_)}, name="style")
    return g


def _image(response) -> np.ndarray:
    from types import SimpleNamespace

    assert response.status_code == 200, response.text
    return decode_b64(SimpleNamespace(b64_json=response.json()["data"][0]["b64_json"]))


def test_delete_of_an_adapter_in_use_is_409_and_the_request_keeps_it(gen):
    styled = np.asarray(gen.generate(**KW, loras={"style": 1.0}).images[0])
    plain = np.asarray(gen.generate(**KW).images[0])
    model = gen.components["transformer"]
    started, go = threading.Event(), threading.Event()
    forward = model.forward

    def paused(*args, **kwargs):  # the first step waits until the test has tried to delete
        started.set()
        go.wait(30)
        return forward(*args, **kwargs)

    with running_server(gen, ServeSettings(served_model_name="toy")) as (base, _):
        model.forward = paused
        answer = {}
        worker = threading.Thread(target=lambda: answer.setdefault(
            "r", httpx.post(base + "/v1/images/generations", json={**BODY, "loras": {"style": 1.0}}, timeout=60)))
        worker.start()
        try:
            assert started.wait(30)
            r = httpx.delete(base + "/v1/loras/style", timeout=10)
            assert r.status_code == 409 and r.json()["error"]["code"] == "lora_in_use", r.text
            assert "1 queued or running" in r.json()["error"]["message"]
        finally:
            go.set()
            worker.join(60)
            del model.forward
        np.testing.assert_array_equal(_image(answer["r"]), styled)
        assert httpx.delete(base + "/v1/loras/style").status_code == 200  # free now
        assert httpx.get(base + "/v1/loras").json()["data"] == []
        gone = httpx.post(base + "/v1/images/generations", json={**BODY, "loras": {"style": 1.0}})
        assert gone.status_code == 400 and gone.json()["error"]["code"] == "lora_not_found"
        np.testing.assert_array_equal(_image(httpx.post(base + "/v1/images/generations", json=BODY)), plain)
