"""Task heads: `DDLForSequenceClassification`, `DDLForTokenClassification` and `DDLForQuestionAnswering`
(transformers' generic heads on the DDL backbone), through the Auto classes, from a causal-LM checkpoint, as
remote code in a fresh process, with `Trainer` and with LoRA."""

import inspect
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    Trainer,
    TrainingArguments,
)

from conftest import TINY_VOCAB, perturb, random_tokens, run_fresh_python, tiny_model
from ddl_hf import (
    PRESET_VARIANTS,
    DDLConfig,
    DDLForCausalLM,
    DDLForQuestionAnswering,
    DDLForSequenceClassification,
    DDLForTokenClassification,
    DDLModel,
)

VARIANTS = list(PRESET_VARIANTS)
PAD = 0
# (Auto class, head class, the head's own weights)
HEADS = [
    (AutoModelForSequenceClassification, DDLForSequenceClassification, {"score.weight"}),
    (AutoModelForTokenClassification, DDLForTokenClassification, {"score.weight", "score.bias"}),
    (AutoModelForQuestionAnswering, DDLForQuestionAnswering, {"qa_outputs.weight", "qa_outputs.bias"}),
]
HEAD_IDS = [head.__name__ for _, head, _ in HEADS]


def head_config(variant: str = "ddl-cc", **overrides) -> DDLConfig:
    return DDLConfig.from_preset("tiny", variant, **{"num_labels": 3, "pad_token_id": PAD, **overrides})


def make_head(head_class, variant: str = "ddl-cc", seed: int = 0, **overrides):
    """A head on a tiny backbone, moved off its initialization (head included), in eval mode."""
    torch.manual_seed(seed)
    return perturb(head_class(head_config(variant, **overrides)), 0.1, seed=seed + 1).eval()


def outputs_of(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        output = model(ids)
    return {key: value for key, value in output.items() if key in ("logits", "start_logits", "end_logits")}


# --------------------------------------------------------------------------- construction and forward
@pytest.mark.parametrize(("auto_class", "head_class", "head_keys"), HEADS, ids=HEAD_IDS)
def test_auto_classes_build_each_head_on_the_ddl_backbone(auto_class, head_class, head_keys):
    config = head_config()
    model = auto_class.from_config(config)
    assert type(model) is head_class
    assert type(model.model) is DDLModel and model.base_model is model.model
    own = {name for name in model.state_dict() if not name.startswith("model.")}
    assert own == head_keys


def test_heads_read_the_final_readout_of_the_backbone():
    ids = random_tokens(2, 7, seed=1, low=1)
    for head_class in (DDLForSequenceClassification, DDLForTokenClassification, DDLForQuestionAnswering):
        model = make_head(head_class, "ddl-tc")
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state
            output = model(ids)
        assert hidden.shape == (2, 7, 32)
        if head_class is DDLForSequenceClassification:
            assert torch.equal(output.logits, model.score(hidden)[:, -1])  # no padding: the last token
        elif head_class is DDLForTokenClassification:
            assert torch.equal(output.logits, model.score(hidden))  # eval: dropout is the identity
        else:
            start, end = model.qa_outputs(hidden).unbind(-1)
            assert torch.equal(output.start_logits, start) and torch.equal(output.end_logits, end)


def test_head_losses_are_the_standard_ones():
    ids = random_tokens(3, 6, seed=2, low=1)
    classifier = make_head(DDLForSequenceClassification)
    labels = torch.tensor([2, 0, 1])
    output = classifier(ids, labels=labels)
    assert classifier.config.problem_type == "single_label_classification"
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels), rtol=0, atol=1e-7)

    tagger = make_head(DDLForTokenClassification)
    tags = torch.tensor([[0, 1, 2, -100, 1, 0], [2, 2, -100, -100, 0, 1], [1, 0, 0, 0, 2, -100]])
    output = tagger(ids, labels=tags)
    torch.testing.assert_close(
        output.loss, F.cross_entropy(output.logits.reshape(-1, 3), tags.reshape(-1)), rtol=0, atol=1e-7
    )

    reader = make_head(DDLForQuestionAnswering)
    starts, ends = torch.tensor([1, 0, 3]), torch.tensor([2, 4, 5])
    output = reader(ids, start_positions=starts, end_positions=ends)
    expected = (F.cross_entropy(output.start_logits, starts) + F.cross_entropy(output.end_logits, ends)) / 2
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sequence_classifier_gives_each_padded_row_its_unpadded_logits(variant):
    model = make_head(DDLForSequenceClassification, variant)
    lengths = [8, 5, 3]
    rows = [random_tokens(1, n, seed=10 + i, low=1)[0] for i, n in enumerate(lengths)]
    with torch.no_grad():
        alone = torch.cat([model(row[None]).logits for row in rows])
        for side in ("left", "right"):
            ids = torch.full((3, 8), PAD)
            mask = torch.zeros(3, 8, dtype=torch.long)
            for i, row in enumerate(rows):
                span = slice(8 - len(row), 8) if side == "left" else slice(0, len(row))
                ids[i, span], mask[i, span] = row, 1
            batched = model(ids, attention_mask=mask).logits
            torch.testing.assert_close(batched, alone, rtol=0, atol=2e-5, msg=f"{side} padding")


