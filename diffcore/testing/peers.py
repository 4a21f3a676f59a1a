"""Other projects' clients, as they call a diffusion server: their request shapes, rewritten here from their
public code (which is not imported), so the tests can check that `diffcore serve` answers them unchanged.

Each class is one peer; its docstring names the code it follows. The tests use them through fixtures named
after the peer (``sglang_bench_serving``, ``sglang_test_helpers``, ``vllm_omni``, ``litellm``).
"""
from __future__ import annotations

import base64
import json
import time
from typing import Optional

import httpx


def _poll(client: httpx.Client, url: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(url)
        job.raise_for_status()
        job = job.json()
        if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


class SGLangBenchServing:
    """SGLang's diffusion benchmark, ``python/sglang/multimodal_gen/benchmarks/bench_serving.py`` with
    ``datasets.py`` (``RequestFuncInput``): it reads ``model_path`` from ``GET /v1/model_info``; images go
    as JSON to /v1/images/generations (``n: 1``, ``b64_json``, ``size`` from width x height, the extra body
    merged at the top level) or, with input images, as multipart to /v1/images/edits (every extra ``str()``-ed,
    each file in ``image`` as application/octet-stream); videos go as JSON to /v1/videos (``num_frames``,
    ``fps``, the extra body at the top level) or as multipart with the extra body as JSON text in one
    ``extra_body`` field and the image in ``input_reference``; then it polls GET /v1/videos/{id}. Newer
    versions carry ``num_outputs_per_prompt`` in the request."""

    def __init__(self, base: str):
        self.base, self.http = base, httpx.Client(timeout=120)

    def model_info(self) -> dict:
        response = self.http.get(self.base + "/v1/model_info", timeout=5)
        response.raise_for_status()
        return response.json()

    def image(self, model: str, prompt: str, width: int, height: int, extra_body: dict,
              images: Optional[list[bytes]] = None, num_outputs_per_prompt: int = 1) -> httpx.Response:
        extra = {"num_outputs_per_prompt": num_outputs_per_prompt, **extra_body}
        if images:
            data = {"model": model, "prompt": prompt, "response_format": "b64_json", "size": f"{width}x{height}",
                    **{k: str(v) for k, v in extra.items()}}
            files = [("image", (f"in{i}.png", raw, "application/octet-stream")) for i, raw in enumerate(images)]
            return self.http.post(self.base + "/v1/images/edits", data=data, files=files)
        payload = {"model": model, "prompt": prompt, "n": 1, "response_format": "b64_json", "size": f"{width}x{height}"}
        payload.update(extra)
        return self.http.post(self.base + "/v1/images/generations", json=payload)

    def video(self, model: str, prompt: str, width: int, height: int, num_frames: int, fps: int, extra_body: dict,
              image: Optional[bytes] = None, num_outputs_per_prompt: int = 1) -> tuple[httpx.Response, Optional[dict]]:
        """(the submit response, the polled job or None when the submit failed)."""
        extra = {"num_outputs_per_prompt": num_outputs_per_prompt, **extra_body}
        if image is not None:
            data = {"model": model, "prompt": prompt, "size": f"{width}x{height}", "extra_body": json.dumps(extra),
                    "num_frames": str(num_frames), "fps": str(fps)}
            files = [("input_reference", ("ref.png", image, "application/octet-stream"))]
            submit = self.http.post(self.base + "/v1/videos", data=data, files=files)
        else:
            payload = {"model": model, "prompt": prompt, "size": f"{width}x{height}", "num_frames": num_frames,
                       "fps": fps, **extra}
            submit = self.http.post(self.base + "/v1/videos", json=payload)
        if submit.status_code != 200:
            return submit, None
        return submit, _poll(self.http, f"{self.base}/v1/videos/{submit.json()['id']}")


class SGLangTestHelpers:
    """What SGLang's diffusion server tests expect of an OpenAI-style answer
    (``python/sglang/multimodal_gen/test/server``): an images response carries an ``id`` (and ``created``);
    a video request may give ``seconds`` and ``num_frames`` together (the frame count wins)."""

    @staticmethod
    def check_image_response(body: dict) -> None:
        assert isinstance(body.get("id"), str) and body["id"], body
        assert isinstance(body.get("created"), int)
        assert body["data"] and all("b64_json" in d or "url" in d for d in body["data"])

    @staticmethod
    def video_body(model: str, prompt: str, size: str, seconds: str, num_frames: int, extra: dict) -> dict:
        return {"model": model, "prompt": prompt, "size": size, "seconds": seconds, "num_frames": num_frames, **extra}


class VLLMOmni:
    """vLLM-Omni's clients: ``benchmarks/diffusion/diffusion_benchmark_serving.py`` and
    ``examples/online_serving/text_to_image/openai_chat_client.py`` post ``{"model", "messages", "extra_body":
    {height, width, num_inference_steps, seed, ..., num_outputs_per_prompt}}`` to /v1/chat/completions (input
    images as ``image_url`` data-URL parts) and read ``choices[0].message.content[i].image_url.url``; image
    edits may carry ``bot_task``; the text-to-video example posts multipart to /v1/videos with ``width``,
    ``height``, ``num_frames``, ``fps`` and the sampling fields as form fields; ``/v1/videos/sync`` takes the
    same form and answers the mp4 bytes."""

    def __init__(self, base: str):
        self.base, self.http = base, httpx.Client(timeout=120)

    def chat_image(self, model: Optional[str], prompt: str, extra_body: dict,
                   images: Optional[list[bytes]] = None) -> tuple[httpx.Response, list[bytes]]:
        if images:
            content = [{"type": "text", "text": prompt}]
            content += [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode()}}
                        for raw in images]
        else:
            content = prompt
        payload = {"messages": [{"role": "user", "content": content}], "extra_body": extra_body}
        if model is not None:
            payload["model"] = model
        response = self.http.post(self.base + "/v1/chat/completions", json=payload)
        out = []
        if response.status_code == 200:
            for choice in response.json()["choices"]:
                for item in choice["message"]["content"]:
                    url = item["image_url"]["url"]
                    assert url.startswith("data:image"), url[:40]
                    out.append(base64.b64decode(url.split(",", 1)[1]))
        return response, out

    def edit(self, prompt: str, image: bytes, fields: dict) -> httpx.Response:
        data = {"prompt": prompt, **{k: str(v) for k, v in fields.items()}}
        return self.http.post(self.base + "/v1/images/edits", data=data,
                              files=[("image", ("input.png", image, "image/png"))])

    def video_form(self, prompt: str, fields: dict, sync: bool = False) -> httpx.Response:
        data = {"prompt": prompt, **{k: str(v) for k, v in fields.items()}}  # curl -F: multipart, no file
        return self.http.post(self.base + ("/v1/videos/sync" if sync else "/v1/videos"),
                              files={k: (None, v) for k, v in data.items()})

    def poll(self, job_id: str) -> dict:
        return _poll(self.http, f"{self.base}/v1/videos/{job_id}")


