"""The Delta rewrite of a residual state, as plain tensor functions, and its fast paths.

Notation (one token, one sublayer; every leading dimension is a batch dimension):

    state X : (..., d, d_v)   the residual state (d_v = 1 is the ordinary vector stream)
    h       : (..., d)        the sublayer output, whose direction is the write direction
    beta    : (..., 1)        the gate, in (0, 2)
    v       : (..., d_v)      the value written along k

    k  = h / sqrt(|h|^2 + eps^2)
    X' = X + beta k (v^T - k^T X)       erase=True  (DDL)
    X' = X + beta k v^T                 erase=False (the write-only control)

`delta_update_reference` is the readable definition that every faster path is tested
against. The direction, the read `k^T X` and the update are computed in fp32 and the
result is cast back to the state's dtype, as in the authors' code.

Fast paths (the defaults, each tested against its plain reference):

- `delta_update`: one autograd function with an analytic backward. It saves the inputs it
  needs (the state only when erasing, h, beta) plus two per-token vectors (1 / sqrt(|h|^2 +
  eps^2) and the target `v^T - k^T X`), never (..., d, d_v) intermediates, and it forms the
  rank-1 write as a batched outer product, which CPU kernels run at memory speed where a
  broadcast over the small last dimension d_v does not.
- `channel_compress`: the channel compressor `x_in[i] = sum_j W[i, j] X[i, j]` as one
  grouped convolution forward and two fused passes backward.
- `token_conv`: causal convolutions over tokens on the token-major (B, T, C) layout the model
  keeps, run as a channels-last 2-D convolution, so neither the input nor the output is
  transposed in memory.

`reference_paths()` switches every call site in this package to the plain references; it is
meant for tests and benchmarks (`ddl bench`), which compare the two.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Read at every call so that `reference_paths()` can switch implementations; torch.compile guards on it.
_use_fast_paths = True


def fast_paths_enabled() -> bool:
    """True unless inside `reference_paths()`."""
    return _use_fast_paths


@contextmanager
def reference_paths() -> Iterator[None]:
    """Run the plain reference implementations instead of the fast paths inside this block.

    For tests and benchmarks only: the references are slower and save more for backward, and
    the two give the same results up to float rounding. Not thread-safe (a module-level switch).

    Example::

        with reference_paths():
            expected = model(input_ids).logits
    """
    global _use_fast_paths
    previous = _use_fast_paths
    _use_fast_paths = False
    try:
        yield
    finally:
        _use_fast_paths = previous


# --------------------------------------------------------------------------- the Delta rewrite
def unit_direction(h: torch.Tensor, eps: float) -> torch.Tensor:
    """`h / sqrt(|h|^2 + eps^2)` over the last dimension, in fp32. Shape is kept: (..., d)."""
    h = h.float()
    return h * torch.rsqrt(h.square().sum(-1, keepdim=True) + eps * eps)


def delta_update_reference(
    state: torch.Tensor,
    h: torch.Tensor,
    beta: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    erase: bool = True,
) -> torch.Tensor:
    """Plain reference of the Delta rewrite.

    Args:
        state: (..., d, d_v) residual state X.
        h: (..., d) sublayer output; only its direction is used.
        beta: (..., 1) gate values.
        v: (..., d_v) values.
        eps: direction guard (`k_eps`).
        erase: True for DDL, False for the write-only control.

    Returns:
        (..., d, d_v) the new state, in `state.dtype`.
    """
    k = unit_direction(h, eps).unsqueeze(-1)  # (..., d, 1)
    x = state.float()
    target = v.float().unsqueeze(-2)  # (..., 1, d_v)
    if erase:
        read = (k * x).sum(-2, keepdim=True)  # (..., 1, d_v) = k^T X
        target = target - read
    new_state = x + beta.float().unsqueeze(-1) * k * target
    return new_state.to(state.dtype)


def _inverse_norm(h: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(|h|^2 + eps^2) for fp32 (N, d) -> (N, 1); `vector_norm` is one fused reduction where
    square + sum is two passes over h."""
    return torch.rsqrt(torch.linalg.vector_norm(h, dim=-1, keepdim=True).square() + eps * eps)


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i a[n, i] b[n, i, j]: (N, d), (N, d, m) -> (N, m), as a batched matrix product."""
    return torch.bmm(a.unsqueeze(1), b).squeeze(1)


class _DeltaUpdate(torch.autograd.Function):
    """X' = X + beta k (v^T - [erase] k^T X) on flat (N, d, d_v) / (N, d) / (N, 1) / (N, d_v) inputs.

    Backward, with G = dL/dX', g = G^T k (N, d_v) and target t = v^T - [erase] k^T X:

        dL/dv    = beta g
        dL/dbeta = g . t
        dL/dX    = G - [erase] beta k g^T
        dL/dk    = beta (G t - [erase] X g)
        dL/dh    = r (dL/dk - k (k . dL/dk)),   r = 1 / sqrt(|h|^2 + eps^2)
    """

    @staticmethod
    def forward(ctx, state, h, beta, v, eps: float, erase: bool):
        # fp32 math whatever autocast says: the rewrite is defined in fp32 (see the module docstring).
        with torch.autocast(state.device.type, enabled=False):
            x, hf, bf = state.float(), h.float(), beta.float()
            r = _inverse_norm(hf, eps)  # (N, 1)
            target = v.float()  # (N, d_v)
            if erase:
                target = target - _rowwise_dot(hf, x) * r
            # beta k t^T = h (beta r t)^T: scale the (N, d_v) side, not the (N, d) one.
            write = torch.bmm(hf.unsqueeze(-1), (bf * r * target).unsqueeze(1))  # (N, d, d_v)
            new_state = write.add_(x).to(state.dtype)
        ctx.erase = erase
        ctx.input_dtypes = (state.dtype, h.dtype, beta.dtype, v.dtype)
        ctx.save_for_backward(state if erase else None, h, beta, r, target)
        return new_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_new_state):
        state, h, beta, r, target = ctx.saved_tensors
        state_dtype, h_dtype, beta_dtype, v_dtype = ctx.input_dtypes
        need_state, need_h, need_beta, need_v = ctx.needs_input_grad[:4]
        grad_state = grad_h = grad_beta = grad_v = None
        with torch.autocast(grad_new_state.device.type, enabled=False):
            grad_out, hf, bf = grad_new_state.float(), h.float(), beta.float()
            g = _rowwise_dot(hf, grad_out) * r  # (N, d_v) = G^T k
            if need_v:
                grad_v = (bf * g).to(v_dtype)
            if need_beta:
                grad_beta = (g * target).sum(-1, keepdim=True).to(beta_dtype)
            if need_state:
                if ctx.erase:
                    scaled_g = (bf * r) * g  # beta k g^T = h (beta r g)^T
                    grad_state = torch.bmm(hf.unsqueeze(-1), scaled_g.neg().unsqueeze(1)).add_(grad_out)
                    grad_state = grad_state.to(state_dtype)
                else:
                    grad_state = grad_new_state.to(state_dtype)
            if need_h:
                # u = G t - [erase] X g, so that dL/dk = beta u.
                u = torch.bmm(grad_out, target.unsqueeze(-1)).squeeze(-1)  # (N, d)
                if ctx.erase:
                    u = u.sub_(torch.bmm(state.float(), g.unsqueeze(-1)).squeeze(-1))
                # dL/dh = beta r (u - r^2 h (h . u))
                h_dot_u = _rowwise_dot(hf, u.unsqueeze(-1))  # (N, 1)
                scale = bf * r
                grad_h = u.mul_(scale).addcmul_(hf, scale * r * r * h_dot_u, value=-1.0).to(h_dtype)
        return grad_state, grad_h, grad_beta, grad_v, None, None


def delta_update(
    state: torch.Tensor,
    h: torch.Tensor,
    beta: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    erase: bool = True,
) -> torch.Tensor:
    """The Delta rewrite (same arguments, result and precision as `delta_update_reference`), fast path.

    `state` (..., d, d_v), `h` (..., d), `beta` (..., 1), `v` (..., d_v); `beta` and `v` may
    broadcast over the leading dimensions. Returns (..., d, d_v) in `state.dtype`. Supports
    first-order gradients (`torch.autograd.grad(..., create_graph=True)` through it raises; use
    `reference_paths()` for higher orders).
    """
    if not _use_fast_paths:
        return delta_update_reference(state, h, beta, v, eps, erase=erase)
    *leading, d, d_v = state.shape
    if h.shape != (*leading, d):
        raise ValueError(f"delta_update: h must have shape {(*leading, d)} for a state of shape {tuple(state.shape)}")
    beta = beta.expand(*leading, 1).reshape(-1, 1)
    v = v.expand(*leading, d_v).reshape(-1, d_v)
    new_state = _DeltaUpdate.apply(state.reshape(-1, d, d_v), h.reshape(-1, d), beta, v, eps, erase)
    return new_state.view(state.shape)


# --------------------------------------------------------------------------- state compressors
def channel_compress_reference(matrix: torch.Tensor, read_weight: torch.Tensor) -> torch.Tensor:
    """Plain reference of the channel compressor: `(..., d, d_v), (d, d_v) -> (..., d)`,
    `x_in[..., i] = sum_j W[i, j] X[..., i, j]`."""
    return (matrix * read_weight).sum(-1)


class _ChannelCompress(torch.autograd.Function):
    """x_in[n, i] = sum_j W[i, j] X[n, i, j] on (N, d, d_v), (d, d_v) -> (N, d), both of one dtype.

    Forward is a grouped convolution (feature i = group i, its d_v values = the kernel), one pass
    over X; backward is dL/dX = g W (broadcast) and dL/dW = sum_n g[n] X[n] with g = dL/dx_in.
    """

    @staticmethod
    def forward(ctx, matrix, read_weight):
        ctx.save_for_backward(matrix, read_weight)
        # The reference (a product and a sum) is not autocast, so the convolution must not be either.
        with torch.autocast(matrix.device.type, enabled=False):
            return F.conv1d(matrix, read_weight.unsqueeze(1), groups=read_weight.shape[0]).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_read):
        matrix, read_weight = ctx.saved_tensors
        grad_read = grad_read.unsqueeze(-1)  # (N, d, 1)
        grad_matrix = grad_read * read_weight if ctx.needs_input_grad[0] else None
        grad_weight = (matrix * grad_read).sum(0) if ctx.needs_input_grad[1] else None
        return grad_matrix, grad_weight


def channel_compress(matrix: torch.Tensor, read_weight: torch.Tensor) -> torch.Tensor:
    """The channel compressor (same result as `channel_compress_reference`), fast path.

    `matrix` (..., d, d_v), `read_weight` (d, d_v) -> (..., d), in the promoted dtype of the two.
    """
    if not _use_fast_paths:
        return channel_compress_reference(matrix, read_weight)
    *leading, d, d_v = matrix.shape
    dtype = torch.promote_types(matrix.dtype, read_weight.dtype)
    flat = matrix.reshape(-1, d, d_v).to(dtype)
    return _ChannelCompress.apply(flat, read_weight.to(dtype)).view(*leading, d)


# --------------------------------------------------------------------------- token convolutions
def token_conv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Plain reference of `token_conv`: transpose to (B, C, T) and run `F.conv1d`."""
    groups = x.shape[-1] // weight.shape[1]
    return F.conv1d(x.transpose(1, 2), weight, groups=groups).transpose(1, 2)


