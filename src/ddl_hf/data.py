"""Training data for `ddl train`: load documents, tokenize them, pack them into fixed-length blocks.

Sources, in order of precedence:

1. `--dataset_name` (a hub dataset, or a local dataset folder) with `--dataset_config_name`;
   `--streaming` reads it lazily instead of downloading it whole.
2. `--train_file` / `--validation_file`: `.txt` (split into documents by `--txt_sample_by`),
   `.json` / `.jsonl` or `.parquet` (one document per row, text in `--text_column`).
3. Nothing: the built-in offline corpus, the Python standard library sources of the running
   interpreter (test folders and site-packages excluded), split into train and validation by a
   hash of each file's path, so the split never changes for a given Python version.

Every document is tokenized without special tokens and followed by EOS; the token stream is then
cut into blocks of `block_size` tokens. With `--packing concat` (the default) attention crosses document
boundaries, as in GPT-style pretraining; `--packing documents` keeps the same blocks and stores each token's
index in its document as `position_ids` (0 at each document start and at each block start), so that the model
keeps every document apart (`collate_documents`). Tokenizing and packing run through `datasets.map` with
fingerprints derived from the data, the tokenizer's content and the block size, so a second run reuses the cached Arrow
files. The tokens after the last full block of each map batch of documents are dropped, and
`build_lm_datasets` says how many at WARNING level, for each split.

When the source has no validation split, whole documents are held out, so that no document is in
both splits: documents drawn in an order shuffled with a fixed seed until they hold
`validation_split_percentage` of the tokens (the first documents of a stream, as many as fill
`max_eval_samples` blocks), each side packed from its own documents. A source of one document is
split at the end of its token stream instead, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, IterableDataset, Sequence, Value, load_dataset

logger = logging.getLogger(__name__)

# Files of the built-in corpus whose path hashes below this percentage form its validation split.
BUILTIN_VALIDATION_PERCENT = 5
BUILTIN_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
# Seed of the held-out validation blocks: fixed, so every training seed is evaluated on the same blocks.
VALIDATION_SPLIT_SEED = 1234
STREAMING_VALIDATION_BLOCKS = 100
# Documents per `datasets.map` batch of the packing: the tokens after the last full block of each are dropped.
PACKING_BATCH_DOCUMENTS = 1000
LOCAL_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TXT_SAMPLE_BY = ("document", "paragraph", "line")
# `concat`: documents run into each other (GPT-style); `documents`: each keeps its own position_ids
# (see collate_documents).
PACKING_MODES = ("concat", "documents")
# Bump when the tokenize or pack functions change, so old cache files are not reused.
PIPELINE_VERSION = "1"
# Tokens per block when --block_size is not given; a model with a shorter context trains on all of it.
DEFAULT_BLOCK_SIZE = 256


@dataclass
class DataArguments:
    """Where the training text comes from and how it becomes blocks of tokens."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "hub dataset name (or local dataset folder) for load_dataset"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "configuration of --dataset_name"})
    streaming: bool = field(
        default=False, metadata={"help": "stream the dataset instead of downloading it (needs max_steps)"}
    )
    train_file: str | None = field(default=None, metadata={"help": "local .txt, .json, .jsonl or .parquet file"})
    validation_file: str | None = field(default=None, metadata={"help": "local validation file (same formats)"})
    text_column: str = field(default="text", metadata={"help": "column holding the documents' text"})
    txt_sample_by: str = field(
        default="document",
        metadata={"help": "how a .txt file splits into documents (EOS between them)", "choices": TXT_SAMPLE_BY},
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": f"tokens per training block, at most the model's max_position_embeddings; None follows "
            f"the model: min({DEFAULT_BLOCK_SIZE}, max_position_embeddings)"
        },
    )
    packing: str = field(
        default="concat",
        metadata={
            "help": "concat: attention and convolutions cross document boundaries (GPT-style); documents: the same "
            "blocks, but each document gets its own position_ids (from 0, also where a block starts mid-document) "
            "and attention and the token convolutions stay inside it",
            "choices": PACKING_MODES,
        },
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "percent of the tokens held out for validation, as whole documents, when the data has no "
            "validation split"
        },
    )
    max_eval_samples: int | None = field(
        default=64, metadata={"help": "evaluate on at most this many validation blocks (null: all of them)"}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for datasets.map"})
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "cache folder for datasets (default: the datasets library's own)"}
    )

    def __post_init__(self):
        if self.txt_sample_by not in TXT_SAMPLE_BY:
            raise ValueError(f"--txt_sample_by must be one of {list(TXT_SAMPLE_BY)}, got {self.txt_sample_by!r}")
        if self.packing not in PACKING_MODES:
            raise ValueError(f"--packing must be one of {list(PACKING_MODES)}, got {self.packing!r}")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in (0, 100), got {self.validation_split_percentage}"
            )
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be >= 2 (inputs and a next-token target), got {self.block_size}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples must be >= 1, got {self.max_eval_samples}")
        if self.dataset_name is not None and (self.train_file is not None or self.validation_file is not None):
            raise ValueError("give either --dataset_name or --train_file/--validation_file, not both")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file needs a --train_file")

    @property
    def source_description(self) -> str:
        if self.dataset_name is not None:
            config = f" ({self.dataset_config_name})" if self.dataset_config_name else ""
            return f"dataset {self.dataset_name!r}{config}"
        if self.train_file is not None:
            return f"file {self.train_file!r}"
        return "the built-in corpus (Python standard library sources)"


