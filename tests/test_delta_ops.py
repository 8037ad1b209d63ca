"""The fast paths of `delta_ops` against their plain references: forward values and every gradient.

Each fast path (the fused Delta update, the channel compressor, the token convolution, and the
model paths built on them) must give the reference's results up to float rounding: tight
tolerances in fp32, bf16-rounding tolerances in bf16. `reference_paths()` switches the model
to the references, so whole models are compared too.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import perturb, tiny_model
from ddl_hf import (
    PRESET_VARIANTS,
    DDLConfig,
    DDLForCausalLM,
    DeltaShortcut,
    StateCompressor,
    flat_state,
    state_matrix,
)
from ddl_hf.models.ddl import delta_ops
from ddl_hf.models.ddl.delta_ops import (
    channel_compress,
    channel_compress_reference,
    channel_read_after_write,
    channel_read_after_write_reference,
    delta_update,
    delta_update_reference,
    fast_paths_enabled,
    reference_paths,
    token_compress,
    token_compress_reference,
    token_conv,
    token_conv_reference,
    token_read_after_write,
    token_read_after_write_reference,
    unit_direction,
)

EPS = 1e-5
FP32 = dict(rtol=1e-5, atol=1e-5)


def bf16_tolerance(reference: torch.Tensor) -> dict:
    """Fast against reference: about two bf16 rounding steps (2 x 2^-7, the spacing of bf16 numbers) of the
    reference's largest entry. Coarse for small entries; `assert_within_roundings` checks each element."""
    return dict(rtol=1.6e-2, atol=1.6e-2 * float(reference.detach().float().abs().max()) + 1e-6)


# --------------------------------------------------------------------------- bf16 rounding bounds
# bf16 keeps 8 significant bits: rounding a value to bf16 moves it by at most U_BF16 = 2^-8 of itself (the unit
# roundoff; `torch.finfo(torch.bfloat16).eps`, the spacing of bf16 numbers at 1, is 2^-7). Error analysis of a
# computation from bf16 inputs, to first order: each rounding on an output's path moves it by at most U_BF16 times
# the same computation on absolute values (|a| |b| for a product, sum |terms| for a sum; `magnitude` M). With c
# roundings on the path, |got - exact| <= c U_BF16 M for every element, `exact` being the float64 computation from the
# same bf16 inputs. Rounding the incoming gradient dL/dout to the output's dtype counts as one rounding on every
# gradient's path (the tests' weights are fp32). The fp32 arithmetic in between adds FP32_SLACK M at most: 2^-16 is
# 256 fp32 roundings (2^-24), more than the longest fp32 sum here (d d_v K <= 256 terms). Each test states its c per
# output and per path. Unlike a tolerance scaled to the tensor's largest entry, the bound follows each element, so
# small entries are checked at their own scale (relative to M, which is |exact| where nothing cancels).
U_BF16 = 2.0**-8
FP32_SLACK = 2.0**-16


def assert_within_roundings(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, roundings: int, what=""):
    """|got - exact| <= (roundings U_BF16 + FP32_SLACK) magnitude, element by element (exact and magnitude float64)."""
    error = (got.detach().double() - exact.detach()).abs()
    bound = (roundings * U_BF16 + FP32_SLACK) * magnitude.detach()
    if not bool((error <= bound).all()):
        ratio = torch.where(bound > 0, error / bound.clamp_min(1e-300), torch.where(error > 0, torch.inf, 0.0))
        worst = int(ratio.argmax())
        raise AssertionError(
            f"{what}: element {worst} is off by {float(error.flatten()[worst]):.3g}, more than {roundings} bf16 "
            f"roundings of its magnitude {float(magnitude.flatten()[worst]):.3g} allow "
            f"({float(ratio.max()):.2f} x the bound); exact value {float(exact.flatten()[worst]):.3g}"
        )


def float64_truth(reference, inputs, weights) -> tuple:
    """(exact, exact gradients), (magnitude, magnitude gradients) of `value_and_grads(reference, inputs, weights)`:
    the reference in float64 on the same (bf16) inputs, and on their absolute values with |weights|. For a function
    built of sums and products alone (every compressor and convolution here), the latter is the same computation on
    absolute values, its gradients too (they are sums of products of the other inputs and the weights)."""
    exact = value_and_grads(reference, [t.detach().double().requires_grad_() for t in inputs], weights.double())
    magnitude = value_and_grads(
        reference, [t.detach().double().abs().requires_grad_() for t in inputs], weights.double().abs()
    )
    return exact, magnitude


def assert_bf16_paths_within_roundings(results, truth, roundings, names, what=""):
    """`results` {path: (output, gradients)}, `truth` from `float64_truth`, `roundings` {path: (c of the output,
    c of each gradient)}: every element of every result within its path's bound."""
    (exact, exact_grads), (magnitude, magnitude_grads) = truth
    for path, (output, grads) in results.items():
        counts = roundings[path]
        assert_within_roundings(output, exact, magnitude, counts[0], f"{what} {path} output")
        for name, got, true, size, count in zip(names, grads, exact_grads, magnitude_grads, counts[1:]):
            assert_within_roundings(got, true, size, count, f"{what} {path} gradient of {name}")


LAYOUTS = ["value-major", "feature-major"]


def random_state(leading, d, d_v, dtype=torch.float32, generator=None, layout="value-major"):
    """A random (*leading, d, d_v) state X, value major in memory (the model's layout, `state_matrix`) or
    feature major (contiguous)."""
    if layout == "feature-major":
        return torch.randn(*leading, d, d_v, generator=generator).to(dtype)
    return torch.randn(*leading, d_v, d, generator=generator).to(dtype).transpose(-1, -2)


def is_value_major(matrix: torch.Tensor) -> bool:
    return matrix.transpose(-1, -2).is_contiguous()


def random_problem(leading, d, d_v, dtype=torch.float32, generator=None, layout="value-major", device="cpu"):
    """State X (*leading, d, d_v), h (*leading, d), beta (*leading, 1) in (0, 2), v (*leading, d_v), drawn on the
    CPU and moved to `device` (strides kept)."""
    state = random_state(leading, d, d_v, dtype, generator, layout)
    h = (3.0 * torch.randn(*leading, d, generator=generator)).to(dtype)
    beta = (2.0 * torch.rand(*leading, 1, generator=generator)).to(dtype)
    v = torch.randn(*leading, d_v, generator=generator).to(dtype)
    return [tensor.to(device).requires_grad_() for tensor in (state, h, beta, v)]


def value_and_grads(function, inputs, weights):
    """function(*inputs) and the gradients of sum(output * weights) with respect to every input."""
    output = function(*inputs)
    grads = torch.autograd.grad((output.float() * weights).sum(), inputs)
    return output, grads


# --------------------------------------------------------------------------- fused Delta update
SHAPES = [((6,), 16, 1), ((2, 5), 24, 1), ((7,), 16, 4), ((3, 4), 32, 2), ((9,), 8, 7), ((1,), 64, 4)]


