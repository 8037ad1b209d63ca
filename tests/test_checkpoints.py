"""Checkpoints: bad folders fail loudly, and a committed fixture guards the checkpoint format.

A DDL model never comes back silently half-initialized: a truncated safetensors file or an invalid
config.json raises a ValueError that names the file and the problem; weights of another shape than the
config's raise transformers' RuntimeError naming them; missing DDL weights and DDL weights the config has
no place for are named in a warning (transformers' own report lists every key); `strict=True` refuses
any missing, extra or reshaped tensor with a ValueError naming the file and the keys.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conftest import ddl_warnings, perturb, random_tokens, run_fresh_python, tiny_model, transformers_report
from ddl_hf import DDLConfig, DDLForCausalLM, DDLModel

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "ddl-tc-tiny"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ddl-tc checkpoint (moved off its init) and the logits it gives."""
    model = perturb(tiny_model("ddl-tc").eval(), 0.1)
    path = tmp_path_factory.mktemp("good")
    model.save_pretrained(path)
    inputs = random_tokens(2, 7)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return path, inputs, logits


def _copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _rewrite_weights(folder: Path, edit) -> None:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------- good checkpoints still load
@pytest.mark.device
def test_valid_checkpoint_round_trips_with_empty_loading_info(saved, device):
    """Loaded onto the device under test (`device_map`), the checkpoint gives the logits of the saved model run
    there; on the CPU those are the logits recorded when it was saved, bit for bit."""
    path, inputs, logits = saved
    if device.type != "cpu":
        with torch.no_grad():
            logits = DDLForCausalLM.from_pretrained(path).eval().to(device)(input_ids=inputs.to(device)).logits
    placement = {} if device.type == "cpu" else {"device_map": str(device)}
    model, info = DDLForCausalLM.from_pretrained(path, output_loading_info=True, **placement)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert {parameter.device for parameter in model.parameters()} == {device}
    inputs = inputs.to(device)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=inputs).logits, logits, rtol=0, atol=0)
        auto = AutoModelForCausalLM.from_pretrained(path, **placement)
        torch.testing.assert_close(auto(input_ids=inputs).logits, logits, rtol=0, atol=0)


def test_strict_loading_keeps_dtype_meta_device_and_backbone_loading_working(saved, tmp_path):
    path = saved[0]
    bf16 = DDLForCausalLM.from_pretrained(path, dtype=torch.bfloat16, strict=True)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    meta = DDLForCausalLM.from_pretrained(path, device_map="meta", strict=True)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    backbone = AutoModel.from_pretrained(path, strict=True)
    assert type(backbone) is DDLModel
    # The backbone of an untied causal LM drops its head on purpose: not an error, even under strict.
    untied = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc", tie_word_embeddings=False))
    untied.save_pretrained(tmp_path / "untied")
    reloaded = DDLModel.from_pretrained(tmp_path / "untied", strict=True)
    torch.testing.assert_close(reloaded.embed_tokens.weight, untied.model.embed_tokens.weight, rtol=0, atol=0)