@dataclass
class LMDatasets:
    """Packed training and validation blocks, each row `{"input_ids": block_size token ids}` (and, with
    `--packing documents`, `"position_ids"`: each token's index in its document)."""

    train: Dataset | IterableDataset
    validation: Dataset
    block_size: int
    source: str
    stats: dict = field(default_factory=dict)
    packing: str = "concat"  # the --packing mode: `data_collator(packing)` batches the blocks


# --------------------------------------------------------------------------- built-in corpus
def builtin_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_corpus_split(relative_path: str) -> str:
    """`"validation"` for about BUILTIN_VALIDATION_PERCENT % of the files, chosen by a hash of the path."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "validation" if bucket < BUILTIN_VALIDATION_PERCENT else "train"


def builtin_corpus_documents(split: str) -> list[tuple[str, str]]:
    """(relative path, source text) of every standard-library `.py` file of `split`, sorted by path."""
    if split not in ("train", "validation"):
        raise ValueError(f"the built-in corpus has splits 'train' and 'validation', got {split!r}")
    root = builtin_corpus_root()
    relative_paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in BUILTIN_EXCLUDED_DIRS]  # never descend
        relative_folder = Path(folder).relative_to(root)
        relative_paths += [(relative_folder / name).as_posix() for name in files if name.endswith(".py")]
    return [
        (relative, (root / relative).read_text(encoding="utf-8", errors="replace"))
        for relative in sorted(relative_paths)
        if builtin_corpus_split(relative) == split
    ]


def _generate_documents(documents: list[tuple[str, str]]) -> Iterator[dict]:
    for path, text in documents:
        yield {"path": path, "text": text}


def load_builtin_corpus(cache_dir: str | None = None) -> DatasetDict:
    """The built-in corpus as Arrow datasets with columns `path` and `text` (cached by content hash)."""
    splits = {}
    for split in ("train", "validation"):
        documents = builtin_corpus_documents(split)
        digest = hashlib.sha256()
        for path, text in documents:
            digest.update(path.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")
        splits[split] = Dataset.from_generator(
            _generate_documents,
            gen_kwargs={"documents": documents},
            features=Features({"path": Value("string"), "text": Value("string")}),
            cache_dir=cache_dir,
            split=split,
            fingerprint=f"ddl-stdlib-{split}-{digest.hexdigest()[:32]}",
        )
    return DatasetDict(splits)


# --------------------------------------------------------------------------- local files and hub datasets
def _local_builder(path: str, argument: str) -> str:
    if not Path(path).is_file():
        raise ValueError(f"{argument} {path!r} does not exist or is not a file")
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_FILE_BUILDERS:
        raise ValueError(
            f"{argument} {path!r}: unsupported extension {suffix!r}; use one of {list(LOCAL_FILE_BUILDERS)}"
        )
    return LOCAL_FILE_BUILDERS[suffix]


def load_local_text_file(
    path: str,
    text_column: str = "text",
    argument: str = "--train_file",
    txt_sample_by: str = "document",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Dataset | IterableDataset:
    """One local file as a dataset of documents whose text is in `text_column`."""
    builder = _local_builder(path, argument)
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{argument} {path!r} is empty: it has no documents")
    options = {"sample_by": txt_sample_by, "keep_linebreaks": True} if builder == "text" else {}
    try:
        dataset = load_dataset(
            builder, data_files={"train": path}, split="train", streaming=streaming, cache_dir=cache_dir, **options
        )
    except Exception as error:  # pyarrow and json parsers raise many types for a malformed file
        raise ValueError(f"{argument} {path!r} cannot be read as {builder}: {error!r}") from error
    if builder == "text" and text_column != "text":
        dataset = dataset.rename_column("text", text_column)
    _check_text_column(dataset, text_column, f"{argument} {path!r}")
    return dataset


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return [] if first is None else list(first)


def _check_text_column(dataset: Dataset | IterableDataset, text_column: str, source: str) -> None:
    columns = _column_names(dataset)
    if (isinstance(dataset, Dataset) and len(dataset) == 0) or not columns:
        raise ValueError(f"{source} is empty: it has no documents")
    if text_column not in columns:
        raise ValueError(f"--text_column {text_column!r} not found in {source}; its columns are {columns}")


def load_documents(data_args: DataArguments) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """(train documents, validation documents or None) for the source chosen by `data_args`."""
    cache_dir = data_args.dataset_cache_dir
    if data_args.dataset_name is not None:
        try:
            raw = load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                streaming=data_args.streaming,
                cache_dir=cache_dir,
            )
        except Exception as error:  # the datasets library raises many types for a missing or unreachable dataset
            raise ValueError(f"could not load --dataset_name {data_args.dataset_name!r}: {error}") from error
        if "train" not in raw:
            raise ValueError(f"--dataset_name {data_args.dataset_name!r} has no 'train' split; splits: {list(raw)}")
        source = data_args.source_description
        _check_text_column(raw["train"], data_args.text_column, source)
        validation = raw["validation"] if "validation" in raw else None
        if validation is not None:
            _check_text_column(validation, data_args.text_column, f"{source} (validation split)")
        return raw["train"], validation
    if data_args.train_file is not None:
        kwargs = dict(
            text_column=data_args.text_column,
            txt_sample_by=data_args.txt_sample_by,
            streaming=data_args.streaming,
            cache_dir=cache_dir,
        )
        train = load_local_text_file(data_args.train_file, argument="--train_file", **kwargs)
        validation = None
        if data_args.validation_file is not None:
            validation = load_local_text_file(data_args.validation_file, argument="--validation_file", **kwargs)
        return train, validation
    if data_args.streaming:
        raise ValueError("--streaming needs --dataset_name or --train_file; the built-in corpus is small enough")
    if data_args.text_column != "text":
        raise ValueError(f"the built-in corpus has a 'text' column, not --text_column {data_args.text_column!r}")
    corpus = load_builtin_corpus(cache_dir)
    return corpus["train"], corpus["validation"]


# --------------------------------------------------------------------------- tokenize and pack
class DocumentTokenizer:
    """`datasets.map` function: documents -> token ids followed by EOS (empty documents are skipped)."""

    def __init__(self, tokenizer, text_column: str) -> None:
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = []
        for text in batch[self.text_column]:
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise ValueError(f"--text_column {self.text_column!r} must hold strings, found a {type(text).__name__}")
            texts.append(text)
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        input_ids = [ids + [self.eos_token_id] for ids in encoded]
        return {"input_ids": input_ids, "num_tokens": [len(ids) for ids in input_ids]}


class BlockPacker:
    """`datasets.map` function: concatenates a batch of tokenized documents and cuts it into blocks.

    The tokens after the last full block of each map batch (fewer than `block_size`) are dropped;
    `build_lm_datasets` reports how many.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) - len(stream) % self.block_size
        return {"input_ids": [stream[i : i + self.block_size] for i in range(0, usable, self.block_size)]}


