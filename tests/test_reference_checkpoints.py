"""`ddl convert-reference` and `ddl export-reference`: checkpoints in the authors' naming, in and out.

A ddl_hf model exported to their naming and converted back is the same model (bit-identical logits); the
converter infers the variant and sizes from keys and shapes, and refuses what it cannot map, naming the keys.
"""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import cli
from ddl_hf.reference_checkpoints import (
    from_reference_state_dict,
    read_reference_checkpoint,
    rename_to_reference,
    to_reference_state_dict,
)

EXPORTABLE = ["baseline", "ddl-scalar", "ddl-cc", "ddl-tc", "ddl-cc-noec", "ddl-tc-noec"]
# Fields of the saved config that say nothing about the model's function.
BOOKKEEPING = ("architectures", "auto_map", "dtype", "transformers_version")


def trained_looking(variant, **overrides):
    """A tiny model with every weight moved off its initialization, in eval mode."""
    return perturb(tiny_model(variant, **overrides), 0.05, seed=4, filter_scale=0.2).eval()


def architecture(config):
    return {key: value for key, value in config.to_dict().items() if key not in BOOKKEEPING}


@torch.no_grad()
def logits_of(model, input_ids):
    return model(input_ids).logits


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("variant", EXPORTABLE)
def test_export_then_convert_gives_the_same_model_and_identical_logits(variant, suffix, tmp_path):
    model = trained_looking(variant)
    model.save_pretrained(tmp_path / "model")
    checkpoint = tmp_path / f"theirs{suffix}"
    assert cli.main(["export-reference", str(tmp_path / "model"), str(checkpoint)]) == 0
    # The context length is no weight: the keys cannot tell it.
    overrides = ["--config_overrides", f"max_position_embeddings={model.config.max_position_embeddings}"]
    assert cli.main(["convert-reference", str(checkpoint), str(tmp_path / "converted"), *overrides]) == 0

    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert type(converted) is type(model)
    assert architecture(converted.config) == architecture(model.config)
    assert converted.config.variant_name == variant
    input_ids = random_tokens(2, 9, seed=5)
    assert torch.equal(logits_of(converted, input_ids), logits_of(model, input_ids))
    # Remote code travels with it, as with every saved ddl_hf model.
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_ddl.DDLForCausalLM"
    assert (tmp_path / "converted" / "modeling_ddl.py").is_file()


def test_exported_keys_are_the_authors_names_and_shapes():
    state_dict = to_reference_state_dict(tiny_model("ddl-tc"))
    d, d_v, vocab = 32, 4, 96
    expected_shapes = {
        "transformer.wte.weight": (vocab, d),
        "transformer.h.1.attn.c_q.weight": (d, d),
        "transformer.h.1.attn.q_rms.weight": (16,),
        "transformer.h.1.mlp.c_fc1.weight": (85, d),
        "transformer.h.1.mlp.c_proj.weight": (d, 85),
        "transformer.h.1.ln_2.weight": (d,),
        "transformer.h.1.ddl_attn.beta.weight": (1, d),
        "transformer.h.1.ddl_mlp.v_proj.bias": (d_v,),
        "transformer.h.1.compress.shortconv.weight": (d * d_v, 4),
        "transformer.h.1.compress.read": (d_v,),
        "readout.shortconv.weight": (d * d_v, 4),
        "ln_f.weight": (d,),
        "input_embed.conv.weight": (d * d_v, 1, 4),
        "lm_head.weight": (vocab, d),
    }
    assert {key: tuple(state_dict[key].shape) for key in expected_shapes} == expected_shapes
    assert not any(key.startswith("model.") for key in state_dict)
    cc = to_reference_state_dict(tiny_model("ddl-cc"))
    assert (tuple(cc["transformer.h.0.compress.weight"].shape), tuple(cc["readout.read"].shape)) == ((d, 4), (d_v,))


def test_a_nanogpt_style_checkpoint_of_a_compiled_model_converts(tmp_path):
    """Under "model" beside the optimizer state, every key prefixed by torch.compile's `_orig_mod.`, ln_f and the
    readout under `transformer.`, no lm_head (tied): the same model."""
    model = trained_looking("ddl-cc")
    theirs = {}
    for key, tensor in to_reference_state_dict(model).items():
        if key == "lm_head.weight":
            continue
        if key.startswith(("ln_f.", "readout.")):
            key = "transformer." + key
        theirs["_orig_mod." + key] = tensor
    torch.save({"model": theirs, "optimizer": {"state": {}, "param_groups": []}, "iter_num": 5}, tmp_path / "c.pt")
    converted = from_reference_state_dict(read_reference_checkpoint(tmp_path / "c.pt"))
    input_ids = random_tokens(1, 7, seed=6)
    assert torch.equal(logits_of(converted, input_ids), logits_of(model, input_ids))


