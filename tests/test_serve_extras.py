"""The server's diffusion extras are the served model's SamplingParams fields: a model's own parameter is
accepted (form strings made its type), a name the model lacks is a 400 naming it, as generate() refuses it."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional

import attrs
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'diffcore[serve]'")

from diffcore.configs import SamplingParams  # noqa: E402
from diffcore.configs.sampling_params import image_validator  # noqa: E402
from diffcore.serve import schemas  # noqa: E402
from diffcore.serve.errors import APIError  # noqa: E402
from diffcore.serve.extras import REQUEST_KIND, extra_kinds  # noqa: E402


@attrs.define(kw_only=True)
class StrengthParams(SamplingParams):
    """A model with parameters of its own."""

    strength: Optional[float] = None
    tiled: bool = False
    sigmas: Optional[list] = None


def _error(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    assert info.value.status == 400
    return info.value


def test_the_extras_are_the_model_fields_less_what_the_route_sets():
    kinds = extra_kinds(StrengthParams)
    assert (kinds["strength"], kinds["tiled"], kinds["sigmas"]) == (float, bool, list)
    assert (kinds["seed"], kinds["guidance_scale"], kinds["negative_prompt"], kinds["loras"]) == (int, float, str, dict)
    assert not {"prompt", "image", "height", "width", "output_type"} & set(kinds)
    assert "strength" not in extra_kinds(SamplingParams)


def test_a_model_parameter_is_accepted_and_typed_from_a_form():
    body = {"prompt": "x", "size": "32x16", "strength": "0.25", "tiled": "true", "sigmas": "[1.0, 0.5]", "seed": "4",
            "negative_prompt": "dark", "loras": '{"style": 0.5}'}
    job = schemas.image_job(body, "m", StrengthParams, form=True)
    assert job.kwargs == [dict(prompt="x", height=16, width=32, strength=0.25, tiled=True, sigmas=[1.0, 0.5], seed=4,
                               negative_prompt="dark", loras={"style": 0.5})]
    StrengthParams.from_user(**job.kwargs[0])  # what the engine then validates


def test_a_name_the_model_lacks_is_a_400_naming_it():
    error = _error(schemas.image_job, {"prompt": "x", "strength": 0.5}, "m", SamplingParams)
    assert error.param == "strength" and "unknown parameter" in error.message
    error = _error(schemas.video_spec, {"prompt": "x", "strength": 0.5}, "m", SamplingParams, fps=16)
    assert error.param == "strength"
    spec = schemas.video_spec({"prompt": "x", "strength": 0.5, "num_frames": 5}, "m", StrengthParams, fps=16)
    assert spec.kwargs["strength"] == 0.5 and spec.kwargs["num_frames"] == 5


@pytest.mark.parametrize("body,form,param", [
    ({"strength": math.nan}, False, "strength"),
    ({"strength": "nan"}, True, "strength"),
    ({"strength": "strong"}, True, "strength"),
    ({"tiled": "maybe"}, True, "tiled"),
    ({"sigmas": "[1.0,"}, True, "sigmas"),
    ({"seed": "1.5"}, True, "seed"),
    ({"loras": {"style": math.inf}}, False, "loras"),
])
def test_bad_values_are_a_400_naming_the_field(body, form, param):
    assert _error(schemas.image_job, {"prompt": "x", **body}, "m", StrengthParams, form=form).param == param


@attrs.define(kw_only=True)
class FileishParams(SamplingParams):
    """Fields a client string must never reach as they are: they may name a server file."""

    mask_image: Any = None
    last_image: Optional[str | Path] = None
    reference: Optional[str] = attrs.field(default=None, validator=image_validator)
    frame_files: Optional[list[Path]] = None
    mode: Literal["fast", "exact"] = "fast"
    scale: Any = attrs.field(default=None, metadata={REQUEST_KIND: float})  # a plugin's explicit opt-in


def test_fields_without_a_json_type_or_checked_as_images_are_not_request_parameters():
    kinds = extra_kinds(FileishParams)
    assert not {"mask_image", "last_image", "reference", "frame_files"} & set(kinds)
    assert (kinds["mode"], kinds["scale"]) == (str, float)
    for name in ("mask_image", "last_image", "reference", "frame_files"):
        error = _error(schemas.image_job, {"prompt": "x", name: "/etc/passwd"}, "m", FileishParams)
        assert error.param == name and "unknown parameter" in error.message
    job = schemas.image_job({"prompt": "x", "scale": "0.5", "mode": "exact"}, "m", FileishParams, form=True)
    assert (job.kwargs[0]["scale"], job.kwargs[0]["mode"]) == (0.5, "exact")


@attrs.define(kw_only=True)
class UnresolvedParams(SamplingParams):
    strength: Optional[float] = None
    broken: Optional[NoSuchType] = None  # noqa: F821  (a string under postponed annotations)


def test_an_annotation_that_does_not_resolve_costs_only_its_own_field(caplog):
    with caplog.at_level(logging.WARNING, logger="diffcore.serve"):
        kinds = extra_kinds(UnresolvedParams)
    assert kinds["strength"] is float and kinds["seed"] is int and "broken" not in kinds
    assert "UnresolvedParams.broken" in caplog.text and "NoSuchType" in caplog.text
    job = schemas.image_job({"prompt": "x", "strength": "0.25"}, "m", UnresolvedParams, form=True)
    assert job.kwargs[0]["strength"] == 0.25  # still converted from the form string
