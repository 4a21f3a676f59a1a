"""200 concurrent requests against the real server: every one answered 200 or 429, none lost or duplicated,
every image right for its own seed, and the server still answering afterwards."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")

from diffcore.serve.settings import ServeSettings  # noqa: E402
from diffcore.testing.serving import decode_b64, openai_client, running_server  # noqa: E402

N, PROMPTS = 200, ["a red circle", "a blue square", "a green circle on red"]


def test_200_concurrent_requests(toy_gen):
    settings = ServeSettings(served_model_name="toy", max_queue=16, max_batch_size=8, batch_wait_ms=10)
    with running_server(toy_gen, settings) as (base, app):
        client = openai_client(base)
        gate = threading.Barrier(N)

        def one(i: int):
            gate.wait()
            try:
                out = client.images.generate(prompt=PROMPTS[i % 3], size="32x32",
                                             extra_body={"seed": 1000 + i, "num_inference_steps": 4})
            except openai.RateLimitError as exc:
                return i, 429, exc.body
            return i, 200, out

        with cf.ThreadPoolExecutor(N) as pool:
            answers = list(pool.map(one, range(N)))
        alive = client.images.generate(prompt="a red circle", size="32x32", extra_body={"seed": 5, "num_inference_steps": 2})
        deadline = time.monotonic() + 30
        while app.state.diffcore.runner.queue_depth and time.monotonic() < deadline:
            time.sleep(0.01)  # a scheduler may count a request until just after its caller hears back
        queue_after = app.state.diffcore.runner.queue_depth

    assert sorted(i for i, _, _ in answers) == list(range(N))  # each request answered exactly once
    ok = [(i, out) for i, status, out in answers if status == 200]
    refused = [body for _, status, body in answers if status == 429]
    assert len(ok) + len(refused) == N
    assert ok and refused, f"{len(ok)} answered, {len(refused)} refused: the test must see both"
    assert all(body["code"] == "queue_full" for body in refused)
    got = {}
    for i, out in ok:
        assert len(out.data) == 1 and out.data[0].seed == 1000 + i  # its own request, not another's
        got[i] = decode_b64(out.data[0]).astype(int)
    for i, image in got.items():  # the engine's batches may differ from a solo run by rounding only
        want = np.asarray(toy_gen.generate(prompt=PROMPTS[i % 3], height=32, width=32, num_inference_steps=4,
                                           seed=1000 + i).images[0]).astype(int)
        assert np.abs(image - want).max() <= 1, f"request {i}: not the image of its own seed"
    first, second = list(got)[:2]
    assert np.abs(got[first] - got[second]).max() > 8  # distinct seeds give distinct images
    assert decode_b64(alive.data[0]).shape == (32, 32, 3) and queue_after == 0
