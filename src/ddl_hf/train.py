"""`ddl train`: pretrain or fine-tune DDL language models with the Hugging Face Trainer.

    ddl train                                   # the main job: configs/train/default.yaml
    ddl train CONFIG.yaml --max_steps 500       # YAML fields, overridden by flags
    accelerate launch scripts/train.py CONFIG.yaml

Arguments come in three groups, as in transformers' `run_clm.py`: `ModelArguments` (preset,
config JSON or checkpoint, `config_overrides`, tokenizer), `DataArguments` (see `data.py`) and
`DDLTrainingArguments`, the HF `TrainingArguments` with the paper's recipe as defaults (AdamW
0.9/0.95, weight decay 0.1 off norms, gates, biases, compressors and EC, cosine schedule with
warmup, gradient clipping 1.0, bf16 on GPU and fp32 on CPU, periodic evaluation). The dataclass
defaults are the main job, so `ddl train` equals `ddl train configs/train/default.yaml`.

Outputs in `output_dir`: `checkpoint-N/` folders, the final model and tokenizer, `trainer_state.json`,
`metrics.json`, `loss_curve.png`, `run_args.json` (the run's fingerprint) and
`data_order/rank{R}.tsv` (a hash of every micro-batch each process trained on, so runs can be
checked to have seen identical data; written at the steps that log or save, not per micro-batch).

Never losing work (the files behind it are in `run_files.py`): a checkpoint is *committed* only
after every process has written its files, by a `ddl_checkpoint_complete.json` manifest listing
each file and its size; old checkpoints are rotated out only after that. Rerunning with the same
`output_dir` resumes from the newest committed checkpoint, deleting any checkpoint whose manifest
is missing or does not match (a save interrupted by a crash), and refuses to start when the folder
holds checkpoints or a model of a run whose arguments differ from the fingerprint stored in
`run_args.json`. SIGTERM or SIGUSR1 (preemption) ends training after the current optimizer step
with a committed checkpoint of it, every process at the same step, and `ddl train` exits with
`PREEMPTED_EXIT_CODE` (75); a non-finite loss or gradient norm stops the run before that step's
update with `DIVERGED_EXIT_CODE` (3), or skips the step under `--max_nonfinite_skips`; nothing
non-finite is ever saved (`DDLTrainer`, "Resuming and crashes" in docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging as transformers_logging

from .command_line import reports_input_errors
from .data import DEFAULT_BLOCK_SIZE, DataArguments, LMDatasets, build_lm_datasets, data_collator
from .models.ddl.configuration_ddl import PRESET_SIZES, PRESET_VARIANTS, DDLConfig
from .models.ddl.delta_layers import DeltaShortcut, EmbedExpansion, StateCompressor
from .models.ddl.modeling_ddl import DDLForCausalLM
from .plots import label_axes, png_figure
from .run_files import (
    METRICS_FILE,
    DataOrderLog,
    check_output_dir,
    checkpoint_is_complete,
    commit_checkpoint,
    data_order_log,
    last_complete_checkpoint,
    load_trainer_state,
    remove_interrupted_checkpoints,
    run_fingerprint,
    truncate_data_order_log,
    write_json,
    write_run_record,
)
from .tokenization import DEFAULT_VOCAB_SIZE, default_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"


# --------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    """Which model to train: a preset, a config JSON, or a saved checkpoint to fine-tune."""

    preset: str = field(default="mini", metadata={"help": f"model size preset: {list(PRESET_SIZES)}"})
    variant: str = field(default="ddl-cc", metadata={"help": f"residual variant preset: {list(PRESET_VARIANTS)}"})
    config_name: str | None = field(
        default=None, metadata={"help": "a DDLConfig JSON file or folder (replaces --preset/--variant)"}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a saved DDL model folder to fine-tune (replaces --preset/--config_name)"}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "DDLConfig fields to change, e.g. 'value_channels=4,beta_init=0.5'"}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "hub or local tokenizer (default: the model's own when fine-tuning, else the built-in BPE)"},
    )
    vocab_size: int = field(
        default=DEFAULT_VOCAB_SIZE, metadata={"help": "vocabulary size of the built-in BPE tokenizer"}
    )

    def __post_init__(self):
        if self.preset not in PRESET_SIZES:
            raise ValueError(f"--preset {self.preset!r} is unknown; allowed presets: {list(PRESET_SIZES)}")
        if self.variant not in PRESET_VARIANTS:
            raise ValueError(f"--variant {self.variant!r} is unknown; allowed variants: {list(PRESET_VARIANTS)}")
        if self.config_name is not None and self.model_name_or_path is not None:
            raise ValueError("give either --config_name (train from scratch) or --model_name_or_path (fine-tune)")
        if self.config_overrides is not None:
            parse_config_overrides(self.config_overrides)


@dataclass
class DDLTrainingArguments(TrainingArguments):
    """HF `TrainingArguments` whose defaults are the paper's recipe, scaled to the CPU main job.

    Extra fields: `global_batch_size` (sets gradient accumulation from the number of processes),
    `sample_prompt` / `sample_max_new_tokens` (the sample `ddl train` prints at the end).
    `bf16` defaults to None: bf16 mixed precision on a GPU that supports it, fp32 otherwise.
    `report_to` defaults to "auto": TensorBoard when it is installed, nothing otherwise.
    """

    output_dir: str | None = field(default="runs/default", metadata={"help": "where everything is written"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "blocks per process per micro-batch"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "blocks per process per eval batch"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (paper: 1e-3)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the matrices (paper: 0.1)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (paper: 0.95)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule after warmup"})
    warmup_steps: float = field(default=30, metadata={"help": "linear warmup steps (or a fraction < 1)"})
    eval_strategy: str = field(default="steps", metadata={"help": "when to evaluate"})
    eval_steps: float | None = field(default=50, metadata={"help": "evaluate every this many steps"})
    logging_steps: float = field(default=10, metadata={"help": "log the training loss every this many steps"})
    logging_first_step: bool = field(default=True, metadata={"help": "log the loss of the first step"})
    save_strategy: str = field(default="steps", metadata={"help": "when to write checkpoints"})
    save_steps: float = field(default=50, metadata={"help": "checkpoint every this many steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "committed checkpoints to keep"})
    include_num_input_tokens_seen: str | bool = field(default=True, metadata={"help": "count tokens seen"})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "every parameter of a DDL model gets a gradient"}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on GPU only)"})
    report_to: None | str | list[str] = field(
        default="auto", metadata={"help": "'auto' = tensorboard when installed, else none"}
    )
    max_nonfinite_skips: int = field(
        default=0,
        metadata={
            "help": "optimizer steps with a non-finite loss or gradient norm to skip (logged, update not applied) "
            "before such a step stops the run"
        },
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "blocks per optimizer step over all processes; sets gradient_accumulation_steps"},
    )
    sample_prompt: str = field(default="def ", metadata={"help": "prompt of the sample printed after training"})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "length of that sample (0: no sample)"})
    peak_flops: float | None = field(
        default=None,
        metadata={
            "help": "peak FLOP/s of one device, for the MFU in the log lines (default: known for H100 SXM, H200 "
            "and A100 in bf16; none on CPU)"
        },
    )

    def __post_init__(self):
        if self.disable_tqdm is None and not sys.stdout.isatty():
            self.disable_tqdm = True  # a log file or pipe gets plain lines, not progress-bar redraws
        if self.report_to == "auto":
            self.report_to = "tensorboard" if _tensorboard_available() else "none"
        if self.bf16 is None:
            self.bf16 = bool(
                not self.use_cpu and not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            )
        if not _accelerator_available():
            # Without this, `accelerate launch --multi_gpu` on a CPU-only machine starts processes that
            # each train alone; with it they form one gloo data-parallel group.
            self.use_cpu = True
            self.dataloader_pin_memory = False  # pinning needs an accelerator; without one it only warns
        super().__post_init__()
        if self.global_batch_size is not None:
            per_step = self.per_device_train_batch_size * self.world_size
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"--global_batch_size {self.global_batch_size} is not a multiple of per_device_train_batch_size "
                    f"({self.per_device_train_batch_size}) x processes ({self.world_size})"
                )
            self.gradient_accumulation_steps = self.global_batch_size // per_step
        if self.max_nonfinite_skips < 0:
            raise ValueError(f"--max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")


def _accelerator_available() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


def _argument_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, DDLTrainingArguments), epilog=EXIT_STATUS_HELP)


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, DDLTrainingArguments]:
    """`[CONFIG.yaml] [--field value ...]`: YAML fields first, command-line flags override them."""
    argv = list(argv)
    parser = _argument_parser()
    if argv and not argv[0].startswith("-"):
        config_path, argv = argv[0], argv[1:]
        values = _read_yaml_config(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown field(s) {unknown}; run `ddl train --help` for the fields")
        parser.set_defaults(**values)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args


def _read_yaml_config(path: str) -> dict:
    if not Path(path).is_file():
        raise ValueError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a training config must be a YAML mapping of field: value")
    return values


def parse_config_overrides(text: str) -> dict:
    """`"value_channels=4,beta_init=0.5,use_qk_norm=false"` -> `{"value_channels": 4, ...}` (JSON values)."""
    overrides = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, separator, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not separator or not key:
            raise ValueError(f"--config_overrides items must look like key=value, got {item.strip()!r}")
        try:
            overrides[key] = json.loads({"True": "true", "False": "false", "None": "null"}.get(value, value))
        except json.JSONDecodeError:
            overrides[key] = value
    unknown = sorted(set(overrides) - set(DDLConfig.field_names()))
    if unknown:
        raise ValueError(
            f"--config_overrides: unknown DDLConfig field(s) {unknown}; allowed fields: {DDLConfig.field_names()}"
        )
    return overrides


# --------------------------------------------------------------------------- tokenizer and model
def build_tokenizer(model_args: ModelArguments):
    if model_args.tokenizer_name is not None:
        return load_tokenizer(model_args.tokenizer_name)
    if model_args.model_name_or_path is not None:
        if not (Path(model_args.model_name_or_path) / "tokenizer_config.json").is_file():
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path!r} holds no tokenizer; pass --tokenizer_name"
            )
        return load_tokenizer(model_args.model_name_or_path)
    return default_tokenizer(model_args.vocab_size)


def _rebuilt_config(config: DDLConfig, overrides: dict) -> DDLConfig:
    values = config.to_dict()
    values.pop("layer_types", None)  # derived from the residual fields, which the overrides may change
    return DDLConfig.from_dict({**values, **overrides})


def build_config(model_args: ModelArguments, tokenizer) -> DDLConfig:
    """The model configuration; when training from scratch its vocabulary follows the tokenizer."""
    overrides = parse_config_overrides(model_args.config_overrides or "")
    if model_args.model_name_or_path is not None:
        path = model_args.model_name_or_path
        if not Path(path).is_dir():
            raise ValueError(f"--model_name_or_path {path!r} is not a folder with a saved model")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"--model_name_or_path {path!r}: cannot read its config.json: {error}") from error
        if not isinstance(config, DDLConfig):
            raise ValueError(f"--model_name_or_path {path!r} holds a {config.model_type!r} model, not a DDL model")
        config = _rebuilt_config(config, overrides)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model at {path!r} has vocab_size "
                f"{config.vocab_size}; use the model's own tokenizer"
            )
        return config
    token_ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    scratch = {"vocab_size": len(tokenizer), **token_ids, **overrides}
    if model_args.config_name is not None:
        path = Path(model_args.config_name)
        if not path.exists():
            raise ValueError(f"--config_name {str(path)!r} does not exist")
        base = DDLConfig.from_json_file(str(path)) if path.is_file() else DDLConfig.from_pretrained(str(path))
        config = _rebuilt_config(base, scratch)
    else:
        config = DDLConfig.from_preset(model_args.preset, model_args.variant, **scratch)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return config


def resolve_block_size(data_args: DataArguments, config: DDLConfig) -> int:
    """`--block_size`, at most the model's context; when not given, the default block size cut to the
    model's context, so that every preset trains with its own defaults."""
    if data_args.block_size is None:
        return min(DEFAULT_BLOCK_SIZE, config.max_position_embeddings)
    if data_args.block_size > config.max_position_embeddings:
        raise ValueError(
            f"--block_size {data_args.block_size} is larger than the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    return data_args.block_size


def build_model(model_args: ModelArguments, config: DDLConfig, seed: int) -> DDLForCausalLM:
    """A fresh model initialized from `seed`, or the checkpoint to fine-tune, in fp32."""
    if model_args.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config, dtype=torch.float32)
    set_seed(seed)
    return DDLForCausalLM(config)


