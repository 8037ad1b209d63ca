"""`output_hidden_states` returns width-d tensors, as in every transformers model: entry i (i < L) is the
read of the state that block i takes (its compressor's read; the state itself when d_v = 1), the last
entry is `last_hidden_state`. `output_residual_states` keeps the full (d, d_v) states available."""

import pytest
import torch
from transformers import DynamicCache

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import PRESET_VARIANTS, DDLModel, state_matrix

VARIANTS = list(PRESET_VARIANTS)


def make_model(variant: str):
    # Token filters and compressor reads off their identity/uniform init, so that a wrong read shows.
    return perturb(tiny_model(variant), 0.05, seed=1, filter_scale=0.3).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_are_the_width_d_reads_the_blocks_take(variant):
    model = make_model(variant)
    config, backbone = model.config, model.model
    d, d_v, layers = config.hidden_size, config.value_channels, config.num_hidden_layers
    ids = random_tokens(2, 7, seed=3, low=1)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_residual_states=True)
        hidden, residual = out.hidden_states, out.residual_states
        assert len(hidden) == layers + 1 == config.num_hidden_states
        assert [tuple(h.shape) for h in hidden] == [(2, 7, d)] * (layers + 1)
        assert [tuple(r.shape) for r in residual] == [(2, 7, d * d_v)] * (layers + 1)
        for i, layer in enumerate(backbone.layers):
            if d_v == 1:
                # Nothing changes for the vector stream: the state entering block i.
                assert torch.equal(hidden[i], residual[i])
            else:
                assert torch.equal(hidden[i], layer.compressor(residual[i]))
                if config.state_compressor == "channel":
                    by_hand = (state_matrix(residual[i], d, d_v) * layer.compressor.read_matrix()).sum(-1)
                    torch.testing.assert_close(hidden[i], by_hand, atol=1e-6, rtol=1e-6)
        if d_v == 1:
            assert torch.equal(hidden[0], backbone.embed_tokens(ids))
        readout = residual[-1] if backbone.readout is None else backbone.readout(residual[-1])
        last = backbone(ids).last_hidden_state
        assert torch.equal(hidden[-1], last) and torch.equal(hidden[-1], backbone.norm(readout))
        torch.testing.assert_close(out.logits, model.lm_head(hidden[-1]), atol=0, rtol=0)
        # Any entry can go through the final norm and the LM head ("logit lens").
        for state in hidden:
            lens = model.lm_head(backbone.norm(state))
            assert lens.shape == (2, 7, config.vocab_size) and torch.isfinite(lens).all()
        # The backbone alone returns the same tensors.
        base = backbone(ids, output_hidden_states=True)
        assert all(torch.equal(a, b) for a, b in zip(base.hidden_states, hidden, strict=True))
        assert base.residual_states is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_while_decoding_match_the_full_forward_and_leave_the_cache_alone(variant):
    """During cached decoding the entries cover the new tokens; they are the reads the blocks take (the
    token compressor reads through its cached window), so they equal the full forward's at those
    positions, and asking for them changes nothing in the cache: the next logits are bit for bit equal."""
    model = make_model(variant)
    ids = random_tokens(2, 11, seed=5, low=1)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        watched, plain = DynamicCache(config=model.config), DynamicCache(config=model.config)
        start, max_diff = 0, 0.0
        for step in (4, 1, 2, 1, 3):
            chunk = ids[:, start : start + step]
            out = model(chunk, cache=watched, use_cache=True, output_hidden_states=True)
            reference = model(chunk, cache=plain, use_cache=True)
            assert torch.equal(out.logits, reference.logits)
            assert len(out.hidden_states) == model.config.num_hidden_layers + 1
            for got, expected in zip(out.hidden_states, full, strict=True):
                assert got.shape == (2, step, model.config.hidden_size)
                max_diff = max(max_diff, (got - expected[:, start : start + step]).abs().max().item())
            start += step
    assert max_diff <= 1e-5, max_diff


def test_hidden_states_selected_by_index():
    """`output_hidden_states` as an index or list of indices (negative ones count from the end) keeps only those."""
    model = make_model("ddl-tc")
    layers = model.config.num_hidden_layers
    ids = random_tokens(2, 6, seed=3, low=1)
    with torch.no_grad():
        every = model(ids, output_hidden_states=True).hidden_states
        chosen = model(ids, output_hidden_states=[0, -2]).hidden_states
        last_only = model(ids, output_hidden_states=-1).hidden_states
    assert len(chosen) == len(last_only) == layers + 1
    assert [i for i, h in enumerate(chosen) if h is not None] == [0, layers - 1]
    assert torch.equal(chosen[0], every[0]) and torch.equal(chosen[-2], every[-2])
    assert [i for i, h in enumerate(last_only) if h is not None] == [layers]
    assert torch.equal(last_only[-1], every[-1])


def test_generate_returns_width_d_hidden_states():
    model = make_model("ddl-tc")
    ids = random_tokens(2, 5, seed=3, low=1)
    out = model.generate(
        ids, max_new_tokens=3, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
    )
    assert len(out.hidden_states) == 3
    lengths = [5, 1, 1]
    for step, length in zip(out.hidden_states, lengths, strict=True):
        assert [tuple(h.shape) for h in step] == [(2, length, model.config.hidden_size)] * 3


def test_residual_states_of_the_backbone():
    torch.manual_seed(0)
    backbone = DDLModel(tiny_model("ddl-cc").config).eval()
    ids = random_tokens(1, 4, seed=3)
    out = backbone(ids, output_residual_states=True)
    assert type(out).__name__ == "DDLModelOutputWithPast" and out.hidden_states is None
    assert [tuple(r.shape) for r in out.residual_states] == [(1, 4, 32 * 4)] * 3
