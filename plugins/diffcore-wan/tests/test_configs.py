"""Wan configs: prompt cleaning and UMT5 embeddings equal diffusers', registration, detection, defaults,
size/frame rules and precisions."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from diffcore import DiffGenerator
from diffcore.errors import ConfigError, SamplingParamError
from diffcore.plugins import get_plugin_manager
from diffcore_wan import configs as C
from wan_testlib import ours, random_image, reference


@pytest.mark.parametrize("text", [
    "  a red&amp;amp;cat \n\t on   a mat ",
    "cafÃ© &lt;b&gt;bold&lt;/b&gt;",
    "ideographic\u3000space and\u00a0nbsp",
    "色调艳丽，过曝",
])
def test_prompt_clean_matches_diffusers(text):
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    assert C.prompt_clean(text) == prompt_clean(text)


def test_umt5_embeddings_match_diffusers(wan_folders):
    """Trimmed to each prompt's true length and zero-padded back to max_sequence_length (512)."""
    folder = wan_folders["t2v21"]
    prompts = ["a cat", "two yellow squares &amp; a red circle on a white background"]
    req = SimpleNamespace(params=SimpleNamespace(max_sequence_length=512), device=torch.device("cpu"))
    got = ours(folder).config.encode_prompts(ours(folder).components, prompts, req).embeds
    want = reference(folder, "t2v21")._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=512,
                                                             device=torch.device("cpu"))
    assert got.shape == want.shape == (2, 512, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    lengths = [len(ours(folder).components["tokenizer"](C.prompt_clean(p)).input_ids) for p in prompts]
    for row, n in zip(got, lengths):
        assert row[n:].abs().max() == 0 and row[n - 1].abs().max() > 0


EXPECTED = {
    # config name: (config class, height, width, frames, fps, steps, guidance, guidance_2, recommended flow shift,
    # boundary)
    "wan2.1-t2v-1.3b": ("WanConfig", 480, 832, 81, 16, 50, 5.0, None, 3.0, None),
    "wan2.1-t2v-14b": ("Wan21T2V14BConfig", 720, 1280, 81, 16, 50, 5.0, None, 5.0, None),
    "wan2.2-t2v-a14b": ("Wan22T2VA14BConfig", 720, 1280, 81, 16, 40, 4.0, 3.0, 12.0, 0.875),
    "wan2.2-ti2v-5b": ("Wan22TI2V5BConfig", 704, 1280, 121, 24, 50, 5.0, None, 5.0, None),
    "wan2.1-i2v-14b-480p": ("WanI2VConfig", 480, 832, 81, 16, 40, 5.0, None, 3.0, None),
    "wan2.1-i2v-14b-720p": ("WanI2V720PConfig", 720, 1280, 81, 16, 40, 5.0, None, 5.0, None),
    "wan2.2-i2v-a14b": ("Wan22I2VA14BConfig", 720, 1280, 81, 16, 40, 3.5, 3.5, 5.0, 0.9),
}
HF_IDS = {f"Wan-AI/{n}-Diffusers" for n in ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.2-T2V-A14B", "Wan2.2-TI2V-5B",
                                            "Wan2.1-I2V-14B-480P", "Wan2.1-I2V-14B-720P", "Wan2.2-I2V-A14B")}


def _records():
    from diffcore.records import resolve_ref

    recs = {e.record.name: e.record for e in get_plugin_manager().registry.tables["configs"].values()
            if e.record.pipeline_name in ("WanPipeline", "WanImageToVideoPipeline")}
    return recs, resolve_ref


def test_every_wan_hub_id_is_registered_with_real_defaults():
    recs, resolve = _records()
    assert HF_IDS <= {i for r in recs.values() for i in r.hf_ids}
    for name, (cls, h, w, frames, fps, steps, g, g2, shift, boundary) in EXPECTED.items():
        rec = recs[name]
        config, params = resolve(rec.pipeline_config)(), resolve(rec.sampling_params)(prompt="x")
        assert type(config).__name__ == cls
        assert (config.default_height, config.default_width, config.default_fps) == (h, w, fps), name
        assert (params.num_frames, params.num_inference_steps, params.guidance_scale, params.guidance_scale_2) == \
            (frames, steps, g, g2), name
        assert (config.recommended_flow_shift, config.boundary_ratio) == (shift, boundary), name
        assert config.default_negative_prompt.startswith("镜头晃动" if "2.1-i2v" in name else "色调艳丽")


@pytest.mark.parametrize("kind,name", [("t2v21", "WanConfig"), ("t2v22", "Wan22T2VA14BConfig"),
                                       ("ti2v", "Wan22TI2V5BConfig"), ("i2v21", "WanI2VConfig"),
                                       ("i2v22", "Wan22I2VA14BConfig")])
