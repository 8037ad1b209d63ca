"""`ddl train`: arguments, recipe, outputs, resumption after SIGKILL, fine-tuning, bad input, 2 processes.

Every run is a tiny model on a few KB of real text (standard-library sources), a handful of steps.
All in-process runs and subprocesses use one intra-op thread: on a loaded 2-core machine, torch's
thread pool otherwise spins against the other processes and gets two orders of magnitude slower,
and the exact-equality checks below compare runs with the same thread count.
"""

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from conftest import offline_env, two_process_accelerate_launch, write_jsonl
from ddl_hf import DDLConfig, DDLForCausalLM
from ddl_hf.data import DataArguments, build_lm_datasets, builtin_corpus_documents
from ddl_hf.run_files import CHECKPOINT_MANIFEST, checkpoint_is_complete, last_complete_checkpoint
from ddl_hf.tokenization import train_bpe_tokenizer
from ddl_hf.train import (
    DDLTrainer,
    DDLTrainingArguments,
    ModelArguments,
    main,
    no_weight_decay_parameter_names,
    parse_args,
    resolve_block_size,
    run_training,
)

REPO = Path(__file__).resolve().parents[1]
TINY_STEPS = 8


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def subprocess_env():
    return offline_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO / "src"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small tokenizer and train / validation / fine-tuning files cut from real Python sources."""
    folder = tmp_path_factory.mktemp("train_assets")
    texts = [text[:700] for _, text in builtin_corpus_documents("validation")[:40]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    tokenizer.save_pretrained(folder / "tokenizer")
    return {
        "folder": folder,
        "tokenizer": str(folder / "tokenizer"),
        "train": write_jsonl(folder / "train.jsonl", texts[:28]),
        "validation": write_jsonl(folder / "validation.jsonl", texts[28:34]),
        "finetune": write_jsonl(folder / "finetune.jsonl", texts[34:]),
        "cache": str(folder / "datasets_cache"),
    }


def tiny_argv(assets, output_dir, *extra):
    return [
        "--preset", "tiny",
        "--tokenizer_name", assets["tokenizer"],
        "--train_file", assets["train"],
        "--validation_file", assets["validation"],
        "--block_size", "32",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--max_steps", str(TINY_STEPS),
        "--warmup_steps", "2",
        "--logging_steps", "1",
        "--eval_steps", "4",
        "--save_steps", "2",
        "--max_eval_samples", "8",
        "--dataset_cache_dir", assets["cache"],
        "--report_to", "none",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def train_losses(output_dir):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def eval_losses(output_dir):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}


def data_order(output_dir, rank=0):
    return (Path(output_dir) / "data_order" / f"rank{rank}.tsv").read_text().splitlines()


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    """An uninterrupted tiny DDL-CC run: 8 steps, checkpoints every 2, evaluation every 4."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    metrics = run_training(*parse_args(tiny_argv(assets, output_dir)))
    return output_dir, metrics