def test_an_untied_head_and_a_bf16_checkpoint_carry_over_bit_for_bit():
    # An untied file (their GPT cannot hold one, so export refuses it; a changed copy of their code could save one).
    model = trained_looking("ddl-scalar", tie_word_embeddings=False)
    untied = {key: tensor.detach().clone() for key, tensor in rename_to_reference(model.state_dict()).items()}
    assert not torch.equal(untied["lm_head.weight"], untied["transformer.wte.weight"])
    converted = from_reference_state_dict(untied)
    assert converted.config.tie_word_embeddings is False
    input_ids = random_tokens(1, 7, seed=6)
    assert torch.equal(logits_of(converted, input_ids), logits_of(model, input_ids))

    bf16 = {
        key: tensor.to(torch.bfloat16) for key, tensor in to_reference_state_dict(trained_looking("ddl-tc")).items()
    }
    converted = from_reference_state_dict(bf16)
    assert all(parameter.dtype == torch.bfloat16 for parameter in converted.parameters())
    assert torch.equal(
        converted.model.layers[1].compressor.conv_weight[:, 0], bf16["transformer.h.1.compress.shortconv.weight"]
    )


def test_keys_it_cannot_map_are_refused_by_name_unless_ignored():
    theirs = to_reference_state_dict(trained_looking("ddl-cc"))
    theirs["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8).tril()  # a causal-mask buffer
    theirs["transformer.h.1.ddl_attn.beta_hidden.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError) as error:
        from_reference_state_dict(theirs)
    message = str(error.value)
    assert "keys that map to nothing: ['transformer.h.0.attn.bias', 'transformer.h.1.ddl_attn.beta_hidden.weight']" in (
        message
    )
    assert "--ignore_keys" in message
    converted = from_reference_state_dict(theirs, ignore_keys=(r"transformer\.h\.\d+\.attn\.bias", r".*beta_hidden.*"))
    assert converted.config.variant_name == "ddl-cc"


def test_missing_and_misshapen_weights_are_refused_by_name():
    theirs = to_reference_state_dict(trained_looking("ddl-cc"))
    del theirs["transformer.h.1.ddl_mlp.v_proj.bias"]
    with pytest.raises(ValueError, match=re.escape("missing keys: ['transformer.h.1.ddl_mlp.v_proj.bias']")):
        from_reference_state_dict(theirs)

    theirs = to_reference_state_dict(trained_looking("ddl-cc"))
    theirs["transformer.h.1.mlp.c_fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=re.escape("transformer.h.1.mlp.c_fc1.weight: (64, 32), expected (85, 32)")):
        from_reference_state_dict(theirs)

    theirs = to_reference_state_dict(trained_looking("ddl-cc"))
    del theirs["transformer.h.0.compress.weight"], theirs["transformer.h.0.compress.read"]
    with pytest.raises(ValueError, match="d_v = 4 value channels but no compressor"):
        from_reference_state_dict(theirs)


def test_overrides_set_what_the_keys_cannot_tell_and_may_not_contradict_them(tmp_path):
    theirs = to_reference_state_dict(trained_looking("ddl-cc"))
    write_only = from_reference_state_dict(theirs, residual_mode="write_only", max_position_embeddings=64)
    assert (write_only.config.variant_name, write_only.config.max_position_embeddings) == ("write-only-cc", 64)
    with pytest.raises(
        ValueError, match=re.escape("contradicts what the checkpoint's keys and shapes give: {'value_channels': 4}")
    ):
        from_reference_state_dict(theirs, value_channels=2)

    save_file(theirs, tmp_path / "theirs.safetensors")
    assert load_file(tmp_path / "theirs.safetensors").keys() == theirs.keys()
    argv = ["convert-reference", str(tmp_path / "theirs.safetensors"), str(tmp_path / "out")]
    assert cli.main([*argv, "--config_overrides", "residual_mode=write_only"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["residual_mode"] == "write_only"


class Anything:
    """An object that only unpickling code could rebuild."""


def test_files_it_cannot_read_and_outputs_it_would_overwrite_are_refused(tmp_path, capsys):
    torch.save({"model": Anything()}, tmp_path / "pickled.pt")
    assert cli.main(["convert-reference", str(tmp_path / "pickled.pt"), str(tmp_path / "out")]) == 2
    assert "torch.load(weights_only=True) cannot read it" in capsys.readouterr().err

    torch.save({"iter_num": 3}, tmp_path / "no_weights.pt")
    assert cli.main(["convert-reference", str(tmp_path / "no_weights.pt"), str(tmp_path / "out")]) == 2
    assert "holds no state dict" in capsys.readouterr().err

    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert cli.main(["convert-reference", str(tmp_path / "damaged.safetensors"), str(tmp_path / "out")]) == 2
    assert "cannot read the safetensors file" in capsys.readouterr().err

    torch.save(to_reference_state_dict(tiny_model("ddl-scalar")), tmp_path / "ok.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli.main(["convert-reference", str(tmp_path / "ok.pt"), str(tmp_path / "full")]) == 2
    assert "OUTPUT_DIR" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_export_refuses_a_model_the_authors_code_cannot_represent(tmp_path, capsys):
    for overrides, field in [
        ({"compressor_form": "free"}, "compressor_form='free'"),
        ({"qk_norm_position": "before_rope"}, "qk_norm_position='before_rope'"),
        ({"gate_hidden_size": 8}, "gate_hidden_size=8"),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps=1e-06"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"DDLConfig.{field} cannot be exported")):
            to_reference_state_dict(tiny_model("ddl-cc", **overrides))
    tiny_model("ddl-cc", compressor_form="free").save_pretrained(tmp_path / "free")
    assert cli.main(["export-reference", str(tmp_path / "free"), str(tmp_path / "theirs.pt")]) == 2
    assert "compressor_form='free' cannot be exported" in capsys.readouterr().err
    assert not (tmp_path / "theirs.pt").exists()


def test_export_refuses_an_untied_head_which_their_gpt_would_load_as_the_embeddings(tmp_path, capsys):
    """Their GPT ties `lm_head` to `wte` when it is built, so a strict `load_state_dict` of a file with two different
    tensors makes the embeddings the head: the logits of an exported untied model would be far off, silently."""
    with pytest.raises(ValueError, match=re.escape("DDLConfig.tie_word_embeddings=False cannot be exported")):
        to_reference_state_dict(trained_looking("ddl-scalar", tie_word_embeddings=False))
    trained_looking("ddl-cc", tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    assert cli.main(["export-reference", str(tmp_path / "untied"), str(tmp_path / "theirs.safetensors")]) == 2
    message = capsys.readouterr().err
    assert "tie_word_embeddings=False cannot be exported" in message and "lm_head" in message
    assert not (tmp_path / "theirs.safetensors").exists()
    # Why: a module tied as theirs is (one Parameter behind `transformer.wte` and `lm_head`) loads such a file
    # strictly and without a word, and keeps the head in both places.
    theirs = rename_to_reference(trained_looking("ddl-scalar", tie_word_embeddings=False).state_dict())
    vocab, hidden = theirs["transformer.wte.weight"].shape
    tied = torch.nn.Module()
    tied.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(vocab, hidden)})
    tied.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    tied.lm_head.weight = tied.transformer.wte.weight
    tied.load_state_dict({key: theirs[key] for key in ("transformer.wte.weight", "lm_head.weight")}, strict=True)
    assert torch.equal(tied.transformer.wte.weight, theirs["lm_head.weight"])
    assert not torch.equal(tied.transformer.wte.weight, theirs["transformer.wte.weight"])


def test_k_eps_form_accelerated_scales_the_guard_by_sqrt_d_and_plain_stays_the_default(tmp_path, capsys):
    """Their Triton file guards k = h / sqrt(|h|^2 + d k_eps^2) and saves the keys of their plain CC-EC file:
    `--k_eps_form accelerated` writes k_eps = sqrt(d) k_eps (their fixture on a probe: `test_authors_model.py`)."""
    model = trained_looking("ddl-cc")
    save_file(to_reference_state_dict(model), tmp_path / "theirs.safetensors")
    d = model.config.hidden_size

    def converted_k_eps(folder, *options):
        argv = ["convert-reference", str(tmp_path / "theirs.safetensors"), str(tmp_path / folder), *options]
        assert cli.main(argv) == 0
        return json.loads((tmp_path / folder / "config.json").read_text())["k_eps"]

    assert converted_k_eps("default") == 1e-5
    assert converted_k_eps("plain", "--k_eps_form", "plain") == 1e-5
    assert converted_k_eps("accelerated", "--k_eps_form", "accelerated") == pytest.approx(math.sqrt(d) * 1e-5)
    # Their `ddl_k_eps`, when it was not their default, is what gets scaled.
    overrides = ["--config_overrides", "k_eps=3e-5"]
    assert converted_k_eps("both", "--k_eps_form", "accelerated", *overrides) == pytest.approx(math.sqrt(d) * 3e-5)
    input_ids = random_tokens(1, 7, seed=6)
    accelerated = AutoModelForCausalLM.from_pretrained(tmp_path / "accelerated")
    assert torch.allclose(logits_of(accelerated, input_ids), logits_of(model, input_ids), atol=1e-5)

    # Their Triton file has only the CC-EC model; other keys with that form are refused.
    theirs = to_reference_state_dict(trained_looking("ddl-tc"))
    with pytest.raises(ValueError, match="--k_eps_form accelerated: their accelerated file"):
        from_reference_state_dict(theirs, k_eps_form="accelerated")
    with pytest.raises(ValueError, match="k_eps_form must be one of"):
        from_reference_state_dict(theirs, k_eps_form="triton")
    argv = ["convert-reference", str(tmp_path / "theirs.safetensors"), str(tmp_path / "bad"), "--k_eps_form", "fast"]
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "invalid choice: 'fast'" in capsys.readouterr().err
