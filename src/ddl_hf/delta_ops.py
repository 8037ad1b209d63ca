"""The Delta rewrite of a residual state, as plain tensor functions.

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
"""

from __future__ import annotations

import torch


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


__all__ = ["unit_direction", "delta_update_reference"]
