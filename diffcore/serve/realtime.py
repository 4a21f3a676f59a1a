"""WebSocket ``/v1/realtime/video``: a block-causal video model's blocks sent as soon as each is decoded.

The protocol (docs/serve.md has it in full): the client sends ``{"type": "start", ...the /v1/videos fields
and the model's parameters..., "format": "fmp4" | "rgb24"}``; for every finished block the server sends
``{"type": "block", "index", "num_frames", "width", "height"}`` and then one binary message (the block as a
fragmented-MP4 chunk, serve.fmp4, or its frames as raw RGB bytes); ``{"type": "prompt", "prompt"}`` changes the
prompt from the next block that starts; the server ends a generation with ``{"type": "done"}`` and the socket
stays open for another ``start``. Closing the socket cancels the generation at its next denoising step.

Why a block boundary: the causal stage (diffcore.stages.causal) reads the prompt's condition at the start of
every block, and the request's ``block_callback`` runs right before the next block starts. The callback is
where a new prompt is encoded (in the generation's thread, by the pipeline's own stages) and swapped in, so
a prompt read before block ``b`` ends is used from block ``b + 1`` on, and the server says so
(``{"type": "prompt", "from_block": b + 1}``).

Bad input (not JSON, an unknown control, a prompt with no generation running, a model without causal blocks,
bad parameters) gets ``{"type": "error", "error": {OpenAI's error object}}`` and the socket is closed (1008;
1013 when the server is busy, 1011 for its own failures); other connections are not affected. The Host and
Origin rules and the API key apply to the handshake (serve.app.Guard): a browser page of another site cannot
open it. Without the key in an ``Authorization`` header, the first message must be ``{"type": "auth",
"api_key": KEY}`` (browsers cannot set headers on a WebSocket).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
from typing import Optional

from fastapi import APIRouter, WebSocket
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..errors import QueueFullError, RequestCancelledError
from ..outputs import to_uint8
from . import schemas
from .errors import APIError, bad_param, from_exception
from .fmp4 import Fmp4Stream
from .routes import _static, cancel_all, prevalidate, submit_all

log = logging.getLogger("diffcore.serve")
router = APIRouter()

FORMATS = ("fmp4", "rgb24")
CONTROLS = ("auth", "start", "prompt")


def close_code(error: APIError) -> int:
    """The WebSocket close code that goes with an error's HTTP status."""
    if error.status in (429, 503):
        return 1013  # try again later
    return 1011 if error.status >= 500 else 1008


def parse(message: dict) -> dict:
    """A client message -> its JSON object with a known ``type``; anything else is an APIError."""
    text = message.get("text")
    if text is None:
        raise APIError(400, "binary messages are not part of this protocol: send JSON text messages such as "
                            '{"type": "start", "prompt": "..."}', code="invalid_message")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the message is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "a message must be a JSON object with a 'type'", code="invalid_json")
    kind = body.get("type")
    if kind not in CONTROLS:
        raise APIError(400, f"unknown message type {kind!r}: send one of {', '.join(map(repr, CONTROLS))}",
                       param="type", code="unknown_message_type")
    return body


def causal_stage_index(pipeline) -> int:
    from ..stages.causal import CausalDMDDenoisingStage

    return next(i for i, s in enumerate(pipeline.stages) if isinstance(s, CausalDMDDenoisingStage))


