"""The OpenAI surface on a tiny FLUX.2 [dev]: /v1/images/edits with several reference images (``image[]``)
equals generate(image=[...]) pixel for pixel, /v1/images/generations equals text-to-image, and more
references than the model takes is a 400 naming the limit."""
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


def test_edits_with_several_references_and_generations(flux2_folders):
    gen = DiffGenerator.from_pretrained(flux2_folders["dev"], dtype="float32", progress=False)
    refs = [_image(64, 80, 1), _image(96, 64, 2), _image(72, 72, 3)]
    files = [(f"r{i}.png", png_bytes(r), "image/png") for i, r in enumerate(refs)]
    extras = {"seed": 7, "num_inference_steps": 2, "guidance_scale": 3.0, "max_sequence_length": 16}
    with running_server(gen, ServeSettings(served_model_name="flux2-dev")) as (base, _):
        client = openai_client(base)
        out = client.images.edit(model="flux2-dev", image=files, prompt="put the cat in the room", size="48x32",
                                 extra_body=extras)
        want = gen.generate(prompt="put the cat in the room", image=refs, height=32, width=48, num_inference_steps=2,
                            guidance_scale=3.0, max_sequence_length=16, seed=7)
        np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))

        out = client.images.generate(model="flux2-dev", prompt="a red cat", size="32x32", extra_body=extras)
        want = gen.generate(prompt="a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                            max_sequence_length=16, seed=7)
        np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))

        with pytest.raises(openai.BadRequestError) as info:  # FLUX.2 takes up to 10 references
            client.images.edit(image=files * 4, prompt="x", extra_body={"num_inference_steps": 2})
        assert info.value.body["param"] == "image"
        assert "at most 10 input image(s), got 12" in info.value.body["message"]
