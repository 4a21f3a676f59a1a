"""Image routes, models, kept files, health, metrics and the playground. A thin adapter: requests become
generate() keyword arguments, made into validated Requests on arrival and queued on the runner; results
become OpenAI bodies."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from importlib import resources
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import QueueFullError, SamplingParamError
from . import schemas, unread
from .errors import APIError, bad_param, from_exception
from .peers import warning_headers

log = logging.getLogger("diffcore.serve")
router = APIRouter()


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing is sent back."""


def state_of(request: Request):
    return request.app.state.diffcore


def ready_state(request: Request):
    state = state_of(request)
    state.require_ready()
    return state


async def read_body(request: Request) -> tuple[dict, dict[str, list], bool]:
    """(fields, files, is_form). JSON must be an object; multipart files come back as raw bytes per field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=64, max_fields=256)
        except Exception as exc:
            raise APIError(400, f"malformed form body: {exc}", code="invalid_body") from None
        fields: dict = {}
        files: dict[str, list] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files.setdefault(key, []).append(await value.read())
            else:
                fields[key] = value
        return fields, files, True
    if ctype != "application/json":  # text/plain JSON is what a cross-site form sends (serve.origin)
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got {ctype or 'none'!r}), "
                            "or as multipart/form-data where the route takes files", code="unsupported_media_type")
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the body is nested too deeply to be a request", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body, {}, False


def prevalidate(state, kwargs: dict, image_field: str = "image", warnings: Optional[list] = None):
    """The request made and checked on arrival, once (``generate()``'s own refusals, no compute: parameters,
    the checkpoint's input validation, loaded adapters, fields the model will not read: serve.unread): a bad
    request costs no queue slot and never becomes a failed job, and the validated Request is what is queued.
    The error names the request's field: ``size`` for height / width, ``image_field`` for the input images."""
    try:
        req = state.generator.request(kwargs, check_loras=True)
        unread.check_arrival(state.generator, req, [] if warnings is None else warnings)
        return req
    except Exception as exc:
        error = from_exception(exc)
        if error.param in ("height", "width"):
            error.param = "size"
        elif error.param == "image":
            error.param = image_field
        raise error from None


def submit_all(state, reqs: list) -> list:
    futures = []
    try:
        for req in reqs:
            futures.append(state.runner.submit(req, on_step=state.step_timer()))
    except BaseException:
        for f in futures:
            state.runner.cancel(f)
        raise
    return futures


def cancel_all(state, futures: list, reason: str) -> None:
    """Drop the waiting ones, stop the running ones at their next denoising step; counted by ``reason``."""
    for f in futures:
        if f.done():
            continue
        if state.runner.cancel(f):
            state.metrics.dropped.labels(reason).inc()
        else:
            state.metrics.cancelled.labels(reason).inc()


async def wait_all(request: Request, state, futures: list, warnings: Optional[list] = None) -> list:
    """Wait for the engine; a client that disconnects or a request past --request-timeout is dropped. A result
    whose request set a field nothing read is a 400 (serve.unread)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.request_timeout
    pending = {asyncio.wrap_future(f) for f in futures}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=min(0.25, max(deadline - loop.time(), 0.01)))
        if not pending:
            break
        gone = await request.is_disconnected()
        if gone or loop.time() >= deadline:
            reason = "disconnect" if gone else "timeout"
            cancel_all(state, futures, reason)
            for waiter in pending:  # nobody reads what a cancelled request ends with
                waiter.cancel()
            if gone:
                raise ClientGone()
            raise APIError(504, f"the request took longer than --request-timeout ({state.settings.request_timeout:g} s)",
                           type="server_error", code="timeout")
    results = []
    for f in futures:
        exc = f.exception()
        if exc is not None:
            error = from_exception(exc)
            if error.status >= 500:
                log.error("generation failed (request id %s)", request.scope.get("state", {}).get("request_id"),
                          exc_info=exc)
            raise error
        unread.check_result(f.result(), [] if warnings is None else warnings)
        results.append(f.result())
    return results


def has_alpha(state) -> bool:
    """Whether the served model makes pictures with an alpha channel (its config says ``has_alpha``)."""
    return state.generator.config.has_alpha


async def render_images(request: Request, state, job: schemas.ImageJob) -> tuple[list[tuple[bytes, int, dict]], str]:
    """Run an images request: ([(encoded image, seed, which)], "WxH"); ``which`` is ``{"output_index", "layer"}``
    for a layered model (one entry per layer), else empty. Raises ClientGone when the client left."""
    if state.generator.config.is_video:
        raise bad_param("model", f"model {state.model_name!r} generates videos; use POST /v1/videos")
    reqs = [prevalidate(state, kwargs, warnings=job.warnings) for kwargs in job.kwargs]
    try:
        futures = submit_all(state, reqs)
    except QueueFullError as exc:
        raise from_exception(exc) from None
    results = await wait_all(request, state, futures, job.warnings)

    def encode():
        out = [item for i, r in enumerate(results) for item in encode_result(job, i, r)]
        image = results[0].images[0]
        return out, f"{image.width}x{image.height}"

    return await run_in_threadpool(encode)


def encode_result(job: schemas.ImageJob, i: int, result) -> list[tuple[bytes, int, dict]]:
    """Output ``i``'s encoded picture(s): [(image, seed, which)]; ``which`` is ``{"output_index", "layer"}`` for a
    layered model (one entry per layer), else empty."""
    seed = job.kwargs[i]["seed"]
    if result.layers:  # several pictures per output (Qwen-Image-Layered): one entry per layer, saying which
        return [(schemas.encode_image(im, job.output_format, job.output_compression), seed,
                 {"output_index": i, "layer": k + 1}) for k, im in enumerate(result.images[:result.layers])]
    return [(schemas.encode_image(result.images[0], job.output_format, job.output_compression), seed, {})]


async def run_images(request: Request, state, job: schemas.ImageJob, events: str = "image_generation") -> Response:
    """Answer an images request: one JSON body, or with ``stream`` server-sent ``events`` (serve.streaming)."""
    if job.stream:
        from .streaming import stream_images

        return await stream_images(request, state, job, events)
    try:
        encoded, size = await render_images(request, state, job)
    except ClientGone:
        return Response(status_code=499)
    media = schemas.IMAGE_FORMATS[job.output_format]

    def items():
        out = []
        for data, seed, which in encoded:
            if job.response_format == "url":
                file_id = state.files.put(data, media, "." + job.output_format)
                item = {"url": str(request.url_for("get_image_file", file_id=file_id))}
            else:
                item = {"b64_json": base64.b64encode(data).decode()}
            out.append({**item, "revised_prompt": None, "seed": seed, **which})
        return out

    body = {"id": "img_" + secrets.token_hex(12), "created": int(time.time()), "data": await run_in_threadpool(items),
            "output_format": job.output_format, "size": size}
    return JSONResponse(body, headers=warning_headers(job.warnings))


@router.post("/v1/images/generations")
async def images_generations(request: Request):
    state = ready_state(request)
    body, _, form = await read_body(request)
    job = schemas.image_job(body, state.model_names, state.generator.sampling_params_cls, form=form,
                            alpha=has_alpha(state))
    return await run_images(request, state, job)


def upload_pixel_limit(state) -> int:
    """--max-upload-pixels, or the engine's own pixel budget (EngineArgs.max_pixels / DIFFCORE_MAX_PIXELS)."""
    if state.settings.max_upload_pixels is not None:
        return state.settings.max_upload_pixels
    return state.generator.pipeline.engine_args.budget().max_pixels


def upload_images(state, images: list[bytes], field: str = "image") -> list:
    limit = upload_pixel_limit(state)
    return [schemas.decode_upload(data, f"{field}[{i}]" if len(images) > 1 else field,
                                  state.settings.max_upload_bytes, limit) for i, data in enumerate(images)]


@router.post("/v1/images/edits")
async def images_edits(request: Request):
    """OpenAI's images.edit: ``image`` (several as ``image[]``), an optional ``mask`` (a PNG whose transparent
    pixels mark the area to edit, or a black-and-white one, white = repaint: diffcore.masks) and the model's
    parameters (``strength``: image-to-image on a text-to-image model). The request's task picks the
    composition (diffcore.tasks), as generate() does."""
    state = ready_state(request)
    body, files, form = await read_body(request)
    raw = files.pop("image", []) + files.pop("image[]", [])
    raw_mask = files.pop("mask", [])
    if not form:  # JSON edits: image is a data URL or a list of them, mask a data URL
        value = body.get("image")
        raw = [schemas.decode_data_url(v, "image") for v in (value if isinstance(value, list) else [value] if value else [])]
        raw_mask = [schemas.decode_data_url(body["mask"], "mask")] if isinstance(body.get("mask"), str) else []
    if files:
        name = sorted(files)[0]
        raise bad_param(name, f"unexpected file field {name!r}; images go in 'image' (or 'image[]' for several), "
                              "the mask in 'mask'")
    if len(raw_mask) > 1:
        raise bad_param("mask", "send one mask (it applies to every output image)")
    try:
        params_cls = state.generator.params_class({"image": raw or None, "mask": raw_mask or None,
                                                   "strength": body.get("strength")})
    except SamplingParamError as exc:  # a task this model has no composition for
        raise from_exception(exc) from None
    limit = params_cls.max_images
    if limit == 0:
        raise bad_param("image", f"model {state.model_name!r} takes no input image; use /v1/images/generations "
                                 "(or send strength= for image-to-image, a mask for inpainting, where the model has them)")
    if not raw:
        raise bad_param("image", "an input image is required (multipart field 'image', or 'image[]' for several)")
    if len(raw) > limit:
        raise bad_param("image", f"model {state.model_name!r} takes at most {limit} input image(s), got {len(raw)}")
    images = await run_in_threadpool(upload_images, state, raw)
    mask = (await run_in_threadpool(upload_mask, state, raw_mask[0])) if raw_mask else None
    job = schemas.image_job({k: v for k, v in body.items() if k not in ("image", "image[]", "mask")}, state.model_names,
                            params_cls, form=form, images=images, alpha=has_alpha(state))
    if mask is not None:
        for kwargs in job.kwargs:
            kwargs["mask"] = mask
    return await run_images(request, state, job, "image_edit")


def upload_mask(state, data: bytes):
    """The uploaded mask as a greyscale image, white = repaint (OpenAI's transparent pixels converted)."""
    from ..masks import load_mask

    upload = schemas.decode_upload(data, "mask", state.settings.max_upload_bytes, upload_pixel_limit(state), mode=None)
    try:
        return load_mask(upload)
    except SamplingParamError as exc:  # all black, an unsupported mode
        raise from_exception(exc) from None


@router.get("/v1/images/files/{file_id}", name="get_image_file")
async def get_image_file(request: Request, file_id: str):
    entry = state_of(request).files.get(file_id)
    if entry is None:
        raise APIError(404, "no such file (it may have expired)", param="file_id", code="not_found")
    return FileResponse(entry.path, media_type=entry.media_type)


def model_card(state) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "diffcore"}


