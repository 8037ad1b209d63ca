"""Deep Delta Learning (DDL) language models for transformers 5.x.

A DDL decoder is a Llama-style pre-norm transformer whose two residual additions per
block are replaced by a gated rank-1 rewrite of a residual state `X` of shape
(d, d_v) per token (arXiv 2601.00417):

    x_in = compress(X)                  (B, T, d)       identity when d_v = 1
    c    = RMSNorm(x_in)                (B, T, d)
    h    = F(c)                         (B, T, d)       attention or SwiGLU
    X   <- X + beta k (v^T - k^T X)     k = h / |h|, beta = 2 sigmoid(gate(c)), v = value(x_in)

Tensor layout: the state travels between blocks flattened to (B, T, d_v * d), value
major, so that `X[b, t, i, j]` lives at `state[b, t, j * d + i]` (d_v width-d streams side by
side; `state_matrix` gives the (B, T, d, d_v) view); with d_v = 1 it is the usual (B, T, d)
hidden state. Every pass over the state then runs along d, contiguously.

`output_hidden_states=True` returns `num_hidden_layers + 1` tensors of width d, as in every
transformers model: entry i < L is the read of the state that block i takes (see `DDLModel`), the
last entry `last_hidden_state`. `output_residual_states=True` returns the full (B, T, d_v * d) states.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.dynamic_module_utils import custom_object_save
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checkpoint_checks import align_cpu_tensors, check_loaded_weights, check_safetensors_files
from .configuration_ddl import ConvStateSlot, DDLConfig
from .delta_layers import (
    DeltaShortcut,
    EmbedExpansion,
    StateCompressor,
    compressor_from_config,
    embed_expansion_from_config,
    shortcut_from_config,
)
from .delta_ops import recomputed_states
from .input_checks import check_labels, check_model_inputs
from .model_card import MODEL_CARD_NAME, is_generated_model_card, write_model_card
from .modeling_outputs_ddl import DDLCausalLMOutputWithPast, DDLInitialState, DDLModelOutputWithPast, DDLStateRead


class DDLRMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 (float64 for a float64 model). (..., d) -> (..., d)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# --------------------------------------------------------------------------- backbone
class DDLRotaryEmbedding(nn.Module):
    """RoPE cos/sin tables for given positions: position_ids (B, T) -> two (B, T, head_dim)."""

    def __init__(self, config: DDLConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DDLConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)
        angles = position_ids[..., None].to(dtype) * self.inv_freq.to(device=x.device, dtype=dtype)
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotate q and k (B, heads, T, head_dim) by the (B, T, head_dim) tables."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, head_dim) -> (B, kv_heads * n_rep, T, head_dim)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class DDLAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with RoPE and optional QK-norm (after RoPE, as the
    authors do, or before it: `DDLConfig.qk_norm_position`)."""

    def __init__(self, config: DDLConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.use_qk_norm:
            self.q_norm = DDLRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = DDLRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # The gains do not commute with the rotation: the order is part of the model (`qk_norm_position`).
        self.norm_after_rope = config.qk_norm_position == "after_rope"

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, d) -> (B, T, d), and the attention weights when the backend returns them."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        if self.q_norm is not None and not self.norm_after_rope:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if self.q_norm is not None and self.norm_after_rope:
            query, key = self.q_norm(query), self.k_norm(key)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())
        return output, weights


class DDLMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)). (B, T, d) -> (B, T, d)."""

    def __init__(self, config: DDLConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DDLDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block whose two residual writes are Delta rewrites (or additions).

    (B, T, d_v * d) -> (B, T, d_v * d). Where Llama adds the sublayer output to the residual stream,
    this block writes it into the state with its `DeltaShortcut`; where Llama's sublayers take the
    residual stream, they take the compressor's width-d read of the state.
    """

    def __init__(self, config: DDLConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.self_attn = DDLAttention(config, layer_idx)
        self.mlp = DDLMLP(config)
        self.input_layernorm = DDLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DDLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.compressor = compressor_from_config(config, layer_idx)
        self.attn_shortcut = shortcut_from_config(config, layer_idx, "attention")
        self.mlp_shortcut = shortcut_from_config(config, layer_idx, "mlp")
        # The block's width-d read of its input state, as `output_hidden_states` reports it.
        self.state_read = DDLStateRead()
        self.conv_state_slots = config.conv_state_slots(layer_idx)

    def _state_idx(self, slot: ConvStateSlot) -> int:
        """Where this layer's cache keeps `slot`'s conv state (a channel compressor keeps none)."""
        return self.conv_state_slots.index(slot) if slot in self.conv_state_slots else 0

    def _read(self, state, slot, cache, padding_mask, document_positions) -> torch.Tensor:
        """The sublayer's width-d input: the state itself when d_v = 1."""
        if self.compressor is None:
            return state
        return self.compressor(state, cache, self._state_idx(slot), padding_mask, document_positions)

    def _write_and_read(self, state, h, context, block_input, cache, padding_mask, document_positions):
        """The attention's write, and the MLP's read of the new state (`DeltaShortcut.write_and_read`)."""
        if self.attn_shortcut is None:
            state = state + h
        elif self.compressor is not None:
            mlp_input_idx = self._state_idx(ConvStateSlot.MLP_INPUT)
            return self.attn_shortcut.write_and_read(
                state,
                h,
                context,
                block_input,
                self.compressor,
                cache,
                mlp_input_idx,
                padding_mask,
                document_positions,
            )
        else:
            state = self.attn_shortcut(state, h, context, block_input)
        return state, self._read(state, ConvStateSlot.MLP_INPUT, cache, padding_mask, document_positions)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        document_positions: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """(B, T, d_v * d) -> (B, T, d_v * d). The token convolutions zero the inputs where `padding_mask` (B, T)
        is False, and read no token across a document start (`document_positions` (B, T), packed rows)."""
        state = hidden_states
        # Attention: read, norm, attention, write (with the MLP's read of the new state).
        block_input = self.state_read(
            self._read(state, ConvStateSlot.ATTENTION_INPUT, cache, padding_mask, document_positions)
        )
        context = self.input_layernorm(block_input)
        h, _ = self.self_attn(
            context,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        state, block_input = self._write_and_read(
            state, h, context, block_input, cache, padding_mask, document_positions
        )
        # MLP: norm, MLP, write.
        context = self.post_attention_layernorm(block_input)
        h = self.mlp(context)
        if self.mlp_shortcut is None:
            return state + h
        return self.mlp_shortcut(state, h, context, block_input)


def positions_in_documents(position_ids: torch.Tensor) -> torch.Tensor:
    """Each token's index in its document, for rows that pack several: (B, T) -> (B, T) long.

    A document starts wherever the positions do not go on by one, as in transformers'
    `find_packed_sequence_indices` (so the convolutions split a row exactly where attention does); a row of
    one document gives 0, 1, 2, ... Computed on the device, without a host sync.
    """
    previous = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=previous, dim=-1) != 1
    index = torch.arange(position_ids.shape[1], device=position_ids.device).expand_as(position_ids)
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_index


# --------------------------------------------------------------------------- pretrained models
def _unwrapped_class(model: nn.Module) -> type:
    """The model's class under the wrapper classes that torch makes on the fly: FSDP2's `fully_shard` turns a
    `DDLForCausalLM` into an `FSDPDDLForCausalLM` defined in torch's own module."""
    return next(cls for cls in type(model).__mro__ if not cls.__module__.startswith("torch."))


class DDLPreTrainedModel(PreTrainedModel):
    config: DDLConfig
    config_class = DDLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DDLDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        # Width d, as in every transformers model: the read of the state that each block takes (its
        # `state_read`), then the final readout, which `capture_outputs` replaces by `last_hidden_state`.
        "hidden_states": OutputRecorder(
            DDLStateRead, capture_initial_hidden_state=False, num_hidden_layers_key="num_hidden_states"
        ),
        # The full (d, d_v) states: the initial state, then each block's output.
        "residual_states": [DDLInitialState, DDLDecoderLayer],
        "attentions": DDLAttention,
    }

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers' custom-code shortcut marks every module without direct parameters as done
        # without calling `_init_weights`, which would skip DDLAttention, DDLMLP and DeltaShortcut
        # (their weights sit in child Linears). `_init_weights` only uses the flag-respecting
        # `transformers.initialization` helpers, so loaded weights stay untouched without it.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The authors' matrix init (spec section 4): embeddings and LM head N(0, initializer_range);
        attention and MLP output projections N(0, 0.5 / sqrt(d) / sqrt(L)); every other matrix
        N(0, 0.5 / sqrt(d)). The Delta layers' biases, read vectors and filters follow
        `config.init_scheme` (`DeltaShortcut.reset_parameters`, `StateCompressor`); EC filters are the
        identity."""
        super()._init_weights(module)
        config = self.config
        std = 0.5 / math.sqrt(config.hidden_size)
        output_std = std / math.sqrt(config.num_hidden_layers)
        if isinstance(module, DDLAttention):
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(proj.weight, mean=0.0, std=std)
            init.normal_(module.o_proj.weight, mean=0.0, std=output_std)
        elif isinstance(module, DDLMLP):
            init.normal_(module.gate_proj.weight, mean=0.0, std=std)
            init.normal_(module.up_proj.weight, mean=0.0, std=std)
            init.normal_(module.down_proj.weight, mean=0.0, std=output_std)
        elif isinstance(module, DeltaShortcut):
            module.reset_parameters(weight_std=std)
        elif isinstance(module, (StateCompressor, EmbedExpansion)):
            module.reset_parameters()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = False, **kwargs):
        """`PreTrainedModel.from_pretrained`, with transformers' conventions, and loud about what makes a DDL model
        compute something else than the checkpoint did.

        As in transformers: a weight that the checkpoint lacks is initialized by `_init_weights` and reported
        (transformers' loading report, a WARNING, and `output_loading_info=True`); a tensor whose shape differs
        from the config raises the `RuntimeError` that transformers raises (here naming the keys and the file),
        unless `ignore_mismatched_sizes=True` re-initializes it. A DDL weight that the file lacks (a gate, value
        projection, compressor or EC filter: the parameters of `DeltaShortcut`, `StateCompressor` and
        `EmbedExpansion`), a missing untied `lm_head.weight`, a weight of the file in a DDL module that the config
        does not have, or a local config.json whose `model_type` is not "ddl" also get a WARNING of their own (this
        package's logger) that names them: a baseline or Llama checkpoint is never loaded silently as a DDL model.

        `strict=True` refuses, with a `ValueError` naming the weights file and listing the keys, any missing,
        unexpected or (without `ignore_mismatched_sizes`) mismatched weight, head weights included, and a
        config.json of another model type: only a checkpoint that is exactly this model loads. A truncated or
        corrupt safetensors file raises a `ValueError` naming that file before anything is loaded, strict or not.
        """
        wants_loading_info = kwargs.pop("output_loading_info", False)
        allow_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        subfolder = kwargs.get("subfolder", "")
        config_from_checkpoint = kwargs.get("config") is None
        check_safetensors_files(pretrained_model_name_or_path, subfolder)
        # No DDL layer has a kernel in the `kernels` hub mapping, so kernelizing (transformers' default since
        # 5.25) replaces nothing here, and with `device_map="meta"` it raises ("Unsupported device type
        # 'meta'"), for every model. An explicit `use_kernels=True` is still passed on.
        kwargs.setdefault("use_kernels", False)
        # Mismatched shapes are let through transformers so that `check_loaded_weights` raises naming them (with
        # `strict`, the ValueError; otherwise transformers' RuntimeError).
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        align_cpu_tensors(model)
        check_loaded_weights(
            model,
            loading_info,
            allow_mismatched,
            pretrained_model_name_or_path,
            subfolder,
            strict=strict,
            config_from_checkpoint=config_from_checkpoint,
            ddl_module_types=(DeltaShortcut, StateCompressor, EmbedExpansion),
        )
        return (model, loading_info) if wants_loading_info else model

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a README.md model card (`model_card.write_model_card`:
        variant, DDL fields, parameter count, metrics from `metrics.json`). A README.md that the folder
        already holds and that was not generated by this package is left alone."""
        saved_class = _unwrapped_class(self)
        if self._auto_class is not None:
            # transformers writes only the saved class's own `auto_map` entry; advertise the backbone too,
            # so that `AutoModel.from_pretrained(dir, trust_remote_code=True)` works on a causal-LM folder.
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_ddl.DDLModel",
            }
        if saved_class is type(self):
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        else:
            # A wrapper class made by torch (FSDP2's `FSDPDDLForCausalLM`): transformers would copy the wrapper's
            # module (torch's FSDP sources) and name the wrapper in `auto_map`. Save the remote code of the DDL
            # class here (an instance is only needed for its class), and hide `_auto_class` from transformers.
            wrapper = type(self)
            if self._auto_class is not None and self.should_save_on_this_rank(is_main_process):
                os.makedirs(save_directory, exist_ok=True)
                custom_object_save(saved_class.__new__(saved_class), save_directory, config=self.config)
            wrapper._auto_class = None
            try:
                super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
            finally:
                del wrapper._auto_class
        if not self.should_save_on_this_rank(is_main_process) or not os.path.isdir(save_directory):
            return
        readme = os.path.join(save_directory, MODEL_CARD_NAME)
        if not os.path.exists(readme) or is_generated_model_card(readme):
            write_model_card(save_directory, self)


class DDLModel(DDLPreTrainedModel):
    """The DDL decoder without a head. Returns the final normalized readout (B, T, d).

    Optional outputs (`DDLModelOutputWithPast`):

    - `output_hidden_states=True`: `num_hidden_layers + 1` tensors (B, T, d), width `hidden_size` as in
      every transformers model. Entry i < L is the width-d read of the state that block i takes (its
      compressor's read, which its attention normalizes; the state itself when d_v = 1, so entry 0 is
      the embeddings as in Llama); the last entry is `last_hidden_state`. These reads are computed by the
      forward anyway (no extra cost, the cache is untouched). During cached decoding they cover the new
      tokens; the token compressor reads through its cached window, so they equal the full forward's
      entries at those positions. An index or list of indices selects entries.
    - `output_residual_states=True`: `residual_states`, `num_hidden_layers + 1` tensors (B, T, d_v * d),
      value major (`state_matrix`): entry 0 the initial state (the expanded embeddings), entry i the state
      after block i.

    The forward never synchronises with the host: it compiles with `fullgraph=True`, static caches included.
    """

    # Loading the backbone from a checkpoint with a head (an untied LM head, a task head) drops the head on
    # purpose.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^score\.", r"^qa_outputs\."]

    def __init__(self, config: DDLConfig) -> None:
        super().__init__(config)
        self.vocab_size = config.vocab_size
        # No `padding_idx`: padded positions are masked anyway, and tokenizers often pad with EOS, whose
        # embedding must keep learning.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_expansion = embed_expansion_from_config(config)
        self.initial_state = DDLInitialState()
        self.layers = nn.ModuleList(DDLDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.readout = compressor_from_config(config, cache_layer_idx=config.num_hidden_layers - 1)
        last_layer = config.num_hidden_layers - 1
        self.readout_state_idx = (
            config.conv_state_index(last_layer, ConvStateSlot.READOUT) if config.uses_token_compressor else 0
        )
        # The readout before the final norm, as the last entry of `output_hidden_states` records it.
        self.final_read = DDLStateRead()
        self.norm = DDLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DDLRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DDLModelOutputWithPast:
        # `generate` with a compileable (static) cache passes the masks prebuilt, keyed by layer type:
        # "full_attention" for attention, "linear_attention" (2-D padding or None) for the token convolutions.
        prebuilt_masks = attention_mask if isinstance(attention_mask, dict) else None
        if prebuilt_masks is not None:
            attention_mask = None
        check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask, cache, position_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # A training forward never builds a cache (the default `use_cache=True` is meant for generation); one that
        # is passed is still filled.
        if use_cache and cache is None and not (self.training and torch.is_grad_enabled()):
            cache = DynamicCache(config=self.config)
        # Several documents packed in a row, marked only by `position_ids` (transformers' padding-free batches,
        # `DataCollatorWithFlattening`): attention keeps them apart where `create_causal_mask` finds them (given
        # positions, no mask, no cache), and the token convolutions must too.
        document_positions = None
        if (
            self.config.has_token_convolutions
            and position_ids is not None
            and attention_mask is None
            and prebuilt_masks is None
            and cache is None
        ):
            document_positions = positions_in_documents(position_ids.expand(inputs_embeds.shape[0], -1))
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            # Positions count the real tokens of each row (as `generate` computes them): with QK-norm after RoPE
            # (the authors' order) the gains break RoPE's shift invariance, so a left-padded row must see the
            # positions it sees alone. The mask covers cached and new tokens alike.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
            position_ids = position_ids.unsqueeze(0)

        # Token convolutions (EC, TC) must not read padded positions.
        padding_mask = None
        if prebuilt_masks is not None:
            causal_mask = prebuilt_masks["full_attention"]
            linear_mask = prebuilt_masks.get("linear_attention")
            padding_mask = None if linear_mask is None else linear_mask.bool()
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
            if self.config.has_token_convolutions and attention_mask is not None and attention_mask.dim() == 2:
                padding_mask = attention_mask[:, -inputs_embeds.shape[1] :].bool()

        # `state_recompute`: backward rebuilds the states from the first one instead of keeping them all (under
        # torch.compile the compiler's partitioner decides what to keep, so the option steps aside).
        recompute = self.config.state_recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        with recomputed_states() if recompute else contextlib.nullcontext() as ledger:
            state = inputs_embeds
            if self.embed_expansion is not None:
                state = self.embed_expansion(inputs_embeds, cache, padding_mask, document_positions)
                if ledger is not None and cache is None:
                    rebuild = self._expansion_rebuilder(inputs_embeds, padding_mask, document_positions)
                    ledger.first_state(state, rebuild)
            state = self.initial_state(state)
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
            for decoder_layer in self.layers[: self.config.num_hidden_layers]:
                state = decoder_layer(
                    state,
                    attention_mask=causal_mask,
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=use_cache,
                    padding_mask=padding_mask,
                    document_positions=document_positions,
                    **kwargs,
                )
            read = state
            if self.readout is not None:
                read = self.readout(state, cache, self.readout_state_idx, padding_mask, document_positions)
            last_hidden_state = self.norm(self.final_read(read))
        return DDLModelOutputWithPast(last_hidden_state=last_hidden_state, cache=cache)

    def _expansion_rebuilder(self, inputs_embeds, padding_mask, document_positions) -> Callable[[], torch.Tensor]:
        """`state_recompute`: a function that computes the embedding expansion again in backward, under the autocast
        of this forward (it decides the dtypes of the fused convolution), bit for bit."""
        device_type = inputs_embeds.device.type
        autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

        def rebuild() -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
                return self.embed_expansion(inputs_embeds, None, padding_mask, document_positions)

        return rebuild


class DDLForCausalLM(DDLPreTrainedModel, GenerationMixin):
    """DDL decoder with a (tied) language-modeling head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DDLConfig) -> None:
        super().__init__(config)
        self.model = DDLModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DDLCausalLMOutputWithPast:
        r"""
        cache, inputs_embeds, use_cache:
            As in `DDLModel.forward` (the cache of keys, values and conv states; (B, T, d) embeddings instead
            of `input_ids`; whether to return a cache, `config.use_cache` when None).
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*):
            Targets for next-token prediction, aligned with the inputs (the shift happens inside);
            -100 marks positions without loss.
        logits_to_keep (`int` or `torch.Tensor`):
            Compute logits only for the last `logits_to_keep` positions (0 = all), or for the
            given indices.
        kwargs:
            The other arguments of `DDLModel.forward` (`output_hidden_states`, `output_residual_states`, ...),
            passed to the backbone as they are.
        """
        # The arguments are named in Llama's order: `generate`, `Trainer` and transformers' shared model tests
        # look them up in this signature.
        if labels is not None:
            check_labels(labels, input_ids, inputs_embeds, self.config.vocab_size, kwargs.get("ignore_index", -100))
        outputs: DDLModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return DDLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            residual_states=outputs.residual_states,
        )


__all__ = [
    "DDLRMSNorm",
    "DDLAttention",
    "DDLMLP",
    "DDLDecoderLayer",
    "DDLPreTrainedModel",
    "DDLModel",
    "DDLForCausalLM",
    "DDLModelOutputWithPast",
    "DDLCausalLMOutputWithPast",
]
