"""Write `tests/fixtures/authors/authors_models.safetensors` (+ `.json`): numbers from the authors' own models.

    python scripts/make_authors_fixture.py SCRATCH [--commit SHA] [--output_dir tests/fixtures/authors]

SCRATCH is a folder holding the authors' `model/` folder (repository yifanzhang-pro/deep-delta-learning; the
committed fixture is of commit 2b55f25), extracted from a clone, e.g.

    git -C deep-delta-learning archive 2b55f25 model | tar x -C SCRATCH

Their files are imported from SCRATCH as they are (nothing of them is copied here or into the fixture). For each
variant their files provide, the script builds their model at a tiny shape with a fixed seed, moves every
parameter off its initialization (norm and QK-norm gains, gates, values, compressor kernels and read vectors,
token filters, the EC filters off the identity), runs fixed tokens in fp32 and saves, under `{variant}/`:

    state/{their key}   their `state_dict()` (their names, `lm_head.weight` included as they save it)
    logits              their logits (B, T, vocab)
    grad/{their key}    the gradient of their loss (mean cross-entropy against `targets`) for every parameter

plus `input_ids` and `targets` shared by all. `tests/test_authors_model.py` converts each state dict with
`ddl convert-reference`'s converter and checks logits and gradients against these, without their code.

Their token-compressor files (TC) call `causal_conv1d_fn` of the CUDA package `causal-conv1d`; when that package
is missing (a CPU machine) the script provides its documented reference semantics (a depthwise causal conv1d:
`out[:, c, t] = sum_u weight[c, u] x[:, c, t - K + 1 + u]`) under that name. Their Triton file
(`DDL-gpt-mha-rope-CC-EC-accelerated.py`) needs Triton: with Triton installed it runs (on a machine without a GPU
in Triton's interpreter, TRITON_INTERPRET=1) with the `ddl-cc` weights, which it loads strictly (same keys), and
its logits, gradients and a probe of one shortcut at |h| ~ k_eps go under `ddl-cc-accelerated/`; without Triton
it is left out. Triton need not be installed for the project: `PYTHONPATH=/some/folder` with
`pip install --target /some/folder triton` is enough for this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

PACKAGE = "authors_model"
REPOSITORY = "yifanzhang-pro/deep-delta-learning"

# The shape: tiny, so that the fixture stays a few hundred KB; d_v = K = 4 as in the paper (their CC needs K = d_v).
SHAPE = dict(
    vocab_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_size=16,
    head_dim=8,
    block_size=16,
)
EXPANDED = dict(ddl_value_channels=4, ddl_state_shortconv_kernel_size=4, input_embed_shortconv_kernel_size=4)
BATCH, LENGTH = 2, 8

# ddl_hf variant name -> (their file, whether the config has the expanded-state fields). The baseline is their
# `gpt_base.GPTBase` (additive blocks) with the attention class of their scalar file.
VARIANTS = {
    "baseline": ("gpt_base.py + DDL-vdim1-gpt-mha-rope.py (CausalSelfAttention)", False),
    "ddl-scalar": ("DDL-vdim1-gpt-mha-rope.py", False),
    "ddl-cc": ("DDL-gpt-mha-rope-CC-EC.py", True),
    "ddl-tc": ("DDL-gpt-mha-rope-EC.py", True),
    "ddl-cc-noec": ("DDL-gpt-mha-rope-CC.py", True),
    "ddl-tc-noec": ("DDL-gpt-mha-rope.py", True),
}
# Their Triton file: it saves the keys of their CC-EC file, so it runs here with the `ddl-cc` weights (strictly
# loaded). It guards k with sqrt(d) k_eps; at ordinary |h| that moves the logits by ~1e-6 only, so a probe with
# |h| of the order of k_eps shows the two forms apart (below).
ACCELERATED = ("ddl-cc-accelerated", "DDL-gpt-mha-rope-CC-EC-accelerated.py", "ddl-cc")
PROBE_SCALE = 3e-6  # |h| = 3e-6 sqrt(d) ~ 1.2e-5, between k_eps = 1e-5 and sqrt(d) k_eps = 4e-5


# --------------------------------------------------------------------------- importing their files
def _causal_conv1d_reference(x, weight, bias=None, activation=None, **_):
    """The documented semantics of `causal_conv1d.causal_conv1d_fn`: x (B, C, T), weight (C, K) -> (B, C, T)."""
    taps = weight.shape[-1]
    out = F.conv1d(F.pad(x, (taps - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"activation {activation!r} is not part of this stand-in")
    return out


def _install_causal_conv1d_stand_in() -> bool:
    try:
        import causal_conv1d  # noqa: F401

        return False
    except ImportError:
        module = types.ModuleType("causal_conv1d")
        module.causal_conv1d_fn = _causal_conv1d_reference
        sys.modules["causal_conv1d"] = module
        return True


def _model_dir(scratch: Path) -> Path:
    for candidate in (scratch / "model", scratch):
        if (candidate / "gpt_base.py").is_file():
            return candidate
    raise SystemExit(f"{scratch}: no model/gpt_base.py of the authors' repository there")


def _import_package(model_dir: Path) -> None:
    # Their configs resolve their type hints with `typing.get_type_hints`, which walks up to transformers'
    # `PretrainedConfig`; under transformers 5 its hints name `torch`, which that module imports only for type
    # checkers. Give the module the name, so that the hints resolve.
    import transformers.configuration_utils

    if not hasattr(transformers.configuration_utils, "torch"):
        transformers.configuration_utils.torch = torch
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(model_dir)]
    sys.modules[PACKAGE] = package


def _import_file(model_dir: Path, filename: str):
    name = f"{PACKAGE}." + filename.removesuffix(".py").replace("-", "_").replace(".", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, model_dir / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(model_dir: Path, variant: str, seed: int) -> torch.nn.Module:
    """Their model of `variant` at SHAPE, built right after `torch.manual_seed(seed)`."""
    scalar = _import_file(model_dir, "DDL-vdim1-gpt-mha-rope.py")
    if variant == "baseline":
        base = _import_file(model_dir, "gpt_base.py")
        # `_tied_weights_keys` in transformers 5's form (a dict); GPTBase keeps transformers 4's list of the same tie.
        tie = {"lm_head.weight": "transformer.wte.weight"}
        gpt_class = type(
            "BaselineGPT", (base.GPTBase,), {"attention_cls": scalar.CausalSelfAttention, "_tied_weights_keys": tie}
        )
        config = scalar.GPTConfig(**SHAPE)
    else:
        filename, expanded = VARIANTS.get(variant) or (ACCELERATED[1], True)
        module = _import_file(model_dir, filename)
        gpt_class = module.GPT
        config = module.GPTConfig(**SHAPE, **(EXPANDED if expanded else {}))
    torch.manual_seed(seed)
    return gpt_class(config)


def _triton_available() -> bool:
    """Triton, for their accelerated file: on a machine without a GPU in its interpreter (TRITON_INTERPRET=1)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def probe_inputs(hidden_size: int, value_channels: int) -> dict[str, torch.Tensor]:
    """Inputs of one delta shortcut, (1, 4, ...): state X, a sublayer output h small enough that the guard shows,
    the block input x_in (v's source) and the normalized context c."""
    generator = torch.Generator().manual_seed(4321)
    shape = (1, 4, hidden_size)
    return {
        "probe/state": torch.randn(*shape, value_channels, generator=generator),
        "probe/h": torch.randn(*shape, generator=generator) * PROBE_SCALE,
        "probe/block_input": torch.randn(*shape, generator=generator),
        "probe/context": torch.randn(*shape, generator=generator),
    }


