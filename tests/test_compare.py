"""`ddl compare`: statistics over seeds against hand values, and the command on tiny runs."""

import json
import logging
import math
import shutil

import pytest

from ddl_hf import DDLConfig, DDLForCausalLM
from ddl_hf.compare import mean_and_std, paired_difference, t_quantile
from ddl_hf.flops import training_flops_per_token


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    "df, table_value",
    # Two-sided 95% critical values of Student's t, as printed in statistics tables.
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706), (10, 2.2281), (30, 2.0423)],
)
def test_t_quantile_matches_tables(df, table_value):
    assert t_quantile(0.975, df) == pytest.approx(table_value, abs=5e-5)


def test_t_quantile_other_levels_and_errors():
    assert t_quantile(0.75, 1) == pytest.approx(1.0, abs=1e-12)  # Cauchy: tan(pi / 4)
    assert t_quantile(0.95, 2) == pytest.approx(2.9200, abs=5e-5)
    assert t_quantile(0.995, 3) == pytest.approx(5.8409, abs=5e-5)
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match=r"probability must lie in \(0.5, 1\)"):
        t_quantile(0.4, 3)


def test_mean_and_std_by_hand():
    mean, std = mean_and_std([2.0, 4.0, 9.0])
    assert mean == pytest.approx(5.0)
    assert std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))
    assert mean_and_std([3.5]) == (3.5, None)
    with pytest.raises(ValueError, match="at least one value"):
        mean_and_std([])


def test_paired_difference_by_hand():
    variant = {0: 2.00, 1: 2.20, 2: 2.10, 7: 9.0}  # seed 7 has no baseline: left out
    baseline = {0: 2.10, 1: 2.40, 2: 2.05}
    result = paired_difference(variant, baseline)
    # d = (-0.10, -0.20, +0.05): mean -0.25 / 3; deviations (-0.1 + 1/12, -0.2 + 1/12, 0.05 + 1/12).
    mean = -0.25 / 3
    std = math.sqrt(((-0.1 - mean) ** 2 + (-0.2 - mean) ** 2 + (0.05 - mean) ** 2) / 2)
    assert std == pytest.approx(0.1258306, abs=1e-7)
    half_width = 4.302653 * std / math.sqrt(3)  # t_{0.975, 2}
    assert result["seeds"] == [0, 1, 2]
    assert result["mean"] == pytest.approx(mean)
    assert result["std"] == pytest.approx(std)
    assert result["low"] == pytest.approx(mean - half_width, abs=1e-6)
    assert result["high"] == pytest.approx(mean + half_width, abs=1e-6)
    single = paired_difference({0: 1.0}, {0: 1.5})
    assert (single["mean"], single["std"], single["low"], single["high"]) == (-0.5, None, None, None)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


# --------------------------------------------------------------------------- the command
TRAIN_TEXT = "\n\n".join(
    f"def function_{i}(x, y):\n    total = x * {i} + y\n    return total - {i % 7}\n" for i in range(300)
)
VALIDATION_TEXT = "\n\n".join(f"def g_{i}(a):\n    return a + {i}\n" for i in range(80))
VARIANTS = ["baseline", "ddl-cc"]
MAX_STEPS, BATCH, BLOCK = 4, 2, 16


