"""The presets are the authors' models: a plain mirror of their formulas (`../shared/DDL-SPEC.md` section 7),
written from the facts in their own key names, against the model, logits and every gradient.

The mirror takes a state dict in the authors' naming (`to_reference_state_dict`), so that it reads like their
model: `transformer.h.{i}.attn.c_q`, `ddl_attn.beta`, `compress.read`, ... Per block, with X the (d, d_v) state
of each token:

    x_in = compress(X)                       the block's one compressor; X itself when d_v = 1
    c    = RMSNorm(x_in) * ln_1              eps 1e-5 in every norm
    q    = g_q * RMSNorm(RoPE(W_q c))        QK-norm after RoPE; k likewise; causal softmax attention
    h    = c_proj(attention)
    k    = h / sqrt(|h|^2 + 1e-10)
    beta = 2 sigmoid(W_b c + b_b),  v = 4 sigmoid(W_v x_in + b_v)
    X   <- X + beta k (v^T - k^T X)          write-only: X + beta k v^T;  baseline: x + h
    then the same with x_in = compress(X), ln_2 and the SwiGLU MLP c_proj(silu(c_fc1 c) * c_fc2 c)

and the readout: compress with `readout.*`, ln_f, then the tied head. CC convolves each feature's d_v values with
its own kernel (d, K), 'same' padded with (K - 1) // 2 on the left, then reads them with the shared r (d_v,);
TC convolves every one of the d * d_v channels causally over tokens, then reads with r; EC is a causal
depthwise convolution over tokens from each feature to its d_v channels.

Everything runs in float64, so the two agree to float rounding (1e-10), with every weight moved off its
initialization (the QK gains included, so that the QK-norm order matters).

The mirror is ours; the last tests check against the authors' code itself, through numbers it produced
(`tests/fixtures/authors/`, made by `scripts/make_authors_fixture.py`): `ddl convert-reference`'s converter of each of
their state dicts gives their logits (1e-5) and the gradient of every parameter, on every variant of their files,
their Triton file included (whose guard `--k_eps_form accelerated` selects).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import perturb, random_tokens, tiny_model
from ddl_hf.models.ddl.delta_layers import flat_state, state_matrix
from ddl_hf.models.ddl.delta_ops import unit_direction
from ddl_hf.reference_checkpoints import from_reference_state_dict, rename_to_reference, to_reference_state_dict

VARIANTS = ["baseline", "ddl-scalar", "ddl-cc", "ddl-tc", "ddl-cc-noec", "ddl-tc-noec", "write-only-cc"]
NORM_EPS, K_EPS, ROPE_THETA = 1e-5, 1e-5, 10000.0


# --------------------------------------------------------------------------- the authors' formulas
def rms_norm(x, gain):
    return gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS)


def rope(x):
    """Rotate (B, heads, T, head_dim) by position: the first and second halves of each head are the pairs."""
    half = x.shape[-1] // 2
    # The frequency table is float32 in every RoPE implementation, theirs and transformers' alike.
    frequencies = (1.0 / ROPE_THETA ** (torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half))).to(x.dtype)
    angles = torch.arange(x.shape[-2], dtype=x.dtype)[:, None] * frequencies
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def attention(w, p, c):
    batch, length, _ = c.shape
    head_dim = w[p + "attn.q_rms.weight"].shape[0]

    def heads(weight):
        return (c @ weight.T).view(batch, length, -1, head_dim).transpose(1, 2)

    q = rms_norm(rope(heads(w[p + "attn.c_q.weight"])), w[p + "attn.q_rms.weight"])
    k = rms_norm(rope(heads(w[p + "attn.c_k.weight"])), w[p + "attn.k_rms.weight"])
    v = heads(w[p + "attn.c_v.weight"])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(batch, length, -1) @ w[p + "attn.c_proj.weight"].T


def mlp(w, p, c):
    gate, up = c @ w[p + "mlp.c_fc1.weight"].T, c @ w[p + "mlp.c_fc2.weight"].T
    return (F.silu(gate) * up) @ w[p + "mlp.c_proj.weight"].T


def causal_filters(x, filters):
    """Depthwise causal filters over tokens. x (B, T, C), filters (C, K):
    out[t] = sum_u filters[:, u] x[t - K + 1 + u]."""
    taps = filters.shape[-1]
    padded = F.pad(x, (0, 0, taps - 1, 0))
    return sum(filters[:, u] * padded[:, u : u + x.shape[1]] for u in range(taps))


def compress(w, p, state):
    """(B, T, d, d_v) -> (B, T, d) with the compressor named `p` (`transformer.h.{i}.compress.` or `readout.`)."""
    read = w[p + "read"]
    if p + "weight" in w:  # CC: a 'same' convolution along the d_v values of each feature, then the shared read
        kernel = w[p + "weight"]
        taps, values = kernel.shape[1], state.shape[-1]
        left = (taps - 1) // 2
        padded = F.pad(state, (left, taps - 1 - left))
        mixed = sum(kernel[:, u, None] * padded[..., u : u + values] for u in range(taps))
    else:  # TC: causal filters over tokens on every one of the d * d_v channels, then the shared read
        batch, length, d, values = state.shape
        filtered = causal_filters(state.reshape(batch, length, d * values), w[p + "shortconv.weight"])
        mixed = filtered.view(batch, length, d, values)
    return mixed @ read


def delta_write(w, p, state, h, c, x_in, erase):
    k = h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + K_EPS**2)
    beta = 2 * torch.sigmoid(c @ w[p + "beta.weight"].T + w[p + "beta.bias"])
    v = 4 * torch.sigmoid(x_in @ w[p + "v_proj.weight"].T + w[p + "v_proj.bias"])
    read = torch.einsum("btd,btdv->btv", k, state)
    target = v - read if erase else v
    return state + beta[..., None] * k[..., None] * target[..., None, :]


def authors_logits(w, input_ids, mode, value_channels):
    """The logits (B, T, vocab) of the authors' model with weights `w` (their names), `mode` delta / write_only /
    additive."""
    embeddings = w["transformer.wte.weight"][input_ids]
    if "input_embed.conv.weight" in w:
        filters = w["input_embed.conv.weight"][:, 0]
        state = causal_filters(embeddings.repeat_interleave(value_channels, dim=-1), filters)
    else:
        state = embeddings.repeat_interleave(value_channels, dim=-1)
    state = state.unflatten(-1, (embeddings.shape[-1], value_channels))
    blocks = 1 + max(int(key.split(".")[2]) for key in w if key.startswith("transformer.h."))
    for index in range(blocks):
        p = f"transformer.h.{index}."
        for sublayer, norm, shortcut in ((attention, "ln_1", "ddl_attn"), (mlp, "ln_2", "ddl_mlp")):
            x_in = compress(w, p + "compress.", state) if value_channels > 1 else state[..., 0]
            c = rms_norm(x_in, w[p + norm + ".weight"])
            h = sublayer(w, p, c)
            if mode == "additive":
                state = state + h[..., None]
            else:
                state = delta_write(w, p + shortcut + ".", state, h, c, x_in, erase=mode == "delta")
    x = compress(w, "readout.", state) if value_channels > 1 else state[..., 0]
    return rms_norm(x, w["ln_f.weight"]) @ w["lm_head.weight"].T


# --------------------------------------------------------------------------- the tests
def authors_weights(model):
    """The model's weights under the authors' names, as leaves that collect the mirror's gradients; the tied head
    is the embedding tensor itself, as in their model."""
    weights = {
        name: tensor.detach().clone().requires_grad_()
        for name, tensor in rename_to_reference(model.state_dict()).items()
    }
    weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return weights


@pytest.mark.parametrize("use_fast_path", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_model_is_the_authors_formulas_for_logits_and_every_gradient(variant, use_fast_path):
    model = tiny_model(variant, use_fast_path=use_fast_path).double()
    perturb(model, 0.1, seed=1, filter_scale=0.3)
    config = model.config
    input_ids = random_tokens(2, 11, seed=2)
    probe = torch.randn(2, 11, config.vocab_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    logits = model(input_ids).logits
    (logits * probe).sum().backward()
    weights = authors_weights(model)
    expected = authors_logits(weights, input_ids, config.residual_mode, config.value_channels)
    (expected * probe).sum().backward()

    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    gradients = rename_to_reference({name: parameter.grad for name, parameter in model.named_parameters()})
    assert set(gradients) == set(weights) - {"lm_head.weight"}
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, weights[name].grad, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
    # The QK gains moved apart, so the order of QK-norm and RoPE shows in their gradients.
    gains = weights["transformer.h.0.attn.q_rms.weight"]
    assert gains.std() > 0.05 and gains.grad.abs().max() > 1e-4


def test_the_mirror_tells_the_qk_norm_order_apart():
    """The mirror is sharp: the same weights in a model that normalizes before RoPE give other logits."""
    model = perturb(tiny_model("ddl-cc", qk_norm_position="before_rope").double(), 0.1, seed=1, filter_scale=0.3)
    input_ids = random_tokens(2, 11, seed=2)
    with torch.no_grad():
        expected = authors_logits(authors_weights(model), input_ids, "delta", model.config.value_channels)
        assert (model(input_ids).logits - expected).abs().max() > 1e-2


def test_the_presets_export_as_the_authors_models():
    """Every preset but the write-only control (which their code lacks) has only fields of the authors' code."""
    for variant in VARIANTS:
        model = tiny_model(variant)
        if variant.startswith("write-only"):
            with pytest.raises(ValueError, match="residual_mode='write_only' cannot be exported"):
                to_reference_state_dict(model)
        else:
            assert set(to_reference_state_dict(model)) == set(rename_to_reference(model.state_dict()))