def test_sequence_classifier_needs_a_pad_token_for_batches():
    model = make_head(DDLForSequenceClassification, pad_token_id=None)
    ids = random_tokens(2, 5, seed=3, low=1)
    with pytest.raises(ValueError, match="no padding token is defined"):
        model(ids)
    assert model(ids[:1]).logits.shape == (1, 3)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(("auto_class", "head_class", "head_keys"), HEADS, ids=HEAD_IDS)
def test_a_causal_lm_checkpoint_loads_into_each_head_which_is_initialized_and_reported(
    auto_class, head_class, head_keys, tied, tmp_path
):
    lm = perturb(tiny_model("ddl-tc", tie_word_embeddings=tied).eval(), 0.1, seed=4)
    lm.save_pretrained(tmp_path)
    model, info = auto_class.from_pretrained(tmp_path, num_labels=4, pad_token_id=PAD, output_loading_info=True)
    assert type(model) is head_class
    assert info["missing_keys"] == head_keys  # the new head, initialized
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()  # an untied lm_head is dropped
    assert model.config.num_labels == 4 and model.config.pad_token_id == PAD
    backbone = model.model.state_dict()
    assert all(torch.equal(backbone[key], value) for key, value in lm.model.state_dict().items())
    head_weight = (model.score if hasattr(model, "score") else model.qa_outputs).weight
    assert head_weight.shape[1] == 32 and torch.isfinite(head_weight).all() and head_weight.abs().sum() > 0
    ids = random_tokens(2, 6, seed=5, low=1)
    with torch.no_grad():
        assert torch.equal(model.eval().model(ids).last_hidden_state, lm.model(ids).last_hidden_state)
    # Without output_loading_info the missing head is initialized too (the backbone is complete); strict=True
    # wants every weight from the file, the head's included.
    assert type(auto_class.from_pretrained(tmp_path, num_labels=4)) is head_class
    with pytest.raises(ValueError, match=r"weight\(s\) missing from the file: " + sorted(head_keys)[0]):
        auto_class.from_pretrained(tmp_path, num_labels=4, strict=True)