def run_folder(root, variant, seed):
    return root / "out" / "runs" / variant / f"seed-{seed}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny data, a tiny BPE tokenizer, and the compare command line over them."""
    from ddl_hf.tokenization import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("compare")
    (root / "train.txt").write_text(TRAIN_TEXT)
    (root / "valid.txt").write_text(VALIDATION_TEXT)
    train_bpe_tokenizer([TRAIN_TEXT], vocab_size=300, model_max_length=128).save_pretrained(root / "tokenizer")
    argv = (
        ["--preset", "tiny", "--variants", *VARIANTS, "--seeds", "2", "--max_steps", str(MAX_STEPS)]
        + ["--output_dir", str(root / "out"), "--tokenizer_name", str(root / "tokenizer")]
        + ["--train_file", str(root / "train.txt"), "--validation_file", str(root / "valid.txt")]
        + ["--txt_sample_by", "paragraph", "--block_size", str(BLOCK), "--per_device_train_batch_size", str(BATCH)]
        + ["--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "1"]
        + ["--report_to", "none", "--disable_tqdm", "true", "--dataset_cache_dir", str(root / "cache")]
    )
    return root, argv


@pytest.fixture(scope="module")
def first_run(workspace):
    from ddl_hf.compare import main

    root, argv = workspace
    assert main(argv) == 0
    return root, argv, json.loads((root / "out" / "results.json").read_text())


def test_results_are_well_formed(first_run):
    root, _, report = first_run
    assert list(report["variants"]) == VARIANTS
    assert (report["max_steps"], report["tokens_per_step"], report["block_size"]) == (MAX_STEPS, BATCH * BLOCK, BLOCK)
    assert report["command"].startswith("ddl compare --preset tiny --variants baseline ddl-cc --seeds 2")
    for variant in VARIANTS:
        entry = report["variants"][variant]
        metrics = {seed: json.loads((run_folder(root, variant, seed) / "metrics.json").read_text()) for seed in (0, 1)}
        losses = [metrics[seed]["eval_loss"] for seed in (0, 1)]
        assert entry["final_eval_loss"]["per_seed"] == {"0": losses[0], "1": losses[1]}
        assert entry["final_eval_loss"]["mean"] == pytest.approx(sum(losses) / 2)
        assert entry["final_eval_loss"]["std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
        assert entry["perplexity"] == pytest.approx(math.exp(sum(losses) / 2))
        assert entry["tokens"] == MAX_STEPS * BATCH * BLOCK

        # Parameters and FLOPs agree with the saved model and flops.py.
        model = DDLForCausalLM.from_pretrained(run_folder(root, variant, 0))
        assert entry["parameters"] == sum(parameter.numel() for parameter in model.parameters())
        config = DDLConfig.from_pretrained(run_folder(root, variant, 0))
        assert config.variant_name == variant
        assert entry["training_flops_per_token"] == training_flops_per_token(config, BLOCK)
        assert entry["training_flops"] == training_flops_per_token(config, BLOCK) * MAX_STEPS * BATCH * BLOCK

        # Validation curves: an evaluation every 2 steps, in tokens and FLOPs.
        for seed in (0, 1):
            curve = report["curves"][f"{variant}/seed-{seed}"]
            assert [point["step"] for point in curve] == [2, 4]
            assert [point["tokens"] for point in curve] == [2 * BATCH * BLOCK, 4 * BATCH * BLOCK]
            assert curve[-1]["flops"] == pytest.approx(entry["training_flops"])
            assert curve[-1]["eval_loss"] == metrics[seed]["eval_loss"]
            # Every run keeps its final model and tokenizer.
            folder = run_folder(root, variant, seed)
            assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    baseline = report["variants"]["baseline"]
    difference = report["variants"]["ddl-cc"]["difference_to_reference"]
    assert baseline["difference_to_reference"] is None
    per_seed = [
        report["variants"]["ddl-cc"]["final_eval_loss"]["per_seed"][seed]
        - baseline["final_eval_loss"]["per_seed"][seed]
        for seed in ("0", "1")
    ]
    expected = paired_difference(dict(enumerate(per_seed)), {0: 0.0, 1: 0.0})
    for key in ("mean", "std", "low", "high"):
        assert difference[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12)

    markdown = (root / "out" / "results.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["variant", *VARIANTS]
    assert f"{report['variants']['ddl-cc']['final_eval_loss']['mean']:.4f}" in rows[2]
    assert f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]" in rows[2]
    for name in ("loss_vs_tokens.png", "loss_vs_flops.png"):
        assert (root / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_data_order_per_seed(first_run):
    root, _, _ = first_run
    orders = {
        (variant, seed): (run_folder(root, variant, seed) / "data_order" / "rank0.tsv").read_text()
        for variant in VARIANTS
        for seed in (0, 1)
    }
    assert len(orders[("baseline", 0)].splitlines()) == MAX_STEPS
    assert orders[("baseline", 0)] == orders[("ddl-cc", 0)]
    assert orders[("baseline", 1)] == orders[("ddl-cc", 1)]
    assert orders[("baseline", 0)] != orders[("baseline", 1)]


def test_rerun_skips_finished_and_resumes_unfinished(first_run, capsys, caplog):
    from ddl_hf.compare import main

    root, argv, report = first_run
    metrics_files = {(v, s): run_folder(root, v, s) / "metrics.json" for v in VARIANTS for s in (0, 1)}
    stamps = {key: path.stat().st_mtime_ns for key, path in metrics_files.items()}
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("ddl compare: skipped") == 4 and "ddl compare: training" not in out
    assert {key: path.stat().st_mtime_ns for key, path in metrics_files.items()} == stamps
    assert json.loads((root / "out" / "results.json").read_text())["variants"] == report["variants"]

    # Interrupt ddl-cc seed 1 after its step-2 checkpoint: the rerun continues it from there, to the same loss.
    unfinished = run_folder(root, "ddl-cc", 1)
    shutil.rmtree(unfinished / "checkpoint-4")
    (unfinished / "metrics.json").unlink()
    (unfinished / "model.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="ddl_hf.train"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("ddl compare: skipped") == 3 and "ddl compare: training ddl-cc seed 1" in out
    assert f"resuming from {unfinished / 'checkpoint-2'} (step 2)" in caplog.text
    resumed = json.loads((unfinished / "metrics.json").read_text())
    assert resumed["global_step"] == MAX_STEPS
    assert resumed["eval_loss"] == pytest.approx(
        report["variants"]["ddl-cc"]["final_eval_loss"]["per_seed"]["1"], rel=1e-6
    )
    assert {k: p.stat().st_mtime_ns for k, p in metrics_files.items() if k != ("ddl-cc", 1)} == {
        k: v for k, v in stamps.items() if k != ("ddl-cc", 1)
    }


def test_changed_budget_on_existing_runs_is_refused(first_run, capsys):
    from ddl_hf.compare import main

    root, argv, _ = first_run
    changed = [
        ("3" if value == str(MAX_STEPS) and argv[i - 1] == "--max_steps" else value) for i, value in enumerate(argv)
    ]
    assert main(changed) == 2
    error = capsys.readouterr().err
    assert "holds a run with different arguments" in error and "max_steps: 4 -> 3" in error


def test_max_tokens_rounds_up_to_whole_steps(workspace):
    from ddl_hf.compare import build_parser, resolve_max_steps

    root, argv = workspace
    budget = argv.index("--max_steps")
    tokens_argv = argv[:budget] + ["--max_tokens", str(3 * BATCH * BLOCK - 5)] + argv[budget + 2 :]
    args, train_flags = build_parser().parse_known_args(tokens_argv)
    assert resolve_max_steps(args, train_flags) == (3, BATCH * BLOCK)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "3"], "ddl compare sets ['--seed']"),
        (["--variant", "ddl-cc"], "ddl compare sets ['--variant']"),
        (["--data_seed=5", "--model_name_or_path", "x"], "ddl compare sets ['--data_seed', '--model_name_or_path']"),
        (["--variants", "baseline", "nope"], "unknown variant(s) ['nope']"),
        (["--variants", "ddl-cc", "ddl-cc"], "lists a variant twice"),
        (["--seeds", "0"], "--seeds must be an integer >= 1"),
        (["--preset", "huge"], "--preset 'huge' is unknown"),
        (["--variants", "ddl-cc:nope=1"], "--variants 'ddl-cc:nope=1': --config_overrides: unknown DDLConfig field(s)"),
        (["--variants", "ddl-cc:"], "--variants 'ddl-cc:': give FIELD=VALUE after ':'"),
        (["--variants", "nope:beta_init=0.5"], "unknown variant(s) ['nope']"),
        (
            ["--variants", "ddl-cc:beta_init=0.5", "--config_overrides", "beta_init=1.5"],
            "--variants 'ddl-cc:beta_init=0.5' sets ['beta_init'], which --config_overrides 'beta_init=1.5' sets",
        ),
        (["--variants", "ddl-cc", "ddl-scalar", "--reference", "ddl-tc"], "--reference 'ddl-tc' must be one of"),
    ],
)
def test_bad_arguments(extra, message, tmp_path, capsys):
    from ddl_hf.compare import main

    assert main(["--max_steps", "2", "--output_dir", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_budget_is_required_and_exclusive(tmp_path):
    from ddl_hf.compare import main

    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--max_steps", "2", "--max_tokens", "100", "--output_dir", str(tmp_path)])


def without_flag(argv, flag):
    """`argv` without `flag` and the value after it."""
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


def test_tiny_preset_compares_with_the_default_block_size(workspace, tmp_path, capsys):
    """`ddl compare --preset tiny` without --block_size: every run packs blocks of the tiny model's context."""
    from ddl_hf.compare import main

    _, argv = workspace
    argv = without_flag(argv, "--block_size") + ["--variants", "ddl-cc", "--seeds", "1", "--max_steps", "2"]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (report["block_size"], report["tokens_per_step"]) == (128, BATCH * 128)
    assert report["variants"]["ddl-cc"]["tokens"] == 2 * BATCH * 128
    config = DDLConfig.from_pretrained(tmp_path / "out" / "runs" / "ddl-cc" / "seed-0")
    assert report["variants"]["ddl-cc"]["training_flops_per_token"] == training_flops_per_token(config, 128)

    capsys.readouterr()
    assert main([*argv, "--output_dir", str(tmp_path / "too_large"), "--block_size", "129"]) == 2
    assert "ddl compare: error: --block_size 129 is larger than the model's max_position_embeddings (128)" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "too_large").exists()


def test_a_variant_with_changed_fields_trains_with_them_and_is_compared_with_the_reference(workspace, tmp_path):
    """`--variants ddl-cc ddl-cc:compressor_form=free --reference ddl-cc`: the second variant's runs save the
    changed field (and the passed-through --config_overrides), and the differences are taken against ddl-cc."""
    from ddl_hf.compare import main

    _, argv = workspace
    free = "ddl-cc:compressor_form=free,init_scheme=neutral"
    argv = [*argv, "--variants", "ddl-cc", free, "--reference", "ddl-cc", "--seeds", "2", "--max_steps", "2"]
    argv += ["--config_overrides", "beta_init=0.5"]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(report["variants"]) == ["ddl-cc", free] and report["reference_variant"] == "ddl-cc"
    runs = tmp_path / "out" / "runs"
    assert sorted(path.name for path in runs.iterdir()) == ["ddl-cc", "ddl-cc+compressor_form=free,init_scheme=neutral"]
    factored = DDLConfig.from_pretrained(runs / "ddl-cc" / "seed-0")
    changed = DDLConfig.from_pretrained(runs / "ddl-cc+compressor_form=free,init_scheme=neutral" / "seed-0")
    assert (factored.compressor_form, factored.init_scheme, factored.beta_init) == ("factored", "authors", 0.5)
    assert (changed.compressor_form, changed.init_scheme, changed.beta_init) == ("free", "neutral", 0.5)
    assert report["variants"]["ddl-cc"]["difference_to_reference"] is None
    losses = {name: report["variants"][name]["final_eval_loss"]["per_seed"] for name in ("ddl-cc", free)}
    expected = paired_difference(
        {seed: losses[free][seed] for seed in ("0", "1")}, {seed: losses["ddl-cc"][seed] for seed in ("0", "1")}
    )
    difference = report["variants"][free]["difference_to_reference"]
    for key in ("mean", "std", "low", "high"):
        assert difference[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12)
    assert "| Δ vs ddl-cc [95% CI] |" in (tmp_path / "out" / "results.md").read_text()


# --------------------------------------------------------------------------- the published results
PUBLISHED_RESULTS = ["docs/results/results.json", "docs/results/cc-read-forms/results.json"]


def report_schema(report: dict) -> dict:
    """The keys of a results.json, level by level (variant names, seeds and run names aside)."""
    entries = list(report["variants"].values())
    differences = [entry["difference_to_reference"] for entry in entries if entry["difference_to_reference"]]
    return {
        "report": sorted(report),
        "variant": {tuple(sorted(entry)) for entry in entries},
        "final_eval_loss": {tuple(sorted(entry["final_eval_loss"])) for entry in entries},
        "train_wall_time_s": {tuple(sorted(entry["train_wall_time_s"])) for entry in entries},
        "difference": {tuple(sorted(difference)) for difference in differences},
        "curve_point": {tuple(sorted(point)) for curve in report["curves"].values() for point in curve},
    }


@pytest.mark.parametrize("path", PUBLISHED_RESULTS)
def test_published_results_have_the_schema_compare_writes(first_run, path):
    """The committed results files read like the ones `ddl compare` writes now (same keys at every level), and
    their differences to the reference variant are the paired differences of their own per-seed losses."""
    from pathlib import Path

    _, _, written = first_run
    published = json.loads((Path(__file__).resolve().parents[1] / path).read_text(encoding="utf-8"))
    assert report_schema(published) == report_schema(written)
    losses = {name: entry["final_eval_loss"]["per_seed"] for name, entry in published["variants"].items()}
    reference = published["reference_variant"]
    for name, entry in published["variants"].items():
        if name == reference:
            assert entry["difference_to_reference"] is None
            continue
        expected = paired_difference(
            {int(s): v for s, v in losses[name].items()}, {int(s): v for s, v in losses[reference].items()}
        )
        for key in ("seeds", "mean", "std", "low", "high", "confidence"):
            assert entry["difference_to_reference"][key] == pytest.approx(expected[key], rel=1e-12), (name, key)
