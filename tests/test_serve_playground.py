"""The playground page in a real headless chromium (Debian's, driven by playwright): ask for the API key,
type a prompt, generate, and see the picture the model makes for that seed."""
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


def test_playground_generates_in_a_browser(toy_gen, tmp_path):
    from PIL import Image

    exe = chromium()
    settings = ServeSettings(served_model_name="toy", api_key="browser-key")
    with running_server(toy_gen, settings) as (base, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=FLAGS)  # playwright makes a fresh profile
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#key-box:not(.hidden)", timeout=20_000)  # the page asks for the key
            page.fill("#api-key", "browser-key")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'toy'", timeout=20_000)
            page.fill("#prompt", "a red circle")
            page.fill("#width", "32")
            page.fill("#height", "32")
            page.fill("#steps", "2")
            page.fill("#seed", "11")
            page.click("#generate")
            page.wait_for_function("(() => { const i = document.querySelector('#result img');"
                                   " return i && i.complete && i.naturalWidth > 0; })()", timeout=60_000)
            assert page.inner_text("#error") == ""
            src = page.get_attribute("#result img", "src")
            assert page.locator("#history figure").count() == 1
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 1000
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    want = np.asarray(toy_gen.generate(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=11).images[0])
    np.testing.assert_array_equal(shown, want)


def test_playground_api_key_messages_and_errors_in_user_words(toy_gen):
    """Missing key: the page says where to type it; a wrong one: it says the server refused it; the key is
    kept for this tab only unless "remember" is ticked; an engine refusal is shown with the page's labels and
    what to do, not the Python API's text."""
    exe = chromium()
    settings = ServeSettings(served_model_name="toy", api_key="right-key")
    with running_server(toy_gen, settings) as (base, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#key-box:not(.hidden)", timeout=20_000)
            assert "type it in the API key field at the top of the form" in page.inner_text("#key-message")
            assert page.inner_text("#model") == "API key needed"
            page.fill("#api-key", "wrong-key")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('key-message').textContent.includes('refused')",
                                   timeout=20_000)
            assert "--api-key or DIFFCORE_API_KEY" in page.inner_text("#key-message")
            page.fill("#api-key", "right-key")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'toy'", timeout=20_000)
            assert page.inner_text("#key-message") == ""
            stored = "[sessionStorage.getItem('diffcore-api-key'), localStorage.getItem('diffcore-api-key')]"
            assert page.evaluate(stored) == ["right-key", None]  # this tab only
            page.check("#remember-key")
            assert page.evaluate(stored) == ["right-key", "right-key"]
            page.uncheck("#remember-key")
            assert page.evaluate(stored) == ["right-key", None]

            page.fill("#prompt", "a red circle")
            page.fill("#width", "8192")
            page.fill("#height", "8192")
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=20_000)
            shown = page.inner_text("#error")
        finally:
            browser.close()
    assert shown.startswith("Width x height: 8192 x 8192") and "over this server's limit of " in shown, shown
    assert shown.endswith("Change it and try again."), shown
    for python_text in ("invalid sampling parameter", "EngineArgs", "max_pixels", "DIFFCORE_MAX_PIXELS"):
        assert python_text not in shown, shown


def test_playground_brush_mask_and_strength(tmp_path):
    """An uploaded picture is masked with the brush (painted pixels turn transparent: OpenAI's mask form), the
    strength slider is set, the edit comes back, and it equals generate(image=..., mask=<that canvas>, strength=...)."""
    from PIL import Image

    from diffcore import DiffGenerator
    from diffcore_flux.testing import write_tiny_flux

    exe = chromium()
    gen = DiffGenerator.from_pretrained(write_tiny_flux(tmp_path / "flux"), dtype="float32", progress=False)
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    picture.save(tmp_path / "in.png")
    with running_server(gen, ServeSettings(served_model_name="flux")) as (base, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'flux'", timeout=20_000)
            assert page.is_visible("#image-box") and page.is_visible("#strength-box")
            page.fill("#prompt", "a yellow square")
            for field, value in (("#width", "32"), ("#height", "32"), ("#steps", "3"), ("#seed", "5")):
                page.fill(field, value)
            page.set_input_files("#image", str(tmp_path / "in.png"))
            page.wait_for_selector("#mask-canvas[data-ready='1']", timeout=20_000)
            page.eval_on_selector("#brush", "(e) => { e.value = '48'; }")  # a wide brush: 6 of the picture's 32 px
            box = page.locator("#mask-canvas").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
            page.mouse.down()  # one stroke across the middle
            page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.5, steps=8)
            page.mouse.up()
            page.eval_on_selector("#strength", "(e) => { e.value = '0.8'; e.dispatchEvent(new Event('input')); }")
            assert page.inner_text("#strength-value") == "0.8"
            mask_url = page.evaluate("document.getElementById('mask-canvas').toDataURL('image/png')")
            page.click("#generate")
            page.wait_for_function("(() => { const i = document.querySelector('#result img');"
                                   " return i && i.complete && i.naturalWidth > 0; })()", timeout=60_000)
            assert page.inner_text("#error") == ""
            src = page.get_attribute("#result img", "src")
        finally:
            browser.close()
    mask = Image.open(io.BytesIO(base64.b64decode(mask_url.split(",", 1)[1])))
    alpha = np.asarray(mask.getchannel("A"))
    assert mask.size == (32, 32) and 0 < (alpha == 0).sum() < 32 * 32  # the stroke, transparent; the rest kept
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    want = gen.generate(prompt="a yellow square", image=picture, mask=mask, strength=0.8, height=32, width=32,
                        num_inference_steps=3, seed=5).images[0]
    np.testing.assert_array_equal(shown, np.asarray(want))
