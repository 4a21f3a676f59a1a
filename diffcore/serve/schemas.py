"""OpenAI request bodies -> generate() keyword arguments, and results -> OpenAI response bodies.

JSON bodies keep their types (a string where a number belongs is the engine's SamplingParamError);
multipart form fields are all strings, so they are converted here, naming the field when that fails.
The diffusion extras are the served model's SamplingParams fields (extras.py).
"""
from __future__ import annotations

import base64
import io
import logging
import math
import re
from typing import Any, Optional

import attrs

from .errors import APIError, bad_param
from .extras import convert, diffusion_extras, extra_kinds
from .peers import normalize

log = logging.getLogger("diffcore.serve")

IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
RESPONSE_FORMATS = ("b64_json", "url")
MAX_N = 10
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

# OpenAI fields that mean nothing for a diffusion model: accepted and ignored, so clients work unchanged.
IGNORED = ("user", "quality", "style", "moderation", "input_fidelity")
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit on previews per streamed image
BACKGROUNDS = ("auto", "opaque", "transparent")


@attrs.define
class ImageJob:
    """One images request: a generate() call per output image, plus how to answer."""

    kwargs: list[dict]
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: Optional[int] = None
    warnings: list = attrs.field(factory=list)  # peer fields accepted and ignored (peers.py)
    stream: bool = False  # answer with server-sent events (serve.streaming)
    partial_images: int = 0  # previews per image before the final one, when streamed
    background: str = "auto"


@attrs.define
class VideoSpec:
    kwargs: dict
    size: Optional[str]
    seconds: Optional[str]
    warnings: list = attrs.field(factory=list)


def parse_size(value: Any) -> tuple[Optional[int], Optional[int]]:
    """ "WxH" -> (height, width); "auto" or absent -> the model's default."""
    if value is None or value == "auto":
        return None, None
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise bad_param("size", f"size must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto', got {value!r}")
    return int(m.group(2)), int(m.group(1))


