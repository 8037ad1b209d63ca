"""Every attention backend the model declares, tested where it runs.

`DDLPreTrainedModel` declares eager, sdpa, flex_attention and flash-attention, as Llama does. On this CPU:
eager and sdpa run forward, backward and cached generation; flex_attention runs the forward (torch 2.13 has
no CPU backward for it, and its CPU decoding kernel fails to compile for transformers' own Llama too);
flash-attention needs CUDA. The "Attention backends" table of docs/model.md says the same.
"""

import pytest
import torch

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import PRESET_VARIANTS

VARIANTS = list(PRESET_VARIANTS)


def padded_batch(seed: int):
    """(2, 9) ids and a left-padded mask: row 0 has three padded positions, row 1 none."""
    ids = random_tokens(2, 9, seed=seed, low=1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def model_with(variant: str, attn_implementation: str):
    model = perturb(tiny_model(variant, attn_implementation=attn_implementation), 0.02, seed=1, filter_scale=0.2)
    assert model.config._attn_implementation == attn_implementation
    return model


def loss_logits_and_gradients(model, ids, mask):
    model.zero_grad()
    # A label counts only where the position before it is real too: a padded position's output (which
    # predicts the first real token) attends to nothing, and the backends fill such rows differently.
    labels = ids.masked_fill((mask == 0) | (mask.roll(1, dims=1) == 0), -100)
    output = model(ids, attention_mask=mask, labels=labels)
    output.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    return output.loss.detach(), output.logits.detach(), gradients


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_gives_the_eager_loss_logits_and_gradients_on_a_padded_batch(variant):
    ids, mask = padded_batch(seed=2)
    eager = loss_logits_and_gradients(model_with(variant, "eager"), ids, mask)
    sdpa = loss_logits_and_gradients(model_with(variant, "sdpa"), ids, mask)
    torch.testing.assert_close(sdpa[0], eager[0], rtol=1e-5, atol=1e-6)
    kept = mask.bool()  # padded positions attend to nothing real; their logits are not compared
    torch.testing.assert_close(sdpa[1][kept], eager[1][kept], rtol=1e-5, atol=1e-5)
    assert sdpa[2].keys() == eager[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(sdpa[2][name], eager[2][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_gives_the_same_tokens_and_scores_under_eager_and_sdpa(variant):
    ids, mask = padded_batch(seed=3)
    runs = {}
    for backend in ("eager", "sdpa"):
        model = model_with(variant, backend).eval()
        runs[backend] = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert torch.equal(runs["sdpa"].sequences, runs["eager"].sequences)
    for sdpa_scores, eager_scores in zip(runs["sdpa"].scores, runs["eager"].scores, strict=True):
        torch.testing.assert_close(sdpa_scores, eager_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["baseline", "ddl-cc", "ddl-tc"])
def test_eager_attention_weights_are_causal_ignore_padding_and_sum_to_one(variant):
    ids, mask = padded_batch(seed=4)
    model = model_with(variant, "eager").eval()
    with torch.no_grad():
        attentions = model(ids, attention_mask=mask, output_attentions=True).attentions
    config = model.config
    assert len(attentions) == config.num_hidden_layers
    length = ids.shape[1]
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    for weights in attentions:
        assert weights.shape == (2, config.num_attention_heads, length, length)
        # Real queries only: a padded query (row 0, positions 0-2) has no key to attend to.
        assert torch.all(weights[1][:, future] == 0) and torch.all(weights[0, :, 3:][:, future[3:]] == 0)
        assert torch.all(weights[0, :, 3:, :3] == 0)  # no real query of row 0 attends to a padded key
        torch.testing.assert_close(weights[0, :, 3:].sum(-1), torch.ones(config.num_attention_heads, length - 3))
        torch.testing.assert_close(weights[1].sum(-1), torch.ones(config.num_attention_heads, length))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_flex_attention_gives_the_eager_logits_on_a_padded_batch(variant):
    ids, mask = padded_batch(seed=5)
    logits = {}
    for backend in ("eager", "flex_attention"):
        model = model_with(variant, backend).eval()
        with torch.no_grad():
            logits[backend] = model(ids, attention_mask=mask).logits
    kept = mask.bool()
    torch.testing.assert_close(logits["flex_attention"][kept], logits["eager"][kept], rtol=1e-5, atol=1e-5)
