"""Checkpoints of the authors' reference code, in and out: `ddl convert-reference` and `ddl export-reference`.

    ddl convert-reference ckpt.pt OUTPUT_DIR [--config_overrides FIELD=VALUE,...] [--ignore_keys REGEX ...]
                                             [--k_eps_form plain|accelerated]
    ddl export-reference MODEL_DIR weights.safetensors     (or weights.pt)

The authors' models (arXiv 2601.00417, their GPT-style classes) are saved as a state dict with their own key
names (`../shared/DDL-SPEC.md` section 7). `convert-reference` reads one, with `torch.load(weights_only=True)`
(a `.pt`/`.pth`/`.bin` file; a nanoGPT-style dict that holds the state dict under `"model"` or `"state_dict"`
too) or from a `.safetensors` file, infers the variant and the sizes from the keys and shapes, and writes a
ddl_hf checkpoint (`save_pretrained`, with remote code) that `AutoModelForCausalLM` loads. The model is the
authors' form of every field (`DDLConfig` defaults: QK-norm after RoPE, factored compressors, norm eps 1e-5).

| authors' key (block i: `transformer.h.{i}.`)         | ddl_hf key (block i: `model.layers.{i}.`)       |
|------------------------------------------------------|-------------------------------------------------|
| `transformer.wte.weight`                             | `model.embed_tokens.weight`                     |
| `attn.c_q` / `c_k` / `c_v` / `c_proj` `.weight`      | `self_attn.q_proj` / `k_proj` / `v_proj` / `o_proj` |
| `attn.q_rms.weight`, `attn.k_rms.weight` (head_dim)  | `self_attn.q_norm.weight`, `self_attn.k_norm.weight` |
| `mlp.c_fc1` (SiLU branch) / `c_fc2` / `c_proj`       | `mlp.gate_proj` / `up_proj` / `down_proj`       |
| `ln_1.weight`, `ln_2.weight`                         | `input_layernorm`, `post_attention_layernorm`   |
| `ddl_attn` / `ddl_mlp` `.beta.weight|bias`           | `attn_shortcut` / `mlp_shortcut` `.beta_proj.*` |
| `ddl_attn` / `ddl_mlp` `.v_proj.weight|bias`         | `attn_shortcut` / `mlp_shortcut` `.value_proj.*` |
| CC `compress.weight` (d, K), `compress.read` (d_v,)  | `compressor.channel_kernel`, `compressor.read_vector` |
| TC `compress.shortconv.weight` (d d_v, K), `.read`   | `compressor.conv_weight` (d d_v, 1, K), `read_vector` |
| `readout.*` (as `compress.*`)                        | `model.readout.*`                               |
| `ln_f.weight`                                        | `model.norm.weight`                             |
| `input_embed.conv.weight` (d d_v, 1, K), EC          | `model.embed_expansion.conv_weight`             |
| `lm_head.weight` (tied to wte; absent is tied)       | `lm_head.weight`                                |

`ln_f`, `readout` and `input_embed` are accepted at the top level and under `transformer.`; a `_orig_mod.`
(torch.compile) or `module.` (DDP) prefix on every key is dropped. What the keys cannot tell (a write-only
model, `max_position_embeddings`, `rope_parameters`, ...) comes from `--config_overrides`. A key that maps
to nothing, a weight the model needs that the file lacks, or a shape that does not fit is refused with the
keys named; `--ignore_keys` skips buffers that hold no weights (say a saved causal-mask buffer). Their Triton file
(`DDL-gpt-mha-rope-CC-EC-accelerated.py`) saves the keys of their plain CC-EC file but guards the direction with
sqrt(d) k_eps: `--k_eps_form accelerated` converts its checkpoints (`K_EPS_FORMS`).

`export-reference` writes a ddl_hf model in the authors' naming; it refuses a model that their code cannot
represent, naming the field (the round trip is exact: `tests/test_reference_checkpoints.py`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .command_line import reports_input_errors
from .models.ddl.checkpoint_checks import safetensors_problem
from .models.ddl.configuration_ddl import DDLConfig
from .models.ddl.modeling_ddl import DDLForCausalLM

AUTHORS_PREFIX = "transformer.h"
# Keys that the authors' checkpoints may keep at the top level or under `transformer.`.
TOP_LEVEL_MODULES = ("ln_f", "readout", "input_embed")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# ddl_hf key (block part) -> authors' key (block part), for the parts that map one to one.
_BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attn.c_q.weight",
    "self_attn.k_proj.weight": "attn.c_k.weight",
    "self_attn.v_proj.weight": "attn.c_v.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "self_attn.q_norm.weight": "attn.q_rms.weight",
    "self_attn.k_norm.weight": "attn.k_rms.weight",
    "mlp.gate_proj.weight": "mlp.c_fc1.weight",
    "mlp.up_proj.weight": "mlp.c_fc2.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
}
_SHORTCUT_NAMES = {"attn_shortcut": "ddl_attn", "mlp_shortcut": "ddl_mlp"}
_SHORTCUT_PARTS = {
    "beta_proj.weight": "beta.weight",
    "beta_proj.bias": "beta.bias",
    "value_proj.weight": "v_proj.weight",
    "value_proj.bias": "v_proj.bias",
}
_COMPRESSOR_PARTS = {"channel_kernel": "weight", "read_vector": "read", "conv_weight": "shortconv.weight"}

# What the authors' code is, as DDLConfig values: a model with another value cannot be exported.
AUTHORS_FIELD_VALUES = {
    "compressor_form": "factored",
    "qk_norm_position": "after_rope",
    "rms_norm_eps": 1e-5,
    "k_eps": 1e-5,
    "gate_hidden_size": 0,
    "value_input": "state",
    "value_activation": "sigmoid",
    "value_scale": 4.0,
    "attention_bias": False,
    "hidden_act": "silu",
}

# The two forms of the direction guard in the authors' files, which save the same keys: their plain files (and
# ddl_hf) normalize k = h / sqrt(|h|^2 + k_eps^2); their Triton file scales the guard by sqrt(d),
# k = h / sqrt(|h|^2 + d k_eps^2), which is the plain form with k_eps' = sqrt(d) k_eps.
K_EPS_FORMS = {
    "plain": "h / sqrt(|h|^2 + k_eps^2): DDL-vdim1-gpt-mha-rope.py, DDL-gpt-mha-rope[-EC|-CC|-CC-EC].py",
    "accelerated": "h / sqrt(|h|^2 + d k_eps^2): DDL-gpt-mha-rope-CC-EC-accelerated.py (Triton)",
}


# --------------------------------------------------------------------------- names
def reference_name(name: str) -> str:
    """The authors' key of a ddl_hf state-dict key, e.g. `model.layers.0.mlp.gate_proj.weight` ->
    `transformer.h.0.mlp.c_fc1.weight`. Raises ValueError for a key their models do not have."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match:
        index, part = match.groups()
        prefix = f"{AUTHORS_PREFIX}.{index}."
        if part in _BLOCK_NAMES:
            return prefix + _BLOCK_NAMES[part]
        module, _, rest = part.partition(".")
        if module in _SHORTCUT_NAMES and rest in _SHORTCUT_PARTS:
            return prefix + f"{_SHORTCUT_NAMES[module]}.{_SHORTCUT_PARTS[rest]}"
        if module == "compressor" and rest in _COMPRESSOR_PARTS:
            return prefix + f"compress.{_COMPRESSOR_PARTS[rest]}"
    elif name == "model.embed_tokens.weight":
        return "transformer.wte.weight"
    elif name == "model.norm.weight":
        return "ln_f.weight"
    elif name == "model.embed_expansion.conv_weight":
        return "input_embed.conv.weight"
    elif name.startswith("model.readout.") and name.removeprefix("model.readout.") in _COMPRESSOR_PARTS:
        return f"readout.{_COMPRESSOR_PARTS[name.removeprefix('model.readout.')]}"
    elif name == "lm_head.weight":
        return name
    raise ValueError(f"{name!r} has no counterpart in the authors' models")