def direct_validation_loss(model_dir, assets, train_file, validation_file):
    """Token-mean cross-entropy of the saved model on the validation blocks, without the Trainer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_args = DataArguments(
        train_file=train_file,
        validation_file=validation_file,
        block_size=32,
        max_eval_samples=8,
        dataset_cache_dir=assets["cache"],
    )
    blocks = torch.tensor(build_lm_datasets(data_args, tokenizer, 32).validation["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item()


# --------------------------------------------------------------------------- arguments
def test_yaml_fields_are_overridden_by_flags(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("preset: tiny\nvariant: baseline\nlearning_rate: 0.002\nblock_size: 64\nmax_steps: 7\n")
    model_args, data_args, training_args = parse_args([str(config), "--max_steps", "9", "--variant", "ddl-tc"])
    assert (model_args.preset, model_args.variant) == ("tiny", "ddl-tc")
    assert (training_args.learning_rate, training_args.max_steps, data_args.block_size) == (0.002, 9, 64)

    config.write_text("preset: tiny\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"job.yaml: unknown field\(s\) \['learning_rat'\]"):
        parse_args([str(config)])
    with pytest.raises(ValueError, match="config file .*missing.yaml' does not exist"):
        parse_args([str(tmp_path / "missing.yaml")])


def _as_dicts(args):
    model_args, data_args, training_args = args
    return asdict(model_args), asdict(data_args), training_args.to_dict()


def test_no_arguments_equal_the_default_yaml():
    assert _as_dicts(parse_args([])) == _as_dicts(parse_args([str(REPO / "configs/train/default.yaml")]))
    model_args, data_args, training_args = parse_args([])
    assert (model_args.preset, model_args.variant, data_args.dataset_name, data_args.train_file) == (
        "mini",
        "ddl-cc",
        None,
        None,
    )
    assert training_args.eval_strategy == "steps" and training_args.eval_steps > 0


def test_default_recipe_is_the_papers():
    _, _, args = parse_args([])
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == (0.9, 0.95, 0.1, 1.0)
    assert args.learning_rate == 1e-3 and args.lr_scheduler_type == "cosine" and args.warmup_steps > 0
    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # fp32 on CPU
    assert args.include_num_input_tokens_seen == "all"


@pytest.mark.parametrize("size", ["small", "medium"])
def test_paper_recipes(size):
    path = REPO / f"configs/train/{size}.yaml"
    values = yaml.safe_load(path.read_text())
    assert values["preset"] == size and values["bf16"] is True
    assert (values["block_size"], values["global_batch_size"], values["max_steps"]) == (1024, 480, 100_000)
    assert (values["learning_rate"], values["warmup_steps"], values["lr_scheduler_type"]) == (1e-3, 2000, "cosine")
    # bf16 needs a GPU; the rest of the recipe parses here, and the global batch of 480 sequences
    # becomes gradient accumulation for one process.
    _, data_args, args = parse_args([str(path), "--bf16", "false"])
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size == 480
    assert data_args.streaming and data_args.block_size == 1024


def test_global_batch_size_must_divide_evenly():
    with pytest.raises(ValueError, match="--global_batch_size 10 is not a multiple of per_device_train_batch_size"):
        parse_args(["--global_batch_size", "10", "--per_device_train_batch_size", "4"])


def test_accelerate_configs_use_real_launch_options_and_the_ddl_layer():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    options = {action.dest for action in launch_command_parser()._actions}
    kinds = {}
    for path in sorted((REPO / "configs/accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {}), **(config.dynamo_config or {})}
        assert set(nested) <= options, (path.name, set(nested) - options)
        kinds[str(config.distributed_type)] = config
    assert set(kinds) == {"DistributedType.MULTI_GPU", "DistributedType.FSDP", "DistributedType.DEEPSPEED"}
    fsdp = kinds["DistributedType.FSDP"].fsdp_config
    from ddl_hf.models.ddl import modeling_ddl

    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in DDLForCausalLM._no_split_modules
    assert hasattr(modeling_ddl, fsdp["fsdp_transformer_layer_cls_to_wrap"])


# --------------------------------------------------------------------------- optimizer
def test_weight_decay_skips_norms_gates_biases_compressors_and_ec(tmp_path):
    model = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-tc", gate_hidden_size=8))
    exempt = no_weight_decay_parameter_names(model)
    names = [name for name, _ in model.named_parameters()]
    gate_or_state = (".beta_proj.", ".beta_hidden.", ".compressor.", "model.readout.", "model.embed_expansion.")
    expected = {
        n
        for n in names
        if n.endswith(("bias", "norm.weight", "layernorm.weight")) or any(g in n for g in gate_or_state)
    }
    assert exempt == expected
    assert "model.layers.0.attn_shortcut.value_proj.bias" in exempt
    assert "model.layers.1.compressor.conv_weight" in exempt and "model.layers.0.compressor.read_vector" in exempt
    decayed = set(names) - exempt
    assert decayed == {n for n in names if n.endswith("_proj.weight") and ".beta_" not in n} | {
        "model.embed_tokens.weight"
    }
    assert "model.layers.0.mlp_shortcut.value_proj.weight" in decayed

    args = DDLTrainingArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="no")
    trainer = DDLTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert group_of[id(parameter)]["weight_decay"] == (0.0 if name in exempt else 0.1), name
    assert {tuple(group["betas"]) for group in optimizer.param_groups} == {(0.9, 0.95)}


def unigram_entropy(tokenizer, jsonl_path) -> float:
    """Entropy in nats of the token frequencies of a JSONL file's documents, each followed by EOS as
    `ddl train` feeds them: the loss of the best model that ignores the context."""
    counts = {}
    for line in Path(jsonl_path).read_text(encoding="utf-8").splitlines():
        for token in tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]:
            counts[token] = counts.get(token, 0) + 1
    total = sum(counts.values())
    return -sum(count / total * math.log(count / total) for count in counts.values())


LEARNING_STEPS = 600


def test_ddl_train_learns_below_the_unigram_entropy(assets, tmp_path, capsys):
    """`ddl train` with the default recipe (lr 1e-3, 30 warmup steps, cosine, weight decay 0.1 on the matrices)
    trains the tiny preset for 600 steps of 4 blocks of 32 tokens (about 6 passes over 12.9k tokens, ~15 s on one
    core). Its validation loss must end below the unigram entropy of the training tokens (4.24 nats, counted
    here from the file): no model that ignores the context gets lower, and the model starts at log(300) = 5.70.
    Here it reaches 3.96. Deliberate breakages of the optimizer or schedule end far above the bound: learning rate
    0, 5.70; the decayed matrices' learning rate 0, 5.61; a schedule that reaches 0 at the end of warmup, 5.41;
    a warmup that never ends, 5.64."""
    output_dir = tmp_path / "learn"
    argv = tiny_argv(assets, output_dir, "--max_steps", str(LEARNING_STEPS))
    for flag in ("--warmup_steps", "--logging_steps", "--eval_steps", "--save_steps", "--max_eval_samples"):
        argv = without_flag(argv, flag)  # the default recipe's warmup; one evaluation and save at the end
    argv += ["--logging_steps", "100", "--eval_steps", str(LEARNING_STEPS), "--save_steps", str(LEARNING_STEPS)]
    assert main([*argv, "--disable_tqdm", "true", "--sample_max_new_tokens", "0"]) == 0
    capsys.readouterr()

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    entropy = unigram_entropy(tokenizer, assets["train"])
    assert 4.0 < entropy < math.log(len(tokenizer)) - 1.0  # the bound is far below a model that learned nothing
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["global_step"] == LEARNING_STEPS and metrics["eval_blocks"] == 64
    assert train_losses(output_dir)[1] > math.log(len(tokenizer)) - 0.1  # where training starts
    assert metrics["eval_loss"] < entropy - 0.15, (metrics["eval_loss"], entropy)


# --------------------------------------------------------------------------- outputs
def test_run_writes_model_tokenizer_state_metrics_and_curve(reference_run, assets):
    output_dir, metrics = reference_run
    assert json.loads((output_dir / "metrics.json").read_text()) == metrics
    tokens = TINY_STEPS * 4 * 32
    assert metrics["global_step"] == TINY_STEPS and metrics["tokens_seen"] == tokens
    assert metrics["variant"] == "ddl-cc" and metrics["world_size"] == 1
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-12)
    assert metrics["eval_loss"] == eval_losses(output_dir)[TINY_STEPS]
    assert metrics["train_loss"] == train_losses(output_dir)[TINY_STEPS]
    assert metrics["training_flops"] == pytest.approx(metrics["training_flops_per_token"] * tokens)
    from ddl_hf.flops import training_flops_per_token

    config = DDLConfig.from_pretrained(output_dir)
    assert metrics["training_flops_per_token"] == training_flops_per_token(config, 32)
    assert metrics["train_wall_time_s"] > 0 and metrics["job_wall_time_s"] >= metrics["train_wall_time_s"]

    # The model's vocabulary follows the tokenizer; periodic evaluation is in trainer_state.json.
    assert config.vocab_size == len(AutoTokenizer.from_pretrained(output_dir)) == 300
    assert sorted(eval_losses(output_dir)) == [4, 8]
    assert sorted(train_losses(output_dir)) == list(range(1, TINY_STEPS + 1))
    assert (output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (output_dir / "README.md").read_text()
    assert "| eval_loss |" in card and "| tokens_seen |" in card and "ddl-cc" in card
    assert (output_dir / "modeling_ddl.py").is_file()  # remote code travels with the weights
    # Only the two newest checkpoints are kept, both committed.
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert all(checkpoint_is_complete(p) for p in output_dir.glob("checkpoint-*"))
    assert [line.split("\t")[0] for line in data_order(output_dir)] == [str(s) for s in range(1, TINY_STEPS + 1)]

    # The saved folder is the trained model: its loss on the validation blocks is the logged one.
    direct = direct_validation_loss(output_dir, assets, assets["train"], assets["validation"])
    assert direct == pytest.approx(metrics["eval_loss"], abs=1e-5)


def test_same_seed_same_data_order_across_variants(reference_run, assets, tmp_path):
    reference_dir, _ = reference_run
    run_training(*parse_args(tiny_argv(assets, tmp_path / "baseline", "--variant", "baseline", "--max_steps", "4")))
    assert data_order(tmp_path / "baseline") == data_order(reference_dir)[:4]
    run_training(*parse_args(tiny_argv(assets, tmp_path / "seed", "--seed", "7", "--max_steps", "2")))
    assert data_order(tmp_path / "seed") != data_order(reference_dir)[:2]


class DataOrderLines(TrainerCallback):
    """Reads the data-order log after every micro-batch: (event, optimizer step, lines in the file). After the
    step's last micro-batch the Trainer calls `on_step_end` (this callback runs after `ddl train`'s own), and
    after each of the others `on_substep_end`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = []

    def lines(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.is_file() else 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.seen.append(("substep", state.global_step + 1, self.lines()))

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(("step", state.global_step, self.lines()))


def test_data_order_is_written_at_logging_and_saving_steps_only(assets, tmp_path, monkeypatch):
    """The data-order log is not written per micro-batch (that needs the ids on the host: a device sync and a file
    append in the hot loop) but at the steps that log (1 with logging_first_step, 3, 6), save (4, 8) or end (8), and
    what ends up in it is line for line the format written per micro-batch before: `step<TAB>` the first 16 hex
    digits of the SHA-1 of the micro-batch's int64 token ids."""
    output_dir = tmp_path / "run"
    trained = []  # (optimizer step, input ids) of every micro-batch, as the training step receives them
    training_step = DDLTrainer.training_step

    def recording_training_step(self, model, inputs, num_items_in_batch=None):
        trained.append((self.state.global_step + 1, inputs["input_ids"].detach().clone()))
        return training_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(DDLTrainer, "training_step", recording_training_step)
    argv = tiny_argv(assets, output_dir, "--gradient_accumulation_steps", "2")
    for flag in ("--logging_steps", "--save_steps"):
        argv = without_flag(argv, flag)
    lines = DataOrderLines(output_dir / "data_order" / "rank0.tsv")
    run_training(*parse_args([*argv, "--logging_steps", "3", "--save_steps", "4"]), callbacks=[lines])

    assert sorted(train_losses(output_dir)) == [1, 3, 6]  # the steps that logged the training loss
    written_at = [1, 3, 4, 6, 8]  # ... and the steps that saved a checkpoint or ended training
    expected = []
    for step in range(1, TINY_STEPS + 1):
        flushed_before = max([s for s in written_at if s < step], default=0)
        flushed_after = max(s for s in written_at if s <= step)
        expected += [("substep", step, 2 * flushed_before), ("step", step, 2 * flushed_after)]
    assert lines.seen == expected

    old_format = [f"{step}\t{hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:16]}" for step, ids in trained]
    assert len(old_format) == 2 * TINY_STEPS and all(ids.dtype == torch.int64 for _, ids in trained)
    assert data_order(output_dir) == old_format


def test_data_order_log_writes_when_it_holds_too_many_ids(tmp_path):
    """A run that logs and saves rarely: the held ids are written once they pass `max_pending_bytes`."""
    from ddl_hf.run_files import DataOrderLog

    path = tmp_path / "rank0.tsv"
    log = DataOrderLog(path, max_pending_bytes=100)
    first, second, third = (torch.arange(8 * i, 8 * i + 8).view(2, 4) for i in range(3))  # 64 bytes each
    log.record(1, first)
    assert not path.exists()
    log.record(1, second)  # 128 bytes held: written
    log.record(2, third)
    assert len(path.read_text().splitlines()) == 2
    log.flush()
    expected = [
        f"{s}\t{hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:16]}"
        for s, ids in ((1, first), (1, second), (2, third))
    ]
    assert path.read_text().splitlines() == expected


# --------------------------------------------------------------------------- never lose work
PAUSING_CHILD = """
import sys, time
from transformers import TrainerCallback
from ddl_hf.train import parse_args, run_training

class PauseAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            open(sys.argv[1], "w").close()
            time.sleep(600)

run_training(*parse_args(sys.argv[3:]), callbacks=[PauseAfterStep()])
"""

# Fault injection, not a mock: the real save runs, and the process kills itself with SIGKILL after
# the weights, optimizer and scheduler of one checkpoint are written and before its RNG state,
# trainer state and manifest are.
CRASHING_CHILD = """
import os, signal, sys
from transformers import Trainer
from ddl_hf.train import main

save_rng_state = Trainer._save_rng_state

def save_rng_state_or_die(self, output_dir):
    if os.path.basename(output_dir) == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)

Trainer._save_rng_state = save_rng_state_or_die
sys.exit(main(sys.argv[2:]))
"""


def assert_same_run(resumed_dir, reference_dir):
    assert train_losses(resumed_dir) == train_losses(reference_dir)  # exact, every step
    assert eval_losses(resumed_dir) == eval_losses(reference_dir)
    assert data_order(resumed_dir) == data_order(reference_dir)
    resumed, reference = load_file(resumed_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_sigkilled_run_resumes_with_the_losses_of_the_uninterrupted_run(reference_run, assets, tmp_path):
    reference_dir, reference_metrics = reference_run
    output_dir = tmp_path / "run"
    script, sentinel = tmp_path / "child.py", tmp_path / "paused"
    script.write_text(PAUSING_CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(sentinel), "5", *tiny_argv(assets, output_dir)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not sentinel.exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child never reached step 5"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    child.stderr.close()
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-4")
    assert not (output_dir / "checkpoint-6").exists() and not (output_dir / "model.safetensors").exists()
    assert len(data_order(output_dir)) == 5  # step 5 was trained before the kill

    metrics = run_training(*parse_args(tiny_argv(assets, output_dir)))
    assert_same_run(output_dir, reference_dir)
    assert metrics["eval_loss"] == reference_metrics["eval_loss"]
    assert metrics["tokens_seen"] == reference_metrics["tokens_seen"]


@pytest.mark.slow
def test_checkpoint_interrupted_mid_save_is_skipped(reference_run, assets, tmp_path):
    reference_dir, _ = reference_run
    output_dir = tmp_path / "run"
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_CHILD)
    child = subprocess.run(
        [sys.executable, str(script), "checkpoint-6", *tiny_argv(assets, output_dir)],
        env=subprocess_env(),
        capture_output=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
    partial = output_dir / "checkpoint-6"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.pt").is_file()
    assert not (partial / CHECKPOINT_MANIFEST).exists() and not checkpoint_is_complete(partial)
    assert get_last_checkpoint(str(output_dir)) == str(partial)  # what a plain Trainer would resume from
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-4")

    run_training(*parse_args(tiny_argv(assets, output_dir)))
    assert_same_run(output_dir, reference_dir)
    assert checkpoint_is_complete(output_dir / "checkpoint-6")  # re-saved by the resumed run


def test_rerun_resumes_finished_run_and_refuses_changed_arguments(reference_run, assets, tmp_path):
    reference_dir, reference_metrics = reference_run
    with pytest.raises(ValueError, match=r"training\.learning_rate: 0\.001 -> 0\.002"):
        run_training(*parse_args(tiny_argv(assets, reference_dir, "--learning_rate", "0.002")))
    with pytest.raises(ValueError, match=r"model\.variant: 'ddl-cc' -> 'baseline'"):
        run_training(*parse_args(tiny_argv(assets, reference_dir, "--variant", "baseline")))
    # Logging and checkpoint cadence may change between a run and its resumption.
    metrics = run_training(*parse_args(tiny_argv(assets, reference_dir, "--logging_steps", "3")))
    assert metrics["eval_loss"] == reference_metrics["eval_loss"]
    assert metrics["global_step"] == TINY_STEPS and metrics["tokens_seen"] == reference_metrics["tokens_seen"]

    # A folder whose run stopped before its first checkpoint holds nothing to protect.
    early = tmp_path / "early"
    early.mkdir()
    (early / "run_args.json").write_text(json.dumps({"fingerprint": {"model": {"preset": "mini"}}}))
    run_training(*parse_args(tiny_argv(assets, early, "--max_steps", "1")))
    assert json.loads((early / "run_args.json").read_text())["fingerprint"]["model"]["preset"] == "tiny"

    stranger = tmp_path / "stranger"
    (stranger / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds checkpoints or a model that `ddl train` did not record"):
        run_training(*parse_args(tiny_argv(assets, stranger)))


class InterruptAtStep(TrainerCallback):
    """Ends a run with an exception after optimizer step `step`, as a crash would (in-process)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"interrupted after step {self.step}")


@pytest.mark.slow
def test_torch_compile_trains_like_eager_saves_plain_weights_and_resumes_exactly(reference_run, assets, tmp_path):
    """`--torch_compile`: the Trainer compiles the model; the losses are eager's to float rounding, the saved weights
    carry the model's own names (no `_orig_mod.`), and a compiled run interrupted after step 5 resumes from
    checkpoint-4 to the uninterrupted compiled run's losses and weights, exactly. The aot_eager backend traces as
    inductor does (inductor's kernels: tests/test_compile.py)."""
    reference_dir, _ = reference_run
    compiling = ("--torch_compile", "true", "--torch_compile_backend", "aot_eager")
    compiled_dir = tmp_path / "compiled"
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    graphs.clear()
    run_training(*parse_args(tiny_argv(assets, compiled_dir, *compiling)))
    assert graphs["unique_graphs"] >= 1  # the forward did run compiled
    compiled_losses, reference_losses = train_losses(compiled_dir), train_losses(reference_dir)
    assert compiled_losses.keys() == reference_losses.keys()
    for step, loss in reference_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, rel=1e-4), step
    saved, reference = load_file(compiled_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert saved.keys() == reference.keys()
    assert AutoModelForCausalLM.from_pretrained(compiled_dir).config.variant_name == "ddl-cc"

    interrupted_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="interrupted after step 5"):
        run_training(*parse_args(tiny_argv(assets, interrupted_dir, *compiling)), callbacks=[InterruptAtStep(5)])
    assert last_complete_checkpoint(interrupted_dir) == str(interrupted_dir / "checkpoint-4")
    assert not (interrupted_dir / "model.safetensors").exists()
    run_training(*parse_args(tiny_argv(assets, interrupted_dir, *compiling)))
    assert_same_run(interrupted_dir, compiled_dir)


# --------------------------------------------------------------------------- fine-tuning
def test_finetune_continues_from_a_saved_model(reference_run, assets, tmp_path):
    reference_dir, _ = reference_run
    output_dir = tmp_path / "finetuned"
    argv = [
        "--model_name_or_path", str(reference_dir),
        "--train_file", assets["finetune"],
        "--block_size", "32",
        "--max_steps", "3",
        "--warmup_steps", "0",
        "--eval_on_start", "true",
        "--eval_steps", "3",
        "--max_eval_samples", "8",
        "--per_device_train_batch_size", "4",
        "--dataset_cache_dir", assets["cache"],
        "--report_to", "none",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    model_args, data_args, training_args = parse_args(argv)
    run_training(model_args, data_args, training_args)

    # Step 0 evaluates the loaded checkpoint: the same loss the saved model gives directly on those blocks.
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    validation = build_lm_datasets(data_args, tokenizer, 32).validation
    model = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    blocks = torch.tensor(validation["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert eval_losses(output_dir)[0] == pytest.approx(direct, abs=1e-5)

    fresh = AutoModelForCausalLM.from_pretrained(output_dir)
    assert fresh.config.variant_name == "ddl-cc" and fresh.config.vocab_size == 300
    assert AutoTokenizer.from_pretrained(output_dir).get_vocab() == tokenizer.get_vocab()
    before, after = load_file(reference_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (["--train_file", "{tmp}/missing.jsonl"], "--train_file '{tmp}/missing.jsonl' does not exist"),
    (["--train_file", "{tmp}/empty.jsonl"], "--train_file '{tmp}/empty.jsonl' is empty"),
    (["--text_column", "body"], "--text_column 'body' not found in --train_file"),
    (["--block_size", "256"], "--block_size 256 is larger than the model's max_position_embeddings (128)"),
    (["--preset", "huge"], "--preset 'huge' is unknown; allowed presets: ['tiny', 'mini', 'small', 'medium']"),
    (["--variant", "ddl-xx"], "--variant 'ddl-xx' is unknown"),
    (["--config_overrides", "value_channels=2,bogus=1"], "unknown DDLConfig field(s) ['bogus']"),
    (["--config_overrides", "value_channels"], "--config_overrides items must look like key=value"),
    (["--config_overrides", "value_channels=0"], "DDLConfig.value_channels must be an integer >= 1"),
    (["--config_name", "{tmp}/nope.json"], "--config_name '{tmp}/nope.json' does not exist"),
    (["--model_name_or_path", "{tmp}/nope"], "--model_name_or_path '{tmp}/nope' is not a folder"),
    (["--tokenizer_name", "{tmp}/nope"], "could not load tokenizer '{tmp}/nope'"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[case[1][:40] for case in BAD_INPUTS])
def test_bad_input_stops_before_training(assets, tmp_path, extra, message):
    (tmp_path / "empty.jsonl").write_text("")
    output_dir = tmp_path / "out"
    argv = tiny_argv(assets, output_dir, *[item.format(tmp=tmp_path) for item in extra])
    with pytest.raises(ValueError) as error:
        run_training(*parse_args(argv))
    assert message.format(tmp=tmp_path) in str(error.value)
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "model.safetensors").exists()


def test_cli_reports_bad_input_and_exits_2(assets, tmp_path, capsys):
    assert main(tiny_argv(assets, tmp_path / "out", "--preset", "huge")) == 2
    assert "ddl train: error: --preset 'huge' is unknown" in capsys.readouterr().err
    assert main(tiny_argv(assets, tmp_path / "out", "--block_size", "512")) == 2
    assert "--block_size 512 is larger than the model's max_position_embeddings (128)" in capsys.readouterr().err


def test_model_arguments_validate_choices():
    with pytest.raises(ValueError, match="either --config_name .* or --model_name_or_path"):
        ModelArguments(config_name="a.json", model_name_or_path="dir")


# --------------------------------------------------------------------------- default block size
def without_flag(argv, flag):
    """`argv` without `flag` and the value after it."""
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


def test_default_block_size_follows_the_model(capsys):
    # Not given: 256, cut to the context of a model that has less.
    tiny = DDLConfig.from_preset("tiny", "ddl-cc")
    assert parse_args([])[1].block_size is None
    assert resolve_block_size(DataArguments(), DDLConfig.from_preset("mini", "ddl-cc")) == 256
    assert resolve_block_size(DataArguments(), tiny) == 128
    assert resolve_block_size(DataArguments(block_size=64), tiny) == 64
    too_large = r"--block_size 129 is larger than the model's max_position_embeddings \(128\)"
    with pytest.raises(ValueError, match=too_large):
        resolve_block_size(DataArguments(block_size=129), tiny)
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "None follows the model: min(256, max_position_embeddings)" in help_text


def test_tiny_preset_trains_with_the_default_block_size(assets, tmp_path, capsys):
    """`ddl train --preset tiny` without --block_size: blocks of the tiny model's whole context (128)."""
    output_dir = tmp_path / "out"
    argv = without_flag(tiny_argv(assets, output_dir, "--max_steps", "2", "--eval_steps", "2"), "--block_size")
    assert main([*argv, "--sample_max_new_tokens", "0"]) == 0
    assert "final validation loss" in capsys.readouterr().out
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert (metrics["block_size"], metrics["global_step"], metrics["tokens_seen"]) == (128, 2, 2 * 4 * 128)
    assert json.loads((output_dir / "run_args.json").read_text())["fingerprint"]["data"]["block_size"] is None

    too_large = tmp_path / "too_large"
    assert main(tiny_argv(assets, too_large, "--block_size", "129")) == 2
    assert "ddl train: error: --block_size 129 is larger than the model's max_position_embeddings (128)" in (
        capsys.readouterr().err
    )
    assert not list(too_large.glob("checkpoint-*")) and not (too_large / "model.safetensors").exists()


# --------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_process_data_parallel_run_with_accelerate_launch(assets, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [
        *two_process_accelerate_launch(),
        str(REPO / "scripts/train.py"),
        *tiny_argv(assets, output_dir, "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3"),
        "--per_device_eval_batch_size", "4",  # 8 validation blocks split evenly over the 2 processes
        "--sample_max_new_tokens", "8",
    ]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "final validation loss" in result.stdout and "sample from the saved model" in result.stdout

    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["tokens_seen"] == 3 * 2 * 4 * 32  # steps x processes x batch x block
    rank0, rank1 = data_order(output_dir, 0), data_order(output_dir, 1)
    assert [line.split("\t")[0] for line in rank0] == [line.split("\t")[0] for line in rank1] == ["1", "2", "3"]
    assert not {line.split("\t")[1] for line in rank0} & {line.split("\t")[1] for line in rank1}

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.variant_name == "ddl-cc"
    direct = direct_validation_loss(output_dir, assets, assets["train"], assets["validation"])
    assert direct == pytest.approx(metrics["eval_loss"], abs=1e-5)
    generated = model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, len(tokenizer("def ")["input_ids"]) + 4)
