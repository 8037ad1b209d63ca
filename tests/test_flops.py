"""The analytic FLOPs count against a hand count and against torch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ddl_hf import DDLConfig, DDLForCausalLM, DeltaShortcut, EmbedExpansion, StateCompressor
from ddl_hf.flops import forward_flops_breakdown, forward_flops_per_token, training_flops_per_token
from ddl_hf.models.ddl.delta_ops import reference_paths
from ddl_hf.models.ddl.modeling_ddl import DDLMLP, DDLAttention

SEQ_LEN = 8


def test_hand_count_tiny_ddl_cc():
    # tiny: V=96, d=32, L=2, heads=2, head_dim=16, SwiGLU width floor(8*32/3)=85; ddl-cc: d_v=4, EC kernel 4.
    config = DDLConfig.from_preset("tiny", "ddl-cc")
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (96, 32, 2)
    assert (config.num_attention_heads, config.head_dim, config.intermediate_size) == (2, 16, 85)
    assert (config.value_channels, config.embed_conv_size) == (4, 4)

    # Every multiply-add counts 2. Per layer: q, k, v, o are 32x32 matmuls.
    attention_projections = 2 * 4 * (2 * 32 * 32)  # 16384
    # A token at position t attends to t keys: mean (8 + 1) / 2 = 4.5 keys; scores and values, 2 heads of 16.
    attention_scores_values = 2 * (2 * 2 * 2 * 16 * 4.5)  # 1152
    mlp = 2 * 3 * (2 * 32 * 85)  # 32640
    lm_head = 2 * 32 * 96  # 6144
    # Two shortcuts per layer, four in all.
    shortcut_gates = 4 * (2 * 32)  # 256
    shortcut_values = 4 * (2 * 32 * 4)  # 1024
    rank1_update = 4 * (2 * 32 * 4 + 2 * 32 * 4)  # read k^T X and write k t^T: 2048
    compressors = (2 * 2 + 1) * (2 * 32 * 4)  # two reads per block plus the readout: 1280
    embed_expansion = 2 * 32 * 4 * 4  # 128 output channels, 4 taps each: 1024

    expected = {
        "attention_projections": attention_projections,
        "attention_scores_values": attention_scores_values,
        "mlp": mlp,
        "lm_head": lm_head,
        "shortcut_gates": shortcut_gates,
        "shortcut_values": shortcut_values,
        "rank1_update": rank1_update,
        "compressors": compressors,
        "embed_expansion": embed_expansion,
    }
    assert forward_flops_breakdown(config, SEQ_LEN) == expected
    assert forward_flops_per_token(config, SEQ_LEN) == 61952
    assert training_flops_per_token(config, SEQ_LEN) == 3 * 61952


def test_variant_differences_by_hand():
    cc = forward_flops_breakdown(DDLConfig.from_preset("tiny", "ddl-cc"), SEQ_LEN)
    write_only = forward_flops_breakdown(DDLConfig.from_preset("tiny", "write-only-cc"), SEQ_LEN)
    token = forward_flops_breakdown(DDLConfig.from_preset("tiny", "ddl-tc"), SEQ_LEN)
    no_ec = forward_flops_breakdown(DDLConfig.from_preset("tiny", "ddl-cc-noec"), SEQ_LEN)
    scalar = forward_flops_breakdown(DDLConfig.from_preset("tiny", "ddl-scalar"), SEQ_LEN)
    baseline = forward_flops_breakdown(DDLConfig.from_preset("tiny", "baseline"), SEQ_LEN)
    hidden_gate = forward_flops_breakdown(DDLConfig.from_preset("tiny", "ddl-cc", gate_hidden_size=8), SEQ_LEN)

    assert write_only == {**cc, "rank1_update": 4 * (2 * 32 * 4)}  # no read k^T X
    assert token == {**cc, "compressors": 5 * (2 * 32 * 4 + 2 * 32 * 4 * 4)}  # plus a kernel-4 conv on 128 channels
    assert no_ec == {**cc, "embed_expansion": 0}
    assert scalar == {
        **cc,
        "shortcut_values": 4 * (2 * 32),
        "rank1_update": 4 * (2 * 32 + 2 * 32),
        "compressors": 0,
        "embed_expansion": 0,
    }
    zero_extras = dict.fromkeys(
        ("shortcut_gates", "shortcut_values", "rank1_update", "compressors", "embed_expansion"), 0
    )
    assert baseline == {**cc, **zero_extras}
    assert hidden_gate == {**cc, "shortcut_gates": 4 * (2 * 32 * 8 + 2 * 8)}


def test_attention_cost_grows_with_mean_causal_length():
    config = DDLConfig.from_preset("tiny", "baseline")
    one = forward_flops_breakdown(config, 1)["attention_scores_values"]
    long = forward_flops_breakdown(config, 1023)["attention_scores_values"]
    assert one == 2 * (2 * 2 * 2 * 16 * 1.0)
    assert long == 512 * one


@pytest.mark.parametrize("variant", ["baseline", "ddl-scalar", "ddl-cc", "ddl-tc", "write-only-cc"])
def test_matmul_terms_match_torch_flop_counter(variant):
    """torch counts the matmuls and convolutions of one real forward pass, per module, with full
    (non-causal) attention matrices. On the reference paths (the plain definition of the model; the
    fast paths may do extra work such as padded convolution outputs) the rank-1 update and the
    compressors' channel mix are elementwise multiply-and-sum, which torch does not count; every
    other term of ours must match torch's count exactly."""
    config = DDLConfig.from_preset("tiny", variant)
    config._attn_implementation = "eager"
    model = DDLForCausalLM(config)
    batch = 3
    input_ids = torch.randint(0, config.vocab_size, (batch, SEQ_LEN))
    with reference_paths(), FlopCounterMode(display=False) as counter:
        model(input_ids)
    per_module = {name: sum(ops.values()) / (batch * SEQ_LEN) for name, ops in counter.get_flop_counts().items()}

    def counted(kind) -> float:
        names = [name for name, module in model.named_modules() if isinstance(module, kind)]
        return sum(per_module.get(f"DDLForCausalLM.{name}", 0.0) for name in names)

    breakdown = forward_flops_breakdown(config, SEQ_LEN)
    full_attention = breakdown["attention_scores_values"] * SEQ_LEN / ((SEQ_LEN + 1) / 2)
    assert counted(DDLAttention) == pytest.approx(breakdown["attention_projections"] + full_attention, rel=1e-12)
    assert counted(DDLMLP) == pytest.approx(breakdown["mlp"], rel=1e-12)
    assert per_module["DDLForCausalLM.lm_head"] == pytest.approx(breakdown["lm_head"], rel=1e-12)
    assert counted(EmbedExpansion) == pytest.approx(breakdown["embed_expansion"], rel=1e-12)
    assert counted(DeltaShortcut) == pytest.approx(breakdown["shortcut_gates"] + breakdown["shortcut_values"])

    reads = 2 * config.num_hidden_layers + 1 if config.is_expanded else 0
    channel_mix = reads * 2 * config.hidden_size * config.value_channels
    token_convolutions = breakdown["compressors"] - channel_mix
    # The MLP's read of the state after the attention's write runs inside the block (`write_and_read`), so the
    # token compressors' convolutions are counted by op, wherever they run.
    convolutions = sum(
        count / (batch * SEQ_LEN)
        for op, count in counter.get_flop_counts()["Global"].items()
        if "convolution" in str(op)
    )
    assert convolutions == pytest.approx(breakdown["embed_expansion"] + token_convolutions, abs=1e-9)
    # The compressors' own calls: each block's read of its input state, and the readout.
    own_reads = (config.num_hidden_layers + 1) / reads if reads else 0.0
    assert counted(StateCompressor) == pytest.approx(token_convolutions * own_reads, abs=1e-9)
    elementwise = breakdown["rank1_update"] + channel_mix
    expected_total = sum(breakdown.values()) - breakdown["attention_scores_values"] + full_attention - elementwise
    assert per_module["Global"] == pytest.approx(expected_total, rel=1e-12)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, None])
def test_bad_seq_len(bad):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        training_flops_per_token(DDLConfig.from_preset("tiny", "baseline"), bad)
