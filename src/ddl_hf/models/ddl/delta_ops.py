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
against. The direction, the read `k^T X` and the update are computed in fp32 (float64 for
float64 inputs, see `upcast`) and the result is cast back to the state's dtype, as in the
authors' code.

Memory layout. The ops take the state as a (..., d, d_v) tensor of any strides. The model keeps
it value major: in memory (..., d_v, d), the d_v columns X[..., :, j] each a contiguous width-d
vector (`state_matrix` in `delta_layers` gives the (..., d, d_v) view). The fast paths are laid
out for that layout: every pass over the state runs along the contiguous d (vectorized), never
along the short d_v, and every state-sized result they produce is value major again. They stay
correct for any other strides, only slower.

Fast paths (the defaults, each tested against its plain reference):

- `delta_update`: one autograd function with an analytic backward. It keeps one state (the
  input, or the output with `save_output`, whichever the model keeps anyway), h, beta, v and
  three per-token vectors, never a (..., d, d_v) intermediate. The read `k^T X` is a batched
  product; the rank-1 write is one `addcmul` along d. `return_write` also gives the write w of
  `X' = X + h w^T`.
- `channel_compress`: the channel compressor `x_in[i] = sum_j W[i, j] X[i, j]` as d_v
  multiply-adds of contiguous columns; `channel_read_after_write` gives the compressor's read of
  `X + h w^T` from its read of X without touching X.
- `token_conv`: causal convolutions over tokens on the token-major (B, T, C) layout the model
  keeps, run as a channels-last 2-D convolution (no transposed copies), or, for the few tokens
  of a decoding step, as one product of the windows. `token_compress` reads the value-major
  state as a (d, T, d_v) image: its filters and the read fold into one depthwise (K, d_v)
  convolution.

Without autograd (inference) the same arithmetic runs without the autograd wrappers, so results
do not depend on the grad mode.

