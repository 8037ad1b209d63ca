"""Deep Delta Learning (arXiv 2601.00417) as a Hugging Face Transformers model family.

Importing `ddl_hf` registers `model_type="ddl"` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, and marks the classes for remote code, so `save_pretrained`
writes the modeling files and an `auto_map` next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .delta_stats import DeltaStatsRecorder, record_delta_stats
from .models.ddl import (
    PRESET_SIZES,
    PRESET_VARIANTS,
    DDLConfig,
    DDLForCausalLM,
    DDLModel,
    DDLPreTrainedModel,
    DeltaShortcut,
    EmbedExpansion,
    StateCompressor,
    delta_update_reference,
    reference_paths,
    unit_direction,
)

__version__ = "0.1.0"

AutoConfig.register("ddl", DDLConfig, exist_ok=True)
AutoModel.register(DDLConfig, DDLModel, exist_ok=True)
AutoModelForCausalLM.register(DDLConfig, DDLForCausalLM, exist_ok=True)
DDLConfig.register_for_auto_class()
DDLModel.register_for_auto_class("AutoModel")
DDLForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "DDLConfig",
    "DDLModel",
    "DDLForCausalLM",
    "DDLPreTrainedModel",
    "DeltaShortcut",
    "StateCompressor",
    "record_delta_stats",
    "DeltaStatsRecorder",
    "EmbedExpansion",
    "PRESET_SIZES",
    "PRESET_VARIANTS",
    "delta_update_reference",
    "unit_direction",
    "reference_paths",
    "__version__",
]
