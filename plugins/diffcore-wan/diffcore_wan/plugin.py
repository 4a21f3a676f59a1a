"""diffcore entry point for Wan 2.1 / 2.2: hook implementations only, no torch import."""
from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration, LoraFormatRegistration, ModuleRegistration, PipelineRegistration

_C = "diffcore_wan.configs:"
_F = "diffcore_wan.fewstep:"
_T2V, _I2V = "WanPipeline", "WanImageToVideoPipeline"
_DMD, _CAUSAL = "WanDMDPipeline", "WanCausalDMDPipeline"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration(_T2V, "diffcore_wan.pipelines:WanPipeline",
                             "Wan 2.1 / 2.2 text-to-video (TI2V-5B: optional first-frame image)"),
        PipelineRegistration(_I2V, "diffcore_wan.pipelines:WanImageToVideoPipeline", "Wan 2.1 / 2.2 image-to-video"),
        PipelineRegistration(_DMD, "diffcore_wan.pipelines:WanDMDPipeline",
                             "few-step distilled Wan (FastWan, TurboWan): DMD sampling"),
        PipelineRegistration(_CAUSAL, "diffcore_wan.pipelines:WanCausalDMDPipeline",
                             "self-forcing causal Wan: block-by-block video with a KV cache, streamed"),
    ]


@hookimpl
def register_configs():
    # Within one pipeline class, detectors are tried in this order; the default catches the rest.
    return [
        ConfigRegistration("wan2.2-t2v-a14b", _T2V, _C + "Wan22T2VA14BConfig", _C + "Wan22T2VA14BSamplingParams",
                           hf_ids=["Wan-AI/Wan2.2-T2V-A14B-Diffusers"], aliases=["wan2.2-t2v-a14b"],
                           detector=_C + "is_two_expert"),
        ConfigRegistration("wan2.2-ti2v-5b", _T2V, _C + "Wan22TI2V5BConfig", _C + "Wan22TI2V5BSamplingParams",
                           hf_ids=["Wan-AI/Wan2.2-TI2V-5B-Diffusers"], aliases=["wan2.2-ti2v-5b"],
                           detector=_C + "is_ti2v"),
        ConfigRegistration("wan2.1-t2v-14b", _T2V, _C + "Wan21T2V14BConfig", _C + "WanSamplingParams",
                           hf_ids=["Wan-AI/Wan2.1-T2V-14B-Diffusers"], aliases=["wan2.1-t2v-14b"],
                           detector=_C + "is_t2v_14b"),
        ConfigRegistration("wan2.1-t2v-1.3b", _T2V, _C + "WanConfig", _C + "WanSamplingParams",
                           hf_ids=["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"], aliases=["wan2.1-t2v-1.3b"],
                           default_for_pipeline=True),
        ConfigRegistration("wan2.2-i2v-a14b", _I2V, _C + "Wan22I2VA14BConfig", _C + "Wan22I2VA14BSamplingParams",
                           hf_ids=["Wan-AI/Wan2.2-I2V-A14B-Diffusers"], aliases=["wan2.2-i2v-a14b"],
                           detector=_C + "is_two_expert"),
        ConfigRegistration("wan2.2-ti2v-5b-i2v", _I2V, _C + "Wan22TI2V5BConfig", _C + "Wan22TI2V5BSamplingParams",
                           detector=_C + "is_ti2v"),
        ConfigRegistration("wan2.1-i2v-14b-720p", _I2V, _C + "WanI2V720PConfig", _C + "WanI2VSamplingParams",
                           hf_ids=["Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"], aliases=["wan2.1-i2v-14b-720p"],
                           detector=_C + "is_i2v_720p"),
        ConfigRegistration("wan2.1-i2v-14b-480p", _I2V, _C + "WanI2VConfig", _C + "WanI2VSamplingParams",
                           hf_ids=["Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"], aliases=["wan2.1-i2v-14b-480p"],
                           default_for_pipeline=True),
        # few-step distilled checkpoints (model_index _class_name "WanDMDPipeline")
        ConfigRegistration("fastwan2.2-ti2v-5b", _DMD, _F + "FastWan22TI2V5BConfig", _F + "FastWan22TI2VSamplingParams",
                           hf_ids=["FastVideo/FastWan2.2-TI2V-5B-Diffusers", "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers"],
                           aliases=["fastwan2.2-ti2v-5b"], detector=_C + "is_ti2v"),
        ConfigRegistration("turbowan2.2-i2v-720p", _DMD, _F + "TurboWan22I2VConfig", _F + "TurboWanI2VSamplingParams",
                           aliases=["turbowan2.2-i2v-720p"], detector=_F + "is_two_expert_i2v"),
        ConfigRegistration("turbowan2.1-t2v-480p", _DMD, _F + "TurboWan21T2VConfig", _F + "TurboWanSamplingParams",
                           aliases=["turbowan2.1-t2v-480p"]),
        ConfigRegistration("fastwan2.1-t2v-1.3b", _DMD, _F + "FastWan21T2VConfig", _F + "FastWanSamplingParams",
                           hf_ids=["FastVideo/FastWan2.1-T2V-1.3B-Diffusers"], aliases=["fastwan2.1-t2v-1.3b"],
                           default_for_pipeline=True),
        # self-forcing causal Wan (model_index _class_name "WanCausalDMDPipeline")
        ConfigRegistration("sfwan2.1-t2v-1.3b", _CAUSAL, _F + "SelfForcingWanConfig", _F + "SelfForcingSamplingParams",
                           hf_ids=["wlsaidhi/SFWan2.1-T2V-1.3B-Diffusers"], aliases=["sfwan2.1-t2v-1.3b"],
                           default_for_pipeline=True),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("WanTransformer3DModel", "diffcore_wan.transformer:WanTransformer3DModel"),
            ModuleRegistration("CausalWanTransformer3DModel", "diffcore_wan.transformer:CausalWanTransformer3DModel")]


@hookimpl
def register_lora_formats():
    L = "diffcore_wan.lora:"
    return [
        LoraFormatRegistration("wan-original", ["WanTransformer3DModel", "CausalWanTransformer3DModel"], L + "is_wan_original", L + "convert_wan_original",
                               "original-Wan-layout LoRAs (lightx2v distill, ComfyUI) and musubi-tuner"),
    ]
