"""Byte-level BPE tokenizers: `ddl tokenizer`, reloading with AutoTokenizer, the cached default tokenizer."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import write_jsonl
from ddl_hf.data import builtin_corpus_documents
from ddl_hf.tokenization import END_OF_TEXT, default_tokenizer, default_tokenizer_dir, main, train_bpe_tokenizer

PROBES = [
    "def f(x):\n    return x ** 2\n",
    "  leading spaces, trailing\ttab\t\n\n",
    "naïve café — ünïcödé, 漢字, emoji 🚀🔥",
    "",
    "\x00\x01 control bytes \x7f",
    f"text with the special token {END_OF_TEXT} inside",
]


@pytest.fixture(scope="module")
def training_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer_corpus")
    documents = [text[:4000] for _, text in builtin_corpus_documents("validation")[:12]]
    (folder / "a.txt").write_text(documents[0], encoding="utf-8")
    write_jsonl(folder / "b.jsonl", documents[1:])
    return [str(folder / "a.txt"), str(folder / "b.jsonl")]


def test_cli_tokenizer_reloads_identically_with_autotokenizer(tmp_path, training_files, capsys):
    output_dir = tmp_path / "tok"
    assert main(["--train_file", *training_files, "--vocab_size", "400", "--output_dir", str(output_dir)]) == 0
    assert "400 tokens" in capsys.readouterr().out

    texts = [open(training_files[0], encoding="utf-8").read()]
    texts += [json.loads(line)["text"] for line in open(training_files[1], encoding="utf-8")]
    trained_here = train_bpe_tokenizer(texts, vocab_size=400)
    reloaded = AutoTokenizer.from_pretrained(output_dir)

    assert len(reloaded) == 400
    assert reloaded.get_vocab() == trained_here.get_vocab()  # BPE training is deterministic
    assert reloaded.eos_token == END_OF_TEXT and reloaded.eos_token_id == reloaded.convert_tokens_to_ids(END_OF_TEXT)
    assert reloaded.pad_token is None  # see the tokenization module: a pad id = EOS would freeze the EOS row
    assert reloaded.model_max_length == 1024
    for text in PROBES:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert ids == trained_here(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text  # byte-level BPE is lossless
    # The 143 merges learned from Python sources already save a quarter of the tokens of byte-level code.
    code = texts[1]
    assert len(reloaded(code, add_special_tokens=False)["input_ids"]) < 0.75 * len(code.encode("utf-8"))


def test_tokenizer_rejects_too_small_vocabulary_and_missing_files(tmp_path, training_files, capsys):
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 257"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
    assert main(["--train_file", training_files[0], "--vocab_size", "200", "--output_dir", str(tmp_path / "t")]) == 2
    assert "vocab_size must be an integer >= 257" in capsys.readouterr().err
    missing = str(tmp_path / "missing.txt")
    assert main(["--train_file", missing, "--output_dir", str(tmp_path / "t")]) == 2
    assert f"--train_file {missing!r} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_default_tokenizer_is_trained_once_on_the_builtin_corpus_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DDL_HF_CACHE", str(tmp_path / "cache"))
    folder = default_tokenizer_dir(300)
    assert folder.is_relative_to(tmp_path / "cache")
    assert folder.name.endswith("-v300") and ".".join(map(str, __import__("sys").version_info[:3])) in folder.name
    assert not folder.exists()

    first = default_tokenizer(300)
    saved = folder / "tokenizer.json"
    assert saved.is_file()
    stamp = saved.stat().st_mtime_ns
    second = default_tokenizer(300)
    assert saved.stat().st_mtime_ns == stamp  # loaded from the cache, not retrained
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    assert len(first) == len(second) == 300
    assert first.get_vocab() == second.get_vocab()
    for text in PROBES:
        assert first(text)["input_ids"] == second(text)["input_ids"]
        assert second.decode(second(text)["input_ids"]) == text
