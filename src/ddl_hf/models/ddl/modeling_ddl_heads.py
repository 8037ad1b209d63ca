"""The task heads on the DDL backbone: `DDLForSequenceClassification`, `DDLForTokenClassification` and
`DDLForQuestionAnswering` (transformers' generic heads, which read `DDLModel`'s `last_hidden_state`).

Remote code like `modeling_ddl.py`: `auto_map` names this module for each head, and saving a head copies
this file with the files it imports.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
)

from .configuration_ddl import DDLConfig
from .modeling_ddl import DDLModel, DDLPreTrainedModel


# transformers' generic heads on the DDL backbone: they read `last_hidden_state`, the final normalized
# readout of width d. The backbone is built directly rather than through `AutoModel.from_config`, which
# would not find the DDL classes in a process that loads them as remote code. Loading a checkpoint without
# the head (a `DDLForCausalLM` or `DDLModel` folder) initializes the head and reports it as missing
# (`DDLPreTrainedModel.from_pretrained`, which also names missing DDL weights of the backbone in a warning, and
# refuses any missing weight under `strict=True`). The forwards are transformers' generic ones, whose signatures
# name `inputs_embeds`, `cache` and `use_cache` (the question-answering one has no `use_cache`, as Llama's).
class DDLForSequenceClassification(GenericForSequenceClassification, DDLPreTrainedModel):
    """DDL decoder with a linear `score` head (no bias) on the last non-padding token of each row.

    The last token is the rightmost one that is not `config.pad_token_id` (left and right padding both
    work; pass the `attention_mask` too); a batch of more than one row needs `pad_token_id`. `labels`:
    class ids (`problem_type` single-label), floats for `num_labels == 1` (regression) or multi-hot rows
    (multi-label), as in every transformers sequence classifier.
    """

    def __init__(self, config: DDLConfig) -> None:
        DDLPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = DDLModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class DDLForTokenClassification(GenericForTokenClassification, DDLPreTrainedModel):
    """DDL decoder with dropout (`config.classifier_dropout`, default 0.1) and a linear `score` head on every
    token; `labels` (batch, seq_len) with -100 for positions without loss."""

    def __init__(self, config: DDLConfig) -> None:
        DDLPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = DDLModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.post_init()


class DDLForQuestionAnswering(GenericForQuestionAnswering, DDLPreTrainedModel):
    """DDL decoder with a linear `qa_outputs` head giving span start and end logits for every token
    (extractive question answering); `start_positions` and `end_positions` for the loss."""

    def __init__(self, config: DDLConfig) -> None:
        DDLPreTrainedModel.__init__(self, config)
        self.model = DDLModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


__all__ = ["DDLForSequenceClassification", "DDLForTokenClassification", "DDLForQuestionAnswering"]