Every public op takes `use_fast_path` (the modules pass their `use_fast_path`, from
`DDLConfig.use_fast_path`); `False` runs the plain reference. `reference_paths()` forces the
references everywhere inside a block, for tests and benchmarks (`ddl bench --reference`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

# Read at every call so that `reference_paths()` can switch implementations; torch.compile guards on it.
_use_fast_paths = True


def fast_paths_enabled() -> bool:
    """True unless inside `reference_paths()`."""
    return _use_fast_paths


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in the precision the Delta arithmetic runs in: fp32 for fp32 and lower, float64 kept."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _fast(use_fast_path: bool) -> bool:
    """Whether an op called with `use_fast_path` runs its fast path."""
    return use_fast_path and _use_fast_paths


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
    h = upcast(h)
    return h * torch.rsqrt(h.square().sum(-1, keepdim=True) + eps * eps)


def delta_update_reference(state, h, beta, v, eps: float, erase=True, return_write=False):
    """Plain reference of the Delta rewrite.

    Args:
        state: (..., d, d_v) residual state X.
        h: (..., d) sublayer output; only its direction is used.
        beta: (..., 1) gate values.
        v: (..., d_v) values.
        eps: direction guard (`k_eps`).
        erase: True for DDL, False for the write-only control.
        return_write: also return the write w (..., d_v), fp32, with X' = X + h w^T.

    Returns:
        (..., d, d_v) the new state, in `state.dtype` (and w with `return_write`).
    """
    k = unit_direction(h, eps).unsqueeze(-1)  # (..., d, 1)
    x = upcast(state)
    target = upcast(v).unsqueeze(-2)  # (..., 1, d_v)
    if erase:
        read = (k * x).sum(-2, keepdim=True)  # (..., 1, d_v) = k^T X
        target = target - read
    new_state = (x + upcast(beta).unsqueeze(-1) * k * target).to(state.dtype)
    if not return_write:
        return new_state
    # X' = X + beta k t^T = X + h (beta r t)^T with k = r h.
    r = torch.rsqrt(upcast(h).square().sum(-1, keepdim=True) + eps * eps)
    return new_state, upcast(beta) * r * target.squeeze(-2)


def _inverse_norm(h: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(|h|^2 + eps^2) for fp32 (N, d) -> (N, 1); `vector_norm` is one fused reduction where
    square + sum is two passes over h."""
    return torch.rsqrt(torch.linalg.vector_norm(h, dim=-1, keepdim=True).square() + eps * eps)


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i a[n, i] b[n, i, j]: (N, d), (N, d, m) -> (N, m), as a batched matrix product."""
    return torch.bmm(a.unsqueeze(1), b).squeeze(1)


def _outer_add(base: torch.Tensor, column: torch.Tensor, row: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """base + alpha * column row^T per token: (N, d, m), (N, d), (N, m) -> new (N, d, m), value major
    for a value-major base (one elementwise pass along d)."""
    result = torch.addcmul(base.transpose(1, 2), row.unsqueeze(-1), column.unsqueeze(1), value=alpha)
    return result.transpose(1, 2)


def _rowwise_matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """matrix @ vector per token: (N, d, m), (N, m) -> (N, d), as (N, 1, m) @ (N, m, d) products
    (row-major operands for a value-major matrix)."""
    if matrix.shape[-1] == 1:
        return matrix.squeeze(-1) * vector
    return torch.bmm(vector.unsqueeze(1), matrix.transpose(1, 2)).squeeze(1)


def _value_major_zeros(leading: int, d: int, d_v: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of shape (leading, d, d_v), value major in memory."""
    return torch.zeros(leading, d_v, d, dtype=dtype, device=device).transpose(1, 2)


def _full_precision(tensor: torch.Tensor) -> AbstractContextManager:
    """Autocast switched off on the tensor's device, when it is on (entering the context costs more
    than a decoding step's arithmetic, so it is skipped when there is nothing to switch off)."""
    device_type = tensor.device.type
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _as_autocast_convolution_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as autocast would hand them to a convolution on their device: floating tensors below float64 cast
    to the autocast dtype when autocast is on there (on any device type), else unchanged. Casting up front and then
    running with autocast off gives every path (autograd, inference, compiled) the same dtypes, and the token
    compressor's custom operators results of the dtype their fake implementations declare."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a call must record a graph. Inference (decoding above all) calls the same forward
    math directly, so results do not depend on the grad mode: at a few tokens, the overhead of an
    autograd function outweighs the arithmetic."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _refuse_double_backward(name: str) -> None:
    """Raise under create_graph=True: the analytic backwards here are not written to be differentiated, and
    returning gradients that silently miss their second-order terms would be worse than an error."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the fast path of {name} supports first-order gradients only; run the model inside "
            "ddl_hf.reference_paths() to differentiate twice"
        )


def _delta_update_forward(state, h, beta, v, eps: float, erase: bool):
    """The fused rewrite on flat inputs (see `_DeltaUpdate`): the new state and the per-token r, t, w."""
    # fp32 math whatever autocast says: the rewrite is defined in fp32 (see the module docstring).
    with _full_precision(state):
        hf = upcast(h)
        r = _inverse_norm(hf, eps)  # (N, 1)
        target = upcast(v)  # (N, d_v)
        if erase:
            target = target - _rowwise_dot(hf, upcast(state)) * r
        write = upcast(beta) * r * target
        new_state = apply_write(state, hf, write)
    return new_state, r, target, write


def apply_write(state: torch.Tensor, h: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """X + h w^T computed in fp32, in `state.dtype`: (N, d, d_v), (N, d), (N, d_v) -> (N, d, d_v).

    The rewrite's last pass, as its one expression: `recomputed_states` (`StateLedger`) rebuilds a state
    with it from the previous state and the rewrite's h and w, equal to the original bit for bit."""
    with _full_precision(state):
        return _outer_add(upcast(state), upcast(h), write).to(state.dtype)


# --------------------------------------------------------------------------- recomputed states
class _StateRecipe:
    """What autograd keeps of a recomputable state: which one, and the saved tensor's view of it."""

    __slots__ = ("index", "size", "stride", "storage_offset")

    def __init__(self, index: int, tensor: torch.Tensor) -> None:
        self.index, self.size, self.stride = index, tensor.size(), tensor.stride()
        self.storage_offset = tensor.storage_offset()


class StateLedger:
    """The states of one training forward, as a chain: a first state, then one rewrite X' = X + h w^T per
    Delta shortcut (the fused rewrite, `delta_update`, records it while the ledger is active; a reference
    rewrite is not recorded, and its states are kept as usual).

    As the `saved_tensors_hooks` of that forward, it lets autograd keep a `_StateRecipe` instead of any
    state after the first, and rebuilds that state in backward from the first one and the rewrites' h
    (..., d) and w (..., d_v), which backward keeps anyway, with `apply_write`: the same expression on the
    same inputs, so the rebuilt state equals the original bit for bit. The first state is kept, unless the
    model registers how to rebuild it (`first_state`: the embedding expansion, from the embeddings that its
    own backward keeps). States are known by their storage, through weak references to it, so that a freed
    state's memory reused by another tensor is never mistaken for it.
    """

    def __init__(self) -> None:
        # Per state: ("kept", the state, flat (N, d, d_v)), ("rebuilt", a function returning it, the (size, stride,
        # storage offset) of its flat view or None until a rewrite reads it), or ("rewrite", index of the
        # previous state, h (N, d), w (N, d_v)).
        self.states: list[list] = []
        self._by_storage: dict[int, tuple[StorageWeakRef, int]] = {}
        self._rebuilt: dict[int, torch.Tensor] = {}

    def _index_of(self, tensor: torch.Tensor) -> int | None:
        entry = self._by_storage.get(tensor.untyped_storage().data_ptr())
        if entry is None or entry[0].expired():
            return None
        return entry[1]

    def _add(self, tensor: torch.Tensor, node: list) -> int:
        self.states.append(node)
        index = len(self.states) - 1
        storage = tensor.untyped_storage()
        self._by_storage[storage.data_ptr()] = (StorageWeakRef(storage), index)
        return index

    def first_state(self, state: torch.Tensor, rebuild) -> None:
        """Registers the first state (any view of it) with `rebuild()`, which computes it again, bit for bit."""
        self._add(state, ["rebuilt", rebuild, None])

    def record(self, state: torch.Tensor, h: torch.Tensor, write: torch.Tensor, new_state: torch.Tensor) -> None:
        """One rewrite, before autograd saves its tensors: `state`, `new_state` (N, d, d_v), `h` (N, d),
        `write` (N, d_v)."""
        parent = self._index_of(state)
        if parent is None:
            parent = self._add(state, ["kept", state])
        elif self.states[parent][0] == "rebuilt":
            self.states[parent][2] = (state.size(), state.stride(), state.storage_offset())
        self._add(new_state, ["rewrite", parent, h, write])

    def rebuilt(self, index: int) -> torch.Tensor:
        """State `index` (a view of its storage as the forward had it) from the first state and the rewrites.

        Backward asks for the states from the last to the first, several times each (every op that read one
        saved it): the first state, once rebuilt, and the last state asked for stay until backward is done."""
        if index in self._rebuilt:
            return self._rebuilt[index]
        wanted, rewrites = index, []
        while self.states[index][0] == "rewrite":
            _, index, h, write = self.states[index]
            rewrites.append((h, write))
        kind, state, *geometry = self.states[index]
        if kind == "rebuilt":
            if index not in self._rebuilt:
                first = state()
                self._rebuilt[index] = first if geometry[0] is None else first.as_strided(*geometry[0])
            state = self._rebuilt[index]
        for h, write in reversed(rewrites):
            state = apply_write(state, h, write)
        self._rebuilt = {key: value for key, value in self._rebuilt.items() if key == index}
        self._rebuilt[wanted] = state
        return state

    def pack(self, tensor: torch.Tensor):
        index = self._index_of(tensor)
        if index is None or self.states[index][0] == "kept":
            return tensor
        return _StateRecipe(index, tensor)

    def unpack(self, packed):
        if not isinstance(packed, _StateRecipe):
            return packed
        return self.rebuilt(packed.index).as_strided(packed.size, packed.stride, packed.storage_offset)


_active_ledger: StateLedger | None = None


@contextmanager
def recomputed_states() -> Iterator[StateLedger]:
    """Inside this block (one training forward), autograd keeps the rewrites' h and w (and the first state,
    unless the model says how to rebuild it) instead of every (d, d_v) state, and backward rebuilds the
    states it needs (`StateLedger`). Not thread-safe (a module-level switch, as `reference_paths`)."""
    global _active_ledger
    previous, ledger = _active_ledger, StateLedger()
    _active_ledger = ledger
    try:
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, ledger.unpack):
            yield ledger
    finally:
        _active_ledger = previous


class _DeltaUpdate(torch.autograd.Function):
    """X' = X + h w^T with the write w = beta r t, r = 1 / sqrt(|h|^2 + eps^2) and the target
    t = v - [erase] r X^T h, on flat inputs X (N, d, d_v), h (N, d), beta (N, 1), v (N, d_v).
    Returns X' and w (fp32, (N, d_v)); w lets a channel compressor read X' without another pass
    over it (`channel_read_after_write`).

    Backward, with G = dL/dX', S = G^T h + dL/dw and T = beta r S:

        dL/dv    = T
        dL/dbeta = r S . t
        dL/dX    = G - [erase] r h T^T
        dL/dh    = G w - [erase] r X T + h ([erase] r^2 T . (v - t) - r^3 beta S . t)

    Besides h, beta, v and the per-token r, t, w it keeps one state: X, or with `save_output` X'
    (then X T = X' T - h (w . T)); the caller picks the one that another layer keeps for backward
    anyway, so the rewrite adds no state-sized memory.
    """

    @staticmethod
    def forward(ctx, state, h, beta, v, eps: float, erase: bool, save_output: bool):
        new_state, r, target, write = _delta_update_forward(state, h, beta, v, eps, erase)
        if _active_ledger is not None:
            _active_ledger.record(state, h, write, new_state)
        ctx.erase, ctx.save_output = erase, save_output
        ctx.input_dtypes = (state.dtype, h.dtype, beta.dtype, v.dtype)
        ctx.set_materialize_grads(False)
        saved_state = (new_state if save_output else state) if erase else None
        ctx.save_for_backward(saved_state, h, beta, v if erase else None, r, target, write)
        return new_state, write

    @staticmethod
    def backward(ctx, grad_new_state, grad_write):
        _refuse_double_backward("delta_update")
        saved_state, h, beta, v, r, target, write = ctx.saved_tensors
        state_dtype, h_dtype, beta_dtype, v_dtype = ctx.input_dtypes
        need_state, need_h, need_beta, need_v = ctx.needs_input_grad[:4]
        grad_state = grad_h = grad_beta = grad_v = None
        if grad_new_state is None and grad_write is None:
            return grad_state, grad_h, grad_beta, grad_v, None, None, None
        with _full_precision(h):
            hf, bf = upcast(h), upcast(beta)
            if grad_new_state is None:  # only w is used: G = 0
                grad_new_state = _value_major_zeros(*hf.shape, write.shape[-1], state_dtype, hf.device)
            grad_out = upcast(grad_new_state)
            s_grad = _rowwise_dot(hf, grad_out)  # S = G^T h + dL/dw  (N, d_v)
            if grad_write is not None:
                s_grad = s_grad + upcast(grad_write)
            t_grad = bf * r * s_grad  # T = dL/dt
            s_dot_t = (s_grad * target).sum(-1, keepdim=True)
            if need_v:
                grad_v = t_grad.to(v_dtype)
            if need_beta:
                grad_beta = (r * s_dot_t).to(beta_dtype)
            if need_state:
                grad_state = _outer_add(grad_out, hf, r * t_grad, alpha=-1.0) if ctx.erase else grad_out
                grad_state = grad_state.to(state_dtype)
            if need_h:
                h_scale = -r * r * r * bf * s_dot_t  # (N, 1)
                grad_h = _rowwise_matvec(grad_out, write)  # G w
                if ctx.erase:
                    h_scale = h_scale + r * r * (t_grad * (upcast(v) - target)).sum(-1, keepdim=True)
                    if ctx.save_output:  # X T = X' T - h (w . T)
                        h_scale = h_scale + r * (write * t_grad).sum(-1, keepdim=True)
                    grad_h = grad_h.sub_(_rowwise_matvec(upcast(saved_state), t_grad).mul_(r))
                grad_h = grad_h.addcmul_(hf, h_scale).to(h_dtype)
        return grad_state, grad_h, grad_beta, grad_v, None, None, None


def delta_update(
    state: torch.Tensor,
    h: torch.Tensor,
    beta: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    *,
    erase: bool = True,
    return_write: bool = False,
    save_output: bool = False,
    use_fast_path: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Delta rewrite (same arguments, result and precision as `delta_update_reference`).

    `state` (..., d, d_v), `h` (..., d), `beta` (..., 1), `v` (..., d_v); `beta` and `v` may
    broadcast over the leading dimensions. Returns (..., d, d_v) in `state.dtype`; with
    `return_write=True` also the write w (..., d_v) in fp32 such that the new state is
    `state + h w^T` (w = beta (v - [erase] k^T X) / sqrt(|h|^2 + eps^2)).

    Backward keeps one state-sized tensor: the input state, or the new state with
    `save_output=True`; pick the one the surrounding model keeps anyway (a layer reading it), so
    that the rewrite adds only (..., d) and (..., d_v) tensors. Supports first-order gradients
    (`create_graph=True` through it raises; use `reference_paths()` for higher orders).
    """
    *leading, d, d_v = state.shape
    if h.shape != (*leading, d):
        raise ValueError(f"delta_update: h must have shape {(*leading, d)} for a state of shape {tuple(state.shape)}")
    if not _fast(use_fast_path):
        return delta_update_reference(state, h, beta, v, eps, erase=erase, return_write=return_write)
    flat = (state.reshape(-1, d, d_v), h.reshape(-1, d), beta.expand(*leading, 1).reshape(-1, 1))
    flat += (v.expand(*leading, d_v).reshape(-1, d_v),)
    if _needs_autograd(*flat):
        new_state, write = _DeltaUpdate.apply(*flat, eps, erase, save_output)
    else:
        new_state, _, _, write = _delta_update_forward(*flat, eps, erase)
    new_state = new_state.view(state.shape)
    return (new_state, write.view(*leading, d_v)) if return_write else new_state


# --------------------------------------------------------------------------- state compressors
def channel_compress_reference(matrix: torch.Tensor, read_weight: torch.Tensor) -> torch.Tensor:
    """Plain reference of the channel compressor: `(..., d, d_v), (d, d_v) -> (..., d)`,
    `x_in[..., i] = sum_j W[i, j] X[..., i, j]`."""
    return (matrix * read_weight).sum(-1)


def _column_read(matrix: torch.Tensor, read_weight: torch.Tensor) -> torch.Tensor:
    """(N, d, d_v), (d, d_v) -> (N, d): `sum_j W[:, j] * X[:, :, j]`, d_v multiply-adds of the state's
    columns (contiguous width-d vectors in the value-major layout)."""
    # Accumulated in fp32 (as a sum reduction would be), rounded once.
    read = upcast(matrix[..., 0]) * upcast(read_weight[:, 0])
    for j in range(1, matrix.shape[-1]):
        read = read.addcmul_(matrix[..., j], read_weight[:, j])
    return read.to(matrix.dtype)


class _ChannelCompress(torch.autograd.Function):
    """x_in[n, i] = sum_j W[i, j] X[n, i, j] on (N, d, d_v), (d, d_v) -> (N, d), both of one dtype.

    Forward is one multiply-add per column of X; backward is dL/dX = g W (broadcast, written value
    major) and dL/dW = sum_n g[n] X[n] with g = dL/dx_in.
    """

    @staticmethod
    def forward(ctx, matrix, read_weight):
        ctx.save_for_backward(matrix, read_weight)
        return _column_read(matrix, read_weight)

    @staticmethod
    def backward(ctx, grad_read):
        _refuse_double_backward("channel_compress")
        matrix, read_weight = ctx.saved_tensors
        grad_matrix = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_matrix = (grad_read.unsqueeze(1) * read_weight.t().contiguous()).transpose(1, 2)  # value major
        if ctx.needs_input_grad[1]:
            grad_weight = (matrix.transpose(1, 2) * grad_read.unsqueeze(1)).sum(0).t().contiguous()
        return grad_matrix, grad_weight


def channel_compress(matrix: torch.Tensor, read_weight: torch.Tensor, use_fast_path: bool = True) -> torch.Tensor:
    """The channel compressor (same result as `channel_compress_reference`).

    `matrix` (..., d, d_v), `read_weight` (d, d_v) -> (..., d), in the promoted dtype of the two.
    """
    if not _fast(use_fast_path):
        return channel_compress_reference(matrix, read_weight)
    *leading, d, d_v = matrix.shape
    dtype = torch.promote_types(matrix.dtype, read_weight.dtype)
    flat, weight = matrix.reshape(-1, d, d_v).to(dtype), read_weight.to(dtype)
    if _needs_autograd(flat, weight):
        return _ChannelCompress.apply(flat, weight).view(*leading, d)
    return _column_read(flat, weight).view(*leading, d)


def channel_read_after_write_reference(
    read: torch.Tensor, h: torch.Tensor, write: torch.Tensor, read_weight: torch.Tensor
) -> torch.Tensor:
    """Plain reference of `channel_read_after_write`: read + h * (w W^T), computed in fp32, in `read.dtype`."""
    update = upcast(h) * F.linear(upcast(write), upcast(read_weight))
    return (upcast(read) + update).to(read.dtype)


class _ChannelReadAfterWrite(torch.autograd.Function):
    """read + h * (w W^T) on flat (N, d), (N, d), (N, d_v), (d, d_v); backward recomputes the (N, d)
    product w W^T from the small w instead of keeping it."""

    @staticmethod
    def forward(ctx, read, h, write, read_weight):
        with _full_precision(read):
            new_read = channel_read_after_write_reference(read, h, write, read_weight)
        ctx.dtypes = (read.dtype, h.dtype, write.dtype, read_weight.dtype)
        ctx.save_for_backward(h, write, read_weight)
        return new_read

    @staticmethod
    def backward(ctx, grad_read):
        _refuse_double_backward("channel_read_after_write")
        h, write, read_weight = ctx.saved_tensors
        read_dtype, h_dtype, write_dtype, weight_dtype = ctx.dtypes
        with _full_precision(grad_read):
            grad, weight = upcast(grad_read), upcast(read_weight)
            grad_h = (grad * F.linear(upcast(write), weight)).to(h_dtype)
            grad_update = grad * upcast(h)  # dL/d(w W^T), (N, d)
            grad_write = (grad_update @ weight).to(write_dtype)
            grad_weight = (grad_update.t() @ upcast(write)).to(weight_dtype)
        return grad_read.to(read_dtype), grad_h, grad_write, grad_weight


def channel_read_after_write(
    read: torch.Tensor, h: torch.Tensor, write: torch.Tensor, read_weight: torch.Tensor, use_fast_path: bool = True
) -> torch.Tensor:
    """The channel compressor's read of X + h w^T from its read of X, without X:
    `sum_j W[i, j] (X[i, j] + h[i] w[j]) = read[i] + h[i] (W w)[i]`.

    `read` (..., d), `h` (..., d), `write` (..., d_v), `read_weight` W (d, d_v) -> (..., d) in
    `read.dtype`, computed in fp32. The fast path keeps only h, w and W for backward.
    """
    if not _fast(use_fast_path):
        return channel_read_after_write_reference(read, h, write, read_weight)
    if not _needs_autograd(read, h, write, read_weight):
        # In fp32 under autocast too, as `_ChannelReadAfterWrite` computes it: the same bits in either grad mode.
        with _full_precision(read):
            return channel_read_after_write_reference(read, h, write, read_weight)
    d, d_v = read_weight.shape
    flat = (read.reshape(-1, d), h.reshape(-1, d), write.reshape(-1, d_v))
    return _ChannelReadAfterWrite.apply(*flat, read_weight).view(read.shape)


def channel_compress_after_write(
    new_matrix: torch.Tensor,
    read: torch.Tensor,
    h: torch.Tensor,
    write: torch.Tensor,
    read_weight: torch.Tensor,
    use_fast_path: bool = True,
) -> torch.Tensor:
    """The channel compressor's read of the new state X' = X + h w^T, given its read of X.

    `new_matrix` X' (..., d, d_v), `read` (..., d), `h` (..., d), `write` (..., d_v), `read_weight`
    W (d, d_v) -> (..., d) in `read.dtype`. The reference compresses X' (`channel_compress_reference`);
    the fast path never touches X' (`channel_read_after_write`), so nothing keeps X' for backward.
    """
    if not _fast(use_fast_path):
        return channel_compress_reference(new_matrix, read_weight).to(read.dtype)
    return channel_read_after_write(read, h, write, read_weight)


# --------------------------------------------------------------------------- token convolutions
def document_tap_mask(document_positions: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Which taps of a causal convolution stay inside each token's document: (B, T) -> (B, T, K) bool.

    `document_positions[b, t]` is token t's index in its document (0 where a document starts, as in a packed
    row; `DDLModel.forward` derives it from `position_ids`). Tap k reads the token K - 1 - k steps back, which
    lies in the same document iff that many steps do not exceed the token's index.
    """
    lags = torch.arange(kernel_size - 1, -1, -1, device=document_positions.device)
    return document_positions.unsqueeze(-1) >= lags


def token_conv_reference(
    x: torch.Tensor, weight: torch.Tensor, padding: int = 0, tap_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain reference of `token_conv`: pad, transpose to (B, C, T) and run `F.conv1d`; with a `tap_mask`, one
    single-tap convolution per tap, each kept where the mask allows."""
    groups = x.shape[-1] // weight.shape[1]
    x = F.pad(x, (0, 0, padding, 0)).transpose(1, 2)
    if tap_mask is None:
        return F.conv1d(x, weight, groups=groups).transpose(1, 2)
    kernel = weight.shape[-1]
    tokens = x.shape[-1] - kernel + 1
    out = 0
    for k in range(kernel):
        tap = F.conv1d(x[..., k : k + tokens], weight[..., k : k + 1], groups=groups).transpose(1, 2)
        out = out + tap * tap_mask[..., k : k + 1]
    return out


# At most this many output tokens (batch x time), `token_conv` multiplies the windows directly: a
# decoding step costs a few small products instead of a convolution call.
_FEW_TOKENS = 16


def _few_token_conv(
    x: torch.Tensor, weight: torch.Tensor, groups: int, tap_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Valid grouped convolution over tokens as one product of the sliding windows: (B, T', C_in) -> (B, T, C_out);
    `tap_mask` (B, T, K) drops the taps where it is False."""
    kernel = weight.shape[-1]
    windows = x.unfold(1, kernel, 1)  # (B, T, C_in, K)
    if tap_mask is not None:
        windows = windows * tap_mask.unsqueeze(2)
    batch, tokens = windows.shape[:2]
    per_group_in, per_group_out = weight.shape[1], weight.shape[0] // groups
    windows = windows.reshape(batch, tokens, groups, per_group_in, kernel)
    out = torch.einsum("btgck,gock->btgo", windows, weight.view(groups, per_group_out, per_group_in, kernel))
    return out.reshape(batch, tokens, groups * per_group_out)


def token_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    padding: int = 0,
    use_fast_path: bool = True,
    tap_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped causal convolution over tokens, on token-major tensors.

    Args:
        x: (B, T_in, C_in) inputs.
        weight: (C_out, C_in / groups, K) with groups = C_in / weight.shape[1]; output channel o
            reads the inputs of group o // (C_out / groups), as in `F.conv1d`.
        padding: zero tokens assumed before x (at most K - 1); the first K - 1 - padding tokens
            of x are left context only.
        tap_mask: (B, T', K) bool or None; False drops tap k of output t (which reads input
            t + k - padding): packed documents (`document_tap_mask`). The fast path then multiplies
            the masked windows, as for a few tokens.

    Returns:
        (B, T_in + padding - K + 1, C_out).

    The fast path views x as a channels-last (B, C_in, 1, T_in) image, so the convolution reads
    and writes the (B, T, C) memory directly, and it pads whichever side is narrower: the input
    when C_in <= C_out, else (the folded token compressor) both ends of the convolution, dropping
    the outputs of the right padding. The reference transposes to (B, C, T).
    """
    if not _fast(use_fast_path):
        return token_conv_reference(x, weight, padding, tap_mask)
    groups = x.shape[-1] // weight.shape[1]
    if tap_mask is not None or x.shape[0] * (x.shape[1] + padding - weight.shape[-1] + 1) <= _FEW_TOKENS:
        return _few_token_conv(F.pad(x, (0, 0, padding, 0)) if padding else x, weight, groups, tap_mask)
    pad_input = padding > 0 and x.shape[-1] <= weight.shape[0]
    if pad_input:
        x = F.pad(x, (0, 0, padding, 0))
    image = x.unsqueeze(1).permute(0, 3, 1, 2)  # (B, C_in, 1, T_in), strides of (B, 1, T_in, C_in)
    conv_padding = 0 if pad_input else padding
    # A reshape (a view), not `unsqueeze(2)`: the channels-last convolution returns its weight gradient with stride
    # 1 on the size-1 dims, which `unsqueeze`'s backward (a squeeze) keeps, while a view's backward reshapes it to the
    # weight's own strides, so that DDP's bucket views match the gradients (no copy and no warning per step).
    filters = weight.reshape(weight.shape[0], weight.shape[1], 1, weight.shape[2])  # (C_out, C_in / groups, 1, K)
    out = F.conv2d(image, filters, padding=(0, conv_padding), groups=groups)  # (B, C_out, 1, T')
    out = out.squeeze(2).transpose(1, 2)
    return out[:, : out.shape[1] - conv_padding] if conv_padding else out


def _feature_major(x: torch.Tensor, d: int, d_v: int) -> torch.Tensor:
    """A value-major flat state (..., d_v * d) as the feature-major (..., d * d_v) copy (`X[i, j]` at `i * d_v + j`)."""
    return x.unflatten(-1, (d_v, d)).transpose(-1, -2).flatten(-2)


def token_compress_reference(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    read_weight: torch.Tensor,
    padding: int = 0,
    tap_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain reference of `token_compress`: filter every channel over tokens, then the channel read."""
    d, d_v = read_weight.shape
    filtered = token_conv_reference(_feature_major(x, d, d_v), conv_weight, padding, tap_mask)
    return channel_compress_reference(filtered.unflatten(-1, (d, d_v)), read_weight)


def _folded_conv(x: torch.Tensor, taps: torch.Tensor, padding: int) -> torch.Tensor:
    """(B, T_in, d_v * d) value major, taps (K, d_v, d) -> (B, T_in + padding - K + 1, d): the state read as a
    channels-last (B, d, T_in, d_v) image (exactly its memory) by one depthwise (K, d_v) convolution."""
    d_v, d = taps.shape[1:]
    image = x.unflatten(-1, (d_v, d)).permute(0, 3, 1, 2)  # (B, d, T_in, d_v), strides of (B, T_in, d_v, d)
    filters = taps.permute(2, 0, 1).unsqueeze(1)  # (d, 1, K, d_v)
    # Padding both ends of the token axis (not a padded copy of the state); the right end's outputs are dropped.
    out = F.conv2d(image, filters, padding=(padding, 0), groups=d).squeeze(-1)  # (B, d, T')
    out = out[..., : out.shape[-1] - padding] if padding else out
    return out.transpose(1, 2)


def _masked_folded_conv(x: torch.Tensor, taps: torch.Tensor, padding: int, tap_mask: torch.Tensor) -> torch.Tensor:
    """`_folded_conv` with the taps that `tap_mask` (B, T', K) drops left out (packed documents): the kept taps'
    shifted products of the state summed, one pass over (B, T', d_v, d) each. (B, T_in, d_v * d) -> (B, T', d)."""
    kernel, d_v, d = taps.shape
    x = F.pad(x, (0, 0, padding, 0)).unflatten(-1, (d_v, d))
    out_tokens = x.shape[1] - kernel + 1
    out = 0
    for k in range(kernel):
        out = out + (x[:, k : k + out_tokens] * taps[k]).sum(-2) * tap_mask[..., k : k + 1]
    return out


def _shifted_windows(kernel: int, padding: int, out_tokens: int) -> Iterator[tuple[int, slice, slice]]:
    """(k, outputs, inputs) for each tap k of a causal convolution with `padding` zero tokens before its input:
    output token t reads input token t + k - padding, for the outputs whose input is a real token."""
    for k in range(kernel):
        first = max(0, padding - k)
        if first < out_tokens:
            start = first + k - padding
            yield k, slice(first, out_tokens), slice(start, start + out_tokens - first)


def _token_compress_backward(
    x: torch.Tensor, taps: torch.Tensor, grad_out: torch.Tensor, padding: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `_folded_conv(x, taps, padding)` for x (B, T_in, d_v * d) and taps (K, d_v, d), given
    grad_out (B, T', d): out[b, t, i] = sum_{j, k} F[k, j, i] X[b, t + k - padding, j, i] gives

        dL/dX[b, s, j, i] = sum_k F[k, j, i] g[b, s + padding - k, i]
        dL/dF[k, j, i]    = sum_{b, t} g[b, t, i] X[b, t + k - padding, j, i]

    as K shifted products along d, each state-sized result value major (no layout change), instead of
    the convolution's backward (which, under inductor, gets channels-first copies of the state)."""
    (kernel, d_v, d), batch, tokens_in = taps.shape, x.shape[0], x.shape[1]
    state = x.view(batch, tokens_in, d_v, d)
    grad = grad_out.unsqueeze(2)  # (B, T', 1, d)
    grad_x = torch.zeros_like(state)  # (B, T_in, d_v, d), value major
    grad_taps = torch.zeros_like(taps)
    for k, outputs, inputs in _shifted_windows(kernel, padding, grad_out.shape[1]):
        grad_x[:, inputs].addcmul_(grad[:, outputs], taps[k])
        grad_taps[k] = (state[:, inputs] * grad[:, outputs]).sum((0, 1))  # (d_v, d)
    return grad_x.view_as(x), grad_taps


# The token compressor under autograd is a pair of custom operators (forward, backward): the compiler
# calls them whole, as it calls a convolution, instead of tracing into them. Traced, inductor recomputed the
# folded filters inside the backward's loops and fused the filter reductions with the pass that writes the
# state's gradient, which made TC training 5 to 8% slower compiled (mini, fp32, this CPU). The namespace
# follows the module's name, so that this file loaded as remote code beside the installed package registers
# its own operators.
_OPS_NAMESPACE = "ddl_hf_ops_" + "".join(c if c.isalnum() else "_" for c in __name__)


@torch.library.custom_op(f"{_OPS_NAMESPACE}::token_compress", mutates_args=())
def _token_compress_op(x: torch.Tensor, taps: torch.Tensor, padding: int) -> torch.Tensor:
    """`_folded_conv` as an operator: x (B, T_in, d_v * d) contiguous, taps (K, d_v, d) -> (B, T', d) contiguous, in
    x's dtype on every device (autocast off inside: under autocast the caller casts the inputs first)."""
    with _full_precision(x):
        return _folded_conv(x, taps, padding).contiguous()


@_token_compress_op.register_fake
def _(x: torch.Tensor, taps: torch.Tensor, padding: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1] + padding - taps.shape[0] + 1, taps.shape[-1])


@torch.library.custom_op(f"{_OPS_NAMESPACE}::token_compress_backward", mutates_args=())
def _token_compress_backward_op(
    x: torch.Tensor, taps: torch.Tensor, grad_out: torch.Tensor, padding: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_token_compress_backward` as an operator (contiguous results, in the dtypes of x and taps)."""
    with _full_precision(x):
        grad_x, grad_taps = _token_compress_backward(x, taps, grad_out, padding)
    return grad_x.contiguous(), grad_taps.contiguous()


@_token_compress_backward_op.register_fake
def _(x: torch.Tensor, taps: torch.Tensor, grad_out: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Contiguous whatever the inputs' strides, as the real results are (`empty_like` would keep the strides).
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        taps, memory_format=torch.contiguous_format
    )


def _token_compress_setup(ctx, inputs, output) -> None:
    x, taps, padding = inputs
    ctx.padding = padding
    ctx.save_for_backward(x, taps)


def _token_compress_grad(ctx, grad_out):
    _refuse_double_backward("token_compress")
    x, taps = ctx.saved_tensors
    grad_x, grad_taps = _token_compress_backward_op(x, taps, grad_out.contiguous(), ctx.padding)
    return grad_x, grad_taps, None


_token_compress_op.register_autograd(_token_compress_grad, setup_context=_token_compress_setup)


def _folded_taps(conv_weight: torch.Tensor, read_weight: torch.Tensor) -> torch.Tensor:
    """The filters and the read folded into taps F (K, d_v, d), F[k, j, i] = W[i, j] f_ij[k]: value major like the
    state, so that every pass over them runs along d."""
    (d, d_v), kernel = read_weight.shape, conv_weight.shape[-1]
    return (conv_weight.view(d, d_v, kernel) * read_weight.unsqueeze(-1)).permute(2, 1, 0).contiguous()


def token_compress(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    read_weight: torch.Tensor,
    padding: int = 0,
    use_fast_path: bool = True,
    tap_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The token compressor: a causal depthwise convolution over tokens, then the channel read.

    Args:
        x: (B, T_in, d_v * d) the state, value major (`X[:, :, i, j]` at channel `j * d + i`).
        conv_weight: (d * d_v, 1, K) one filter per state channel, the filter of `X[i, j]` at row
            `i * d_v + j` (the parameter's layout).
        read_weight: (d, d_v) the read W over each feature's d_v filtered values.
        padding: zero tokens assumed before x, as in `token_conv`.
        tap_mask: (B, T', K) bool or None, as in `token_conv`: packed documents. The fast path then sums
            the kept taps, one shifted pass over the state each.

    Returns:
        (B, T_in + padding - K + 1, d): `x_in[i] = sum_j W[i, j] (f_ij * X[:, i, j])`.

    The fast path folds the read into the filters, F[k, j, i] = W[i, j] f_ij[k]: one depthwise
    convolution with (K, d_v) kernels reads the state once and writes only (B, T, d)
    (`_token_compress_op`); the few tokens of a decoding step take one product of their windows.
    """
    if not _fast(use_fast_path):
        return token_compress_reference(x, conv_weight, read_weight, padding, tap_mask)
    taps = _folded_taps(conv_weight, read_weight)
    (d, d_v), kernel = read_weight.shape, taps.shape[0]
    batch, tokens = x.shape[:2]
    if tap_mask is not None:
        # Summed in fp32 and rounded once, as the convolutions accumulate, so that a packed row of a bf16 model
        # rounds like its documents run alone.
        return _masked_folded_conv(upcast(x), upcast(taps), padding, tap_mask).to(x.dtype)
    # Under autocast, the inputs in the autocast dtype (as the convolution of the reference gets them), then every
    # branch with autocast off: the autograd, inference and compiled paths agree on the dtype on every device.
    x, taps = _as_autocast_convolution_inputs(x, taps)
    with _full_precision(x):
        if batch * (tokens + padding - kernel + 1) <= _FEW_TOKENS:
            x = F.pad(x, (0, 0, padding, 0)) if padding else x
            windows = x.unfold(1, kernel, 1).unflatten(2, (d_v, d))  # (B, T, d_v, d, K)
            return torch.einsum("btjik,kji->bti", windows, taps)
        if _needs_autograd(x, taps):
            return _token_compress_op(x.contiguous(), taps, padding)
        return _folded_conv(x, taps, padding)


# --------------------------------------------------------------------------- the token compressor after a write
def token_read_after_write_reference(
    read: torch.Tensor,
    h: torch.Tensor,
    write: torch.Tensor,
    conv_weight: torch.Tensor,
    read_weight: torch.Tensor,
    padding: int = 0,
    tap_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain reference of `token_read_after_write`: the token compressor of the materialized write h w^T, added
    to `read`, in fp32, returned in `read.dtype`."""
    written = (upcast(write).unsqueeze(-1) * upcast(h).unsqueeze(-2)).flatten(-2)  # (B, T, d_v * d), value major
    update = token_compress_reference(written, upcast(conv_weight), upcast(read_weight), padding, tap_mask)
    return (upcast(read) + update).to(read.dtype)


def _taps_by_value(taps: torch.Tensor) -> torch.Tensor:
    """The taps F (K, d_v, d) as the (d_v, K * d) matrix that maps a write w to every tap's filter of it."""
    kernel, d_v, d = taps.shape
    return taps.transpose(0, 1).reshape(d_v, kernel * d)


def _write_taps(write: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """u[b, s, k, i] = sum_j F[k, j, i] w[b, s, j]: (B, T, d_v), (K, d_v, d) -> (B, T, K, d), one product."""
    kernel, _, d = taps.shape
    return (write @ _taps_by_value(taps)).unflatten(-1, (kernel, d))


def _token_write_read(
    h: torch.Tensor, write: torch.Tensor, taps: torch.Tensor, padding: int, tap_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The folded convolution of the write h w^T without materializing it: (B, T_in, d), (B, T_in, d_v), taps
    (K, d_v, d) -> (B, T_in + padding - K + 1, d), out[t, i] = sum_k h[s, i] u[s, k, i] with s = t + k - padding;
    `tap_mask` (B, T', K) drops taps (packed documents), under autograd through the in-place sums."""
    kernel, out_tokens = taps.shape[0], h.shape[1] + padding - taps.shape[0] + 1
    per_tap = _write_taps(write, taps)
    out = h.new_zeros(h.shape[0], out_tokens, h.shape[-1])
    for k, outputs, inputs in _shifted_windows(kernel, padding, out_tokens):
        tap = per_tap[:, inputs, k]
        if tap_mask is not None:  # packed documents: the same sums with the dropped taps' terms made exact zeros
            tap = tap * tap_mask[:, outputs, k : k + 1]
        out[:, outputs].addcmul_(h[:, inputs], tap)
    return out


class _TokenReadAfterWrite(torch.autograd.Function):
    """read + the folded convolution of h w^T, on fp32 read (B, T', d), h (B, T_in, d), w (B, T_in, d_v) and taps
    F (K, d_v, d). With g = dL/dout and u as in `_write_taps`, dy[s, k] = g[s + padding - k] gives

        dL/dh = sum_k dy[:, k] u[:, k],   du = dy h,   dL/dw = du F^T,   dL/dF = w^T du

    Keeps h, w and F (h is what the Delta update keeps anyway); u (K times the size of h) is recomputed.
    """

    @staticmethod
    def forward(ctx, read, h, write, taps, padding: int):
        ctx.padding = padding
        ctx.save_for_backward(h, write, taps)
        return read + _token_write_read(h, write, taps, padding)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward("token_read_after_write")
        h, write, taps = ctx.saved_tensors
        (kernel, d_v, d), out_tokens = taps.shape, grad_out.shape[1]
        per_tap = _write_taps(write, taps)
        grad_h = torch.zeros_like(h)
        grad_per_tap = torch.zeros_like(per_tap)
        for k, outputs, inputs in _shifted_windows(kernel, padding=ctx.padding, out_tokens=out_tokens):
            grad_h[:, inputs].addcmul_(grad_out[:, outputs], per_tap[:, inputs, k])
            grad_per_tap[:, inputs, k] = grad_out[:, outputs] * h[:, inputs]
        grad_per_tap = grad_per_tap.flatten(-2)  # (B, T_in, K * d)
        grad_write = grad_per_tap @ _taps_by_value(taps).t()
        grad_taps = (write.flatten(0, 1).t() @ grad_per_tap.flatten(0, 1)).view(d_v, kernel, d).transpose(0, 1)
        return grad_out, grad_h, grad_write, grad_taps, None


def token_read_after_write(
    read: torch.Tensor,
    h: torch.Tensor,
    write: torch.Tensor,
    conv_weight: torch.Tensor,
    read_weight: torch.Tensor,
    padding: int = 0,
    use_fast_path: bool = True,
    tap_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The token compressor's read of X + h w^T from its read of X, without X.

    The compressor is linear in the state, so its read of the new state is `read` plus its read of the
    write h w^T: `out[t, i] = read[t, i] + sum_k h[s, i] sum_j F[k, j, i] w[s, j]` (s = t + k - padding,
    F the folded taps of `token_compress`), a pass over width-d tensors instead of over the state, which
    also need not be kept for backward.

    Args:
        read: (B, T', d) the compressor's read of X (`token_compress` with the same padding).
        h: (B, T_in, d) the written direction (the sublayer output).
        write: (B, T_in, d_v) the write w of `delta_update(..., return_write=True)`.
        conv_weight, read_weight, padding, tap_mask: as in `token_compress`.

    Returns:
        (B, T', d) in `read.dtype`, T' = T_in + padding - K + 1, computed in fp32.
    """
    if not _fast(use_fast_path):
        return token_read_after_write_reference(read, h, write, conv_weight, read_weight, padding, tap_mask)
    taps = upcast(_folded_taps(conv_weight, read_weight))
    inputs = (upcast(read), upcast(h), upcast(write), taps)
    with _full_precision(read):  # fp32 under autocast too (the product of the write and the taps)
        if tap_mask is not None:
            # The unmasked sums' own arithmetic (a dropped tap adds an exact zero), so that a packed row rounds
            # exactly like its documents run alone; autograd differentiates the in-place sums.
            return (inputs[0] + _token_write_read(*inputs[1:], padding, tap_mask)).to(read.dtype)
        if _needs_autograd(*inputs):
            return _TokenReadAfterWrite.apply(*inputs, padding).to(read.dtype)
        return (inputs[0] + _token_write_read(*inputs[1:], padding)).to(read.dtype)


def token_compress_after_write(
    new_state: torch.Tensor,
    read: torch.Tensor,
    h: torch.Tensor,
    write: torch.Tensor,
    conv_weight: torch.Tensor,
    read_weight: torch.Tensor,
    padding: int = 0,
    use_fast_path: bool = True,
    tap_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The token compressor's read of the new state X' = X + h w^T, given its read of X.

    `new_state` X' (B, T_in, d_v * d) value major, the rest as in `token_read_after_write` -> (B, T', d) in
    `read.dtype`. The reference compresses X' (`token_compress_reference`); the fast path never touches X'
    (`token_read_after_write`), so nothing keeps X' for backward.
    """
    if not _fast(use_fast_path):
        return token_compress_reference(new_state, conv_weight, read_weight, padding, tap_mask).to(read.dtype)
    return token_read_after_write(read, h, write, conv_weight, read_weight, padding, tap_mask=tap_mask)


__all__ = [
    "unit_direction",
    "upcast",
    "delta_update_reference",
    "delta_update",
    "channel_compress_reference",
    "channel_compress",
    "channel_read_after_write_reference",
    "channel_read_after_write",
    "channel_compress_after_write",
    "document_tap_mask",
    "token_conv_reference",
    "token_conv",
    "token_compress_reference",
    "token_compress",
    "token_read_after_write_reference",
    "token_read_after_write",
    "token_compress_after_write",
    "fast_paths_enabled",
    "reference_paths",
    "apply_write",
    "StateLedger",
    "recomputed_states",
]
