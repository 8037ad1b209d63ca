"""Write the committed checkpoint-compatibility fixtures (tests/fixtures/ddl-*-tiny*).

Each is a few-KB checkpoint plus the logits and the cached greedy generation it gives on a fixed
input; the tests load it with the current code and must reproduce both, and rebuild it from this
script bit for bit: a renamed parameter or a changed default then fails a test instead of silently
breaking users' checkpoints.

- `ddl-tc-tiny` (`--variant ddl-tc --legacy`): a `ddl-tc` checkpoint from before the authors' forms
  became the defaults (`LEGACY_FIELD_VALUES`: free compressor reads, QK-norm before RoPE, neutral
  init; rms_norm_eps 1e-6), with EC, TC and a hidden gate layer, so every parameter kind of that
  era is in the file (tests/test_checkpoints.py). The committed config.json was written before
  those fields existed, so it lacks them, as an old one does; a rewrite would add them.
- `ddl-cc-tiny-defaults` and `ddl-tc-tiny-defaults` (`--variant ddl-cc|ddl-tc`): the presets as
  they are today, every field at its default (the authors' forms: factored compressors, QK-norm
  after RoPE, the authors' init), only the sizes shrunk (tests/test_default_fixtures.py).

Run it only when the checkpoint format changes on purpose (and say so in the changelog):

    python scripts/make_fixture.py --variant ddl-cc [--legacy] [--output-dir DIR]
    python scripts/make_fixture.py --all
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

FIXTURES_ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
# Fixture name -> (preset variant, legacy forms).
FIXTURES = {
    "ddl-tc-tiny": ("ddl-tc", True),
    "ddl-cc-tiny-defaults": ("ddl-cc", False),
    "ddl-tc-tiny-defaults": ("ddl-tc", False),
}
FIXTURE_DIR = FIXTURES_ROOT / "ddl-tc-tiny"
EXPECTED_FILE = "expected_outputs.json"
# The sizes every fixture shrinks the tiny preset to (a few KB of weights).
TINY_SIZES = dict(
    vocab_size=16,
    hidden_size=8,
    intermediate_size=12,
    num_hidden_layers=2,
    num_attention_heads=2,
    head_dim=4,
    max_position_embeddings=32,
)
SEED = 20260101
INPUT_IDS = [[1, 5, 9, 2, 15, 0, 7, 3], [4, 4, 12, 8, 1, 14, 6, 10]]
GENERATION_PROMPT = [[3, 1, 4, 1, 5]]
GENERATED_TOKENS = 6


def fixture_name(variant: str, legacy: bool) -> str:
    for name, spec in FIXTURES.items():
        if spec == (variant, legacy):
            return name
    raise ValueError(f"no fixture for variant {variant!r} with legacy={legacy}; fixtures: {FIXTURES}")


def fixture_config(name: str = "ddl-tc-tiny") -> DDLConfig:
    """The fixture's config: the tiny preset of its variant at `TINY_SIZES`."""
    variant, legacy = FIXTURES[name]
    if not legacy:  # today's defaults, only smaller
        return DDLConfig.from_preset("tiny", variant, **TINY_SIZES)
    return DDLConfig.from_preset(
        "tiny",
        variant,
        **TINY_SIZES,
        value_channels=2,
        state_conv_size=3,
        embed_conv_size=2,
        gate_hidden_size=4,
        eos_token_id=15,
        # A checkpoint from before the authors' forms became the defaults: it pins the earlier forms and eps,
        # which is what an old config.json means (`LEGACY_FIELD_VALUES`).
        rms_norm_eps=1e-6,
        **LEGACY_FIELD_VALUES,
    )


def build_fixture_model(name: str = "ddl-tc-tiny") -> DDLForCausalLM:
    """The fixture model: tiny shapes, every weight moved away from its init (so that a weight silently
    re-initialized instead of loaded changes the logits)."""
    config = fixture_config(name)
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


def write_fixture(output_dir: Path, name: str = "ddl-tc-tiny") -> None:
    model = build_fixture_model(name)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Keep only what a user's checkpoint needs to load with the installed package: the weights and
    # config.json (save_pretrained also writes a model card and the remote-code files).
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        for file in ("config.json", "model.safetensors"):
            shutil.copyfile(Path(saved) / file, output_dir / file)
    text = json.dumps(expected_outputs(model), indent=1)
    (output_dir / EXPECTED_FILE).write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted({variant for variant, _ in FIXTURES.values()}), default="ddl-tc")
    parser.add_argument("--legacy", action="store_true", help="the legacy forms (the ddl-tc-tiny fixture)")
    parser.add_argument("--all", action="store_true", help="write every committed fixture to its folder")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: tests/fixtures/NAME")
    args = parser.parse_args()
    if args.all and args.output_dir is not None:
        parser.error("--output-dir writes one fixture; leave it out with --all")
    names = list(FIXTURES) if args.all else [fixture_name(args.variant, args.legacy)]
    for name in names:
        output_dir = args.output_dir or FIXTURES_ROOT / name
        write_fixture(output_dir, name)
        sizes = {path.name: path.stat().st_size for path in sorted(output_dir.iterdir())}
        print(f"wrote {name} to {output_dir}: {sizes}")


if __name__ == "__main__":
    main()