# --------------------------------------------------------------------------- the authors' own numbers
# Made by `scripts/make_authors_fixture.py` from their code itself (their files imported as they are, fp32, every
# weight moved off its initialization): per variant their state dict in their names, their logits and the
# gradient of their loss for every parameter. The tests below need none of their code.
AUTHORS_FIXTURE = Path(__file__).parent / "fixtures" / "authors" / "authors_models"
AUTHORS_META = json.loads(AUTHORS_FIXTURE.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def authors_numbers():
    return load_file(AUTHORS_FIXTURE.with_suffix(".safetensors"))


def _under(tensors, prefix):
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


def test_the_fixture_holds_every_variant_of_their_files():
    assert set(AUTHORS_META["variants"]) == {*VARIANTS[:-1], "ddl-cc-accelerated"}  # all but write-only (not theirs)
    assert AUTHORS_META["variants"]["ddl-cc-accelerated"]["file"] == "DDL-gpt-mha-rope-CC-EC-accelerated.py"


@pytest.mark.parametrize("use_fast_path", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("variant", sorted(AUTHORS_META["variants"]))
def test_converting_their_models_gives_their_logits_and_every_gradient(variant, use_fast_path, authors_numbers):
    meta = AUTHORS_META["variants"][variant]
    theirs = _under(authors_numbers, f"{meta['state']}/state/")
    model = from_reference_state_dict(theirs, k_eps_form=meta["k_eps_form"], use_fast_path=use_fast_path)
    assert model.config.variant_name == meta["ddl_hf_variant"]
    assert model.config.num_hidden_layers == AUTHORS_META["shape"]["num_hidden_layers"]
    input_ids, targets = authors_numbers["input_ids"], authors_numbers["targets"]

    model.train()  # as their loss was taken; dropout is 0
    logits = model(input_ids).logits
    expected = authors_numbers[f"{variant}/logits"]
    assert logits.shape == expected.shape and (logits - expected).abs().max() <= 1e-5
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

    gradients = rename_to_reference({name: parameter.grad for name, parameter in model.named_parameters()})
    expected = _under(authors_numbers, f"{variant}/grad/")
    # Every parameter of theirs is one of ours, one to one (the tied head is the embedding in both).
    assert set(gradients) == set(expected)
    for name, gradient in gradients.items():
        scale = expected[name].abs().max()
        assert scale > 0, f"their gradient of {name} is zero: the fixture would not test it"
        # fp32 on both sides, summed in other orders: within 1e-4 of the tensor's largest entry, plus 1e-7 for the
        # cancellation in small sums like a gate bias's (seen: <= 4.5e-5 of the largest entry, <= 6e-7 in all).
        assert (gradient - expected[name]).abs().max() <= 1e-4 * scale + 1e-7, f"gradient of {name}"
    # The QK gains were moved apart, so the QK-norm order shows in the logits and in these gradients.
    assert theirs["transformer.h.0.attn.q_rms.weight"].std() > 0.1


def test_the_fixture_is_sharp_for_the_qk_norm_order_and_the_norm_eps(authors_numbers):
    """ddl_hf's earlier forms would miss their logits by far more than the 1e-5 above."""
    theirs = _under(authors_numbers, "ddl-cc/state/")
    expected = authors_numbers["ddl-cc/logits"]
    for overrides in ({"qk_norm_position": "before_rope"}, {"rms_norm_eps": 1e-6}):
        with torch.no_grad():
            logits = from_reference_state_dict(theirs, **overrides)(authors_numbers["input_ids"]).logits
        assert (logits - expected).abs().max() > 1e-3, overrides


def test_the_k_eps_forms_are_their_plain_and_accelerated_files_on_a_probe(authors_numbers):
    """Both of their CC-EC files save the same keys. Their plain file guards k = h / sqrt(|h|^2 + k_eps^2), their
    Triton file h / sqrt(|h|^2 + d k_eps^2): on a sublayer output with |h| ~ k_eps (the probe) the two differ by
    ~1, and `k_eps_form` picks which one the converted model is."""
    theirs = _under(authors_numbers, "ddl-cc/state/")
    probe = _under(authors_numbers, "probe/")
    hidden_size, value_channels = probe["state"].shape[-2:]
    h = probe["h"]
    plain, accelerated = authors_numbers["ddl-cc/probe_output"], authors_numbers["ddl-cc-accelerated/probe_output"]
    assert (plain - accelerated).abs().max() > 0.1
    for form, expected, guard in (
        ("plain", plain, 1e-5),
        ("accelerated", accelerated, math.sqrt(hidden_size) * 1e-5),
    ):
        model = from_reference_state_dict(theirs, **({} if form == "plain" else {"k_eps_form": form}))
        assert model.config.k_eps == pytest.approx(guard, rel=1e-12)
        shortcut = model.model.layers[0].attn_shortcut
        with torch.no_grad():
            new_state = shortcut(flat_state(probe["state"]), h, probe["context"], block_input=probe["block_input"])
        new_state = state_matrix(new_state, hidden_size, value_channels)
        torch.testing.assert_close(new_state, expected, rtol=0, atol=1e-5, msg=form)
        # The direction itself, on the probe's h: the file's formula, h / sqrt(|h|^2 + eps^2) with eps^2 = k_eps^2
        # (plain) or d k_eps^2 (accelerated), k_eps = 1e-5; far from a unit vector at this |h|.
        eps_squared = (hidden_size if form == "accelerated" else 1) * 1e-10
        k = h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + eps_squared)
        torch.testing.assert_close(unit_direction(h, model.config.k_eps), k, rtol=1e-6, atol=0, msg=form)
        assert k.norm(dim=-1).sub(1).abs().min() > 0.05
