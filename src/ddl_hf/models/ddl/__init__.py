"""The DDL model folder: the files `save_pretrained` copies next to the weights as remote code.

- `configuration_ddl.py`: `DDLConfig` and the named presets.
- `modeling_ddl.py`: the Llama-style decoder, `DDLModel` and `DDLForCausalLM`.
- `modeling_ddl_heads.py`: the sequence-classification, token-classification and question-answering heads.
- `modeling_outputs_ddl.py`: the output dataclasses and the initial-state / state-read options.
- `input_checks.py`: shape and value checks of the model inputs and labels (no host synchronisation).
- `checkpoint_checks.py`: what loading refuses or names in a warning (nothing silently missing; `strict=True`).
- `delta_layers.py`: `DeltaShortcut`, `StateCompressor`, `EmbedExpansion`, the causal convolution.
- `delta_ops.py`: the Delta arithmetic as plain references and fused fast paths.
- `model_card.py`: the README.md written next to a saved checkpoint.

These files import only torch, transformers, the standard library and each other (single-dot
imports); `tests/test_layout.py` checks it.
"""

from .configuration_ddl import PRESET_SIZES, PRESET_VARIANTS, DDLConfig
from .delta_layers import (
    DeltaShortcut,
    EmbedExpansion,
    StateCompressor,
    causal_depthwise_conv,
    flat_state,
    state_matrix,
)
from .delta_ops import delta_update_reference, reference_paths, unit_direction
from .modeling_ddl import DDLForCausalLM, DDLModel, DDLPreTrainedModel
from .modeling_ddl_heads import DDLForQuestionAnswering, DDLForSequenceClassification, DDLForTokenClassification

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
    "state_matrix",
    "flat_state",
    "delta_update_reference",
    "reference_paths",
    "unit_direction",
]
