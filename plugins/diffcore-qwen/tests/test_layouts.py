"""Compatibility matrix: Qwen-Image, Qwen-Image-Edit and Edit-Plus folders in the other layouts real
checkpoints use load and match diffusers on the same folder. The layout as saved (tokenizer.json, the
processor's preprocessor_config.json: the hub layout) is test_pipeline_parity.py's; the independent
variations are combined in one folder per pipeline: diffusers' fp16 variant files, the Qwen2 tokenizers
as vocab.json + merges.txt (special tokens in tokenizer_config.json), the processor's image settings in
processor_config.json (what transformers 5 writes), the Qwen2.5-VL encoder sharded. Qwen-Image runs end
to end (fp32: max |diff| <= 2e-3, PSNR >= 45 dB); for the Edit pipelines, whose weights load the same
way, the layouts change only the prompt encoding (processor + tokenizer + VL encoder), so that is what
is compared, tightly, without the ~1 MP VAE encode of a full run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore import DiffGenerator
from diffcore.request import Request
from diffcore.testing.layouts import write_all_layouts
from diffcore.testing.weights import assert_parity


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8))


def _layout_folder(qwen_folders, qwen_reference, tmp_path, variant):
    folder = tmp_path / variant
    changes = write_all_layouts(qwen_reference(qwen_folders[variant], variant), folder)
    assert changes["tokenizer"] == "vocab.json + merges.txt" and "shards" in changes["text_encoder"]
    if variant != "t2i":
        assert changes["processor"] == "vocab.json + merges.txt, processor_config.json"
    return folder


def test_qwen_image_every_layout_matches_diffusers(qwen_folders, qwen_reference, tmp_path):
    folder = _layout_folder(qwen_folders, qwen_reference, tmp_path, "t2i")
    kw = dict(prompt=["a red circle", "two yellow squares"], height=32, width=64, negative_prompt="blurry",
              true_cfg_scale=4.0, num_inference_steps=2)
    ref = qwen_reference(folder, "t2i", {"variant": "fp16"})(**kw, generator=torch.Generator("cpu").manual_seed(3),
                                                             output_type="np").images
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, variant="fp16")
    assert_parity(gen.generate(**kw, seed=3, output_type="np").output, ref)


def _views(ref, variant, images):
    """The images as diffusers' Edit / Edit-Plus pipelines hand them to encode_prompt."""
    if variant == "edit":
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        w, h, _ = calculate_dimensions(1024 * 1024, images[0].size[0] / images[0].size[1])
        return ref.image_processor.resize(images[0], h, w)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    views = []
    for im in images:
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, im.size[0] / im.size[1])
        views.append(ref.image_processor.resize(im, h, w))
    return views


@pytest.mark.parametrize("variant", ["edit", "edit_plus"])
def test_qwen_edit_every_layout_encodes_prompts_like_diffusers(qwen_folders, qwen_reference, tmp_path, variant):
    folder = _layout_folder(qwen_folders, qwen_reference, tmp_path, variant)
    images = [_image(1), _image(2)] if variant == "edit_plus" else [_image(1)]
    ref = qwen_reference(folder, variant, {"variant": "fp16"})
    want, _ = ref.encode_prompt(prompt=["make the cat red"], image=_views(ref, variant, images),
                                device=torch.device("cpu"))
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False, variant="fp16")
    params = gen.sampling_params_cls.from_user(prompt=["make the cat red"], image=images, height=32, width=32)
    req = Request(params=params, prompts=params.prompts, batch_size=1, device=torch.device("cpu"),
                  generator=torch.Generator().manual_seed(0))
    for name in ("input_validation", "text_encoding"):
        req = gen.pipeline.stage(name)(req)
    assert want.shape[1] > 100  # the image's vision tokens are in there
    torch.testing.assert_close(req.prompt_embeds.embeds, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep", [(), ("tokenizer.json", "tokenizer_config.json")], ids=["empty", "no-image-config"])
def test_incomplete_processor_folder_names_the_folder_and_the_files(qwen_folders, tmp_path, keep):
    import shutil

    from diffcore.errors import MissingFileError

    folder = tmp_path / "edit"
    shutil.copytree(qwen_folders["edit"], folder)
    for f in (folder / "processor").iterdir():
        if f.name not in keep:
            f.unlink()
    with pytest.raises(MissingFileError) as exc_info:
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    message = str(exc_info.value)
    assert str(folder / "processor") in message and "component 'processor'" in message
    assert "preprocessor_config.json or processor_config.json (with an image_processor entry)" in message