class DocumentBlockPacker(BlockPacker):
    """`BlockPacker` (the same blocks) that also stores each token's index in its document as `position_ids`:
    0 at every document start, and at the start of every block, so that a block starting mid-document starts
    that document's remainder at 0 (for the model it is a document of its own)."""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        blocks = super().__call__(batch)["input_ids"]
        stream = list(chain.from_iterable(range(len(ids)) for ids in batch["input_ids"]))
        position_ids = []
        for start in range(0, len(blocks) * self.block_size, self.block_size):
            block, offset = stream[start : start + self.block_size], stream[start]
            positions = []
            for position in block:
                if position == 0:
                    offset = 0
                positions.append(position - offset)
            position_ids.append(positions)
        return {"input_ids": blocks, "position_ids": position_ids}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the serialized tokenizer and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    content = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{content}\0{tokenizer.eos_token_id}".encode()).hexdigest()[:32]


def _derived_fingerprint(*parts) -> str:
    return hashlib.sha256("\0".join(str(part) for part in (PIPELINE_VERSION, *parts)).encode()).hexdigest()[:32]


TOKENIZED_FEATURES = Features({"input_ids": Sequence(Value("int32")), "num_tokens": Value("int64")})
PACKED_FEATURES = Features({"input_ids": Sequence(Value("int32"))})
DOCUMENT_PACKED_FEATURES = Features({"input_ids": Sequence(Value("int32")), "position_ids": Sequence(Value("int32"))})


