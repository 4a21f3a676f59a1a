"""LoRA over HTTP on the toy model: upload (POST /v1/loras), list, select per request with `loras`, delete."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, openai_client, running_server  # noqa: E402

def lora_file(model, rank: int = 2) -> bytes:
    """A PEFT-layout LoRA for the toy transformer's output projection and first attention query."""
    import torch
    from safetensors.torch import save

    g, state = torch.Generator().manual_seed(1), {}
    for name in ("blocks.0.attn1.to_q", "proj_out"):
        layer = model.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.5
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.5
    return save(state)


KW = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=3)


@pytest.fixture
def gen(toy_folder, toy_manager):
    from diffcore import DiffGenerator

    return DiffGenerator.from_pretrained(toy_folder, dtype="float32", progress=False, plugin_manager=toy_manager)


def test_upload_select_and_delete_a_lora(gen):
    adapter = lora_file(gen.components["transformer"])
    with running_server(gen, ServeSettings(served_model_name="toy")) as (base, _):
        up = httpx.post(base + "/v1/loras", files={"file": ("style.safetensors", io.BytesIO(adapter))}, data={"name": "style"})
        assert up.status_code == 200, up.text
        assert up.json()["id"] == "style" and up.json()["layers"] == 2
        assert [a["id"] for a in httpx.get(base + "/v1/loras").json()["data"]] == ["style"]

        client = openai_client(base)
        body = dict(prompt=KW["prompt"], size="32x32")
        styled = client.images.generate(**body, extra_body={"seed": 3, "num_inference_steps": 2, "loras": {"style": 0.8}})
        plain = client.images.generate(**body, extra_body={"seed": 3, "num_inference_steps": 2})
        np.testing.assert_array_equal(decode_b64(styled.data[0]), np.asarray(gen.generate(**KW, loras={"style": 0.8}).images[0]))
        np.testing.assert_array_equal(decode_b64(plain.data[0]), np.asarray(gen.generate(**KW).images[0]))
        assert not np.array_equal(decode_b64(styled.data[0]), decode_b64(plain.data[0]))

        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(**body, extra_body={"loras": {"nope": 1.0}, "num_inference_steps": 1})
        assert info.value.body["param"] == "loras" and info.value.body["code"] == "lora_not_found"
        bad = httpx.post(base + "/v1/loras", files={"file": ("x.safetensors", io.BytesIO(b"not a lora"))}, data={"name": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
        again = httpx.post(base + "/v1/loras", files={"file": ("s.safetensors", io.BytesIO(adapter))}, data={"name": "style"})
        assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
        assert httpx.post(base + "/v1/loras", json={"source": "/etc/passwd"}).status_code == 400  # no paths, uploads only

        assert httpx.delete(base + "/v1/loras/style").json() == {"id": "style", "object": "lora.deleted", "deleted": True}
        assert httpx.delete(base + "/v1/loras/style").status_code == 404
        assert httpx.get(base + "/v1/loras").json()["data"] == []
