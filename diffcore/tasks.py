"""Tasks on one loaded model: which stage composition serves a request, and the parameters it takes.

A folder loads once. Its pipeline serves its own task (text-to-image, or image editing for an edit
checkpoint); a family may register more compositions for the same ``_class_name``
(``CompositionRegistration``: ``"img2img"``, ``"inpaint"``), built on the same components, so no
weight is loaded twice. A request picks one by what it carries, with diffusers' argument names:

* ``mask`` -> ``"inpaint"`` (``image`` + ``mask`` + ``strength``),
* ``strength`` -> ``"img2img"`` (``image`` + ``strength``; an image alone stays an error for a
  text-to-image model, so a picture passed by mistake is not silently repainted),
* otherwise the pipeline's own task.

A parameter the pipeline's own SamplingParams already has (FluxFill's ``mask``) stays its own.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import attrs

from .configs.sampling_params import SamplingParams, image_validator
from .errors import SamplingParamError

IMG2IMG, INPAINT = "img2img", "inpaint"
# What each task adds to the model's own SamplingParams (diffusers' call argument names).
TASK_PARAMETERS = {IMG2IMG: ("strength",), INPAINT: ("strength", "mask")}


def task_of(kwargs: dict, base: type[SamplingParams]) -> Optional[str]:
    """The task a request's keywords ask for; None for the pipeline's own."""
    own = set(base.parameter_names())

    def given(name: str) -> bool:
        return kwargs.get(name) is not None and name not in own

    if given("mask"):
        return INPAINT
    if given("strength"):
        return IMG2IMG
    return None


def _strength(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise SamplingParamError("strength", f"must be a number in (0, 1] (how much of the input image is re-noised: "
                                             f"1 repaints it fully), got {value!r}")


def _mask(inst, attribute, value):
    if value is None:
        raise SamplingParamError("mask", "inpainting needs a mask (white = repaint, or a PNG whose transparent "
                                         "pixels mark the area)")
    if isinstance(value, (list, tuple)):
        raise SamplingParamError("mask", "pass one mask (it applies to every prompt of the request)")
    image_validator(inst, attribute, value)


def _padding(inst, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SamplingParamError("padding_mask_crop", f"must be a whole number of pixels >= 0 (the margin around "
                                                      f"the mask's bounding box), got {value!r}")


def _fields(task: str, strength: float, mask_crop: bool) -> dict:
    fields = {"strength": attrs.field(default=strength, validator=_strength, type=float)}
    if task == INPAINT:
        fields["mask"] = attrs.field(default=None, validator=_mask, type=Any)
    if task == INPAINT and mask_crop:  # diffcore.mask_crop
        fields["padding_mask_crop"] = attrs.field(default=None, validator=_padding, type=Optional[int])
    return fields


@functools.lru_cache(maxsize=None)
def params_class(base: type[SamplingParams], task: str, strength: float = 0.6,
                 mask_crop: bool = False) -> type[SamplingParams]:
    """``base`` (the model's SamplingParams) with the task's parameters; it takes exactly one input image
    (the picture to start from) beside what ``base`` takes. ``strength`` is the default (diffusers' 0.6);
    ``mask_crop``: inpainting takes ``padding_mask_crop`` (where the composition implements it)."""
    body = {"task": task, "min_images": max(1, base.min_images), "max_images": max(1, base.max_images)}
    return attrs.make_class(f"{base.__name__}[{task}]", _fields(task, strength, mask_crop), bases=(base,),
                            kw_only=True, class_body=body)


def params_for(kwargs: dict, base: type[SamplingParams], compositions: dict, pipeline_name: str) -> type[SamplingParams]:
    """The SamplingParams class of the composition these keywords ask for; a typed error naming what the
    model serves when it has no such composition."""
    task = task_of(kwargs, base)
    if task is None:
        if kwargs.get("image") is not None and base.max_images == 0 and IMG2IMG in compositions:
            raise SamplingParamError("image", "this model takes no input image for text-to-image; for image-to-image "
                                              "pass strength= too (0-1: how much of the picture is repainted), for "
                                              "inpainting a mask=")
        return base
    comp = compositions.get(task)
    if comp is None:
        served = ", ".join(["its own task"] + sorted(compositions))
        what = "mask" if task == INPAINT else "strength"
        raise SamplingParamError(what, f"{pipeline_name} has no {task} composition installed, so it takes no "
                                       f"{what}= (it serves: {served}); `diffcore plugins` lists the compositions")
    return params_class(base, task, comp.default_strength, bool(getattr(comp, "crops_to_mask", False)))


# For a pipeline whose own parameters are these (FluxFill): the same checks.
strength_validator, mask_validator = _strength, _mask
