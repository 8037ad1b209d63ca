"""Checks that keep `from_pretrained` from returning a silently wrong DDL model.

`DDLPreTrainedModel.from_pretrained` follows transformers' conventions (missing weights initialized and
reported, a shape mismatch a RuntimeError) and uses these helpers on top: a damaged safetensors file is
named before loading; missing DDL weights, a missing untied LM head and a config.json of another model
type get a warning of their own that names them; `strict=True` makes any missing, unexpected or
mismatched weight a ValueError naming the file. `align_cpu_tensors` gives a reloaded model the same bits
as the model that was saved.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Where a DDL backbone keeps its DDL modules (`DDLDecoderLayer.compressor`, `.attn_shortcut`, `.mlp_shortcut`;
# `DDLModel.readout`, `.embed_expansion`): a weight of the file under one of these names that the model has no place
# for is a DDL weight that its config does not describe.
DDL_MODULE_NAMES = ("compressor", "attn_shortcut", "mlp_shortcut", "readout", "embed_expansion")

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


def compact_keys(keys) -> str:
    """The keys as one comma-separated list, those that differ only in one index merged as transformers' loading
    report does: `model.layers.{0, 1}.attn_shortcut.beta_proj.weight`."""
    groups: dict[tuple, list[int]] = {}
    for key in sorted(keys):
        parts = key.split(".")
        numbers = [i for i, part in enumerate(parts) if part.isdigit()]
        if len(numbers) != 1:
            groups.setdefault((key,), [])
            continue
        at = numbers[0]
        groups.setdefault((".".join(parts[:at]), ".".join(parts[at + 1 :])), []).append(int(parts[at]))
    listed = []
    for pattern, indices in groups.items():
        if len(pattern) == 1:
            listed.append(pattern[0])
            continue
        index = str(indices[0]) if len(indices) == 1 else "{" + ", ".join(map(str, sorted(indices))) + "}"
        listed.append(".".join(part for part in (pattern[0], index, pattern[1]) if part))
    return ", ".join(listed)


def model_type_problem(pretrained_model_name_or_path, subfolder: str = "") -> str | None:
    """Why the config.json of a local checkpoint folder does not describe a DDL model (its `model_type` is
    another's), or None. A DDLConfig built from another model's config.json takes DDLConfig's defaults for every
    DDL field: it describes a model that nobody trained."""
    if pretrained_model_name_or_path is None:
        return None
    path = os.path.join(str(pretrained_model_name_or_path), subfolder, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            model_type = json.load(file).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # not a local folder (the Hub), or a config.json that the config class reports on itself
    if model_type is None or model_type == "ddl":
        return None
    return f"{path} has model_type {model_type!r}, not 'ddl' (its DDL fields took DDLConfig's defaults)"


def _mismatch_lines(mismatched) -> list[str]:
    return [
        f"size mismatch for {key}: copying a param with shape {tuple(saved)} from checkpoint, "
        f"the shape in current model is {tuple(expected)}."
        for key, saved, expected in sorted(mismatched)
    ]


def check_loaded_weights(
    model: nn.Module,
    loading_info: dict,
    allow_mismatched: bool,
    pretrained_model_name_or_path,
    subfolder: str = "",
    *,
    strict: bool = False,
    config_from_checkpoint: bool = True,
    ddl_module_types: tuple[type, ...] = (),
) -> None:
    """What `from_pretrained` does after transformers has loaded `model` and filled `loading_info`.

    - `strict`: any missing, unexpected or (unless `allow_mismatched`) reshaped weight, or a config.json of
      another model type, raises a `ValueError` naming the weights file and the keys.
    - Otherwise, as transformers: a reshaped weight without `allow_mismatched` raises the `RuntimeError` that
      transformers raises (naming the keys and the file here); missing and unexpected weights were initialized
      and reported by transformers. On top, a WARNING on this module's logger names the weights without which the
      model computes something else than the saved one: missing weights of `ddl_module_types` modules (gates,
      value projections, compressors, EC filters), a missing untied `lm_head.weight`, weights of the file that sit
      in a DDL module the config does not have, and a config.json whose `model_type` is not "ddl"
      (`config_from_checkpoint=False`: the caller gave the config, nothing to check).
    """
    source = weights_source(pretrained_model_name_or_path, subfolder)
    type_problem = model_type_problem(pretrained_model_name_or_path, subfolder) if config_from_checkpoint else None
    if strict:
        problems = loading_problems(loading_info, allow_mismatched)
        if type_problem is not None:
            problems.insert(0, type_problem)
        if problems:
            config = model.config
            raise ValueError(
                f"{source} does not match the {type(model).__name__} its config.json describes "
                f"({config.variant_name}, hidden_size={config.hidden_size}, value_channels={config.value_channels}): "
                + "; ".join(problems)
                + ". Refusing to return a partly initialized model: config.json and the weights must come from "
                "the same save_pretrained call."
            )
    mismatched = loading_info.get("mismatched_keys", ())
    if mismatched and not allow_mismatched:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__}:\n\t"
            + "\n\t".join(_mismatch_lines(mismatched))
            + f"\n\t{source}: you set `ignore_mismatched_sizes` to `False`, thus raising an error; pass "
            "`ignore_mismatched_sizes=True` to re-initialize these weights."
        )

    missing = set(loading_info.get("missing_keys", ()))
    ddl_weights = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, ddl_module_types)
        for name, _ in module.named_parameters()
    }
    lines = [] if type_problem is None else [type_problem]
    if missing & ddl_weights:
        lines.append(
            f"{len(missing & ddl_weights)} DDL weight(s) missing from the file, initialized from scratch: "
            + compact_keys(missing & ddl_weights)
        )
    head = getattr(model, "lm_head", None)
    # A tied head is the embedding: reported missing only with it (which is then a missing backbone weight).
    if "lm_head.weight" in missing and head is not None and head.weight is not model.get_input_embeddings().weight:
        lines.append("the untied LM head is missing from the file, initialized from scratch: lm_head.weight")
    misplaced = {
        key
        for key in loading_info.get("unexpected_keys", ())
        if any(part in DDL_MODULE_NAMES for part in key.split(".")[:-1])
    }
    if misplaced:
        lines.append(
            f"{len(misplaced)} DDL weight(s) in the file that the config has no place for, dropped: "
            + compact_keys(misplaced)
        )
    if lines:
        logger.warning(
            f"{source}: "
            + "; ".join(lines)
            + f". This {type(model).__name__} does not compute what the saved model did: config.json and the "
            "weights must come from the same save_pretrained call. `from_pretrained(..., strict=True)` makes this "
            "an error; `output_loading_info=True` returns every missing, unexpected and mismatched key."
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
