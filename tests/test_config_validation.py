"""Every invalid DDLConfig field value or combination raises a ValueError that names the field."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig

from ddl_hf import PRESET_SIZES, PRESET_VARIANTS, DDLConfig, DDLForCausalLM

# (case id, overrides applied to the tiny ddl-cc preset, field the message must name, allowed values it must show)
INVALID_CASES = [
    ("value_channels-zero", dict(value_channels=0), "value_channels", ">= 1"),
    ("value_channels-negative", dict(value_channels=-2), "value_channels", ">= 1"),
    ("value_channels-float", dict(value_channels=4.0), "value_channels", "integer"),
    ("value_channels-string", dict(value_channels="4"), "value_channels", "integer"),
    ("beta_init-above-two", dict(beta_init=2.5), "beta_init", "[0.0, 2.0]"),
    ("beta_init-negative", dict(beta_init=-0.1), "beta_init", "[0.0, 2.0]"),
    ("beta_init-nan", dict(beta_init=float("nan")), "beta_init", "finite"),
    ("residual_mode-unknown", dict(residual_mode="residual"), "residual_mode", "'delta', 'additive', 'write_only'"),
    ("state_compressor-unknown", dict(state_compressor="mean"), "state_compressor", "'channel', 'token'"),
    ("embed_expansion-unknown", dict(embed_expansion="tile"), "embed_expansion", "'conv', 'repeat'"),
    ("state_conv_size-zero", dict(state_conv_size=0), "state_conv_size", ">= 1"),
    ("embed_conv_size-zero", dict(embed_conv_size=0), "embed_conv_size", ">= 1"),
    ("k_eps-negative", dict(k_eps=-1e-5), "k_eps", "(0.0, inf)"),
    ("k_eps-zero", dict(k_eps=0.0), "k_eps", "(0.0, inf)"),
    ("k_eps-infinite", dict(k_eps=float("inf")), "k_eps", "finite"),
    ("value_scale-zero", dict(value_scale=0.0), "value_scale", "(0.0, inf)"),
    ("gate_hidden_size-negative", dict(gate_hidden_size=-1), "gate_hidden_size", ">= 0"),
    ("value_input-unknown", dict(value_input="hidden"), "value_input", "'state', 'context'"),
    ("value_activation-unknown", dict(value_activation="tanh"), "value_activation", "'sigmoid', 'identity'"),
    (
        "additive-with-value-channels",
        dict(residual_mode="additive", value_channels=4),
        "value_channels",
        "must be 1 when residual_mode='additive'",
    ),
    (
        "hidden-not-divisible-by-heads",
        dict(hidden_size=30, num_attention_heads=4, head_dim=None),
        "hidden_size",
        "divisible by num_attention_heads",
    ),
    (
        "kv-heads-not-dividing-heads",
        dict(num_attention_heads=4, num_key_value_heads=3),
        "num_key_value_heads",
        "divide",
    ),
    ("num_key_value_heads-zero", dict(num_key_value_heads=0), "num_key_value_heads", ">= 1"),
    ("head_dim-odd", dict(head_dim=15), "head_dim", "even"),
    ("hidden_size-float", dict(hidden_size=32.0), "hidden_size", "integer"),
    ("num_hidden_layers-bool", dict(num_hidden_layers=True), "num_hidden_layers", "integer"),
    ("num_attention_heads-zero", dict(num_attention_heads=0), "num_attention_heads", ">= 1"),
    ("vocab_size-zero", dict(vocab_size=0), "vocab_size", ">= 1"),
    ("intermediate_size-zero", dict(intermediate_size=0), "intermediate_size", ">= 1"),
    ("max_position_embeddings-zero", dict(max_position_embeddings=0), "max_position_embeddings", ">= 1"),
    ("rms_norm_eps-zero", dict(rms_norm_eps=0.0), "rms_norm_eps", "(0.0, inf)"),
    ("attention_dropout-above-one", dict(attention_dropout=1.5), "attention_dropout", "[0.0, 1.0]"),
    ("initializer_range-negative", dict(initializer_range=-0.02), "initializer_range", "[0.0, inf)"),
    ("hidden_act-unknown", dict(hidden_act="tanh"), "hidden_act", "'silu'"),
    ("use_qk_norm-string", dict(use_qk_norm="no"), "use_qk_norm", "True or False"),
    ("tie_word_embeddings-string", dict(tie_word_embeddings="false"), "tie_word_embeddings", "True or False"),
    ("pad_token_id-outside-vocab", dict(pad_token_id=96), "pad_token_id", "[0, vocab_size=96)"),
    ("pad_token_id-negative", dict(pad_token_id=-1), "pad_token_id", "[0, vocab_size=96)"),
    ("eos_token_id-list-outside-vocab", dict(eos_token_id=[1, 500]), "eos_token_id", "[0, vocab_size=96)"),
    (
        "rope_type-unknown",
        dict(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}),
        "rope_parameters['rope_type']",
        "'default'",
    ),
    (
        "rope_theta-negative",
        dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
        "rope_parameters['rope_theta']",
        "(0.0, inf)",
    ),
    ("layer_types-inconsistent", dict(layer_types=["full_attention", "full_attention"]), "layer_types", "hybrid"),
    ("num_labels-zero", dict(num_labels=0), "num_labels", ">= 1"),
    ("num_labels-float", dict(num_labels=2.0), "num_labels", "integer"),
    ("num_labels-disagrees-with-id2label", dict(num_labels=3, id2label={0: "a", 1: "b"}), "num_labels", "id2label"),
    ("id2label-list", dict(id2label=["a", "b"]), "id2label", "{id: name}"),
    ("id2label-name-keys", dict(id2label={"a": 0}), "id2label", "{id: name}"),
    ("label2id-id-keys", dict(label2id={0: "a"}), "label2id", "{name: id}"),
    ("problem_type-unknown", dict(problem_type="ranking"), "problem_type", "'single_label_classification'"),
]


def test_table_has_at_least_fifteen_distinct_fields():
    assert len(INVALID_CASES) >= 15
    assert len({field for _, _, field, _ in INVALID_CASES}) >= 15


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"), [c[1:] for c in INVALID_CASES], ids=[c[0] for c in INVALID_CASES]
)
def test_invalid_field_raises_value_error_naming_the_field(overrides, field, allowed):
    with pytest.raises(ValueError) as preset_error:
        DDLConfig.from_preset("tiny", "ddl-cc", **overrides)
    message = str(preset_error.value)
    assert f"DDLConfig.{field}" in message
    assert allowed in message
    # The same value given to the constructor directly fails the same way.
    with pytest.raises(ValueError, match=re.escape(f"DDLConfig.{field}")):
        DDLConfig(**{**PRESET_SIZES["tiny"], **PRESET_VARIANTS["ddl-cc"], **overrides})


def test_invalid_value_message_shows_the_rejected_value():
    with pytest.raises(ValueError, match=r"got 'residual'$"):
        DDLConfig.from_preset("tiny", "ddl-cc", residual_mode="residual")
    with pytest.raises(ValueError, match=r"got 2\.5$"):
        DDLConfig.from_preset("tiny", "ddl-cc", beta_init=2.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: DDLConfig.from_preset("huge", "ddl-cc"), r"Unknown preset size 'huge'.*'tiny', 'mini'"),
        (lambda: DDLConfig.from_preset("tiny", "ddl-xx"), r"Unknown preset variant 'ddl-xx'.*'baseline'"),
        (
            lambda: DDLConfig.from_preset("tiny", "ddl-cc", value_chanels=2),
            r"Unknown DDLConfig field\(s\) \['value_chanels'\]",
        ),
    ],
    ids=["size", "variant", "misspelled-field"],
)
def test_from_preset_rejects_unknown_names(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("variant", list(PRESET_VARIANTS))
def test_every_preset_variant_is_valid_and_builds(variant):
    """The validation must not reject what the package itself ships (the other side of the table above)."""
    config = DDLConfig.from_preset("tiny", variant, pad_token_id=0, eos_token_id=[1, 95])
    model = DDLForCausalLM(config)
    logits = model(input_ids=torch.tensor([[0, 5, 95]])).logits
    assert logits.shape == (1, 3, 96)


def test_boundary_values_are_accepted():
    for overrides in (
        dict(beta_init=0.0),
        dict(beta_init=2.0),
        dict(state_conv_size=1, embed_conv_size=1),
        dict(gate_hidden_size=0),
        dict(value_channels=1),
        dict(hidden_size=32, num_attention_heads=4, head_dim=None),
        dict(num_attention_heads=4, num_key_value_heads=2),
    ):
        config = DDLConfig.from_preset("tiny", "ddl-cc", **overrides)
        for name, value in overrides.items():
            if value is not None:
                assert getattr(config, name) == value


# --------------------------------------------------------------------------- the standard PreTrainedConfig fields
TASK_FIELDS = dict(
    num_labels=3,
    id2label={0: "negative", 1: "neutral", 2: "positive"},
    label2id={"negative": 0, "neutral": 1, "positive": 2},
    problem_type="single_label_classification",
)


def test_standard_pretrained_config_fields_are_accepted():
    config = DDLConfig(num_labels=3)
    assert config.num_labels == 3 and config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert config.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    config = DDLConfig.from_preset(
        "tiny", "ddl-tc", **TASK_FIELDS, dtype="bfloat16", output_hidden_states=True, return_dict=False
    )
    assert config.num_labels == 3
    assert (config.id2label, config.label2id) == (TASK_FIELDS["id2label"], TASK_FIELDS["label2id"])
    assert config.problem_type == "single_label_classification"
    assert (config.dtype, config.output_hidden_states, config.return_dict) == (torch.bfloat16, True, False)
    assert DDLConfig.from_preset("tiny", "ddl-cc", attn_implementation="eager")._attn_implementation == "eager"
    # JSON stores label ids as strings: they come back as ints.
    assert DDLConfig(id2label={"0": "a", "1": "b"}).id2label == {0: "a", 1: "b"}


def test_field_names_lists_the_fields_and_constructor_keywords_but_no_class_constants():
    names = DDLConfig.field_names()
    assert {"num_labels", "id2label", "label2id", "problem_type", "dtype", "value_channels", "vocab_size"} <= set(names)
    assert not {"model_type", "base_model_tp_plan", "attribute_map", "_auto_class"} & set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(TASK_FIELDS, pad_token_id=0, eos_token_id=[1, 2], beta_init=0.5, dtype="bfloat16", value_channels=2)],
    ids=["default", "customized"],
)
def test_save_then_load_gives_the_same_to_dict(overrides, tmp_path):
    config = DDLConfig.from_preset("tiny", "ddl-tc", **overrides)
    config.save_pretrained(tmp_path)
    for loader in (DDLConfig.from_pretrained, AutoConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is DDLConfig
        assert loaded.to_dict() == config.to_dict()
        assert loaded.name_or_path == str(tmp_path)  # kept on the config, left out of to_dict()
        for name, value in overrides.items():
            assert getattr(loaded, name) == (torch.bfloat16 if name == "dtype" else value), name
    assert DDLConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_new_configs_are_the_authors_forms_and_old_dicts_keep_the_earlier_forms(tmp_path):
    config = DDLConfig.from_preset("tiny", "ddl-cc")
    authors = {"qk_norm_position": "after_rope", "compressor_form": "factored", "init_scheme": "authors"}
    assert {name: getattr(config, name) for name in authors} == authors and config.rms_norm_eps == 1e-5
    old_dict = {key: value for key, value in config.to_dict().items() if key not in authors}
    old = DDLConfig.from_dict(old_dict)
    assert {name: getattr(old, name) for name in authors} == {
        "qk_norm_position": "before_rope",
        "compressor_form": "free",
        "init_scheme": "neutral",
    }
    config.save_pretrained(tmp_path)  # a new config.json stores the fields, so it keeps the authors' forms
    assert DDLConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [("qk_norm_position", "after_norm"), ("compressor_form", "shared"), ("init_scheme", "xavier")],
)
def test_the_form_fields_name_what_is_allowed(field, value):
    with pytest.raises(ValueError, match=rf"DDLConfig\.{field} must be one of \[.*\], got '{value}'"):
        DDLConfig.from_preset("tiny", "ddl-cc", **{field: value})