def _int_field(body: dict, field: str, form: bool, default=None, lo=None, hi=None) -> Optional[int]:
    value = body.get(field, default)
    if value is None:
        return None
    value = convert(field, value, int, form)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_param(field, f"{field} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_param(field, f"{field} must be between {lo} and {hi}, got {value}")
    return value


def _bool_field(body: dict, field: str) -> bool:
    value = body.get(field)
    if isinstance(value, str):  # a form's text (or "false" from a JSON client, as before streaming existed)
        value = convert(field, value, bool, True)
    if value is not None and not isinstance(value, bool):
        raise bad_param(field, f"{field} must be true or false, got {value!r}")
    return bool(value)


def check_fields(body: dict, route_fields: tuple[str, ...], params_cls) -> None:
    """Every field is the route's own, one of the model's parameters, or an OpenAI field ignored here."""
    allowed = set(route_fields) | set(extra_kinds(params_cls))
    unknown = sorted(set(body) - allowed - set(IGNORED))
    if unknown:
        raise bad_param(unknown[0], f"unknown parameter {unknown[0]!r} (not one of this model's parameters); "
                                    f"accepted: {', '.join(sorted(allowed))}")


def _prompt(body: dict, params_cls=None) -> str:
    """The prompt: a non-empty string, or ``""`` for a model that captions the picture itself when the prompt
    is empty (its SamplingParams' ``captions_empty_prompt``: Qwen-Image-Layered, as diffusers)."""
    prompt = body.get("prompt")
    if prompt == "" and getattr(params_cls, "captions_empty_prompt", False):
        return prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_param("prompt", "prompt is required: a non-empty string")
    return prompt


def check_model(body: dict, served) -> None:
    """``model`` may be left out, or name the served model: its served name, or what --model gave (the path
    SGLang's clients read from /v1/model_info and send back). ``served``: a name, or a tuple of accepted names
    (the first is the one shown)."""
    names = (served,) if isinstance(served, str) else tuple(served)
    model = body.get("model")
    if model is not None and model not in names:  # a bad request field: 400 (GET /v1/models/{id} answers 404)
        raise APIError(400, f"model {model!r} is not served here; this server serves {names[0]!r} (or leave model out)",
                       param="model", code="model_not_found")


IMAGE_FIELDS = ("prompt", "n", "size", "response_format", "output_format", "output_compression", "model", "image",
                "image[]", "stream", "partial_images", "background")


def check_background(body: dict, alpha: bool, output_format: str) -> None:
    """``background="transparent"`` needs a model that makes an alpha channel, and a format that keeps it."""
    value = body.get("background")
    if value is None:
        return
    if value not in BACKGROUNDS:
        raise bad_param("background", f"background must be one of {', '.join(BACKGROUNDS)}, got {value!r}")
    if value == "transparent" and not alpha:
        raise bad_param("background", "background='transparent' needs a model that makes transparent images; this "
                                      "one makes opaque RGB pictures: leave background out (or 'auto' / 'opaque')")
    if value == "transparent" and output_format == "jpeg":
        raise bad_param("output_format", "jpeg has no transparency: use png or webp with background='transparent'")


def image_job(body: dict, served: str, params_cls, form: bool = False, images: Optional[list] = None,
              alpha: bool = False) -> ImageJob:
    """Validate an images/generations (JSON) or images/edits (form) body for a model whose parameters are
    ``params_cls`` (its SamplingParams class); ``alpha``: the model makes RGBA pictures."""
    body, warnings = normalize(body, form, video=False)
    check_fields(body, IMAGE_FIELDS, params_cls)
    check_model(body, served)
    prompt = _prompt(body, params_cls)
    n = _int_field(body, "n", form, default=1, lo=1, hi=MAX_N)
    height, width = parse_size(body.get("size"))
    response_format = body.get("response_format") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise bad_param("response_format", f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
    output_format = body.get("output_format") or "png"
    if output_format not in IMAGE_FORMATS:
        raise bad_param("output_format", f"output_format must be one of {', '.join(IMAGE_FORMATS)}, got {output_format!r}")
    compression = _int_field(body, "output_compression", form, lo=0, hi=100)
    check_background(body, alpha, output_format)
    extras = diffusion_extras(body, params_cls, form)
    stream = _bool_field(body, "stream")
    partial = _int_field(body, "partial_images", form, default=0, lo=0, hi=MAX_PARTIAL_IMAGES)
    if stream and response_format != "b64_json":
        raise bad_param("response_format", "streamed images come as b64_json: leave response_format out "
                                           "(or b64_json), or leave stream out for urls")
    base = dict(prompt=prompt, height=height, width=width, **extras)
    if images:
        base["image"] = images if len(images) > 1 else images[0]
    elif any(body.get(k) not in (None, "", []) for k in ("image", "image[]")):  # was accepted and ignored
        where = ("this model takes no input image" if not getattr(params_cls, "max_images", 0) else
                 "input images go to /v1/images/edits (multipart files, or JSON data URLs there)")
        raise bad_param("image", f"/v1/images/generations does not read 'image': {where}")
    seed = base.pop("seed", None)
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)
    kwargs = []
    for i in range(n):  # image i is generate(seed=seed + i): each one can batch with any other request
        kw = {k: v for k, v in base.items() if v is not None}
        kw["seed"] = seed + i if isinstance(seed, int) and not isinstance(seed, bool) else seed
        kwargs.append(kw)
    return ImageJob(kwargs, response_format, output_format, compression, warnings, stream, partial,
                    body.get("background") or "auto")


VIDEO_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")


def video_spec(body: dict, served: str, params_cls, fps: int, form: bool = False, image=None) -> VideoSpec:
    """Validate a POST /v1/videos body. ``seconds`` becomes round(seconds * fps) + 1 frames (the model may
    round it further, as Wan does to 4k+1); ``num_frames`` sets the count directly and wins over ``seconds``
    when both are given (the job still reports the ``seconds`` asked for; the log says when they disagree)."""
    body, warnings = normalize(body, form, video=True)
    check_fields(body, VIDEO_FIELDS, params_cls)
    check_model(body, served)
    prompt = _prompt(body)
    height, width = parse_size(body.get("size"))
    kwargs = dict(prompt=prompt, height=height, width=width, **diffusion_extras(body, params_cls, form))
    seconds = body.get("seconds")
    if seconds is not None:
        try:
            value = float(seconds)
        except (TypeError, ValueError):
            raise bad_param("seconds", f"seconds must be a number, got {seconds!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise bad_param("seconds", f"seconds must be a positive number, got {seconds!r}")
        rate = kwargs.get("fps")  # the request's own frame rate, when it gives a usable one
        rate = rate if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 else fps
        frames = round(value * rate) + 1
        if kwargs.get("num_frames") is None:
            kwargs["num_frames"] = frames
        elif kwargs["num_frames"] != frames:
            warnings.append(f"seconds={seconds} ignored: num_frames={kwargs['num_frames']} sets the length")
            log.warning("request field %s", warnings[-1])
    if image is not None:
        kwargs["image"] = image
    if kwargs.get("seed") is None:
        import secrets

        kwargs["seed"] = secrets.randbelow(2**31)
    size = body.get("size") if body.get("size") not in (None, "auto") else None
    return VideoSpec({k: v for k, v in kwargs.items() if v is not None}, size,
                     None if seconds is None else str(seconds), warnings)


def decode_data_url(value: str, field: str) -> bytes:
    """``data:image/png;base64,...`` -> bytes (JSON bodies have no files)."""
    m = re.match(r"^data:[\w/+.-]*;base64,(.*)$", value, re.S)
    if not m:
        raise bad_param(field, f"{field} must be an uploaded file or a 'data:image/...;base64,' URL")
    try:
        return base64.b64decode(m.group(1), validate=True)
    except ValueError:
        raise bad_param(field, f"{field}: the base64 data does not decode") from None


CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")  # 8 bits per channel


def decode_upload(data: bytes, field: str, max_bytes: int, max_pixels: int, mode: Optional[str] = "RGB"):
    """An uploaded image, decoded in memory: size and pixel count checked before the pixels are; converted to
    ``mode`` (None: as sent, e.g. a mask's alpha channel; "RGB" keeps an alpha channel as RGBA)."""
    from PIL import Image

    if len(data) > max_bytes:
        raise APIError(413, f"{field}: {len(data)} bytes is over the upload limit of {max_bytes} bytes",
                       param=field, code="upload_too_large")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise bad_param(field, f"{field}: {width}x{height} is over this server's limit of {max_pixels} pixels")
        img.load()
    except APIError:
        raise
    except Exception as exc:  # PIL raises many types for bad data (incl. its decompression-bomb error)
        raise bad_param(field, f"{field}: not a readable image ({type(exc).__name__}: {exc})") from None
    if mode == "RGB" and img.mode not in CONVERTIBLE_MODES:  # 16-bit / float pixels would be clipped to white
        raise bad_param(field, f"{field}: images in mode {img.mode!r} (16-bit or floating-point pixels) are not "
                               "supported: they would be clipped, not scaled; send 8-bit RGB, RGBA or greyscale")
    if mode == "RGB" and ("A" in img.getbands() or "transparency" in img.info):
        mode = "RGBA"  # the alpha channel is kept (Qwen-Image-Layered reads it; other models drop it on load)
    return img.convert(mode) if mode is not None and img.mode != mode else img


def encode_image(image, output_format: str, compression: Optional[int] = None) -> bytes:
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=output_format.upper(), quality=95 if compression is None else compression)
    return buf.getvalue()