class Generation:
    """One running generation of a session: the engine's request, what its blocks and prompt changes post to
    the session's event loop, and the prompt waiting for the next block."""

    def __init__(self, state, kwargs: dict, fmt: str, loop: asyncio.AbstractEventLoop):
        self.state, self.kwargs, self.format, self.loop = state, kwargs, fmt, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._lock = threading.Lock()
        self._pending: Optional[str] = None
        self.prompts = [{"from_block": 0, "prompt": kwargs["prompt"]}]
        self.future = None
        self.cancelled = False
        self.req = prevalidate(state, {**kwargs, "block_callback": self.on_block})
        if self.req.batch_size != 1:
            raise bad_param("prompt", "a real-time video is one video: give one prompt")
        self.stream = Fmp4Stream(self.fps) if fmt == "fmp4" else None

    @property
    def fps(self) -> float:
        return self.req.params.fps or self.state.generator.config.default_fps

    def submit(self) -> None:
        self.future, = submit_all(self.state, [self.req])
        self.future.add_done_callback(lambda f: self._post(("end", f)))

    def cancel(self, reason: str) -> None:
        if self.future is not None and not self.future.done():
            self.cancelled = True
            cancel_all(self.state, [self.future], reason)

    def change_prompt(self, prompt: str) -> None:
        """Use ``prompt`` from the next block that starts (the latest one wins if several arrive meanwhile)."""
        with self._lock:
            self._pending = prompt

    # -- the generation's thread -------------------------------------------------------------------
    def _post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is gone (shutdown): nobody is listening
            pass

    def on_block(self, index: int, latents, frames) -> None:
        """The request's block_callback: hand the block over, then swap in a prompt that arrived meanwhile."""
        self._post(("block", index, to_uint8(frames[0])))
        with self._lock:
            prompt, self._pending = self._pending, None
        per_block = self.state.generator.config.causal.num_frames_per_block
        if prompt is None or index + 1 >= self.req.latents.shape[2] // per_block:
            with self._lock:  # no block is left to use it: it stays pending (done's "prompts" lists what was used)
                self._pending = self._pending or prompt
            return
        self.req.condition["cond"] = self.encode(prompt)
        self.prompts.append({"from_block": index + 1, "prompt": prompt})
        self._post(("prompt", index + 1, prompt))

    def encode(self, prompt: str) -> dict:
        """The transformer's condition for ``prompt``: a twin request run through the pipeline's own stages up
        to the causal stage (text encoding, conditioning), inside the running request's engine context."""
        pipeline = self.state.generator.pipeline
        twin = self.state.generator.request({**self.kwargs, "prompt": prompt})
        stop = causal_stage_index(pipeline)
        while twin.stages_done < stop:
            twin = pipeline.stages[twin.stages_done](twin)
            twin.stages_done += 1
        return twin.condition["cond"]


