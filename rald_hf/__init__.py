"""rald_hf: RALD fine-grained facial expression recognition as a timm / Hugging Face transformers model.

Importing the package registers ``RALDConfig`` with ``AutoConfig``, the models with ``AutoModel`` and
``AutoModelForImageClassification`` and the image processor with ``AutoImageProcessor``, and marks them for
remote code, so that ``save_pretrained`` writes an ``auto_map`` and the code files into every checkpoint.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from . import hub
from .configuration_rald import RALDConfig
from .image_processing_rald import RALDImageProcessor, to_rgb_image
from .labels import LabelSpace, MissingWordsError, load_word_vectors
from .modeling_rald import (
    RALDForImageClassification,
    RALDImageClassifierOutput,
    RALDModel,
    RALDModelOutput,
    RALDPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(RALDConfig.model_type, RALDConfig, exist_ok=True)
AutoModel.register(RALDConfig, RALDModel, exist_ok=True)
AutoModelForImageClassification.register(RALDConfig, RALDForImageClassification, exist_ok=True)
# One class serves both backends: it works on PIL images and tensors alike, through timm's transform.
AutoImageProcessor.register(
    RALDConfig, image_processor_classes={"pil": RALDImageProcessor, "torchvision": RALDImageProcessor}, exist_ok=True
)
RALDConfig.register_for_auto_class()
RALDModel.register_for_auto_class("AutoModel")
RALDForImageClassification.register_for_auto_class("AutoModelForImageClassification")
RALDImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "hub",
    "LabelSpace",
    "MissingWordsError",
    "RALDConfig",
    "RALDForImageClassification",
    "RALDImageClassifierOutput",
    "RALDImageProcessor",
    "RALDModel",
    "RALDModelOutput",
    "RALDPreTrainedModel",
    "load_word_vectors",
    "to_rgb_image",
]
