"""transformers' loading conventions, and the one rule ddl_hf adds on top of them.

The rule (see `DDLPreTrainedModel.from_pretrained`): every backbone weight comes from the file with its
shape, or loading raises. A task head the checkpoint lacks is initialized and reported, as in
transformers; `output_loading_info=True` returns the report instead of raising.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import perturb, random_tokens
from ddl_hf import DDLConfig, DDLForCausalLM, DDLModel


def _backbone_folder(tmp_path, tied: bool):
    config = DDLConfig.from_preset("tiny", "ddl-cc", tie_word_embeddings=tied)
    torch.manual_seed(0)
    backbone = perturb(DDLModel(config), 0.05, seed=1).eval()
    folder = tmp_path / ("tied" if tied else "untied")
    backbone.save_pretrained(folder)
    return backbone, folder


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_backbone_checkpoint_loads_into_the_causal_lm_with_its_head_initialized_and_reported(tmp_path, tied):
    backbone, folder = _backbone_folder(tmp_path, tied)
    model, info = DDLForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert set(info["missing_keys"]) == (set() if tied else {"lm_head.weight"})
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], tensor), name
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:  # initialized as the config says: N(0, initializer_range)
        assert abs(model.lm_head.weight.std().item() - model.config.initializer_range) < 0.002
        assert abs(model.lm_head.weight.mean().item()) < 0.002
    strict = DDLForCausalLM.from_pretrained(folder).eval()  # no error: only the head is new
    ids = random_tokens(2, 7, seed=3)
    with torch.no_grad():
        expected = strict.lm_head(backbone(ids).last_hidden_state)
        assert torch.equal(strict(ids).logits, expected)


def _drop(folder, *names):
    weights = load_file(folder / "model.safetensors")
    for name in names:
        weights.pop(name)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_output_loading_info_returns_the_report_and_initializes_missing_weights_by_the_spec(tmp_path):
    config = DDLConfig.from_preset("tiny", "ddl-tc", beta_init=0.5)
    torch.manual_seed(0)
    perturb(DDLForCausalLM(config), 0.3, seed=2).save_pretrained(tmp_path)
    dropped = (
        "model.layers.0.compressor.read_vector",
        "model.embed_expansion.conv_weight",
        "model.layers.1.attn_shortcut.beta_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
    )
    _drop(tmp_path, *dropped)
    with pytest.raises(ValueError, match=r"4 weight\(s\) missing from the file"):
        DDLForCausalLM.from_pretrained(tmp_path)
    model, info = DDLForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(dropped)
    d, d_v, layers = config.hidden_size, config.value_channels, config.num_hidden_layers
    assert torch.equal(model.model.layers[0].compressor.read_vector, torch.full((d_v,), 1 / d_v))
    identity = torch.zeros(d * d_v, 1, config.embed_conv_size)
    identity[..., -1] = 1
    assert torch.equal(model.model.embed_expansion.conv_weight, identity)
    bias = model.model.layers[1].attn_shortcut.beta_proj.bias
    torch.testing.assert_close(bias, torch.full((1,), math.log(0.25 / 0.75)))
    down = model.model.layers[0].mlp.down_proj.weight  # an output projection: N(0, 0.5 / sqrt(d) / sqrt(L))
    assert abs(down.std().item() - 0.5 / math.sqrt(d) / math.sqrt(layers)) < 0.25 * 0.5 / math.sqrt(d)
    # Everything that was in the file is loaded as it was saved.
    saved = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def test_a_baseline_checkpoint_is_not_silently_loaded_as_a_ddl_model(tmp_path):
    DDLForCausalLM(DDLConfig.from_preset("tiny", "baseline")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(residual_mode="delta", value_channels=4, state_compressor="channel", embed_expansion="conv")
    config.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing from the file: .*attn_shortcut") as error:
        DDLForCausalLM.from_pretrained(tmp_path)
    assert "Refusing to return a partly initialized model" in str(error.value)
