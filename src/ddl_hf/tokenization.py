"""Byte-level BPE tokenizers that need no download.

`ddl tokenizer --train_file a.txt [b.jsonl ...] --vocab_size N --output_dir DIR` trains one with the
`tokenizers` library and saves it so that `AutoTokenizer.from_pretrained(DIR)` reloads it
identically. `default_tokenizer(vocab_size)` is what `ddl train` uses when no `--tokenizer_name` is
given: a BPE trained once on the train split of the built-in corpus (the Python standard library of
the running interpreter) and cached on disk, keyed by Python version and vocabulary size.

Byte-level BPE is lossless: every string encodes and decodes back to itself, and no input is ever
out of vocabulary. The only special token is `<|endoftext|>`, the end-of-document (EOS) marker
between packed documents; no padding token is declared (training packs blocks and never pads). For
batched generation, pass `pad_token_id=tokenizer.eos_token_id` or set `tokenizer.pad_token` yourself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .command_line import reports_input_errors

END_OF_TEXT = "<|endoftext|>"
DEFAULT_MODEL_MAX_LENGTH = 1024
DEFAULT_VOCAB_SIZE = 8192
# Part of the default tokenizer's cache key: bump it whenever `train_bpe_tokenizer` changes.
DEFAULT_TOKENIZER_REVISION = 2
# 256 byte symbols plus the end-of-text token: the smallest vocabulary that can encode anything.
MIN_VOCAB_SIZE = 257


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + {END_OF_TEXT}), got {vocab_size!r}"
        )
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() < MIN_VOCAB_SIZE:
        raise ValueError("the tokenizer training text is empty: no byte-level vocabulary could be built")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def read_training_texts(paths: list[str], text_column: str = "text") -> list[str]:
    """Texts of .txt files (one document per file) and .json/.jsonl/.parquet files (one per row)."""
    from .data import load_local_text_file

    texts: list[str] = []
    for path in paths:
        dataset = load_local_text_file(path, text_column=text_column, argument="--train_file")
        texts.extend(dataset[text_column])
    return texts


def default_tokenizer_cache_root() -> Path:
    """`$DDL_HF_CACHE`, else `$XDG_CACHE_HOME/ddl_hf`, else `~/.cache/ddl_hf`."""
    if os.environ.get("DDL_HF_CACHE"):
        return Path(os.environ["DDL_HF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddl_hf"


def default_tokenizer_dir(vocab_size: int) -> Path:
    """Where the default tokenizer of this interpreter and vocabulary size is cached."""
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    name = f"stdlib-bpe-r{DEFAULT_TOKENIZER_REVISION}-{version}-v{vocab_size}"
    return default_tokenizer_cache_root() / "tokenizers" / name


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerBase:
    """The tokenizer `ddl train` uses when none is named: trained on the built-in corpus once, then cached.

    The cache folder is written under a temporary name and renamed when complete, so a crash
    never leaves a half-written tokenizer behind, and concurrent processes agree on one copy.
    """
    target = default_tokenizer_dir(vocab_size)
    if not (target / "tokenizer.json").is_file():
        from .data import builtin_corpus_documents

        texts = [text for _, text in builtin_corpus_documents("train")]
        tokenizer = train_bpe_tokenizer(texts, vocab_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a hub or local tokenizer and check that it has an end-of-text token for packing."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load tokenizer {name_or_path!r} (--tokenizer_name): {error}") from error
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no eos_token; training needs one to separate documents in packed blocks"
        )
    return tokenizer


@reports_input_errors("tokenizer")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ddl tokenizer",
        description="Train a byte-level BPE tokenizer and save it for AutoTokenizer.from_pretrained.",
    )
    parser.add_argument(
        "--train_file",
        nargs="+",
        required=True,
        help="text files: .txt (one document per file), .json/.jsonl or .parquet (one document per row)",
    )
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--text_column", default="text", help="column holding the text in json/jsonl/parquet files")
    parser.add_argument("--model_max_length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
    parser.add_argument("--min_frequency", type=int, default=2, help="minimum count of a pair to be merged")
    args = parser.parse_args(argv)
    texts = read_training_texts(args.train_file, args.text_column)
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size, args.model_max_length, args.min_frequency)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved a byte-level BPE tokenizer with {len(tokenizer)} tokens to {args.output_dir}")
    return 0


__all__ = [
    "END_OF_TEXT",
    "train_bpe_tokenizer",
    "default_tokenizer",
    "default_tokenizer_dir",
    "load_tokenizer",
    "main",
]
