"""Ray Serve replicas of diffcore serve: a real local Ray (num_cpus=2), 2 replicas of the bundled demo
model, concurrent OpenAI-client requests; every image equals the one-process output for its seed,
and both replicas answered."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import socket

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the Ray test needs the diffcore[ray] extra")
openai = pytest.importorskip("openai")

KW = dict(height=64, width=64, num_inference_steps=2)
PROMPT = "a red circle on a blue background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_concurrent_openai_requests():
    from ray import serve

    from diffcore import DiffGenerator
    from diffcore.serve.ray import REPLICA_HEADER, run
    from diffcore.serve.settings import ServeSettings

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        url = run("demo", ServeSettings(host="127.0.0.1", port=port), {"dtype": "float32", "progress": False},
                  replicas=2, address="auto", cpus_per_replica=0.5, max_ongoing_requests=2, block=False)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(seed: int):
            raw = client.images.with_raw_response.generate(
                model="demo", prompt=PROMPT, size="64x64", response_format="b64_json",
                extra_body={"seed": seed, "num_inference_steps": KW["num_inference_steps"]})
            image = Image.open(io.BytesIO(base64.b64decode(raw.parse().data[0].b64_json)))
            return seed, raw.headers[REPLICA_HEADER], np.asarray(image.convert("RGB"), dtype=np.int16)

        seeds = list(range(8))
        with cf.ThreadPoolExecutor(len(seeds)) as pool:
            answers = list(pool.map(ask, seeds))
        replicas = {replica for _, replica, _ in answers}
        assert len(replicas) == 2, f"requests were not spread over both replicas: {replicas}"
        gen = DiffGenerator.from_pretrained("demo", dtype="float32", progress=False)
        for seed, _, image in answers:
            want = gen.generate(prompt=PROMPT, seed=seed, **KW).images[0]
            want = np.asarray(want.convert("RGB"), dtype=np.int16)
            assert image.shape == want.shape
            assert np.abs(image - want).max() <= 1, f"seed {seed}: the served image differs"
    finally:
        serve.shutdown()
        ray.shutdown()
