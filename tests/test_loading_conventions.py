"""transformers' loading conventions, and what ddl_hf adds on top of them (`DDLPreTrainedModel.from_pretrained`).

As in transformers: a weight the file lacks is initialized by `_init_weights` and reported (transformers'
loading report, a WARNING, and `output_loading_info`); a tensor whose shape differs from the config raises
the RuntimeError that Llama raises, unless `ignore_mismatched_sizes=True` re-initializes it. On top: missing
DDL weights (gates, value projections, compressors, EC filters) and a missing untied `lm_head.weight` get a
warning of their own that names them, as does a config.json of another model type; `strict=True` turns any
missing, unexpected or mismatched weight into a ValueError naming the file and the keys.
"""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TINY_VOCAB, ddl_warnings, perturb, random_tokens, tiny_model, transformers_report
from ddl_hf import DDLConfig, DDLForCausalLM, DDLForSequenceClassification, DDLModel


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(
        **{
            "vocab_size": TINY_VOCAB,
            "hidden_size": 32,
            "intermediate_size": 85,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            **overrides,
        }
    )


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
    loaded = DDLForCausalLM.from_pretrained(folder).eval()  # no error: only the head is new
    ids = random_tokens(2, 7, seed=3)
    with torch.no_grad():
        expected = loaded.lm_head(backbone(ids).last_hidden_state)
        assert torch.equal(loaded(ids).logits, expected)


def _drop(folder, *names):
    weights = load_file(folder / "model.safetensors")
    for name in names:
        weights.pop(name)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_output_loading_info_returns_the_report_and_initializes_missing_weights_by_the_spec(tmp_path, load_log):
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
        DDLForCausalLM.from_pretrained(tmp_path, strict=True)
    model, info = DDLForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == set(dropped)
    # The three DDL weights are named in a warning of their own; the MLP weight only in transformers' report.
    (warning,) = ddl_warnings(load_log)
    assert all(name in warning for name in dropped[:3]) and dropped[3] not in warning
    assert all(name in transformers_report(load_log) for name in dropped)
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


def test_a_baseline_checkpoint_is_not_silently_loaded_as_a_ddl_model(tmp_path, load_log):
    DDLForCausalLM(DDLConfig.from_preset("tiny", "baseline")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(residual_mode="delta", value_channels=4, state_compressor="channel", embed_expansion="conv")
    config.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = DDLForCausalLM.from_pretrained(tmp_path)  # loaded as transformers would, but not silently
    assert model.config.variant_name == "ddl-cc"
    (warning,) = ddl_warnings(load_log)
    assert warning.startswith(f"{tmp_path / 'model.safetensors'}: ")
    for name in (
        "model.embed_expansion.conv_weight",
        "model.layers.{0, 1}.attn_shortcut.beta_proj.weight",
        "model.layers.{0, 1}.mlp_shortcut.value_proj.weight",
        "model.layers.{0, 1}.compressor.channel_kernel",
        "model.readout.read_vector",
    ):
        assert name in warning, name
    with pytest.raises(ValueError, match=r"missing from the file: .*attn_shortcut") as error:
        DDLForCausalLM.from_pretrained(tmp_path, strict=True)
    assert "Refusing to return a partly initialized model" in str(error.value)


# --------------------------------------------------------------------------- issue 27: transformers' conventions
MLP_WEIGHTS = [f"model.layers.{i}.mlp.{proj}_proj.weight" for i in range(2) for proj in ("gate", "up", "down")]


@pytest.mark.parametrize("output_loading_info", [False, True], ids=["model", "with-loading-info"])
def test_a_differently_shaped_tensor_raises_what_transformers_raises_for_llama_naming_the_key(
    tmp_path, output_loading_info
):
    llama_folder = tmp_path / "llama"
    LlamaForCausalLM(_tiny_llama_config()).save_pretrained(llama_folder)
    _edit_config(llama_folder, intermediate_size=64)
    with pytest.raises(RuntimeError) as llama_error:
        LlamaForCausalLM.from_pretrained(llama_folder, output_loading_info=output_loading_info)

    folder = tmp_path / "ddl"
    tiny_model("ddl-cc").save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 85
    _edit_config(folder, intermediate_size=64)
    for loader in (DDLForCausalLM, AutoModelForCausalLM):
        with pytest.raises(RuntimeError) as error:
            loader.from_pretrained(folder, output_loading_info=output_loading_info)
        assert type(error.value) is type(llama_error.value)
        message = str(error.value)
        assert str(folder / "model.safetensors") in message and "ignore_mismatched_sizes" in message
        for name in MLP_WEIGHTS:
            assert name in message, name
        assert "size mismatch for model.layers.1.mlp.down_proj.weight: copying a param with shape (32, 85)" in message
    # On request, the mismatched tensors are re-initialized and reported.
    model, info = DDLForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, output_loading_info=True)
    assert {key for key, _, _ in info["mismatched_keys"]} == set(MLP_WEIGHTS)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (64, 32)