def tokenize_documents(dataset, tokenizer, text_column: str, num_proc: int | None = None):
    """Token ids of every non-empty document followed by EOS: columns `input_ids`, `num_tokens`."""
    columns = _column_names(dataset)
    function = DocumentTokenizer(tokenizer, text_column)
    if isinstance(dataset, IterableDataset):
        return dataset.map(function, batched=True, remove_columns=columns, features=TOKENIZED_FEATURES)
    return dataset.map(
        function,
        batched=True,
        remove_columns=columns,
        features=TOKENIZED_FEATURES,
        num_proc=num_proc,
        new_fingerprint=_derived_fingerprint(
            "tokenize", dataset._fingerprint, tokenizer_fingerprint(tokenizer), text_column
        ),
        desc="Tokenizing",
    )


def pack_into_blocks(tokenized, block_size: int, num_proc: int | None = None, packing: str = "concat"):
    """Blocks of exactly `block_size` token ids cut from the concatenated documents; with `packing="documents"`
    also their `position_ids` (`DocumentBlockPacker`)."""
    documents = packing == "documents"
    function = DocumentBlockPacker(block_size) if documents else BlockPacker(block_size)
    features = DOCUMENT_PACKED_FEATURES if documents else PACKED_FEATURES
    if isinstance(tokenized, IterableDataset):
        return tokenized.map(
            function,
            batched=True,
            batch_size=PACKING_BATCH_DOCUMENTS,
            remove_columns=["input_ids", "num_tokens"],
            features=features,
        )
    # concat keeps the fingerprint it always had, so its cache files are reused
    fingerprint_parts = ("pack", tokenized._fingerprint, block_size, *(["documents"] if documents else []))
    return tokenized.map(
        function,
        batched=True,
        batch_size=PACKING_BATCH_DOCUMENTS,
        remove_columns=["input_ids", "num_tokens"],
        features=features,
        num_proc=num_proc,
        new_fingerprint=_derived_fingerprint(*fingerprint_parts),
        desc=f"Packing into blocks of {block_size}",
    )


def _packing_stats(tokenized: Dataset, packed: Dataset, block_size: int) -> dict:
    total_tokens = sum(tokenized["num_tokens"])
    return {
        "documents": len(tokenized),
        "tokens": total_tokens,
        "blocks": len(packed),
        "dropped_tokens": total_tokens - len(packed) * block_size,
    }


def _check_packed(stats: dict, data_args: DataArguments, block_size: int, source: str) -> None:
    if stats["tokens"] == 0:
        raise ValueError(f"{source} has no text: every document in --text_column {data_args.text_column!r} is empty")
    if stats["blocks"] == 0:
        raise ValueError(
            f"{source} has {stats['tokens']} tokens, fewer than one block of --block_size {block_size}; "
            "lower --block_size or add data"
        )


def _warn_dropped(split: str, stats: dict, block_size: int) -> None:
    if stats["dropped_tokens"]:
        logger.warning(
            "packing the %s documents dropped %s of %s tokens (%.2f%%): the end of each map batch of %s documents "
            "that did not fill a block of %d",
            split,
            f"{stats['dropped_tokens']:,}",
            f"{stats['tokens']:,}",
            100 * stats["dropped_tokens"] / stats["tokens"],
            f"{PACKING_BATCH_DOCUMENTS:,}",
            block_size,
        )


def _packed(tokenized, data_args: DataArguments, block_size: int, source: str, split: str) -> tuple:
    """Blocks of tokenized documents, and (for a dataset in memory or on disk) what went into them."""
    packed = pack_into_blocks(tokenized, block_size, data_args.preprocessing_num_workers, data_args.packing)
    if isinstance(packed, IterableDataset):
        return packed, {}
    stats = _packing_stats(tokenized, packed, block_size)
    _check_packed(stats, data_args, block_size, source)
    _warn_dropped(split, stats, block_size)
    return packed, stats


