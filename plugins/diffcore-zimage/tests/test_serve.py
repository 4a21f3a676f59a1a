"""``diffcore serve --model z-image-turbo``: the alias resolves to the Hub id, found here in an offline Hugging Face
cache that holds the tiny checkpoint; the server's images equal generate()'s, and its parameter checks are the
model's (a bad cfg_truncation is a 400 naming it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")

from diffcore.testing.serving import decode_b64, free_port, openai_client  # noqa: E402

REPO = "Tongyi-MAI/Z-Image-Turbo"


@pytest.fixture(scope="module")
def hub_cache(folders, tmp_path_factory):
    """An HF cache in which the Turbo repo's main revision is the tiny checkpoint."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(folders["turbo"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_serve_alias_generates_like_generate(hub_cache, monkeypatch):
    from diffcore import DiffGenerator

    port = free_port()
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "diffcore.cli", "serve", "--model", "z-image-turbo", "--dtype",
                             "float32", "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline = [], time.monotonic() + 180
        for line in proc.stdout:
            lines.append(line)
            if "ready at" in line or time.monotonic() > deadline:
                break
        assert lines and "ready at" in lines[-1], "".join(lines)
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        client = openai_client(f"http://127.0.0.1:{port}")
        extras = {"seed": 5, "num_inference_steps": 2}
        out = client.images.generate(model="z-image-turbo", prompt="a red fox", size="48x32", extra_body=extras)
        monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
        gen = DiffGenerator.from_pretrained("z-image-turbo", dtype="float32", progress=False)
        assert type(gen.config).__name__ == "ZImageTurboConfig"
        want = gen.generate(prompt="a red fox", height=32, width=48, num_inference_steps=2, seed=5)
        np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="a fox", extra_body={"cfg_truncation": 2.0, "num_inference_steps": 2})
        assert info.value.body["param"] == "cfg_truncation"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