def token_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Grouped convolution over tokens without padding ("valid"), on token-major tensors.

    Args:
        x: (B, T + K - 1, C_in) inputs, already carrying their K - 1 tokens of left context.
        weight: (C_out, C_in / groups, K) with groups = C_in / weight.shape[1]; output channel o
            reads the inputs of group o // (C_out / groups), as in `F.conv1d`.

    Returns:
        (B, T, C_out).

    The fast path views x as a channels-last (B, C_in, 1, T + K - 1) image, so the convolution
    reads and writes the (B, T, C) memory directly; the reference transposes to (B, C, T).
    """
    if not _use_fast_paths:
        return token_conv_reference(x, weight)
    groups = x.shape[-1] // weight.shape[1]
    image = x.unsqueeze(1).permute(0, 3, 1, 2)  # (B, C_in, 1, T'), strides of (B, 1, T', C_in)
    out = F.conv2d(image, weight.unsqueeze(2), groups=groups)  # (B, C_out, 1, T)
    return out.squeeze(2).transpose(1, 2)


__all__ = [
    "unit_direction",
    "delta_update_reference",
    "delta_update",
    "channel_compress_reference",
    "channel_compress",
    "token_conv_reference",
    "token_conv",
    "fast_paths_enabled",
    "reference_paths",
]
