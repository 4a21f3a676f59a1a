"""InputValidationStage: resolve sizes, CFG, negative prompts and condition images before any compute."""
from __future__ import annotations

import logging
from pathlib import Path

from ..configs import budget
from ..errors import InputError, SamplingParamError
from ..notices import notice
from ..request import Request
from ..schedulers.base import with_flow_shift
from .base import In, Out, PipelineStage
from .preparation import request_schedule

log = logging.getLogger(__name__)

# Modes that convert to RGB without losing meaning; anything else (16-bit, float, CMYK) is refused.
_CONVERTIBLE = {"RGB", "RGBA", "L", "LA", "P", "PA"}


def load_image(item, index: int = 0):
    """A PIL RGB image from a path, a PIL image or an HxWx3 uint8 array; clear errors otherwise."""
    from PIL import Image, UnidentifiedImageError

    where = f"image[{index}]"
    if isinstance(item, (str, Path)):
        path = Path(item)
        if path.is_dir():
            raise SamplingParamError("image", f"{where}: {str(path)!r} is a directory; pass an image file")
        if not path.is_file():
            raise SamplingParamError("image", f"{where}: file {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                _check_pixels(img.size, where, path)  # from the header, before decoding anything
                img.load()
                item = img.copy()
        except Image.DecompressionBombError as exc:  # PIL's own check in open(), at twice its limit
            raise SamplingParamError("image", f"{where}: {str(path)!r}: {exc} Downscale it, or raise "
                                     "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise SamplingParamError("image", f"{where}: {str(path)!r} is not a readable image ({exc})") from exc
    elif hasattr(item, "shape") and not hasattr(item, "convert"):
        item = Image.fromarray(_array_to_uint8(item, where))
    else:
        item = _loaded(item, where)
    if item.mode not in _CONVERTIBLE:
        raise SamplingParamError("image", f"{where}: mode {item.mode!r} is not supported; pass an RGB (or RGBA/greyscale) image")
    if min(item.size) < 1:
        raise InputError(f"{where}: image is empty")
    return item.convert("RGB") if item.mode != "RGB" else item


def _loaded(image, where: str):
    """A PIL image given by the caller, decoded now: a closed or truncated one is an error naming it, not a raw
    ValueError / OSError from deep inside the conversion."""
    try:
        image.load()
    except (ValueError, OSError, SyntaxError) as exc:
        raise SamplingParamError("image", f"{where}: the PIL image cannot be read ({exc}); it is closed or its data "
                                 "is truncated: open the file again (and check it is complete)") from None
    return image


def _check_pixels(size: tuple[int, int], where: str, path: Path) -> None:
    """Refuse a decompression bomb: more pixels than PIL's own limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise SamplingParamError("image", f"{where}: {str(path)!r} is {size[0]} x {size[1]} = {size[0] * size[1]:,} "
                                 f"pixels, more than the {limit:,} accepted (a decompression bomb?); downscale it, or "
                                 "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file")


def _array_to_uint8(item, where: str):
    """An HxWx3 array as uint8: uint8 as is, floats must be finite and in [0, 1] (they are scaled by 255)."""
    import numpy as np

    if hasattr(item, "detach"):  # a torch tensor; numpy has no bfloat16 / float16 of every kind: float32 first
        item = item.detach().cpu()
        item = item.float() if item.is_floating_point() else item
    arr = np.asarray(item)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise SamplingParamError("image", f"{where}: expected an HxWx3 array, got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise SamplingParamError("image", f"{where}: arrays must be uint8 (0-255) or float (0-1), got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise SamplingParamError("image", f"{where}: the float array holds NaN or inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        raise SamplingParamError("image", f"{where}: float arrays must be in [0, 1], got values in [{lo:g}, {hi:g}]; "
                                 "scale it (e.g. a 0-255 float array: arr / 255), or pass uint8")
    return (arr * 255).round().astype(np.uint8)


def _warn_ignored(cfg, p, do_cfg: bool) -> None:
    """Parameters this model or request will not use, reported as diffusers does (a warning, not silence)."""
    if not cfg.is_video:
        for name in ("num_frames", "fps"):
            if getattr(p, name) is not None:
                notice(log, "%s=%s is ignored: this model makes images, not videos", name, getattr(p, name),
                       ignored=name)
    if p.negative_prompt is not None and not do_cfg:
        why = {"cfg": "guidance_scale <= 1", "true_cfg": "true_cfg_scale <= 1"}.get(cfg.cfg, "this model does not use it")
        notice(log, "negative_prompt is ignored: classifier-free guidance is off (%s)", why, ignored="negative_prompt")
    if cfg.cfg == "true_cfg" and p.true_cfg_scale > 1 and not do_cfg:
        notice(log, "true_cfg_scale=%s is ignored: true CFG needs a negative_prompt", p.true_cfg_scale,
               ignored="true_cfg_scale")


class InputValidationStage(PipelineStage):
    batch = "each"
    inputs = (In("params"), In("prompts", list))
    outputs = (Out("height", int), Out("width", int), Out("num_frames", int, required=False),
               Out("negative_prompts", list, required=False), Out("do_cfg", bool), Out("images", list, required=False))

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    def forward(self, req: Request) -> Request:
        cfg, p = self.config, req.params
        if p.timesteps is not None and cfg.dmd is None:
            raise SamplingParamError("timesteps", "this model samples with num_inference_steps; a list of timesteps "
                                                  "is for few-step (DMD-distilled) models")
        limits = budget.current()
        limits.check_steps(p.num_inference_steps)
        if p.timesteps is not None:
            limits.check_steps(len(p.timesteps))
        images = p.images  # decoded once, here, before the sizes: a config sizes the output from req.images
        req.images = [load_image(im, i) for i, im in enumerate(images)] if images else None
        self.config.resolve_size(req, self.components)
        limits.check_size(req.height, req.width, req.num_frames if cfg.is_video else None)
        scheduler = self.components.get("scheduler")
        if cfg.dmd is None and scheduler is not None:
            if getattr(scheduler, "config", {}).get("use_dynamic_shifting"):  # mu needs the latents: shift only
                if p.flow_shift is not None:
                    with_flow_shift(scheduler, p.flow_shift)
            else:  # the request's flow_shift and step count, refused now rather than after text encoding
                request_schedule(cfg, scheduler, req)
        want = cfg.wants_cfg(p)
        negatives = p.negative_prompts(req.batch_size, cfg.default_negative_prompt)
        if cfg.cfg == "true_cfg" and want and negatives is None:
            want = False  # diffusers: true CFG needs a negative prompt
        req.do_cfg = want
        req.negative_prompts = negatives if want else None
        _warn_ignored(cfg, p, want)
        return req
