"""`--packing`: `concat` (the default, documents run into each other) and `documents` (each document its own
`position_ids`, so attention and the token convolutions stay inside it, and no token is predicted across a
document start). Tiny preset, blocks of 32, a few steps."""

import copy
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from ddl_hf.compare import build_parser, run_arguments
from ddl_hf.data import DataArguments, build_lm_datasets, builtin_corpus_documents, collate_documents
from ddl_hf.run_files import data_order_line
from ddl_hf.tokenization import train_bpe_tokenizer
from ddl_hf.train import (
    ResumePoint,
    build_datasets,
    build_tokenizer_and_config,
    build_trainer,
    parse_args,
)

BLOCK = 32


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packing_assets")
    # Documents of 8 to 56 characters: many blocks of 32 hold several documents, and some documents span blocks.
    texts = [text[: 8 + 6 * (i % 9)] for i, (_, text) in enumerate(builtin_corpus_documents("validation")[:38])]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    tokenizer.save_pretrained(folder / "tokenizer")
    return {
        "texts": texts,
        "tokenizer": tokenizer,
        "tokenizer_dir": str(folder / "tokenizer"),
        "train": write_jsonl(folder / "train.jsonl", texts[:28]),
        "validation": write_jsonl(folder / "validation.jsonl", texts[28:]),
        "cache": str(folder / "cache"),
    }


def document_lengths(tokenizer, texts):
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in texts]  # + EOS


def expected_position_ids(lengths, block_size):
    """Each token's index in its document, restarting at every document start and at every block start."""
    stream = [position for length in lengths for position in range(length)]
    usable = len(stream) - len(stream) % block_size
    blocks = []
    for start in range(0, usable, block_size):
        block, offset = [], 0
        for index, position in enumerate(stream[start : start + block_size]):
            offset = position if index == 0 else (offset if position else 0)
            block.append(position - offset)
        blocks.append(block)
    return blocks


@pytest.mark.parametrize("streaming", [False, True])
def test_documents_packing_keeps_the_blocks_and_adds_document_positions(assets, tmp_path, streaming):
    """Same tokens in the same blocks as `concat`, plus per-document `position_ids` stored at packing time."""

    def build(packing):
        args = DataArguments(
            train_file=assets["train"],
            validation_file=assets["validation"],
            block_size=BLOCK,
            streaming=streaming,
            max_eval_samples=None,
            dataset_cache_dir=str(tmp_path / "cache"),
            packing=packing,
        )
        return build_lm_datasets(args, assets["tokenizer"], BLOCK)

    concat, documents = build("concat"), build("documents")
    for split, texts in (("train", assets["texts"][:28]), ("validation", assets["texts"][28:])):
        concat_rows, document_rows = list(getattr(concat, split)), list(getattr(documents, split))
        assert [sorted(row) for row in concat_rows] == [["input_ids"]] * len(concat_rows)  # concat: as before
        assert [row["input_ids"] for row in document_rows] == [row["input_ids"] for row in concat_rows]
        positions = [row["position_ids"] for row in document_rows]
        assert positions == expected_position_ids(document_lengths(assets["tokenizer"], texts), BLOCK)
        assert sum(block.count(0) for block in positions) > 2 * len(positions)  # several documents per block
        stream = [position for length in document_lengths(assets["tokenizer"], texts) for position in range(length)]
        assert any(stream[start] for start in range(0, len(positions) * BLOCK, BLOCK))  # blocks start mid-document


def test_a_stream_without_validation_split_keeps_document_positions(assets, tmp_path):
    """A stream's held-out first documents and its training blocks both carry `position_ids`."""
    args = DataArguments(train_file=assets["train"], streaming=True, block_size=BLOCK, max_eval_samples=2)
    concat = build_lm_datasets(args, assets["tokenizer"], BLOCK)
    args.packing = "documents"
    documents = build_lm_datasets(args, assets["tokenizer"], BLOCK)
    for split in ("train", "validation"):
        concat_rows, document_rows = list(getattr(concat, split)), list(getattr(documents, split))
        assert [row["input_ids"] for row in document_rows] == [row["input_ids"] for row in concat_rows]
        assert all(len(row["position_ids"]) == BLOCK and row["position_ids"][0] == 0 for row in document_rows)
    assert len(documents.validation) == 2
    held = documents.stats["validation_held_out_documents"]
    lengths = document_lengths(assets["tokenizer"], assets["texts"][:28])
    assert [row["position_ids"] for row in documents.train] == expected_position_ids(lengths[held:], BLOCK)