# --------------------------------------------------------------------------- weights that do not match
@pytest.mark.parametrize(
    ("changes", "expected", "by_default"),
    [
        (
            dict(hidden_size=64, head_dim=32),
            r"with a different shape: model\.embed_expansion\.conv_weight \(file",
            (RuntimeError, r"size mismatch for model\.embed_expansion\.conv_weight: copying a param with shape"),
        ),
        (
            dict(value_channels=2),
            r"15 weight\(s\) with a different shape: .*\(file \(128, 1, 4\) vs model \(64, 1, 4\)\)",
            (RuntimeError, r"model\.embed_expansion\.conv_weight: copying a param with shape \(128, 1, 4\) from "),
        ),
        (
            dict(num_hidden_layers=3, layer_types=None),
            r"weight\(s\) missing from the file: model\.layers\.2\.",
            r"10 DDL weight\(s\) missing from the file, initialized from scratch: model\.layers\.2\.attn_shortcut\.",
        ),
        (
            dict(num_hidden_layers=1, layer_types=None),
            r"unexpected weight\(s\) in the file: model\.layers\.1\.",
            r"DDL weight\(s\) in the file that the config has no place for, dropped: model\.layers\.1\.attn_shortcut",
        ),
        (
            dict(state_compressor="channel"),
            r"unexpected weight\(s\) in the file: model\.layers\.0\.compressor\.conv",
            r"missing from the file, .*channel_kernel.*no place for, dropped: .*"
            r"model\.layers\.\{0, 1\}\.compressor\.conv",
        ),
        (
            dict(gate_hidden_size=4),
            r"missing from the file: .*beta_hidden.*with a different shape: .*beta_proj",
            (RuntimeError, r"size mismatch for model\.layers\.0\.attn_shortcut\.beta_proj\.weight"),
        ),
    ],
    ids=["hidden_size", "value_channels", "more-layers", "fewer-layers", "compressor-kind", "gate-hidden"],
)
def test_config_edited_away_from_the_weights_fails_or_is_named_and_is_refused_under_strict(
    saved, tmp_path, load_log, changes, expected, by_default
):
    folder = _copy(saved[0], tmp_path / "edited")
    _edit_config(folder, **changes)
    for loader in (DDLForCausalLM, AutoModelForCausalLM):
        with pytest.raises(ValueError, match=expected) as error:
            loader.from_pretrained(folder, strict=True)
        message = str(error.value)
        assert message.startswith(f"{folder / 'model.safetensors'} does not match the DDLForCausalLM")
        assert "Refusing to return a partly initialized model" in message
        # Without strict: transformers' RuntimeError for other shapes; missing or dropped DDL weights are named.
        load_log.clear()
        if isinstance(by_default, tuple):
            with pytest.raises(by_default[0], match=by_default[1]) as error:
                loader.from_pretrained(folder)
            assert str(folder / "model.safetensors") in str(error.value)
        else:
            loader.from_pretrained(folder)
            (warning,) = ddl_warnings(load_log)
            assert warning.startswith(f"{folder / 'model.safetensors'}: ")
            assert re.search(by_default, warning), warning


