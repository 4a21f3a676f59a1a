"""`torchrun -m diffcore serve` with sequence / CFG parallelism: real gloo groups on the CPU, rank 0 serving HTTP.

Concurrent OpenAI-client requests (batched by rank 0's scheduler, run on every rank) must equal a
one-process ``DiffGenerator.generate`` of the same request (fp32; the PNG within one level, PSNR >= 60 dB:
batching rounds differently in the last bits). A bad request is refused on rank 0 without desynchronising
the ranks (the next request still completes); an uploaded LoRA reaches every rank; SIGTERM to rank 0
drains it and every rank exits 0 (torchrun's own exit status says so).
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from diffcore.testing.serving import decode_b64, free_port, openai_client  # noqa: E402
from diffcore.testing.weights import psnr  # noqa: E402

READY = re.compile(r"ready at (http://127\.0\.0\.1:\d+)")
START_TIMEOUT = 240  # seconds for torchrun + two model loads on a loaded 2-core CI machine
PROMPT = "a red circle on a blue background"


class TorchrunServer:
    """``torchrun --standalone --nproc-per-node N -m diffcore serve ...`` on a free port."""

    def __init__(self, nproc: int, args: list[str]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "diffcore", "serve", "--port", str(free_port()), "--dtype", "float32", "--log-level", "warning", *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or self.url is None:
            self.kill()
            raise AssertionError("the server did not get ready:\n" + "".join(self.lines[-60:]))

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            found = READY.search(line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of torchrun's workers (its child processes, by their RANK variable)."""
        pid = self.proc.pid
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        out = {}
        for child in children:
            env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
            rank = next(int(v[5:]) for v in env if v.startswith(b"RANK="))
            out[rank] = int(child)
        return out

    def stop_rank0(self, timeout: float = 120) -> int:
        os.kill(self.ranks()[0], signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("the ranks did not exit after SIGTERM to rank 0:\n" + "".join(self.lines[-60:]))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # torchrun stops its workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ask_images(url: str, model: str, seeds: list[int], extra: dict) -> dict[int, np.ndarray]:
    client = openai_client(url)

    def ask(seed):
        reply = client.images.generate(model=model, prompt=PROMPT, size="48x48", response_format="b64_json",
                                       extra_body={"seed": seed, **extra})
        return seed, decode_b64(reply.data[0])

    with cf.ThreadPoolExecutor(len(seeds)) as pool:
        return dict(pool.map(ask, seeds))


def assert_same(served: np.ndarray, want, label: str) -> None:
    want = np.asarray(want.convert("RGB"), dtype=np.int16)
    served = served.astype(np.int16)
    assert served.shape == want.shape, label
    assert np.abs(served - want).max() <= 1 and psnr(served / 255, want / 255) >= 60, label


def peft_lora(model, rank: int = 2) -> bytes:
    """A PEFT-layout LoRA on the transformer's first two Linear layers."""
    import torch
    from safetensors.torch import save

    g, state = torch.Generator().manual_seed(1), {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:2]
    for name, layer in layers:
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.5
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.5
    return save(state)


@pytest.mark.slow
def test_sequence_parallel_server_equals_one_process(tmp_path):
    """sp_degree 2 on a tiny FLUX.1-dev (2 heads): 4 concurrent requests, one bad one, SIGTERM."""
    from diffcore import DiffGenerator
    from diffcore_flux.testing import write_tiny_flux

    folder = write_tiny_flux(tmp_path / "flux")
    server = TorchrunServer(2, ["--model", str(folder), "--sp-degree", "2", "--served-model-name", "flux"])
    try:
        extra = {"num_inference_steps": 2, "max_sequence_length": 16}
        served = ask_images(server.url, "flux", [0, 1, 2, 3], extra)
        with pytest.raises(openai.BadRequestError):  # refused on rank 0: never broadcast
            openai_client(server.url).images.generate(model="flux", prompt=PROMPT, size="48x48",
                                                      extra_body={"num_inference_steps": 0})
        served.update(ask_images(server.url, "flux", [4], extra))  # the ranks are still in step
        assert server.stop_rank0() == 0, "".join(server.lines[-40:])
    finally:
        server.kill()
    gen = DiffGenerator.from_pretrained(str(folder), dtype="float32", progress=False)
    for seed, image in served.items():
        want = gen.generate(prompt=PROMPT, height=48, width=48, seed=seed, **extra).images[0]
        assert_same(image, want, f"seed {seed}")


@pytest.mark.slow
def test_cfg_parallel_server_with_an_uploaded_lora_equals_one_process(tmp_path):
    """cfg_parallel on the bundled demo (true CFG): concurrent requests, then a LoRA uploaded over HTTP
    (it must reach rank 1 too, or the branches disagree), then SIGTERM."""
    from diffcore import DiffGenerator

    gen = DiffGenerator.from_pretrained("demo", dtype="float32", progress=False)
    adapter = peft_lora(gen.components["transformer"])
    extra = {"num_inference_steps": 2, "negative_prompt": "blurry", "true_cfg_scale": 3.0}
    server = TorchrunServer(2, ["--model", "demo", "--cfg-parallel"])
    try:
        served = ask_images(server.url, "demo", [0, 1, 2], extra)
        up = httpx.post(server.url + "/v1/loras", files={"file": ("style.safetensors", io.BytesIO(adapter))},
                        data={"name": "style"}, timeout=120)
        assert up.status_code == 200, up.text
        styled = ask_images(server.url, "demo", [5], dict(extra, loras={"style": 0.8}))[5]
        assert httpx.delete(server.url + "/v1/loras/style", timeout=60).status_code == 200
        with pytest.raises(openai.BadRequestError, match="style"):  # fails inside generation, on every rank alike
            ask_images(server.url, "demo", [7], dict(extra, loras={"style": 0.8}))
        again = ask_images(server.url, "demo", [6], extra)[6]
        assert server.stop_rank0() == 0, "".join(server.lines[-40:])
    finally:
        server.kill()
    for seed, image in served.items():
        assert_same(image, gen.generate(prompt=PROMPT, height=48, width=48, seed=seed, **extra).images[0], f"seed {seed}")
    (tmp_path / "style.safetensors").write_bytes(adapter)
    gen.load_lora(tmp_path / "style.safetensors", name="style")
    want = gen.generate(prompt=PROMPT, height=48, width=48, seed=5, loras={"style": 0.8}, **extra).images[0]
    assert_same(styled, want, "with the LoRA")
    plain = gen.generate(prompt=PROMPT, height=48, width=48, seed=5, **extra).images[0]
    assert np.abs(np.asarray(plain, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() > 1, \
        "the LoRA does not change the image: the test would not see a rank without it"
    assert_same(again, gen.generate(prompt=PROMPT, height=48, width=48, seed=6, **extra).images[0], "after delete")

