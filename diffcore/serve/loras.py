"""LoRA adapter routes: list, upload (load), delete. Clients upload adapter files; the server never loads
a path a client names (operators preload files with `diffcore serve --lora PATH`)."""
from __future__ import annotations

import re
import tempfile
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
    gen = ready_state(request).generator
    if name not in gen.loras:
        raise APIError(404, f"no LoRA {name!r} is loaded (loaded: {', '.join(gen.loras) or 'none'})", param="name",
                       code="not_found")
    try:
        gen.unload_lora(name)
    except Exception as exc:
        raise from_exception(exc, param="name") from None
    return {"id": name, "object": "lora.deleted", "deleted": True}
