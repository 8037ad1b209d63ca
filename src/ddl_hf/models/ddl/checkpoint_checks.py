"""Checks that keep `from_pretrained` from returning a silently wrong DDL model.

transformers only logs missing or unexpected weights and fails deep inside safetensors on a damaged
file. `DDLPreTrainedModel.from_pretrained` uses these helpers to name the file and the weights
instead, and to give a reloaded model the same bits as the model that was saved.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import torch
from torch import nn

# safetensors: an 8-byte little-endian header length, a JSON header, then the tensor bytes.
_HEADER_LENGTH_BYTES = 8


def safetensors_problem(path: str) -> str | None:
    """Why the safetensors file at `path` cannot hold what its header promises, or None if it can.

    Reads only the header: a truncated download or an interrupted copy leaves a file shorter than
    the largest data offset its header lists.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(_HEADER_LENGTH_BYTES)
        if len(prefix) < _HEADER_LENGTH_BYTES:
            return f"{size} bytes, shorter than the {_HEADER_LENGTH_BYTES}-byte header length"
        (header_length,) = struct.unpack("<Q", prefix)
        if _HEADER_LENGTH_BYTES + header_length > size:
            return f"header of {header_length} bytes announced, the file has {size} bytes"
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"unreadable header ({error})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    data_end = max(
        (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
        default=0,
    )
    if _HEADER_LENGTH_BYTES + header_length + data_end > size:
        return f"{size} bytes, the header lists tensors up to byte {_HEADER_LENGTH_BYTES + header_length + data_end}"
    return None


def check_safetensors_files(pretrained_model_name_or_path, subfolder: str = "") -> None:
    """Raise a `ValueError` naming the first safetensors file of a local checkpoint folder that is damaged."""
    if pretrained_model_name_or_path is None:
        return
    folder = os.path.join(str(pretrained_model_name_or_path), subfolder)
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        problem = safetensors_problem(path)
        if problem is not None:
            raise ValueError(
                f"{path}: cannot read the safetensors weights ({problem}); the file is truncated or corrupt, "
                "save or download it again"
            )


def weights_source(pretrained_model_name_or_path, subfolder: str = "") -> str:
    """The weights file (or index) of a local checkpoint folder, else a description of the source."""
    if pretrained_model_name_or_path is None:
        return "the given state_dict"
    folder = os.path.join(str(pretrained_model_name_or_path), subfolder)
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return f"checkpoint {str(pretrained_model_name_or_path)!r}"


def loading_problems(
    loading_info: dict, allow_mismatched: bool, allowed_missing_prefixes: tuple[str, ...] = (), shown: int = 8
) -> list[str]:
    """Human-readable lines for every weight the checkpoint failed to provide exactly; missing weights whose
    names start with one of `allowed_missing_prefixes` (a task head) are not problems."""

    def listing(keys: list[str]) -> str:
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return ", ".join(keys[:shown]) + more

    problems = []
    missing = sorted(
        key for key in loading_info.get("missing_keys", ()) if not key.startswith(allowed_missing_prefixes)
    )
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the file: {listing(missing)}")
    unexpected = sorted(loading_info.get("unexpected_keys", ()))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s) in the file: {listing(unexpected)}")
    mismatched = sorted(loading_info.get("mismatched_keys", ()))
    if mismatched and not allow_mismatched:
        shapes = [f"{key} (file {tuple(saved)} vs model {tuple(expected)})" for key, saved, expected in mismatched]
        problems.append(f"{len(mismatched)} weight(s) with a different shape: {listing(shapes)}")
    problems += [str(message) for message in loading_info.get("error_msgs", ())]
    return problems


def check_loaded_weights(
    model: nn.Module, loading_info: dict, allow_mismatched: bool, pretrained_model_name_or_path, subfolder: str = ""
) -> None:
    """Raise a `ValueError` naming the weights file when the DDL backbone of the loaded `model` is not exactly
    the checkpoint's: missing, unexpected or (unless `allow_mismatched`) reshaped weights. Missing weights of a
    task head (any child module of a head class other than the backbone) are allowed: transformers initialises
    and reports them."""
    head_prefixes = () if model.base_model is model else tuple(f"{name}." for name, _ in model.named_children())
    head_prefixes = tuple(prefix for prefix in head_prefixes if prefix != f"{model.base_model_prefix}.")
    problems = loading_problems(loading_info, allow_mismatched, allowed_missing_prefixes=head_prefixes)
    if problems:
        config = model.config
        raise ValueError(
            f"{weights_source(pretrained_model_name_or_path, subfolder)} does not match the {type(model).__name__} "
            f"its config.json describes ({config.variant_name}, hidden_size={config.hidden_size}, "
            f"value_channels={config.value_channels}): "
            + "; ".join(problems)
            + ". Refusing to return a partly initialized model: config.json and the weights must come from "
            "the same save_pretrained call."
        )


def align_cpu_tensors(model: nn.Module, alignment: int = 64) -> None:
    """Copy CPU parameters and buffers that start off an `alignment`-byte boundary into fresh memory.

    Weights loaded from a safetensors file sit at arbitrary offsets of the memory-mapped file. CPU
    kernels pick their vector loops by the address of their operands, so a reloaded model would compute
    results that differ in the last bits from the model that was saved; fresh allocations are aligned.
    """
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type == "cpu" and tensor.numel() > 0 and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()
