"""LoRA adapter routes: list, upload (load), delete. Clients upload adapter files; the server never loads
a path a client names (operators preload files with `diffcore serve --lora PATH`)."""
from __future__ import annotations

import re
import tempfile
import threading
from collections import Counter
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .errors import APIError, bad_param, from_exception
from .routes import read_body, ready_state

router = APIRouter()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def lora_card(info) -> dict:
    return {"id": info.name, "object": "lora", "format": info.format, "component": info.component,
            "ranks": list(info.ranks), "layers": len(info.targets), "fused": info.fused}


@router.get("/v1/loras")
async def list_loras(request: Request):
    gen = ready_state(request).generator
    return {"object": "list", "data": [lora_card(info) for info in gen.loras.values()]}


@router.post("/v1/loras")
async def load_lora(request: Request):
    """multipart: ``file`` (a .safetensors LoRA), ``name`` (default: the file's stem), ``component``."""
    state = ready_state(request)
    body, files, form = await read_body(request)
    uploads = files.pop("file", [])
    if not form or len(uploads) != 1 or files:
        raise bad_param("file", "upload one LoRA .safetensors file as the multipart field 'file'")
    unknown = sorted(set(body) - {"name", "component"})
    if unknown:
        raise bad_param(unknown[0], f"unknown field {unknown[0]!r}; accepted: file, name, component")
    name = body.get("name") or "lora"
    if not _NAME.match(name):
        raise bad_param("name", f"name must be 1-128 letters, digits, '_', '.', '-', got {name!r}")
    component = body.get("component") or "transformer"

    def load():
        with tempfile.TemporaryDirectory(prefix="diffcore-lora-") as tmp:
            path = Path(tmp) / "adapter.safetensors"  # a server-made path
            path.write_bytes(uploads[0])
            return state.generator.load_lora(path, name=name, component=component)

    try:
        loaded = await run_in_threadpool(load)
    except Exception as exc:
        raise from_exception(exc, param="file") from None
    return lora_card(state.generator.loras[loaded])


@router.delete("/v1/loras/{name}")
async def delete_lora(request: Request, name: str):
    """409 while queued or running requests use the adapter (docs/serve.md): a request never runs with a
    half-removed adapter, and a delete never changes a picture already asked for."""
    state = ready_state(request)
    gen = state.generator
    if name not in gen.loras:
        raise APIError(404, f"no LoRA {name!r} is loaded (loaded: {', '.join(gen.loras) or 'none'})", param="name",
                       code="not_found")
    users = state.lora_users.count(name) if state.lora_users is not None else 0
    if users:
        raise APIError(409, f"LoRA {name!r} is used by {users} queued or running request(s); delete it when they "
                            "have finished", param="name", code="lora_in_use")
    try:  # a request that slipped in since is waited for by the engine (it never runs half-removed)
        await run_in_threadpool(gen.unload_lora, name)
    except Exception as exc:
        raise from_exception(exc, param="name") from None
    return {"id": name, "object": "lora.deleted", "deleted": True}


class AdapterUsers:
    """Queued and running requests per adapter name: the server's side of the adapters' reference count
    (the engine's own covers only running generations)."""

    def __init__(self, runner):
        self._counts: Counter = Counter()
        self._lock = threading.Lock()
        submit = runner.submit

        def tracked(request, *args, **kw):  # a validated Request (the routes), or generate() keywords
            loras = request.get("loras") if isinstance(request, dict) else request.params.loras
            names = [n for n in (loras or {}) if isinstance(n, str)]
            future = submit(request, *args, **kw)
            if names:
                with self._lock:
                    self._counts.update(names)
                future.add_done_callback(lambda _: self._release(names))
            return future

        runner.submit = tracked  # every route and the video jobs submit through the runner

    def _release(self, names) -> None:
        with self._lock:
            self._counts.subtract(names)

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts[name]
