"""``POST /v1/chat/completions`` for image models, the way vLLM-Omni serves diffusion models: the last user
message is the prompt (its text parts) and the input images (its ``image_url`` parts, as data URLs); the
sampling fields come at the top level or in a nested ``extra_body`` object; the reply is one assistant message
whose content is a list of ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``.
"""
from __future__ import annotations

import base64
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from . import schemas
from .errors import bad_param
from .peers import merge_extra_body, warning_headers
from .routes import ClientGone, has_alpha, read_body, ready_state, render_images, upload_images

router = APIRouter()


def parse_messages(messages) -> tuple[str, list[bytes]]:
    """(prompt, input image bytes) from the last user message."""
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "messages must be a non-empty list of {role, content}")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise bad_param("messages", "messages has no user message: the prompt is the last user message's text")
    content = users[-1].get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_param("messages", "a message's content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_param("messages", "an image_url part needs image_url.url: a 'data:image/...;base64,' URL")
            images.append(schemas.decode_data_url(url, "messages"))
        else:
            raise bad_param("messages", f"unsupported content part {kind!r}: use 'text' and 'image_url' parts")
    return " ".join(texts), images


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = ready_state(request)
    gen = state.generator
    if gen.config.is_video:
        raise bad_param("model", f"model {state.model_name!r} generates videos; use POST /v1/videos")
    body, _, form = await read_body(request)
    if form:
        raise bad_param("messages", "send chat completions as JSON")
    body = merge_extra_body(body, form=False)
    prompt, raw = parse_messages(body.pop("messages", None))
    params = gen.sampling_params_cls
    if raw and params.max_images == 0:
        raise bad_param("messages", f"model {state.model_name!r} takes no input image")
    if len(raw) > params.max_images:
        raise bad_param("messages", f"model {state.model_name!r} takes at most {params.max_images} input image(s)")
    if not raw and params.min_images > 0:
        raise bad_param("messages", f"model {state.model_name!r} edits images: add an image_url part to the message")
    images = await run_in_threadpool(upload_images, state, raw, "messages") if raw else None
    job = schemas.image_job({**body, "prompt": prompt}, state.model_names, params, images=images,
                            alpha=has_alpha(state))
    if job.response_format != "b64_json":
        raise bad_param("response_format", "chat completions answer with data URLs; leave response_format out")
    try:
        encoded, _ = await render_images(request, state, job)
    except ClientGone:
        return Response(status_code=499)
    media = schemas.IMAGE_FORMATS[job.output_format]
    content = [{"type": "image_url", "image_url": {"url": f"data:{media};base64,{base64.b64encode(data).decode()}"}}
               for data, _, _ in encoded]
    reply = {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()),
             "model": state.model_name,
             "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    return JSONResponse(reply, headers=warning_headers(job.warnings))
