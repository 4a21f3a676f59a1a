"""Qwen-Image-Layered's empty-prompt path: the picture captioned by the checkpoint's own Qwen2.5-VL encoder.

diffusers' ``QwenImageLayeredPipeline`` does this when the prompt is empty (``""`` or ``" "``): the picture, at
its condition size, goes through the VL processor with a fixed captioning instruction (Chinese, or English with
``use_en_prompt=True``), the text encoder generates up to 512 tokens with its ``generation_config`` (greedy for
Qwen2.5-VL's released settings, ``top_k=1``), and the decoded text is the prompt. The instructions below are
diffusers' (``image_caption_prompt_cn`` / ``image_caption_prompt_en``), byte for byte.
"""
from __future__ import annotations

import logging

import torch

from diffcore.errors import SamplingParamError
from diffcore.notices import notice
from diffcore.stages import In, Out, PipelineStage

log = logging.getLogger(__name__)

CAPTION_PROMPT_CN = (
    '<|im_start|>system\n'
    'You are a helpful assistant.<|im_end|>\n'
    '<|im_start|>user\n'
    '# 图像标注器\n'
    '你是一个专业的图像标注器。请基于输入图像，撰写图注:\n'
    '1.\n'
    '使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n'
    '2. 通过加入以下内容，丰富图注细节：\n'
    ' - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n'
    ' -\n'
    '对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n'
    ' - 环境细节：例如天气、光照、颜色、纹理、气氛等\n'
    ' - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n'
    '3.\n'
    '保持真实性与准确性：\n'
    ' - 不要使用笼统的描述\n'
    ' -\n'
    '描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n'
    '<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n'
    '<|im_start|>assistant\n'
)

CAPTION_PROMPT_EN = (
    '<|im_start|>system\n'
    'You are a helpful assistant.<|im_end|>\n'
    '<|im_start|>user\n'
    '# Image Annotator\n'
    'You are a professional\n'
    'image annotator. Please write an image caption based on the input image:\n'
    '1. Write the caption using natural,\n'
    'descriptive language without structured formats or rich text.\n'
    '2. Enrich caption details by including: \n'
    ' - Object\n'
    'attributes, such as quantity, color, shape, size, material, state, position, actions, and '
    'so on\n'
    ' - Vision Relations\n'
    'between objects, such as spatial relations, functional relations, possessive relations, at'
    'tachment relations, action\n'
    'relations, comparative relations, causal relations, and so on\n'
    ' - Environmental details, such as weather, lighting,\n'
    'colors, textures, atmosphere, and so on\n'
    ' - Identify the text clearly visible in the image, without translation or\n'
    'explanation, and highlight it in the caption with quotation marks\n'
    '3. Maintain authenticity and accuracy:\n'
    ' - Avoid\n'
    'generalizations\n'
    ' - Describe all visible information in the image, while do not add information not explici'
    'tly shown in\n'
    'the image\n'
    '<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n'
    '<|im_start|>assistant\n'
)

EMPTY = ("", " ")  # the prompts diffusers replaces by a caption
MAX_NEW_TOKENS = 512


class CaptionStage(PipelineStage):
    """An empty prompt becomes the picture's caption, written by the text encoder (the request's prompt is
    replaced before the text encoding; a notice says which caption was used)."""

    inputs = (In("params"), In("prompts", list), In("images", list))
    outputs = (Out("prompts", list),)
    batch = "each"

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    def forward(self, req):
        if req.params.prompt not in EMPTY:
            return req
        processor = self.components.get("processor")
        if processor is None:
            raise SamplingParamError("prompt", "the prompt is empty, so the picture would be captioned with the VL "
                                               "processor, but this checkpoint has no `processor` folder; pass a prompt")
        req.prompts = [caption(self.config, self.components["text_encoder"], processor, req)] * len(req.prompts)
        notice(log, "the prompt was empty: the text encoder captioned the picture as %r", req.prompts[0][:300])
        return req


@torch.inference_mode()
def caption(config, encoder, processor, req) -> str:
    """diffusers' ``get_image_caption``: the picture at its condition size, the captioning instruction, generated
    with the encoder's generation config, the new tokens decoded without special tokens and stripped."""
    from diffcore.image_processing import resize

    h, w = config.condition_size(req.images[0], req.params.resolution)
    text = CAPTION_PROMPT_EN if req.params.use_en_prompt else CAPTION_PROMPT_CN
    inputs = processor(text=[text], images=[resize(req.images[0], h, w)], padding=True, return_tensors="pt")
    # what transformers' Qwen2VLProcessor adds and generate() reads for the multimodal RoPE: 1 on image tokens
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token).long()
    inputs = {k: v.to(encoder.device) for k, v in inputs.items()}
    ids = encoder.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    new = ids[:, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0].strip()
