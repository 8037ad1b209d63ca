"""The Delta layers of a DDL model: the rewrite of the residual state, and the modules around it.

- `DeltaShortcut`: replaces `x + h` by the gated rank-1 rewrite `X + beta k (v^T - k^T X)`.
- `StateCompressor`: reads the width-d block input from the (d, d_v) state (CC or TC).
- `EmbedExpansion`: turns token embeddings into the first (d, d_v) state (EC or repetition).
- `causal_depthwise_conv`: the short causal convolution over tokens that EC and TC run, with its
  last inputs kept in the generation cache.

Each module makes one call into `delta_ops` per concept (write, read, compress); the op picks its
fused fast path or its plain reference from the module's `use_fast_path` flag
(`DDLConfig.use_fast_path`), and `delta_ops.reference_paths()` forces the references in tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from .configuration_ddl import (
    COMPRESSOR_FORMS,
    EMBED_EXPANSIONS,
    INIT_SCHEMES,
    RESIDUAL_MODES,
    STATE_COMPRESSORS,
    VALUE_ACTIVATIONS,
    VALUE_INPUTS,
    ConvStateSlot,
    DDLConfig,
    check_choice,
    check_float,
    check_int,
)
from .delta_ops import (
    channel_compress,
    channel_compress_after_write,
    channel_read_after_write,
    delta_update,
    document_tap_mask,
    token_compress,
    token_compress_after_write,
    token_conv,
    upcast,
)


# --------------------------------------------------------------------------- the state's layout
def state_matrix(state: torch.Tensor, hidden_size: int, value_channels: int) -> torch.Tensor:
    """The (..., d, d_v) matrix X of a flat state (..., d_v * d), a view.

    The flat state is value major: `X[..., i, j]` lives at `state[..., j * d + i]`, so each of the
    d_v columns `X[..., :, j]` is a contiguous width-d vector (d_v residual streams side by side;
    with d_v = 1 it is the ordinary stream). Every pass over the state then runs along d, which CPU
    vector units and GPU warps read contiguously, instead of along the few d_v values.
    """
    return state.unflatten(-1, (value_channels, hidden_size)).transpose(-1, -2)


def flat_state(matrix: torch.Tensor) -> torch.Tensor:
    """The flat value-major state (..., d_v * d) of a (..., d, d_v) matrix: a view of a value-major
    matrix (what `state_matrix` and the ops return), a copy otherwise."""
    return matrix.transpose(-1, -2).flatten(-2)


# --------------------------------------------------------------------------- Delta shortcut
def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _linear_fp32(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` in fp32 (float64 for a float64 model). (..., in) -> (..., out).

    A plain `nn.Linear` runs with fp32 copies of its weights. A layer wrapped by an adapter library
    (peft LoRA replaces the `nn.Linear` by a module that holds it) is called as a module, in its own
    dtype, so that the adapter takes part instead of being silently bypassed.
    """
    if type(linear) is nn.Linear:
        bias = None if linear.bias is None else upcast(linear.bias)
        return F.linear(upcast(x), upcast(linear.weight), bias)
    return upcast(linear(x.to(linear.weight.dtype)))