@pytest.mark.parametrize("save_output", [False, True], ids=["keep-input", "keep-output"])
@pytest.mark.parametrize("erase", [True, False], ids=["delta", "write-only"])
@pytest.mark.parametrize("leading,d,d_v", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.device
def test_delta_update_matches_reference_fp32(leading, d, d_v, erase, save_output, layout, device):
    inputs = random_problem(leading, d, d_v, layout=layout, device=device)
    weights = torch.randn(*leading, d, d_v).to(device)
    fast, fast_grads = value_and_grads(
        lambda *a: delta_update(*a, EPS, erase=erase, save_output=save_output), inputs, weights
    )
    ref, ref_grads = value_and_grads(lambda *a: delta_update_reference(*a, EPS, erase=erase), inputs, weights)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, **FP32)
    for name, got, expected in zip(("state", "h", "beta", "v"), fast_grads, ref_grads):
        torch.testing.assert_close(got, expected, **FP32, msg=f"gradient of {name}")


def delta_update_truth(inputs, weights, erase: bool) -> tuple:
    """`float64_truth` of the Delta rewrite: exact results from the reference in float64, and magnitudes from the
    rewrite's formulas (`_DeltaUpdate`'s docstring) on absolute values, every difference made a sum. (The rewrite
    divides by |h|, so its gradients are not a plain computation on absolute values.) With r = 1/sqrt(|h|^2 + eps^2)
    (no cancellation), |k^T X| <= r |h|^T |X| =: R, |t| <= |v| + [erase] R =: T, |S| = |G^T h| <= |G|^T |h|."""
    exact = value_and_grads(
        lambda *a: delta_update_reference(*a, EPS, erase=erase),
        [t.detach().double().requires_grad_() for t in inputs],
        weights.double(),
    )
    state, h, beta, v, grad = (t.detach().double().abs() for t in (*inputs, weights))
    r = torch.rsqrt(h.square().sum(-1, keepdim=True) + EPS * EPS)  # (..., 1)
    read = r * (h.unsqueeze(-1) * state).sum(-2)  # R (..., d_v)
    target = v + read if erase else v  # T
    write = beta * r * target  # |w| <= beta r T
    output = state + h.unsqueeze(-1) * write.unsqueeze(-2)
    s_grad = (h.unsqueeze(-1) * grad).sum(-2)  # |S|
    t_grad = beta * r * s_grad  # |dL/dt| = beta r |S|
    grad_v = t_grad
    grad_beta = r * (s_grad * target).sum(-1, keepdim=True)
    grad_state = grad + (r * h).unsqueeze(-1) * t_grad.unsqueeze(-2) if erase else grad
    # dL/dh = G w - [erase] r X T + h ([erase] r^2 T . (v - t) - r^3 beta S . t), with |v - t| = |r X^T h| <= R.
    h_scale = r**3 * beta * (s_grad * target).sum(-1, keepdim=True)
    grad_h = (grad * write.unsqueeze(-2)).sum(-1)
    if erase:
        h_scale = h_scale + r * r * (t_grad * read).sum(-1, keepdim=True)
        grad_h = grad_h + r * (state * t_grad.unsqueeze(-2)).sum(-1)
    grad_h = grad_h + h * h_scale
    # beta and v may broadcast (one per token here): their gradients are summed like the reference's.
    grad_beta, grad_v = grad_beta.sum_to_size(inputs[2].shape), grad_v.sum_to_size(inputs[3].shape)
    return exact, (output, (grad_state, grad_h, grad_beta, grad_v))


@pytest.mark.parametrize("save_output", [False, True], ids=["keep-input", "keep-output"])
@pytest.mark.parametrize("erase", [True, False], ids=["delta", "write-only"])
@pytest.mark.parametrize("d_v", [1, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.device
def test_delta_update_matches_reference_bf16(d_v, erase, save_output, layout, device):
    inputs = random_problem((4, 6), 32, d_v, dtype=torch.bfloat16, layout=layout, device=device)
    weights = torch.randn(4, 6, 32, d_v).to(device)
    fast, fast_grads = value_and_grads(
        lambda *a: delta_update(*a, EPS, erase=erase, save_output=save_output), inputs, weights
    )
    ref, ref_grads = value_and_grads(lambda *a: delta_update_reference(*a, EPS, erase=erase), inputs, weights)
    assert fast.dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in fast_grads)
    torch.testing.assert_close(fast.float(), ref.float(), **bf16_tolerance(ref))
    for name, got, expected in zip(("state", "h", "beta", "v"), fast_grads, ref_grads):
        torch.testing.assert_close(got.float(), expected.float(), **bf16_tolerance(expected), msg=f"gradient of {name}")
    # Both paths compute in fp32 from the exact bf16 inputs and round once to bf16: 1 rounding for the new state;
    # each gradient adds the rounding of dL/dX' to bf16: 2.
    roundings = (1, 2, 2, 2, 2)
    assert_bf16_paths_within_roundings(
        {"fast": (fast, fast_grads), "reference": (ref, ref_grads)},
        delta_update_truth(inputs, weights, erase),
        {"fast": roundings, "reference": roundings},
        ("state", "h", "beta", "v"),
    )


def test_delta_update_keeps_the_inputs_dtypes_in_mixed_precision():
    """A bf16 state with fp32 gate and value (autocast-style): each gradient in its input's dtype."""
    state, h, beta, v = random_problem((5,), 16, 4)
    state_bf16 = state.detach().bfloat16().requires_grad_()
    inputs = [state_bf16, h, beta, v]
    weights = torch.randn(5, 16, 4)
    fast, fast_grads = value_and_grads(lambda *a: delta_update(*a, EPS), inputs, weights)
    ref, ref_grads = value_and_grads(lambda *a: delta_update_reference(*a, EPS), inputs, weights)
    assert fast.dtype == torch.bfloat16
    assert [g.dtype for g in fast_grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    torch.testing.assert_close(fast.float(), ref.float(), **bf16_tolerance(ref))
    for got, expected in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got.float(), expected.float(), **bf16_tolerance(expected))
    # The new state is rounded to bf16 once (1); dL/dX' is rounded to bf16 (1 on every gradient), and only the
    # state's gradient is rounded again, to bf16 (2); h, beta and v get fp32 gradients (1).
    roundings = (1, 2, 1, 1, 1)
    assert_bf16_paths_within_roundings(
        {"fast": (fast, fast_grads), "reference": (ref, ref_grads)},
        delta_update_truth(inputs, weights, erase=True),
        {"fast": roundings, "reference": roundings},
        ("state", "h", "beta", "v"),
    )


def test_delta_update_broadcasts_gate_and_value_like_the_reference():
    state, h, _, _ = random_problem((3, 4), 16, 4)
    beta = torch.tensor([0.7], requires_grad=True)  # one gate for every token
    v = torch.randn(1, 4, 4, requires_grad=True)  # one value per position, shared over the first dimension
    inputs = [state, h, beta, v]
    weights = torch.randn(3, 4, 16, 4)
    fast, fast_grads = value_and_grads(lambda *a: delta_update(*a, EPS), inputs, weights)
    ref, ref_grads = value_and_grads(lambda *a: delta_update_reference(*a, EPS), inputs, weights)
    torch.testing.assert_close(fast, ref, **FP32)
    assert fast_grads[2].shape == (1,)
    for got, expected in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, expected, **FP32)


