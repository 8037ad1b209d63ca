"""Malformed tensors get a clear ValueError naming the argument, before any embedding lookup or index error."""

from __future__ import annotations

import pytest
import torch

from conftest import random_tokens, tiny_model
from ddl_hf import DDLConfig, DDLModel

VOCAB = 96


@pytest.fixture(scope="module", params=["ddl-tc", "baseline"])
def model(request):
    return tiny_model(request.param).eval()


@pytest.fixture
def ids():
    return random_tokens(2, 6)


@pytest.mark.parametrize(
    ("bad_ids", "message"),
    [
        (torch.tensor([[1, 2, VOCAB]]), r"`input_ids` must lie in \[0, vocab_size=96\), got values in \[1, 96\]"),
        (torch.tensor([[-1, 2, 3]]), r"`input_ids` must lie in \[0, vocab_size=96\), got values in \[-1, 3\]"),
        (torch.tensor([[1, 10**6]]), r"`input_ids` must lie in \[0, vocab_size=96\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"empty input: `input_ids`/`inputs_embeds` has shape \(2, 0\)"),
        (torch.zeros(0, 4, dtype=torch.long), r"empty input: `input_ids`/`inputs_embeds` has shape \(0, 4\)"),
        (torch.tensor([1, 2, 3]), r"`input_ids` must have shape \(batch, seq_len\), got \(3,\)"),
        (torch.ones(1, 3), r"`input_ids` must be an integer tensor of token ids, got dtype torch.float32"),
    ],
    ids=["id-equal-vocab", "negative-id", "huge-id", "empty-sequence", "empty-batch", "one-dimensional", "float-ids"],
)
def test_bad_token_ids_raise_value_error(model, bad_ids, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids=bad_ids)
    with pytest.raises(ValueError, match=message):
        model.model(input_ids=bad_ids)


def test_generate_rejects_out_of_vocabulary_and_empty_prompts(model):
    with pytest.raises(ValueError, match=r"`input_ids` must lie in \[0, vocab_size=96\)"):
        model.generate(torch.tensor([[3, 100]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="empty input"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize(
    ("make_labels", "message"),
    [
        (lambda ids: ids[:, :5], r"`labels` must have the shape of the inputs \(2, 6\), got \(2, 5\)"),
        (lambda ids: ids[:1], r"`labels` must have the shape of the inputs \(2, 6\), got \(1, 6\)"),
        (lambda ids: ids.flatten(), r"`labels` must have the shape of the inputs \(2, 6\), got \(12,\)"),
        (
            lambda ids: torch.full_like(ids, VOCAB),
            r"`labels` must be token ids in \[0, vocab_size=96\) or -100.*got 96",
        ),
        (lambda ids: torch.full_like(ids, -5), r"`labels` must be token ids in \[0, vocab_size=96\) or -100.*got -5"),
        (lambda ids: ids.float(), r"`labels` must be an integer tensor of token ids, got dtype torch.float32"),
    ],
    ids=["short", "batch", "flat", "outside-vocab", "negative", "float"],
)
def test_bad_labels_raise_value_error(model, ids, make_labels, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, labels=make_labels(ids))


def test_ignored_labels_are_accepted_and_excluded_from_the_loss(model, ids):
    """-100 is the documented no-loss label; a fully ignored row must not change the loss of the other."""
    labels = ids.clone()
    labels[1] = -100
    loss = model(input_ids=ids, labels=labels).loss
    expected = model(input_ids=ids[:1], labels=ids[:1]).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make_mask", "message"),
    [
        (
            lambda: torch.ones(2, 5),
            r"`attention_mask` must have shape \(batch, past \+ seq_len\) = \(2, 6\), got \(2, 5\)",
        ),
        (
            lambda: torch.ones(3, 6),
            r"`attention_mask` must have shape \(batch, past \+ seq_len\) = \(2, 6\), got \(3, 6\)",
        ),
        (lambda: torch.ones(2, 6, 6), r"`attention_mask` must be a \(batch, past \+ seq_len\) padding mask"),
        (lambda: torch.ones(6), r"`attention_mask` must be a \(batch, past \+ seq_len\) padding mask"),
        (lambda: torch.ones(3, 1, 6, 6), r"a 4D `attention_mask` must have shape \(2, 1 or heads, 6, kv_len\)"),
        (lambda: torch.ones(2, 1, 5, 6), r"a 4D `attention_mask` must have shape \(2, 1 or heads, 6, kv_len\)"),
    ],
    ids=["short", "batch", "3d", "1d", "4d-batch", "4d-queries"],
)
def test_bad_attention_mask_raises_value_error(model, ids, make_mask, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, attention_mask=make_mask())


@pytest.mark.parametrize(
    "position_ids",
    [torch.arange(5)[None], torch.arange(6), torch.arange(6).expand(3, 6)],
    ids=["short", "one-dimensional", "batch"],
)
def test_bad_position_ids_raise_value_error(model, ids, position_ids):
    with pytest.raises(ValueError, match=r"`position_ids` must have shape \(2 or 1, 6\)"):
        model(input_ids=ids, position_ids=position_ids)


def test_cache_from_another_batch_size_raises_value_error(model, ids):
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    step = torch.randint(0, VOCAB, (3, 1))
    with pytest.raises(ValueError, match=r"`cache` holds a batch of 2 sequences but the input has batch 3"):
        model(input_ids=step, cache=cache, use_cache=True)
    # The deprecated argument name reaches the same check.
    with pytest.raises(ValueError, match=r"`cache` holds a batch of 2 sequences but the input has batch 3"):
        model(input_ids=step, past_key_values=cache, use_cache=True)


def test_decoding_mask_must_cover_the_cached_tokens(model, ids):
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    step = torch.randint(0, VOCAB, (2, 1))
    with pytest.raises(ValueError, match=r"= \(2, 7\), got \(2, 1\)"):
        model(input_ids=step, cache=cache, attention_mask=torch.ones(2, 1), use_cache=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=torch.zeros(1, 3, dtype=torch.long), inputs_embeds=torch.zeros(1, 3, 32)), "exactly one of"),
        (dict(), "exactly one of"),
        (dict(inputs_embeds=torch.zeros(1, 3, 16)), r"`inputs_embeds` must have shape \(batch, seq_len, 32\)"),
        (dict(inputs_embeds=torch.zeros(3, 32)), r"`inputs_embeds` must have shape \(batch, seq_len, 32\)"),
        (dict(inputs_embeds=torch.zeros(1, 0, 32)), r"empty input"),
    ],
    ids=["both", "neither", "wrong-width", "two-dimensional", "empty"],
)
def test_bad_embeddings_raise_value_error(kwargs, message):
    base = DDLModel(DDLConfig.from_preset("tiny", "ddl-cc"))
    with pytest.raises(ValueError, match=message):
        base(**kwargs)


def test_valid_inputs_right_at_the_edges_are_accepted(model):
    """The checks must not reject the boundary values they guard: ids 0 and vocab_size - 1, one token."""
    edge = torch.tensor([[0, VOCAB - 1]])
    out = model(input_ids=edge, labels=edge, attention_mask=torch.ones(1, 2), position_ids=torch.arange(2)[None])
    assert out.logits.shape == (1, 2, VOCAB) and torch.isfinite(out.loss)
    assert model(input_ids=torch.tensor([[5]])).logits.shape == (1, 1, VOCAB)
