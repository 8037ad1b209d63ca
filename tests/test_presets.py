"""Named presets: shapes, parameter counts against the paper, errors, and config round trips."""

import pytest
import torch
from transformers import AutoConfig

from ddl_hf import PRESET_SIZES, PRESET_VARIANTS, DDLConfig, DDLForCausalLM

VARIANTS = list(PRESET_VARIANTS)
PAPER_PARAMETERS = {"small": 124e6, "medium": 353e6}


def count_parameters(config: DDLConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init
        model = DDLForCausalLM(config)
    return sum(param.numel() for param in model.parameters())  # tied weights are counted once


def expected_parameter_count(config: DDLConfig) -> int:
    """The architecture of spec sections 1-4 counted by hand."""
    d, d_v, head_dim = config.hidden_size, config.value_channels, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + (2 * head_dim if config.use_qk_norm else 0)
    mlp = 3 * d * config.intermediate_size
    block = attention + mlp + 2 * d  # two pre-norms
    if config.residual_mode != "additive":
        gate_width = config.gate_hidden_size
        gate = d + 1 if gate_width == 0 else (d + 1) * gate_width + gate_width + 1  # W1, b1, W2, b2
        value = d * d_v + d_v
        block += 2 * (gate + value)  # one shortcut per sublayer
    compressor = 0
    if d_v > 1:
        token = config.state_compressor == "token"
        if config.compressor_form == "free":  # the read W (d, d_v)
            read = d * d_v
        else:  # the shared read r (d_v,), and for CC the kernels (d, K) along the values
            read = d_v + (0 if token else d * config.channel_kernel_size)
        compressor = read + (d * d_v * config.state_conv_size if token else 0)
        block += compressor  # one per block, shared by its two sublayers
    total = config.vocab_size * d + config.num_hidden_layers * block + compressor + d  # readout compressor, final norm
    if d_v > 1 and config.embed_expansion == "conv":
        total += d * d_v * config.embed_conv_size
    if not config.tie_word_embeddings:
        total += config.vocab_size * d
    return total


@pytest.mark.parametrize("size", list(PRESET_SIZES))
def test_parameter_counts(size):
    print(f"\n[parameters] size={size}")
    counts = {}
    for variant in VARIANTS:
        config = DDLConfig.from_preset(size, variant)
        counts[variant] = count_parameters(config)
        print(f"  {variant:14s} {counts[variant]:>12,d}  ({counts[variant] / 1e6:.2f}M)")
        assert counts[variant] == expected_parameter_count(config), variant
    if size in PAPER_PARAMETERS:
        for variant, count in counts.items():
            assert abs(count / PAPER_PARAMETERS[size] - 1) <= 0.02, (variant, count)
    # the residual machinery is small next to the backbone, and the write-only control is matched to DDL
    assert counts["write-only-cc"] == counts["ddl-cc"]
    assert counts["baseline"] < counts["ddl-scalar"] < counts["ddl-cc-noec"] < counts["ddl-cc"]
    assert counts["ddl-cc-noec"] < counts["ddl-tc-noec"] < counts["ddl-tc"]


def test_untied_embeddings_and_two_layer_gate_are_counted():
    config = DDLConfig.from_preset("tiny", "ddl-tc", tie_word_embeddings=False, gate_hidden_size=8)
    assert count_parameters(config) == expected_parameter_count(config)


def test_small_baseline_is_the_paper_124m_model_with_the_50304_vocabulary():
    config = DDLConfig.from_preset("small", "baseline")
    assert count_parameters(config) == 123_590_400
    assert abs(count_parameters(config) / 123e6 - 1) <= 0.02


@pytest.mark.parametrize(
    "size, shape",
    [
        ("mini", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=2, head_dim=128, vocab_size=8192)),
        ("small", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=6, head_dim=128, vocab_size=50304)),
        ("medium", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, head_dim=128, vocab_size=50304)),
    ],
)
def test_preset_shapes_follow_the_paper_backbone(size, shape):
    config = DDLConfig.from_preset(size, "ddl-cc")
    assert {key: getattr(config, key) for key in shape} == shape
    assert config.intermediate_size == (8 * config.hidden_size) // 3  # SwiGLU floor(8d/3)
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.use_qk_norm and config.tie_word_embeddings and not config.attention_bias


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("baseline", dict(residual_mode="additive", value_channels=1)),
        ("ddl-scalar", dict(residual_mode="delta", value_channels=1)),
        ("ddl-tc", dict(residual_mode="delta", value_channels=4, state_compressor="token", embed_expansion="conv")),
        ("ddl-cc", dict(residual_mode="delta", value_channels=4, state_compressor="channel", embed_expansion="conv")),
        (
            "ddl-tc-noec",
            dict(residual_mode="delta", value_channels=4, state_compressor="token", embed_expansion="repeat"),
        ),
        (
            "ddl-cc-noec",
            dict(residual_mode="delta", value_channels=4, state_compressor="channel", embed_expansion="repeat"),
        ),
        (
            "write-only-cc",
            dict(residual_mode="write_only", value_channels=4, state_compressor="channel", embed_expansion="conv"),
        ),
    ],
)
def test_variants_set_their_residual_fields_and_authors_defaults(variant, expected):
    config = DDLConfig.from_preset("tiny", variant)
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.variant_name == variant
    defaults = dict(
        beta_init=1.0,
        gate_hidden_size=0,
        k_eps=1e-5,
        value_input="state",
        value_activation="sigmoid",
        value_scale=4.0,
        state_conv_size=4,
        embed_conv_size=4,
    )
    assert {key: getattr(config, key) for key in defaults} == defaults