def test_delta_update_zero_sublayer_output_is_finite_and_matches_reference():
    state, h, beta, v = random_problem((4,), 16, 4)
    h = h.detach().clone()
    h[1] = 0.0
    h[2] = 1e-7  # below the guard eps
    h.requires_grad_()
    inputs = [state, h, beta, v]
    weights = torch.randn(4, 16, 4)
    fast, fast_grads = value_and_grads(lambda *a: delta_update(*a, EPS), inputs, weights)
    ref, ref_grads = value_and_grads(lambda *a: delta_update_reference(*a, EPS), inputs, weights)
    assert torch.equal(fast[1], state[1].detach())  # k = 0: nothing is written
    assert all(torch.isfinite(g).all() for g in fast_grads)
    torch.testing.assert_close(fast, ref, **FP32)
    for got, expected in zip(fast_grads, ref_grads):
        # h's gradient at |h| << eps is 1 / eps times the others: compare relative to its scale.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("d_v", [1, 4])
def test_fast_delta_update_keeps_the_algebra(d_v):
    """beta = 1 overwrites the readout (k^T X' = v^T); the error contracts by (1 - beta)."""
    state, h, _, v = (t.detach() for t in random_problem((8,), 16, d_v))
    k = unit_direction(h, EPS)
    read = lambda matrix: torch.einsum("nd,ndv->nv", k, matrix)  # noqa: E731
    overwritten = delta_update(state, h, torch.ones(8, 1), v, EPS)
    torch.testing.assert_close(read(overwritten), v, atol=1e-5, rtol=0)
    beta = 2.0 * torch.rand(8, 1)
    contracted = read(delta_update(state, h, beta, v, EPS)) - v
    torch.testing.assert_close(contracted, (1.0 - beta) * (read(state) - v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("d_v", [1, 4])
def test_delta_update_gives_the_same_bits_with_and_without_autograd(d_v):
    """Inference runs the fused math without the autograd function: outputs must not depend on the grad mode."""
    state, h, beta, v = random_problem((6,), 32, d_v)
    with_grad = delta_update(state, h, beta, v, EPS)
    with torch.no_grad():
        without = delta_update(state, h, beta, v, EPS)
    assert torch.equal(with_grad, without)
    torch.testing.assert_close(without, delta_update_reference(state, h, beta, v, EPS), **FP32)


@pytest.mark.parametrize("save_output", [False, True], ids=["keep-input", "keep-output"])
@pytest.mark.parametrize("erase", [True, False], ids=["delta", "write-only"])
@pytest.mark.parametrize("d_v", [1, 3])
def test_delta_update_write_output_and_its_gradient(d_v, erase, save_output):
    """`return_write`: the new state is X + h w^T, and gradients through w (alone or with the state) match
    the reference mode."""
    inputs = random_problem((2, 5), 16, d_v)
    state_weights, write_weights = torch.randn(2, 5, 16, d_v), torch.randn(2, 5, d_v)

    def grads(use_state):
        new_state, write = delta_update(*inputs, EPS, erase=erase, return_write=True, save_output=save_output)
        loss = (write.square() * write_weights).sum() + ((new_state * state_weights).sum() if use_state else 0.0)
        return new_state, write, torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)

    for use_state in (True, False):
        new_state, write, fast_grads = grads(use_state)
        with reference_paths():
            ref_state, ref_write, ref_grads = grads(use_state)
        torch.testing.assert_close(new_state, ref_state, **FP32)
        torch.testing.assert_close(write, ref_write, **FP32)
        for got, expected in zip(fast_grads, ref_grads):
            torch.testing.assert_close(got, expected, **FP32)
    assert write.dtype == torch.float32 and write.shape == (2, 5, d_v)
    state, h = inputs[0].detach(), inputs[1].detach()
    torch.testing.assert_close(new_state, state + h.unsqueeze(-1) * write.detach().unsqueeze(-2), **FP32)


def test_delta_update_rejects_a_mismatched_direction():
    state, h, beta, v = (t.detach() for t in random_problem((4,), 16, 2))
    with pytest.raises(ValueError, match="h must have shape"):
        delta_update(state, h[:, :8], beta, v, EPS)


def test_fast_paths_refuse_second_order_gradients():
    """Documented: the analytic backwards are first order; create_graph raises instead of dropping terms."""
    state, h, beta, v = random_problem((4,), 16, 2)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(delta_update(state, h, beta, v, EPS).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(channel_compress(state, torch.ones(16, 2)).sum(), state, create_graph=True)
    with reference_paths():  # the references support second order
        (grad_h,) = torch.autograd.grad(delta_update(state, h, beta, v, EPS).sum(), h, create_graph=True)
    (second,) = torch.autograd.grad(grad_h.square().sum(), h)
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_fast_paths_trace_under_torch_compile():
    """The fused functions stay compilable in one graph (aot_eager: tracing without a C++ toolchain)."""
    inputs = random_problem((3, 4), 16, 4)
    weights = torch.randn(3, 4, 16, 4)
    read_weight = torch.randn(16, 4)

    def step(state, h, beta, v):
        new_state, write = delta_update(state, h, beta, v, EPS, return_write=True)
        read = channel_read_after_write(channel_compress(new_state, read_weight), h, write, read_weight)
        newer = delta_update(new_state, h, beta, v, EPS, save_output=True)
        return (newer * weights).sum() + read.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_loss = step(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    compiled_loss = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss, **FP32)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.device
def test_channel_read_after_write_matches_reference(dtype, device):
    inputs = [
        torch.randn(3, 5, 16).to(device, dtype).requires_grad_(),
        torch.randn(3, 5, 16).to(device, dtype).requires_grad_(),
        torch.randn(3, 5, 4).to(device).requires_grad_(),
        torch.randn(16, 4).to(device, dtype).requires_grad_(),
    ]
    weights = torch.randn(3, 5, 16).to(device)
    fast, fast_grads = value_and_grads(channel_read_after_write, inputs, weights)
    ref, ref_grads = value_and_grads(channel_read_after_write_reference, inputs, weights)
    assert fast.dtype == dtype and [g.dtype for g in fast_grads] == [t.dtype for t in inputs]
    tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(ref)
    torch.testing.assert_close(fast.float(), ref.float(), **tolerance)
    for got, expected in zip(fast_grads, ref_grads):
        tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(expected)
        torch.testing.assert_close(got.float(), expected.float(), **tolerance)
    if dtype == torch.bfloat16:
        # Both paths compute in fp32 from the exact inputs and round each bf16 result once: the new read 1; dL/dout
        # rounded to bf16 (1) is the read's gradient; h's and W's are rounded again (2); w's stays fp32 (1).
        roundings = (1, 1, 2, 1, 2)
        assert_bf16_paths_within_roundings(
            {"fast": (fast, fast_grads), "reference": (ref, ref_grads)},
            float64_truth(channel_read_after_write_reference, inputs, weights),
            {"fast": roundings, "reference": roundings},
            ("read", "h", "w", "W"),
        )


# --------------------------------------------------------------------------- compressors and convolutions
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-state-fp32-weight"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.device
def test_channel_compress_matches_reference(dtype, weight_dtype, layout, device):
    matrix = random_state((3, 7), 24, 4, dtype, layout=layout).to(device).requires_grad_()
    read_weight = torch.randn(24, 4).to(device, weight_dtype).requires_grad_()
    weights = torch.randn(3, 7, 24).to(device)
    inputs = [matrix, read_weight]
    fast, fast_grads = value_and_grads(channel_compress, inputs, weights)
    ref, ref_grads = value_and_grads(channel_compress_reference, inputs, weights)
    assert fast.dtype == ref.dtype == torch.promote_types(dtype, weight_dtype)
    assert [g.dtype for g in fast_grads] == [dtype, weight_dtype]
    tolerance = FP32 if ref.dtype == torch.float32 and dtype == torch.float32 else bf16_tolerance(ref)
    torch.testing.assert_close(fast, ref, **tolerance)
    for got, expected in zip(fast_grads, ref_grads):
        tol = FP32 if dtype == weight_dtype == torch.float32 else bf16_tolerance(expected)
        torch.testing.assert_close(got.float(), expected.float(), **tol)
    if dtype == torch.bfloat16 and weight_dtype == torch.bfloat16:
        # Fast: the products of bf16 values are exact in fp32 and summed there, rounded once (1). Reference: each
        # product rounded to bf16, then the sum (fp32 accumulation) rounded (2). Gradients, both paths: dL/dout to
        # bf16 (1); dX = g W rounded (2); dW = sum_n g X: products rounded, the sum over tokens rounded (3).
        roundings = {"fast": (1, 2, 3), "reference": (2, 2, 3)}
    elif dtype == torch.bfloat16:  # the state promoted to the fp32 weight: fp32 throughout, dX rounded to bf16
        roundings = {"fast": (0, 1, 0), "reference": (0, 1, 0)}
    if dtype == torch.bfloat16:
        assert_bf16_paths_within_roundings(
            {"fast": (fast, fast_grads), "reference": (ref, ref_grads)},
            float64_truth(channel_compress_reference, inputs, weights),
            roundings,
            ("X", "W"),
        )


def assert_token_conv_matches_reference(x, weight, padding, dtype):
    """token_conv against token_conv_reference on inputs cast to `dtype`: forward and both gradients."""
    inputs = [x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()]
    expected_tokens = x.shape[1] + padding - weight.shape[-1] + 1
    weights = torch.randn(x.shape[0], expected_tokens, weight.shape[0])
    fast, fast_grads = value_and_grads(lambda a, w: token_conv(a, w, padding), inputs, weights)
    ref, ref_grads = value_and_grads(lambda a, w: token_conv_reference(a, w, padding), inputs, weights)
    assert fast.shape == ref.shape == (x.shape[0], expected_tokens, weight.shape[0]) and fast.dtype == dtype
    for name, got, expected in zip(("output", "x", "weight"), (fast, *fast_grads), (ref, *ref_grads)):
        tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(expected)
        torch.testing.assert_close(got, expected, **tolerance, msg=f"{name}, padding {padding}")
    if dtype == torch.bfloat16:
        # A convolution (the reference's conv1d, the fast conv2d) sums in fp32 and rounds once: output 1; each
        # gradient 2 with the rounding of dL/dout. A few output tokens (the fast path's product of the windows): the
        # product rounds once (output 1, weight 2), and x's gradient adds the K overlapping windows' gradients in
        # bf16 (K - 1 more roundings): 1 + 1 + K - 1 = K + 1.
        few = x.shape[0] * expected_tokens <= delta_ops._FEW_TOKENS
        kernel = weight.shape[-1]
        roundings = {"fast": (1, kernel + 1 if few else 2, 2), "reference": (1, 2, 2)}
        assert_bf16_paths_within_roundings(
            {"fast": (fast, fast_grads), "reference": (ref, ref_grads)},
            float64_truth(lambda a, w: token_conv_reference(a, w, padding), inputs, weights),
            roundings,
            ("x", "weight"),
            f"padding {padding}",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "channels,weight_shape",
    [(12, (12, 1, 4)), (12, (3, 4, 4)), (4, (16, 1, 4)), (8, (8, 1, 1)), (6, (2, 3, 2))],
    ids=["depthwise", "folded-compressor", "expansion", "kernel-1", "grouped"],
)
def test_token_conv_matches_reference(channels, weight_shape, dtype):
    for padding in range(weight_shape[-1]):
        assert_token_conv_matches_reference(torch.randn(2, 9, channels), torch.randn(*weight_shape), padding, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 3, 40], ids=["decode-step", "few-tokens", "convolution"])
def test_token_conv_few_and_many_tokens_match_reference(tokens, dtype):
    """A few output tokens go through a direct product of the windows, more through the convolution."""
    for channels, weight_shape in ((12, (3, 4, 4)), (4, (16, 1, 4)), (6, (2, 3, 2))):
        for padding in (0, 1):
            x = torch.randn(2, tokens + weight_shape[-1] - 1 - padding, channels)
            assert_token_conv_matches_reference(x, torch.randn(*weight_shape), padding, dtype)


def test_token_conv_output_token_t_reads_inputs_up_to_t():
    """Causality, exactly: changing input token t leaves every output before t unchanged."""
    for tokens in (10, 100):  # both code paths
        x = torch.randn(1, tokens, 6)
        weight = torch.randn(6, 1, 4)
        base = token_conv(x, weight, padding=3)
        changed = x.clone()
        changed[:, 5] += 1.0
        out = token_conv(changed, weight, padding=3)
        assert torch.equal(out[:, :5], base[:, :5])
        assert not torch.equal(out[:, 5], base[:, 5])


@pytest.mark.parametrize("erase", [True, False], ids=["delta", "write-only"])
@pytest.mark.parametrize("save_output", [False, True], ids=["keep-input", "keep-output"])
def test_fast_paths_give_value_major_states_and_state_gradients(erase, save_output):
    """What the speed rests on: given the model's value-major state, every state-sized tensor the fast paths
    make (the new state, the gradients of the state) is value major again, so no pass reads along d_v."""
    state, h, beta, v = random_problem((2, 6), 16, 4)
    read_weight = torch.randn(16, 4, requires_grad=True)
    new_state = delta_update(state, h, beta, v, EPS, erase=erase, save_output=save_output)
    assert is_value_major(new_state)
    assert flat_state(new_state).data_ptr() == new_state.data_ptr()  # flattening is a view
    read = channel_compress(new_state, read_weight)
    (grad_state,) = torch.autograd.grad((read.square().sum() + new_state.square().sum()), [state])
    assert is_value_major(grad_state)
    (grad_read,) = torch.autograd.grad(channel_compress(state, read_weight).square().sum(), [state])
    assert is_value_major(grad_read)


@pytest.mark.parametrize("tokens", [1, 3, 40], ids=["decode-step", "few-tokens", "convolution"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.device
def test_token_compress_matches_reference(tokens, dtype, device):
    """The folded (K, d_v) depthwise convolution over the value-major state, and the windows product of a few
    tokens, against filtering every channel and then reading: forward and every gradient, every padding."""
    d, d_v, kernel = 12, 4, 4
    for padding in range(kernel):
        x = torch.randn(2, tokens + kernel - 1 - padding, d_v * d).to(device, dtype).requires_grad_()
        filters = (0.5 * torch.randn(d * d_v, 1, kernel)).to(device, dtype).requires_grad_()
        read_weight = torch.randn(d, d_v).to(device, dtype).requires_grad_()
        inputs, weights = [x, filters, read_weight], torch.randn(2, tokens, d).to(device)
        fast, fast_grads = value_and_grads(lambda *a, p=padding: token_compress(*a, p), inputs, weights)
        ref, ref_grads = value_and_grads(lambda *a, p=padding: token_compress_reference(*a, p), inputs, weights)
        assert fast.shape == ref.shape == (2, tokens, d) and fast.dtype == dtype
        tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(ref)
        torch.testing.assert_close(fast, ref, **tolerance)
        for name, got, expected in zip(("x", "filters", "read"), fast_grads, ref_grads):
            tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(expected)
            torch.testing.assert_close(got, expected, **tolerance, msg=f"gradient of {name}, padding {padding}")
        if dtype == torch.bfloat16:
            # Fast: the folded taps F = W f are rounded products (1), then one fp32-summed convolution or product
            # of the windows (1): output 2. Gradients, with dL/dout rounded (1) and F (1): x's sums its K taps in
            # bf16, one rounding each (the convolution's K `addcmul_`; the windows' product 1 + K - 1): K + 2. dF is
            # summed in fp32 from rounded products (convolution) or in one product (windows): at most 2 + 1 = 3,
            # then f's = dF W (4) and W's = sum_k dF f (5).
            # Reference: conv1d (1), the read's products (1) and sum (1): output 3; x's: dL/dout, g W, conv1d
            # backward: 3; f's: dL/dout, g W, conv1d backward: 3; W's: dL/dout, the rounded filtered state,
            # the products, the sum over tokens: 4.
            roundings = {"fast": (2, kernel + 2, 4, 5), "reference": (3, 3, 3, 4)}
            assert_bf16_paths_within_roundings(
                {"fast": (fast, fast_grads), "reference": (ref, ref_grads)},
                float64_truth(lambda *a, p=padding: token_compress_reference(*a, p), inputs, weights),
                roundings,
                ("x", "filters", "read"),
                f"padding {padding}",
            )


def test_token_compress_reads_channel_j_times_d_plus_i_as_feature_i_value_j():
    """The layout, exactly: a state that is 1 at feature i, value j (flat channel j * d + i) and 0 elsewhere
    reads W[i, j] f_ij[K-1] at feature i, whichever path runs."""
    d, d_v, kernel = 5, 3, 2
    filters = torch.randn(d * d_v, 1, kernel)
    read_weight = torch.randn(d, d_v)
    for tokens in (1, 40):
        for i, j in ((0, 0), (3, 1), (4, 2)):
            x = torch.zeros(1, tokens, d_v * d)
            x[0, -1, j * d + i] = 1.0
            out = token_compress(x, filters, read_weight, padding=kernel - 1)[0, -1]
            expected = torch.zeros(d)
            expected[i] = read_weight[i, j] * filters[i * d_v + j, 0, -1]
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tokens", [1, 3, 40], ids=["decode-step", "few-tokens", "convolution"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.device
def test_token_read_after_write_matches_reference(tokens, dtype, device):
    """The token compressor's read of a rank-1 write h w^T from h and w alone, against compressing the
    materialized write: forward and every gradient, every padding."""
    generator = torch.Generator().manual_seed(3)
    d, d_v, kernel = 12, 4, 4
    for padding in range(kernel):
        tokens_in = tokens + kernel - 1 - padding
        inputs = [
            torch.randn(2, tokens, d, generator=generator).to(dtype),  # read
            torch.randn(2, tokens_in, d, generator=generator).to(dtype),  # h
            torch.randn(2, tokens_in, d_v, generator=generator),  # w, fp32 as the Delta update returns it
            (0.5 * torch.randn(d * d_v, 1, kernel, generator=generator)).to(dtype),
            torch.randn(d, d_v, generator=generator).to(dtype),
        ]
        inputs = [tensor.to(device).requires_grad_() for tensor in inputs]
        weights = torch.randn(2, tokens, d, generator=generator).to(device)
        fast, fast_grads = value_and_grads(lambda *a, p=padding: token_read_after_write(*a, p), inputs, weights)
        ref, ref_grads = value_and_grads(lambda *a, p=padding: token_read_after_write_reference(*a, p), inputs, weights)
        assert fast.shape == ref.shape == (2, tokens, d) and fast.dtype == dtype
        assert [grad.dtype for grad in fast_grads] == [tensor.dtype for tensor in inputs]
        tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(ref)
        torch.testing.assert_close(fast, ref, **tolerance)
        for name, got, expected in zip(("read", "h", "w", "filters", "read weight"), fast_grads, ref_grads):
            tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(expected)
            torch.testing.assert_close(got, expected, **tolerance, msg=f"gradient of {name}, padding {padding}")
        if dtype == torch.bfloat16:
            # Reference: fp32 from the exact inputs, rounded once: output 1; dL/dout rounded (1) is read's
            # gradient and w's (fp32); h's, f's and W's are rounded again (2). Fast: the same, but the folded taps
            # F = W f are a bf16 product (1 more on the output, h's and w's paths: 2, 3, 2); dF is rounded to bf16
            # (2), then f's = dF W (3) and W's = sum_k dF f (4).
            roundings = {"fast": (2, 1, 3, 2, 3, 4), "reference": (1, 1, 2, 1, 2, 2)}
            assert_bf16_paths_within_roundings(
                {"fast": (fast, fast_grads), "reference": (ref, ref_grads)},
                float64_truth(lambda *a, p=padding: token_read_after_write_reference(*a, p), inputs, weights),
                roundings,
                ("read", "h", "w", "filters", "read weight"),
                f"padding {padding}",
            )


@pytest.mark.parametrize("kind", ["channel", "token"])
@pytest.mark.parametrize("form", ["factored", "free"])
def test_read_after_write_equals_reading_the_new_state(kind, form):
    """`read_after_write` from the read of X gives the read of X + h w^T, with and without a padding mask (a
    masked token's state reads as zero, so its write must vanish too), forward and every gradient."""
    compressor = StateCompressor(16, 4, kind=kind, form=form)
    with torch.no_grad():
        for parameter in compressor.parameters():
            parameter.normal_()
    state = torch.randn(2, 7, 64, requires_grad=True)
    h, write = torch.randn(2, 7, 16, requires_grad=True), torch.randn(2, 7, 4, requires_grad=True)
    new_state = flat_state(state_matrix(state, 16, 4) + h.unsqueeze(-1) * write.unsqueeze(-2))
    left_padded = torch.tensor([[False, False] + [True] * 5, [True] * 7])
    inputs = [state, h, write, *compressor.parameters()]
    for padding_mask in (None, left_padded):
        expected = compressor(new_state, padding_mask=padding_mask)
        read = compressor(state, padding_mask=padding_mask)
        got = compressor.read_after_write(read, h, write, new_state, padding_mask=padding_mask)
        torch.testing.assert_close(got, expected, **FP32)
        weights = torch.randn(2, 7, 16)
        expected_grads = torch.autograd.grad((expected * weights).sum(), inputs, retain_graph=True)
        got_grads = torch.autograd.grad((got * weights).sum(), inputs, retain_graph=True)
        for got_grad, expected_grad in zip(got_grads, expected_grads):
            torch.testing.assert_close(got_grad, expected_grad, **FP32)
    if kind == "token":
        with pytest.raises(ValueError, match="kind='token' needs `new_state`"):
            compressor.read_after_write(read, h, write)
    else:
        torch.testing.assert_close(compressor.read_after_write(read, h, write), expected, **FP32)


@pytest.mark.parametrize("value_channels", [1, 4])
def test_shortcut_write_reproduces_its_new_state(value_channels):
    shortcut = DeltaShortcut(16, value_channels=value_channels)
    state = torch.randn(2, 3, 16 * value_channels)
    h, context, block_input = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    new_state, write = shortcut(state, h, context, block_input, return_write=True)
    assert torch.equal(new_state, shortcut(state, h, context, block_input))
    rebuilt = state_matrix(state, 16, value_channels) + h.unsqueeze(-1) * write.unsqueeze(-2)
    torch.testing.assert_close(new_state, flat_state(rebuilt), **FP32)


def test_reference_paths_switches_and_restores():
    assert fast_paths_enabled()
    with pytest.raises(KeyError):
        with reference_paths():
            assert not fast_paths_enabled()
            with reference_paths():
                assert not fast_paths_enabled()
            assert not fast_paths_enabled()
            raise KeyError("restored even on errors")
    assert fast_paths_enabled()


# --------------------------------------------------------------------------- whole models
# `perturb` moves the gates, values and compressors of the models below off their (symmetric) init.
def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 12 random tokens; row 1 is left-padded by 4, which exercises the masked token convolutions."""
    input_ids = torch.randint(0, vocab_size, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    return input_ids, attention_mask


def logits_and_grads(model, input_ids, attention_mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("variant", sorted(PRESET_VARIANTS))
@pytest.mark.device
def test_model_logits_and_gradients_equal_the_reference_paths(variant, device):
    model = perturb(tiny_model(variant), 0.05).to(device)
    input_ids, attention_mask = (tensor.to(device) for tensor in padded_batch(model.config.vocab_size))
    logits, grads = logits_and_grads(model, input_ids, attention_mask)
    with reference_paths():
        ref_logits, ref_grads = logits_and_grads(model, input_ids, attention_mask)
    torch.testing.assert_close(logits, ref_logits, **FP32)
    assert grads.keys() == ref_grads.keys() == {name for name, _ in model.named_parameters()}
    for name, grad in grads.items():
        # Summed gradients (gate biases, read weights) carry cancellation: tolerance relative to each tensor's scale.
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-4 * scale + 1e-8, msg=name)


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got.double() - truth).norm() / truth.norm())


@pytest.mark.parametrize("variant", sorted(PRESET_VARIANTS))
@pytest.mark.device
def test_bf16_model_fast_paths_are_as_accurate_as_the_references(variant, device):
    """A model cast to bf16: fast and reference paths round at different places, so they are compared with the
    same weights in float64, which both approximate. The fast paths' logits and gradients must be as close to it
    as the references' (gate-bias gradients are sums with cancellation, a few times noisier in bf16 on either
    path, so the gradients are compared by their median error)."""
    model = perturb(tiny_model(variant), 0.05).to(device, torch.bfloat16)
    input_ids, attention_mask = (tensor.to(device) for tensor in padded_batch(model.config.vocab_size))
    logits, grads = logits_and_grads(model, input_ids, attention_mask)
    with reference_paths():
        ref_logits, ref_grads = logits_and_grads(model, input_ids, attention_mask)
    true_logits, true_grads = logits_and_grads(model.double(), input_ids, attention_mask)
    assert logits.dtype == torch.bfloat16 and all(grad.dtype == torch.bfloat16 for grad in grads.values())
    fast_error, ref_error = relative_error(logits, true_logits), relative_error(ref_logits, true_logits)
    assert fast_error < 0.03 and fast_error <= 1.5 * ref_error, (fast_error, ref_error)
    fast_errors = torch.tensor([relative_error(grads[name], true) for name, true in true_grads.items()])
    ref_errors = torch.tensor([relative_error(ref_grads[name], true) for name, true in true_grads.items()])
    assert fast_errors.median() < 0.05 and fast_errors.median() <= 1.5 * ref_errors.median(), (fast_errors, ref_errors)


@pytest.mark.parametrize("variant", ["ddl-scalar", "ddl-cc", "ddl-tc", "write-only-cc"])
def test_use_fast_path_false_in_the_config_runs_the_reference_paths(variant):
    """`DDLConfig.use_fast_path=False` reaches every Delta module and gives, bit for bit, what
    `reference_paths()` gives; the fast model agrees with both to float rounding."""
    fast_model = perturb(tiny_model(variant), 0.05)
    reference_model = DDLForCausalLM(DDLConfig.from_preset("tiny", variant, use_fast_path=False))
    reference_model.load_state_dict(fast_model.state_dict())
    flags = [m.use_fast_path for m in reference_model.modules() if hasattr(m, "use_fast_path")]
    assert flags and not any(flags)
    input_ids, attention_mask = padded_batch(fast_model.config.vocab_size)
    logits, grads = logits_and_grads(reference_model, input_ids, attention_mask)
    with reference_paths():
        forced_logits, forced_grads = logits_and_grads(fast_model, input_ids, attention_mask)
    fast_logits, _ = logits_and_grads(fast_model, input_ids, attention_mask)
    assert torch.equal(logits, forced_logits)
    for name, grad in grads.items():
        assert torch.equal(grad, forced_grads[name]), name
    torch.testing.assert_close(fast_logits, logits, **FP32)


@pytest.mark.parametrize("variant", ["ddl-scalar", "ddl-cc", "ddl-tc", "write-only-cc"])
def test_float64_model_computes_in_float64(variant):
    """A float64 model is not rounded to float32 anywhere: fast and reference paths agree to float64
    rounding, logits and every gradient, a million times closer than float32 arithmetic could."""
    model = perturb(tiny_model(variant), 0.05).double()
    input_ids, attention_mask = padded_batch(model.config.vocab_size)
    logits, grads = logits_and_grads(model, input_ids, attention_mask)
    with reference_paths():
        ref_logits, ref_grads = logits_and_grads(model, input_ids, attention_mask)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", ["ddl-scalar", "ddl-cc", "ddl-tc"])
@pytest.mark.device
def test_cached_decoding_equals_the_reference_paths(variant, device):
    model = perturb(tiny_model(variant), 0.05).eval().to(device)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6)).to(device)

    def greedy_logits():
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True)
            steps = [out.logits[:, -1]]
            for _ in range(4):
                out = model(input_ids=steps[-1].argmax(-1, keepdim=True), cache=out.cache, use_cache=True)
                steps.append(out.logits[:, -1])
        return torch.stack(steps, 1)

    fast = greedy_logits()
    with reference_paths():
        ref = greedy_logits()
    torch.testing.assert_close(fast, ref, **FP32)


@pytest.mark.parametrize("variant", ["ddl-scalar", "ddl-cc", "ddl-tc", "write-only-cc"])
def test_fast_paths_save_no_more_for_backward_than_the_reference(variant):
    """Bytes of the distinct tensors autograd keeps for backward (weights excluded), counted exactly."""
    model = perturb(tiny_model(variant), 0.05)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes():
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        del loss
        return sum(storages.values())

    fast = saved_bytes()
    with reference_paths():
        reference = saved_bytes()
    assert fast < reference, (fast, reference)


@pytest.mark.parametrize(("value_channels", "kernel_size"), [(4, 4), (4, 3), (6, 4), (2, 4)])
def test_factored_channel_read_is_a_same_padded_conv_along_the_values_then_a_shared_read(value_channels, kernel_size):
    """The authors' CC (spec section 7): each feature's d_v values convolved with its own kernel (d, K), padded
    (K-1)//2 on the left and K-1-(K-1)//2 on the right, then read with one vector r (d_v,)."""
    d = 5
    compressor = StateCompressor(d, value_channels, kind="channel", channel_kernel_size=kernel_size)
    with torch.no_grad():
        compressor.read_vector.normal_()
    state = torch.randn(3, 7, d * value_channels)
    left = (kernel_size - 1) // 2
    padded = F.pad(state_matrix(state, d, value_channels), (left, kernel_size - 1 - left))  # (3, 7, d, d_v + K-1)
    windows = padded.unfold(-1, kernel_size, 1)  # (3, 7, d, d_v, K): windows[..., i, u, t] = X[i, u + t - left]
    convolved = (windows * compressor.channel_kernel.unsqueeze(-2)).sum(-1)  # (3, 7, d, d_v)
    by_definition = convolved @ compressor.read_vector
    torch.testing.assert_close(compressor(state), by_definition, **FP32)
    shared = StateCompressor(d, value_channels, kind="token", conv_size=2)
    assert torch.equal(shared.read_matrix(), shared.read_vector.expand(d, value_channels))


def _every_fused_op(state, h, beta, v, read_weight, filters, embed_filters, embeddings):
    """One chain through every fused op, as a block and its neighbours run them, each token convolution with both
    paddings a model uses (K - 1: a training or prefill forward; 0: the inputs start with K - 1 cached tokens, a
    decoding step): EC token convolution, the rewrite (keeping its input, then its output; write-only), the channel
    read and the read after a write, the token compressor and its read after a write. Returns every result,
    flattened into one fp32 vector."""
    d, d_v = state.shape[-2:]
    paddings = (filters.shape[-1] - 1, 0)
    expanded = [token_conv(embeddings, embed_filters, padding=padding) for padding in paddings]
    state = state + expanded[0].unflatten(-1, (d, d_v))
    new_state, write = delta_update(state, h, beta, v, EPS, return_write=True)
    read = channel_read_after_write(channel_compress(state, read_weight), h, write, read_weight)
    newer, newer_write = delta_update(new_state, h, beta, v, EPS, return_write=True, save_output=True)
    written_only = delta_update(newer, h, beta, v, EPS, erase=False)
    filtered = []
    for padding in paddings:
        compressed = token_compress(flat_state(new_state), filters, read_weight, padding=padding)
        filtered.append(token_read_after_write(compressed, h, newer_write, filters, read_weight, padding=padding))
    results = [*expanded, read, flat_state(written_only), *filtered]
    return torch.cat([result.float().flatten() for result in results])


# Two rows of K = 4 tokens take the few-token branches of the token convolutions (8 outputs with padding K - 1,
# 2 with padding 0: one decoding step per row); two rows of 12 take the convolutions (24 and 18 outputs, above
# `_FEW_TOKENS`).
BRANCH_TOKENS = {"few-tokens-and-decode-step": 4, "convolution": 12}


@pytest.mark.slow
@pytest.mark.parametrize("branch", list(BRANCH_TOKENS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.device
def test_inductor_compiled_fused_ops_match_the_eager_references_forward_and_every_gradient(dtype, branch, device):
    """What a GPU run compiles (inductor writes C++ here and Triton there from the same graph): the fused paths,
    compiled, against the plain references in eager mode, forward and the gradient of every input, then the
    inference branches (no autograd functions) under `no_grad`, which compile a graph of their own."""
    generator = torch.Generator().manual_seed(7)
    d, d_v, kernel, tokens = 16, 4, 4, BRANCH_TOKENS[branch]
    state, h, beta, v = random_problem((2, tokens), d, d_v, dtype, generator, device=device)
    extra = [
        torch.randn(d, d_v, generator=generator),  # read weight
        0.5 * torch.randn(d * d_v, 1, kernel, generator=generator),  # TC filters
        0.5 * torch.randn(d * d_v, 1, kernel, generator=generator),  # EC filters
        torch.randn(2, tokens, d, generator=generator),  # embeddings
    ]
    inputs = [state, h, beta, v, *(tensor.to(device, dtype).requires_grad_() for tensor in extra)]
    with reference_paths(), torch.no_grad():
        weights = torch.randn(_every_fused_op(*inputs).shape, generator=generator).to(device)
    with reference_paths():
        expected, expected_grads = value_and_grads(_every_fused_op, inputs, weights)
    torch._dynamo.reset()
    compiled = torch.compile(_every_fused_op, backend="inductor", fullgraph=True, dynamic=False)
    got, got_grads = value_and_grads(compiled, inputs, weights)
    with torch.no_grad():
        got_inference = compiled(*inputs)
    torch._dynamo.reset()
    tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(expected)
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(got_inference, expected, **tolerance)
    for index, (grad, reference) in enumerate(zip(got_grads, expected_grads)):
        assert grad.dtype == inputs[index].dtype
        tolerance = FP32 if dtype == torch.float32 else bf16_tolerance(reference)
        torch.testing.assert_close(grad.float(), reference.float(), **tolerance, msg=f"gradient of input {index}")


@pytest.mark.parametrize("branch", list(BRANCH_TOKENS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.device
def test_inference_branches_give_the_bits_of_the_autograd_branches(dtype, branch, device):
    """Without autograd every op runs its forward math without the autograd function (or custom operator):
    the results must not depend on the grad mode, bit for bit, on every branch."""
    generator = torch.Generator().manual_seed(11)
    d, d_v, kernel, tokens = 16, 4, 4, BRANCH_TOKENS[branch]
    inputs = random_problem((2, tokens), d, d_v, dtype, generator, device=device)
    inputs += [
        torch.randn(d, d_v, generator=generator).to(device, dtype).requires_grad_(),
        (0.5 * torch.randn(d * d_v, 1, kernel, generator=generator)).to(device, dtype).requires_grad_(),
        (0.5 * torch.randn(d * d_v, 1, kernel, generator=generator)).to(device, dtype).requires_grad_(),
        torch.randn(2, tokens, d, generator=generator).to(device, dtype).requires_grad_(),
    ]
    with_autograd = _every_fused_op(*inputs)
    assert with_autograd.requires_grad
    with torch.no_grad():
        without = _every_fused_op(*inputs)
    assert torch.equal(with_autograd, without)


@pytest.mark.device
@pytest.mark.parametrize("tokens", [2, 40], ids=["few-tokens", "convolution"])
def test_token_compress_under_autocast_gives_one_dtype_in_every_mode(tokens, device):
    """Under bf16 autocast with fp32 inputs, the token compressor runs like a convolution under autocast (the
    reference's conv1d): bf16 inputs, a bf16 result. With autograd, without it and compiled it gives the same
    dtype and values, and the custom operator that autograd and the compiler call returns what its fake declares."""
    d, d_v, kernel = 12, 4, 4
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(2, tokens + kernel - 1, d_v * d, generator=generator).to(device).requires_grad_()
    filters = (0.5 * torch.randn(d * d_v, 1, kernel, generator=generator)).to(device).requires_grad_()
    read_weight = torch.randn(d, d_v, generator=generator).to(device).requires_grad_()
    inputs = [x, filters, read_weight]

    def compress(*a):
        return token_compress(*a, padding=kernel - 1)

    compiled = torch.compile(compress, backend="aot_eager", fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager = compress(*inputs)
        with torch.no_grad():
            inference = compress(*inputs)
        got = compiled(*inputs)
        reference = token_compress_reference(*inputs, kernel - 1)
    torch._dynamo.reset()
    assert eager.dtype == inference.dtype == got.dtype == torch.bfloat16
    assert torch.equal(eager, inference)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch.testing.assert_close(eager.float(), reference.float(), **bf16_tolerance(reference))
    eager_grads = torch.autograd.grad(eager.float().square().sum(), inputs)
    got_grads = torch.autograd.grad(got.float().square().sum(), inputs)
    for name, eager_grad, got_grad in zip(("x", "filters", "read"), eager_grads, got_grads):
        assert eager_grad.dtype == got_grad.dtype == torch.float32, name
        torch.testing.assert_close(got_grad, eager_grad, rtol=1e-5, atol=1e-5, msg=name)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        operator_inputs = (x.detach().contiguous(), torch.randn(kernel, d_v, d, generator=generator).to(device))
        real = delta_ops._token_compress_op(*operator_inputs, kernel - 1)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = delta_ops._token_compress_op(*(mode.from_tensor(t) for t in operator_inputs), kernel - 1)
    assert real.dtype == fake.dtype == torch.float32 and real.shape == fake.shape and real.stride() == fake.stride()


@pytest.mark.device
def test_reads_after_a_write_stay_fp32_under_autocast_in_every_branch(device):
    """Under bf16 autocast the reads after a write compute in fp32 on every branch, as their autograd paths do:
    the channel read gives the same bits without autograd, and the token read of a packed row (a tap mask that
    drops nothing) gives the bits of the unpacked one."""
    generator = torch.Generator().manual_seed(17)
    d, d_v, kernel, tokens = 12, 4, 4, 40

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(device).requires_grad_()

    read, h, write, read_weight = draw(2, tokens, d), draw(2, tokens, d), draw(2, tokens, d_v), draw(d, d_v)
    filters = draw(d * d_v, 1, kernel, scale=0.5)
    keep_all = torch.ones(2, tokens, kernel, dtype=torch.bool, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        channel = channel_read_after_write(read, h, write, read_weight)
        with torch.no_grad():
            channel_inference = channel_read_after_write(read, h, write, read_weight)
        token = token_read_after_write(read, h, write, filters, read_weight, padding=kernel - 1)
        packed = token_read_after_write(read, h, write, filters, read_weight, padding=kernel - 1, tap_mask=keep_all)
    assert channel.dtype == channel_inference.dtype == token.dtype == packed.dtype == torch.float32
    assert torch.equal(channel, channel_inference)
    assert torch.equal(token, packed)


@pytest.mark.device
def test_token_compress_operators_pass_torch_library_opcheck(device):
    """The token compressor's custom operators (what the compiler calls whole): schema, fake (meta) shapes,
    autograd registration and the backward against the forward, as `torch.library.opcheck` checks them."""
    from ddl_hf.models.ddl import delta_ops

    generator = torch.Generator().manual_seed(5)
    d, d_v, kernel = 6, 3, 4
    for padding in (0, kernel - 1):
        x = torch.randn(2, 11, d_v * d, generator=generator).to(device).requires_grad_()
        taps = torch.randn(kernel, d_v, d, generator=generator).to(device).requires_grad_()
        torch.library.opcheck(delta_ops._token_compress_op, (x, taps, padding))
        grad_out = torch.randn(2, 11 + padding - kernel + 1, d, generator=generator).to(device)
        torch.library.opcheck(delta_ops._token_compress_backward_op, (x.detach(), taps.detach(), grad_out, padding))
