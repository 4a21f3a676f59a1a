"""POST /v1/images/edits with the official openai client on a tiny FLUX.1-Kontext: the edit equals
generate(image=...), the upload limits answer 413 / 400, and the extras are the model's parameters."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")

from diffcore import DiffGenerator  # noqa: E402
from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, openai_client, png_bytes, running_server  # noqa: E402


@pytest.fixture(scope="module")
def kontext(flux_folders, tmp_path_factory):
    """The tiny Kontext with a 4-channel VAE: Kontext encodes its input at ~1 MP, which costs seconds otherwise."""
    import shutil

    from diffcore.testing.checkpoints import save_component, tiny_autoencoder_kl

    folder = tmp_path_factory.mktemp("serve") / "kontext"
    shutil.copytree(flux_folders["kontext"], folder)
    shutil.rmtree(folder / "vae")
    save_component(tiny_autoencoder_kl(block_out_channels=(4, 4, 4, 4), seed=2), folder / "vae")
    return DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)


def test_edit_equals_generate_and_uploads_are_capped(kontext):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    settings = ServeSettings(served_model_name="kontext", max_upload_bytes=20_000, max_upload_pixels=64 * 64)
    with running_server(kontext, settings) as (base, _):
        client = openai_client(base)
        out = client.images.edit(model="kontext", image=("in.png", png_bytes(source), "image/png"), prompt="make it red",
                                 size="32x32", extra_body={"seed": 2, "num_inference_steps": 2, "guidance_scale": 2.5})
        want = kontext.generate(prompt="make it red", image=source, height=32, width=32, num_inference_steps=2,
                                guidance_scale=2.5, seed=2)
        np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))

        with pytest.raises(openai.BadRequestError) as info:  # Kontext takes one image
            client.images.edit(image=[("a.png", png_bytes(source), "image/png"), ("b.png", png_bytes(source), "image/png")],
                               prompt="x", extra_body={"num_inference_steps": 1})
        assert info.value.body["param"] == "image" and "at most 1" in info.value.body["message"]
        noise = rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)  # ~43 kB as PNG: over the 20 kB cap
        with pytest.raises(openai.APIStatusError) as info:
            client.images.edit(image=("big.png", png_bytes(noise), "image/png"), prompt="x")
        assert info.value.status_code == 413 and info.value.body["code"] == "upload_too_large"
        flat = np.zeros((100, 100, 3), np.uint8)  # small file, but 10,000 pixels > the 4,096 allowed
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=("wide.png", png_bytes(flat), "image/png"), prompt="x")
        assert "pixels" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=("bad.png", b"not an image", "image/png"), prompt="x")
        assert "not a readable image" in info.value.body["message"]
        for extra, param in (({"guidance_scale_2": 2.0}, "guidance_scale_2"),  # not a FLUX parameter
                             ({"guidance_scale": "nan"}, "guidance_scale"),  # form fields are strings
                             ({"num_inference_steps": "two"}, "num_inference_steps"),
                             ({"num_inference_steps": "2.5"}, "num_inference_steps")):
            with pytest.raises(openai.BadRequestError) as info:
                client.images.edit(image=("in.png", png_bytes(source), "image/png"), prompt="x", extra_body=extra)
            assert info.value.body["param"] == param, info.value.body
        with pytest.raises(openai.BadRequestError) as info:  # JSON too
            client.images.generate(prompt="x", extra_body={"guidance_scale_2": 2.0})
        assert info.value.body["param"] == "guidance_scale_2" and "guidance_scale" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:  # an edit model needs its image
            client.images.generate(prompt="x", extra_body={"num_inference_steps": 1})
        assert info.value.body["param"] == "image"


def test_peer_image_to_image_shapes(kontext):
    """SGLang's bench_serving (multipart edits, extras str()-ed, num_outputs_per_prompt) and vLLM-Omni (chat
    completions with an image_url part; edits carrying bot_task) get the edit generate(image=...) makes."""
    import base64

    from diffcore.testing.peers import SGLangBenchServing, VLLMOmni
    from diffcore.testing.serving import decode_image

    source = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    want = np.asarray(kontext.generate(prompt="make it red", image=source, height=32, width=32, num_inference_steps=2,
                                       guidance_scale=2.5, seed=4).images[0])
    extra = {"seed": 4, "num_inference_steps": 2, "guidance_scale": 2.5}
    with running_server(kontext, ServeSettings(served_model_name="kontext")) as (base, _):
        sglang = SGLangBenchServing(base)
        assert sglang.model_info()["task_type"] == "image-to-image"
        response = sglang.image("kontext", "make it red", 32, 32, extra, images=[png_bytes(source)])
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(decode_image(base64.b64decode(response.json()["data"][0]["b64_json"])), want)

        vllm = VLLMOmni(base)
        response, images = vllm.chat_image("kontext", "make it red", {"height": 32, "width": 32, **extra},
                                           images=[png_bytes(source)])
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(decode_image(images[0]), want)
        response = vllm.edit("make it red", png_bytes(source), {"size": "32x32", "bot_task": "image_edit", **extra})
        assert response.status_code == 200 and "bot_task ignored" in response.headers["x-diffcore-warnings"]
        np.testing.assert_array_equal(decode_image(base64.b64decode(response.json()["data"][0]["b64_json"])), want)
        response, _ = vllm.chat_image("kontext", "make it red", {"height": 32, "width": 32, **extra})  # no image
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
