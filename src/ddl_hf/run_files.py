"""The files of a `ddl train` output folder that make a run safe to resume and possible to check.

- Checkpoint manifests: a `checkpoint-N/` folder counts as *committed* only once its
  `ddl_checkpoint_complete.json` lists each of its files with its size. A folder whose manifest is
  missing or does not match is a save that a crash interrupted; it is removed, never resumed from.
- The run record `run_args.json`: the fingerprint of the arguments that decide the run's trajectory
  (and the data statistics). A folder that holds checkpoints or a model of a run with other
  arguments is refused, so a resumption never mixes two runs.
- The data-order logs `data_order/rank{R}.tsv`: one line per micro-batch a process trained on
  (optimizer step, hash of the input ids), so that runs can be checked to have seen identical data;
  written at logging and saving steps (`DataOrderLog`), not in the training loop's every micro-batch.
- `metrics.json` (final metrics) and the Trainer's `trainer_state.json`, read with transformers'
  own `TrainerState`.

Used by `ddl train` (`train.py`) and by `ddl compare` (`compare.py`), which decides from these
files whether a run is finished, resumable or in conflict with the command's arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from .data import DataArguments
    from .train import ModelArguments

logger = logging.getLogger(__name__)

CHECKPOINT_MANIFEST = "ddl_checkpoint_complete.json"
RUN_ARGS_FILE = "run_args.json"
METRICS_FILE = "metrics.json"
DATA_ORDER_DIR = "data_order"
# Token ids a data-order log holds on the device between two writes, at most (`DataOrderLog`).
DATA_ORDER_MAX_PENDING_BYTES = 256 << 20


def write_json(path: str | Path, payload: dict) -> None:
    """Write `payload` as indented JSON through a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    staging = path.with_suffix(path.suffix + ".tmp")
    staging.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staging, path)


def load_trainer_state(folder: str | Path) -> TrainerState:
    """The Trainer's `trainer_state.json` in `folder` (a run's output folder or one of its checkpoints)."""
    return TrainerState.load_from_json(str(Path(folder) / TRAINER_STATE_NAME))


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
        os.fsync(handle.fileno())  # the manifest must not reach the disk before the files it lists
    os.replace(staging, manifest)


def checkpoint_is_complete(checkpoint_dir: str | Path) -> bool:
    """True when the checkpoint's manifest exists and every file it lists is there with its size."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        manifest = json.loads((checkpoint_dir / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
        state = load_trainer_state(checkpoint_dir)
    except (OSError, ValueError, TypeError):  # missing, truncated, or not a Trainer state at all
        return False
    if state.global_step != manifest.get("global_step"):
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
    """The newest committed checkpoint of `output_dir`, None when there is none."""
    complete = [str(path) for _, path, is_complete in list_checkpoints(output_dir) if is_complete]
    return complete[-1] if complete else None


def remove_interrupted_checkpoints(output_dir: str | Path) -> None:
    """Delete every checkpoint whose save was interrupted (no matching manifest): resuming from it would
    load half-written state, and the Trainer's own `get_last_checkpoint` would pick it."""
    for _, path, complete in list_checkpoints(output_dir):
        if not complete:
            logger.warning("removing %s: its save was interrupted (no complete manifest)", path)
            shutil.rmtree(path)


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
# Fingerprint fields added after runs were recorded, with the value that gives what a run recorded without them
# did: such a run still resumes with that value, and is refused with any other.
FIELDS_ADDED_SINCE = {("data", "packing"): "concat"}


def _jsonable(value):
    """`value` as it reads back from JSON (enums by value, tuples as lists, other objects as str), so a
    fingerprint compares equal to the one stored in `run_args.json`."""
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


def write_run_record(output_dir: str | Path, fingerprint: dict, data_stats: dict) -> None:
    """Store the run's fingerprint (and what its data packed into) in `run_args.json`."""
    write_json(Path(output_dir) / RUN_ARGS_FILE, {"fingerprint": fingerprint, "data": data_stats})


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
        for (group, name), value in FIELDS_ADDED_SINCE.items():
            stored.setdefault(group, {}).setdefault(name, value)
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


# --------------------------------------------------------------------------- data order
def data_order_log(output_dir: str | Path, process_index: int) -> Path:
    """The data-order log of one process: `OUTPUT_DIR/data_order/rank{R}.tsv`."""
    return Path(output_dir) / DATA_ORDER_DIR / f"rank{process_index}.tsv"


def data_order_line(step: int, input_ids_bytes: bytes) -> str:
    """One line of a data-order log: the optimizer step and a short hash of a micro-batch's token ids (their
    bytes in C order), equal exactly when two runs trained on the same blocks in the same order."""
    return f"{step}\t{hashlib.sha1(input_ids_bytes).hexdigest()[:16]}\n"


class DataOrderLog:
    """The data-order log of one process, written in batches.

    `record` (once per micro-batch, in the training loop) only keeps a reference to the micro-batch's token ids
    where they are, on the accelerator: no copy to the host, so no device sync, and no file access. `flush` copies
    everything recorded since the last flush to the host in one transfer, hashes it and appends the lines in one
    write. `DDLTrainer` flushes at the steps that log or save and when training ends, and always before a
    checkpoint is committed, so the file holds every micro-batch up to the newest checkpoint (a crash loses only
    lines of steps after it, which a resumption trains and logs again). Held ids cost 8 bytes per token until the
    next flush; beyond `max_pending_bytes` (a run that logs and saves rarely), `record` flushes itself."""

    def __init__(self, path: str | Path, max_pending_bytes: int = DATA_ORDER_MAX_PENDING_BYTES) -> None:
        self.path = Path(path)
        self.max_pending_bytes = max_pending_bytes
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._pending_bytes = 0

    def record(self, step: int, input_ids: torch.Tensor) -> None:
        """Note that a micro-batch of optimizer step `step` trained on `input_ids`."""
        self._pending.append((step, input_ids.detach()))
        self._pending_bytes += input_ids.numel() * input_ids.element_size()
        if self._pending_bytes > self.max_pending_bytes:
            self.flush()

    def flush(self) -> None:
        """Append the lines of every recorded micro-batch to the file."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        same_dtype = len({ids.dtype for _, ids in pending}) == 1
        if same_dtype:  # one transfer for all of them
            host = torch.cat([ids.reshape(-1) for _, ids in pending]).cpu()
            chunks = host.split([ids.numel() for _, ids in pending])
        else:
            chunks = [ids.reshape(-1).cpu() for _, ids in pending]
        text = "".join(
            data_order_line(step, chunk.numpy().tobytes()) for (step, _), chunk in zip(pending, chunks, strict=True)
        )
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)


def truncate_data_order_log(path: str | Path, last_step: int) -> None:
    """Keep the entries of steps <= last_step (the step a run resumes from; 0 for a fresh start), so
    the steps a resumption trains again are logged once."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(line for line in lines if int(line.split("\t", 1)[0]) <= last_step), encoding="utf-8")


__all__ = [
    "CHECKPOINT_MANIFEST",
    "RUN_ARGS_FILE",
    "METRICS_FILE",
    "DATA_ORDER_DIR",
    "write_json",
    "load_trainer_state",
    "commit_checkpoint",
    "checkpoint_is_complete",
    "list_checkpoints",
    "last_complete_checkpoint",
    "remove_interrupted_checkpoints",
    "run_fingerprint",
    "write_run_record",
    "check_output_dir",
    "data_order_log",
    "data_order_line",
    "DataOrderLog",
    "truncate_data_order_log",
]
