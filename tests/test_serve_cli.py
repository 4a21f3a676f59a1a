"""`diffcore serve` as a process: prints its URL when ready, serves the bundled demo model, and exits 0 on
SIGTERM or SIGINT after finishing what it holds."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
pytest.importorskip("diffcore_demo", reason="the demo plugin (bundled model) is not installed")

from diffcore.testing.serving import decode_b64, free_port, openai_client  # noqa: E402


def start(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffcore.cli", "serve", "--model", "demo", "--port", str(port),
                             "--log-level", "warning", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    lines = []
    for line in proc.stdout:  # blocks until the server prints; ends if it dies
        lines.append(line)
        if "ready at" in line:
            break
        if time.monotonic() > deadline:
            break
    else:
        pytest.fail("diffcore serve exited before it was ready:\n" + "".join(lines))
    assert f"ready at http://127.0.0.1:{port}" in lines[-1], "".join(lines)
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
    return proc, f"http://127.0.0.1:{port}"


def test_bad_serve_flag_is_refused_before_loading():
    bad = subprocess.run([sys.executable, "-m", "diffcore.cli", "serve", "--max-queue", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "max_queue" in bad.stderr


def test_serve_command_generates_like_generate_and_drains_on_sigterm():
    """(SIGINT goes to the same handler; one process start is all this test can afford.)"""
    from diffcore import DiffGenerator

    proc, base = start("--max-queue", "4")
    try:
        with urllib.request.urlopen(base + "/health") as r:
            assert json.load(r) == {"status": "ok", "model": "demo"}
        client = openai_client(base)
        out = client.images.generate(model="demo", prompt="a red circle on a blue background", size="64x64",
                                     extra_body={"seed": 7, "num_inference_steps": 4})
        want = DiffGenerator.from_pretrained("demo", progress=False).generate(
            prompt="a red circle on a blue background", height=64, width=64, num_inference_steps=4, seed=7)
        np.testing.assert_array_equal(decode_b64(out.data[0]), np.asarray(want.images[0]))

        results = []
        slow = threading.Thread(target=lambda: results.append(client.images.generate(
            prompt="a green square", extra_body={"seed": 1, "num_inference_steps": 20})))
        slow.start()
        time.sleep(0.5)  # the request is in flight when the signal arrives
        proc.send_signal(signal.SIGTERM)
        slow.join(120)
        assert proc.wait(120) == 0
        assert len(results) == 1 and len(results[0].data) == 1  # it was finished, not dropped
    finally:
        if proc.poll() is None:
            proc.kill()
