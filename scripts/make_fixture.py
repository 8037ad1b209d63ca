"""Write the committed checkpoint-compatibility fixture (tests/fixtures/ddl-tc-tiny).

A few-KB `ddl-tc` checkpoint with embedding expansion (EC), a token compressor (TC) and a hidden
gate layer, so every parameter kind of a DDL model is in the file, plus the logits and the cached
greedy generation it gives on a fixed input. tests/test_checkpoints.py loads it with the current
code and must reproduce both: a renamed parameter or a changed default then fails that test instead
of silently breaking users' checkpoints.

Run it only when the checkpoint format changes on purpose (and say so in the changelog):

    python scripts/make_fixture.py [--output-dir tests/fixtures/ddl-tc-tiny]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ddl_hf import DDLConfig, DDLForCausalLM
from ddl_hf.models.ddl.configuration_ddl import LEGACY_FIELD_VALUES

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ddl-tc-tiny"
EXPECTED_FILE = "expected_outputs.json"
SEED = 20260101
INPUT_IDS = [[1, 5, 9, 2, 15, 0, 7, 3], [4, 4, 12, 8, 1, 14, 6, 10]]
GENERATION_PROMPT = [[3, 1, 4, 1, 5]]
GENERATED_TOKENS = 6


def build_fixture_model() -> DDLForCausalLM:
    """The fixture model: tiny shapes, every DDL parameter kind, every weight moved away from its init
    (so that a weight silently re-initialized instead of loaded changes the logits)."""
    config = DDLConfig.from_preset(
        "tiny",
        "ddl-tc",
        vocab_size=16,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=4,
        max_position_embeddings=32,
        value_channels=2,
        state_conv_size=3,
        embed_conv_size=2,
        gate_hidden_size=4,
        eos_token_id=15,
        # The fixture is a checkpoint from before the authors' forms became the defaults: it pins the earlier
        # forms and eps, which is what an old config.json means (`LEGACY_FIELD_VALUES`).
        rms_norm_eps=1e-6,
        **LEGACY_FIELD_VALUES,
    )
    torch.manual_seed(SEED)
    model = DDLForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def expected_outputs(model: DDLForCausalLM) -> dict:
    """Logits of `INPUT_IDS` (full forward, float32 and float64) and the greedy, cached continuation of
    `GENERATION_PROMPT`."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(INPUT_IDS)).logits
        generated = model.generate(
            torch.tensor(GENERATION_PROMPT),
            max_new_tokens=GENERATED_TOKENS,
            min_new_tokens=GENERATED_TOKENS,
            do_sample=False,
        )
    # float64 logits are the same on every machine up to ~1e-15; float32 ones vary by ~1e-6 with the CPU's kernels.
    with torch.no_grad():
        logits_float64 = copy.deepcopy(model).double()(input_ids=torch.tensor(INPUT_IDS)).logits
    return {
        "input_ids": INPUT_IDS,
        "logits": logits.tolist(),
        "logits_float64": logits_float64.tolist(),
        "generation_prompt": GENERATION_PROMPT,
        "generated_ids": generated.tolist(),
        "torch_version": torch.__version__,
    }


def write_fixture(output_dir: Path) -> None:
    model = build_fixture_model()
    output_dir.mkdir(parents=True, exist_ok=True)
    # Keep only what a user's checkpoint needs to load with the installed package: the weights and
    # config.json (save_pretrained also writes a model card and the remote-code files).
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(Path(saved) / name, output_dir / name)
    text = json.dumps(expected_outputs(model), indent=1)
    (output_dir / EXPECTED_FILE).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args()
    write_fixture(args.output_dir)
    sizes = {path.name: path.stat().st_size for path in sorted(args.output_dir.iterdir())}
    print(f"wrote {args.output_dir}: {sizes}")


if __name__ == "__main__":
    main()
