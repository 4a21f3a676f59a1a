"""Video job routes: create, poll, list, download, delete (the OpenAI Videos API shapes)."""
from __future__ import annotations

import secrets
import time
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import QueueFullError
from . import schemas
from .errors import APIError, bad_param, from_exception
from .jobs import LIST_LIMIT
from .peers import warning_headers
from .routes import ClientGone, prevalidate, read_body, ready_state, submit_all, upload_images, wait_all

router = APIRouter()


def encode_video(result, path) -> None:
    result.save(path)  # H.264 mp4 at the model's fps, with the model's sound track (AAC) if it makes one


def encode_thumbnail(result, path) -> None:
    """The first frame, as webp (OpenAI's ``variant="thumbnail"``)."""
    result.frames[0][0].save(path, format="WEBP", quality=90)


SPRITES = 8  # frames in a spritesheet, evenly spaced (all of them when the video has fewer)


def encode_spritesheet(result, path) -> None:
    """Frames evenly spaced through the video side by side in one row, as jpeg (``variant="spritesheet"``)."""
    from PIL import Image

    frames = result.frames[0]
    count = min(SPRITES, len(frames))
    picks = [frames[round(i * (len(frames) - 1) / max(count - 1, 1))] for i in range(count)]
    width, height = picks[0].size
    sheet = Image.new("RGB", (width * count, height))
    for i, frame in enumerate(picks):
        sheet.paste(frame, (i * width, 0))
    sheet.save(path, format="JPEG", quality=90)


# content variant -> (writer, media type, suffix): what a finished job keeps (GET /v1/videos/{id}/content)
ENCODERS = {"video": (encode_video, "video/mp4", ".mp4"), "thumbnail": (encode_thumbnail, "image/webp", ".webp"),
            "spritesheet": (encode_spritesheet, "image/jpeg", ".jpg")}


async def video_request(request: Request, state) -> tuple:
    """A POST /v1/videos (or /v1/videos/sync) body, checked as far as the engine can before any compute:
    ``(its VideoSpec, the validated Request to queue)``."""
    gen = state.generator
    if not gen.config.is_video:
        raise bad_param("model", f"model {state.model_name!r} generates images; use /v1/images/generations")
    body, files, form = await read_body(request)
    raw = files.pop("input_reference", [])
    if files:
        name = sorted(files)[0]
        raise bad_param(name, f"unexpected file field {name!r}; the image goes in 'input_reference'")
    if not form and isinstance(body.get("input_reference"), str):
        raw = [schemas.decode_data_url(body["input_reference"], "input_reference")]
    body = {k: v for k, v in body.items() if k != "input_reference"}
    if len(raw) > 1:
        raise bad_param("input_reference", "give one input_reference image")
    image = None
    if raw:
        if gen.sampling_params_cls.max_images == 0:
            raise bad_param("input_reference", f"model {state.model_name!r} is text-to-video; it takes no input image")
        image = (await run_in_threadpool(upload_images, state, raw, "input_reference"))[0]
    fps = gen.config.default_fps
    spec = schemas.video_spec(body, state.model_names, gen.sampling_params_cls, fps, form=form, image=image)
    return spec, prevalidate(state, spec.kwargs, image_field="input_reference", warnings=spec.warnings)


@router.post("/v1/videos")
async def create_video(request: Request):
    state = ready_state(request)
    spec, req = await video_request(request, state)
    try:
        job = state.jobs.create(req, spec.size, spec.seconds, has_audio=bool(state.generator.config.has_audio))
    except QueueFullError as exc:
        raise from_exception(exc) from None
    return JSONResponse(job.to_json(), headers=warning_headers(spec.warnings))


@router.post("/v1/videos/sync")
async def create_video_sync(request: Request):
    """vLLM-Omni's blocking form: the same body as POST /v1/videos; the answer is the mp4 itself (no job is kept)."""
    state = ready_state(request)
    spec, req = await video_request(request, state)
    started = time.perf_counter()
    try:
        futures = submit_all(state, [req])
    except QueueFullError as exc:
        raise from_exception(exc) from None
    try:
        result, = await wait_all(request, state, futures, spec.warnings)
    except ClientGone:
        return Response(status_code=499)

    def encode() -> bytes:
        path = state.store.files_dir / f"sync-{secrets.token_hex(8)}.partial.mp4"  # never announced; orphan-swept
        try:
            encode_video(result, path)
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    data = await run_in_threadpool(encode)
    headers = {"x-inference-time-s": f"{time.perf_counter() - started:.3f}", **warning_headers(spec.warnings)}
    return Response(data, media_type="video/mp4", headers=headers)


@router.get("/v1/videos")
async def list_videos(request: Request, after: Optional[str] = None, order: str = "desc", limit: Optional[str] = None):
    state = ready_state(request)
    if limit is not None:
        try:
            limit = int(limit)
        except ValueError:
            raise bad_param("limit", f"limit must be an integer from 1 to {LIST_LIMIT}, got {limit!r}") from None
    jobs, more = state.jobs.list(limit=limit, after=after, order=order)
    data = [job.to_json() for job in jobs]
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/videos/{video_id}")
async def get_video(request: Request, video_id: str):
    job = ready_state(request).jobs.get(video_id).to_json()
    return JSONResponse(job, headers={"openai-poll-after-ms": "250"})  # the openai client's poll() reads it


@router.delete("/v1/videos/{video_id}")
async def delete_video(request: Request, video_id: str):
    state = ready_state(request)
    running = state.jobs.get(video_id).status == "in_progress"
    job = state.jobs.delete(video_id)  # a running one stops at its next denoising step
    if running:
        state.metrics.cancelled.labels("delete").inc()
    return {"id": job.id, "object": "video.deleted", "deleted": True}


@router.get("/v1/videos/{video_id}/content")
async def video_content(request: Request, video_id: str, variant: str = "video"):
    state = ready_state(request)
    job = state.jobs.get(video_id)
    if variant not in ENCODERS:
        raise bad_param("variant", f"variant must be one of {', '.join(ENCODERS)}, got {variant!r}")
    if job.status != "completed":
        raise APIError(409, f"video {video_id} is {job.status}" + ("" if job.status == "failed" else
                                                                   "; poll GET /v1/videos/{id} until it is completed"),
                       param="video_id", code="video_not_ready")
    file_id = job.files.get(variant)
    entry = state.files.get(file_id) if file_id else None
    if entry is None:
        raise APIError(404, f"the {variant} of video {video_id} is no longer kept (expired or removed)",
                       param="video_id", code="not_found")
    _, media_type, suffix = ENCODERS[variant]
    return FileResponse(entry.path, media_type=media_type, filename=f"{video_id}{suffix}")