def test_missing_weights_are_initialized_and_reported_in_transformers_log_and_the_loading_info(tmp_path, load_log):
    config = DDLConfig.from_preset("tiny", "ddl-cc")
    torch.manual_seed(0)
    saved = perturb(DDLForCausalLM(config), 0.05, seed=2)
    saved.save_pretrained(tmp_path)
    dropped = {"model.norm.weight", "model.layers.1.mlp.up_proj.weight"}
    _drop(tmp_path, *dropped)
    for loader in (DDLForCausalLM, AutoModelForCausalLM):
        load_log.clear()
        model = loader.from_pretrained(tmp_path)  # no error, as for every transformers model
        report = transformers_report(load_log)
        assert "LOAD REPORT" in report and "MISSING" in report
        assert all(name in report for name in dropped)
        assert ddl_warnings(load_log) == []  # no DDL weight is missing: transformers' report is the report
        assert torch.equal(model.model.norm.weight, torch.ones(config.hidden_size))  # `_init_weights`
        up = model.model.layers[1].mlp.up_proj.weight  # N(0, 0.5 / sqrt(d))
        assert abs(up.std().item() - 0.5 / math.sqrt(config.hidden_size)) < 0.02
        assert torch.equal(model.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)
    model, info = DDLForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == dropped and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_an_empty_state_dict_initializes_every_weight_and_reports_them_missing_as_for_llama(load_log):
    llama, llama_info = LlamaForCausalLM.from_pretrained(
        None, config=_tiny_llama_config(), state_dict={}, output_loading_info=True
    )
    assert llama_info["missing_keys"] == set(llama.state_dict())
    config = DDLConfig.from_preset("tiny", "ddl-tc")
    model, info = DDLForCausalLM.from_pretrained(None, config=config, state_dict={}, output_loading_info=True)
    assert info["missing_keys"] == set(model.state_dict())  # the tied LM head too, as for Llama
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    d, d_v = config.hidden_size, config.value_channels
    identity = torch.zeros(d * d_v, 1, config.embed_conv_size)
    identity[..., -1] = 1
    assert torch.equal(model.model.embed_expansion.conv_weight, identity)
    assert torch.equal(model.model.norm.weight, torch.ones(d))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.isfinite(model(random_tokens(1, 5, seed=1)).logits).all()
    load_log.clear()
    assert isinstance(DDLForCausalLM.from_pretrained(None, config=config, state_dict={}), DDLForCausalLM)
    (warning,) = ddl_warnings(load_log)
    assert warning.startswith("the given state_dict: ")
    assert "model.layers.{0, 1}.attn_shortcut.beta_proj.weight" in warning and "model.readout.conv_weight" in warning
    with pytest.raises(ValueError, match=r"^the given state_dict does not match the DDLForCausalLM"):
        DDLForCausalLM.from_pretrained(None, config=config, state_dict={}, strict=True)


@pytest.mark.parametrize("loader", [DDLForCausalLM, AutoModelForCausalLM], ids=["DDLForCausalLM", "Auto"])
def test_missing_ddl_weights_are_reported_loudly_naming_them_and_refused_under_strict(tmp_path, load_log, loader):
    config = DDLConfig.from_preset("tiny", "ddl-tc")
    torch.manual_seed(0)
    perturb(DDLForCausalLM(config), 0.05, seed=2).save_pretrained(tmp_path)
    ddl_weights = (
        "model.layers.1.mlp_shortcut.value_proj.weight",  # DeltaShortcut
        "model.layers.0.compressor.read_vector",  # StateCompressor
        "model.embed_expansion.conv_weight",  # EmbedExpansion
    )
    _drop(tmp_path, *ddl_weights, "model.layers.0.self_attn.q_proj.weight")
    model, info = loader.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {*ddl_weights, "model.layers.0.self_attn.q_proj.weight"}
    warnings = [r for r in load_log.records if r.name.startswith("ddl_hf.")]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    message = warnings[0].getMessage()
    assert message.startswith(f"{tmp_path / 'model.safetensors'}: 3 DDL weight(s) missing from the file")
    assert all(name in message for name in ddl_weights) and "q_proj" not in message
    assert "strict=True" in message
    load_log.clear()
    loader.from_pretrained(tmp_path)  # the same warning without output_loading_info
    assert len(ddl_warnings(load_log)) == 1 and all(name in ddl_warnings(load_log)[0] for name in ddl_weights)
    with pytest.raises(ValueError) as error:
        loader.from_pretrained(tmp_path, strict=True)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'model.safetensors'} does not match the DDLForCausalLM")
    assert "4 weight(s) missing from the file: " in message and all(name in message for name in ddl_weights)
    assert "Refusing to return a partly initialized model" in message


