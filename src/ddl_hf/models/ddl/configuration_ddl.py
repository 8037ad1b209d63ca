"""Configuration of Deep Delta Learning (DDL) language models.

`DDLConfig` holds a Llama-style backbone (RMSNorm pre-norm, RoPE attention with optional
QK-norm, SwiGLU MLP, tied embeddings) and the fields that choose how each block writes
into its residual state. `DDLConfig.from_preset(size, variant)` builds the named
configurations of the paper (arXiv 2601.00417) and of this package.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

RESIDUAL_MODES = ("delta", "additive", "write_only")
STATE_COMPRESSORS = ("channel", "token")
EMBED_EXPANSIONS = ("conv", "repeat")
VALUE_INPUTS = ("state", "context")
VALUE_ACTIVATIONS = ("sigmoid", "identity")
QK_NORM_POSITIONS = ("after_rope", "before_rope")
COMPRESSOR_FORMS = ("factored", "free")
INIT_SCHEMES = ("authors", "neutral")

# What a `config.json` written before these fields existed meant: ddl_hf's earlier forms. `DDLConfig.from_dict`
# fills them in for a dict that lacks them, so an old checkpoint keeps its meaning; new configs default to the
# authors' forms.
LEGACY_FIELD_VALUES = {"qk_norm_position": "before_rope", "compressor_form": "free", "init_scheme": "neutral"}


class ConvStateSlot(enum.IntEnum):
    """The short convolutions that keep their last K - 1 inputs in the generation cache.

    | slot              | convolution                                  | cache layer                |
    |-------------------|----------------------------------------------|----------------------------|
    | `ATTENTION_INPUT` | token compressor reading the attention input | the block's own layer      |
    | `MLP_INPUT`       | token compressor reading the MLP input       | the block's own layer      |
    | `EMBED_EXPANSION` | embedding convolution (EC)                   | layer 0                    |
    | `READOUT`         | token compressor before the final norm       | the last layer             |

    A cache layer holds exactly the conv states of the slots the model uses there
    (`DDLConfig.conv_state_slots(layer_idx)`, in this table's order), so that transformers' crop,
    reorder and batch selection find no empty state: a layer with such slots is `"hybrid"` (attention
    cache plus conv states), one without is `"full_attention"`. A slot's position in that tuple is its
    `state_idx` in `Cache.update_conv_state` (`DDLConfig.conv_state_index`).
    """

    ATTENTION_INPUT = 0
    MLP_INPUT = 1
    EMBED_EXPANSION = 2
    READOUT = 3


class CacheLayerConfig:
    """One layer's view of a `DDLConfig` for transformers' cache builders: every attribute of the config,
    with that layer's `number_of_conv_states` (`DDLConfig.conv_state_slots`)."""

    def __init__(self, config: DDLConfig, number_of_conv_states: int) -> None:
        self._config = config
        self.number_of_conv_states = number_of_conv_states

    def __getattr__(self, name: str):
        return getattr(self._config, name)

    def __repr__(self) -> str:
        return f"CacheLayerConfig(number_of_conv_states={self.number_of_conv_states})"


PRESET_SIZES = {
    # Unit tests: a few thousand parameters, every code path.
    "tiny": dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        max_position_embeddings=128,
    ),
    # CPU experiments: the shape of the package's benchmarks and published CPU results.
    "mini": dict(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        head_dim=128,
        max_position_embeddings=1024,
    ),
    # The paper's 124M model.
    "small": dict(
        vocab_size=50304,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=6,
        head_dim=128,
        max_position_embeddings=1024,
    ),
    # The paper's 353M model.
    "medium": dict(
        vocab_size=50304,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=8,
        head_dim=128,
        max_position_embeddings=1024,
    ),
}

PRESET_VARIANTS = {
    "baseline": dict(residual_mode="additive", value_channels=1),
    "ddl-scalar": dict(residual_mode="delta", value_channels=1),
    "ddl-tc": dict(residual_mode="delta", value_channels=4, state_compressor="token", embed_expansion="conv"),
    "ddl-cc": dict(residual_mode="delta", value_channels=4, state_compressor="channel", embed_expansion="conv"),
    "ddl-tc-noec": dict(residual_mode="delta", value_channels=4, state_compressor="token", embed_expansion="repeat"),
    "ddl-cc-noec": dict(residual_mode="delta", value_channels=4, state_compressor="channel", embed_expansion="repeat"),
    "write-only-cc": dict(
        residual_mode="write_only", value_channels=4, state_compressor="channel", embed_expansion="conv"
    ),
}


