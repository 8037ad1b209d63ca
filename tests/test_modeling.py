"""DDLForCausalLM on every preset variant (tiny size): forward, loss, backward, cached generation,
padding, save/load, initialization, and agreement with independent implementations."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
)

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import PRESET_VARIANTS, DDLConfig, DDLForCausalLM, DDLModel

VARIANTS = list(PRESET_VARIANTS)
VOCAB = DDLConfig.from_preset("tiny", "baseline").vocab_size
PAD = 0  # prompts below use tokens 1..VOCAB-1, so 0 only ever appears as padding


def make_model(variant: str, **overrides) -> DDLForCausalLM:
    """Every weight moved off its initialization so that every path matters: identity token filters
    would hide a broken convolution cache, a uniform compressor would hide a wrong channel order."""
    return perturb(tiny_model(variant, **overrides), 0.05, seed=1, filter_scale=0.3).eval()


# --------------------------------------------------------------------------- forward, loss, backward
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_loss(variant):
    model = make_model(variant)
    ids = random_tokens(3, 10, seed=3, low=1)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, 10, VOCAB) and out.logits.dtype == torch.float32
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, shifted, atol=1e-6, rtol=1e-6)
    hidden = model.model(ids).last_hidden_state
    assert hidden.shape == (3, 10, model.config.hidden_size)
    torch.testing.assert_close(out.logits, hidden @ model.lm_head.weight.T, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_reaches_every_parameter(variant):
    model = make_model(variant).train()
    ids = random_tokens(2, 9, seed=3, low=1)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_loss_ignores_minus_100_and_supports_gradient_accumulation():
    model = make_model("ddl-cc")
    ids = random_tokens(2, 8, seed=3, low=1)
    labels = ids.clone()
    labels[:, 5:] = -100
    changed = labels.clone()
    changed[0, 0] = 7  # position 0 is never a target (no token predicts it)
    loss = model(ids, labels=labels).loss
    assert torch.equal(model(ids, labels=changed).loss, loss)
    logits = model(ids).logits
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="none")
    targets = int((labels[:, 1:] != -100).sum())
    assert targets == 8
    torch.testing.assert_close(loss, per_token.sum() / targets, atol=1e-6, rtol=1e-6)
    # gradient accumulation divides by the number of targets of the whole accumulated batch
    accumulated = model(ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss
    torch.testing.assert_close(accumulated, per_token.sum() / 20, atol=1e-6, rtol=1e-6)


def test_logits_to_keep():
    model = make_model("ddl-tc")
    ids = random_tokens(2, 9, seed=3, low=1)
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6, rtol=0)
    assert model(ids, logits_to_keep=3).logits.shape == (2, 3, VOCAB)
    assert torch.equal(model(ids, logits_to_keep=0).logits, full)
    indices = torch.tensor([0, 4, 8])
    torch.testing.assert_close(model(ids, logits_to_keep=indices).logits, full[:, indices], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["ddl-scalar", "ddl-tc"])
def test_output_residual_states_as_documented(variant):
    """`output_residual_states=True`: entry 0 the initial (expanded) state, entry i the state after block i,
    all (B, T, d * d_v); the full states that `output_hidden_states` returned before it became width d.
    (The width-d hidden states are tested in test_hidden_states.py.)"""
    model = make_model(variant)
    config = model.config
    ids = random_tokens(2, 6, seed=3, low=1)
    block_outputs = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: block_outputs.append(output))
        for layer in model.model.layers
    ]
    out = model(ids, output_residual_states=True)
    for hook in hooks:
        hook.remove()
    assert out.hidden_states is None
    states = out.residual_states
    width = config.hidden_size * config.value_channels
    assert len(states) == config.num_hidden_layers + 1
    assert [tuple(s.shape) for s in states] == [(2, 6, width)] * (config.num_hidden_layers + 1)
    embeddings = model.model.embed_tokens(ids)
    initial = model.model.embed_expansion(embeddings) if config.is_expanded else embeddings
    assert torch.equal(states[0], initial)
    for i in range(1, config.num_hidden_layers + 1):
        assert torch.equal(states[i], block_outputs[i - 1])
    assert torch.equal(model.model(ids, output_residual_states=True).residual_states[-1], states[-1])


# --------------------------------------------------------------------------- cached generation
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_matches_full_forward(variant):
    """Prefill, then single-token and multi-token steps through one cache, against one full forward."""
    model = make_model(variant)
    ids = random_tokens(2, 15, seed=3, low=1)
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    start, max_diff = 0, 0.0
    for step in (5, 1, 1, 2, 1, 3, 1, 1):
        out = model(ids[:, start : start + step], cache=cache, use_cache=True)
        assert out.cache is cache
        max_diff = max(max_diff, (out.logits - full[:, start : start + step]).abs().max().item())
        start += step
    assert start == ids.shape[1] and cache.get_seq_length() == start
    print(f"\n[cached vs full, teacher forced] {variant}: max abs logit difference {max_diff:.3e}")
    assert max_diff <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_with_cache_matches_full_forwards(variant):
    model = make_model(variant)
    prompt = random_tokens(2, 5, seed=3, low=1)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequences = out.sequences
    assert sequences.shape == (2, 13)
    full = model(sequences).logits[:, 4:-1]  # the logits that chose each new token
    step_logits = torch.stack(out.logits, dim=1)
    max_diff = (step_logits - full).abs().max().item()
    print(f"\n[cached vs full, generate] {variant}: max abs logit difference {max_diff:.3e}")
    assert max_diff <= 1e-4
    assert torch.equal(sequences[:, 5:], full.argmax(-1))
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(uncached, sequences)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_with_a_fixed_seed_matches_without_cache(variant):
    model = make_model(variant)
    prompt = random_tokens(2, 4, seed=3, low=1)
    samples = {}
    for use_cache in (True, False):
        torch.manual_seed(11)
        samples[use_cache] = model.generate(
            prompt, max_new_tokens=8, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, use_cache=use_cache
        )
    assert torch.equal(samples[True], samples[False])
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert not torch.equal(samples[True], greedy)  # sampling really sampled


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_with_cache_matches_without_and_scores_match_full_forward(variant):
    model = make_model(variant)
    prompt = random_tokens(2, 4, seed=3, low=1)
    options = dict(
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        length_penalty=0.0,  # score = sum of the token log-probabilities
        output_scores=True,
        return_dict_in_generate=True,
    )
    cached = model.generate(prompt, use_cache=True, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)
    log_probs = model(cached.sequences).logits[:, 3:-1].log_softmax(-1)
    rescored = log_probs.gather(-1, cached.sequences[:, 4:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(cached.sequences_scores, rescored, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_gives_each_row_what_it_gives_alone(variant):
    model = make_model(variant)
    long_prompt, short_prompt = random_tokens(1, 7, seed=4, low=1), random_tokens(1, 3, seed=5, low=1)
    batch = torch.cat([long_prompt, F.pad(short_prompt, (4, 0), value=PAD)])
    attention_mask = (torch.arange(7) >= torch.tensor([[0], [4]])).long()
    padded_logits = model(batch, attention_mask=attention_mask).logits
    torch.testing.assert_close(padded_logits[0], model(long_prompt).logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_logits[1, 4:], model(short_prompt).logits[0], atol=1e-5, rtol=0)
    generated = model.generate(
        batch, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD
    )
    alone_long = model.generate(long_prompt, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    alone_short = model.generate(short_prompt, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(generated[0, 7:], alone_long[0, 7:])
    assert torch.equal(generated[1, 7:], alone_short[0, 3:])
    # a static cache makes `generate` prebuild the masks per layer type (a dict); same tokens
    static = model.generate(
        batch,
        attention_mask=attention_mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=PAD,
        cache_implementation="static",
    )
    assert torch.equal(static, generated)


def test_past_key_values_keyword_still_feeds_the_cache():
    """v4 callers pass `past_key_values=`; it must reach the cache, not be silently dropped."""
    model = make_model("ddl-tc")
    ids = random_tokens(1, 7, seed=3, low=1)
    cache = DynamicCache(config=model.config)
    with pytest.warns(FutureWarning, match="past_key_values"):
        model(ids[:, :5], past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 5
        last = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(last, model(ids).logits[:, 5:], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- saving and loading
def relative_imports(source: Path) -> set[str]:
    """Module names imported as `from .name import ...` by a Python file."""
    tree = ast.parse(source.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def config_fields(config: DDLConfig) -> dict:
    """Everything a config holds; `to_dict()` leaves out where it was loaded from."""
    fields = config.to_dict()
    assert "_name_or_path" not in fields
    return fields


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_reload_is_bit_exact_with_remote_code_files(variant, tmp_path):
    model = make_model(variant)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "ddl"
    assert config_json["auto_map"] == {
        "AutoConfig": "configuration_ddl.DDLConfig",
        "AutoModel": "modeling_ddl.DDLModel",
        "AutoModelForCausalLM": "modeling_ddl.DDLForCausalLM",
    }
    for name in ("configuration_ddl.py", "modeling_ddl.py", "delta_layers.py", "delta_ops.py", "model_card.py"):
        assert (tmp_path / name).is_file(), name
    for source in tmp_path.glob("*.py"):  # every sibling the copied code imports travels with it
        for module in relative_imports(source):
            assert (tmp_path / f"{module}.py").is_file(), f"{source.name} imports .{module}, which was not saved"

    ids = random_tokens(2, 8, seed=3, low=1)
    expected = model(ids).logits
    for loader in (DDLForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        reloaded = loader(tmp_path).eval()
        assert type(reloaded) is DDLForCausalLM
        assert config_fields(reloaded.config) == config_fields(model.config)
        reloaded_state = reloaded.state_dict()
        assert reloaded_state.keys() == model.state_dict().keys()
        assert all(torch.equal(reloaded_state[key], value) for key, value in model.state_dict().items())
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
        assert torch.equal(reloaded(ids).logits, expected)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert type(backbone) is DDLModel
    assert torch.equal(backbone(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_auto_classes_build_from_a_config_of_model_type_ddl():
    config = AutoConfig.for_model("ddl", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    assert type(config) is DDLConfig
    assert (config.hidden_size, config.value_channels, config.residual_mode) == (16, 4, "delta")
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is DDLForCausalLM
    assert model.config.to_dict() == config.to_dict()
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    assert type(AutoModel.from_config(config)) is DDLModel


@pytest.mark.parametrize("init_scheme", ["authors", "neutral"])
def test_meta_device_construction_then_loading_gives_the_same_model(init_scheme):
    config = DDLConfig.from_preset("tiny", "ddl-tc", beta_init=0.5, init_scheme=init_scheme)
    reference = make_model("ddl-tc", beta_init=0.5, init_scheme=init_scheme)
    fresh = DDLForCausalLM(config)
    with torch.device("meta"):
        model = DDLForCausalLM(config)
    assert model.model.rotary_emb.inv_freq.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    # initialization on the meta route is the real one: rotary tables, gate bias, compressors, filters, tying
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, buffer in fresh.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    # What the init fixes (no random draw): under the authors' scheme the TC filters and value biases are drawn.
    deterministic = ("beta_proj.bias", "read_vector", "embed_expansion.conv_weight", "norm.weight")
    if init_scheme == "neutral":
        deterministic += ("value_proj.bias", "conv_weight")
    for name, param in fresh.named_parameters():
        if name.endswith(deterministic):
            assert torch.equal(dict(model.named_parameters())[name], param), name
    model.load_state_dict(reference.state_dict())
    model.eval()
    ids = random_tokens(2, 7, seed=3, low=1)
    assert torch.equal(model(ids).logits, reference(ids).logits)


# --------------------------------------------------------------------------- initialization
def test_neutral_init_weights_follow_the_spec():
    """Spec section 4 on a mid-size model (d = 256, L = 4) with `init_scheme="neutral"` and free compressors:
    N(0, 0.02) embeddings; N(0, 0.5/sqrt(d)/sqrt(L)) output projections; N(0, 0.5/sqrt(d)) every other
    matrix; gate bias logit(beta_init/2); compressor read weights 1/d_v; EC and TC filters the identity;
    tied embeddings share storage."""
    config = DDLConfig.from_preset("mini", "ddl-tc", beta_init=0.5, init_scheme="neutral", compressor_form="free")
    torch.manual_seed(0)
    model = DDLForCausalLM(config)
    d, layers, d_v = config.hidden_size, config.num_hidden_layers, config.value_channels
    std, output_std = 0.5 / math.sqrt(d), 0.5 / math.sqrt(d) / math.sqrt(layers)
    identity_filter = torch.zeros(d * d_v, 1, config.state_conv_size)
    identity_filter[..., -1] = 1.0
    checked = set()

    def expect_std(name, value, tolerance):
        weight = dict(model.named_parameters())[name]
        assert abs(weight.mean().item()) < 3 * value / math.sqrt(weight.numel()), name
        assert weight.std().item() == pytest.approx(value, rel=tolerance), name
        checked.add(name)

    expect_std("model.embed_tokens.weight", config.initializer_range, 0.02)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            expect_std(f"{prefix}{name}.weight", std, 0.03)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            expect_std(f"{prefix}{name}.weight", output_std, 0.03)
        for shortcut in ("attn_shortcut", "mlp_shortcut"):
            expect_std(f"{prefix}{shortcut}.beta_proj.weight", std, 0.25)
            expect_std(f"{prefix}{shortcut}.value_proj.weight", std, 0.15)
    for name, param in model.named_parameters():
        if name.endswith("beta_proj.bias"):
            assert param.item() == pytest.approx(math.log(0.25 / 0.75), abs=1e-6), name
        elif name.endswith("value_proj.bias"):
            assert torch.equal(param, torch.zeros(d_v)), name
        elif name.endswith("read_weight"):
            assert torch.equal(param, torch.full((d, d_v), 1.0 / d_v)), name
        elif name.endswith("conv_weight"):
            assert torch.equal(param, identity_filter), name
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert name in checked, f"{name} has no expected initialization"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gate = model.model.layers[0].attn_shortcut.gate(torch.zeros(1, d))
    torch.testing.assert_close(gate, torch.full((1, 1), 0.5), atol=1e-6, rtol=0)

    untied = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc", tie_word_embeddings=False, hidden_size=128))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("compressor", ["token", "channel"])
def test_authors_init_draws_compressor_kernels_and_filters_and_keeps_ec_the_identity(compressor):
    """Spec section 7: every matrix N(0, 0.5/sqrt(d)), the CC kernel and the TC filters included; read vectors
    1/d_v; EC filters the identity; value biases U(-1/sqrt(d), 1/sqrt(d)); gate bias clamp 1e-6."""
    variant = "ddl-tc" if compressor == "token" else "ddl-cc"
    torch.manual_seed(0)
    model = DDLForCausalLM(DDLConfig.from_preset("mini", variant, beta_init=2.0))
    config = model.config
    d, d_v = config.hidden_size, config.value_channels
    std = 0.5 / math.sqrt(d)
    parameters = dict(model.named_parameters())
    identity = torch.zeros(d * d_v, 1, config.embed_conv_size)
    identity[..., -1] = 1.0
    assert torch.equal(parameters["model.embed_expansion.conv_weight"], identity)
    random_names = [
        name
        for name in parameters
        if name.endswith(("compressor.conv_weight", "readout.conv_weight", "channel_kernel"))
    ]
    assert len(random_names) == config.num_hidden_layers + 1
    for name in random_names:
        assert parameters[name].std().item() == pytest.approx(std, rel=0.1), name
    for name, param in parameters.items():
        if name.endswith("read_vector"):
            assert torch.equal(param, torch.full((d_v,), 1.0 / d_v)), name
        elif name.endswith("value_proj.bias"):
            assert bool(param.abs().max() <= 1 / math.sqrt(d)) and bool(param.abs().min() > 0), name
        elif name.endswith("beta_proj.bias"):
            assert param.item() == pytest.approx(math.log((1 - 1e-6) / 1e-6), rel=1e-6), name


def test_identity_filters_make_ec_equal_repetition_at_init():
    torch.manual_seed(0)
    with_conv = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc")).eval()
    torch.manual_seed(0)
    with_repeat = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc-noec")).eval()
    with_repeat.load_state_dict(with_conv.state_dict(), strict=False)
    ids = random_tokens(2, 6, seed=3, low=1)
    assert torch.equal(with_conv(ids).logits, with_repeat(ids).logits)


# --------------------------------------------------------------------------- training-time equivalences
@pytest.mark.parametrize("variant", ["ddl-tc", "write-only-cc"])
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    ids = random_tokens(2, 9, seed=3, low=1)
    gradients = []
    for checkpointing in (False, True):
        model = make_model(variant).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        gradients.append({name: param.grad for name, param in model.named_parameters()})
    plain, checkpointed = gradients
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["baseline", "ddl-tc", "ddl-cc-noec"])
def test_sdpa_and_eager_attention_agree(variant):
    model = make_model(variant)
    ids = random_tokens(2, 8, seed=3, low=1)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0
    assert model.config._attn_implementation == "sdpa"
    sdpa = [model(ids).logits, model(ids, attention_mask=attention_mask).logits]
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = [model(ids).logits, model(ids, attention_mask=attention_mask).logits]
    torch.testing.assert_close(eager[0], sdpa[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(eager[1][0], sdpa[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(eager[1][1, 3:], sdpa[1][1, 3:], atol=1e-5, rtol=0)


def test_baseline_without_qk_norm_equals_transformers_llama():
    model = make_model("baseline", use_qk_norm=False)
    config = model.config
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        hidden_act=config.hidden_act,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
    )
    llama = LlamaForCausalLM(llama_config).eval()
    # The parameter names coincide with Llama's by design; the mapping is the identity.
    state = model.state_dict()
    assert state.keys() == llama.state_dict().keys()
    llama.load_state_dict(state, strict=True)
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    ids = random_tokens(2, 12, seed=3, low=1)
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-6, rtol=0)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :4] = 0
    torch.testing.assert_close(
        model(ids, attention_mask=attention_mask).logits[:, 4:],
        llama(ids, attention_mask=attention_mask).logits[:, 4:],
        atol=1e-6,
        rtol=0,
    )
    prompt = random_tokens(2, 4, seed=3, low=1)
    assert torch.equal(
        model.generate(prompt, max_new_tokens=6, do_sample=False),
        llama.generate(prompt, max_new_tokens=6, do_sample=False),
    )
