from .engine_args import EngineArgs, parse_dtype
from .pipeline_config import PipelineConfig
from .sampling_params import SamplingParams

__all__ = ["EngineArgs", "PipelineConfig", "SamplingParams", "parse_dtype"]
