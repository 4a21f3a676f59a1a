"""Video job routes: create, poll, list, download, delete (the OpenAI Videos API shapes)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import QueueFullError
from . import schemas
from .errors import APIError, bad_param, from_exception
from .routes import prevalidate, read_body, ready_state, upload_images

router = APIRouter()


def encode_video(result, path) -> None:
    result.save(path)  # H.264 mp4 at the model's fps, with the model's sound track (AAC) if it makes one


@router.post("/v1/videos")
async def create_video(request: Request):
    state = ready_state(request)
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
    fps = getattr(gen.config, "default_fps", None) or 16
    spec = schemas.video_spec(body, state.model_name, gen.sampling_params_cls, fps, form=form, image=image)
    prevalidate(state, spec.kwargs, image_field="input_reference")
    try:
        job = state.jobs.create(spec.kwargs, spec.size, spec.seconds)
    except QueueFullError as exc:
        raise from_exception(exc) from None
    job.has_audio = bool(gen.config.has_audio)
    return job.to_json()


@router.get("/v1/videos")
async def list_videos(request: Request):
    state = ready_state(request)
    data = [job.to_json() for job in state.jobs.list()]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/videos/{video_id}")
async def get_video(request: Request, video_id: str):
    job = ready_state(request).jobs.get(video_id).to_json()
    return JSONResponse(job, headers={"openai-poll-after-ms": "250"})  # the openai client's poll() reads it


@router.delete("/v1/videos/{video_id}")
async def delete_video(request: Request, video_id: str):
    job = ready_state(request).jobs.delete(video_id)
    return {"id": job.id, "object": "video.deleted", "deleted": True}


@router.get("/v1/videos/{video_id}/content")
async def video_content(request: Request, video_id: str, variant: str = "video"):
    state = ready_state(request)
    job = state.jobs.get(video_id)
    if variant != "video":
        raise bad_param("variant", f"only variant 'video' is available, got {variant!r}")
    entry = state.files.get(job.file_id) if job.file_id else None
    if job.status != "completed" or entry is None:
        raise APIError(404 if job.status == "completed" else 409,
                       f"video {video_id} is {job.status}" + ("" if job.status == "failed" else
                                                              "; poll GET /v1/videos/{id} until it is completed"),
                       param="video_id", code="video_not_ready")
    return FileResponse(entry.path, media_type="video/mp4", filename=f"{video_id}.mp4")
