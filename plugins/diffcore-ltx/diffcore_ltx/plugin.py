"""diffcore entry point for LTX-2: hook implementations only.

diffcore imports this module at start-up to list the plugin, so it must stay cheap: no torch, and
classes are named by import strings that diffcore resolves when a model is loaded.
"""
from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration, LoraFormatRegistration, ModuleRegistration, PipelineRegistration

_P = "diffcore_ltx.pipelines:"
_C = "diffcore_ltx.configs:"
_T2V, _I2V = "LTX2Pipeline", "LTX2ImageToVideoPipeline"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration(_T2V, _P + "LTX2Pipeline", "LTX-2 text-to-video with synchronized audio"),
        PipelineRegistration(_I2V, _P + "LTX2ImageToVideoPipeline", "LTX-2 image-to-video with synchronized audio"),
    ]


@hookimpl
def register_configs():
    # Lightricks/LTX-2 holds the dev weights in diffusers format; a distilled folder is recognised by its
    # scheduler (no dynamic shifting) and samples with the 8 distilled sigmas, without guidance.
    return [
        ConfigRegistration("ltx-2-distilled", _T2V, _C + "LTX2Config", _C + "LTX2DistilledSamplingParams",
                           hf_ids=["rootonchair/LTX-2-19b-distilled"], aliases=["ltx-2-distilled"],
                           detector=_C + "is_distilled", source="rootonchair/LTX-2-19b-distilled"),
        ConfigRegistration("ltx-2", _T2V, _C + "LTX2Config", _C + "LTX2SamplingParams",
                           hf_ids=["Lightricks/LTX-2"], aliases=["ltx-2", "ltx-2-dev"], default_for_pipeline=True,
                           source="Lightricks/LTX-2"),
        ConfigRegistration("ltx-2-i2v-distilled", _I2V, _C + "LTX2Config", _C + "LTX2DistilledImageToVideoSamplingParams",
                           detector=_C + "is_distilled"),
        ConfigRegistration("ltx-2-i2v", _I2V, _C + "LTX2Config", _C + "LTX2ImageToVideoSamplingParams",
                           default_for_pipeline=True),
    ]


@hookimpl
def register_modules():
    return [
        ModuleRegistration("LTX2VideoTransformer3DModel", "diffcore_ltx.transformer:LTX2VideoTransformer3DModel"),
        ModuleRegistration("AutoencoderKLLTX2Video", "diffcore_ltx.video_vae:AutoencoderKLLTX2Video"),
        ModuleRegistration("AutoencoderKLLTX2Audio", "diffcore_ltx.audio_vae:AutoencoderKLLTX2Audio"),
        # classes local to diffusers' LTX-2 pipelines: model_index.json names their library "ltx2"
        ModuleRegistration("LTX2TextConnectors", "diffcore_ltx.connectors:LTX2TextConnectors", library="ltx2"),
        ModuleRegistration("LTX2Vocoder", "diffcore_ltx.vocoder:LTX2Vocoder", library="ltx2"),
        ModuleRegistration("LTX2VocoderWithBWE", "diffcore_ltx.bwe:LTX2VocoderWithBWE", library="ltx2"),  # LTX-2.3
    ]


@hookimpl
def register_lora_formats():
    L = "diffcore_ltx.lora:"
    return [LoraFormatRegistration("ltx2-original", ["LTX2VideoTransformer3DModel"], L + "is_ltx2_original",
                                   L + "convert_ltx2_original", "LTX-2's own LoRA layout (diffusion_model.* keys)")]
