"""DDL models inside the tools people already use: peft, pipelines, lm-evaluation-harness, model cards.

LoRA module names of a DDL model (documented in docs/ecosystem.md):

- attention: `q_proj`, `k_proj`, `v_proj`, `o_proj`
- SwiGLU MLP: `gate_proj`, `up_proj`, `down_proj`
- DDL residual writes (every `DeltaShortcut`): `beta_proj` (gate logit), `value_proj` (value v), and
  `beta_hidden` when `gate_hidden_size > 0`
- state compressors and token filters are raw parameters (`read_weight`, `conv_weight`), trained in full
  with `modules_to_save=["compressor", "readout", "embed_expansion"]`
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments, pipeline

from conftest import tiny_model
from ddl_hf import DDLConfig, DDLForCausalLM, DDLModel
from ddl_hf.models.ddl.model_card import DDL_FIELDS, GENERATED_MARKER, write_model_card

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]
DDL_WRITE_MODULES = ["beta_proj", "value_proj"]
FULLY_TRAINED_MODULES = ["compressor", "readout", "embed_expansion"]
END_OF_TEXT = "<|endoftext|>"


# --------------------------------------------------------------------------- shared tiny assets
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE (320 tokens) trained offline on the source of `textwrap`, saved as a fast tokenizer."""
    corpus = inspect.getsource(textwrap)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT, model_max_length=128
    )
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


def _save_model_with_tokenizer(tmp_path_factory, tokenizer, variant: str):
    model = tiny_model(
        variant,
        seed=1,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).eval()
    path = tmp_path_factory.mktemp(f"model-{variant}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


# --------------------------------------------------------------------------- peft
def _next_token_batch(vocab_size: int, num_sequences: int = 8, length: int = 12) -> list[dict]:
    """Deterministic training rows: a repeating counting pattern, so the loss can fall in a few steps."""
    rows = []
    for row in range(num_sequences):
        ids = [(row + 3 * position) % vocab_size for position in range(length)]
        rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return rows


def _train_few_steps(model, output_dir, steps: int = 4) -> list[float]:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_next_token_batch(model.config.vocab_size))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc"])
def test_lora_trains_saves_reloads_and_merges_with_identical_logits(tmp_path, variant):
    """LoRA on attention, MLP and DDL write projections: trained adapter reloads bit-exactly on a fresh base,
    and merge_and_unload gives the same logits up to float reassociation."""
    base_dir = tmp_path / "base"
    DDLForCausalLM(DDLConfig.from_preset("tiny", variant)).save_pretrained(base_dir)
    targets = ATTENTION_MODULES + MLP_MODULES + DDL_WRITE_MODULES
    # The compressors and token filters are raw parameters, not Linear layers: trained in full.
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=FULLY_TRAINED_MODULES,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(DDLForCausalLM.from_pretrained(base_dir), lora)

    wrapped = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(targets)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert {name.rsplit(".", 1)[-1] for name in trainable if "modules_to_save" in name} >= {
        "read_vector",
        "conv_weight",
    }
    frozen_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}

    losses = _train_few_steps(peft_model, tmp_path / "run")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for name, parameter in peft_model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, frozen_before[name]), f"{name} changed although frozen"
    # LoRA B starts at zero: training must have moved it on every kind of target, DDL writes included.
    for target in targets:
        moved = [
            p.abs().max().item() for n, p in peft_model.named_parameters() if f"{target}.lora_B" in n and p.numel()
        ]
        assert moved and max(moved) > 0, f"LoRA on {target} received no update"
    parameters = dict(peft_model.named_parameters())
    for name, parameter in parameters.items():
        if "modules_to_save" in name:
            original = parameters[name.replace("modules_to_save.default", "original_module")]
            assert not torch.equal(parameter, original), f"{name} was not trained"

    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    saved_targets = set(json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"])
    assert saved_targets == set(targets)

    inputs = torch.tensor([[5, 17, 3, 44, 9, 60, 2, 11], [1, 2, 3, 4, 5, 6, 7, 8]])
    peft_model.eval()
    with torch.no_grad():
        trained_logits = peft_model(input_ids=inputs).logits
        base_logits = DDLForCausalLM.from_pretrained(base_dir)(input_ids=inputs).logits
        reloaded = PeftModel.from_pretrained(DDLForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        reloaded_logits = reloaded(input_ids=inputs).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids=inputs).logits

    assert (trained_logits - base_logits).abs().max() > 1e-3, "the adapter did not change the model"
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=0, atol=0)
    assert type(merged) is DDLForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged_logits, trained_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["beta_proj", "value_proj", "beta_hidden"])
