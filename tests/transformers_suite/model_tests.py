"""transformers' ModelTesterMixin against ddl-cc and, as the yardstick, against transformers' own Llama.

Not collected by our pytest run: `tests/test_transformers_model_tests.py` copies this file into a scratch
`tests/` package beside `test_modeling_common.py` from the source distribution of the installed transformers, and
runs it there with pytest (hence the relative import). Both classes get the same tiny backbone (hidden 32,
2 layers, 2 heads, vocab 99, batch 13 x 7 tokens), the size transformers' own testers use, and all five model
classes (base model, causal LM and the three task heads), as transformers' Llama test has.
"""

import unittest

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from transformers.models.auto import modeling_auto

from ddl_hf import (
    PRESET_VARIANTS,
    DDLConfig,
    DDLForCausalLM,
    DDLForQuestionAnswering,
    DDLForSequenceClassification,
    DDLForTokenClassification,
    DDLModel,
)

from .test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

# The mixin decides which classes get labels (and which are base models) from the static name tables of the auto
# classes; ddl_hf registers through AutoConfig/AutoModel.register instead, so enter DDL in them as an in-tree model
# is entered.
for table, name in (
    (modeling_auto.MODEL_MAPPING_NAMES, "DDLModel"),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "DDLForCausalLM"),
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "DDLForSequenceClassification"),
    (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "DDLForTokenClassification"),
    (modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, "DDLForQuestionAnswering"),
):
    table.setdefault("ddl", name)

TINY_BACKBONE = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=32,
    hidden_act="gelu",
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


class TinyCausalLMTester:
    """What ModelTesterMixin asks of a model tester: the sizes it checks outputs against, a config, and inputs
    (token ids with a random padding mask; the mixin adds labels per class)."""

    batch_size = 13
    seq_length = 7
    is_training = True
    num_labels = 3

    def __init__(self, parent, config_class, **config_fields):
        self.parent = parent
        self.config_class = config_class
        self.config_fields = {**TINY_BACKBONE, **config_fields}
        self.vocab_size = self.config_fields["vocab_size"]
        self.hidden_size = self.config_fields["hidden_size"]
        self.num_hidden_layers = self.config_fields["num_hidden_layers"]
        self.num_attention_heads = self.config_fields["num_attention_heads"]

    def get_config(self):
        return self.config_class(**self.config_fields, num_labels=self.num_labels)

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class DDLCCModelTest(ModelTesterMixin, unittest.TestCase):
    """The ddl-cc preset variant (d_v = 4, channel compressor, embedding convolution) on the tiny backbone."""

    all_model_classes = (
        DDLModel,
        DDLForCausalLM,
        DDLForSequenceClassification,
        DDLForTokenClassification,
        DDLForQuestionAnswering,
    )
    # The mixin reads the year of a "# Copyright" header to excuse pre-2023 models; ddl_hf's files carry none.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = TinyCausalLMTester(self, DDLConfig, **PRESET_VARIANTS["ddl-cc"])


class LlamaModelTest(ModelTesterMixin, unittest.TestCase):
    """transformers' Llama on the same backbone: its skips are the ones a model inside transformers has here."""

    all_model_classes = (
        LlamaModel,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
        LlamaForQuestionAnswering,
    )

    def setUp(self):
        self.model_tester = TinyCausalLMTester(self, LlamaConfig)