def held_out_documents(num_tokens: list[int], percentage: float, block_size: int) -> list[int] | None:
    """Indices (ascending) of the documents held out for validation: documents taken in an order shuffled with
    VALIDATION_SPLIT_SEED until they hold `percentage` % of the tokens (at least one block's worth), never all of
    them. None for fewer than two documents."""
    if len(num_tokens) < 2:
        return None
    target = max(sum(num_tokens) * percentage / 100, block_size)
    order = np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(len(num_tokens))
    held, tokens = [], 0
    for index in order[:-1]:
        held.append(int(index))
        tokens += num_tokens[index]
        if tokens >= target:
            break
    return sorted(held)


def _split_by_documents(tokenized: Dataset, data_args: DataArguments, block_size: int, source: str):
    """(train blocks, validation blocks, stats) from one tokenized source without a validation split: whole
    documents are held out (`held_out_documents`), so no document is in both. With a single document, or when no
    such split leaves a block on each side, the last blocks of the packed stream are held out instead, in order."""
    num_tokens = tokenized["num_tokens"]
    held = held_out_documents(num_tokens, data_args.validation_split_percentage, block_size)
    if held is not None:
        held_set = set(held)
        kept = [index for index in range(len(num_tokens)) if index not in held_set]
        parts = {}
        for split, indices in (("training", kept), ("validation", held)):
            part = tokenized.select(indices)
            packed = pack_into_blocks(part, block_size, data_args.preprocessing_num_workers, data_args.packing)
            parts[split] = (packed, _packing_stats(part, packed, block_size))
        if parts["training"][1]["blocks"] and parts["validation"][1]["blocks"]:
            for split, (_, stats) in parts.items():
                _warn_dropped(split, stats, block_size)
            (train, train_part), (validation, held_part) = parts["training"], parts["validation"]
            blocks = train_part["blocks"] + held_part["blocks"]
            stats = {  # the source as a whole, as with a validation file
                "documents": len(num_tokens),
                "tokens": sum(num_tokens),
                "blocks": blocks,
                "dropped_tokens": sum(num_tokens) - blocks * block_size,
            }
            held_out = {
                "validation_held_out_documents": held_part["documents"],
                "validation_held_out_tokens": held_part["tokens"],
                "validation_held_out_blocks": held_part["blocks"],
            }
            logger.info(
                "held out %d of %d documents (%s of %s tokens) of %s for validation",
                held_part["documents"],
                stats["documents"],
                f"{held_part['tokens']:,}",
                f"{stats['tokens']:,}",
                source,
            )
            return train, validation, {f"train_{key}": value for key, value in stats.items()} | held_out
    packed, stats = _packed(tokenized, data_args, block_size, source, "training")
    if len(packed) < 2:
        raise ValueError(
            f"{source} packs into a single block of {block_size} tokens: no validation block can be held "
            "out; add data, lower --block_size or give --validation_file"
        )
    count = min(len(packed) - 1, max(1, round(len(packed) * data_args.validation_split_percentage / 100)))
    documents = stats["documents"]
    reason = (
        "holds 1 document, so it cannot be split by document"
        if documents == 1
        else f"holds {documents:,} documents, but no split into whole documents leaves a block on each side"
    )
    logger.warning(
        "%s %s: the last %d of its %d blocks are held out for validation, so the document at the boundary is in "
        "both splits; give --validation_file (or split a .txt file with --txt_sample_by paragraph or line)",
        source,
        reason,
        count,
        len(packed),
    )
    boundary = len(packed) - count
    stats = {f"train_{key}": value for key, value in stats.items()} | {"validation_held_out_blocks": count}
    return packed.select(range(boundary)), packed.select(range(boundary, len(packed))), stats


def _split_stream_by_documents(
    tokenized: IterableDataset, wanted_blocks: int, block_size: int, source: str, packing: str = "concat"
):
    """(train stream, validation blocks, stats) of a stream without a validation split: its first documents, as
    many as fill `wanted_blocks` blocks, are held out, and training starts with the next document."""
    held_ids, tokens = [], 0
    documents = iter(tokenized)
    for row in documents:
        held_ids.append(row["input_ids"])
        tokens += row["num_tokens"]
        if tokens >= wanted_blocks * block_size:
            break
    if tokens < wanted_blocks * block_size or next(documents, None) is None:
        raise ValueError(
            f"{source} has {tokens:,} tokens, too few to hold out {wanted_blocks} validation blocks of {block_size} "
            "and train on the rest; give --validation_file or lower --max_eval_samples"
        )
    held = Dataset.from_dict(
        {"input_ids": held_ids, "num_tokens": [len(ids) for ids in held_ids]}, features=TOKENIZED_FEATURES
    )
    packed = pack_into_blocks(held, block_size, packing=packing)
    _warn_dropped("validation", _packing_stats(held, packed, block_size), block_size)
    validation = packed.select(range(min(wanted_blocks, len(packed))))
    stats = {"validation_held_out_documents": len(held_ids), "validation_held_out_blocks": len(validation)}
    return pack_into_blocks(tokenized.skip(len(held_ids)), block_size, packing=packing), validation, stats


