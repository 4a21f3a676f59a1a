"""Video with sound through the CLI and the server: the mp4s carry an AAC track of the video's length."""
from __future__ import annotations

import numpy as np
import pytest

from diffcore.audio import read_audio

from ltx_testlib import SMALL
from test_distilled import distilled_checkpoint  # noqa: F401  (fixture)

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def test_cli_writes_an_mp4_with_sound(load, distilled_checkpoint, tmp_path, capsys):  # noqa: F811
    from diffcore.cli import main

    load(distilled_checkpoint)  # registers only this plugin for the CLI's loader
    out = tmp_path / "cat.mp4"
    code = main(["generate", "--model", str(distilled_checkpoint), "--prompt", "a cat plays a drum", "--height", "64",
                 "--width", "96", "--num-frames", "9", "--dtype", "float32", "--quiet", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    sound, rate = read_audio(out)
    assert rate == 24000 and sound.shape[0] == 2 and abs(sound.shape[1] / rate - 9 / 24) < 0.05


def test_video_job_returns_the_mp4_with_sound(generator, tmp_path):
    from diffcore.serve.settings import ServeSettings
    from diffcore.testing.serving import openai_client, running_server

    extra = {k: v for k, v in SMALL.items() if k not in ("height", "width", "num_frames", "frame_rate")}
    with running_server(generator, ServeSettings(served_model_name="ltx-2")) as (base, app):
        import httpx

        assert httpx.get(f"{base}/v1/playground/info").json()["audio"] is True
        client = openai_client(base)
        job = client.videos.create(model="ltx-2", prompt="a cat plays a drum", size="96x64", seconds="0.34",
                                   extra_body={**extra, "seed": 1, "spatio_temporal_guidance_blocks": "[0]"})  # a form field
        assert job.has_audio is True  # known when the job is created
        done = client.videos.poll(job.id, poll_interval_ms=20)
        assert done.status == "completed" and done.has_audio is True
        path = tmp_path / "job.mp4"
        path.write_bytes(client.videos.download_content(job.id).content)
    sound, rate = read_audio(path)  # round(0.34 s * 24 fps) + 1 = 9 frames = 0.375 s of sound
    assert rate == 24000 and sound.shape[0] == 2 and abs(sound.shape[1] / rate - 9 / 24) < 0.05
    want = generator.generate(prompt="a cat plays a drum", seed=1, **{**SMALL, "height": 64, "width": 96})
    n = min(sound.shape[1], want.audio.shape[1])
    assert np.corrcoef(sound[0, 1000:n - 1000], want.audio[0, 1000:n - 1000])[0, 1] > 0.9  # the job's own sound
