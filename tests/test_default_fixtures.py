"""Committed checkpoints in today's default forms, beside the legacy one (tests/test_checkpoints.py).

`tests/fixtures/ddl-cc-tiny-defaults` and `ddl-tc-tiny-defaults` are `DDLConfig.from_preset("tiny", variant)` with
every field at its default (the authors' forms: factored compressor reads, QK-norm after RoPE, the authors' init),
only the sizes shrunk, written by `scripts/make_fixture.py --variant ddl-cc|ddl-tc` with the logits and the cached
greedy generation they give. Loading them must reproduce both (a renamed parameter, a changed forward), and the
script must rebuild them from the presets bit for bit, config included (a changed default, a changed init).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ddl_hf import DDLForCausalLM

FIXTURES_ROOT = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = {"ddl-cc-tiny-defaults": "ddl-cc", "ddl-tc-tiny-defaults": "ddl-tc"}
# The parameter kinds of each (layer indices dropped): the factored reads (`channel_kernel` and `read_vector` for CC,
# the token filters `conv_weight` and `read_vector` for TC), in every compressor and the readout.
COMMON_KINDS = {
    "model.embed_tokens.weight",
    "model.embed_expansion.conv_weight",
    "model.layers.input_layernorm.weight",
    "model.layers.post_attention_layernorm.weight",
    *(f"model.layers.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
    *(f"model.layers.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
    *(
        f"model.layers.{shortcut}.{p}.{kind}"
        for shortcut in ("attn_shortcut", "mlp_shortcut")
        for p in ("beta_proj", "value_proj")
        for kind in ("weight", "bias")
    ),
    "model.norm.weight",
}
COMPRESSOR_KINDS = {"ddl-cc": ("channel_kernel", "read_vector"), "ddl-tc": ("conv_weight", "read_vector")}


def make_fixture_script():
    spec = importlib.util.spec_from_file_location("make_fixture", REPO_ROOT / "scripts" / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", FIXTURES)
def test_default_fixture_is_small_in_the_authors_forms_and_holds_every_parameter_kind(name):
    folder = FIXTURES_ROOT / name
    sizes = {path.name: path.stat().st_size for path in folder.iterdir()}
    assert set(sizes) == {"config.json", "model.safetensors", "expected_outputs.json"}
    assert sum(sizes.values()) < 32_000
    config = json.loads((folder / "config.json").read_text())
    assert (config["compressor_form"], config["qk_norm_position"], config["init_scheme"]) == (
        "factored",
        "after_rope",
        "authors",
    )
    kinds = {
        ".".join(part for part in key.split(".") if not part.isdigit())
        for key in load_file(folder / "model.safetensors")
    }
    compressor = {
        f"model.{where}.{kind}"
        for where in ("layers.compressor", "readout")
        for kind in COMPRESSOR_KINDS[FIXTURES[name]]
    }
    assert kinds == COMMON_KINDS | compressor


@pytest.mark.parametrize("loader", [DDLForCausalLM, AutoModelForCausalLM], ids=["class", "auto"])
@pytest.mark.parametrize("name", FIXTURES)
def test_default_fixture_reproduces_its_logits_and_generation(name, loader):
    """Every tensor of the file has its place (no key missing, unexpected or reshaped), and the float64 logits equal
    the recorded ones to float64 rounding (float32 ones to float32 accuracy: they depend on the CPU's kernels)."""
    folder = FIXTURES_ROOT / name
    expected = json.loads((folder / "expected_outputs.json").read_text())
    model, info = loader.from_pretrained(folder, output_loading_info=True)
    model.eval()
    assert type(model) is DDLForCausalLM and model.config.variant_name == FIXTURES[name]
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    input_ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        generated = model.generate(
            torch.tensor(expected["generation_prompt"]),
            max_new_tokens=len(expected["generated_ids"][0]) - len(expected["generation_prompt"][0]),
            do_sample=False,
        )
        logits_float64 = model.double()(input_ids=input_ids).logits
    exact = torch.tensor(expected["logits_float64"], dtype=torch.float64)
    torch.testing.assert_close(logits_float64, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5)
    assert generated.tolist() == expected["generated_ids"]


@pytest.mark.parametrize("name", FIXTURES)
def test_default_fixture_is_what_the_preset_builds_today(name):
    """scripts/make_fixture.py rebuilds the committed config (every field) and weights (bit for bit) from the preset
    with today's defaults: a changed default field or init fails here, on purpose; refresh the fixture only for a
    deliberate change (and say so in the changelog)."""
    make_fixture = make_fixture_script()
    rebuilt = make_fixture.build_fixture_model(name)
    committed_config = json.loads((FIXTURES_ROOT / name / "config.json").read_text())
    rebuilt_config = json.loads(rebuilt.config.to_json_string())
    for config in (committed_config, rebuilt_config):  # what save_pretrained adds about the saving itself
        for key in ("transformers_version", "architectures", "auto_map", "dtype"):
            config.pop(key, None)
    assert rebuilt_config == committed_config
    committed = load_file(FIXTURES_ROOT / name / "model.safetensors")
    state = rebuilt.state_dict()
    assert set(committed) <= set(state)
    for key, tensor in committed.items():
        assert torch.equal(state[key], tensor), key
