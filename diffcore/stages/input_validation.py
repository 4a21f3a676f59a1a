"""InputValidationStage: resolve sizes, CFG, negative prompts and condition images before any compute."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError, SamplingParamError
from ..request import Request
from .base import In, Out, PipelineStage

# Modes that convert to RGB without losing meaning; anything else (16-bit, float, CMYK) is refused.
_CONVERTIBLE = {"RGB", "RGBA", "L", "LA", "P", "PA"}


def load_image(item, index: int = 0):
    """A PIL RGB image from a path, a PIL image or an HxWx3 uint8 array; clear errors otherwise."""
    from PIL import Image, UnidentifiedImageError

    where = f"image[{index}]"
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise SamplingParamError("image", f"{where}: file {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                item = img.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise SamplingParamError("image", f"{where}: {str(path)!r} is not a readable image ({exc})") from exc
    elif hasattr(item, "shape") and not hasattr(item, "convert"):
        import numpy as np

        arr = np.asarray(item)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise SamplingParamError("image", f"{where}: expected an HxWx3 array, got shape {tuple(arr.shape)}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        item = Image.fromarray(arr)
    if item.mode not in _CONVERTIBLE:
        raise SamplingParamError("image", f"{where}: mode {item.mode!r} is not supported; pass an RGB (or RGBA/greyscale) image")
    if min(item.size) < 1:
        raise InputError(f"{where}: image is empty")
    return item.convert("RGB") if item.mode != "RGB" else item


class InputValidationStage(PipelineStage):
    inputs = (In("params"), In("prompts", list))
    outputs = (Out("height", int), Out("width", int), Out("num_frames", int, required=False),
               Out("negative_prompts", list, required=False), Out("do_cfg", bool), Out("images", list, required=False))

    def __init__(self, config, components: dict):
        super().__init__("input_validation")
        self.config, self.components = config, components

    def forward(self, req: Request) -> Request:
        cfg, p = self.config, req.params
        if getattr(p, "timesteps", None) is not None and getattr(cfg, "dmd", None) is None:
            raise SamplingParamError("timesteps", "this model samples with num_inference_steps; a list of timesteps "
                                                  "is for few-step (DMD-distilled) models")
        self.config.resolve_size(req, self.components)
        images = p.images
        req.images = [load_image(im, i) for i, im in enumerate(images)] if images else None
        if cfg.cfg == "cfg":
            want = p.guidance_scale > 1.0
        elif cfg.cfg == "true_cfg":
            want = p.true_cfg_scale > 1.0
        else:
            want = False
        negatives = p.negative_prompts(req.batch_size, cfg.default_negative_prompt)
        if cfg.cfg == "true_cfg" and want and negatives is None:
            want = False  # diffusers: true CFG needs a negative prompt
        req.do_cfg = want
        req.negative_prompts = negatives if want else None
        return req