def test_local_folders_are_detected(wan_folders, kind, name):
    gen = ours(wan_folders[kind])
    assert type(gen.config).__name__ == name
    # the folder's scheduler_config.json decides (3.0 in the tiny folders), whatever the official recipe says
    saved = json.loads((wan_folders[kind] / "scheduler" / "scheduler_config.json").read_text())["flow_shift"]
    assert gen.components["scheduler"].config["flow_shift"] == saved == 3.0
    assert gen.config.expand_timesteps is (kind == "ti2v")
    assert gen.config.boundary_ratio == {"t2v22": 0.875, "i2v22": 0.9}.get(kind)  # read from model_index.json


def test_plugin_module_imports_without_torch():
    code = "import sys, diffcore_wan.plugin; assert 'torch' not in sys.modules, 'plugin.py imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_guidance_scale_2_follows_guidance_scale_like_diffusers():
    assert C.Wan22T2VA14BSamplingParams.from_user(prompt="x").guidance_scale_2 == 3.0
    assert C.Wan22T2VA14BSamplingParams.from_user(prompt="x", guidance_scale=6.0).guidance_scale_2 == 6.0
    assert C.Wan22I2VA14BSamplingParams.from_user(prompt="x", image=random_image(8, 8), guidance_scale=2.0,
                                                  guidance_scale_2=1.5).guidance_scale_2 == 1.5


def test_request_errors(wan_folders):
    t2v, i2v = ours(wan_folders["t2v21"]), ours(wan_folders["i2v21"])
    with pytest.raises(SamplingParamError, match="guidance_scale_2"):
        t2v.generate(prompt="x", num_frames=5, height=32, width=32, num_inference_steps=1, guidance_scale_2=2.0)
    with pytest.raises(SamplingParamError, match="image"):
        i2v.generate(prompt="x", num_frames=5, height=32, width=32, num_inference_steps=1)  # I2V needs an image
    with pytest.raises(SamplingParamError, match="image"):
        t2v.generate(prompt="x", image=random_image(32, 32), num_inference_steps=1)  # T2V takes none
    t2v.config.size_policy = "error"
    try:
        with pytest.raises(SamplingParamError, match="4k\\+1"):
            t2v.generate(prompt="x", num_frames=6, height=32, width=32, num_inference_steps=1)
    finally:
        t2v.config.size_policy = "round"


def test_i2v_default_size_keeps_the_image_aspect(wan_folders):
    """No size given: ~480x832 pixels at the image's aspect, multiples of 16 (diffusers' documented recipe)."""
    gen = ours(wan_folders["i2v21"])
    req = gen.request(dict(prompt="x", image=random_image(1000, 500)))  # sizes resolved from the decoded image
    assert (req.height, req.width, req.num_frames) == (432, 880, 81)


def test_default_precisions(wan_folders, fastpath_mode):
    """bf16 transformer/text encoder, fp32 VAE; time embedder, modulation tables and norm2 stay fp32 (as in
    diffusers' _keep_in_fp32_modules), and the model reports its compute dtype (bf16)."""
    gen = DiffGenerator.from_pretrained(wan_folders["t2v21"], progress=False)
    model = gen.components["transformer"]
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert model.dtype == torch.bfloat16
    assert dtypes["blocks.0.attn1.to_q.weight"] == dtypes["proj_out.weight"] == torch.bfloat16
    for name in ("scale_shift_table", "blocks.1.scale_shift_table", "blocks.0.norm2.weight",
                 "condition_embedder.time_embedder.linear_1.weight"):
        assert dtypes[name] == torch.float32, name
    assert gen.components["vae"].dtype == torch.float32
    assert gen.components["text_encoder"].dtype == torch.bfloat16
    out = gen.generate(prompt="a cat", num_frames=5, height=32, width=48, num_inference_steps=2, output_type="np")
    ref = ours(wan_folders["t2v21"]).generate(prompt="a cat", num_frames=5, height=32, width=48,
                                              num_inference_steps=2, output_type="np")
    assert abs(out.output - ref.output).mean() < 0.01  # bf16 tracks fp32 on the tiny model


def test_loader_drops_the_keys_diffusers_ignores():
    from diffcore_wan.transformer import WanTransformer3DModel as M

    assert M.map_state_dict_key("blocks.0.attn2.norm_added_q.weight") is None  # _keys_to_ignore_on_load_unexpected
    assert M.map_state_dict_key("blocks.0.attn2.norm_added_k.weight") == "blocks.0.attn2.norm_added_k.weight"
    assert M._keep_in_fp32_modules == ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def test_model_index_boundary_ratio_wins_over_the_configs_default(wan_folders, tmp_path):
    """``"boundary_ratio": null`` in model_index.json means one expert in diffusers; the Wan 2.2 A14B
    config's 0.875 must not replace it. A non-number is an error naming the file."""
    import shutil

    folder = tmp_path / "t2v22-null"
    shutil.copytree(wan_folders["t2v22"], folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "boundary_ratio": None}))
    gen = DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
    assert type(gen.config).__name__ == "Wan22T2VA14BConfig" and gen.config.boundary_ratio is None
    index_path.write_text(json.dumps({**index, "boundary_ratio": "0.9"}))
    with pytest.raises(ConfigError, match=r"model_index.json: boundary_ratio must be a number"):
        DiffGenerator.from_pretrained(folder, dtype="float32", progress=False)
