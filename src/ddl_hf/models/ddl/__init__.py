"""The DDL model folder: the files `save_pretrained` copies next to the weights as remote code.

- `configuration_ddl.py`: `DDLConfig` and the named presets.
- `modeling_ddl.py`: the Llama-style decoder, `DDLModel`, `DDLForCausalLM` and the task heads.
- `delta_layers.py`: `DeltaShortcut`, `StateCompressor`, `EmbedExpansion`, the causal convolution.
- `delta_ops.py`: the Delta arithmetic as plain references and fused fast paths.
- `model_card.py`: the README.md written next to a saved checkpoint.

These files import only torch, transformers, the standard library and each other (single-dot
imports); `tests/test_layout.py` checks it.
"""

from .configuration_ddl import PRESET_SIZES, PRESET_VARIANTS, DDLConfig
from .delta_layers import DeltaShortcut, EmbedExpansion, StateCompressor, causal_depthwise_conv
from .delta_ops import delta_update_reference, reference_paths, unit_direction
from .modeling_ddl import (
    DDLForCausalLM,
    DDLForQuestionAnswering,
    DDLForSequenceClassification,
    DDLForTokenClassification,
    DDLModel,
    DDLPreTrainedModel,
)

__all__ = [
    "DDLConfig",
    "PRESET_SIZES",
    "PRESET_VARIANTS",
    "DDLModel",
    "DDLForCausalLM",
    "DDLForSequenceClassification",
    "DDLForTokenClassification",
    "DDLForQuestionAnswering",
    "DDLPreTrainedModel",
    "DeltaShortcut",
    "StateCompressor",
    "EmbedExpansion",
    "causal_depthwise_conv",
    "delta_update_reference",
    "reference_paths",
    "unit_direction",
]
