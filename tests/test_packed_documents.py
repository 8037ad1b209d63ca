"""Packed documents (padding-free batches): several documents in one row, marked only by `position_ids` restarting
at 0, as transformers' `DataCollatorWithFlattening` builds them. Attention keeps them apart; so must every causal
token convolution (the token compressor, the embedding convolution), on the fast paths and the references, forward
and backward, eager and compiled."""

import pytest
import torch

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import PRESET_VARIANTS
from ddl_hf.models.ddl.delta_ops import (
    document_tap_mask,
    reference_paths,
    token_compress,
    token_compress_reference,
    token_conv,
    token_conv_reference,
)
from ddl_hf.models.ddl.modeling_ddl import positions_in_documents

# Documents shorter, equal to and longer than the kernel's K - 1 = 3 tokens of context.
DOCUMENT_LENGTHS = (5, 2, 7, 1, 3, 6)


def packed_model(variant: str) -> torch.nn.Module:
    # Every weight moved, the token filters far enough that the embedding convolution leaves the identity.
    model = perturb(tiny_model(variant), 0.02, seed=1, filter_scale=0.3)
    # float64, so that the summation order of a packed row against its documents alone stays far below the bounds.
    return model.double().eval()


def documents_and_packed_row(lengths, seed: int):
    documents = [random_tokens(1, length, seed=seed + i) for i, length in enumerate(lengths)]
    input_ids = torch.cat(documents, dim=1)
    position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)
    return documents, input_ids, position_ids


def probe_loss(logits: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """A fixed linear function of every logit, so that each logit's gradient reaches the parameters."""
    return (logits * probe).sum()


@pytest.mark.parametrize("paths", ["fast", "reference"])
@pytest.mark.parametrize("variant", list(PRESET_VARIANTS))
def test_a_packed_row_gives_the_logits_and_every_gradient_of_its_documents_run_alone(variant, paths):
    model = packed_model(variant)
    documents, input_ids, position_ids = documents_and_packed_row(DOCUMENT_LENGTHS, seed=10)
    probe = torch.randn(
        1, input_ids.shape[1], model.config.vocab_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    with reference_paths() if paths == "reference" else torch.enable_grad():
        packed = model(input_ids, position_ids=position_ids, use_cache=False).logits
        probe_loss(packed, probe).backward()
        packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        alone, start = [], 0
        for document in documents:
            logits = model(document, use_cache=False).logits
            probe_loss(logits, probe[:, start : start + document.shape[1]]).backward()
            alone.append(logits)
            start += document.shape[1]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-12, rtol=1e-10)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], parameter.grad, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("variant", ["ddl-tc", "ddl-cc"])
def test_rows_packed_differently_in_one_batch_and_training_mode(variant):
    """Two rows with different document boundaries, in training mode (no cache is built): each row is its
    documents, and a row of one document keeps the unpacked result."""
    model = packed_model(variant).train()
    documents, row_ids, row_positions = documents_and_packed_row((4, 9, 3), seed=20)
    single = random_tokens(1, 16, seed=30)
    input_ids = torch.cat([row_ids, single])
    position_ids = torch.cat([row_positions, torch.arange(16).unsqueeze(0)])
    logits = model(input_ids, position_ids=position_ids).logits
    alone = torch.cat([model(document).logits for document in documents], dim=1)
    torch.testing.assert_close(logits[:1], alone, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(logits[1:], model(single).logits, atol=1e-12, rtol=1e-10)


def test_positions_in_documents_restart_where_transformers_splits_a_row():
    """Documents start wherever the positions do not go on by one (transformers' `find_packed_sequence_indices`):
    at each 0, and at any other jump."""
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6], [3, 4, 5, 6, 7, 8, 9, 10]])
    expected = torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(positions_in_documents(position_ids), expected)
    assert document_tap_mask(expected, 3)[0].tolist()[:4] == [
        [False, False, True],
        [False, True, True],
        [True, True, True],
        [False, False, True],
    ]


