"""Deep Delta Learning (arXiv 2601.00417) as a Hugging Face Transformers model family.

Importing `ddl_hf` registers `model_type="ddl"` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, and marks the classes for remote code, so `save_pretrained`
writes the modeling files and an `auto_map` next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ddl import PRESET_SIZES, PRESET_VARIANTS, DDLConfig
from .delta_ops import delta_update_reference, unit_direction
from .modeling_ddl import (
    DDLForCausalLM,
    DDLModel,
    DDLPreTrainedModel,
    DeltaShortcut,
    EmbedExpansion,
    StateCompressor,
    record_delta_stats,
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
    "EmbedExpansion",
    "PRESET_SIZES",
    "PRESET_VARIANTS",
    "delta_update_reference",
    "unit_direction",
    "__version__",
]