class LiteLLM:
    """LiteLLM's OpenAI provider (``litellm/llms/openai/videos/transformation.py``; images go through the
    openai client, as ``diffcore.testing.serving.openai_client`` does): ``video_generation`` posts form data
    (``model``, ``prompt``, ``seconds``, ``size``, ``user``; ``input_reference`` as a file named
    input_reference.png when given); ``video_status`` GETs /v1/videos/{id}; ``video_content`` GETs
    /v1/videos/{id}/content with a ``video_id`` query parameter."""

    def __init__(self, base: str, api_key: str = "sk-none"):
        self.base = base
        self.http = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {api_key}"})

    def video_generation(self, model: str, prompt: str, seconds: str, size: str,
                         input_reference: Optional[bytes] = None) -> httpx.Response:
        data = {"model": model, "prompt": prompt, "seconds": seconds, "size": size, "user": "litellm-user"}
        files = [("input_reference", ("input_reference.png", input_reference, "image/png"))] if input_reference else None
        return self.http.post(self.base + "/v1/videos", data=data, files=files)

    def video_status(self, video_id: str) -> dict:
        return _poll(self.http, f"{self.base}/v1/videos/{video_id}")

    def video_content(self, video_id: str) -> httpx.Response:
        return self.http.get(f"{self.base}/v1/videos/{video_id}/content", params={"video_id": video_id})
