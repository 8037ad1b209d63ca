"""The ValueErrors for malformed inputs that `DDLModel.forward` and `DDLForCausalLM.forward` raise before any
embedding lookup, indexing or loss can fail on them, with the field's name and what it allows.

None of them synchronises with the host: shapes, dtypes and the cache's batch come from metadata, and values
are read only where that is free (`_values_are_free`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .configuration_ddl import DDLConfig


def check_model_inputs(
    config: DDLConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor | None = None,
) -> None:
    """Clear ValueErrors for malformed backbone inputs: `input_ids` (B, T) or `inputs_embeds` (B, T, d), a
    (B, past + T) or (B, 1 or heads, T, kv_len) `attention_mask`, (B or 1, T) `position_ids`, a `cache` of batch B.

    The id range, and the mask length against a static cache's tensor length, are checked only where that is
    free (eager, CPU tensors)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("DDLModel.forward needs exactly one of `input_ids` or `inputs_embeds`")
    tokens = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()):
        raise ValueError(f"`input_ids` must be an integer tensor of token ids, got dtype {input_ids.dtype}")
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size):
        raise ValueError(
            f"`inputs_embeds` must have shape (batch, seq_len, {config.hidden_size}), got {tuple(inputs_embeds.shape)}"
        )
    batch, length = tokens.shape[:2]
    if length == 0 or batch == 0:
        raise ValueError(f"empty input: `input_ids`/`inputs_embeds` has shape {tuple(tokens.shape)}")
    # Value checks only where reading the values is free (see `_values_are_free`); on an accelerator an
    # out-of-range id stops the embedding lookup with a device-side assert instead.
    if input_ids is not None and _values_are_free(input_ids):
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"`input_ids` must lie in [0, vocab_size={config.vocab_size}), got values in [{low}, {high}]"
            )
    cached_batch = _cache_batch_size(cache) if cache is not None else None
    if cached_batch is not None and cached_batch != batch:
        raise ValueError(f"`cache` holds a batch of {cached_batch} sequences but the input has batch {batch}")
    past = _past_length(cache)
    if (
        past is not None
        and attention_mask is not None
        and attention_mask.dim() == 2
        and attention_mask.shape != (batch, past + length)
    ):
        raise ValueError(
            f"`attention_mask` must have shape (batch, past + seq_len) = ({batch}, {past + length}), "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask is not None and attention_mask.dim() not in (2, 4):
        raise ValueError(
            "`attention_mask` must be a (batch, past + seq_len) padding mask or a (batch, 1, seq_len, kv_len) "
            f"mask, got shape {tuple(attention_mask.shape)}"
        )
    if (
        attention_mask is not None
        and attention_mask.dim() == 4
        and (attention_mask.shape[0] != batch or attention_mask.shape[2] != length)
    ):
        raise ValueError(
            f"a 4D `attention_mask` must have shape ({batch}, 1 or heads, {length}, kv_len), "
            f"got {tuple(attention_mask.shape)}"
        )
    if position_ids is not None and (
        position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length
    ):
        raise ValueError(f"`position_ids` must have shape ({batch} or 1, {length}), got {tuple(position_ids.shape)}")


def _values_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading `tensor`'s values costs no host synchronisation: eager (not under `torch.compile`,
    where it would break the graph) and on the CPU (on an accelerator it would stall the device queue)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _past_length(cache: Cache | None) -> int | None:
    """Tokens held by `cache` as a Python int; None when only a tensor that is not free to read knows it
    (a static cache on an accelerator, or under `torch.compile`)."""
    if cache is None:
        return 0
    past = cache.get_seq_length()
    if isinstance(past, torch.Tensor):
        return int(past) if _values_are_free(past) else None
    return past


def check_labels(
    labels: torch.Tensor,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    vocab_size: int,
    ignore_index: int,
) -> None:
    """Labels (B, T) must have the inputs' shape and be token ids or `ignore_index`: cross-entropy would
    otherwise fail on an index error. The shape and dtype are always checked; the values only where that is
    free (`_values_are_free`): on an accelerator an out-of-range label stops cross-entropy with a device-side
    assert instead."""
    reference = input_ids if input_ids is not None else inputs_embeds
    if reference is not None and labels.shape != reference.shape[:2]:
        raise ValueError(
            f"`labels` must have the shape of the inputs {tuple(reference.shape[:2])}, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"`labels` must be an integer tensor of token ids, got dtype {labels.dtype}")
    if not _values_are_free(labels):
        return
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(invalid.any()):
        raise ValueError(
            f"`labels` must be token ids in [0, vocab_size={vocab_size}) or {ignore_index} (no loss), "
            f"got {int(labels[invalid][0])}"
        )


def _cache_batch_size(cache: Cache) -> int | None:
    """The batch of the cached keys, from their shape (no host synchronisation); None while nothing is cached."""
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.numel() > 0:
            return keys.shape[0]
    return None


__all__ = ["check_model_inputs", "check_labels"]