def _is_token_filter(reference_key: str) -> bool:
    # Their TC filters are (d * d_v, K); ours keep conv1d's (d * d_v, 1, K). Their EC filters are 3-D as ours.
    return reference_key.endswith("shortconv.weight")


def rename_to_reference(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ddl_hf-named tensors (a state dict, or the parameters' gradients) in the authors' names and layouts."""
    renamed = {}
    for name, tensor in tensors.items():
        key = reference_name(name)
        renamed[key] = tensor.squeeze(1) if _is_token_filter(key) else tensor
    return renamed


def check_exportable(config: DDLConfig) -> None:
    """Raise ValueError naming the first field whose value the authors' code does not have."""
    if config.residual_mode == "write_only":
        raise ValueError(
            "DDLConfig.residual_mode='write_only' cannot be exported: the authors' code has no write-only model "
            "(its keys would load there as the delta model)"
        )
    if not config.tie_word_embeddings:
        raise ValueError(
            "DDLConfig.tie_word_embeddings=False cannot be exported: the authors' GPT ties lm_head to "
            "transformer.wte when it is built, so a strict load of an untied head there silently replaces the "
            "embeddings with it"
        )
    for field, value in AUTHORS_FIELD_VALUES.items():
        if getattr(config, field) != value:
            raise ValueError(
                f"DDLConfig.{field}={getattr(config, field)!r} cannot be exported: the authors' code has "
                f"{field}={value!r}"
            )


def to_reference_state_dict(model: DDLForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict of a ddl_hf causal LM in the authors' naming (detached copies, contiguous, untied)."""
    check_exportable(model.config)
    return {
        name: tensor.detach().clone().contiguous() for name, tensor in rename_to_reference(model.state_dict()).items()
    }


# --------------------------------------------------------------------------- reading theirs
def read_reference_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in an authors' checkpoint file: safetensors, or `torch.load(weights_only=True)` of a state
    dict or of a dict that holds it under `"model"` or `"state_dict"`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CHECKPOINT {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        problem = safetensors_problem(str(path))
        if problem is not None:
            raise ValueError(f"{path}: cannot read the safetensors file ({problem}); it is truncated or corrupt")
        return load_file(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: expected a .safetensors file or a torch.save file ({', '.join(TORCH_SUFFIXES)})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError by cause
        raise ValueError(
            f"{path}: torch.load(weights_only=True) cannot read it ({type(error).__name__}: {error}); only tensors "
            "and plain containers are loaded, never pickled code"
        ) from error
    for candidate in (loaded, *(loaded.get(key) for key in ("model", "state_dict") if isinstance(loaded, dict))):
        if isinstance(candidate, dict) and candidate and all(isinstance(v, torch.Tensor) for v in candidate.values()):
            return candidate
    raise ValueError(
        f"{path}: holds no state dict (a dict of tensors, at the top or under 'model' or 'state_dict'); found "
        f"{type(loaded).__name__} with keys {sorted(loaded)[:10] if isinstance(loaded, dict) else []}"
    )


def normalize_reference_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix that every key has (`_orig_mod.`, `module.`), and move `transformer.ln_f`,
    `transformer.readout`, `transformer.input_embed` to the top level, where `reference_name` puts them."""
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
    normalized = {}
    for key, value in state_dict.items():
        module = key.removeprefix("transformer.").split(".", 1)[0]
        name = key.removeprefix("transformer.") if module in TOP_LEVEL_MODULES else key
        if name in normalized:
            raise ValueError(f"the checkpoint holds {name!r} twice (at the top level and under 'transformer.')")
        normalized[name] = value
    return normalized


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"the checkpoint has no {key!r}, which every authors' model has")
    return tuple(state_dict[key].shape)


def config_from_reference(state_dict: Mapping[str, torch.Tensor], k_eps_form: str = "plain", **overrides) -> DDLConfig:
    """The `DDLConfig` of an authors' state dict (normalized keys), from its keys and shapes; `overrides` set the
    fields the keys cannot tell (a ValueError names any inferred field they contradict, like `value_channels`).
    `k_eps_form`: which of their files saved it (`K_EPS_FORMS`); "accelerated" sets `k_eps` to sqrt(d) times
    their `ddl_k_eps` (the `k_eps` override, else their default 1e-5)."""
    if k_eps_form not in K_EPS_FORMS:
        raise ValueError(f"k_eps_form must be one of {list(K_EPS_FORMS)}, got {k_eps_form!r}")
    vocab_size, hidden_size = _shape(state_dict, "transformer.wte.weight")
    blocks = sorted({int(m.group(1)) for key in state_dict if (m := re.match(r"transformer\.h\.(\d+)\.", key))})
    if not blocks:
        raise ValueError("the checkpoint has no block 'transformer.h.0.*'")
    if blocks != list(range(len(blocks))):
        raise ValueError(f"the checkpoint's blocks must be numbered 0, 1, ...; found {blocks}")
    block = f"{AUTHORS_PREFIX}.0."
    inferred = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=len(blocks))
    inferred["intermediate_size"] = _shape(state_dict, block + "mlp.c_fc1.weight")[0]
    query_width = _shape(state_dict, block + "attn.c_q.weight")[0]
    key_width = _shape(state_dict, block + "attn.c_k.weight")[0]
    inferred["use_qk_norm"] = block + "attn.q_rms.weight" in state_dict
    head_dim = _shape(state_dict, block + "attn.q_rms.weight")[0] if inferred["use_qk_norm"] else None
    head_dim = overrides.get("head_dim", head_dim)
    if head_dim is None:
        raise ValueError(
            "the checkpoint has no QK-norm gains, which give the head size: pass head_dim=... in --config_overrides"
        )
    for name, width in (("num_attention_heads", query_width), ("num_key_value_heads", key_width)):
        if width % head_dim:
            raise ValueError(f"{name}: the projection width {width} is not a multiple of head_dim {head_dim}")
        inferred[name] = width // head_dim
    inferred["head_dim"] = head_dim

    has_shortcuts = {any(key.startswith(block + name + ".") for key in state_dict) for name in ("ddl_attn", "ddl_mlp")}
    if has_shortcuts == {True}:
        inferred["residual_mode"] = "delta"
        inferred["value_channels"] = _shape(state_dict, block + "ddl_attn.v_proj.weight")[0]
    elif has_shortcuts == {False}:
        inferred["residual_mode"], inferred["value_channels"] = "additive", 1
    else:
        raise ValueError("block 0 has one of ddl_attn.* and ddl_mlp.* but not the other")
    if inferred["value_channels"] > 1:
        if block + "compress.weight" in state_dict:
            inferred["state_compressor"] = "channel"
            inferred["channel_kernel_size"] = _shape(state_dict, block + "compress.weight")[1]
        elif block + "compress.shortconv.weight" in state_dict:
            inferred["state_compressor"] = "token"
            inferred["state_conv_size"] = _shape(state_dict, block + "compress.shortconv.weight")[1]
        else:
            raise ValueError(
                f"the checkpoint has d_v = {inferred['value_channels']} value channels but no compressor "
                "('transformer.h.0.compress.weight' or '.compress.shortconv.weight')"
            )
        if "input_embed.conv.weight" in state_dict:
            inferred["embed_expansion"] = "conv"
            inferred["embed_conv_size"] = _shape(state_dict, "input_embed.conv.weight")[-1]
        else:
            inferred["embed_expansion"] = "repeat"
    lm_head = state_dict.get("lm_head.weight")
    inferred["tie_word_embeddings"] = lm_head is None or torch.equal(lm_head, state_dict["transformer.wte.weight"])
    # A write-only model has the delta model's keys: the one inferred value an override may change.
    if inferred["residual_mode"] == "delta" and overrides.get("residual_mode") == "write_only":
        inferred["residual_mode"] = "write_only"
    contradicted = sorted(field for field in set(overrides) & set(inferred) if overrides[field] != inferred[field])
    if contradicted:
        found = {field: inferred[field] for field in contradicted}
        raise ValueError(f"--config_overrides contradicts what the checkpoint's keys and shapes give: {found}")
    if k_eps_form == "accelerated":
        if (inferred.get("state_compressor"), inferred.get("embed_expansion")) != ("channel", "conv"):
            raise ValueError(
                "--k_eps_form accelerated: their accelerated file (DDL-gpt-mha-rope-CC-EC-accelerated.py) builds only "
                "the CC model with EC (keys 'transformer.h.0.compress.weight' and 'input_embed.conv.weight'); this "
                "checkpoint's keys give another model"
            )
        their_k_eps = overrides.get("k_eps", AUTHORS_FIELD_VALUES["k_eps"])
        overrides = {**overrides, "k_eps": math.sqrt(hidden_size) * their_k_eps}
    return DDLConfig(**{**inferred, **overrides})


def from_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], ignore_keys: tuple[str, ...] = (), k_eps_form: str = "plain", **overrides
) -> DDLForCausalLM:
    """A ddl_hf causal LM with the weights of an authors' state dict. `ignore_keys`: regular expressions of keys
    to skip (buffers without weights); `k_eps_form`: "plain" or "accelerated", which of their files saved it
    (`K_EPS_FORMS`, `config_from_reference`). Raises ValueError naming unmapped, missing or misshapen keys."""
    state_dict = normalize_reference_keys(state_dict)
    ignored = [key for key in state_dict if any(re.fullmatch(pattern, key) for pattern in ignore_keys)]
    state_dict = {key: value for key, value in state_dict.items() if key not in ignored}
    config = config_from_reference(state_dict, k_eps_form, **overrides)
    model = DDLForCausalLM(config)
    expected = model.state_dict()
    wanted = {name: reference_name(name) for name in expected}
    if config.tie_word_embeddings:
        # The head is the embedding: a checkpoint saved from a tied model holds it twice, or once.
        wanted["lm_head.weight"] = "transformer.wte.weight"
        state_dict.pop("lm_head.weight", None)
    unmapped = sorted(set(state_dict) - set(wanted.values()))
    missing = sorted(source for source in wanted.values() if source not in state_dict)
    if unmapped or missing:
        problems = ([f"keys that map to nothing: {unmapped}"] if unmapped else []) + (
            [f"missing keys: {missing}"] if missing else []
        )
        raise ValueError(
            f"the checkpoint does not fit the {config.variant_name} model its keys describe: {'; '.join(problems)} "
            "(--ignore_keys skips keys that hold no weights)"
        )
    converted, misshapen = {}, []
    for name, source in wanted.items():
        tensor = state_dict[source]
        if _is_token_filter(source) and tensor.dim() == 2:
            tensor = tensor.unsqueeze(1)
        if tensor.shape != expected[name].shape:
            misshapen.append(f"{source}: {tuple(state_dict[source].shape)}, expected {tuple(expected[name].shape)}")
        converted[name] = tensor
    if misshapen:
        raise ValueError(f"the checkpoint's shapes do not fit the {config.variant_name} model: {misshapen}")
    # Keep the checkpoint's precision (bf16 stays bf16), so that the weights carry over bit for bit.
    dtypes = {tensor.dtype for tensor in converted.values() if tensor.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(converted)
    return model.eval()


# --------------------------------------------------------------------------- commands
def _check_output_dir(output_dir: str) -> None:
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"OUTPUT_DIR {output_dir!r} is not empty; give a new folder (nothing is overwritten)")


@reports_input_errors("convert-reference")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddl convert-reference",
        description="Convert a state dict saved by the authors' DDL code into a ddl_hf checkpoint "
        "(AutoModelForCausalLM, remote code included).",
    )
    parser.add_argument("checkpoint", help="the authors' state dict: .pt/.pth/.bin/.ckpt (torch.save) or .safetensors")
    parser.add_argument("output_dir", help="a new (or empty) folder for the ddl_hf checkpoint")
    parser.add_argument(
        "--config_overrides",
        default=None,
        help="DDLConfig fields the keys cannot tell, e.g. 'residual_mode=write_only,max_position_embeddings=2048'",
    )
    parser.add_argument(
        "--ignore_keys", nargs="+", default=[], help="regular expressions of checkpoint keys to skip (buffers)"
    )
    parser.add_argument(
        "--k_eps_form",
        choices=list(K_EPS_FORMS),
        default="plain",
        help="which of the authors' files saved the checkpoint (both save the same keys), for the guard of "
        "k = h / sqrt(|h|^2 + eps^2): 'plain' (default; their non-Triton files, eps = k_eps) or 'accelerated' "
        "(DDL-gpt-mha-rope-CC-EC-accelerated.py, eps = sqrt(d) k_eps, written as k_eps in the config)",
    )
    args = parser.parse_args(argv)
    from .train import parse_config_overrides

    _check_output_dir(args.output_dir)
    overrides = parse_config_overrides(args.config_overrides or "")
    checkpoint = read_reference_checkpoint(args.checkpoint)
    model = from_reference_state_dict(checkpoint, tuple(args.ignore_keys), args.k_eps_form, **overrides)
    model.save_pretrained(args.output_dir)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"ddl convert-reference: {model.config.variant_name}, {parameters:,} parameters -> {args.output_dir}")
    return 0


@reports_input_errors("export-reference")
def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddl export-reference",
        description="Write a saved ddl_hf model as a state dict in the authors' naming (the inverse of "
        "convert-reference).",
    )
    parser.add_argument("model_dir", help="folder of a saved ddl_hf causal LM")
    parser.add_argument("output_file", help="a new .safetensors file, or .pt/.pth/.bin/.ckpt for torch.save")
    args = parser.parse_args(argv)
    output = Path(args.output_file)
    if output.exists():
        raise ValueError(f"OUTPUT_FILE {str(output)!r} exists; give a new file (nothing is overwritten)")
    if output.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise ValueError(f"OUTPUT_FILE must end in .safetensors or one of {list(TORCH_SUFFIXES)}, got {str(output)!r}")
    model = DDLForCausalLM.from_pretrained(args.model_dir)
    state_dict = to_reference_state_dict(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, output)
    else:
        torch.save(state_dict, output)
    print(f"ddl export-reference: {len(state_dict)} tensors of {model.config.variant_name} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