@pytest.mark.parametrize(("auto_class", "head_class", "head_keys"), HEADS, ids=HEAD_IDS)
def test_a_saved_head_reloads_bit_exact_and_its_folder_loads_the_backbone(auto_class, head_class, head_keys, tmp_path):
    model = make_head(head_class, "ddl-cc")
    model.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["auto_map"] == {
        "AutoConfig": "configuration_ddl.DDLConfig",
        "AutoModel": "modeling_ddl.DDLModel",
        auto_class.__name__: f"modeling_ddl_heads.{head_class.__name__}",
    }
    assert config_json["architectures"] == [head_class.__name__]
    ids = random_tokens(2, 6, seed=6, low=1)
    expected = outputs_of(model, ids)
    for loader in (head_class.from_pretrained, auto_class.from_pretrained):
        reloaded = loader(tmp_path).eval()
        assert type(reloaded) is head_class
        assert reloaded.config.to_dict() == model.config.to_dict()
        got = outputs_of(reloaded, ids)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    backbone = AutoModel.from_pretrained(tmp_path).eval()  # the head's weights are dropped on purpose
    assert type(backbone) is DDLModel
    with torch.no_grad():
        assert torch.equal(backbone(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_a_classifier_loads_with_a_new_label_set_as_in_transformers(tmp_path):
    """Issue 27: fine-tuning a classifier for another task. `num_labels` unlike the saved `id2label` replaces the
    label map (as `PreTrainedConfig.from_dict` does for Llama); the `score` weight then differs in shape: the
    RuntimeError of transformers without `ignore_mismatched_sizes`, a re-initialized head with it."""
    names = {0: "negative", 1: "neutral", 2: "positive"}
    saved = make_head(DDLForSequenceClassification, id2label=names, label2id={v: k for k, v in names.items()})
    saved.save_pretrained(tmp_path)
    saved_json = json.loads((tmp_path / "config.json").read_text())
    # What transformers makes of the same label fields.
    expected = LlamaConfig.from_dict({key: saved_json[key] for key in ("id2label", "label2id")}, num_labels=42)
    assert expected.id2label == {i: f"LABEL_{i}" for i in range(42)}
    for load_config in (DDLConfig.from_pretrained, AutoConfig.from_pretrained):
        config = load_config(tmp_path, num_labels=42)
        assert (config.num_labels, config.id2label, config.label2id) == (42, expected.id2label, expected.label2id)
    with pytest.raises(RuntimeError, match=r"score\.weight: copying a param with shape \(3, 32\)"):
        DDLForSequenceClassification.from_pretrained(tmp_path, num_labels=42)
    for loader in (DDLForSequenceClassification, AutoModelForSequenceClassification):
        model, info = loader.from_pretrained(
            tmp_path, num_labels=42, ignore_mismatched_sizes=True, output_loading_info=True
        )
        assert type(model) is DDLForSequenceClassification
        assert (model.config.num_labels, model.config.id2label) == (42, expected.id2label)
        assert info["mismatched_keys"] == {("score.weight", torch.Size([3, 32]), torch.Size([42, 32]))}
        assert not info["missing_keys"] and not info["unexpected_keys"]
        backbone = model.model.state_dict()
        assert all(torch.equal(backbone[key], value) for key, value in saved.model.state_dict().items())
        assert abs(model.score.weight.std().item() - model.config.initializer_range) < 0.003  # re-initialized
        assert model.eval()(random_tokens(2, 5, seed=3, low=1)).logits.shape == (2, 42)
    # The saved number of labels keeps the saved names and head.
    same = DDLForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert same.config.id2label == names and torch.equal(same.score.weight, saved.score.weight)
    # Values that are no number of labels are still refused, naming the field and the file.
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match=r"config\.json: DDLConfig\.num_labels must be an integer >= 1"):
            DDLForSequenceClassification.from_pretrained(tmp_path, num_labels=bad)


LLAMA_COUNTERPARTS = [
    (DDLModel, LlamaModel),
    (DDLForCausalLM, LlamaForCausalLM),
    (DDLForSequenceClassification, LlamaForSequenceClassification),
    (DDLForTokenClassification, LlamaForTokenClassification),
    (DDLForQuestionAnswering, LlamaForQuestionAnswering),
]


@pytest.mark.parametrize(
    ("ddl_class", "llama_class"), LLAMA_COUNTERPARTS, ids=[c.__name__ for c, _ in LLAMA_COUNTERPARTS]
)
def test_forward_signatures_name_the_arguments_llamas_do(ddl_class, llama_class):
    """transformers' shared tests (`test_inputs_embeds`, ...) and `generate` read these signatures: `inputs_embeds`,
    `cache` and `use_cache` must be named parameters, in Llama's order, not hidden in `**kwargs`."""
    ours = list(inspect.signature(ddl_class.forward).parameters)
    theirs = list(inspect.signature(llama_class.forward).parameters)
    assert ours == theirs
    if ddl_class is not DDLForCausalLM:
        return
    model = perturb(tiny_model("ddl-tc").eval(), 0.05, seed=2)
    ids = random_tokens(2, 6, seed=4)
    with torch.no_grad():
        full = model(ids)
        prefix = model(None, None, None, None, model.get_input_embeddings()(ids[:, :4]), None, True)
        assert torch.equal(prefix.logits, full.logits[:, :4])
        step = model(inputs_embeds=model.get_input_embeddings()(ids[:, 4:]), cache=prefix.cache, use_cache=True)
        torch.testing.assert_close(step.logits, full.logits[:, 4:], rtol=0, atol=1e-5)
        assert step.cache.get_seq_length() == 6
        assert model(ids, use_cache=False).cache is None


REMOTE_HEADS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "ddl_hf"))]
    sys.modules["ddl_hf"] = None  # an installed package (editable finders included) cannot be imported

    import torch
    import transformers

    root = sys.argv[1]
    inputs = torch.load(os.path.join(root, "inputs.pt"))
    results = {}
    for auto_name, folder in inputs["folders"].items():
        model = getattr(transformers, auto_name).from_pretrained(os.path.join(root, folder), trust_remote_code=True)
        backbone = transformers.AutoModel.from_pretrained(os.path.join(root, folder), trust_remote_code=True)
        with torch.no_grad():
            output = model.eval()(inputs["ids"])
            results[auto_name] = {
                "class": type(model).__name__,
                "module": type(model).__module__,
                "outputs": {k: v for k, v in output.items() if k in ("logits", "start_logits", "end_logits")},
                "backbone_class": type(backbone).__name__,
                "hidden": backbone.eval()(inputs["ids"]).last_hidden_state,
            }
    results["package_modules_loaded"] = sorted(
        name for name, module in sys.modules.items() if name.split(".")[0] == "ddl_hf" and module is not None
    )
    torch.save(results, os.path.join(root, "results.pt"))
    """
)


@pytest.mark.slow
def test_each_head_loads_as_remote_code_in_a_fresh_process_without_the_package(tmp_path):
    ids = random_tokens(2, 7, seed=7, low=1)
    expected, folders = {}, {}
    for auto_class, head_class, _ in HEADS:
        model = make_head(head_class, "ddl-tc")
        model.save_pretrained(tmp_path / head_class.__name__)
        folders[auto_class.__name__] = head_class.__name__
        with torch.no_grad():
            expected[auto_class.__name__] = (outputs_of(model, ids), model.model(ids).last_hidden_state)
    torch.save({"ids": ids, "folders": folders}, tmp_path / "inputs.pt")
    completed = run_fresh_python(REMOTE_HEADS_SCRIPT, tmp_path, cwd=tmp_path, modules_cache=tmp_path / "hf_modules")
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt")
    assert results.pop("package_modules_loaded") == []
    for auto_name, (outputs, hidden) in expected.items():
        result = results[auto_name]
        assert result["class"] == folders[auto_name]
        assert result["module"].startswith("transformers_modules.") and result["module"].endswith(".modeling_ddl_heads")
        assert result["outputs"].keys() == outputs.keys()
        assert all(torch.equal(result["outputs"][key], outputs[key]) for key in outputs), auto_name
        assert result["backbone_class"] == "DDLModel"
        assert torch.equal(result["hidden"], hidden)


# --------------------------------------------------------------------------- fine-tuning
MARKER = 7  # the class: does the sequence contain this token?


def marker_task(count: int, seed: int, length: int = 8) -> list[dict]:
    """Balanced: odd examples carry MARKER at a random position, even ones never contain it (tokens from
    [8, vocab)). The label cannot be read from any single position, so the last token has to attend."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, TINY_VOCAB, (count, length), generator=generator)
    labels = torch.arange(count) % 2
    positions = torch.randint(0, length, (count,), generator=generator)
    rows = torch.nonzero(labels).squeeze(1)
    ids[rows, positions[rows]] = MARKER
    return [{"input_ids": row, "labels": int(label)} for row, label in zip(ids, labels)]


