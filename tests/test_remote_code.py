"""Sharing: a saved folder loads with `trust_remote_code=True` in a fresh Python process where `ddl_hf`
cannot be imported, and gives the same logits and generated tokens as the original model."""

import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import perturb, random_tokens, run_fresh_python, tiny_model
from ddl_hf import PRESET_VARIANTS, DDLForCausalLM

VARIANTS = list(PRESET_VARIANTS)
NEW_TOKENS = 6

# Runs in the fresh process: hides the package, loads every variant through the saved code only.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "ddl_hf"))]
    sys.modules["ddl_hf"] = None  # an installed package (editable finders included) cannot be imported
    try:
        import ddl_hf  # noqa: F401
        package_importable = True
    except ImportError:
        package_importable = False

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    root = sys.argv[1]
    inputs = torch.load(os.path.join(root, "inputs.pt"))
    results = {"package_importable": package_importable, "variants": {}}
    for variant in inputs["variants"]:
        folder = os.path.join(root, variant)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(inputs["ids"]).logits
        generated = model.generate(inputs["prompt"], max_new_tokens=inputs["new_tokens"], do_sample=False)
        results["variants"][variant] = {
            "class_module": type(model).__module__,
            "logits": logits,
            "generated": generated,
        }
    backbone = AutoModel.from_pretrained(os.path.join(root, inputs["variants"][0]), trust_remote_code=True).eval()
    with torch.no_grad():
        results["backbone_class"] = type(backbone).__name__
        results["backbone_hidden"] = backbone(inputs["ids"]).last_hidden_state
    results["package_modules_loaded"] = sorted(
        name for name, module in sys.modules.items() if name.split(".")[0] == "ddl_hf" and module is not None
    )
    torch.save(results, os.path.join(root, "results.pt"))
    """
)


@pytest.fixture(scope="module")
def saved_variants(tmp_path_factory):
    """Every variant, tiny and moved off its init, saved next to the inputs and the expected outputs."""
    root = tmp_path_factory.mktemp("remote")
    generator = torch.Generator().manual_seed(5)
    inputs = {
        "variants": VARIANTS,
        "ids": random_tokens(2, 9, generator=generator),
        "prompt": random_tokens(2, 4, generator=generator),
        "new_tokens": NEW_TOKENS,
    }
    expected = {}
    for variant in VARIANTS:
        model = perturb(tiny_model(variant).eval(), 0.1, generator=generator)
        with torch.no_grad():
            logits = model(inputs["ids"]).logits
        generated = model.generate(inputs["prompt"], max_new_tokens=NEW_TOKENS, do_sample=False)
        model.save_pretrained(root / variant)
        expected[variant] = {"model": model, "logits": logits, "generated": generated}
    torch.save(inputs, root / "inputs.pt")
    return root, inputs, expected


@pytest.fixture(scope="module")
def remote_results(saved_variants):
    """Runs REMOTE_SCRIPT once, for all variants, in a fresh offline process."""
    root = saved_variants[0]
    completed = run_fresh_python(REMOTE_SCRIPT, root, cwd=root, modules_cache=root / "hf_modules")
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(root / "results.pt")


@pytest.mark.slow
def test_fresh_process_cannot_import_the_package(remote_results):
    assert remote_results["package_importable"] is False
    assert remote_results["package_modules_loaded"] == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_remote_code_gives_identical_logits_and_tokens(variant, saved_variants, remote_results):
    expected = saved_variants[2][variant]
    result = remote_results["variants"][variant]
    assert result["class_module"].startswith("transformers_modules.")
    assert result["class_module"].endswith(".modeling_ddl")
    max_diff = (result["logits"] - expected["logits"]).abs().max().item()
    assert torch.equal(result["logits"], expected["logits"]), f"max abs difference {max_diff:.3e}"
    assert torch.equal(result["generated"], expected["generated"])


@pytest.mark.slow
def test_remote_code_loads_the_backbone_through_automodel(saved_variants, remote_results):
    _, inputs, expected = saved_variants
    assert remote_results["backbone_class"] == "DDLModel"
    with torch.no_grad():
        hidden = expected[VARIANTS[0]]["model"].model(inputs["ids"]).last_hidden_state
    assert torch.equal(remote_results["backbone_hidden"], hidden)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reload_without_remote_code_uses_the_package_and_is_bit_exact(variant, saved_variants):
    root, inputs, expected = saved_variants
    model = AutoModelForCausalLM.from_pretrained(root / variant, trust_remote_code=False).eval()
    assert type(model) is DDLForCausalLM
    with torch.no_grad():
        assert torch.equal(model(inputs["ids"]).logits, expected[variant]["logits"])
    generated = model.generate(inputs["prompt"], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, expected[variant]["generated"])


def test_remote_code_beside_the_package_in_one_process_trains_through_its_own_operators(saved_variants):
    """The saved modeling files, imported as remote code next to the installed package, register their own
    token-compressor operators (named after their module) and train exactly like the package's model."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    root, inputs, expected = saved_variants
    remote_class = get_class_from_dynamic_module("modeling_ddl.DDLForCausalLM", str(root / "ddl-tc"))
    assert remote_class.__module__.startswith("transformers_modules.")
    remote = remote_class.from_pretrained(root / "ddl-tc")
    package = expected["ddl-tc"]["model"]
    ids = inputs["ids"]
    losses = [model(ids, labels=ids).loss for model in (package, remote)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    remote_grads = dict(remote.named_parameters())
    for name, parameter in package.named_parameters():
        assert torch.equal(parameter.grad, remote_grads[name].grad), name
    operator_namespaces = [name for name in dir(torch.ops) if name.startswith("ddl_hf_ops_")]
    assert "ddl_hf_ops_ddl_hf_models_ddl_delta_ops" in operator_namespaces
    assert any("transformers_modules" in name for name in operator_namespaces)
    package.zero_grad(set_to_none=True)
