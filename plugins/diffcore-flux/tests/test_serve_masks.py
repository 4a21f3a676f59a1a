"""POST /v1/images/edits with a mask, over a real socket with the official openai client: inpainting on a
tiny FluxPipeline equals generate(image=..., mask=...) pixel for pixel, for OpenAI's transparent-pixel mask
and a black-and-white one; image-to-image through the same route with strength; bad masks answer 400."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")

from diffcore import DiffGenerator  # noqa: E402
from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.images import box_mask, random_picture  # noqa: E402
from diffcore.testing.serving import decode_b64, openai_client, running_server  # noqa: E402


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _openai_mask(picture, mask):
    """OpenAI's form: the picture with the area to edit made fully transparent."""
    from PIL import Image

    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))
    return rgba


def test_edit_with_mask_equals_generate(flux_folders):
    gen = DiffGenerator.from_pretrained(flux_folders["dev"], dtype="float32", progress=False)
    picture, mask = random_picture(32, 32, 3), box_mask(32, 32)
    extra = {"seed": 5, "num_inference_steps": 3, "guidance_scale": 3.5, "strength": 0.8}
    want = gen.generate(prompt="a yellow square", image=picture, mask=_openai_mask(picture, mask), height=32, width=32,
                        num_inference_steps=3, guidance_scale=3.5, strength=0.8, seed=5)
    same = gen.generate(prompt="a yellow square", image=picture, mask=mask, height=32, width=32, num_inference_steps=3,
                        guidance_scale=3.5, strength=0.8, seed=5)
    np.testing.assert_array_equal(np.asarray(want.images[0]), np.asarray(same.images[0]))  # the two conventions agree
    varied = gen.generate(prompt="a yellow square", image=picture, height=32, width=32, num_inference_steps=3,
                          guidance_scale=3.5, strength=0.8, seed=5)
    with running_server(gen, ServeSettings(served_model_name="flux")) as (base, _):
        client = openai_client(base)
        for sent in (_openai_mask(picture, mask), mask):
            out = client.images.edit(model="flux", image=("in.png", _png(picture), "image/png"),
                                     mask=("mask.png", _png(sent), "image/png"), prompt="a yellow square",
                                     size="32x32", extra_body=extra)
            np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))
        out = client.images.edit(model="flux", image=("in.png", _png(picture), "image/png"), prompt="a yellow square",
                                 size="32x32", extra_body=extra)  # no mask, strength: image-to-image
        np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(varied.images[0]))

        from PIL import Image

        bad = {"all black": Image.new("L", (32, 32), 0), "another aspect": box_mask(64, 32),
               "opaque RGBA, all black": Image.new("RGBA", (32, 32), (0, 0, 0, 255))}
        for why, sent in bad.items():
            with pytest.raises(openai.BadRequestError) as info:
                client.images.edit(image=("in.png", _png(picture), "image/png"), mask=("m.png", _png(sent), "image/png"),
                                   prompt="x", size="32x32", extra_body={"num_inference_steps": 1})
            assert info.value.body["param"] == "mask", (why, info.value.body)
        with pytest.raises(openai.BadRequestError) as info:  # a text-to-image model, an image without strength/mask
            client.images.edit(image=("in.png", _png(picture), "image/png"), prompt="x")
        assert info.value.body["param"] == "image" and "strength" in info.value.body["message"]


@pytest.mark.parametrize("kind", ["flux-crop", "klein"])
def test_edit_route_crop_and_klein_equal_generate(flux_folders, flux2_folders, kind):
    """padding_mask_crop as a form field (FLUX.1 inpaint: the result has the picture's size), and FLUX.2 [klein]
    inpainting, through images.edit: pixel for pixel generate()'s."""
    folder = flux_folders["dev"] if kind == "flux-crop" else flux2_folders["klein"]
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    picture, mask = random_picture(96, 80, 3), box_mask(96, 80, (0.5, 0.4, 0.75, 0.6))
    extra = {"seed": 5, "num_inference_steps": 3, "strength": 0.8}
    size = {}
    if kind == "flux-crop":
        extra["padding_mask_crop"] = 4
        size = {"height": 32, "width": 48}
    want = gen.generate(prompt="a yellow square", image=picture, mask=mask, **size, **extra)
    assert want.images[0].size == (96, 80)  # the crop is pasted back into the picture; klein paints at its size
    with running_server(gen, ServeSettings(served_model_name="m")) as (base, _):
        out = openai_client(base).images.edit(
            model="m", image=("in.png", _png(picture), "image/png"), mask=("mask.png", _png(_openai_mask(picture, mask)),
                                                                             "image/png"),
            prompt="a yellow square", **({"size": "48x32"} if size else {}), extra_body=extra)
    np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))
