"""Streamed images (``stream=true``): OpenAI's server-sent events for /v1/images/generations and /v1/images/edits.

Each output image sends ``partial_images`` previews (``<kind>.partial_image``: the predicted clean picture at
evenly spread denoising steps, diffcore.previews), then ``<kind>.completed`` with the final picture, encoded
exactly as the non-streamed answer's; ``kind`` is ``image_generation`` or ``image_edit``, the shapes those of
the ``openai`` client's ``ImageGenStreamEvent`` / ``ImageEditStreamEvent``. The requests are queued like any
other and batch with them (each row previews on its own). A failure after the stream started is an ``error``
event with the OpenAI error object (the client raises it). A client that disconnects, or a stream past
--request-timeout, cancels its requests at the next denoising step.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import QueueFullError
from ..outputs import to_pil
from . import schemas, unread
from .errors import APIError, bad_param, from_exception
from .peers import warning_headers

log = logging.getLogger("diffcore.serve")

# What diffcore counts per image: no tokens (the fields are there because clients read them).
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}


def sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def check_streamable(state, job: schemas.ImageJob) -> None:
    """A 400 naming ``stream`` where previews were asked of a model that has none."""
    if job.partial_images and not state.generator.can_preview:
        raise bad_param("stream", f"model {state.model_name!r} cannot stream partial images (its denoising does not "
                                  "make one picture per step): send partial_images=0 or leave stream out")


async def stream_images(request: Request, state, job: schemas.ImageJob, kind: str) -> StreamingResponse:
    from .routes import cancel_all, encode_result, prevalidate, submit_all

    check_streamable(state, job)
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def post(item) -> None:  # from the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the server's loop is gone (shutting down): nobody reads it
            pass

    reqs = []
    for i, kwargs in enumerate(job.kwargs):
        req = prevalidate(state, kwargs, warnings=job.warnings)
        if job.partial_images:
            state.generator.attach_previews(req, lambda p, i=i: post(("partial", i, p)), job.partial_images)
        reqs.append(req)
    try:
        futures = submit_all(state, reqs)
    except QueueFullError as exc:
        raise from_exception(exc) from None
    for i, future in enumerate(futures):
        future.add_done_callback(lambda f, i=i: post(("done", i, f)))

    def common(image_bytes: bytes, size: str, i: int) -> dict:
        extra = {"output_index": i} if len(job.kwargs) > 1 else {}
        return {"b64_json": base64.b64encode(image_bytes).decode(), "background": job.background,
                "created_at": int(time.time()), "output_format": job.output_format, "quality": "auto", "size": size,
                **extra}

    def partial_event(i: int, preview) -> bytes:
        image = to_pil(preview.output[0])
        data = schemas.encode_image(image, job.output_format, job.output_compression)
        return sse({"type": f"{kind}.partial_image", **common(data, f"{image.width}x{image.height}", i),
                    "partial_image_index": preview.index})

    def completed_events(i: int, result) -> bytes:
        image = result.images[0]
        out = b""
        for data, seed, which in encode_result(job, i, result):
            out += sse({"type": f"{kind}.completed", **common(data, f"{image.width}x{image.height}", i),
                        "usage": USAGE, "seed": seed, **which})
        return out

    async def events():
        deadline = loop.time() + state.settings.request_timeout
        left, stopped = len(futures), []

        def stop(why: str) -> None:  # cancel what still runs, once
            if not stopped and any(not f.done() for f in futures):
                cancel_all(state, futures, why)
            stopped.append(why)

        try:
            while left:
                try:
                    what, i, item = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0.001))
                except asyncio.TimeoutError:
                    stop("timeout")
                    error = APIError(504, f"the request took longer than --request-timeout "
                                          f"({state.settings.request_timeout:g} s)", type="server_error", code="timeout")
                    yield sse({"type": "error", **error.body()})
                    return
                if what == "partial":
                    yield await run_in_threadpool(partial_event, i, item)
                    continue
                left -= 1
                if item.exception() is not None:
                    error = from_exception(item.exception())
                    if error.status >= 500:
                        log.error("generation failed (streamed)", exc_info=item.exception())
                    stop("failed")
                    yield sse({"type": "error", **error.body()})
                    return
                try:
                    unread.check_result(item.result(), [])  # it set a field nothing read: a 400 (serve.unread)
                except APIError as error:
                    stop("failed")
                    yield sse({"type": "error", **error.body()})
                    return
                yield await run_in_threadpool(completed_events, i, item.result())
        finally:  # the client left (the response was cancelled) or the stream ended: nothing keeps computing
            stop("disconnect")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", **warning_headers(job.warnings)})