def accuracy(trainer: Trainer, examples: list[dict]) -> float:
    prediction = trainer.predict(examples)
    predictions = torch.as_tensor(prediction.predictions).argmax(-1)
    return (predictions == torch.as_tensor(prediction.label_ids)).float().mean().item()


def test_trainer_fine_tunes_a_sequence_classifier_well_above_chance(tmp_path):
    """512 training examples, 60 steps of 32 (under 10 s on 2 CPU cores); with these seeds the held-out
    accuracy reaches 1.0 (ddl-cc) from 0.5 at initialization. 0.9 leaves room for float differences across
    machines while staying far above chance (0.5): 230 of 256 right has probability < 1e-35 by guessing."""
    torch.manual_seed(0)
    model = DDLForSequenceClassification(DDLConfig.from_preset("tiny", "ddl-cc", num_labels=2, pad_token_id=PAD))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_steps=60,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        warmup_steps=10,
        weight_decay=0.0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=marker_task(512, seed=1))
    held_out = marker_task(256, seed=2)
    before = accuracy(trainer, held_out)
    trainer.train()
    after = accuracy(trainer, held_out)
    assert 0.35 <= before <= 0.65, before
    assert after >= 0.9, f"held-out accuracy {after:.3f} (before training {before:.3f})"


def test_lora_adapts_a_sequence_classifier_and_its_adapter_reloads_exactly(tmp_path):
    base = perturb(DDLForSequenceClassification(head_config("ddl-cc", num_labels=2)), 0.05, seed=8)
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "beta_proj", "value_proj"],
    )
    model = get_peft_model(DDLForSequenceClassification.from_pretrained(tmp_path / "base"), lora)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("score.modules_to_save" in name for name in trainable)  # the new head is trained in full
    assert all("lora_" in name or "score.modules_to_save" in name for name in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    examples = marker_task(64, seed=3)
    ids = torch.stack([example["input_ids"] for example in examples])
    labels = torch.tensor([example["labels"] for example in examples])
    with torch.no_grad():
        before = model.eval()(ids).logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(6):
        batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-2, "LoRA training did not change the classifier's outputs"
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    trained_score = dict(model.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
    assert not torch.equal(trained_score, base.score.weight)

    model.save_pretrained(tmp_path / "adapter")
    fresh_base = DDLForSequenceClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, after)
        merged = reloaded.merge_and_unload()
        assert type(merged) is DDLForSequenceClassification
        torch.testing.assert_close(merged(ids).logits, after, rtol=0, atol=1e-5)