def test_preset_overrides_apply_last():
    config = DDLConfig.from_preset("tiny", "ddl-cc", value_channels=2, beta_init=0.5, hidden_size=48)
    assert (config.value_channels, config.beta_init, config.hidden_size) == (2, 0.5, 48)
    assert config.intermediate_size == 128


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(size="huge"), r"Unknown preset size 'huge'; allowed sizes: \['tiny', 'mini', 'small', 'medium'\]"),
        (dict(variant="ddl"), r"Unknown preset variant 'ddl'; allowed variants: \['baseline', 'ddl-scalar'"),
        (dict(hidden_sise=64), r"Unknown DDLConfig field\(s\) \['hidden_sise'\]"),
        (dict(value_channels=0), r"DDLConfig.value_channels must be an integer >= 1, got 0"),
    ],
)
def test_preset_errors_name_what_is_allowed(arguments, message):
    arguments = {"size": "tiny", "variant": "ddl-cc", **arguments}
    with pytest.raises(ValueError, match=message):
        DDLConfig.from_preset(**arguments)


@pytest.mark.parametrize(
    "variant, layer_types",
    [
        ("baseline", ["full_attention"] * 3),
        ("ddl-scalar", ["full_attention"] * 3),
        ("ddl-cc-noec", ["full_attention"] * 3),
        ("ddl-cc", ["hybrid", "full_attention", "full_attention"]),  # only EC keeps conv states, in layer 0
        ("write-only-cc", ["hybrid", "full_attention", "full_attention"]),
        ("ddl-tc", ["hybrid"] * 3),  # TC keeps conv states in every layer
        ("ddl-tc-noec", ["hybrid"] * 3),
    ],
)
def test_layer_types_are_derived_from_the_residual_fields(variant, layer_types):
    config = DDLConfig.from_preset("tiny", variant, num_hidden_layers=3)
    assert config.layer_types == layer_types
    assert (
        DDLConfig.from_preset("tiny", variant, num_hidden_layers=3, layer_types=layer_types).layer_types == layer_types
    )
    # A config.json written before the per-layer layout had every layer "hybrid" when the model had a token
    # convolution: it loads with the derived layout.
    legacy = ["hybrid" if "hybrid" in layer_types else "full_attention"] * 3
    assert DDLConfig.from_preset("tiny", variant, num_hidden_layers=3, layer_types=legacy).layer_types == layer_types
    wrong = ["full_attention" if layer_type == "hybrid" else "hybrid" for layer_type in layer_types]
    with pytest.raises(ValueError, match="DDLConfig.layer_types is derived"):
        DDLConfig.from_preset("tiny", variant, num_hidden_layers=3, layer_types=wrong)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trips_through_dict_and_files(variant, tmp_path):
    config = DDLConfig.from_preset("tiny", variant, beta_init=0.75, gate_hidden_size=8, pad_token_id=0)
    as_dict = config.to_dict()
    assert DDLConfig.from_dict(as_dict).to_dict() == as_dict
    config.save_pretrained(tmp_path)
    for loader in (DDLConfig.from_pretrained, AutoConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is DDLConfig
        loaded_dict = loaded.to_dict()
        assert loaded.name_or_path == str(tmp_path)  # kept on the config, not in its dict
        expected = dict(as_dict)
        expected.pop("auto_map", None)  # written by save_pretrained for remote code
        loaded_dict.pop("auto_map", None)
        assert loaded_dict == expected
        assert loaded.variant_name == variant and loaded.layer_types == config.layer_types