@torch.no_grad()
def run_probe(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """Their block 0 attention shortcut (`ddl_attn`) on the probe: the new state (1, 4, d, d_v)."""
    shortcut = model.transformer.h[0].ddl_attn
    return shortcut(
        probe["probe/state"], k_in=probe["probe/h"], v_in=probe["probe/block_input"], context=probe["probe/context"]
    )


# --------------------------------------------------------------------------- perturbing
def _noise(generator: torch.Generator, shape, scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> dict[str, str]:
    """Move every parameter off its initialization, in `named_parameters()` order from one generator; returns
    what was done to each kind, for the JSON."""
    generator = torch.Generator().manual_seed(seed)
    recipe = {}
    for name, parameter in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_rms.weight", "k_rms.weight")):
            kind, scale = "norm gains (init 1): + 0.3 N(0,1)", 0.3
        elif name.endswith(".read"):
            kind, scale = "compressor read vectors (init 1/d_v): + 0.3 N(0,1)", 0.3
        elif name == "input_embed.conv.weight":
            kind, scale = "EC filters (init identity): + 0.2 N(0,1)", 0.2
        elif name.endswith(("compress.weight", "readout.weight", "shortconv.weight")):
            kind, scale = "compressor kernels / token filters: + 0.3 N(0,1)", 0.3
        elif name.endswith(("beta.weight", "beta.bias", "v_proj.weight", "v_proj.bias")):
            kind, scale = "gates and values: + 0.3 N(0,1)", 0.3
        elif name == "transformer.wte.weight":
            kind, scale = "embedding (tied head): + 0.1 N(0,1)", 0.1
        else:
            kind, scale = "other matrices: + 0.1 N(0,1)", 0.1
        parameter.add_(_noise(generator, parameter.shape, scale))
        recipe[kind] = recipe.get(kind, 0) + 1
    return {kind: f"{count} tensors" for kind, count in recipe.items()}


# --------------------------------------------------------------------------- running
def run(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor):
    """Their logits (fp32, every position) and the gradient of their loss for every parameter."""
    model.train()  # dropout is 0 in their configs; train mode is how their loss is taken
    model.zero_grad(set_to_none=True)
    logits, loss = model(input_ids, targets)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert torch.equal(loss, expected), "their loss is the mean cross-entropy of their logits"
    loss.backward()
    gradients = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()}
    return logits.detach().clone(), loss.item(), gradients


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scratch", type=Path, help="folder with the authors' model/ folder")
    parser.add_argument(
        "--output_dir", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "authors"
    )
    parser.add_argument("--commit", default=None, help="the commit SCRATCH was extracted from (for the JSON)")
    args = parser.parse_args(argv)
    model_dir = _model_dir(args.scratch)
    # First: Triton reads TRITON_INTERPRET when it is imported, and torch or transformers may import it.
    accelerated = _triton_available()
    stand_in = _install_causal_conv1d_stand_in()
    _import_package(model_dir)
    torch.set_num_threads(1)

    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, LENGTH), generator=generator)
    targets = torch.randint(0, SHAPE["vocab_size"], (BATCH, LENGTH), generator=generator)
    tensors = {"input_ids": input_ids, "targets": targets}
    summary = {}
    for index, variant in enumerate(VARIANTS):
        model = build(model_dir, variant, seed=100 + index)
        recipe = perturb(model, seed=200 + index)
        logits, loss, gradients = run(model, input_ids, targets)
        state = model.state_dict()
        assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr(), "their head is tied"
        # safetensors keeps no shared storage: every tensor its own copy.
        tensors.update({f"{variant}/state/{key}": value.detach().clone().contiguous() for key, value in state.items()})
        tensors.update({f"{variant}/grad/{key}": value.contiguous() for key, value in gradients.items()})
        tensors[f"{variant}/logits"] = logits.contiguous()
        summary[variant] = dict(
            file=VARIANTS[variant][0],
            ddl_hf_variant=variant,
            state=variant,
            k_eps_form="plain",
            build_seed=100 + index,
            perturb_seed=200 + index,
            perturbation=recipe,
            parameters=sum(p.numel() for p in model.parameters()),
            loss=loss,
            logits_abs_max=logits.abs().max().item(),
            state_keys=len(state),
        )
        print(f"{variant}: loss {loss:.6f}, |logits| max {logits.abs().max().item():.3f}, {len(state)} keys")
        if variant == ACCELERATED[2]:
            probe = probe_inputs(SHAPE["hidden_size"], EXPANDED["ddl_value_channels"])
            tensors.update(probe)
            tensors[f"{variant}/probe_output"] = run_probe(model, probe)
            plain_state = {key: value.detach().clone() for key, value in state.items()}

    if accelerated:
        variant, filename, weights = ACCELERATED
        model = build(model_dir, variant, seed=0)
        model.load_state_dict(plain_state, strict=True)
        logits, loss, gradients = run(model, input_ids, targets)
        tensors.update({f"{variant}/grad/{key}": value.contiguous() for key, value in gradients.items()})
        tensors[f"{variant}/logits"] = logits.contiguous()
        tensors[f"{variant}/probe_output"] = run_probe(model, probe)
        import triton

        summary[variant] = dict(
            file=filename,
            ddl_hf_variant=weights,
            state=weights,  # their state dict of `weights`, loaded with strict=True
            k_eps_form="accelerated",
            triton_version=triton.__version__,
            triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
            loss=loss,
            logits_abs_max=logits.abs().max().item(),
            logits_minus_plain_abs_max=(logits - tensors[f"{weights}/logits"]).abs().max().item(),
        )
        moved = summary[variant]["logits_minus_plain_abs_max"]
        print(f"{variant}: loss {loss:.6f}, |logits - {weights}'s| max {moved:.2e}")
    else:
        print(f"{ACCELERATED[0]}: skipped, Triton is not installed (their {ACCELERATED[1]} needs it)")

    from safetensors.torch import save_file

    args.output_dir.mkdir(parents=True, exist_ok=True)
    fixture = args.output_dir / "authors_models.safetensors"
    save_file(tensors, fixture)
    fixture.chmod(0o644)  # safetensors writes it readable by its owner only
    config = dict(
        source=f"{REPOSITORY}, model/*.py at commit {args.commit or 'unknown'}",
        made_by="scripts/make_authors_fixture.py",
        torch_version=torch.__version__,
        dtype="float32",
        shape=SHAPE,
        expanded_state=EXPANDED,
        batch=BATCH,
        length=LENGTH,
        inputs="input_ids, targets: torch.randint(0, vocab_size, (batch, length)) from Generator seed 1234",
        loss="mean cross-entropy of their logits against targets (no shift), their model in train mode",
        causal_conv1d="reference stand-in (depthwise causal conv1d)" if stand_in else "the causal-conv1d package",
        keys="{variant}/state/{their key}, {variant}/grad/{their key}, {variant}/logits, input_ids, targets; "
        "a variant's weights are {state}/state/* with its `state`",
        probe=dict(
            what="their block 0 ddl_attn (DeepDeltaResidualExpanded) on probe/state, k_in=probe/h, "
            "v_in=probe/block_input, context=probe/context; output in {variant}/probe_output",
            variants=[ACCELERATED[2], ACCELERATED[0]],
            h_scale=PROBE_SCALE,
            seed=4321,
        ),
        variants=summary,
    )
    (args.output_dir / "authors_models.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{fixture}: {fixture.stat().st_size / 1024:.0f} KiB, {len(tensors)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
