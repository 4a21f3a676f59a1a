"""POST /v1/images/edits with several images (``image[]``) through the official openai client, on a tiny
Qwen-Image-Edit-Plus (2509): the edit equals generate(image=[...]) pixel for pixel, and more images than
the model takes is a 400 naming the limit."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")

from diffcore import DiffGenerator  # noqa: E402
from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, openai_client, png_bytes, running_server  # noqa: E402


def _image(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def edit_plus(qwen_folders):
    return DiffGenerator.from_pretrained(qwen_folders["edit_plus"], dtype="float32", progress=False)


def test_edit_with_several_images_equals_generate(edit_plus):
    first, second = _image(40, 24, seed=1), _image(24, 32, seed=2)  # different sizes and aspects
    files = [("first.png", png_bytes(first), "image/png"), ("second.png", png_bytes(second), "image/png")]
    extras = {"seed": 7, "num_inference_steps": 2, "true_cfg_scale": 4.0, "negative_prompt": "blurry"}
    with running_server(edit_plus, ServeSettings(served_model_name="qwen-edit-plus")) as (base, _):
        client = openai_client(base)
        out = client.images.edit(model="qwen-edit-plus", image=files, prompt="put the cat on the table", size="32x32",
                                 extra_body=extras)
        assert len(out.data) == 1 and out.data[0].seed == 7
        want = edit_plus.generate(prompt="put the cat on the table", image=[first, second], height=32, width=32,
                                  num_inference_steps=2, true_cfg_scale=4.0, negative_prompt="blurry", seed=7)
        np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))

        with pytest.raises(openai.BadRequestError) as info:  # Edit-Plus takes up to 3
            client.images.edit(image=files * 2, prompt="x", extra_body={"num_inference_steps": 2})
        assert info.value.body["param"] == "image"
        assert "at most 3 input image(s), got 4" in info.value.body["message"]