def test_collate_documents_gives_positions_and_masks_each_document_start():
    features = [
        {"input_ids": [5, 6, 7, 2, 8, 9], "position_ids": [0, 1, 2, 3, 0, 1]},
        {"input_ids": [4, 2, 3, 2, 6, 2], "position_ids": [0, 1, 0, 1, 0, 1]},
    ]
    batch = collate_documents(features)
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no attention_mask: the model splits documents
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 2, 8, 9], [4, 2, 3, 2, 6, 2]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 0, 1, 0, 1]]))
    assert batch["labels"].tolist() == [[-100, 6, 7, 2, -100, 9], [-100, 2, -100, 2, -100, 2]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def tiny_argv(assets, output_dir, *extra):
    return [
        "--preset", "tiny",
        "--tokenizer_name", assets["tokenizer_dir"],
        "--train_file", assets["train"],
        "--validation_file", assets["validation"],
        "--block_size", str(BLOCK),
        "--per_device_train_batch_size", "4",
        "--max_steps", "2",
        "--logging_steps", "1",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--max_eval_samples", "8",
        "--dataset_cache_dir", assets["cache"],
        "--report_to", "none",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def first_batch_and_step_losses(argv):
    """The first micro-batch of the real Trainer's dataloader (data collator included), a copy of the model before
    training, and the losses the Trainer logs for 2 steps. The data-order log checks that the batch is the one the
    first step trained on."""
    model_args, data_args, training_args = parse_args(argv)
    tokenizer, config, block_size = build_tokenizer_and_config(model_args, data_args, training_args)
    datasets = build_datasets(data_args, tokenizer, block_size, training_args)
    trainer = build_trainer(model_args, config, tokenizer, datasets, training_args, ResumePoint(), None)
    batch = next(iter(trainer.get_train_dataloader()))
    initial = copy.deepcopy(trainer.model).eval()
    trainer.train()
    order = (Path(training_args.output_dir) / "data_order" / "rank0.tsv").read_text().splitlines(keepends=True)
    assert order[0] == data_order_line(1, batch["input_ids"].cpu().numpy().tobytes())
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    return batch, initial, losses


def test_documents_packing_loss_is_each_document_run_alone(assets, tmp_path):
    """The first step's loss with `--packing documents` equals the loss of every document of its blocks run through
    the model alone: token losses summed over all documents, divided by the number of predicted tokens (each
    document's tokens after its first)."""
    batch, model, losses = first_batch_and_step_losses(tiny_argv(assets, tmp_path / "run", "--packing", "documents"))
    assert "attention_mask" not in batch
    total, predicted, documents = 0.0, 0, 0
    with torch.no_grad():
        for ids, positions in zip(batch["input_ids"], batch["position_ids"], strict=True):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
            assert starts[0] == 0
            for start, end in zip(starts[:-1], starts[1:], strict=True):
                document = ids[start:end]
                assert torch.equal(positions[start:end], torch.arange(end - start))
                documents += 1
                if len(document) < 2:
                    continue
                logits = model(input_ids=document[None]).logits[0].double()
                total += torch.nn.functional.cross_entropy(logits[:-1], document[1:], reduction="sum").item()
                predicted += len(document) - 1
    assert documents > 2 * len(batch["input_ids"])  # the blocks really hold several documents
    assert predicted == int((batch["labels"][:, 1:] != -100).sum())
    assert losses[1] == pytest.approx(total / predicted, rel=1e-5)
    assert set(losses) == {1, 2}


def test_concat_packing_is_the_default_and_unchanged(assets, tmp_path):
    """`--packing concat` is the default and trains as before: blocks only, labels equal to the inputs, and the
    first loss is the plain token-mean cross-entropy of the whole blocks, attention crossing documents."""
    default = first_batch_and_step_losses(tiny_argv(assets, tmp_path / "default"))
    concat = first_batch_and_step_losses(tiny_argv(assets, tmp_path / "concat", "--packing", "concat"))
    for batch, model, losses in (default, concat):
        assert sorted(batch) == ["input_ids", "labels"]
        assert torch.equal(batch["labels"], batch["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits.double()
        ids = batch["input_ids"]
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
        assert losses[1] == pytest.approx(expected, rel=1e-5)
    assert torch.equal(default[0]["input_ids"], concat[0]["input_ids"])
    assert default[2] == concat[2]  # bit for bit
    assert parse_args(tiny_argv(assets, tmp_path / "x"))[1].packing == "concat"


def test_compare_passes_packing_through(tmp_path):
    args, train_flags = build_parser().parse_known_args(
        ["--max_steps", "3", "--output_dir", str(tmp_path), "--packing", "documents", "--block_size", "32"]
    )
    _, data_args, _ = run_arguments(args, train_flags, "baseline", 0, 3)
    assert data_args.packing == "documents"


def test_packing_must_be_known():
    with pytest.raises(ValueError, match="--packing must be one of"):
        DataArguments(packing="sequences")


def test_a_run_recorded_before_packing_existed_resumes_as_concat_and_refuses_documents(tmp_path):
    """`packing` joined the run fingerprint later: a run whose `run_args.json` lacks it packed with `concat`, so it
    resumes with `--packing concat` and is refused with `--packing documents`, naming the field."""
    import json

    from ddl_hf.run_files import check_output_dir, run_fingerprint

    model_args, data_args, training_args = parse_args(["--preset", "tiny", "--output_dir", str(tmp_path)])
    fingerprint = run_fingerprint(model_args, data_args, training_args)
    assert fingerprint["data"]["packing"] == "concat"
    old = copy.deepcopy(fingerprint)
    del old["data"]["packing"]
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "run_args.json").write_text(json.dumps({"fingerprint": old, "data": {}}))
    check_output_dir(tmp_path, fingerprint)
    documents = copy.deepcopy(fingerprint)
    documents["data"]["packing"] = "documents"
    with pytest.raises(ValueError, match=r"data\.packing: 'concat' -> 'documents'"):
        check_output_dir(tmp_path, documents)
