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
checked to have seen identical data).

Never losing work: a checkpoint is *committed* only after every process has written its files,
by a `ddl_checkpoint_complete.json` manifest listing each file and its size; old checkpoints are
rotated out only after that. Rerunning with the same `output_dir` resumes from the newest
committed checkpoint, deleting any checkpoint whose manifest is missing or does not match (a
save interrupted by a crash), and refuses to start when the folder holds checkpoints or a model
of a run whose arguments differ from the fingerprint stored in `run_args.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging as transformers_logging

from .data import DataArguments, build_lm_datasets, collate_blocks
from .models.ddl.configuration_ddl import PRESET_SIZES, PRESET_VARIANTS, DDLConfig
from .models.ddl.delta_layers import DeltaShortcut, EmbedExpansion, StateCompressor
from .models.ddl.modeling_ddl import DDLForCausalLM
from .tokenization import DEFAULT_VOCAB_SIZE, default_tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_MANIFEST = "ddl_checkpoint_complete.json"
RUN_ARGS_FILE = "run_args.json"
METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"
DATA_ORDER_DIR = "data_order"


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
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "blocks per optimizer step over all processes; sets gradient_accumulation_steps"},
    )
    sample_prompt: str = field(default="def ", metadata={"help": "prompt of the sample printed after training"})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "length of that sample (0: no sample)"})

    def __post_init__(self):
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
    return HfArgumentParser((ModelArguments, DataArguments, DDLTrainingArguments))


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
    block_size = data_args.block_size or config.max_position_embeddings
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"--block_size {block_size} is larger than the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    return block_size


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


# --------------------------------------------------------------------------- checkpoints
def commit_checkpoint(checkpoint_dir: str | Path, global_step: int) -> None:
    """Mark a fully written checkpoint as complete: a manifest of its files and sizes, written atomically."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {
        path.relative_to(checkpoint_dir).as_posix(): path.stat().st_size
        for path in sorted(checkpoint_dir.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_MANIFEST
    }
    manifest = checkpoint_dir / CHECKPOINT_MANIFEST
    staging = manifest.with_suffix(".tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        json.dump({"global_step": global_step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, manifest)


def checkpoint_is_complete(checkpoint_dir: str | Path) -> bool:
    """True when the checkpoint's manifest exists and every file it lists is there with its size."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        manifest = json.loads((checkpoint_dir / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
        state = json.loads((checkpoint_dir / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if state.get("global_step") != manifest.get("global_step"):
        return False
    for name, size in manifest.get("files", {}).items():
        path = checkpoint_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _checkpoint_step(path: Path) -> int | None:
    suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
    return int(suffix) if path.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and suffix.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every `checkpoint-N` folder, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(_checkpoint_step(path), path) for path in output_dir.iterdir() if path.is_dir()]
    found = sorted((step, path) for step, path in found if step is not None)  # other folders: data_order, ...
    return [(step, path, checkpoint_is_complete(path)) for step, path in found]


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    complete = [str(path) for _, path, is_complete in list_checkpoints(output_dir) if is_complete]
    return complete[-1] if complete else None


# --------------------------------------------------------------------------- run fingerprint
# TrainingArguments fields that change the sequence of weights a run produces. Logging, saving,
# evaluation cadence and paths may change between a run and its resumption; these may not.
TRAJECTORY_FIELDS = (
    "seed",
    "data_seed",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "optim",
    "optim_args",
    "max_grad_norm",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "tf32",
    "activation_checkpointing",
    "label_smoothing_factor",
    "dataloader_drop_last",
    "train_sampling_strategy",
    "average_tokens_across_devices",
    "torch_compile",
    "full_determinism",
)
# DataArguments fields that only change where or how fast the data is prepared.
DATA_FIELDS_NOT_IN_FINGERPRINT = ("preprocessing_num_workers", "dataset_cache_dir")


def _jsonable(value):
    if isinstance(value, Enum):
        return value.value
    return json.loads(json.dumps(value, default=str))


def run_fingerprint(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, dict]:
    """Everything that decides the run's trajectory, as plain JSON."""
    data = {k: v for k, v in asdict(data_args).items() if k not in DATA_FIELDS_NOT_IN_FINGERPRINT}
    training = {name: getattr(training_args, name) for name in TRAJECTORY_FIELDS if hasattr(training_args, name)}
    training["world_size"] = training_args.world_size
    return {"model": _jsonable(asdict(model_args)), "data": _jsonable(data), "training": _jsonable(training)}


def check_output_dir(output_dir: str | Path, fingerprint: dict) -> None:
    """Refuse an output folder whose checkpoints or model come from a run with other arguments (or
    from no recorded `ddl train` run). A folder without checkpoints or model holds no work to protect."""
    output_dir = Path(output_dir)
    record = output_dir / RUN_ARGS_FILE
    holds_work = bool(list_checkpoints(output_dir)) or (output_dir / "config.json").exists()
    if not holds_work:
        return
    if record.is_file():
        stored = json.loads(record.read_text(encoding="utf-8")).get("fingerprint", {})
        differences = [
            f"{group}.{name}: {stored.get(group, {}).get(name)!r} -> {fingerprint[group].get(name)!r}"
            for group in fingerprint
            for name in sorted(set(stored.get(group, {})) | set(fingerprint[group]))
            if stored.get(group, {}).get(name) != fingerprint[group].get(name)
        ]
        if differences:
            raise ValueError(
                f"--output_dir {str(output_dir)!r} holds a run with different arguments, so it cannot be resumed: "
                + "; ".join(differences)
                + ". Use another --output_dir, or delete this one to start over."
            )
    else:
        raise ValueError(
            f"--output_dir {str(output_dir)!r} holds checkpoints or a model that `ddl train` did not record "
            f"({RUN_ARGS_FILE} is missing); use another --output_dir"
        )


def _write_json(path: Path, payload: dict) -> None:
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staging, path)


# --------------------------------------------------------------------------- trainer
class DDLTrainer(Trainer):
    """The HF Trainer with the paper's weight-decay groups, committed checkpoints, cumulative
    wall time in every log (`elapsed_s`, kept across resumptions) and a per-process log of the
    micro-batches trained on (`data_order/rank{R}.tsv`: optimizer step, hash of the input ids)."""

    def __init__(self, *args, data_order_dir: str | Path | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._data_order_path = (
            Path(data_order_dir) / f"rank{self.args.process_index}.tsv" if data_order_dir is not None else None
        )
        self._elapsed_offset = 0.0
        self._session_start = time.perf_counter()

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        exempt = no_weight_decay_parameter_names(model)
        return [name for name, _ in model.named_parameters() if name not in exempt]

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        self._elapsed_offset = 0.0
        if resume_from_checkpoint is not None:
            state = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
            elapsed = [entry["elapsed_s"] for entry in state.get("log_history", []) if "elapsed_s" in entry]
            self._elapsed_offset = elapsed[-1] if elapsed else 0.0
        self._session_start = time.perf_counter()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["elapsed_s"] = round(self._elapsed_offset + time.perf_counter() - self._session_start, 3)
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._data_order_path is not None:
            digest = hashlib.sha1(inputs["input_ids"].detach().cpu().numpy().tobytes()).hexdigest()[:16]
            with open(self._data_order_path, "a", encoding="utf-8") as handle:
                handle.write(f"{self.state.global_step + 1}\t{digest}\n")
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial) -> None:
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


def truncate_data_order_log(path: Path, last_step: int) -> None:
    """Keep the entries of steps <= last_step (the step a run resumes from; 0 for a fresh start)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(line for line in lines if int(line.split("\t", 1)[0]) <= last_step), encoding="utf-8")


def format_log_line(logs: dict, state, tokens_per_second: float | None) -> str | None:
    """One console line for a training or evaluation log, None for other logs."""
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
        return " | ".join(parts) + clock
    if "eval_loss" in logs:
        return f"{step} | eval_loss {logs['eval_loss']:.4f} | eval ppl {_perplexity(logs['eval_loss']):.2f}{clock}"
    return None


class ConsoleProgressCallback(ProgressCallback):
    """A progress bar (unless `disable_tqdm`) and one compact line per log on the main process."""

    def __init__(self, show_bar: bool = True) -> None:
        super().__init__()
        self.show_bar = show_bar
        self._previous: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.show_bar:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_evaluate(args, state, control, **kwargs)

    def on_predict(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_predict(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rate = None
        if "loss" in logs and "elapsed_s" in logs and "num_input_tokens_seen" in logs:
            now = (logs["elapsed_s"], int(logs["num_input_tokens_seen"]))
            if self._previous is not None and now[0] > self._previous[0]:
                rate = (now[1] - self._previous[1]) / (now[0] - self._previous[0])
            self._previous = now
        line = format_log_line(logs, state, rate)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


# --------------------------------------------------------------------------- outputs
def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def plot_loss_curve(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """Training and validation loss against optimizer steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="validation loss", linewidth=1.2, markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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

    with training_args.main_process_first(local=False, desc="tokenizer"):
        tokenizer = build_tokenizer(model_args)
    config = build_config(model_args, tokenizer)
    block_size = resolve_block_size(data_args, config)
    tokenizer.model_max_length = config.max_position_embeddings
    datasets = build_lm_datasets(
        data_args, tokenizer, block_size, lambda: training_args.main_process_first(local=False, desc="data")
    )
    if training_args.max_steps <= 0 and not hasattr(datasets.train, "__len__"):
        raise ValueError("--streaming needs --max_steps: a stream has no length to count epochs with")

    with training_args.main_process_first(local=False, desc="checkpoints"):
        if training_args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            for _, path, complete in list_checkpoints(output_dir):
                if not complete:
                    logger.warning("removing %s: its save was interrupted (no complete manifest)", path)
                    shutil.rmtree(path)
            _write_json(output_dir / RUN_ARGS_FILE, {"fingerprint": fingerprint, "data": datasets.stats})
        checkpoint = training_args.resume_from_checkpoint or last_complete_checkpoint(output_dir)
    if checkpoint is not None and not checkpoint_is_complete(checkpoint):
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r} is not a complete checkpoint")
    resumed_step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
    # A run that already reached max_steps only needs its final save and evaluation; the Trainer,
    # resumed at its last step, would train one step more.
    finished = checkpoint is not None and 0 < training_args.max_steps <= resumed_step
    if finished:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        model = build_model(model_args, config, training_args.seed)
    data_order_dir = output_dir / DATA_ORDER_DIR
    data_order_dir.mkdir(parents=True, exist_ok=True)
    truncate_data_order_log(data_order_dir / f"rank{training_args.process_index}.tsv", resumed_step)

    trainer = DDLTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets.train,
        eval_dataset=datasets.validation,
        data_collator=collate_blocks,
        processing_class=tokenizer,
        callbacks=callbacks,
        data_order_dir=data_order_dir,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleProgressCallback(show_bar=not training_args.disable_tqdm))
    if checkpoint is not None:
        logger.info("resuming from %s (step %d)", checkpoint, resumed_step)
    logger.info(
        "training a %s model (%s parameters) on %s: %s",
        config.variant_name,
        f"{sum(p.numel() for p in model.parameters()):,}",
        datasets.source,
        json.dumps(datasets.stats),
    )
    if finished:
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(output_dir))
    trainer.save_state()

    last_eval = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last_eval is not None and last_eval["step"] == trainer.state.global_step:
        eval_metrics = {key: value for key, value in last_eval.items() if key.startswith("eval_")}
    else:
        eval_metrics = trainer.evaluate()
        trainer.save_state()
    metrics = _final_metrics(trainer, config, block_size, eval_metrics, job_start)
    if training_args.should_save:
        _write_json(output_dir / METRICS_FILE, metrics)
        plot_loss_curve(trainer.state.log_history, output_dir / LOSS_CURVE_FILE, title=f"{config.variant_name}")
        from .models.ddl.model_card import write_model_card

        write_model_card(output_dir, trainer.model, metrics)
    trainer.accelerator.wait_for_everyone()
    return metrics


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ValueError as error:
        print(f"ddl train: error: {error}", file=sys.stderr)
        return 2
    is_main = training_args.process_index == 0
    logging.basicConfig(format="%(message)s", level=logging.INFO if is_main else logging.WARNING)
    transformers_logging.disable_progress_bar()  # per-file save/load bars; the training bar stays
    try:
        metrics = run_training(model_args, data_args, training_args)
    except ValueError as error:
        print(f"ddl train: error: {error}", file=sys.stderr)
        return 2
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
    "ModelArguments",
    "DataArguments",
    "DDLTrainingArguments",
    "DDLTrainer",
    "parse_args",
    "run_training",
    "no_weight_decay_parameter_names",
    "last_complete_checkpoint",
    "checkpoint_is_complete",
    "main",
]
