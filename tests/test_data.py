"""Data pipeline of `ddl train`: sources, EOS-separated packing, caching, validation split."""

import logging
import re
import sysconfig
from itertools import chain, product
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


def document_split(tokenizer, texts, lm):
    """The documents held out for validation: the one subset of `texts` whose documents, packed in their order,
    give exactly the validation blocks while the others, packed in theirs, give exactly the training blocks.
    Fails when no subset does (e.g. blocks cut from one stream and dealt out to both splits)."""
    train_rows, validation_rows = rows(lm.train), rows(lm.validation)
    streams = [expected_stream(tokenizer, [text]) for text in texts]
    found = []
    for held in product((False, True), repeat=len(texts)):
        if not any(held) or all(held):
            continue
        held_stream = list(chain.from_iterable(s for s, h in zip(streams, held) if h))
        kept_stream = list(chain.from_iterable(s for s, h in zip(streams, held) if not h))
        if blocks_of(held_stream) == validation_rows and blocks_of(kept_stream) == train_rows:
            found.append([text for text, h in zip(texts, held) if h])
    assert len(found) == 1, f"{len(found)} document splits give these blocks"
    return found[0]


def test_validation_documents_are_held_out_whole_and_deterministically(tmp_path, documents, tokenizer):
    """Without a validation split, whole documents are held out (chosen by a fixed seed until they hold the
    requested share of the tokens), and each side is packed from its own documents, in their order."""
    train = write_jsonl(tmp_path / "train.jsonl", documents, with_id=True)
    args = DataArguments(
        train_file=train,
        block_size=BLOCK,
        validation_split_percentage=20,
        max_eval_samples=None,
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    lm = build_lm_datasets(args, tokenizer, BLOCK)
    held_out = document_split(tokenizer, documents, lm)
    assert 1 <= len(held_out) < len(documents)
    total = len(expected_stream(tokenizer, documents))
    held_tokens = len(expected_stream(tokenizer, held_out))
    assert 0.2 * total <= held_tokens < 0.2 * total + max(len(expected_stream(tokenizer, [t])) for t in held_out)
    assert lm.stats["validation_held_out_documents"] == len(held_out)
    assert lm.stats["validation_held_out_tokens"] == held_tokens
    assert lm.stats["validation_held_out_blocks"] == len(lm.validation)
    # The training source as a whole, as with a validation file: all its documents and tokens.
    assert (lm.stats["train_documents"], lm.stats["train_tokens"]) == (len(documents), total)
    assert lm.stats["train_blocks"] == len(lm.train) + len(lm.validation)
    assert lm.stats["train_dropped_tokens"] == total - lm.stats["train_blocks"] * BLOCK
    again = build_lm_datasets(args, tokenizer, BLOCK)
    assert rows(again.validation) == rows(lm.validation) and rows(again.train) == rows(lm.train)
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


def test_streaming_holds_out_the_first_documents(tmp_path, documents, tokenizer):
    """A stream holds out its first documents, as many as fill `max_eval_samples` blocks; training starts with the
    next document."""
    train = write_jsonl(tmp_path / "train.jsonl", documents, with_id=True)
    args = DataArguments(train_file=train, streaming=True, block_size=BLOCK, max_eval_samples=4)
    lm = build_lm_datasets(args, tokenizer, BLOCK)
    held = next(k for k in range(1, len(documents)) if len(expected_stream(tokenizer, documents[:k])) >= 4 * BLOCK)
    assert held < len(documents) - 1
    # A stream is packed one map batch (1000 documents) at a time: all of them here.
    assert rows(lm.validation) == blocks_of(expected_stream(tokenizer, documents[:held]))[:4]
    assert rows(lm.train) == blocks_of(expected_stream(tokenizer, documents[held:]))
    assert lm.stats["validation_held_out_documents"] == held


def tagged_documents(count: int) -> list[str]:
    """Documents of several lines, every line tagged with its document's number."""
    return [
        "\n".join(f"doc{i:03d}: line {j} of document {i}, value = {i * j}" for j in range(3 + i % 5))
        for i in range(count)
    ]


def tags_in(tokenizer, dataset) -> set[str]:
    text = "".join(tokenizer.decode(row) for row in rows(dataset))
    return set(re.findall(r"doc\d{3}", text))


@pytest.mark.parametrize("streaming", [False, True])
def test_no_document_is_in_both_splits(tmp_path, tokenizer, streaming):
    texts = tagged_documents(60)
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    args = DataArguments(
        train_file=train,
        streaming=streaming,
        block_size=BLOCK,
        validation_split_percentage=10,
        max_eval_samples=None if not streaming else 8,
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    lm = build_lm_datasets(args, tokenizer, BLOCK)
    train_tags = tags_in(tokenizer, lm.train if not streaming else list(lm.train))
    validation_tags = tags_in(tokenizer, lm.validation)
    assert validation_tags and len(train_tags) > len(validation_tags)
    assert not train_tags & validation_tags


def test_a_single_document_is_split_at_its_end_with_a_warning(tmp_path, documents, tokenizer, caplog):
    """One document (a .txt file by default) cannot be split by document: its last blocks are held out, in order,
    and the log says that this document is in both splits."""
    path = tmp_path / "one.txt"
    path.write_text("\n\n".join(documents), encoding="utf-8")
    args = DataArguments(
        train_file=str(path), block_size=BLOCK, max_eval_samples=None, dataset_cache_dir=str(tmp_path / "cache")
    )
    with caplog.at_level(logging.WARNING, logger="ddl_hf.data"):
        lm = build_lm_datasets(args, tokenizer, BLOCK)
    all_blocks = blocks_of(expected_stream(tokenizer, [path.read_text(encoding="utf-8")]))
    held_out = round(len(all_blocks) * 0.05)
    assert held_out >= 1 and lm.stats["validation_held_out_blocks"] == held_out
    assert rows(lm.train) == all_blocks[:-held_out] and rows(lm.validation) == all_blocks[-held_out:]
    assert f"holds 1 document, so it cannot be split by document: the last {held_out} of its" in caplog.text


def test_packing_reports_the_dropped_tokens_of_both_splits(tmp_path, documents, tokenizer, caplog):
    paths = {
        "train": write_jsonl(tmp_path / "train.jsonl", documents[:9]),
        "validation": write_jsonl(tmp_path / "validation.jsonl", documents[9:]),
    }
    args = DataArguments(
        train_file=paths["train"],
        validation_file=paths["validation"],
        block_size=BLOCK,
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    with caplog.at_level(logging.WARNING, logger="ddl_hf.data"):
        build_lm_datasets(args, tokenizer, BLOCK)
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for split, texts in (("training", documents[:9]), ("validation", documents[9:])):
        total = len(expected_stream(tokenizer, texts))
        assert total % BLOCK, "pick documents whose tokens do not fill the last block"
        expected = f"packing the {split} documents dropped {total % BLOCK:,} of {total:,} tokens"
        assert any(message.startswith(expected) for message in messages), (expected, messages)


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