class DeltaShortcut(nn.Module):
    """The Delta rewrite of a residual state, usable in any PyTorch network.

    Replaces `x + h` by `X + beta k (v^T - k^T X)` (`mode="delta"`) or by `X + beta k v^T`
    (`mode="write_only"`), with k the unit direction of `h`, `beta = 2 sigmoid(gate(context))`
    in (0, 2) and `v` a learned readout of `d_v = value_channels` values.

    Shapes: `state` is (..., d_v * d), value major (`X[..., i, j]` at `j * d + i`, see
    `state_matrix`; plain (..., d) when d_v = 1); `h` and `context` are (..., d); `block_input` (the
    un-normalized width-d input of the sublayer) is (..., d) and is what the value reads when
    `value_input="state"` (when d_v = 1 it defaults to `state`).

    `layer_idx` and `sublayer` (`"attention"` or `"mlp"` inside `DDLDecoderLayer`) name the
    shortcut in reports such as `record_delta_stats`. The fast path keeps one state-sized tensor
    for backward: the input state, or the new state with `keep_output_for_backward=True`; pick the
    one a neighbouring layer keeps anyway, so the rewrite adds no state-sized memory.
    `use_fast_path=False` runs the plain reference of `delta_ops`.

    Example::

        shortcut = DeltaShortcut(hidden_size=64)
        x = shortcut(x, h=mlp(norm(x)), context=norm(x))   # instead of x = x + mlp(norm(x))
    """

    def __init__(
        self,
        hidden_size: int,
        value_channels: int = 1,
        mode: str = "delta",
        beta_init: float = 1.0,
        gate_hidden_size: int = 0,
        k_eps: float = 1e-5,
        value_input: str = "state",
        value_activation: str = "sigmoid",
        value_scale: float = 4.0,
        layer_idx: int | None = None,
        sublayer: str | None = None,
        keep_output_for_backward: bool = False,
        use_fast_path: bool = True,
        init_scheme: str = "authors",
    ) -> None:
        super().__init__()
        # The checks of the matching `DDLConfig` fields; "additive" is a model without shortcuts.
        check_int("DeltaShortcut hidden_size", hidden_size, 1)
        check_int("DeltaShortcut value_channels", value_channels, 1)
        check_choice("DeltaShortcut mode", mode, tuple(name for name in RESIDUAL_MODES if name != "additive"))
        check_float("DeltaShortcut beta_init", beta_init, 0.0, 2.0)
        check_int("DeltaShortcut gate_hidden_size", gate_hidden_size, 0)
        check_float("DeltaShortcut k_eps", k_eps, 0.0, low_open=True)
        check_choice("DeltaShortcut value_input", value_input, VALUE_INPUTS)
        check_choice("DeltaShortcut value_activation", value_activation, VALUE_ACTIVATIONS)
        check_float("DeltaShortcut value_scale", value_scale, 0.0, low_open=True)
        check_choice("DeltaShortcut init_scheme", init_scheme, INIT_SCHEMES)
        self.hidden_size = hidden_size
        self.value_channels = value_channels
        self.erase = mode == "delta"
        self.beta_init = beta_init
        self.k_eps = k_eps
        self.value_input = value_input
        self.value_activation = value_activation
        self.value_scale = value_scale
        self.layer_idx = layer_idx
        self.sublayer = sublayer
        self.keep_output_for_backward = keep_output_for_backward
        self.use_fast_path = use_fast_path
        self.init_scheme = init_scheme
        # An observer with `record(shortcut, state, h, beta, v, new_state)`, set only while
        # `ddl_hf.record_delta_stats` runs; None keeps forward free of any recording work.
        self._recorder = None
        if gate_hidden_size > 0:
            self.beta_hidden = nn.Linear(hidden_size, gate_hidden_size)
            self.beta_proj = nn.Linear(gate_hidden_size, 1)
        else:
            self.beta_hidden = None
            self.beta_proj = nn.Linear(hidden_size, 1)
        self.value_proj = nn.Linear(hidden_size, value_channels)
        self.reset_parameters()

    @property
    def mode(self) -> str:
        return "delta" if self.erase else "write_only"

    @torch.no_grad()
    def reset_parameters(self, weight_std: float | None = None) -> None:
        """Weights N(0, weight_std) (default 0.5 / sqrt(d)); gate bias logit(beta_init / 2), so that
        beta = beta_init at a zero context. `init_scheme="authors"`: the other biases keep PyTorch's
        Linear init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and beta_init / 2 is clamped to [1e-6, 1 - 1e-6];
        `"neutral"`: the other biases 0 and the clamp [1e-4, 1 - 1e-4]."""
        std = 0.5 / math.sqrt(self.hidden_size) if weight_std is None else weight_std
        for linear in (self.beta_hidden, self.beta_proj, self.value_proj):
            if linear is None:
                continue
            init.normal_(linear.weight, mean=0.0, std=std)
            if self.init_scheme == "authors":
                bound = 1.0 / math.sqrt(linear.in_features)
                init.uniform_(linear.bias, -bound, bound)
            else:
                init.zeros_(linear.bias)
        clamp = 1e-6 if self.init_scheme == "authors" else 1e-4
        half_beta = min(max(self.beta_init / 2.0, clamp), 1.0 - clamp)
        init.constant_(self.beta_proj.bias, _logit(half_beta))

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """beta = 2 sigmoid(gate(context)), computed in fp32. (..., d) -> (..., 1)."""
        x = upcast(context)
        if self.beta_hidden is not None:
            x = torch.tanh(_linear_fp32(self.beta_hidden, x))
        return 2.0 * torch.sigmoid(_linear_fp32(self.beta_proj, x))

    def value(self, source: torch.Tensor) -> torch.Tensor:
        """The value v read from `source`. (..., d) -> (..., d_v), fp32."""
        v = _linear_fp32(self.value_proj, source)
        if self.value_activation == "sigmoid":
            v = self.value_scale * torch.sigmoid(v)
        return v

    def forward(
        self,
        state: torch.Tensor,
        h: torch.Tensor,
        context: torch.Tensor,
        block_input: torch.Tensor | None = None,
        return_write: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The new state (..., d_v * d); with `return_write=True` also the write w (..., d_v) in fp32
        such that the new state is X + h w^T."""
        if self.value_input == "context":
            source = context
        elif block_input is not None:
            source = block_input
        elif self.value_channels == 1:
            source = state
        else:
            raise ValueError("DeltaShortcut with value_channels > 1 and value_input='state' needs `block_input`")
        beta = self.gate(context)
        v = self.value(source)
        matrix = state_matrix(state, self.hidden_size, self.value_channels)
        new_matrix, write = delta_update(
            matrix,
            h,
            beta,
            v,
            self.k_eps,
            erase=self.erase,
            return_write=True,
            save_output=self.keep_output_for_backward,
            use_fast_path=self.use_fast_path,
        )
        new_state = flat_state(new_matrix)
        if self._recorder is not None:
            self._recorder.record(self, state, h, beta, v, new_state)
        return (new_state, write) if return_write else new_state

    def write_and_read(
        self,
        state: torch.Tensor,
        h: torch.Tensor,
        context: torch.Tensor,
        block_input: torch.Tensor,
        compressor: StateCompressor,
        cache: Cache | None = None,
        state_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
        document_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new state and `compressor`'s read of it, for the next sublayer. (B, T, d_v * d), (B, T, d).

        `block_input` is `compressor`'s read of `state`. The compressor is linear in the state, so its
        read of the new state X + h w^T is `block_input` plus its read of the write
        (`StateCompressor.read_after_write`): one pass over the (d, d_v) state fewer, and the new
        state need not be kept for backward.
        """
        new_state, write = self(state, h, context, block_input, return_write=True)
        read = compressor.read_after_write(
            block_input, h, write, new_state, cache, state_idx, padding_mask, document_positions
        )
        return new_state, read

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, value_channels={self.value_channels}, mode={self.mode}, "
            f"k_eps={self.k_eps}, value_input={self.value_input}, value_activation={self.value_activation}"
        )