def build_lm_datasets(
    data_args: DataArguments,
    tokenizer,
    block_size: int,
    main_process_first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> LMDatasets:
    """Load, tokenize, pack and split the data chosen by `data_args` (see the module docstring).

    `main_process_first` is a context-manager factory (the Trainer's `main_process_first`) so that in
    a multi-process run one process fills the caches and the others read them.
    """
    source = data_args.source_description
    with main_process_first():
        train_documents, validation_documents = load_documents(data_args)
        tokenized = tokenize_documents(
            train_documents, tokenizer, data_args.text_column, data_args.preprocessing_num_workers
        )
        if validation_documents is not None:
            train, train_stats = _packed(tokenized, data_args, block_size, source, "training")
            stats = {f"train_{key}": value for key, value in train_stats.items()}
            validation_tokenized = tokenize_documents(
                validation_documents, tokenizer, data_args.text_column, data_args.preprocessing_num_workers
            )
            validation, validation_stats = _packed(
                validation_tokenized, data_args, block_size, f"{source} (validation)", "validation"
            )
            stats.update({f"validation_{key}": value for key, value in validation_stats.items()})
            if isinstance(validation, IterableDataset):
                limit = data_args.max_eval_samples or STREAMING_VALIDATION_BLOCKS
                validation = _materialize(validation.take(limit), f"{source} (validation)")
        elif isinstance(tokenized, IterableDataset):
            wanted = data_args.max_eval_samples or STREAMING_VALIDATION_BLOCKS
            train, validation, stats = _split_stream_by_documents(
                tokenized, wanted, block_size, source, data_args.packing
            )
        else:
            train, validation, stats = _split_by_documents(tokenized, data_args, block_size, source)
    if data_args.max_eval_samples is not None and len(validation) > data_args.max_eval_samples:
        validation = validation.select(range(data_args.max_eval_samples))
    stats["validation_blocks_used"] = len(validation)
    return LMDatasets(
        train=train,
        validation=validation,
        block_size=block_size,
        source=source,
        stats=stats,
        packing=data_args.packing,
    )


def _materialize(blocks: IterableDataset, source: str) -> Dataset:
    rows = list(blocks)
    if not rows:
        raise ValueError(f"{source} has fewer tokens than one block: no validation block could be formed")
    features = DOCUMENT_PACKED_FEATURES if "position_ids" in rows[0] else PACKED_FEATURES
    return Dataset.from_list([{name: row[name] for name in features} for row in rows], features=features)


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack blocks into `input_ids` (B, T) and identical `labels` (the model shifts them)."""
    input_ids = torch.tensor([feature["input_ids"] for feature in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def collate_documents(features: list[dict]) -> dict[str, torch.Tensor]:
    """Blocks packed with `--packing documents`: `input_ids`, `position_ids` (B, T) and `labels`, and no
    `attention_mask`. The model then keeps attention and the token convolutions inside each document (a document
    starts wherever the positions restart, as with transformers' `DataCollatorWithFlattening`), and the label of
    every document's first token is -100, so no token is predicted from the previous document. The Trainer divides
    the summed token losses by the count of labels that are not -100."""
    input_ids = torch.tensor([feature["input_ids"] for feature in features], dtype=torch.long)
    position_ids = torch.tensor([feature["position_ids"] for feature in features], dtype=torch.long)
    labels = input_ids.masked_fill(position_ids == 0, -100)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def data_collator(packing: str) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The collator of a `--packing` mode: `collate_blocks` (concat) or `collate_documents`."""
    return collate_documents if packing == "documents" else collate_blocks


__all__ = [
    "DataArguments",
    "LMDatasets",
    "builtin_corpus_documents",
    "builtin_corpus_split",
    "load_builtin_corpus",
    "load_local_text_file",
    "load_documents",
    "tokenize_documents",
    "pack_into_blocks",
    "build_lm_datasets",
    "collate_blocks",
    "collate_documents",
    "data_collator",
]
