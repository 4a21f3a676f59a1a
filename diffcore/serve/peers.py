"""Request fields other diffusion servers' clients send (SGLang, vLLM-Omni), mapped onto diffcore's.

Those clients work unchanged against diffcore: what a field means is honoured (``num_outputs_per_prompt`` is
``n``, and wins over ``n=1``, OpenAI's default; ``height`` + ``width`` are ``size``; a nested ``extra_body`` object, which clients posting raw JSON
send as it is, is read as top-level fields). A field that cannot change the result is accepted, and a
warning names it (the server log and the ``x-diffcore-warnings`` response header). A field diffcore does not
know and that would change the result is refused by the routes as an unknown parameter (400 naming it).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from .errors import bad_param

log = logging.getLogger("diffcore.serve")
WARNINGS_HEADER = "x-diffcore-warnings"

# Fields peers send that cannot change a picture diffcore makes: accepted, ignored, and named in a warning.
HARMLESS = {
    "bot_task": "vLLM-Omni's task hint (HunyuanImage-3); diffcore runs the served model's own task",
    "stream": "chat streaming; the image is sent whole",
    "max_tokens": "a text-generation limit",
    "max_completion_tokens": "a text-generation limit",
    "temperature": "a text-sampling setting",
    "top_p": "a text-sampling setting",
    "modalities": "the reply holds the image",
}


def merge_extra_body(body: dict, form: bool) -> dict:
    """A nested ``extra_body`` (a JSON object, or JSON text in a form) read as top-level fields; a field given
    both ways with different values is a 400 naming it."""
    nested = body.get("extra_body")
    if nested is None:
        return body
    if form and isinstance(nested, str):
        try:
            nested = json.loads(nested)
        except ValueError:
            raise bad_param("extra_body", "extra_body must be a JSON object") from None
    if not isinstance(nested, dict):
        raise bad_param("extra_body", "extra_body must be a JSON object")
    out = {k: v for k, v in body.items() if k != "extra_body"}
    for key, value in nested.items():
        if key in out and out[key] != value and not (form and str(out[key]) == str(value)):
            raise bad_param(key, f"{key} is given twice with different values ({out[key]!r} and in extra_body {value!r})")
        out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    return str(a).strip() == str(b).strip()


def normalize(body: dict, form: bool, video: bool) -> tuple[dict, list[str]]:
    """(diffcore's fields, warnings) for a request body that may use a peer's field names."""
    body = merge_extra_body(body, form)
    warnings = []
    for key in sorted(set(body) & set(HARMLESS) - (set() if video else {"stream"})):  # images stream (streaming.py)
        value = body.pop(key)
        if key == "stream" and value not in (None, False, "false", "False"):
            raise bad_param("stream", "a video job is not streamed: leave stream out (or false); poll GET "
                                      "/v1/videos/{id} for its progress")
        if key != "stream":
            warnings.append(f"{key} ignored: {HARMLESS[key]}")
    outputs = body.pop("num_outputs_per_prompt", None)
    if outputs is not None:
        if video:
            if not _same(outputs, 1):
                raise bad_param("num_outputs_per_prompt", "a video job makes one video: send num_outputs_per_prompt=1 "
                                                          f"(or leave it out) and create one job per video, got {outputs!r}")
        elif body.get("n") is not None and not _same(body["n"], outputs) and not _same(body["n"], 1):
            # n=1 is OpenAI's default, which SGLang's bench_serving always sends beside num_outputs_per_prompt
            raise bad_param("num_outputs_per_prompt", f"n={body['n']!r} and num_outputs_per_prompt={outputs!r} disagree; "
                                                      "give one of them")
        else:
            body["n"] = outputs
    height, width = body.pop("height", None), body.pop("width", None)
    if height is not None or width is not None:
        if height is None or width is None:
            raise bad_param("height" if height is None else "width", "give height and width together (or size='WxH')")
        size = f"{width}x{height}"
        if body.get("size") not in (None, "auto") and not _same(str(body["size"]).lower(), size):
            raise bad_param("size", f"size={body['size']!r} disagrees with width={width!r}, height={height!r}; "
                                    "give one of them")
        body["size"] = size
    for warning in warnings:
        log.warning("request field %s", warning)
    return body, warnings


def warning_headers(warnings: list[str]) -> dict:
    return {WARNINGS_HEADER: "; ".join(warnings)} if warnings else {}
