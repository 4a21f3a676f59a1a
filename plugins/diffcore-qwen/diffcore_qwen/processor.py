"""The Qwen2-VL prompt processor the Edit pipelines need, without transformers' ``Qwen2VLProcessor``.

Qwen-Image-Edit checkpoints list ``processor: Qwen2VLProcessor``; transformers 5.24 refuses to build
that class without a video processor, and every video processor needs torchvision. The Edit
pipelines only use two of its parts, the image processor and the tokenizer, so we load those from
the processor folder and redo the one step in between: each ``<|image_pad|>`` placeholder becomes
one token per merged vision patch (``prod(grid_thw) // merge_size**2``), in the order the images
are given, exactly as ``Qwen2VLProcessor`` expands it.
"""
from __future__ import annotations

import re
from math import prod
from pathlib import Path
from typing import Any, Sequence

IMAGE_TOKEN = "<|image_pad|>"


def expand_image_tokens(texts: str | Sequence[str], grid_thw, merge_size: int = 2,
                        image_token: str = IMAGE_TOKEN) -> str | list[str]:
    """Repeat the i-th ``image_token`` (counting across the batch, in order) ``prod(grid_thw[i]) // merge_size**2``
    times; the counts must match the number of images. One text in, one text out (the tests' helper too)."""
    if isinstance(texts, str):
        return expand_image_tokens([texts], grid_thw, merge_size, image_token)[0]
    counts = [prod(int(v) for v in g) // merge_size**2 for g in (grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw)]
    needed = sum(t.count(image_token) for t in texts)
    if needed != len(counts):
        raise ValueError(f"{needed} {image_token} placeholders in the prompt text but {len(counts)} images")
    it = iter(counts)
    return [re.sub(re.escape(image_token), lambda _: image_token * next(it), t) for t in texts]


class QwenVLProcessor:
    """Image processor + tokenizer with ``Qwen2VLProcessor``'s call contract for image+text prompts.

    ``processor(text=[...], images=[PIL, ...])`` returns ``input_ids``, ``attention_mask`` (padded to the
    longest prompt) and, with images, ``pixel_values`` and ``image_grid_thw`` for the vision tower.
    """

    def __init__(self, image_processor, tokenizer, image_token: str = IMAGE_TOKEN):
        self.image_processor, self.tokenizer, self.image_token = image_processor, tokenizer, image_token

    @property
    def merge_size(self) -> int:
        return int(getattr(self.image_processor, "merge_size", 2))

    def __call__(self, text: Sequence[str], images: Sequence[Any] | None = None, padding: bool = True,
                 return_tensors: str = "pt") -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        out: dict = {}
        if images:
            vision = self.image_processor(images=list(images), return_tensors=return_tensors)
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            texts = expand_image_tokens(texts, out["image_grid_thw"], self.merge_size, self.image_token)
        tokens = self.tokenizer(texts, padding=padding, return_tensors=return_tensors)
        out["input_ids"], out["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "QwenVLProcessor":
        """Read the image processor config (``preprocessor_config.json`` or ``processor_config.json``) and the
        tokenizer files of a Qwen2-VL processor folder.

        ``AutoImageProcessor`` picks transformers' torchvision backend when it is installed (as diffusers
        would) and its PIL backend otherwise; no video processor is built.
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = str(folder)
        return cls(AutoImageProcessor.from_pretrained(folder, local_files_only=True),
                   AutoTokenizer.from_pretrained(folder, local_files_only=True))


def load_processor(path: Path, spec, dtype, device) -> QwenVLProcessor:
    """diffcore custom loader for the ``processor`` component (``Qwen2VLProcessor`` in model_index.json).

    The image processor settings may be in ``preprocessor_config.json`` (the hub layout) or under
    ``image_processor`` in ``processor_config.json`` (what transformers 5 writes); the tokenizer is
    ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``. A folder missing either is an error naming it."""
    from transformers import Qwen2Tokenizer

    from diffcore.errors import LoaderError, MissingFileError
    from diffcore.loader.required_files import check_image_processor_folder, check_tokenizer_folder

    path = Path(path)
    what = f"component {spec.name!r} ({spec.class_name})"
    if not path.is_dir():
        raise MissingFileError(f"{what}: folder {path} does not exist")
    check_image_processor_folder(path, what)
    check_tokenizer_folder(path, Qwen2Tokenizer, what)
    try:
        return QwenVLProcessor.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds; name the component and the folder
        raise LoaderError(f"{what} cannot be loaded from {path}: {type(e).__name__}: {e}") from e