class Session:
    """One WebSocket connection: reads the client's messages, runs one generation at a time and sends its
    blocks (the pump), answers bad input with an error frame and a close."""

    def __init__(self, ws: WebSocket, state):
        self.ws, self.state = ws, state
        self.request_id = "req_" + secrets.token_hex(8)
        self.authorized = ws.scope.get("state", {}).get("websocket_authorized", True)
        self.send_lock = asyncio.Lock()
        self.generation: Optional[Generation] = None
        self.pump: Optional[asyncio.Task] = None
        self.finished = False  # a generation ended ("done" sent): a prompt now comes too late

    async def serve(self) -> None:
        await self.ws.accept()
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self.handle(parse(message))
        except APIError as error:
            await self.fail(error)
        except Exception:  # noqa: BLE001 (logged; the client gets a 500-style error frame)
            log.exception("real-time video session failed (request id %s)", self.request_id)
            await self.fail(APIError(500, f"internal server error (request id {self.request_id})",
                                     type="server_error", code="internal_error"))
        finally:
            self.stop_generation("disconnect")

    async def handle(self, body: dict) -> None:
        kind = body["type"]
        if kind == "auth":
            return self.authenticate(body)
        if not self.authorized:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY' with the handshake or "
                                '{"type": "auth", "api_key": KEY} as the first message', code="invalid_api_key")
        if kind == "start":
            return await self.start(body)
        prompt = body.get("prompt")
        unknown = sorted(set(body) - {"type", "prompt"})
        if unknown:
            raise bad_param(unknown[0], f"a prompt message takes only 'prompt', not {unknown[0]!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_param("prompt", "prompt is required: a non-empty string")
        if self.generation is None:
            why = ("the generation has finished ('done' was sent)" if self.finished else
                   "no generation is running")
            raise APIError(400, f"{why}: a prompt change applies to a running generation; send "
                                '{"type": "start", ...} first', param="prompt", code="no_generation")
        self.generation.change_prompt(prompt)

    def authenticate(self, body: dict) -> None:
        key = self.state.settings.api_key
        given = body.get("api_key")
        if key is None:
            return
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "incorrect API key" if given else 'missing API key: {"type": "auth", "api_key": KEY}',
                           param="api_key", code="invalid_api_key")
        self.authorized = True

    async def start(self, body: dict) -> None:
        if self.generation is not None:
            raise APIError(409, "a generation is already running on this connection: wait for 'done' (or open "
                                "another connection)", code="generation_running")
        self.state.require_ready()
        gen = self.state.generator
        if not gen.streams_blocks:
            raise APIError(400, f"model {self.state.model_name!r} does not make its video block by block (it has no "
                                "causal blocks): /v1/realtime/video needs a block-causal (self-forcing) video "
                                "model; use /v1/videos or /v1/images/generations for this one", param="model", code="model_not_realtime")
        fmt = body.get("format", "fmp4")
        if fmt not in FORMATS:
            raise bad_param("format", f"format must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
        fields = {k: v for k, v in body.items() if k not in ("type", "format")}
        if "input_reference" in fields:
            raise bad_param("input_reference", "real-time video is text-to-video: it takes no input image")
        spec = schemas.video_spec(fields, self.state.model_names, gen.sampling_params_cls, gen.config.default_fps)
        generation = await run_in_threadpool(Generation, self.state, spec.kwargs, fmt, asyncio.get_running_loop())
        try:
            generation.submit()
        except QueueFullError as exc:
            raise from_exception(exc) from None
        self.generation, self.finished = generation, False
        params = generation.req.params
        await self.send({"type": "started", "request_id": self.request_id, "seed": params.seed,
                         "num_frames": params.num_frames, "width": params.width, "height": params.height,
                         "fps": generation.fps, "format": fmt, "warnings": spec.warnings})
        self.pump = asyncio.create_task(self.run_pump(generation))

    async def run_pump(self, generation: Generation) -> None:
        """Send the generation's blocks and prompt changes as they come, then ``done`` (or the error it ended with)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.settings.request_timeout
        frames_sent = 0
        try:
            while True:
                try:
                    event = await asyncio.wait_for(generation.events.get(), max(deadline - loop.time(), 0.001))
                except asyncio.TimeoutError:
                    generation.cancel("timeout")
                    raise APIError(504, "the generation took longer than --request-timeout "
                                        f"({self.state.settings.request_timeout:g} s)", type="server_error",
                                   code="timeout") from None
                kind = event[0]
                if kind == "block":
                    _, index, frames = event
                    data = frames.tobytes() if generation.stream is None else \
                        await run_in_threadpool(generation.stream.chunk, frames)
                    head = {"type": "block", "index": index, "num_frames": int(frames.shape[0]),
                            "width": int(frames.shape[2]), "height": int(frames.shape[1])}
                    if generation.stream is not None:
                        head["mime_type"] = generation.stream.mime_type
                    async with self.send_lock:
                        await self.ws.send_text(json.dumps(head))
                        await self.ws.send_bytes(data)
                    frames_sent += int(frames.shape[0])
                elif kind == "prompt":
                    await self.send({"type": "prompt", "prompt": event[2], "from_block": event[1]})
                else:
                    future = event[1]
                    exc = future.exception()
                    if exc is not None:
                        if isinstance(exc, RequestCancelledError) and generation.cancelled:
                            return
                        error = from_exception(exc)
                        if error.status >= 500:
                            log.error("real-time generation failed (request id %s)", self.request_id, exc_info=exc)
                        raise error
                    await self.send({"type": "done", "num_frames": frames_sent, "prompts": generation.prompts})
                    self.generation, self.finished = None, True
                    return
        except APIError as error:
            self.pump = None  # fail() must not cancel this task: it is the one failing
            await self.fail(error)

    def stop_generation(self, reason: str) -> None:
        if self.pump is not None:
            self.pump.cancel()
            self.pump = None
        if self.generation is not None:
            self.generation.cancel(reason)
            self.generation = None

    async def send(self, body: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(body))

    async def fail(self, error: APIError) -> None:
        """The error frame, then a clean close; the generation (if any) stops at its next step."""
        async with self.send_lock:  # not between a block's header and its data
            self.stop_generation("disconnect")  # the connection closes: nobody reads the rest
            try:
                await self.ws.send_text(json.dumps({"type": "error", **error.body(self.request_id)}))
                await self.ws.close(close_code(error), reason=error.code or "")
            except Exception:  # noqa: BLE001 (the client is already gone)
                pass


@router.websocket("/v1/realtime/video")
async def realtime_video(ws: WebSocket):
    await Session(ws, ws.app.state.diffcore).serve()


@router.get("/realtime.js")
async def realtime_js():
    return Response(_static("realtime.js"), media_type="text/javascript")