@router.get("/v1/models")
async def list_models(request: Request):
    state = ready_state(request)
    return {"object": "list", "data": [model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    state = ready_state(request)
    if model_id != state.model_name:
        raise APIError(404, f"model {model_id!r} is not served here; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")
    return model_card(state)


def model_info_body(state) -> dict:
    """``GET /v1/model_info``: SGLang's fields that apply (``model_path``: what --model named; clients such as
    SGLang's bench_serving read it), and what the model takes."""
    gen = state.generator
    params = gen.sampling_params_cls
    video, images = bool(gen.config.is_video), params.max_images
    task = ("image" if images else "text") + ("-to-video" if video else "-to-image")
    defaults = params()
    return {"model_path": str(gen.model), "served_model_name": state.model_name, "task_type": task,
            "pipeline_tag": task, "pipeline_name": type(gen.pipeline).__name__, "is_video": video,
            "max_images": images, "min_images": params.min_images, "has_alpha": has_alpha(state),
            "default_height": defaults.height, "default_width": defaults.width,
            "default_num_inference_steps": defaults.num_inference_steps}


@router.get("/v1/model_info")
async def model_info(request: Request):
    return model_info_body(ready_state(request))


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    state = state_of(request)
    try:
        state.require_ready()
    except APIError as exc:
        return JSONResponse({"status": exc.code, "detail": exc.message}, status_code=503)
    return {"status": "ok", "model": state.model_name}


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _static(name: str) -> str:
    return resources.files("diffcore.serve").joinpath("static").joinpath(name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def playground():
    return HTMLResponse(_static("index.html"))


@router.get("/favicon.ico")
async def favicon():
    return Response(_static("favicon.svg"), media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


@router.get("/playground.js")
async def playground_js():
    return Response(_static("playground.js"), media_type="text/javascript")


@router.get("/v1/playground/info")
async def playground_info(request: Request):
    """What the playground needs to lay itself out: the model, whether it takes images, whether it is video, the
    extra tasks it serves per request (``img2img``: a strength slider; ``inpaint``: a mask brush)."""
    state = ready_state(request)
    gen = state.generator
    params = gen.sampling_params_cls()
    tasks = sorted(getattr(gen.pipeline, "compositions", {}))
    return {"model": state.model_name, "video": bool(gen.config.is_video), "audio": bool(gen.config.has_audio),
            "realtime": gen.streams_blocks,  # WebSocket /v1/realtime/video (serve.realtime)
            "tasks": tasks,
            "max_images": gen.sampling_params_cls.max_images, "min_images": gen.sampling_params_cls.min_images,
            "defaults": {"num_inference_steps": params.num_inference_steps, "guidance_scale": params.guidance_scale,
                         "height": params.height, "width": params.width}}
