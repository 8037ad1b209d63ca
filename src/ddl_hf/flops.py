"""Analytic training FLOPs of a DDL language model, per token.

Convention (the usual one of scaling-law papers, extended to the DDL parts):

- A multiply-add counts 2 FLOPs. Only contractions are counted: matrix products with
  weights, the attention scores `q k^T` and the attention-weighted values, the per-feature
  weighted sums of the compressors, the depthwise token convolutions (EC, TC) and the two
  contractions of the rank-1 update. Elementwise work is not counted: normalizations
  (RMSNorm, QK-norm and the length of `h` in `k = h / |h|`), activations, sigmoid, softmax,
  RoPE, biases, residual additions and the embedding lookup.
- Causal attention: the token at position t (1-based) of a length-T sequence attends to t
  keys, so a token attends to (T + 1) / 2 keys on average. Scores and values then cost
  `2 * 2 * heads * head_dim * (T + 1) / 2` per token. This counts the useful work; kernels
  that compute the masked half of the score matrix do more.
- Each residual write of a DDL sublayer (two per block) costs: the gate `2 d` (or
  `2 d g + 2 g` with a hidden layer of width g), the value projection `2 d d_v`, the read
  `k^T X` `2 d d_v` (only with the erase term, `residual_mode="delta"`) and the write
  `X + beta k t^T` `2 d d_v`. The additive baseline's `x + h` is elementwise: 0.
- Expanded state (d_v > 1): every compressor read costs `2 d d_v` (channel mix), plus
  `2 d d_v K` for the token compressor's causal convolution of width K; each block reads
  twice (attention and MLP) and the readout once more. The embedding convolution (EC)
  costs `2 d d_v K`; repetition costs 0.
- The LM head costs `2 d V` (tied or not: it is a matmul either way).
- Training = forward + backward, with backward = 2 x forward: `3 x` the forward count.

`forward_flops_breakdown` returns the forward count per component, so that a test or a
report can check each term; `training_flops_per_token` is 3 x their sum.
"""

from __future__ import annotations

from .models.ddl.configuration_ddl import DDLConfig

BACKWARD_TO_FORWARD_RATIO = 2.0


def _check_seq_len(seq_len) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1 (tokens per training sequence), got {seq_len!r}")


def forward_flops_breakdown(config: DDLConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a `DDLForCausalLM` built from `config`, per component.

    Args:
        config: the model configuration.
        seq_len: training sequence length T (sets the causal attention cost).

    Returns:
        FLOPs per token by component (see the module docstring): `attention_projections`,
        `attention_scores_values`, `mlp`, `lm_head`, `shortcut_gates`, `shortcut_values`,
        `rank1_update`, `compressors`, `embed_expansion`. Components a variant does not have
        are 0.
    """
    _check_seq_len(seq_len)
    d = config.hidden_size
    layers = config.num_hidden_layers
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    d_v = config.value_channels
    has_shortcut = config.residual_mode != "additive"
    shortcuts = 2 * layers if has_shortcut else 0
    mean_keys = (seq_len + 1) / 2.0

    attention_projections = 2.0 * d * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    attention_scores_values = 2.0 * 2.0 * heads * head_dim * mean_keys
    mlp = 3 * 2.0 * d * config.intermediate_size

    if config.gate_hidden_size > 0:
        gate = 2.0 * d * config.gate_hidden_size + 2.0 * config.gate_hidden_size
    else:
        gate = 2.0 * d
    contractions_per_update = 2 if config.residual_mode == "delta" else 1  # read k^T X (erase only), write

    compressor_read = 0.0
    embed_expansion = 0.0
    if config.is_expanded:
        compressor_read = 2.0 * d * d_v
        if config.uses_token_compressor:
            compressor_read += 2.0 * d * d_v * config.state_conv_size
        if config.uses_embed_conv:
            embed_expansion = 2.0 * d * d_v * config.embed_conv_size
    compressor_reads = 2 * layers + 1 if config.is_expanded else 0

    return {
        "attention_projections": layers * attention_projections,
        "attention_scores_values": layers * attention_scores_values,
        "mlp": layers * mlp,
        "lm_head": 2.0 * d * config.vocab_size,
        "shortcut_gates": shortcuts * gate,
        "shortcut_values": shortcuts * 2.0 * d * d_v,
        "rank1_update": shortcuts * contractions_per_update * 2.0 * d * d_v,
        "compressors": compressor_reads * compressor_read,
        "embed_expansion": embed_expansion,
    }


def forward_flops_per_token(config: DDLConfig, seq_len: int) -> float:
    """Forward FLOPs per token (sum of `forward_flops_breakdown`)."""
    return float(sum(forward_flops_breakdown(config, seq_len).values()))


def training_flops_per_token(config: DDLConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward (module docstring)."""
    return (1.0 + BACKWARD_TO_FORWARD_RATIO) * forward_flops_per_token(config, seq_len)


__all__ = ["forward_flops_breakdown", "forward_flops_per_token", "training_flops_per_token"]
