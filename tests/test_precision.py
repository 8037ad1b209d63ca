"""Precision and compilation: bf16 autocast training, bf16 generation, torch.compile, and numerics at the edges
(zero or tiny sublayer outputs, saturated gates, huge inputs) without NaN or Inf."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import DDLForCausalLM, state_matrix
from rounding_bounds import LAMBDA, UNIT_ROUNDOFF, rounding_spread

# Compiled kernels are cached across runs (a cold inductor compile of the tiny models takes tens of seconds).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ddl_hf_inductor_cache"))

VOCAB = 96


def _assert_finite_gradients(model: torch.nn.Module) -> None:
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"


# --------------------------------------------------------------------------- bf16 autocast training
def _loss(network, parameters, ids, autocast: bool) -> torch.Tensor:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        return torch.func.functional_call(network, parameters, (), {"input_ids": ids, "labels": ids}).loss


def _train(model, ids, steps: int, autocast: bool) -> tuple[list[float], dict[str, torch.Tensor], list[tuple]]:
    """Trains on one batch; with autocast, also returns per step (|autocast loss - fp32 loss| at the same weights,
    its bound lam * u * sqrt(sum c^2) from tests/rounding_bounds.py)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, first_gradients, loss_errors = [], {}, []
    for step in range(steps):
        if autocast:
            with torch.no_grad():
                fp32_loss = model(input_ids=ids, labels=ids).loss.double().cpu()
            spread = rounding_spread(
                lambda network, parameters: _loss(network, parameters, ids.cpu(), network.dtype == torch.float32),
                copy.deepcopy(model).cpu(),
                copy.deepcopy(model).cpu().double(),
                unit_of_weights=0.0,  # fp32 weights; autocast rounds them inside each bf16 call (counted there)
            )
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        if autocast:
            assert out.logits.dtype == torch.bfloat16, "autocast did not reach the LM head"
            error = (out.loss.detach().double().cpu() - fp32_loss).abs()
            loss_errors.append((float(error), float(LAMBDA * spread.computation * (1 + 2.0**-16))))
        out.loss.backward()
        _assert_finite_gradients(model)
        if step == 0:
            first_gradients = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses, first_gradients, loss_errors


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc", "baseline"])
@pytest.mark.device
def test_bf16_autocast_training_stays_finite_and_close_to_fp32(variant, device):
    ids = random_tokens(4, 16, seed=1).to(device)
    fp32_model = tiny_model(variant).to(device)
    bf16_model = copy.deepcopy(fp32_model)
    _, fp32_grads, _ = _train(fp32_model, ids, steps=6, autocast=False)
    bf16_losses, bf16_grads, loss_errors = _train(bf16_model, ids, steps=6, autocast=True)

    assert all(torch.isfinite(torch.tensor(bf16_losses)))
    assert bf16_losses[-1] < bf16_losses[0] - 0.3, "bf16 training did not learn the fixed batch"
    # At every step, along the autocast run's own weights, its loss is within the loss's rounding bound of the fp32
    # loss at the same weights: every bf16 call's rounding of its fp32 inputs and of its result, every fp32 result.
    for step, (error, bound) in enumerate(loss_errors, start=1):
        assert error <= bound, f"step {step}: autocast loss off the fp32 loss by {error:.3e}, bound {bound:.3e}"
    # The first step's gradient points the same way (a direction check; its elements are not bounded here).
    flat_fp32 = torch.cat([g.flatten() for g in fp32_grads.values()])
    flat_bf16 = torch.cat([bf16_grads[n].flatten() for n in fp32_grads])
    assert torch.nn.functional.cosine_similarity(flat_fp32, flat_bf16, dim=0) > 0.99
    for parameter in bf16_model.parameters():
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter).all()