def masked_windows_reference(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each output token's depthwise convolution over the inputs of its own document, one token at a time."""
    kernel, repeat = weight.shape[-1], weight.shape[0] // x.shape[-1]
    out = []
    for t in range(x.shape[1]):
        start = t - positions[0, t].item()
        window = x[:, max(start, t - kernel + 1) : t + 1].repeat_interleave(repeat, dim=-1)  # (1, n, C_out)
        taps = weight[:, 0, kernel - window.shape[1] :].t()  # (n, C_out)
        out.append((window * taps).sum(1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_masked_token_conv_equals_a_convolution_within_each_document_forward_and_gradients(use_fast_path):
    """The embedding convolution's shape (d -> d * d_v channels): fast path and reference against a convolution
    written one token at a time over each token's own document."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 6, generator=generator, requires_grad=True)
    weight = torch.randn(24, 1, 4, generator=generator, requires_grad=True)
    positions = positions_in_documents(torch.tensor([[0, 1, 2, 3, 4, 0, 1, 0, 0, 1, 2, 3]]))
    out = token_conv(x, weight, padding=3, use_fast_path=use_fast_path, tap_mask=document_tap_mask(positions, 4))
    expected = masked_windows_reference(x, weight, positions)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    probe = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad((out * probe).sum(), (x, weight))
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x, weight))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def masked_token_compress_inputs(dtype):
    d, d_v, kernel = 8, 4, 4
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, d_v * d, generator=generator).to(dtype).requires_grad_()
    conv_weight = torch.randn(d * d_v, 1, kernel, generator=generator).to(dtype).requires_grad_()
    read_weight = torch.randn(d, d_v, generator=generator).to(dtype).requires_grad_()
    positions = positions_in_documents(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], list(range(10))]))
    return x, conv_weight, read_weight, document_tap_mask(positions, kernel)


def test_masked_token_compress_fast_path_matches_its_reference_forward_and_every_gradient():
    x, conv_weight, read_weight, mask = masked_token_compress_inputs(torch.float32)
    padding = mask.shape[-1] - 1
    fast = token_compress(x, conv_weight, read_weight, padding, tap_mask=mask)
    reference = token_compress_reference(x, conv_weight, read_weight, padding, tap_mask=mask)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    probe = torch.randn(fast.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((fast * probe).sum(), (x, conv_weight, read_weight))
    expected = torch.autograd.grad((reference * probe).sum(), (x, conv_weight, read_weight))
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    # The second row holds one document: the mask changes nothing there.
    torch.testing.assert_close(fast[1:], token_compress(x[1:], conv_weight, read_weight, padding), atol=1e-5, rtol=1e-5)
    # And a mask that keeps every tap is the plain convolution.
    torch.testing.assert_close(
        token_conv_reference(x, conv_weight, padding, torch.ones_like(mask)),
        token_conv_reference(x, conv_weight, padding),
        atol=1e-6,
        rtol=0,
    )


def test_masked_token_compress_in_bf16_is_one_rounding_from_the_exact_result():
    """bf16 keeps 8 significant bits: spacing 2^-7 at 1, so one rounding is off by at most 2^-8 relative. The
    packed path folds the filters and the read into bf16 taps (one rounding of each term), sums the 16 terms in fp32
    and rounds the sum once to bf16, as the convolutions accumulate: every element is within
    2^-8 (|exact| + sum of the terms' magnitudes) of the exact (float64) result of the same bf16 inputs, with 2^-7
    of that bound to spare for the second-order terms and fp32's own rounding."""
    x, conv_weight, read_weight, mask = masked_token_compress_inputs(torch.bfloat16)
    padding = mask.shape[-1] - 1
    fast = token_compress(x, conv_weight, read_weight, padding, tap_mask=mask).double()
    inputs = [tensor.detach().double() for tensor in (x, conv_weight, read_weight)]
    exact = token_compress_reference(*inputs, padding, tap_mask=mask)
    magnitude = token_compress_reference(*(tensor.abs() for tensor in inputs), padding, tap_mask=mask)
    error = (fast - exact).abs()
    bound = 2**-8 * (exact.abs() + magnitude) * (1 + 2**-7)
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.slow
def test_compiled_fullgraph_packed_forward_and_backward_match_eager():
    model = packed_model("ddl-tc")
    _, input_ids, position_ids = documents_and_packed_row(DOCUMENT_LENGTHS, seed=40)
    compiled = torch.compile(model, fullgraph=True)
    eager_logits = model(input_ids, position_ids=position_ids, use_cache=False).logits
    eager_logits.sum().backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled_logits = compiled(input_ids, position_ids=position_ids, use_cache=False).logits
    compiled_logits.sum().backward()
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
