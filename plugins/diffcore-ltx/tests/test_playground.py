"""The playground plays an LTX-2 video with its sound, in a real headless chromium (Debian's, driven by playwright):
the page asks for a video job, shows a <video> that is not muted, chromium decodes its AAC track (audio bytes
decoded while it plays), and the mp4 the element plays carries the job's stereo sound at the vocoder's rate."""
from __future__ import annotations

import base64

import pytest

from diffcore.audio import read_audio

from test_distilled import distilled_checkpoint  # noqa: F401  (fixture)

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

# the mp4 the <video> element plays, read back from its blob URL as base64
_VIDEO_BYTES = """async () => {
  const buf = await (await fetch(document.querySelector('#result video').src)).arrayBuffer();
  let s = ''; const bytes = new Uint8Array(buf);
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s);
}"""


def test_playground_plays_the_video_with_its_sound(load, distilled_checkpoint, tmp_path):  # noqa: F811
    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.browser import FLAGS, chromium
    from diffcore.testing.serving import running_server

    exe = chromium()
    gen = load(distilled_checkpoint)  # 8 distilled steps, no guidance: the playground's defaults fit the tiny model
    with running_server(gen, ServeSettings(served_model_name="ltx-2")) as (base, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=[*FLAGS, "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'ltx-2 (video with sound)'",
                                   timeout=20_000)
            assert page.is_visible("#frames")
            page.fill("#prompt", "a cat plays a drum")
            page.fill("#width", "96")
            page.fill("#height", "64")
            page.fill("#frames", "9")
            page.fill("#seed", "1")
            page.click("#generate")
            page.wait_for_selector("#result video", timeout=120_000)
            assert page.inner_text("#error") == ""
            # chromium demuxed the mp4 and found sound: metadata loaded, not muted, audio bytes decoded while playing
            page.wait_for_function("(() => { const v = document.querySelector('#result video');"
                                   " return v.readyState >= 2 && v.webkitAudioDecodedByteCount > 0; })()",
                                   timeout=30_000)
            state = page.evaluate("(() => { const v = document.querySelector('#result video');"
                                  " return [v.muted, v.duration, v.videoWidth, v.videoHeight, v.error]; })()")
            played = page.evaluate(_VIDEO_BYTES)
        finally:
            browser.close()
    muted, duration, width, height, error = state
    assert muted is False and error is None and (width, height) == (96, 64)
    assert abs(duration - 9 / 24) < 0.1
    path = tmp_path / "played.mp4"
    path.write_bytes(base64.b64decode(played))
    sound, rate = read_audio(path)
    assert rate == 24000 and sound.shape[0] == 2 and abs(sound.shape[1] / rate - 9 / 24) < 0.05
    assert abs(sound).max() > 0.01  # a sound, not silence
