"""The console of `ddl train` when its output goes to a file or a pipe (a cluster job's log): one plain line per
logging step with tokens/s, an ETA and, given a peak, the MFU; no progress-bar redraws."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerState

from conftest import offline_env, write_jsonl
from ddl_hf import DDLConfig
from ddl_hf.data import builtin_corpus_documents
from ddl_hf.flops import training_flops_per_token
from ddl_hf.tokenization import train_bpe_tokenizer
from ddl_hf.train import ConsoleLogCallback, DDLTrainingArguments, known_peak_flops

REPO = Path(__file__).resolve().parents[1]
STEPS, LOGGING_STEPS, BLOCK = 8, 2, 32
RUN = "import sys; from ddl_hf.train import main; sys.exit(main(sys.argv[1:]))"
LINE = re.compile(
    r"^step (?P<step>\d+)/(?P<max>\d+) \| loss [\d.]+ .*\| (?P<rate>[\d,]+) tok/s \|.*\| ETA (?P<eta>\d+:\d\d:\d\d)"
    r"(?: \| MFU (?P<mfu>[\d.]+)%)?"
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("console_assets")
    texts = [text[:700] for _, text in builtin_corpus_documents("validation")[:40]]
    train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(folder / "tokenizer")
    return {
        "tokenizer": str(folder / "tokenizer"),
        "train": write_jsonl(folder / "train.jsonl", texts[:34]),
        "validation": write_jsonl(folder / "validation.jsonl", texts[34:]),
        "cache": str(folder / "cache"),
    }


def test_piped_log_is_one_plain_line_per_logging_step_with_rate_eta_and_mfu(assets, tmp_path):
    output_dir = tmp_path / "run"
    config = DDLConfig.from_preset("tiny", "ddl-cc", vocab_size=300)
    flops_per_token = training_flops_per_token(config, BLOCK)
    peak = flops_per_token * 1000  # a device that would do 1,000 tokens/s at full use: MFU % = tokens/s / 10
    argv = [
        "--preset", "tiny",
        "--tokenizer_name", assets["tokenizer"],
        "--train_file", assets["train"],
        "--validation_file", assets["validation"],
        "--block_size", str(BLOCK),
        "--per_device_train_batch_size", "4",
        "--max_steps", str(STEPS),
        "--warmup_steps", "2",
        "--logging_steps", str(LOGGING_STEPS),
        "--eval_steps", str(STEPS),
        "--save_steps", str(STEPS),
        "--max_eval_samples", "8",
        "--dataset_cache_dir", assets["cache"],
        "--report_to", "none",
        "--sample_max_new_tokens", "0",
        "--peak_flops", repr(peak),
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = offline_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO / "src"))
    # bytes: text mode would turn every "\r" into "\n" (universal newlines) and hide the redraws
    result = subprocess.run([sys.executable, "-c", RUN, *argv], env=env, capture_output=True, timeout=400)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    assert b"\r" not in result.stdout and b"\r" not in result.stderr, stderr[-3000:]  # no bar redraws anywhere
    saved = DDLConfig.from_pretrained(output_dir)
    assert training_flops_per_token(saved, BLOCK) == flops_per_token
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and " loss " in line]
    assert len(lines) == len([1, *range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS)]), stdout
    steps = []
    for line in lines:
        match = LINE.match(line)
        assert match is not None, line
        assert match["max"] == str(STEPS) and match["mfu"] is not None, line
        steps.append(int(match["step"]))
        rate = float(match["rate"].replace(",", ""))
        assert rate > 0
        expected_mfu = 100 * flops_per_token * rate / peak
        # printed rate is rounded to a token/s, the MFU to 0.01 %
        assert abs(float(match["mfu"]) - expected_mfu) <= 0.005 + 100 * flops_per_token * 0.5 / peak, line
    assert steps == [1, *range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS)]
    assert LINE.match(lines[-1])["eta"] == "0:00:00"  # the last step: nothing left


def test_no_mfu_without_a_peak_on_cpu(tmp_path, capsys):
    assert known_peak_flops("cpu", bf16=False) is None
    assert known_peak_flops("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert known_peak_flops("NVIDIA H200", bf16=True) == 989e12
    assert known_peak_flops("NVIDIA A100-SXM4-80GB", bf16=True) == 312e12
    args = DDLTrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.peak_flops is None and args.disable_tqdm  # stdout is not a terminal under pytest
    callback = ConsoleLogCallback(flops_per_token=1e6, peak_flops=None)
    state = TrainerState(max_steps=10, global_step=2, is_world_process_zero=True)
    callback.on_log(args, state, None, logs={"loss": 5.0, "elapsed_s": 2.0, "num_input_tokens_seen": 4000})
    line = capsys.readouterr().out.strip()
    assert LINE.match(line) is not None and LINE.match(line)["mfu"] is None, line
    assert "2,000 tok/s" in line and "ETA 0:00:08" in line  # 1 s a step, 8 steps left
