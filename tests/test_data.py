"""Data pipeline of `ddl train`: sources, EOS-separated packing, caching, validation split."""

import sysconfig
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import write_jsonl
from ddl_hf.data import (
    BUILTIN_EXCLUDED_DIRS,
    DataArguments,
    build_lm_datasets,
    builtin_corpus_documents,
    builtin_corpus_split,
    collate_blocks,
)
from ddl_hf.tokenization import train_bpe_tokenizer

BLOCK = 16


@pytest.fixture(scope="module")
def documents():
    """Twelve short real documents (standard-library sources) of different lengths."""
    return [text[: 150 + 37 * i] for i, (_, text) in enumerate(builtin_corpus_documents("validation")[:12])]


@pytest.fixture(scope="module")
def tokenizer(documents):
    return train_bpe_tokenizer(documents, vocab_size=320)


def expected_stream(tokenizer, texts):
    return list(
        chain.from_iterable(
            tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts
        )
    )


def blocks_of(stream, block_size=BLOCK):
    usable = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def rows(dataset):
    return [list(row["input_ids"]) for row in dataset]


def test_builtin_corpus_is_the_stdlib_without_tests_split_by_path_hash():
    train = builtin_corpus_documents("train")
    validation = builtin_corpus_documents("validation")
    train_paths = [path for path, _ in train]
    validation_paths = [path for path, _ in validation]
    assert train_paths == sorted(train_paths) and validation_paths == sorted(validation_paths)
    assert not set(train_paths) & set(validation_paths)
    root = Path(sysconfig.get_paths()["stdlib"])
    top_level = [p for p in root.iterdir() if p.name not in BUILTIN_EXCLUDED_DIRS]
    expected = sorted(
        p.relative_to(root).as_posix()
        for p in chain.from_iterable(q.rglob("*.py") if q.is_dir() else [q] for q in top_level)
        if p.suffix == ".py" and not BUILTIN_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    assert sorted(train_paths + validation_paths) == expected
    assert all(builtin_corpus_split(p) == "validation" for p in validation_paths)
    assert all(builtin_corpus_split(p) == "train" for p in train_paths)
    assert 0.02 < len(validation) / len(expected) < 0.09
    assert "os.py" in train_paths + validation_paths
    assert not any(part in {"test", "tests", "site-packages"} for p in expected for part in Path(p).parts[:-1])
    assert builtin_corpus_documents("validation") == validation  # deterministic


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_local_files_pack_documents_with_eos_between_them(tmp_path, documents, tokenizer, fmt):
    train_texts, validation_texts = documents[:9], documents[9:]
    if fmt == "txt":  # one document per .txt file
        train_texts, validation_texts = ["\n\n".join(train_texts)], ["\n\n".join(validation_texts)]
    paths = {}
    for split, texts in (("train", train_texts), ("validation", validation_texts)):
        path = tmp_path / f"{split}.{fmt}"
        if fmt in ("jsonl", "json"):
            write_jsonl(path, texts, with_id=True)
        elif fmt == "parquet":
            pq.write_table(pa.table({"text": texts}), path)
        else:
            path.write_text(texts[0], encoding="utf-8")
        paths[split] = str(path)
    args = DataArguments(
        train_file=paths["train"],
        validation_file=paths["validation"],
        block_size=BLOCK,
        max_eval_samples=None,
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    lm = build_lm_datasets(args, tokenizer, BLOCK)

    stream = expected_stream(tokenizer, train_texts)
    assert rows(lm.train) == blocks_of(stream)
    assert rows(lm.validation) == blocks_of(expected_stream(tokenizer, validation_texts))
    assert lm.stats["train_documents"] == len(train_texts)
    assert lm.stats["train_tokens"] == len(stream)
    assert lm.stats["train_dropped_tokens"] == len(stream) % BLOCK
    packed = list(chain.from_iterable(rows(lm.train)))
    separators = packed.count(tokenizer.eos_token_id)
    assert separators == stream[: len(packed)].count(tokenizer.eos_token_id) >= min(1, len(train_texts) - 1)


def test_txt_paragraphs_are_documents(tmp_path, documents, tokenizer):
    paragraphs = ["first paragraph\nstill first", "second one", "third"]
    path = tmp_path / "p.txt"
    path.write_text("\n\n".join(paragraphs) * 20, encoding="utf-8")
    args = DataArguments(train_file=str(path), txt_sample_by="paragraph", block_size=4, dataset_cache_dir=str(tmp_path))
    lm = build_lm_datasets(args, tokenizer, 4)
    assert lm.stats["train_documents"] > len(paragraphs)
    assert lm.stats["train_documents"] == sum(1 for p in path.read_text().split("\n\n") if p.strip())


def test_tokenized_and_packed_data_is_cached(tmp_path, documents, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", documents, with_id=True)
    args = DataArguments(train_file=train, block_size=BLOCK, dataset_cache_dir=str(tmp_path / "cache"))
    first = build_lm_datasets(args, tokenizer, BLOCK)
    files = sorted({f["filename"] for f in first.train.cache_files})
    stamps = {name: Path(name).stat().st_mtime_ns for name in files}
    second = build_lm_datasets(args, tokenizer, BLOCK)
    assert sorted({f["filename"] for f in second.train.cache_files}) == files
    assert {name: Path(name).stat().st_mtime_ns for name in files} == stamps  # reused, not rewritten
    assert rows(second.train) == rows(first.train) and rows(second.validation) == rows(first.validation)
    other = build_lm_datasets(args, tokenizer, BLOCK * 2)  # another block size is another cache entry
    assert not {f["filename"] for f in other.train.cache_files} & set(files)


def test_validation_blocks_are_held_out_deterministically(tmp_path, documents, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", documents, with_id=True)
    args = DataArguments(
        train_file=train,
        block_size=BLOCK,
        validation_split_percentage=20,
        max_eval_samples=None,
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    lm = build_lm_datasets(args, tokenizer, BLOCK)
    all_blocks = blocks_of(expected_stream(tokenizer, documents))
    held_out = round(len(all_blocks) * 0.2)
    assert len(lm.validation) == held_out == lm.stats["validation_held_out_blocks"]
    assert len(lm.train) == len(all_blocks) - held_out
    assert sorted(rows(lm.train) + rows(lm.validation)) == sorted(all_blocks)
    again = build_lm_datasets(args, tokenizer, BLOCK)
    assert rows(again.validation) == rows(lm.validation)
    capped = build_lm_datasets(
        DataArguments(
            train_file=train,
            block_size=BLOCK,
            validation_split_percentage=20,
            max_eval_samples=3,
            dataset_cache_dir=str(tmp_path / "cache"),
        ),
        tokenizer,
        BLOCK,
    )
    assert rows(capped.validation) == rows(lm.validation)[:3]


def test_streaming_holds_out_the_first_blocks(tmp_path, documents, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", documents, with_id=True)
    args = DataArguments(train_file=train, streaming=True, block_size=BLOCK, max_eval_samples=4)
    lm = build_lm_datasets(args, tokenizer, BLOCK)
    stream = expected_stream(tokenizer, documents)
    # A stream is packed one map batch (1000 documents) at a time: all twelve documents here.
    assert rows(lm.validation) == blocks_of(stream)[:4]
    assert rows(lm.train) == blocks_of(stream)[4:]


def test_dataset_by_name_uses_its_validation_split(tmp_path, documents, tokenizer):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", documents[:8], column="content", with_id=True)
    write_jsonl(folder / "validation.jsonl", documents[8:], column="content", with_id=True)
    args = DataArguments(
        dataset_name=str(folder),
        text_column="content",
        block_size=BLOCK,
        max_eval_samples=None,
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    lm = build_lm_datasets(args, tokenizer, BLOCK)
    assert rows(lm.train) == blocks_of(expected_stream(tokenizer, documents[:8]))
    assert rows(lm.validation) == blocks_of(expected_stream(tokenizer, documents[8:]))
    assert "my_dataset" in lm.source


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--train_file '{dir}/nope.jsonl' does not exist"),
        ("empty", "is empty: it has no documents"),
        ("blank", "has no text: every document"),
        ("column", "--text_column 'body' not found in --train_file '{dir}/train.jsonl'; its columns are"),
        ("extension", "unsupported extension '.csv'"),
        ("tiny", "fewer than one block of --block_size 64"),
        ("dataset", "could not load --dataset_name '{dir}/no_such_dataset'"),
    ],
)
def test_bad_data_is_reported_by_name(tmp_path, documents, tokenizer, case, message):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, documents[:3], with_id=True)
    kwargs = dict(train_file=str(train), block_size=BLOCK, dataset_cache_dir=str(tmp_path / "cache"))
    block = BLOCK
    if case == "missing":
        kwargs["train_file"] = str(tmp_path / "nope.jsonl")
    elif case == "empty":
        train.write_text("")
    elif case == "blank":
        write_jsonl(train, ["", ""], with_id=True)
    elif case == "column":
        kwargs["text_column"] = "body"
    elif case == "extension":
        (tmp_path / "train.csv").write_text("text\nabc\n")
        kwargs["train_file"] = str(tmp_path / "train.csv")
    elif case == "tiny":
        write_jsonl(train, ["a b"], with_id=True)
        block = kwargs["block_size"] = 64
    elif case == "dataset":
        kwargs = dict(dataset_name=str(tmp_path / "no_such_dataset"), block_size=BLOCK)
    with pytest.raises(ValueError) as error:
        build_lm_datasets(DataArguments(**kwargs), tokenizer, block)
    assert message.format(dir=tmp_path) in str(error.value)


def test_data_arguments_reject_inconsistent_sources():
    with pytest.raises(ValueError, match="either --dataset_name or --train_file"):
        DataArguments(dataset_name="x", train_file="y.txt")
    with pytest.raises(ValueError, match="--validation_file needs a --train_file"):
        DataArguments(validation_file="v.txt")
    with pytest.raises(ValueError, match="--txt_sample_by must be one of"):
        DataArguments(txt_sample_by="sentence")
    with pytest.raises(ValueError, match="--validation_split_percentage must be in"):
        DataArguments(validation_split_percentage=100)


def test_collate_blocks_makes_labels_equal_to_inputs():
    batch = collate_blocks([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