# --------------------------------------------------------------------------- bf16 weights
def assert_within(error: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Elementwise |error| <= bound, naming the worst element (in units of its bound) when not."""
    ratio = error / bound
    worst = int(ratio.argmax())
    assert float(ratio.max()) <= 1.0, (
        f"{what}: an element is off by {float(error.flatten()[worst]):.3e}, {float(ratio.max()):.2f} times its "
        f"bound {float(bound.flatten()[worst]):.3e}"
    )


@pytest.mark.parametrize("variant", ["ddl-tc", "ddl-scalar"])
@pytest.mark.device
def test_bf16_model_generates_with_cache_consistent_with_full_forward(variant, device):
    # Every weight off its initialization, so that gates, writes and filters all shape the logits.
    fp32_model = perturb(tiny_model(variant).eval(), 0.1, seed=1, filter_scale=0.3).to(device)
    model = copy.deepcopy(fp32_model).to(torch.bfloat16)
    prompt = random_tokens(2, 5, seed=1).to(device)
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        sequences = out.sequences
        full_output = model(input_ids=sequences[:, :-1], output_hidden_states=True)
        full, last_hidden = full_output.logits, full_output.hidden_states[-1]
        reference = fp32_model(input_ids=sequences[:, :-1]).logits
    assert sequences.shape == (2, 13) and sequences.min() >= 0 and sequences.max() < VOCAB
    step_logits = torch.stack(out.logits, dim=1)  # (B, 8, V), one per generated token (generate upcasts them)
    assert full.dtype == torch.bfloat16 and torch.isfinite(step_logits).all()
    torch.testing.assert_close(sequences[:, 5:], step_logits.argmax(-1), rtol=0, atol=0)
    # Whole-network bounds, per logit, from bf16's unit roundoff and the magnitudes on every path to that logit
    # (tests/rounding_bounds.py: lam * u * sqrt(sum c^2) over every rounding, lam = 6). The bf16 forward is within
    # the bound of the exact network with the fp32 weights (the fp32 reference's own rounding, at 2^-24, is
    # 2^-16 of it); cached decoding makes the same roundings per token, in another order, so it and the
    # uncached bf16 forward are each within the computation's bound of the exact bf16-weight network.
    spread = rounding_spread(
        lambda network, parameters: torch.func.functional_call(network, parameters, (sequences[:, :-1].cpu(),)).logits,
        copy.deepcopy(model).cpu(),
        copy.deepcopy(fp32_model).cpu().double(),
        unit_of_weights=UNIT_ROUNDOFF[torch.bfloat16],
    )
    to_reference = (full.double().cpu() - reference.double().cpu()).abs()
    assert_within(to_reference, LAMBDA * spread.total() * (1 + 2.0**-16), "bf16 forward against fp32")
    cached_to_full = (step_logits.double().cpu() - full[:, 4:].double().cpu()).abs()
    assert_within(cached_to_full, 2 * LAMBDA * spread.computation[:, 4:], "cached bf16 decoding against bf16 forward")
    # The LM head itself, element by element: logits = y E^T from the model's own bf16 final hidden state y (after
    # the final norm) and the tied embeddings E, summed in fp32 and rounded once to bf16. One rounding: each logit is
    # within 2^-8 (bf16's unit roundoff) of the same product on absolute values, |y| |E|^T, plus 2^-16 of it for
    # the fp32 sum (d = 32 terms of 2^-24): a relative check on every logit, the small ones included.
    embeddings = model.get_output_embeddings().weight.detach().double()
    exact = last_hidden.double() @ embeddings.t()
    magnitude = last_hidden.double().abs() @ embeddings.abs().t()
    in_roundings = (full.double() - exact).abs() / (2.0**-8 * magnitude)
    assert float(in_roundings.max()) <= 1.0 + 2.0**-8, f"a logit is off by {float(in_roundings.max()):.2f} roundings"


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddl-scalar", "ddl-cc"])
def test_torch_compile_forward_and_backward_match_eager(variant):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # One layer keeps the inductor compile short; every op of a block is still in the graph.
    eager = tiny_model(variant, num_hidden_layers=1).train()
    compiled_copy = copy.deepcopy(eager)
    ids = random_tokens(2, 12, seed=1)

    eager_out = eager(input_ids=ids, labels=ids)
    eager_out.loss.backward()
    compiled = torch.compile(compiled_copy)
    compiled_out = compiled(input_ids=ids, labels=ids)
    compiled_out.loss.backward()

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "torch.compile fell back to eager"
    torch.testing.assert_close(compiled_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)
    compiled_grads = dict(compiled_copy.named_parameters())
    for name, parameter in eager.named_parameters():
        torch.testing.assert_close(compiled_grads[name].grad, parameter.grad, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- numerics at the edges
def _identity_block_logits(model: DDLForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `model` if every block left the residual state unchanged: head(norm(readout(expand(embed))))."""
    backbone = model.model
    state = backbone.embed_tokens(ids)
    if backbone.embed_expansion is not None:
        state = backbone.embed_expansion(state)
    if backbone.readout is not None:
        state = backbone.readout(state)
    return model.lm_head(backbone.norm(state))


def _shortcuts(model: DDLForCausalLM):
    for layer in model.model.layers:
        yield layer.attn_shortcut
        yield layer.mlp_shortcut


def _scale_sublayer_outputs(model: DDLForCausalLM, scale: float) -> None:
    """Multiplies the attention and MLP output projections, hence each sublayer output h, by `scale`."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)


def _forward_backward(model: DDLForCausalLM, ids: torch.Tensor, inputs_scale: float | None = None):
    model.zero_grad()
    if inputs_scale is None:
        out = model(input_ids=ids, labels=ids)
    else:
        embeds = model.model.embed_tokens(ids) * inputs_scale
        out = model(inputs_embeds=embeds, labels=ids)
    assert torch.isfinite(out.logits).all(), "non-finite logits"
    assert torch.isfinite(out.loss), "non-finite loss"
    out.loss.backward()
    _assert_finite_gradients(model)
    return out.logits.detach()


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
EXPANDED_AND_SCALAR = ["ddl-tc", "ddl-cc", "ddl-scalar", "write-only-cc"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", EXPANDED_AND_SCALAR)
def test_zero_sublayer_output_leaves_the_state_unchanged_with_finite_gradients(variant, dtype):
    model = tiny_model(variant).to(dtype)
    _scale_sublayer_outputs(model, 0.0)
    ids = random_tokens(2, 10, seed=1)
    logits = _forward_backward(model, ids)
    with torch.no_grad():
        expected = _identity_block_logits(model, ids)
    # h = 0 gives k = 0: no write at all, whatever the gate and value.
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-20, 1e-30])
def test_tiny_sublayer_output_stays_finite(dtype, scale):
    model = tiny_model("ddl-tc").to(dtype)
    _scale_sublayer_outputs(model, scale)
    ids = random_tokens(2, 10, seed=1)
    logits = _forward_backward(model, ids)
    with torch.no_grad():
        expected = _identity_block_logits(model, ids)
    # |k| = |h| / sqrt(|h|^2 + k_eps^2) <= |h| / k_eps is tiny: the writes are far below the resolution of the logits.
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", EXPANDED_AND_SCALAR)
def test_gate_saturated_at_zero_leaves_the_state_unchanged(variant, dtype):
    model = tiny_model(variant).to(dtype)
    with torch.no_grad():
        for shortcut in _shortcuts(model):
            shortcut.beta_proj.bias.fill_(-1e4)
    ids = random_tokens(2, 10, seed=1)
    assert torch.equal(next(_shortcuts(model)).gate(torch.randn(3, 32, dtype=dtype)), torch.zeros(3, 1))
    logits = _forward_backward(model, ids)
    with torch.no_grad():
        expected = _identity_block_logits(model, ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", EXPANDED_AND_SCALAR)
def test_gate_saturated_at_two_stays_finite_and_reflects(variant, dtype):
    model = tiny_model(variant).to(dtype)
    with torch.no_grad():
        for shortcut in _shortcuts(model):
            shortcut.beta_proj.bias.fill_(1e4)
    shortcut = next(_shortcuts(model))
    assert torch.equal(shortcut.gate(torch.randn(3, 32, dtype=dtype)), torch.full((3, 1), 2.0))
    _forward_backward(model, random_tokens(2, 10, seed=1))

    if model.config.residual_mode == "delta":
        # beta = 2 is the Householder reflection: X' = (I - 2 k k^T) X + 2 k v^T, so with v = 0 the norm is kept.
        generator = torch.Generator().manual_seed(3)
        d, d_v = 32, model.config.value_channels
        state = torch.randn(5, d * d_v, generator=generator)
        h = torch.randn(5, d, generator=generator)
        with torch.no_grad():
            shortcut = shortcut.float()
            shortcut.value_proj.weight.zero_()
            shortcut.value_proj.bias.fill_(-1e4)  # sigmoid -> 0: v = 0
            out = shortcut(state, h, torch.randn(5, d, generator=generator), block_input=torch.randn(5, d))
        norms_in = state_matrix(state, d, d_v).norm(dim=-2)
        norms_out = state_matrix(out, d, d_v).norm(dim=-2)
        torch.testing.assert_close(norms_out, norms_in, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", EXPANDED_AND_SCALAR + ["baseline"])
def test_inputs_scaled_by_1e4_stay_finite(variant, dtype):
    model = tiny_model(variant).to(dtype)
    ids = random_tokens(2, 10, seed=1)
    logits = _forward_backward(model, ids, inputs_scale=1e4)
    # Every read goes through RMSNorm, so a huge embedding scale does not blow up the logits either.
    assert logits.float().abs().max() < 1e3
