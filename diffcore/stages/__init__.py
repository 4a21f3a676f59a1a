"""The standard stages. A model pipeline is a short composition of these."""
from .base import In, Out, PipelineStage, StageField
from .denoising import DecodingStage, DenoisingStage, combine_guidance
from .encoding import ImageEncodingStage, ImageVAEEncodingStage, TextEncodingStage
from .input_validation import InputValidationStage, load_image
from .preparation import ConditioningStage, LatentPreparationStage, TimestepPreparationStage

STANDARD_STAGES = {
    cls.__name__: cls
    for cls in (InputValidationStage, TextEncodingStage, ImageEncodingStage, ImageVAEEncodingStage,
                TimestepPreparationStage, LatentPreparationStage, ConditioningStage, DenoisingStage, DecodingStage)
}

__all__ = ["PipelineStage", "StageField", "In", "Out", "load_image", "combine_guidance", "STANDARD_STAGES",
           *STANDARD_STAGES]