# --------------------------------------------------------------------------- short convolutions
def causal_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    cache: Cache | None = None,
    layer_idx: int = 0,
    state_idx: int = 0,
    padding_mask: torch.Tensor | None = None,
    use_fast_path: bool = True,
    read_weight: torch.Tensor | None = None,
    document_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution over tokens, with its last inputs kept in a hybrid cache.

    Args:
        x: (B, T, C) inputs.
        weight: (C_out, 1, K), one filter per output channel: output channel `i * (C_out // C) + j`
            reads input channel i (`F.conv1d` with groups = C).
        cache: a `DynamicCache` or `StaticCache` built from the model config (or None): prefill stores the
            last K-1 inputs as conv state `state_idx` of the hybrid layer `cache.layers[layer_idx]`
            (`DDLConfig.conv_state_index`), decoding reads them back.
        padding_mask: (B, T) bool, False at padded positions, which are zeroed first so that a
            left-padded row sees exactly what an unpadded row sees.
        read_weight: (d, d_v) or None. Given, x is the value-major state (B, T, d_v * d) and the
            filtered channels are read by a channel compressor (`delta_ops.token_compress`): the
            token compressor.
        document_positions: (B, T) long or None: each token's index in its document (0 at a document
            start), for rows that pack several documents; no tap then reads across a document start
            (`delta_ops.document_tap_mask`). Only without a cache (packed rows are a training layout).

    Returns:
        (B, T, C_out), or (B, T, d) with `read_weight`.
    """
    x, padding = _conv_inputs(x, weight.shape[-1], cache, layer_idx, state_idx, padding_mask)
    tap_mask = _tap_mask(document_positions, weight.shape[-1], cache)
    if read_weight is not None:
        return token_compress(x, weight, read_weight, padding, use_fast_path=use_fast_path, tap_mask=tap_mask)
    return token_conv(x, weight, padding, use_fast_path=use_fast_path, tap_mask=tap_mask)


def _tap_mask(document_positions: torch.Tensor | None, kernel_size: int, cache: Cache | None) -> torch.Tensor | None:
    """The (B, T, K) taps that stay inside each token's document, or None when rows hold one document."""
    if document_positions is None:
        return None
    if cache is not None:
        raise ValueError("document_positions (packed documents) cannot be combined with a cache")
    return document_tap_mask(document_positions, kernel_size)