def no_weight_decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters trained without weight decay: every vector (norm weights, biases), the gates of
    the Delta shortcuts (`beta_proj`, `beta_hidden`), and the compressors and embedding expansion
    (state read weights and token filters). Embeddings, attention, MLP and value matrices decay."""
    exempt_modules = set()
    for module in model.modules():
        if isinstance(module, DeltaShortcut):
            exempt_modules.update(m for m in (module.beta_proj, module.beta_hidden) if m is not None)
        elif isinstance(module, (StateCompressor, EmbedExpansion)):
            exempt_modules.add(module)
    names = set()
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim < 2 or module in exempt_modules:
                names.add(f"{module_name}.{parameter_name}" if module_name else parameter_name)
    # named_modules lists a tied weight under its first owner only; keep the names the optimizer sees.
    return names & {name for name, _ in model.named_parameters()}


# --------------------------------------------------------------------------- preemption and divergence
# Exit statuses of `ddl train` besides 0 (done) and 2 (`INPUT_ERROR_EXIT_STATUS`, a refused input).
# 75 is EX_TEMPFAIL of sysexits.h, "a temporary failure; retry": distinct from the 128+N of a process
# killed by signal N (143 for SIGTERM), so a job script can requeue on exactly this one.
PREEMPTED_EXIT_CODE = 75
DIVERGED_EXIT_CODE = 3
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STATUS_HELP = (
    f"exit status: 0: done; 2: a refused input; {PREEMPTED_EXIT_CODE}: stopped by SIGTERM or SIGUSR1 (preemption) "
    f"after finishing the current optimizer step and committing a checkpoint of it, without the final model; "
    f"rerun the same command to resume from it; {DIVERGED_EXIT_CODE}: a non-finite loss or gradient norm stopped "
    f"the run (the message names the step, loss and gradient norm; the newest checkpoint is the last good one; "
    f"see --max_nonfinite_skips)"
)


class TrainingPreempted(RuntimeError):
    """`ddl train` stopped on SIGTERM / SIGUSR1 after committing the checkpoint of the current step."""

    def __init__(self, reason: str, step: int, checkpoint: str) -> None:
        super().__init__(
            f"{reason}: stopped after step {step} and saved {checkpoint}; rerun the same command to resume "
            f"(exit status {PREEMPTED_EXIT_CODE})"
        )
        self.step, self.checkpoint = step, checkpoint


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm (or weights) at an optimizer step; nothing of that step was saved."""

    def __init__(self, what: str, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> None:
        newest = (
            f"the newest checkpoint, {last_checkpoint}, is the last good one"
            if last_checkpoint
            else "no checkpoint was saved before it"
        )
        super().__init__(
            f"training diverged: {what} at step {step}: loss {loss}, grad norm {grad_norm}; nothing of this step "
            f"was saved and {newest}. Lower the learning rate, or skip such steps with --max_nonfinite_skips N"
        )
        self.step, self.loss, self.grad_norm, self.last_checkpoint = step, loss, grad_norm, last_checkpoint


def join_restarted_elastic_group() -> bool:
    """Joins the process group of a group that torchelastic restarted (`torchrun --max-restarts N`, attempt >= 1).

    torchelastic keeps one store for all attempts, and torch 2.13 (with gloo, at least) reads the previous
    attempt's keys from it: the restarted ranks try to connect to the killed ranks' addresses and fail with
    "Gloo connectFullMesh failed ... Connection refused". Here each restarted attempt joins the store under its
    own prefix, before accelerate would create the group without one. The first attempt, and anything launched
    otherwise, is left to accelerate. Returns whether it created the group."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if attempt == 0 or not agent_store or torch.distributed.is_initialized():
        return False
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    torch.distributed.init_process_group(
        backend, store=torch.distributed.PrefixStore(f"restart-{attempt}", store), rank=rank, world_size=world_size
    )
    logger.warning("torchelastic restart %d: rank %d joined the restarted group", attempt, rank)
    return True


@contextlib.contextmanager
def stop_on_signals(trainer: DDLTrainer):
    """While training, SIGTERM and SIGUSR1 ask `trainer` to stop after the current optimizer step
    (`DDLTrainer.request_stop`); the previous handlers come back afterwards. Only the main thread can
    install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer.request_stop(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopAtAgreedStep(TrainerCallback):
    """Ends training at the step at which the processes agreed to stop (`DDLTrainer.stop_step`): that
    step logs, saves a checkpoint and is the last. Runs right after `DefaultFlowCallback`."""

    def __init__(self, trainer: DDLTrainer) -> None:
        super().__init__()
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.stop_step == state.global_step:
            control.should_log = control.should_save = control.should_training_stop = True


# --------------------------------------------------------------------------- trainer
class FlushDataOrder(TrainerCallback):
    """Writes the data-order log at the end of every step that logs, saves or ends training. It runs right
    after `DefaultFlowCallback` has decided that, so the callbacks after it find those steps in the file."""

    def __init__(self, data_order: DataOrderLog) -> None:
        super().__init__()
        self.data_order = data_order

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_training_stop:
            self.data_order.flush()


class DDLTrainer(Trainer):
    """The HF Trainer with the paper's weight-decay groups, committed checkpoints, cumulative
    wall time in every log (`elapsed_s`, kept across resumptions) and, given `data_order_log`
    (`run_files.data_order_log`), a log of the micro-batches this process trained on. That log is
    kept on the device during training and written at the steps that log or save, before every
    checkpoint is committed and when training ends (`run_files.DataOrderLog`).

    Preemption and divergence: at every optimizer step, before the update, the processes all-reduce
    the step's loss and a stop flag (one 2-element collective), and read them with the gradient norm
    the Trainer computed for clipping (one host sync per optimizer step, not per micro-batch). A stop
    asked for by `request_stop` (SIGTERM / SIGUSR1, `stop_on_signals`) on any process ends training
    after that step, on every process, with a checkpoint of it (`stop_step`). A non-finite loss or
    gradient norm raises `TrainingDiverged` before the update, unless `--max_nonfinite_skips` allows
    skipping the step: its update is then not applied (no gradients reach the optimizer) and the skip
    is logged. Every checkpoint checks its weights are finite before it is written."""

    def __init__(self, *args, data_order_log: str | Path | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._data_order = DataOrderLog(data_order_log) if data_order_log is not None else None
        callbacks = self.callback_handler.callbacks
        after_flow = next((i + 1 for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), 0)
        if self._data_order is not None:
            callbacks.insert(after_flow, FlushDataOrder(self._data_order))
        callbacks.insert(after_flow, StopAtAgreedStep(self))
        self._stop_reason: str | None = None  # set by a signal handler, read at the next optimizer step
        self.stop_step: int | None = None  # the step after which every process stops
        self.stop_reason: str | None = None
        self._step_loss: torch.Tensor | None = None  # this optimizer step's loss so far, on the device
        self._elapsed_offset = 0.0
        self._session_start = time.perf_counter()

    def flush_data_order(self) -> None:
        """Write the data-order lines of the micro-batches trained since the last flush."""
        if self._data_order is not None:
            self._data_order.flush()

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        exempt = no_weight_decay_parameter_names(model)
        return [name for name, _ in model.named_parameters() if name not in exempt]

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        self._elapsed_offset = 0.0
        if resume_from_checkpoint is not None:
            history = load_trainer_state(resume_from_checkpoint).log_history
            elapsed = [entry["elapsed_s"] for entry in history if "elapsed_s" in entry]
            self._elapsed_offset = elapsed[-1] if elapsed else 0.0
        self._session_start = time.perf_counter()
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.flush_data_order()  # also when training stopped with an error: those batches were trained

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["elapsed_s"] = round(self._elapsed_offset + time.perf_counter() - self._session_start, 3)
        self.flush_data_order()
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._data_order is not None:  # a reference to the ids, no host transfer (run_files.DataOrderLog)
            self._data_order.record(self.state.global_step + 1, inputs["input_ids"])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss  # no host sync
        return loss

    def request_stop(self, reason: str) -> None:
        """Stop after the current optimizer step, with a checkpoint (safe to call from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def _all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
        return values

    def _get_grad_norm(self, model, grad_norm=None):
        # Called once per optimizer step, after the gradients are reduced and clipped, before the update.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        step = self.state.global_step + 1
        device = self.args.device
        loss = self._step_loss if self._step_loss is not None else torch.zeros((), device=device)
        self._step_loss = None
        stop = torch.tensor(float(self._stop_reason is not None), device=device)
        flags = torch.stack([loss.detach().float().to(device), stop])
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(float(grad_norm))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2 / TP
        loss_sum, stops, norm_value = torch.cat(
            [self._all_reduce_sum(flags), norm.detach().float().reshape(1).to(device)]
        ).tolist()  # the one host sync
        loss_value = loss_sum / max(self.args.world_size, 1)
        self._last_step_values = (loss_value, norm_value)
        if stops > 0 and self.stop_step is None:
            self.stop_step = step
            self.stop_reason = self._stop_reason or "another process received a stop signal"
            logger.warning("%s: stopping after step %d with a checkpoint", self.stop_reason, step)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            allowed = getattr(self.args, "max_nonfinite_skips", 0)
            skipped = sum(1 for entry in self.state.log_history if "nonfinite_loss" in entry)
            if skipped >= allowed or self.is_deepspeed_enabled:  # DeepSpeed's engine steps on its own
                raise TrainingDiverged(
                    "non-finite loss or gradient norm",
                    step,
                    loss_value,
                    norm_value,
                    last_complete_checkpoint(self._get_output_dir(trial=None)),
                )
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            self.state.log_history.append(
                {"step": step, "nonfinite_loss": loss_value, "nonfinite_grad_norm": norm_value}
            )
            logger.warning(
                "non-finite loss or gradient norm at step %d: loss %s, grad norm %s; skipping step %d "
                "(%d skips allowed), its update is not applied",
                step,
                loss_value,
                norm_value,
                step,
                allowed,
            )
        return grad_norm

    def _check_finite_weights(self, model, what: str) -> None:
        """Raise `TrainingDiverged` (on every process) unless every parameter is finite: nothing
        non-finite is ever saved. One pass over the weights and one host sync, at save time only."""
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
        finite = torch.stack([p.isfinite().all() for p in local]).all()  # a DTensor's shard under FSDP2 / TP
        bad = self._all_reduce_sum((~finite).float().reshape(1).to(self.args.device)).item()
        if bad > 0:
            loss, grad_norm = getattr(self, "_last_step_values", (float("nan"), float("nan")))
            raise TrainingDiverged(
                f"non-finite weights in {what} (the loss and grad norm are the step's, before its update)",
                self.state.global_step,
                loss,
                grad_norm,
                last_complete_checkpoint(self._get_output_dir(trial=None)),
            )

    def _save_checkpoint(self, model, trial) -> None:
        self._check_finite_weights(model, f"the checkpoint of step {self.state.global_step}")
        self.flush_data_order()  # the log covers the checkpoint's steps before the checkpoint is committed
        limit = self.args.save_total_limit
        # Rotation must wait until the new checkpoint is committed: a crash in between would leave
        # no complete checkpoint.
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            commit_checkpoint(checkpoint_dir, self.state.global_step)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=False)


# --------------------------------------------------------------------------- console
# Peak dense bf16 tensor FLOP/s of one device, from NVIDIA's datasheets (without sparsity): H100 SXM and H200
# 989 TFLOP/s, A100 (SXM and PCIe) 312 TFLOP/s. Matched against `torch.cuda.get_device_name()`; any other device
# needs --peak_flops for an MFU.
KNOWN_BF16_PEAK_FLOPS = (
    (("H100", "HBM3"), 989e12),  # the SXM card names itself "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989e12),
    (("H200",), 989e12),
    (("A100",), 312e12),
)


def known_peak_flops(device_name: str, bf16: bool) -> float | None:
    """The peak FLOP/s of a device in `KNOWN_BF16_PEAK_FLOPS` when training in bf16, else None."""
    if not bf16:
        return None
    return next((peak for parts, peak in KNOWN_BF16_PEAK_FLOPS if all(p in device_name for p in parts)), None)


def resolve_peak_flops(args) -> float | None:
    """`--peak_flops`, else the known peak of this process's GPU in bf16, else None (no MFU)."""
    if getattr(args, "peak_flops", None) is not None:
        return float(args.peak_flops)
    if args.use_cpu or not torch.cuda.is_available():
        return None
    return known_peak_flops(torch.cuda.get_device_name(), bool(args.bf16))


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_log_line(
    logs: dict, state, tokens_per_second: float | None, eta_s: float | None = None, mfu: float | None = None
) -> str | None:
    """One console line for a training or evaluation log, None for other logs. `mfu` is a fraction."""
    step = f"step {state.global_step}/{state.max_steps}"
    elapsed = logs.get("elapsed_s")
    clock = f" | {int(elapsed // 60):d}:{int(elapsed % 60):02d}" if elapsed is not None else ""
    if "loss" in logs:
        parts = [step, f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"grad {logs['grad_norm']:.3f}")
        if tokens_per_second is not None:
            parts.append(f"{tokens_per_second:,.0f} tok/s")
        if "num_input_tokens_seen" in logs:
            parts.append(f"{int(logs['num_input_tokens_seen']):,} tokens")
        if eta_s is not None:
            parts.append(f"ETA {_duration(eta_s)}")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.2f}%")
        return " | ".join(parts) + clock
    if "eval_loss" in logs:
        return f"{step} | eval_loss {logs['eval_loss']:.4f} | eval ppl {_perplexity(logs['eval_loss']):.2f}{clock}"
    return None


class ConsoleLogCallback(TrainerCallback):
    """One compact line per training or evaluation log on the main process (`format_log_line`), in
    place of the raw log dicts of transformers' `PrinterCallback`; used with `--disable_tqdm` (the default
    when stdout is not a terminal).

    A training line gives tokens/s and the ETA since the previous training log (the first line of a run: since
    the start of training), and, given `flops_per_token` and `peak_flops` (FLOP/s of one device), the MFU:
    `flops_per_token * tokens/s / (peak_flops * processes)` (the token count is summed over the processes)."""

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None) -> None:
        super().__init__()
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        # (elapsed_s, tokens seen, step) of the last training log
        self._previous: tuple[float, int, int] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rate = eta = mfu = None
        if "loss" in logs and "elapsed_s" in logs and "num_input_tokens_seen" in logs:
            now = (logs["elapsed_s"], int(logs["num_input_tokens_seen"]), state.global_step)
            before = self._previous if self._previous is not None else (0.0, 0, 0)
            if now[0] > before[0] and now[2] > before[2]:
                rate = (now[1] - before[1]) / (now[0] - before[0])
                eta = (state.max_steps - now[2]) * (now[0] - before[0]) / (now[2] - before[2])
            self._previous = now
        if rate is not None and self.flops_per_token is not None and self.peak_flops:
            mfu = self.flops_per_token * rate / (self.peak_flops * max(1, args.world_size))
        line = format_log_line(logs, state, rate, eta, mfu)
        if line is not None:
            self.write_line(line)

    def write_line(self, line: str) -> None:
        print(line, flush=True)


class ConsoleProgressCallback(ConsoleLogCallback, ProgressCallback):
    """transformers' progress bar, with `ConsoleLogCallback`'s lines written above it (in place of
    the raw log dicts `ProgressCallback.on_log` writes)."""

    def write_line(self, line: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(line)  # printing would tear the bar
        else:
            super().write_line(line)


# --------------------------------------------------------------------------- outputs
def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """Training and validation loss against optimizer steps, as a PNG."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    with png_figure(path, figsize=(7, 4.5)) as (_, axes):
        if train:
            axes.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evaluation:
            axes.plot(*zip(*evaluation), "o-", label="validation loss", linewidth=1.2, markersize=3)
        label_axes(axes, "optimizer step", "cross-entropy (nats/token)", title)


def _final_metrics(trainer: DDLTrainer, config: DDLConfig, block_size: int, eval_metrics: dict, job_start: float):
    from .flops import training_flops_per_token

    history = trainer.state.log_history
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    elapsed = [entry["elapsed_s"] for entry in history if "elapsed_s" in entry]
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    flops_per_token = training_flops_per_token(config, block_size)
    train_wall_time = elapsed[-1] if elapsed else None
    model = trainer.model
    return {
        "variant": config.variant_name,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "global_step": trainer.state.global_step,
        "block_size": block_size,
        "world_size": trainer.args.world_size,
        "seed": trainer.args.seed,
        "train_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_metrics["eval_loss"],
        "perplexity": _perplexity(eval_metrics["eval_loss"]),
        "eval_blocks": len(trainer.eval_dataset),
        "tokens_seen": tokens_seen,
        "train_wall_time_s": train_wall_time,
        "job_wall_time_s": round(time.perf_counter() - job_start, 3),
        "tokens_per_second": tokens_seen / train_wall_time if train_wall_time else None,
        "training_flops_per_token": flops_per_token,
        "training_flops": flops_per_token * tokens_seen,
    }


# --------------------------------------------------------------------------- the run
@dataclass
class ResumePoint:
    """Where a run starts: the committed checkpoint it resumes from (None: a fresh start) at `step`."""

    checkpoint: str | None = None
    step: int = 0
    # The checkpoint already reached max_steps: only the final save and evaluation remain, because the
    # Trainer, resumed at its last step, would train one step more.
    finished: bool = False


def build_tokenizer_and_config(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[PreTrainedTokenizerBase, DDLConfig, int]:
    """The tokenizer, the model configuration that fits it, and the block size that fits the model.
    The main process builds the tokenizer first: the built-in BPE is trained once and cached."""
    with training_args.main_process_first(local=False, desc="tokenizer"):
        tokenizer = build_tokenizer(model_args)
    config = build_config(model_args, tokenizer)
    block_size = resolve_block_size(data_args, config)
    tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer, config, block_size


def build_datasets(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, block_size: int, training_args: TrainingArguments
) -> LMDatasets:
    """The packed training and validation blocks; the main process fills the datasets caches first. With
    `--disable_tqdm` (the default when stdout is not a terminal) the datasets library shows no progress bars."""
    import datasets as datasets_library

    quiet = bool(training_args.disable_tqdm) and datasets_library.is_progress_bar_enabled()
    if quiet:
        datasets_library.disable_progress_bars()
    try:
        datasets = build_lm_datasets(
            data_args, tokenizer, block_size, lambda: training_args.main_process_first(local=False, desc="data")
        )
    finally:
        if quiet:
            datasets_library.enable_progress_bars()
    if training_args.max_steps <= 0 and not hasattr(datasets.train, "__len__"):
        raise ValueError("--streaming needs --max_steps: a stream has no length to count epochs with")
    return datasets


def prepare_output_dir(
    output_dir: Path, training_args: TrainingArguments, fingerprint: dict, data_stats: dict
) -> ResumePoint:
    """Create the output folder, delete the checkpoints whose save was interrupted, record the run's
    arguments, and find where to start: `--resume_from_checkpoint`, else the newest committed checkpoint."""
    with training_args.main_process_first(local=False, desc="checkpoints"):
        if training_args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_interrupted_checkpoints(output_dir)
            write_run_record(output_dir, fingerprint, data_stats)
        checkpoint = training_args.resume_from_checkpoint or last_complete_checkpoint(output_dir)
    if checkpoint is None:
        return ResumePoint()
    if not checkpoint_is_complete(checkpoint):
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r} is not a complete checkpoint")
    step = load_trainer_state(checkpoint).global_step
    return ResumePoint(checkpoint, step, finished=0 < training_args.max_steps <= step)


def build_trainer(
    model_args: ModelArguments,
    config: DDLConfig,
    tokenizer: PreTrainedTokenizerBase,
    datasets: LMDatasets,
    training_args: TrainingArguments,
    resume: ResumePoint,
    callbacks: list[TrainerCallback] | None,
) -> DDLTrainer:
    """The model (fresh, the one to fine-tune, or a finished run's last checkpoint) in a `DDLTrainer`
    that prints compact log lines, with this process's data-order log cut back to the resumed step."""
    if resume.finished:
        model = AutoModelForCausalLM.from_pretrained(resume.checkpoint, dtype=torch.float32)
    else:
        model = build_model(model_args, config, training_args.seed)
    data_order = data_order_log(training_args.output_dir, training_args.process_index)
    data_order.parent.mkdir(parents=True, exist_ok=True)
    truncate_data_order_log(data_order, resume.step)
    trainer = DDLTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.train,
        eval_dataset=datasets.validation,
        data_collator=data_collator(datasets.packing),
        processing_class=tokenizer,
        callbacks=callbacks,
        data_order_log=data_order,
    )
    # The Trainer's own console callbacks print raw log dicts; ours print one line per log.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    from .flops import training_flops_per_token

    console = ConsoleLogCallback if training_args.disable_tqdm else ConsoleProgressCallback
    flops_per_token = training_flops_per_token(config, datasets.block_size)
    trainer.add_callback(console(flops_per_token=flops_per_token, peak_flops=resolve_peak_flops(training_args)))
    return trainer


def train_and_save(trainer: DDLTrainer, resume: ResumePoint, output_dir: Path) -> None:
    """Train from `resume` (a finished run only gets its Trainer state back), then save the final
    model, tokenizer and `trainer_state.json` into `output_dir`. Raises `TrainingPreempted` after
    SIGTERM / SIGUSR1 stopped training with a checkpoint (nothing else is saved), `TrainingDiverged`
    when a step's loss or gradient norm (or the weights to save) are not finite."""
    if resume.finished:
        trainer.state = load_trainer_state(resume.checkpoint)
    else:
        with stop_on_signals(trainer):
            trainer.train(resume_from_checkpoint=resume.checkpoint)
        if trainer.stop_step is not None:
            checkpoint = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.stop_step}"
            logger.warning("%s: saved %s; rerun the same command to resume from it", trainer.stop_reason, checkpoint)
            raise TrainingPreempted(trainer.stop_reason, trainer.stop_step, str(checkpoint))
    trainer._check_finite_weights(trainer.model, "the final model")
    trainer.save_model(str(output_dir))
    trainer.save_state()


def finalize_run(trainer: DDLTrainer, config: DDLConfig, block_size: int, output_dir: Path, job_start: float) -> dict:
    """The final validation loss (the last periodic evaluation when it was at the last step, else a
    new one), then `metrics.json`, `loss_curve.png` and the model card."""
    last_eval = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last_eval is not None and last_eval["step"] == trainer.state.global_step:
        eval_metrics = {key: value for key, value in last_eval.items() if key.startswith("eval_")}
    else:
        eval_metrics = trainer.evaluate()
        trainer.save_state()
    metrics = _final_metrics(trainer, config, block_size, eval_metrics, job_start)
    if trainer.args.should_save:
        write_json(output_dir / METRICS_FILE, metrics)
        plot_loss_curve(trainer.state.log_history, output_dir / LOSS_CURVE_FILE, title=f"{config.variant_name}")
        from .models.ddl.model_card import write_model_card

        write_model_card(output_dir, trainer.model, metrics)
    trainer.accelerator.wait_for_everyone()
    return metrics


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Train (or resume), evaluate, and save everything into `training_args.output_dir`.

    Every check of the arguments and the data happens before the first training step. Returns the
    metrics also written to `output_dir/metrics.json`. `callbacks` are extra `TrainerCallback`s.
    """
    job_start = time.perf_counter()
    output_dir = Path(training_args.output_dir)
    fingerprint = run_fingerprint(model_args, data_args, training_args)
    check_output_dir(output_dir, fingerprint)
    tokenizer, config, block_size = build_tokenizer_and_config(model_args, data_args, training_args)
    datasets = build_datasets(data_args, tokenizer, block_size, training_args)
    resume = prepare_output_dir(output_dir, training_args, fingerprint, datasets.stats)
    trainer = build_trainer(model_args, config, tokenizer, datasets, training_args, resume, callbacks)
    if resume.checkpoint is not None:
        logger.info("resuming from %s (step %d)", resume.checkpoint, resume.step)
    logger.info(
        "training a %s model (%s parameters) on %s: %s",
        config.variant_name,
        f"{sum(p.numel() for p in trainer.model.parameters()):,}",
        datasets.source,
        json.dumps(datasets.stats),
    )
    train_and_save(trainer, resume, output_dir)
    return finalize_run(trainer, config, block_size, output_dir, job_start)


def generate_sample(model_dir: str | Path, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Reload the saved model with AutoModelForCausalLM and sample a continuation of `prompt`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=50,
            temperature=0.8,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0], skip_special_tokens=False)


def leave_process_group() -> None:
    """Destroys the process group, if any, before the interpreter exits. Left to interpreter shutdown, a gloo
    group's threads can outlive it: a rank that had stopped on a signal and saved its checkpoint then now and then
    aborted with "terminate called without an active exception" (exit status -6 instead of 75)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@reports_input_errors("train")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    join_restarted_elastic_group()  # before the arguments: they create accelerate's process group
    try:
        return train_and_report(argv)
    finally:
        leave_process_group()


def train_and_report(argv: list[str]) -> int:
    """`ddl train` once the process group exists: the run, then its summary and sample; the exit status."""
    model_args, data_args, training_args = parse_args(argv)
    is_main = training_args.process_index == 0
    logging.basicConfig(format="%(message)s", level=logging.INFO if is_main else logging.WARNING)
    transformers_logging.disable_progress_bar()  # per-file save/load bars; the training bar stays
    try:
        metrics = run_training(model_args, data_args, training_args)
    except TrainingPreempted as stopped:
        print(f"ddl train: {stopped}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    except TrainingDiverged as diverged:
        print(f"ddl train: error: {diverged}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    if is_main:
        print(
            f"\nfinal validation loss {metrics['eval_loss']:.4f} | perplexity {metrics['perplexity']:.2f} | "
            f"{metrics['tokens_seen']:,} tokens in {metrics['train_wall_time_s']:.0f} s of training | "
            f"saved to {training_args.output_dir}"
        )
        if training_args.sample_max_new_tokens > 0 and training_args.sample_prompt:
            sample = generate_sample(
                training_args.output_dir,
                training_args.sample_prompt,
                training_args.sample_max_new_tokens,
                training_args.seed,
            )
            print(f"sample from the saved model (AutoModelForCausalLM):\n{sample}")
    return 0


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "DIVERGED_EXIT_CODE",
    "TrainingPreempted",
    "TrainingDiverged",
    "ModelArguments",
    "DataArguments",
    "DDLTrainingArguments",
    "DDLTrainer",
    "parse_args",
    "run_training",
    "no_weight_decay_parameter_names",
    "main",
]
