"""`record_delta_stats` against direct computations, and the `ddl audit` command end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from ddl_hf import DDLForCausalLM, DeltaShortcut, record_delta_stats, state_matrix
from ddl_hf.delta_stats import BETA_REGIMES, DeltaStatsRecorder

# One beta per (layer, sublayer) of the tiny model, one in each regime.
FIXED_BETAS = {(0, "attention"): 0.05, (0, "mlp"): 0.5, (1, "attention"): 1.0, (1, "mlp"): 1.5}
FIXED_REGIMES = {(0, "attention"): "skip", (0, "mlp"): "partial", (1, "attention"): "match", (1, "mlp"): "over_relaxed"}


def fix_gates(model: DDLForCausalLM) -> None:
    """Gate weight 0 and bias logit(beta / 2): beta = 2 sigmoid(bias) for every token."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DeltaShortcut):
                beta = FIXED_BETAS[(module.layer_idx, module.sublayer)]
                module.beta_proj.weight.zero_()
                module.beta_proj.bias.fill_(math.log(beta / 2) - math.log1p(-beta / 2))


def direct_statistics(model, input_ids, attention_mask=None):
    """Per shortcut, the per-token beta, |e|, |e'| and |v| computed from the shortcut's own inputs and
    output with the formulas of spec section 1, over the unmasked tokens."""
    captured = {}

    def capture(module, args, kwargs, output):
        state, h, context = args[:3]
        block_input = args[3] if len(args) > 3 else kwargs.get("block_input")
        new_state = output[0] if isinstance(output, tuple) else output  # (new state, write) with return_write
        captured[(module.layer_idx, module.sublayer)] = (module, state, h, context, block_input, new_state)

    handles = [
        module.register_forward_hook(capture, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, DeltaShortcut)
    ]
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()
    keep = torch.ones(input_ids.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    result = {}
    for key, (module, state, h, context, block_input, output) in captured.items():
        d, d_v = module.hidden_size, module.value_channels
        beta = module.gate(context)[..., 0]
        v = module.value(block_input if block_input is not None else state)
        k = h / torch.sqrt(h.square().sum(-1, keepdim=True) + module.k_eps**2)
        before = torch.einsum("btd,btdv->btv", k, state_matrix(state, d, d_v)) - v
        after = torch.einsum("btd,btdv->btv", k, state_matrix(output, d, d_v)) - v
        result[key] = {
            "beta": beta[keep],
            "before": before.norm(dim=-1)[keep],
            "after": after.norm(dim=-1)[keep],
            "value": v.norm(dim=-1)[keep],
        }
    return result


def by_key(summary):
    return {(entry["layer"], entry["sublayer"]): entry for entry in summary}


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-scalar", "write-only-cc", "ddl-tc"])
def test_statistics_equal_direct_computation(variant):
    model = tiny_model(variant).eval()
    input_ids = torch.randint(0, 96, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, :5] = 0  # left padding
    attention_mask[2, :2] = 0
    expected = direct_statistics(model, input_ids, attention_mask)
    with record_delta_stats(model) as stats:
        model(input_ids, attention_mask=attention_mask)
    summary = by_key(stats.summary())
    assert set(summary) == set(FIXED_BETAS)
    for key, direct in expected.items():
        entry = summary[key]
        beta = direct["beta"].double()
        assert entry["tokens"] == 36 - 5 - 2
        assert entry["beta"]["mean"] == pytest.approx(beta.mean().item(), rel=1e-6)
        assert entry["beta"]["std"] == pytest.approx(beta.std(unbiased=False).item(), rel=1e-4, abs=1e-7)
        assert entry["beta"]["min"] == pytest.approx(beta.min().item(), rel=1e-7)
        assert entry["beta"]["max"] == pytest.approx(beta.max().item(), rel=1e-7)
        for name, (low, high) in BETA_REGIMES.items():
            inside = (beta >= low) & ((beta <= high) if name == "match" else (beta < high))
            assert entry["beta"]["regimes"][name] == pytest.approx(inside.double().mean().item(), abs=1e-12)
        ordered = beta.sort().values
        for q_name, value in entry["beta"]["quantiles"].items():
            # The inverse empirical CDF (smallest beta with a fraction >= q at or below it), read from a
            # histogram of bin width 2 / 2000.
            rank = max(math.ceil(float(q_name) * len(ordered)), 1)
            assert value == pytest.approx(ordered[rank - 1].item(), abs=1e-3 + 1e-9)
        assert entry["discrepancy_before"] == pytest.approx(direct["before"].double().mean().item(), rel=1e-5)
        assert entry["discrepancy_after"] == pytest.approx(direct["after"].double().mean().item(), rel=1e-4)
        assert entry["discrepancy_ratio"] == pytest.approx(
            entry["discrepancy_after"] / entry["discrepancy_before"], rel=1e-12
        )
        assert entry["value_norm"] == pytest.approx(direct["value"].double().mean().item(), rel=1e-6)


def test_fixed_gates_give_known_regimes_and_contraction():
    model = tiny_model("ddl-cc").eval()
    fix_gates(model)
    input_ids = torch.randint(0, 96, (2, 16))
    with record_delta_stats(model) as stats:
        model(input_ids)
        model(input_ids[:, :9])
    summary = by_key(stats.summary())
    for key, beta in FIXED_BETAS.items():
        entry = summary[key]
        assert entry["tokens"] == 2 * 16 + 2 * 9
        assert entry["beta"]["mean"] == pytest.approx(beta, rel=1e-6)
        assert entry["beta"]["std"] == pytest.approx(0.0, abs=1e-6)
        assert entry["beta"]["regimes"] == {name: float(name == FIXED_REGIMES[key]) for name in BETA_REGIMES}
        for value in entry["beta"]["quantiles"].values():
            assert value == pytest.approx(beta, abs=1e-3)
        # e' = (1 - beta |k|^2) e with |k|^2 = 1 - O(eps^2 / |h|^2): the ratio is |1 - beta| for every token.
        assert entry["discrepancy_ratio"] == pytest.approx(abs(1.0 - beta), abs=1e-5)
    match = summary[(1, "attention")]
    assert match["discrepancy_after"] < 1e-5 * match["discrepancy_before"]  # beta = 1 overwrites the readout


def test_recording_is_detached_and_changes_nothing():
    model = tiny_model("ddl-cc").eval()
    input_ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        plain = model(input_ids).logits
        with record_delta_stats(model) as stats:
            recorded = model(input_ids).logits
        after = model(input_ids).logits
    assert torch.equal(plain, recorded) and torch.equal(plain, after)
    shortcuts = [module for module in model.modules() if isinstance(module, DeltaShortcut)]
    assert len(shortcuts) == 4 and all(module._recorder is None for module in shortcuts)
    assert not model._forward_pre_hooks
    assert [entry["tokens"] for entry in stats.summary()] == [20] * 4  # statistics survive the block
    stats.reset()
    assert [entry["tokens"] for entry in stats.summary()] == [0] * 4


def test_identity_of_shortcuts():
    model = tiny_model("ddl-cc").eval()
    names = [(entry["name"], entry["layer"], entry["sublayer"]) for entry in _empty_summary(model)]
    assert names == [
        ("model.layers.0.attn_shortcut", 0, "attention"),
        ("model.layers.0.mlp_shortcut", 0, "mlp"),
        ("model.layers.1.attn_shortcut", 1, "attention"),
        ("model.layers.1.mlp_shortcut", 1, "mlp"),
    ]


def _empty_summary(model):
    with record_delta_stats(model) as stats:
        pass
    return stats.summary()


def test_errors():
    with pytest.raises(ValueError, match="no DeltaShortcut"):
        with record_delta_stats(tiny_model("baseline").eval()):
            pass
    model = tiny_model("ddl-cc", seed=None).eval()
    with record_delta_stats(model):
        with pytest.raises(ValueError, match="nested recording"):
            with record_delta_stats(model):
                pass
    recorder = DeltaStatsRecorder()
    recorder.token_mask = torch.ones(3, 12)
    with pytest.raises(ValueError, match="token_mask must have shape"):
        with record_delta_stats(model, recorder):
            shortcut = model.model.layers[0].attn_shortcut
            state, h = torch.randn(2, 12, 128), torch.randn(2, 12, 32)
            recorder.record(shortcut, state, h, torch.ones(2, 12, 1), torch.randn(2, 12, 4), state)
    with pytest.raises(ValueError, match="histogram_bins"):
        DeltaStatsRecorder(histogram_bins=0)
    with pytest.raises(ValueError, match="quantiles"):
        DeltaStatsRecorder(quantiles=(0.5, 1.5))


# --------------------------------------------------------------------------- the command
VALIDATION_TEXT = "\n\n".join(
    f"def function_{i}(x, y):\n    total = x * {i} + y\n    return total - {i % 7}\n" for i in range(60)
)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny DDL-CC model with fixed gates and a tiny baseline, each saved with a small BPE tokenizer,
    and a validation text file."""
    from ddl_hf.tokenization import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("audit")
    tokenizer = train_bpe_tokenizer([VALIDATION_TEXT], vocab_size=300, model_max_length=128)
    folders = {}
    for variant in ("ddl-cc", "baseline"):
        model = tiny_model(variant, vocab_size=len(tokenizer)).eval()
        if variant == "ddl-cc":
            fix_gates(model)
        folders[variant] = root / variant
        model.save_pretrained(folders[variant])
        tokenizer.save_pretrained(folders[variant])
        # As `ddl train` writes it: the audit reads its default block size from here.
        (folders[variant] / "metrics.json").write_text(json.dumps({"block_size": 32}))
    text_file = root / "validation.txt"
    text_file.write_text(VALIDATION_TEXT)
    return folders, text_file, tokenizer


def test_audit_command_writes_known_statistics(saved_models, tmp_path, capsys):
    from ddl_hf.audit import main
    from ddl_hf.data import collate_blocks

    folders, text_file, tokenizer = saved_models
    output_dir = tmp_path / "report"
    argv = [str(folders["ddl-cc"]), "--validation_file", str(text_file), "--output_dir", str(output_dir)]
    assert main(argv + ["--num_batches", "2", "--batch_size", "3"]) == 0

    report = json.loads((output_dir / "audit.json").read_text())
    assert (report["variant"], report["block_size"], report["blocks"], report["batches"]) == ("ddl-cc", 32, 6, 2)
    assert report["tokens"] == 6 * 32
    summary = by_key(report["shortcuts"])
    assert set(summary) == set(FIXED_BETAS)
    for key, beta in FIXED_BETAS.items():
        assert summary[key]["tokens"] == 6 * 32
        assert summary[key]["beta"]["mean"] == pytest.approx(beta, rel=1e-6)
        assert summary[key]["beta"]["regimes"] == {name: float(name == FIXED_REGIMES[key]) for name in BETA_REGIMES}
        assert summary[key]["discrepancy_ratio"] == pytest.approx(abs(1.0 - beta), abs=1e-5)

    # The reported loss is the model's loss on the first six blocks of the packed validation text (a .txt
    # file is one document by default).
    stream = tokenizer(VALIDATION_TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(stream) >= 6 * 32
    blocks = [{"input_ids": stream[i * 32 : (i + 1) * 32]} for i in range(6)]
    model = DDLForCausalLM.from_pretrained(folders["ddl-cc"]).eval()
    with torch.no_grad():
        batch = collate_blocks(blocks)
        expected_loss = model(**batch).loss.item()
        # The logit lens: every width-d hidden state through the final norm and the tied LM head.
        hidden = model(**batch, output_hidden_states=True).hidden_states
        targets = batch["input_ids"][:, 1:].reshape(-1)
        expected_depth = [
            F.cross_entropy(
                (model.model.norm(h) @ model.lm_head.weight.T)[:, :-1].reshape(-1, model.config.vocab_size), targets
            ).item()
            for h in hidden[:-1]
        ]
    assert report["validation_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert len(report["hidden_state_losses"]) == model.config.num_hidden_layers + 1
    assert report["hidden_state_losses"][:-1] == pytest.approx(expected_depth, rel=1e-5)
    assert report["hidden_state_losses"][-1] == pytest.approx(expected_loss, rel=1e-5)

    png = (output_dir / "audit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = capsys.readouterr().out
    assert "over" in table and table.count("attention") == 2 and table.count("mlp ") == 2


def test_audit_takes_its_block_size_from_ddl_train(saved_models, tmp_path, monkeypatch, capsys):
    """The audit's block size is `ddl train`'s (`train.resolve_block_size`): the one in metrics.json (a model
    trained by `ddl train`), else the rule `ddl train` uses when --block_size is not given, with its check."""
    import shutil

    from ddl_hf import train
    from ddl_hf.audit import main

    folders, text_file, _ = saved_models
    untrained = tmp_path / "no_metrics"
    shutil.copytree(folders["ddl-cc"], untrained)
    (untrained / "metrics.json").unlink()
    argv = ["--validation_file", str(text_file), "--num_batches", "1", "--batch_size", "1"]
    assert main([str(untrained), *argv, "--output_dir", str(tmp_path / "default")]) == 0
    assert json.loads((tmp_path / "default" / "audit.json").read_text())["block_size"] == 128  # min(256, 128)
    monkeypatch.setattr(train, "DEFAULT_BLOCK_SIZE", 64)  # another default in ddl train: the audit follows it
    assert main([str(untrained), *argv, "--output_dir", str(tmp_path / "followed")]) == 0
    assert json.loads((tmp_path / "followed" / "audit.json").read_text())["block_size"] == 64
    capsys.readouterr()
    assert main([str(folders["ddl-cc"]), *argv, "--block_size", "4096"]) == 2
    assert "--block_size 4096 is larger than the model's max_position_embeddings (128)" in capsys.readouterr().err


def test_audit_command_errors(saved_models, tmp_path, capsys):
    from ddl_hf.audit import main

    folders, text_file, _ = saved_models
    assert main([str(folders["baseline"]), "--validation_file", str(text_file), "--output_dir", str(tmp_path)]) == 2
    assert "additive baseline" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--validation_file", str(text_file)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main([str(folders["ddl-cc"]), "--validation_file", str(text_file), "--block_size", "4096"]) == 2
    assert "--block_size 4096 is larger than the model's max_position_embeddings (128)" in capsys.readouterr().err
    assert main([str(folders["ddl-cc"]), "--validation_file", str(text_file), "--num_batches", "0"]) == 2
    assert "--num_batches must be an integer >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written on error