def test_an_untied_causal_lm_without_its_lm_head_is_reported_as_loudly_as_a_missing_ddl_weight(tmp_path, load_log):
    """Issue 31, item 12: the untied LM head decides every logit; initialized from scratch, the model is noise."""
    torch.manual_seed(0)
    untied = perturb(DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc", tie_word_embeddings=False)), 0.05, seed=3)
    untied.save_pretrained(tmp_path)
    _drop(tmp_path, "lm_head.weight")
    model, info = DDLForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}
    (warning,) = ddl_warnings(load_log)
    assert warning.startswith(f"{tmp_path / 'model.safetensors'}: ") and "lm_head.weight" in warning
    assert abs(model.lm_head.weight.std().item() - model.config.initializer_range) < 0.002
    with pytest.raises(ValueError, match=r"1 weight\(s\) missing from the file: lm_head\.weight"):
        DDLForCausalLM.from_pretrained(tmp_path, strict=True)
    # A backbone folder loaded into the untied causal LM lacks the head the same way; a tied head is no loss.
    _, folder = _backbone_folder(tmp_path, tied=False)
    load_log.clear()
    DDLForCausalLM.from_pretrained(folder)
    (warning,) = ddl_warnings(load_log)
    assert "lm_head.weight" in warning
    _, folder = _backbone_folder(tmp_path, tied=True)
    load_log.clear()
    DDLForCausalLM.from_pretrained(folder, strict=True)
    assert ddl_warnings(load_log) == []


def test_a_checkpoint_of_another_model_type_is_not_silently_loaded_as_a_ddl_model(tmp_path, load_log):
    llama_folder = tmp_path / "llama"
    LlamaForCausalLM(_tiny_llama_config()).save_pretrained(llama_folder)
    DDLForCausalLM.from_pretrained(llama_folder)
    (warning,) = ddl_warnings(load_log)
    assert warning.startswith(f"{llama_folder / 'model.safetensors'}: ")
    assert f"{llama_folder / 'config.json'} has model_type 'llama', not 'ddl'" in warning
    assert "model.layers.{0, 1}.attn_shortcut.beta_proj.weight" in warning  # and the DDL weights it lacks
    with pytest.raises(ValueError, match=r"has model_type 'llama', not 'ddl'.*weight\(s\) missing from the file"):
        DDLForCausalLM.from_pretrained(llama_folder, strict=True)
    # Every weight in place, only the model type differs: still said.
    folder = tmp_path / "renamed"
    tiny_model("baseline").save_pretrained(folder)
    _edit_config(folder, model_type="llama")
    load_log.clear()
    _, info = DDLForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    (warning,) = ddl_warnings(load_log)
    assert f"{folder / 'config.json'} has model_type 'llama', not 'ddl'" in warning


def test_strict_mode_refuses_any_missing_unexpected_or_mismatched_weight_naming_the_file(tmp_path):
    torch.manual_seed(0)
    model = perturb(DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc")), 0.05, seed=2).eval()
    good = tmp_path / "good"
    model.save_pretrained(good)
    ids = random_tokens(2, 5, seed=4)
    with torch.no_grad():
        assert torch.equal(DDLForCausalLM.from_pretrained(good, strict=True)(ids).logits, model(ids).logits)

    extra = tmp_path / "extra"
    model.save_pretrained(extra)
    weights = load_file(extra / "model.safetensors")
    weights["model.layers.0.old_gate.weight"] = torch.zeros(3)
    save_file(weights, extra / "model.safetensors", metadata={"format": "pt"})
    resized = tmp_path / "resized"
    model.save_pretrained(resized)
    _edit_config(resized, intermediate_size=64)
    cases = [
        (DDLForSequenceClassification, good, r"1 weight\(s\) missing from the file: score\.weight"),
        (DDLForCausalLM, extra, r"1 unexpected weight\(s\) in the file: model\.layers\.0\.old_gate\.weight"),
        (AutoModelForCausalLM, extra, r"1 unexpected weight\(s\) in the file: model\.layers\.0\.old_gate\.weight"),
        (DDLForCausalLM, resized, r"6 weight\(s\) with a different shape: model\.layers\.0\.mlp\.down_proj\.weight"),
    ]
    for loader, folder, expected in cases:
        for output_loading_info in (False, True):
            with pytest.raises(ValueError, match=expected) as error:
                loader.from_pretrained(folder, strict=True, output_loading_info=output_loading_info)
            assert str(error.value).startswith(f"{folder / 'model.safetensors'} does not match the ")
    # Mismatched weights re-initialized on request are not refused.
    _, info = DDLForCausalLM.from_pretrained(
        resized, strict=True, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert len(info["mismatched_keys"]) == 6
