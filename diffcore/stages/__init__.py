"""The standard stages. A model pipeline is a short composition of these."""
from .base import In, Out, PipelineStage, StageField
from .causal import CausalDMDDenoisingStage
from .denoising import DecodingStage, DenoisingStage
from .dmd import DmdDenoisingStage
from .encoding import ImageEncodingStage, ImageVAEEncodingStage, TextEncodingStage
from .input_validation import InputValidationStage, load_image
from .loop import DenoisingLoopStage
from .preparation import ConditioningStage, LatentPreparationStage, TimestepPreparationStage

STANDARD_STAGES = {
    cls.__name__: cls
    for cls in (InputValidationStage, TextEncodingStage, ImageEncodingStage, ImageVAEEncodingStage,
                TimestepPreparationStage, LatentPreparationStage, ConditioningStage, DenoisingStage, DmdDenoisingStage,
                CausalDMDDenoisingStage, DecodingStage)
}

__all__ = ["PipelineStage", "StageField", "In", "Out", "load_image", "STANDARD_STAGES", "DenoisingLoopStage",
           *STANDARD_STAGES]