def _conv_inputs(
    x: torch.Tensor,
    kernel_size: int,
    cache: Cache | None,
    layer_idx: int,
    state_idx: int,
    padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """What a causal convolution of `kernel_size` taps over x (B, T, C) reads (see `causal_depthwise_conv`):
    the masked x and `padding = K - 1` zero tokens before it, or, when the cache holds earlier inputs
    (decoding), those K - 1 inputs followed by x, and `padding = 0`. Prefill stores x's last inputs."""
    if padding_mask is not None:
        x = x.masked_fill(~padding_mask.unsqueeze(-1), 0.0)
    num_tokens, context = x.shape[1], kernel_size - 1
    if context == 0 or cache is None:
        return x, context
    layer = cache.layers[layer_idx]
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        raise ValueError(
            "This DDL model keeps convolution states in its cache; pass a cache built with "
            "`DynamicCache(config=model.config)` (or let the model or `generate` build it)"
        )
    decoding = layer.has_previous_state[state_idx]
    # The cache holds (B, C, T) tensors: prefill stores the last K-1 inputs, decoding returns them followed by x.
    full = cache.update_conv_state(x.transpose(1, 2), layer_idx, state_idx=state_idx, conv_kernel_size=context)
    if not decoding:
        return x, context
    # While the cache records its past for a later `crop` (assisted decoding), a prompt shorter than K-1 tokens
    # leaves a shorter window: the missing inputs lie before the sequence start, where they are 0.
    window = full[..., -(num_tokens + context) :]
    return F.pad(window, (num_tokens + context - window.shape[-1], 0)).transpose(1, 2), 0


def _identity_causal_filter(weight: torch.Tensor) -> None:
    """Filters (C, 1, K) that pass the current token through: last tap 1, others 0.

    Built from ops that DTensors shard (a slice, `ones_like`, a left pad) and copied whole: an
    indexed assignment is `fill_.Tensor`, which FSDP2's sharded parameters refuse (meta-device
    init, `to_empty`, `init_weights()`).
    """
    identity = F.pad(torch.ones_like(weight[..., -1:]), (weight.shape[-1] - 1, 0))
    init.copy_(weight, identity)


class _StateModule(nn.Module):
    """What `StateCompressor` and `EmbedExpansion` share: the (d, d_v) state shape, the `kind`, the
    fast-path flag, and optional causal token filters `conv_weight` (d * d_v, 1, K), identity at init."""

    def __init__(
        self, hidden_size: int, value_channels: int, kind: str, kinds: tuple[str, ...], use_fast_path: bool
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int(f"{owner} hidden_size", hidden_size, 1)
        check_int(f"{owner} value_channels", value_channels, 1)
        check_choice(f"{owner} kind", kind, kinds)
        self.hidden_size = hidden_size
        self.value_channels = value_channels
        self.kind = kind
        self.use_fast_path = use_fast_path

    def _register_filters(self, has_filters: bool, conv_size: int) -> None:
        """`conv_weight`, or None. Registered after the subclass's own parameters, in the checkpoint's order."""
        if has_filters:
            self.conv_weight = nn.Parameter(torch.empty(self.hidden_size * self.value_channels, 1, conv_size))
        else:
            self.register_parameter("conv_weight", None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.conv_weight is not None:
            _identity_causal_filter(self.conv_weight)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, value_channels={self.value_channels}, kind={self.kind}"


class StateCompressor(_StateModule):
    """Reads the width-d block input from the expanded state. (B, T, d_v * d) -> (B, T, d).

    `x_in[i] = sum_j W[i, j] X[i, j]` (channel compressor, CC); the token compressor (TC)
    first runs a depthwise causal convolution over tokens on all d * d_v channels (`conv_weight`
    (d * d_v, 1, `conv_size`)). A token compressor keeps its convolution inputs in
    `cache.layers[cache_layer_idx]`.

    The read W (d, d_v) (`read_matrix()`), by `form`:

    - `"factored"` (the authors' code): one read vector `read_vector` r (d_v,) shared by all features;
      CC first convolves each feature's d_v values with its own kernel `channel_kernel`
      (d, `channel_kernel_size`), 'same' padded with (K-1)//2 on the left, so
      `W[i, j] = sum_u r[u] kernel[i, j - u + (K-1)//2]`; TC reads with r alone, `W[i, j] = r[j]`.
    - `"free"`: `read_weight` W (d, d_v), learned freely.

    Init (`init_scheme`): r = 1 / d_v; `"authors"` draws the kernel and the TC filters from
    N(0, 0.5 / sqrt(d)) (the free W too, as a matrix); `"neutral"` makes every compressor the exact
    average over the d_v values (kernel a centred one-hot, free W = 1 / d_v, TC filters the identity).
    """

    def __init__(
        self,
        hidden_size: int,
        value_channels: int,
        kind: str = "channel",
        conv_size: int = 4,
        cache_layer_idx: int = 0,
        use_fast_path: bool = True,
        form: str = "factored",
        channel_kernel_size: int = 4,
        init_scheme: str = "authors",
    ) -> None:
        super().__init__(hidden_size, value_channels, kind, STATE_COMPRESSORS, use_fast_path)
        check_int("StateCompressor conv_size", conv_size, 1)
        check_int("StateCompressor cache_layer_idx", cache_layer_idx, 0)
        check_choice("StateCompressor form", form, COMPRESSOR_FORMS)
        check_int("StateCompressor channel_kernel_size", channel_kernel_size, 1)
        check_choice("StateCompressor init_scheme", init_scheme, INIT_SCHEMES)
        self.cache_layer_idx = cache_layer_idx
        self.form = form
        self.init_scheme = init_scheme
        if form == "free":
            self.read_weight = nn.Parameter(torch.empty(hidden_size, value_channels))
        else:
            if kind == "channel":
                self.channel_kernel = nn.Parameter(torch.empty(hidden_size, channel_kernel_size))
            self.read_vector = nn.Parameter(torch.empty(value_channels))
        self._register_filters(kind == "token", conv_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = 0.5 / math.sqrt(self.hidden_size)
        random = self.init_scheme == "authors"
        if self.form == "free":
            if random:
                init.normal_(self.read_weight, mean=0.0, std=std)
            else:
                init.constant_(self.read_weight, 1.0 / self.value_channels)
        else:
            init.constant_(self.read_vector, 1.0 / self.value_channels)
            if self.kind == "channel":
                if random:
                    init.normal_(self.channel_kernel, mean=0.0, std=std)
                else:
                    # A centred one-hot tap, built from the weight itself so that sharded (DTensor) weights
                    # take it too (see `_identity_causal_filter`).
                    kernel_size = self.channel_kernel.shape[-1]
                    centre = (kernel_size - 1) // 2
                    one_hot = F.pad(torch.ones_like(self.channel_kernel[..., :1]), (centre, kernel_size - 1 - centre))
                    init.copy_(self.channel_kernel, one_hot)
        if self.conv_weight is not None and random:
            init.normal_(self.conv_weight, mean=0.0, std=std)
        elif self.conv_weight is not None:
            super().reset_parameters()

    def read_matrix(self) -> torch.Tensor:
        """The per-feature read W (d, d_v) that the compress ops take (see the class docstring)."""
        if self.form == "free":
            return self.read_weight
        shared = self.read_vector.unsqueeze(0).expand(self.hidden_size, self.value_channels)
        if self.kind != "channel":
            return shared
        # W[i, j] = sum_t kernel[i, t] r[j + pad - t]: r shifted by each tap, zero outside [0, d_v).
        kernel_size = self.channel_kernel.shape[-1]
        pad = (kernel_size - 1) // 2
        padded = F.pad(self.read_vector, (kernel_size, kernel_size))
        # A sum over the K taps rather than a (d, K) @ (K, d_v) product: the compressor's cost is its reads of the
        # state (`flops.py` counts those), not this d * K * d_v setup.
        read = 0
        for tap in range(kernel_size):
            start = kernel_size + pad - tap
            read = read + self.channel_kernel[:, tap : tap + 1] * padded[start : start + self.value_channels]
        return read

    def forward(
        self,
        state: torch.Tensor,
        cache: Cache | None = None,
        state_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
        document_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`state` (B, T, d_v * d) -> (B, T, d); a token compressor keeps its inputs as conv state `state_idx`
        of `cache.layers[cache_layer_idx]` (`DDLConfig.conv_state_index`). `padding_mask` and
        `document_positions` as in `causal_depthwise_conv`."""
        if self.conv_weight is not None:
            return causal_depthwise_conv(
                state,
                self.conv_weight,
                cache,
                self.cache_layer_idx,
                state_idx,
                padding_mask,
                use_fast_path=self.use_fast_path,
                read_weight=self.read_matrix(),
                document_positions=document_positions,
            )
        matrix = state_matrix(state, self.hidden_size, self.value_channels)
        return channel_compress(matrix, self.read_matrix(), use_fast_path=self.use_fast_path)

    def read_after_write(
        self,
        read: torch.Tensor,
        h: torch.Tensor,
        write: torch.Tensor,
        new_state: torch.Tensor | None = None,
        cache: Cache | None = None,
        state_idx: int = 0,
        padding_mask: torch.Tensor | None = None,
        document_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The compressor's read of `state + h write^T` from its read of `state` (`self(state, ...)`).

        Both compressors are linear in the state, so the read of the new state is `read` plus the read of
        the write: for CC `read[i] + h[i] (W w)[i]`, for TC the token convolution of h w^T
        (`delta_ops.token_read_after_write`). `read` (B, T, d), `h` (B, T, d), `write` (B, T, d_v) ->
        (B, T, d), in `read.dtype`; the fast path neither reads the new state nor keeps it for backward.

        `new_state` (B, T, d_v * d) is what the reference path reads (the plain definition). A token
        compressor needs it: it stores its last inputs in `cache` (conv state `state_idx`), and while
        decoding (the cache holds earlier inputs) it reads the new state with them. With packed documents
        (`document_positions`) no tap reads across a document start.
        """
        if self.conv_weight is None:
            if new_state is None:
                return channel_read_after_write(read, h, write, self.read_matrix(), use_fast_path=self.use_fast_path)
            matrix = state_matrix(new_state, self.hidden_size, self.value_channels)
            return channel_compress_after_write(
                matrix, read, h, write, self.read_matrix(), use_fast_path=self.use_fast_path
            )
        if new_state is None:
            raise ValueError("StateCompressor.read_after_write with kind='token' needs `new_state`")
        kernel_size = self.conv_weight.shape[-1]
        x, padding = _conv_inputs(new_state, kernel_size, cache, self.cache_layer_idx, state_idx, padding_mask)
        if padding < kernel_size - 1:  # decoding: the window starts with earlier tokens' inputs
            return token_compress(x, self.conv_weight, self.read_matrix(), padding, use_fast_path=self.use_fast_path)
        if padding_mask is not None:  # masked tokens write nothing, as their state reads as zero
            write = write.masked_fill(~padding_mask.unsqueeze(-1), 0.0)
        return token_compress_after_write(
            x,
            read,
            h,
            write,
            self.conv_weight,
            self.read_matrix(),
            padding,
            use_fast_path=self.use_fast_path,
            tap_mask=_tap_mask(document_positions, kernel_size, cache),
        )


class EmbedExpansion(_StateModule):
    """Turns token embeddings into the first residual state. (B, T, d) -> (B, T, d_v * d), value major.

    `"conv"` (EC): a depthwise causal convolution over tokens mapping feature i to its d_v
    channels, identity at init (so it starts as repetition), keeping its inputs in
    `cache.layers[0]` as conv state `state_idx`; `"repeat"`: copy each feature.
    """

    def __init__(
        self,
        hidden_size: int,
        value_channels: int,
        kind: str = "conv",
        conv_size: int = 4,
        state_idx: int = 0,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__(hidden_size, value_channels, kind, EMBED_EXPANSIONS, use_fast_path)
        check_int("EmbedExpansion conv_size", conv_size, 1)
        check_int("EmbedExpansion state_idx", state_idx, 0)
        self.state_idx = state_idx
        self._register_filters(kind == "conv", conv_size)
        self.reset_parameters()

    def forward(
        self,
        embeddings: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        document_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, d) -> (B, T, d_v * d); `padding_mask` and `document_positions` as in `causal_depthwise_conv`."""
        if self.conv_weight is None:
            return embeddings.repeat(*(1,) * (embeddings.dim() - 1), self.value_channels)
        # The convolution's output channels come feature major (group i's d_v outputs side by side): one copy
        # to the value-major layout, once per forward.
        expanded = causal_depthwise_conv(
            embeddings,
            self.conv_weight,
            cache,
            0,
            self.state_idx,
            padding_mask,
            use_fast_path=self.use_fast_path,
            document_positions=document_positions,
        )
        return flat_state(expanded.unflatten(-1, (self.hidden_size, self.value_channels)))


# --------------------------------------------------------------------------- built from a DDLConfig
def shortcut_from_config(config: DDLConfig, layer_idx: int, sublayer: str) -> DeltaShortcut | None:
    """The residual write of one sublayer: None means the additive `x + h`."""
    if config.residual_mode == "additive":
        return None
    return DeltaShortcut(
        config.hidden_size,
        value_channels=config.value_channels,
        mode=config.residual_mode,
        beta_init=config.beta_init,
        gate_hidden_size=config.gate_hidden_size,
        k_eps=config.k_eps,
        value_input=config.value_input,
        value_activation=config.value_activation,
        value_scale=config.value_scale,
        layer_idx=layer_idx,
        sublayer=sublayer,
        # The block's input state is kept by the attention's read and its output by the next block's read,
        # so the attention write keeps its input and the MLP write its output: no state is kept twice.
        keep_output_for_backward=sublayer == "mlp",
        use_fast_path=config.use_fast_path,
        init_scheme=config.init_scheme,
    )


def compressor_from_config(config: DDLConfig, cache_layer_idx: int) -> StateCompressor | None:
    """The width-d read of the state that a block (or the readout) takes: None when d_v = 1."""
    if not config.is_expanded:
        return None
    return StateCompressor(
        config.hidden_size,
        config.value_channels,
        config.state_compressor,
        config.state_conv_size,
        cache_layer_idx=cache_layer_idx,
        use_fast_path=config.use_fast_path,
        form=config.compressor_form,
        channel_kernel_size=config.channel_kernel_size,
        init_scheme=config.init_scheme,
    )


def embed_expansion_from_config(config: DDLConfig) -> EmbedExpansion | None:
    """The first residual state from the embeddings: None when d_v = 1."""
    if not config.is_expanded:
        return None
    return EmbedExpansion(
        config.hidden_size,
        config.value_channels,
        config.embed_expansion,
        config.embed_conv_size,
        state_idx=config.conv_state_index(0, ConvStateSlot.EMBED_EXPANSION) if config.uses_embed_conv else 0,
        use_fast_path=config.use_fast_path,
    )


__all__ = [
    "state_matrix",
    "flat_state",
    "DeltaShortcut",
    "StateCompressor",
    "EmbedExpansion",
    "causal_depthwise_conv",
    "shortcut_from_config",
    "compressor_from_config",
    "embed_expansion_from_config",
]