# Keywords that `PreTrainedConfig.__post_init__` accepts besides the dataclass fields: `num_labels` becomes
# `id2label`, the others private attributes.
CONSTRUCTOR_KEYWORDS = (
    "num_labels",
    "name_or_path",
    "output_attentions",
    "attn_implementation",
    "experts_implementation",
    "torch_dtype",
)


# The checks of `DDLConfig`'s fields and of the standalone modules' arguments (`DeltaShortcut`, `StateCompressor`,
# `EmbedExpansion`): `name` is what the message calls the value ("DDLConfig.residual_mode", "StateCompressor kind").
def check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    """A ValueError naming `name` and listing `allowed` unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    """A ValueError unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    """A ValueError unless `value` is a finite number in [low, high] ((low, ...] with `low_open`; no upper bound
    when `high` is None)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = ("(" if low_open else "[") + f"{low}, " + ("inf)" if high is None else f"{high}]")
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")


def _check_choice(field: str, value, allowed: tuple[str, ...]) -> None:
    check_choice(f"DDLConfig.{field}", value, allowed)


def _check_int(field: str, value, minimum: int) -> None:
    check_int(f"DDLConfig.{field}", value, minimum)


def _check_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"DDLConfig.{field} must be True or False, got {value!r}")


def _check_token_id(field: str, value, vocab_size: int) -> None:
    """None, or an id (or list of ids, for eos_token_id) in [0, vocab_size)."""
    for token_id in value if isinstance(value, (list, tuple)) else [value]:
        if token_id is None and not isinstance(value, (list, tuple)):
            continue
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(
                f"DDLConfig.{field} must be None or a token id in [0, vocab_size={vocab_size}), got {value!r}"
            )


def _check_label_map(field: str, value, key_type: type, value_type: type) -> None:
    """None, or a dict mapping label ids to names (`id2label`) or names to ids (`label2id`); JSON stores ids as
    strings, so an id may also be a string of digits."""

    def is_id(item) -> bool:
        return (isinstance(item, int) and not isinstance(item, bool)) or (isinstance(item, str) and item.isdigit())

    def fits(item, kind: type) -> bool:
        return is_id(item) if kind is int else isinstance(item, str)

    if value is not None and not (
        isinstance(value, dict) and all(fits(key, key_type) and fits(item, value_type) for key, item in value.items())
    ):
        shape = "{id: name}" if key_type is int else "{name: id}"
        raise ValueError(f"DDLConfig.{field} must be None or a dict {shape}, got {value!r}")


def _check_float(field: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    check_float(f"DDLConfig.{field}", value, low, high, low_open)


class DDLConfig(PreTrainedConfig):
    r"""
    Configuration of a DDL decoder-only language model.

    Backbone (Llama conventions): `vocab_size`, `hidden_size` (d), `intermediate_size`
    (SwiGLU width; `None` gives floor(8 d / 3) as in the paper), `num_hidden_layers`,
    `num_attention_heads`, `num_key_value_heads` (`None` = multi-head attention),
    `head_dim` (`None` = hidden_size / num_attention_heads), `max_position_embeddings`,
    `rope_parameters`, `rms_norm_eps` (1e-5, the authors' value, in every RMSNorm), `use_qk_norm`
    (RMSNorm with a learned gain on each head's queries and keys), `tie_word_embeddings`,
    `initializer_range` (std of embeddings and LM head).

    - `qk_norm_position`: `"after_rope"` (the authors' code: `q = g_q * RMSNorm(RoPE(W_q c))`, same
      for k) or `"before_rope"` (ddl_hf before 2026-12: `RoPE(g_q * RMSNorm(W_q c))`). The two agree
      while the gains are uniform (RMS is rotation invariant) and differ once they train.

    Residual fields:

    - `residual_mode`: `"delta"` replaces `x + F(x)` by the gated rank-1 rewrite
      `X <- X + beta k (v^T - k^T X)`; `"additive"` is the baseline `x + F(x)` on the same
      backbone; `"write_only"` keeps every DDL generator but drops the erase term:
      `X <- X + beta k v^T`.
    - `value_channels` (d_v): width of the residual state `X` of shape (d, d_v) per token.
      1 is the ordinary vector stream. `"additive"` requires 1.
    - `state_compressor`: how a block reads its width-d input from `X` when d_v > 1:
      `"channel"` (CC, per-feature weighted sum over the d_v values) or `"token"` (TC, a
      depthwise causal convolution over tokens of width `state_conv_size`, then the weighted
      sum over the d_v values).
    - `compressor_form`: how that weighted sum `x_in[i] = sum_j W[i, j] X[i, j]` is parameterized.
      `"factored"` (the authors' code): CC convolves each feature's d_v values with its own kernel
      (d, `channel_kernel_size`), 'same' padded (left (K-1)//2), then reads them with one vector
      r (d_v,) shared by all features, so `W[i, j] = sum_u r[u] kernel[i, j - u + (K-1)//2]`; TC reads
      its filtered channels with the shared r alone (`W[i, j] = r[j]`). `"free"` (ddl_hf before
      2026-12): W (d, d_v) is learned freely, for CC and TC alike.
    - `embed_expansion`: how the token embedding becomes the first state when d_v > 1:
      `"conv"` (EC, a depthwise causal convolution over tokens of width
      `embed_conv_size` mapping each feature to its d_v channels, identity at init) or
      `"repeat"` (copy the embedding into every channel).
    - `beta_init`: gate value at initialization, in [0, 2]; the gate bias starts at
      logit(beta_init / 2), with beta_init / 2 clamped (see `init_scheme`) so that the
      endpoints give a finite bias.
    - `init_scheme`: `"authors"` (their code): every matrix N(0, 0.5 / sqrt(d)) (attention and MLP
      output projections / sqrt(L), embeddings N(0, initializer_range)), compressor kernels and TC
      filters included; read vectors 1 / d_v; EC filters the identity; value biases
      U(-1/sqrt(d), 1/sqrt(d)) (PyTorch's Linear default); beta_init / 2 clamped to
      [1e-6, 1 - 1e-6]. `"neutral"` (ddl_hf before 2026-12): the same matrices, but every compressor
      starts as the exact average over the d_v values (TC filters the identity), value biases 0, and
      the clamp [1e-4, 1 - 1e-4].
    - `gate_hidden_size`: 0 for a linear gate `W c + b`, > 0 for `W2 tanh(W1 c + b1) + b2`.
    - `k_eps`: guard of the direction normalization `k = h / sqrt(|h|^2 + k_eps^2)`.
    - `value_input`: `"state"` (authors' code: v reads the un-normalized block input) or
      `"context"` (paper text: v reads the normalized context c).
    - `value_activation`: `"sigmoid"` (`v = value_scale * sigmoid(W_v s + b_v)`) or
      `"identity"` (`v = W_v s + b_v`).
    - `use_fast_path`: run the fused ops of `delta_ops` (default) or their plain references
      (same results up to float rounding; slower, more memory).
    - `state_recompute`: in a training forward, keep each rewrite's h and w for backward instead of the
      (d, d_v) states, and rebuild the states from them and the embedding expansion (run again) when
      backward needs them (`delta_ops.recomputed_states`; without an expansion the first state is kept):
      less memory, the same gradients bit for bit, a few elementwise passes more per step. Needs the fast
      path; inference and torch.compile are unchanged.

    The standard `PreTrainedConfig` fields are accepted too; the task heads read `num_labels` (or
    `id2label`, `label2id`), `problem_type` and `pad_token_id` (the sequence classifier pools the last
    token that is not padding).

    A dict without `qk_norm_position`, `compressor_form` or `init_scheme` (a `config.json` saved before
    they existed) gets ddl_hf's earlier forms (`LEGACY_FIELD_VALUES`), so old checkpoints keep their
    meaning; `DDLConfig(...)` and the presets give the authors' forms.

    `layer_types` is derived: `"hybrid"` for the layers whose cache also holds short-convolution
    states (`ConvStateSlot`), `"full_attention"` for the others. A `config.json` written before
    the per-layer layout (every layer `"hybrid"` when the model had a token convolution) loads too.
    """

    model_type = "ddl"
    keys_to_ignore_at_inference = ["cache"]
    # Tensor parallelism (`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` under
    # torchrun, `tests/test_tensor_parallel.py`): the Llama parts are sharded,
    # attention by heads and the MLP by its hidden width, each block's output all-reduced to full width; the
    # DDL parts (DeltaShortcut, StateCompressor, EmbedExpansion) and the norms stay replicated, since they act
    # on the full (d, d_v) state. transformers adds `embed_tokens` (sharded on the vocabulary) and
    # `DDLForCausalLM._tp_plan` the LM head, which a tied head shares.
    # A replicated parameter's gradient is whole on every rank when the activation it acts on is replicated (every
    # one above: the state, the compressor reads, the normalized contexts, the all-reduced sublayer outputs h);
    # the QK-norm gains alone act on sharded activations (each rank's own heads, between the colwise q/k and the
    # rowwise o_proj), so each rank would hold only its heads' part of their gradient: those gradients are summed
    # over the ranks, as Qwen3's plan does. (Without `use_qk_norm` the two rules match nothing: a warning.)
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int | None = None
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    rope_parameters: RopeParameters | dict | None = None
    rms_norm_eps: float = 1e-5
    use_qk_norm: bool = True
    qk_norm_position: str = "after_rope"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    residual_mode: str = "delta"
    value_channels: int = 4
    state_compressor: str = "channel"
    state_conv_size: int = 4
    compressor_form: str = "factored"
    channel_kernel_size: int = 4
    embed_expansion: str = "conv"
    embed_conv_size: int = 4
    beta_init: float = 1.0
    init_scheme: str = "authors"
    gate_hidden_size: int = 0
    k_eps: float = 1e-5
    value_input: str = "state"
    value_activation: str = "sigmoid"
    value_scale: float = 4.0
    layer_types: list[str] | None = None
    use_fast_path: bool = True
    state_recompute: bool = False

    def __post_init__(self, **kwargs):
        self.validate_architecture()
        self.validate_task_fields(kwargs.get("num_labels"))
        if self.intermediate_size is None:
            self.intermediate_size = (8 * self.hidden_size) // 3
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        expected_layer_types = [
            "hybrid" if self.conv_state_slots(layer_idx) else "full_attention"
            for layer_idx in range(self.num_hidden_layers)
        ]
        # Before the per-layer layout every cache layer of a model with a token convolution was "hybrid".
        legacy_type = "hybrid" if "hybrid" in expected_layer_types else "full_attention"
        legacy_layer_types = [legacy_type] * self.num_hidden_layers
        if self.layer_types is not None and list(self.layer_types) not in (expected_layer_types, legacy_layer_types):
            raise ValueError(
                f"DDLConfig.layer_types is derived from the residual fields and must be {expected_layer_types!r} "
                f"(or None), got {self.layer_types!r}"
            )
        self.layer_types = expected_layer_types
        super().__post_init__(**kwargs)
        # transformers only logs unknown RoPE settings; a bad one would fail later inside the model.
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ValueError(f"DDLConfig.rope_parameters must be a dict, got {rope!r}")
        _check_choice("rope_parameters['rope_type']", rope.get("rope_type"), ("default", *ROPE_INIT_FUNCTIONS))
        _check_float("rope_parameters['rope_theta']", rope.get("rope_theta"), 0.0, low_open=True)

    def validate_architecture(self) -> None:
        """Check every field the user sets (before the derived ones are filled in); a `ValueError` names
        the field and what is allowed."""
        _check_choice("residual_mode", self.residual_mode, RESIDUAL_MODES)
        _check_int("value_channels", self.value_channels, 1)
        _check_choice("state_compressor", self.state_compressor, STATE_COMPRESSORS)
        _check_int("state_conv_size", self.state_conv_size, 1)
        _check_choice("compressor_form", self.compressor_form, COMPRESSOR_FORMS)
        _check_int("channel_kernel_size", self.channel_kernel_size, 1)
        _check_choice("qk_norm_position", self.qk_norm_position, QK_NORM_POSITIONS)
        _check_choice("init_scheme", self.init_scheme, INIT_SCHEMES)
        _check_choice("embed_expansion", self.embed_expansion, EMBED_EXPANSIONS)
        _check_int("embed_conv_size", self.embed_conv_size, 1)
        _check_float("beta_init", self.beta_init, 0.0, 2.0)
        _check_int("gate_hidden_size", self.gate_hidden_size, 0)
        _check_float("k_eps", self.k_eps, 0.0, low_open=True)
        _check_choice("value_input", self.value_input, VALUE_INPUTS)
        _check_choice("value_activation", self.value_activation, VALUE_ACTIVATIONS)
        _check_float("value_scale", self.value_scale, 0.0, low_open=True)
        if self.residual_mode == "additive" and self.value_channels != 1:
            raise ValueError(
                f"DDLConfig.value_channels must be 1 when residual_mode='additive' (the additive baseline has a "
                f"vector residual stream), got {self.value_channels}"
            )
        for field in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _check_int(field, getattr(self, field), 1)
        if self.intermediate_size is not None:
            _check_int("intermediate_size", self.intermediate_size, 1)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"DDLConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}) when head_dim is not set"
                )
        else:
            _check_int("head_dim", self.head_dim, 2)
            if self.head_dim % 2:
                raise ValueError(
                    f"DDLConfig.head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}"
                )
        if self.num_key_value_heads is not None:
            _check_int("num_key_value_heads", self.num_key_value_heads, 1)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"DDLConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                    f"({self.num_attention_heads})"
                )
        _check_float("rms_norm_eps", self.rms_norm_eps, 0.0, low_open=True)
        _check_float("initializer_range", self.initializer_range, 0.0)
        _check_float("attention_dropout", self.attention_dropout, 0.0, 1.0)
        booleans = ("use_qk_norm", "attention_bias", "tie_word_embeddings", "use_cache", "use_fast_path")
        for field in (*booleans, "state_recompute"):
            _check_bool(field, getattr(self, field))
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            _check_token_id(field, getattr(self, field), self.vocab_size)
        if self.hidden_act not in ("silu", "gelu", "relu", "gelu_pytorch_tanh"):
            raise ValueError(
                "DDLConfig.hidden_act must be one of ['silu', 'gelu', 'relu', 'gelu_pytorch_tanh'], "
                f"got {self.hidden_act!r}"
            )

    def validate_task_fields(self, num_labels=None) -> None:
        """Check the fine-tuning fields of `PreTrainedConfig` (read by the task heads): `num_labels` (a
        constructor keyword, stored as `id2label`), `id2label`, `label2id` and `problem_type`."""
        _check_choice(
            "problem_type",
            self.problem_type,
            (None, "regression", "single_label_classification", "multi_label_classification"),
        )
        _check_label_map("id2label", self.id2label, int, str)
        _check_label_map("label2id", self.label2id, str, int)
        if num_labels is not None:
            _check_int("num_labels", num_labels, 1)
            # Given together to the constructor, the two contradict each other: transformers' constructor only logs
            # this and keeps id2label, silently ignoring num_labels. (`from_pretrained(..., num_labels=n)` on a saved
            # label map is another matter: a new label set, which `from_dict` gives as transformers does.)
            if self.id2label is not None and len(self.id2label) != num_labels:
                raise ValueError(
                    f"DDLConfig.num_labels ({num_labels}) must equal the number of labels in id2label "
                    f"({len(self.id2label)}); give one of them, or both consistently"
                )

    # ----------------------------------------------------------------- derived facts
    @property
    def is_expanded(self) -> bool:
        """True when the residual state has more than one value channel (d_v > 1)."""
        return self.value_channels > 1

    @property
    def uses_token_compressor(self) -> bool:
        return self.is_expanded and self.state_compressor == "token"

    @property
    def uses_embed_conv(self) -> bool:
        return self.is_expanded and self.embed_expansion == "conv"

    @property
    def has_token_convolutions(self) -> bool:
        """Whether some convolution mixes tokens (EC or TC): then padded positions must be masked out of it and
        generation caches its last inputs."""
        return self.uses_token_compressor or self.uses_embed_conv

    def conv_state_slots(self, layer_idx: int) -> tuple[ConvStateSlot, ...]:
        """The conv states that cache layer `layer_idx` holds, in `ConvStateSlot` order (see its table)."""
        slots = []
        if self.uses_token_compressor:
            slots += [ConvStateSlot.ATTENTION_INPUT, ConvStateSlot.MLP_INPUT]
        if layer_idx == 0 and self.uses_embed_conv:
            slots.append(ConvStateSlot.EMBED_EXPANSION)
        if layer_idx == self.num_hidden_layers - 1 and self.uses_token_compressor:
            slots.append(ConvStateSlot.READOUT)
        return tuple(slots)

    def conv_state_index(self, layer_idx: int, slot: ConvStateSlot) -> int:
        """`slot`'s `state_idx` in cache layer `layer_idx` (`Cache.update_conv_state`)."""
        return self.conv_state_slots(layer_idx).index(slot)

    @property
    def per_layer_config(self) -> tuple[CacheLayerConfig, ...]:
        """Each layer's view of this config, as transformers' cache builders read it (`DynamicCache(config=...)`,
        `StaticCache`): the model's fields, plus the layer's own `number_of_conv_states`. The layers do not
        otherwise differ, so the config is not heterogeneous in transformers' sense."""
        return tuple(
            CacheLayerConfig(self, len(self.conv_state_slots(layer_idx))) for layer_idx in range(self.num_hidden_layers)
        )

    @per_layer_config.setter
    def per_layer_config(self, value) -> None:
        if value is not None:
            raise ValueError(
                "DDLConfig.per_layer_config is derived from the residual fields (the cache layout of each layer); "
                f"DDL layers do not take per-layer overrides, got {value!r}"
            )

    @property
    def num_hidden_states(self) -> int:
        """Entries of `output_hidden_states` (`num_hidden_layers + 1`): the width-d read of each block's input
        state, then the final readout. `capture_outputs` resolves negative indices against it."""
        return self.num_hidden_layers + 1

    @property
    def variant_name(self) -> str:
        """A short human name: `baseline`, `ddl-scalar`, `ddl-cc`, `write-only-tc-noec`, ..."""
        if self.residual_mode == "additive":
            return "baseline"
        prefix = "ddl" if self.residual_mode == "delta" else "write-only"
        if not self.is_expanded:
            return f"{prefix}-scalar"
        name = f"{prefix}-{'cc' if self.state_compressor == 'channel' else 'tc'}"
        return name if self.embed_expansion == "conv" else f"{name}-noec"

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, size: str = "mini", variant: str = "ddl-cc", **overrides) -> DDLConfig:
        """Build a named configuration.

        Args:
            size: one of `PRESET_SIZES` (`tiny`, `mini`, `small`, `medium`).
            variant: one of `PRESET_VARIANTS` (`baseline`, `ddl-scalar`, `ddl-tc`, `ddl-cc`,
                `ddl-tc-noec`, `ddl-cc-noec`, `write-only-cc`).
            overrides: any `DDLConfig` field, applied last.
        """
        if size not in PRESET_SIZES:
            raise ValueError(f"Unknown preset size {size!r}; allowed sizes: {list(PRESET_SIZES)}")
        if variant not in PRESET_VARIANTS:
            raise ValueError(f"Unknown preset variant {variant!r}; allowed variants: {list(PRESET_VARIANTS)}")
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"Unknown DDLConfig field(s) {unknown}; see DDLConfig.field_names() for the allowed fields"
            )
        return cls(**{**PRESET_SIZES[size], **PRESET_VARIANTS[variant], **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field a `DDLConfig` accepts: its own and the inherited `PreTrainedConfig` fields
        (`id2label`, `problem_type`, `dtype`, ...), and the keywords that `PreTrainedConfig` takes without
        storing them as fields (`num_labels`, `attn_implementation`, ...)."""
        return [field.name for field in dataclasses.fields(cls)] + list(CONSTRUCTOR_KEYWORDS)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DDLConfig:
        """`PreTrainedConfig.from_pretrained`; an invalid field raises a ValueError naming the config file."""
        kwargs.setdefault("name_or_path", str(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def to_dict(self) -> dict:
        """`PreTrainedConfig.to_dict` without `_name_or_path`: where a config was loaded from is not part of it
        (config.json never stores it), so save then load gives the same dict. `config.name_or_path` keeps it."""
        output = super().to_dict()
        output.pop("_name_or_path", None)
        return output

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> DDLConfig:
        """`PreTrainedConfig.from_dict`. When the dict was read from a checkpoint (`from_pretrained` and
        `AutoConfig` pass its `name_or_path`), an invalid field raises a ValueError naming its config.json.
        A dict saved before `qk_norm_position`, `compressor_form` and `init_scheme` existed gets their
        `LEGACY_FIELD_VALUES`: the model it describes.

        A `num_labels` keyword unlike the saved `id2label` (`from_pretrained(classifier, num_labels=n)`, how a
        classifier is fine-tuned for another task) replaces the saved label map by n generic labels, as
        transformers does (its `from_dict` sets `num_labels` after construction); the task head's weights then
        differ in shape, which `ignore_mismatched_sizes=True` re-initializes."""
        config_dict = {**LEGACY_FIELD_VALUES, **config_dict}
        num_labels = kwargs.get("num_labels")
        saved_labels = config_dict.get("id2label")
        if num_labels is not None and isinstance(saved_labels, dict) and len(saved_labels) != num_labels:
            config_dict = {key: value for key, value in config_dict.items() if key not in ("id2label", "label2id")}
        try:
            return super().from_dict(config_dict, **kwargs)
        except ValueError as error:
            source = kwargs.get("name_or_path")
            if not source:
                raise
            source = str(source)
            path = source if source.endswith(".json") else os.path.join(source, "config.json")
            raise ValueError(f"{path}: {error}") from error


__all__ = ["DDLConfig", "ConvStateSlot", "PRESET_SIZES", "PRESET_VARIANTS", "LEGACY_FIELD_VALUES"]
