"""Qwen-Image test helpers (offline): the prompt templates' system prompts and a tiny Qwen2 tokenizer that
knows them, so the templated prefixes have the real tokenizer's lengths. Runtime code never imports this
module."""
from __future__ import annotations

# diffusers' Qwen-Image prompt templates wrap the prompt in these system prompts; the pipelines drop
# the first 34 (Qwen-Image) / 64 (Qwen-Image-Edit, Edit-Plus) hidden states, which is the token count
# of "<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n" with the real Qwen tokenizer.
QWEN_IMAGE_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:"
)
QWEN_EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)


def tiny_qwen_image_tokenizer(words=None):
    """diffcore's tiny ``Qwen2Tokenizer`` with every pre-token of the Qwen-Image system prompts as one token:
    34 prefix tokens for ``QwenImagePipeline``, 64 for ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``."""
    from diffcore.testing.tokenizers import tiny_qwen2_tokenizer

    return tiny_qwen2_tokenizer(words, texts=("system\n" + QWEN_IMAGE_SYSTEM_PROMPT, "system\n" + QWEN_EDIT_SYSTEM_PROMPT))