def test_lora_on_a_ddl_write_projection_changes_the_output_as_merged(target):
    """An adapter on a gate or value projection must act in the forward pass (not only after merging)."""
    model = tiny_model("ddl-cc", gate_hidden_size=8).eval()
    inputs = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        base_logits = model(input_ids=inputs).logits
    # init_lora_weights=False gives a random, non-zero B so the adapter has an effect from the start.
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[target], init_lora_weights=False)).eval()
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=inputs).logits
        merged_logits = peft_model.merge_and_unload()(input_ids=inputs).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(adapted_logits, merged_logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipeline_model(tmp_path_factory, tokenizer):
    return _save_model_with_tokenizer(tmp_path_factory, tokenizer, "ddl-tc")


def _greedy_without_cache(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Reference greedy decoding: a full uncached forward per step. (1, T) -> (1, T + new_tokens)."""
    for _ in range(new_tokens):
        next_id = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=-1)
    return ids


def test_text_generation_pipeline_greedy_matches_uncached_argmax(pipeline_model, tokenizer):
    path, model = pipeline_model
    generator = pipeline("text-generation", model=str(path), device="cpu")
    assert type(generator.model) is DDLForCausalLM
    prompt = "def wrap(text, width"
    out = generator(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10, return_tensors=True)
    generated = torch.tensor(out[0]["generated_token_ids"])
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = _greedy_without_cache(model, prompt_ids, 10)[0]
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)

    text = generator(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)[0]["generated_text"]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert text.startswith(prompt)


def test_text_generation_pipeline_sampling_matches_generate_with_same_seed(pipeline_model, tokenizer):
    path, model = pipeline_model
    generator = pipeline("text-generation", model=str(path), device="cpu")
    prompt = "class TextWrapper"
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.3, top_k=50)
    torch.manual_seed(123)
    sampled = torch.tensor(generator(prompt, return_tensors=True, **settings)[0]["generated_token_ids"])
    torch.manual_seed(123)
    prompt_ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**prompt_ids, **settings)[0]
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
    assert sampled.min() >= 0 and sampled.max() < model.config.vocab_size
    torch.manual_seed(7)
    other = torch.tensor(generator(prompt, return_tensors=True, **settings)[0]["generated_token_ids"])
    assert not torch.equal(other, sampled), "sampling with another seed gave the same tokens"

    # top_k=1 sampling is greedy decoding.
    with torch.no_grad():
        greedy = _greedy_without_cache(model, prompt_ids.input_ids, 6)[0]
    top1 = generator(prompt, return_tensors=True, do_sample=True, top_k=1, max_new_tokens=6, min_new_tokens=6)
    torch.testing.assert_close(torch.tensor(top1[0]["generated_token_ids"]), greedy, rtol=0, atol=0)


# --------------------------------------------------------------------------- lm-evaluation-harness
@pytest.fixture(scope="module")
def harness():
    huggingface = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval is not installed")
    instance = pytest.importorskip("lm_eval.api.instance", reason="lm-eval is not installed")
    return huggingface.HFLM, instance.Instance


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory, tokenizer):
    return _save_model_with_tokenizer(tmp_path_factory, tokenizer, "ddl-cc")


def _continuation_logprob(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether greedy decoding would produce it, from one forward pass."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), dim=-1)[0]
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    targets = torch.tensor(continuation_ids)
    total = logprobs[positions, targets].sum().item()
    greedy = bool(torch.equal(logprobs[positions].argmax(-1), targets))
    return total, greedy


def test_lm_eval_loglikelihood_equals_direct_log_softmax(harness, eval_model, tokenizer):
    hflm_class, instance_class = harness
    path, model = eval_model
    lm = hflm_class(pretrained=str(path), tokenizer=str(path), device="cpu", batch_size=2)
    assert type(lm.model) is DDLForCausalLM
    pairs = [
        ("def wrap(text", ", width=70, **kwargs):"),
        ("import re", "\n"),
        ("class TextWrapper:\n    ", "def __init__(self"),
        ("", "return lines"),
    ]
    requests = [instance_class("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests)

    assert len(results) == len(pairs)
    for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
        if context:
            # lm-eval's convention: trailing whitespace of the context belongs to the continuation; encode
            # context + continuation together, the continuation is what follows the context's own encoding.
            stripped = context.rstrip()
            context, continuation = stripped, context[len(stripped) :] + continuation
            whole = tokenizer(context + continuation).input_ids
            context_ids = tokenizer(context).input_ids
            continuation_ids = whole[len(context_ids) :]
        else:
            context_ids, continuation_ids = [tokenizer.eos_token_id], tokenizer(continuation).input_ids
        expected, expected_greedy = _continuation_logprob(model, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert is_greedy == expected_greedy
        assert logprob < 0


def test_lm_eval_loglikelihood_rolling_equals_direct_log_softmax(harness, eval_model, tokenizer):
    hflm_class, instance_class = harness
    path, model = eval_model
    lm = hflm_class(pretrained=str(path), tokenizer=str(path), device="cpu", batch_size=1)
    texts = ["class TextWrapper:\n    width = 70\n", "Hello world, wrap this paragraph please."]
    results = lm.loglikelihood_rolling(
        [instance_class("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    )
    for text, result in zip(texts, results):
        ids = tokenizer(text).input_ids
        assert 1 < len(ids) < lm.max_length
        # One window: every token is predicted, the first from the end-of-text prefix token.
        expected, _ = _continuation_logprob(model, [tokenizer.eos_token_id], ids)
        assert result == pytest.approx(expected, rel=1e-5, abs=1e-4)


# --------------------------------------------------------------------------- model card
def _card_tables(card: str) -> dict[str, str]:
    """Every `| name | value |` row of the card (headers and separators dropped), backticks stripped."""
    rows = {}
    for match in re.finditer(r"^\| (.+?) \| (.+?) \|$", card, flags=re.MULTILINE):
        name, value = match.group(1), match.group(2).strip("`")
        if set(value) != {"-", " "} and name not in ("property", "field", "metric"):
            rows[name] = value
    return rows


@pytest.mark.parametrize("variant", ["baseline", "ddl-tc", "write-only-cc"])
def test_saved_folder_has_a_model_card_with_variant_fields_and_parameter_count(tmp_path, variant):
    model = DDLForCausalLM(DDLConfig.from_preset("tiny", variant, gate_hidden_size=3))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    rows = _card_tables(card)
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"- {variant}\n" in card.split("---")[1]
    assert GENERATED_MARKER in card
    assert f"variant `{variant}`" in card
    assert rows["variant"] == variant
    unique_parameters = sum(p.numel() for p in model.parameters())
    assert rows["parameters"] == f"{unique_parameters:,}"
    for field in DDL_FIELDS:
        assert rows[field] == str(getattr(model.config, field)), field
    assert rows["hidden_size"] == "32" and rows["num_hidden_layers"] == "2"
    assert "No training metrics were recorded" in card
    assert "trust_remote_code=True" in card
    assert "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" in card


def test_backbone_model_card_shows_how_to_load_a_backbone(tmp_path):
    backbone = DDLModel(DDLConfig.from_preset("tiny", "ddl-cc"))
    backbone.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert _card_tables(card)["parameters"] == f"{sum(p.numel() for p in backbone.parameters()):,}"
    assert "AutoModel.from_pretrained(path, trust_remote_code=True)" in card
    assert "AutoModelForCausalLM" not in card and "model.generate(" not in card


def test_model_card_reports_training_metrics_from_file_and_argument(tmp_path):
    model = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc"))
    (tmp_path / "metrics.json").write_text(json.dumps({"eval_loss": 3.25, "train": {"tokens": 123456, "steps": 40}}))
    model.save_pretrained(tmp_path)
    rows = _card_tables((tmp_path / "README.md").read_text())
    assert rows["eval_loss"] == "3.25" and rows["train.tokens"] == "123,456" and rows["train.steps"] == "40"

    # An explicit metrics argument wins over the file; the generated card is rewritten in place.
    write_model_card(tmp_path, model, metrics={"eval_loss": 2.5, "eval_perplexity": 12.182493960703473})
    card = (tmp_path / "README.md").read_text()
    rows = _card_tables(card)
    assert rows["eval_loss"] == "2.5" and rows["eval_perplexity"] == "12.1825" and rows["train.steps"] == "40"
    assert "No training metrics" not in card


def test_save_pretrained_keeps_a_readme_written_by_the_user_but_refreshes_its_own(tmp_path):
    model = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-scalar"))
    model.save_pretrained(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"eval_loss": 1.5}))
    model.save_pretrained(tmp_path)
    assert _card_tables((tmp_path / "README.md").read_text())["eval_loss"] == "1.5"

    (tmp_path / "README.md").write_text("# My own notes\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My own notes\n"


def test_model_card_rejects_bad_metrics_and_non_ddl_models(tmp_path):
    model = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc"))
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"metrics\.json must hold a JSON object"):
        write_model_card(tmp_path, model)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"metrics\.json is not valid JSON"):
        write_model_card(tmp_path, model)
    with pytest.raises(ValueError, match="metrics must be a dict"):
        write_model_card(tmp_path / "other", model, metrics=[("loss", 1.0)])
    with pytest.raises(ValueError, match="needs a DDL model"):
        write_model_card(tmp_path / "other", torch.nn.Linear(2, 2))