def test_missing_and_unexpected_tensors_are_listed(saved, tmp_path, load_log):
    missing = _copy(saved[0], tmp_path / "missing")
    _rewrite_weights(missing, lambda w: w.pop("model.layers.1.mlp_shortcut.value_proj.weight"))
    with pytest.raises(
        ValueError, match=r"1 weight\(s\) missing from the file: model\.layers\.1\.mlp_shortcut\.value_"
    ):
        DDLForCausalLM.from_pretrained(missing, strict=True)
    DDLForCausalLM.from_pretrained(missing)
    (warning,) = ddl_warnings(load_log)
    named = "1 DDL weight(s) missing from the file, initialized from scratch: model.layers.1.mlp_shortcut.value_proj"
    assert named + ".weight" in warning

    extra = _copy(saved[0], tmp_path / "extra")
    _rewrite_weights(extra, lambda w: w.update({"model.layers.0.old_gate.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"1 unexpected weight\(s\) in the file: model\.layers\.0\.old_gate\.weight"):
        DDLForCausalLM.from_pretrained(extra, strict=True)
    load_log.clear()
    DDLForCausalLM.from_pretrained(extra)  # no DDL module has it: transformers' report names it
    assert ddl_warnings(load_log) == []
    report = transformers_report(load_log)
    assert "model.layers.0.old_gate.weight" in report and "UNEXPECTED" in report

    renamed = _copy(saved[0], tmp_path / "renamed")
    _rewrite_weights(renamed, lambda w: w.update({"model.readout.read_v": w.pop("model.readout.read_vector")}))
    with pytest.raises(ValueError, match=r"missing from the file: model\.readout\.read_vector.*unexpected weight"):
        DDLForCausalLM.from_pretrained(renamed, strict=True)
    load_log.clear()
    DDLForCausalLM.from_pretrained(renamed)
    (warning,) = ddl_warnings(load_log)
    assert re.search(
        r"missing from the file, .*: model\.readout\.read_vector; .*dropped: model\.readout\.read_v\b", warning
    )


def test_many_problems_are_summarized_not_dumped(saved, tmp_path, load_log):
    folder = _copy(saved[0], tmp_path / "empty")
    save_file({"unrelated": torch.zeros(1)}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weight\(s\) missing from the file: .* and \d+ more") as error:
        DDLForCausalLM.from_pretrained(folder, strict=True)
    assert len(str(error.value)) < 2000
    DDLForCausalLM.from_pretrained(folder)
    (warning,) = ddl_warnings(load_log)  # every DDL weight named, the layers merged as in transformers' report
    assert "model.layers.{0, 1}.attn_shortcut.beta_proj.weight" in warning and len(warning) < 2000


def test_ignore_mismatched_sizes_still_reinitializes_on_request(saved, tmp_path):
    folder = _copy(saved[0], tmp_path / "resized")
    _edit_config(folder, value_channels=2)
    model, info = DDLForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.config.value_channels == 2
    assert {key for key, _, _ in info["mismatched_keys"]} >= {"model.readout.read_vector"}


# --------------------------------------------------------------------------- unreadable files
@pytest.mark.parametrize("keep", [0.5, 0.9, 40 / 128_000, 0.0], ids=["half", "most", "header-cut", "empty"])
def test_truncated_safetensors_is_refused_naming_the_file(saved, tmp_path, keep):
    folder = _copy(saved[0], tmp_path / "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    for loader in (DDLForCausalLM, AutoModelForCausalLM):
        with pytest.raises(ValueError, match=r"cannot read the safetensors weights .*truncated or corrupt") as error:
            loader.from_pretrained(folder)
        assert str(error.value).startswith(f"{weights}: ")


def test_corrupt_shard_of_a_sharded_checkpoint_is_named(tmp_path):
    model = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc"))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        DDLForCausalLM.from_pretrained(tmp_path)
    assert str(error.value).startswith(f"{shards[-1]}: ")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(residual_mode="foo"), "residual_mode"),
        (dict(state_compressor="pool"), "state_compressor"),
        (dict(value_channels=0), "value_channels"),
        (dict(beta_init=3.0), "beta_init"),
    ],
)
def test_config_with_invalid_ddl_field_is_refused_naming_the_file(saved, tmp_path, changes, field):
    folder = _copy(saved[0], tmp_path / "badconfig")
    _edit_config(folder, **changes)
    expected = f"{folder / 'config.json'}: DDLConfig.{field} must be"
    for load in (DDLForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError) as error:
            load(folder)
        assert str(error.value).startswith(expected), str(error.value)
    with pytest.raises(ValueError, match="^" + str(folder / "config.json")):
        DDLConfig.from_pretrained(folder / "config.json")


@pytest.mark.slow
def test_remote_code_loading_is_strict_too_and_writes_the_model_card(saved, tmp_path):
    """In a process without ddl_hf, the copied modeling code names a missing DDL weight, refuses a bad folder under
    strict=True, and saves a model card."""
    good = _copy(saved[0], tmp_path / "good")
    bad = _copy(saved[0], tmp_path / "bad")
    _rewrite_weights(bad, lambda w: (w.pop("model.norm.weight"), w.pop("model.layers.0.attn_shortcut.beta_proj.bias")))
    (good / "README.md").unlink()
    script = textwrap.dedent(
        """
        import os, sys
        sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "ddl_hf"))]
        sys.modules["ddl_hf"] = None
        from transformers import AutoModelForCausalLM
        good, bad, resaved = sys.argv[1:4]
        model = AutoModelForCausalLM.from_pretrained(good, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        model.save_pretrained(resaved)
        _, info = AutoModelForCausalLM.from_pretrained(bad, trust_remote_code=True, output_loading_info=True)
        print("MISSING:", sorted(info["missing_keys"]))
        try:
            AutoModelForCausalLM.from_pretrained(bad, trust_remote_code=True, strict=True)
        except ValueError as error:
            print("REFUSED:", error)
        """
    )
    completed = run_fresh_python(script, good, bad, tmp_path / "resaved", cwd=tmp_path, modules_cache=tmp_path / "hf")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "MISSING: ['model.layers.0.attn_shortcut.beta_proj.bias', 'model.norm.weight']" in completed.stdout
    warning = f"{bad / 'model.safetensors'}: 1 DDL weight(s) missing from the file, initialized from scratch: "
    assert warning + "model.layers.0.attn_shortcut.beta_proj.bias. " in completed.stderr  # the copied module's logger
    assert f"REFUSED: {bad / 'model.safetensors'} does not match" in completed.stdout
    assert "missing from the file: model.layers.0.attn_shortcut.beta_proj.bias, model.norm.weight" in completed.stdout
    card = (tmp_path / "resaved" / "README.md").read_text()
    assert "variant `ddl-tc`" in card and "trust_remote_code=True" in card
    assert (tmp_path / "resaved" / "model_card.py").is_file()


# --------------------------------------------------------------------------- committed fixture
def _fixture_expected() -> dict:
    return json.loads((FIXTURE_DIR / "expected_outputs.json").read_text())


def test_fixture_is_small_and_holds_every_parameter_kind():
    sizes = {path.name: path.stat().st_size for path in FIXTURE_DIR.iterdir()}
    assert set(sizes) == {"config.json", "model.safetensors", "expected_outputs.json"}
    assert sum(sizes.values()) < 32_000
    names = set(load_file(FIXTURE_DIR / "model.safetensors"))
    kinds = {".".join(part for part in name.split(".") if not part.isdigit()) for name in names}
    assert kinds == {
        "model.embed_tokens.weight",
        "model.embed_expansion.conv_weight",
        "model.layers.compressor.conv_weight",
        "model.layers.compressor.read_weight",
        "model.layers.input_layernorm.weight",
        "model.layers.post_attention_layernorm.weight",
        *(f"model.layers.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
        *(f"model.layers.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
        *(
            f"model.layers.{shortcut}.{p}.{kind}"
            for shortcut in ("attn_shortcut", "mlp_shortcut")
            for p in ("beta_hidden", "beta_proj", "value_proj")
            for kind in ("weight", "bias")
        ),
        "model.readout.conv_weight",
        "model.readout.read_weight",
        "model.norm.weight",
    }


@pytest.mark.parametrize("loader", [DDLForCausalLM, AutoModelForCausalLM], ids=["class", "auto"])
def test_committed_fixture_reproduces_its_logits_and_generation(loader):
    """A checkpoint written by an earlier version loads with the current code and gives the same outputs.

    A renamed parameter fails the strict loading; a changed default, init or forward changes the float64
    logits by far more than float64 rounding. The float32 logits carry ~1e-6 of rounding that depends on
    the CPU's kernels (the fixture was written on another machine), so they are checked against the float64
    ones at float32 accuracy.
    """
    expected = _fixture_expected()
    model = loader.from_pretrained(FIXTURE_DIR).eval()
    assert type(model) is DDLForCausalLM
    assert model.config.variant_name == "ddl-tc"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(expected["input_ids"])).logits
        generated = model.generate(
            torch.tensor(expected["generation_prompt"]),
            max_new_tokens=len(expected["generated_ids"][0]) - len(expected["generation_prompt"][0]),
            do_sample=False,
        )
    with torch.no_grad():
        logits_float64 = model.double()(input_ids=torch.tensor(expected["input_ids"])).logits
    exact = torch.tensor(expected["logits_float64"], dtype=torch.float64)
    torch.testing.assert_close(logits_float64, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5)
    assert generated.tolist() == expected["generated_ids"]


def test_fixture_script_rebuilds_the_same_checkpoint_from_the_same_seed(tmp_path):
    """scripts/make_fixture.py is deterministic: today it regenerates the committed weights bit for bit, so
    a fixture refresh (on a deliberate format change) is reviewable as a real change."""
    spec = importlib.util.spec_from_file_location("make_fixture", REPO_ROOT / "scripts" / "make_fixture.py")
    make_fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixture)
    rebuilt = make_fixture.build_fixture_model().state_dict()
    committed = load_file(FIXTURE_DIR / "model.safetensors")
    for name, tensor in committed.items():
        assert torch.equal(rebuilt[name], tensor), name
