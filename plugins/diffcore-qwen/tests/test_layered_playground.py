"""The playground shows a Qwen-Image-Layered result's RGBA layers side by side, captioned, in a real headless
chromium (Debian's, driven by playwright): upload an RGBA picture, generate, and see every layer the model makes
for that seed, pixel for pixel generate()'s."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.browser import FLAGS, chromium  # noqa: E402
from diffcore.testing.serving import running_server  # noqa: E402


def test_playground_shows_the_layers_side_by_side(qwen_layered_folder, tmp_path):
    from PIL import Image

    from diffcore import DiffGenerator
    from diffcore.testing.images import random_rgba

    exe = chromium()
    gen = DiffGenerator.from_pretrained(qwen_layered_folder, dtype="float32", progress=False)
    picture = random_rgba(40, 48, 6)
    picture.save(tmp_path / "in.png")
    with running_server(gen, ServeSettings(served_model_name="layered")) as (base, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'layered'", timeout=20_000)
            page.fill("#prompt", "a red square over a blue circle")
            for field, value in (("#width", ""), ("#height", ""), ("#steps", "2"), ("#seed", "3")):
                page.fill(field, value)  # the size comes from the picture and `resolution`
            page.set_input_files("#image", str(tmp_path / "in.png"))
            page.click("#generate")
            page.wait_for_function("(() => { const i = document.querySelectorAll('#result .layers figure img');"
                                   " return document.getElementById('error').textContent !== '' || (i.length > 0 &&"
                                   " [...i].every((e) => e.complete && e.naturalWidth > 0)); })()", timeout=180_000)
            assert page.inner_text("#error") == ""
            figures = page.locator("#result .layers figure")
            captions = [figures.nth(i).locator("figcaption").inner_text() for i in range(figures.count())]
            boxes = [figures.nth(i).bounding_box() for i in range(figures.count())]
            sources = [figures.nth(i).locator("img").get_attribute("src") for i in range(figures.count())]
            history = page.locator("#history .layers figure").count()  # the thumbnail keeps the row
        finally:
            browser.close()
    want = gen.generate(prompt="a red square over a blue circle", image=picture, num_inference_steps=2, seed=3)
    assert want.layers == 4 and captions == ["layer 1", "layer 2", "layer 3", "layer 4"] and history == 4
    assert len({round(b["y"]) for b in boxes}) == 1  # one row ...
    assert all(a["x"] + a["width"] <= b["x"] for a, b in zip(boxes, boxes[1:]))  # ... side by side, in order
    for src, layer in zip(sources, want.images):
        shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert shown.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(layer))
