"""What the DDL forward returns: the output dataclasses, and the identity modules that mark the tensors
`output_hidden_states` and `output_residual_states` record (`DDLPreTrainedModel._can_record_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


class DDLStateRead(nn.Module):
    """Marks the width-d read of the residual state that a block (or the final norm) takes. Identity.

    `output_hidden_states` records what these modules return: `DDLDecoderLayer.state_read` passes the
    block's attention input (its compressor's read of the state, the state itself when d_v = 1) and
    `DDLModel.final_read` the readout before the final norm. The read is computed anyway, so recording
    it costs nothing and touches no cache.
    """

    def forward(self, read: torch.Tensor) -> torch.Tensor:
        return read


class DDLInitialState(nn.Module):
    """Marks the initial residual state (the expanded embeddings), the first entry that
    `output_residual_states` records; the blocks' outputs follow. Identity."""

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return state


@dataclass
class DDLModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    residual_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_residual_states=True`):
        The full residual states, `num_hidden_layers + 1` tensors of shape (batch, seq_len, d_v * d)
        (value major: `X[i, j]` at `j * d + i`; `state_matrix(state, d, d_v)` gives the (d, d_v) view):
        entry 0 the initial state (the expanded embeddings), entry i the state after block i. The last entry is
        the state itself, not the normalized readout.
    """

    residual_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DDLCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    residual_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_residual_states=True`):
        The full (batch, seq_len, d_v * d) residual states; see `DDLModelOutputWithPast`.
    """

    residual_states: tuple[torch.FloatTensor, ...] | None = None


__all__ = ["DDLStateRead", "DDLInitialState", "DDLModelOutputWithPast", "DDLCausalLMOutputWithPast"]
