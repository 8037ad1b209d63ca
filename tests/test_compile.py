"""torch.compile end to end (`_can_compile_fullgraph = True`): the forward pass has no host synchronisation
and no graph break, so `fullgraph=True` compiles generation with a static cache (conv states included) and a
training step, on every variant, with the eager results; prompts of other lengths do not recompile the
decoding step.

The fullgraph property is decided while dynamo traces, before any backend runs, so most tests use the cheap
`aot_eager` backend (functionalization and AOT autograd included); one runs inductor."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import CompileConfig

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import PRESET_VARIANTS, DDLForCausalLM

# Compiled kernels are cached across runs (a cold inductor compile of the tiny models takes tens of seconds).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ddl_hf_inductor_cache"))

VARIANTS = list(PRESET_VARIANTS)
GENERATE = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(variant: str) -> DDLForCausalLM:
    return perturb(tiny_model(variant), 0.05, seed=1, filter_scale=0.3).eval()


def prompts() -> list[torch.Tensor]:
    """A prompt, a shorter one, and one of a third length."""
    return [random_tokens(2, length, seed=seed, low=1) for length, seed in ((8, 3), (5, 4), (6, 5))]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_forward_generates_the_eager_tokens_without_recompiling(variant):
    model = make_model(variant)
    inputs = prompts()
    eager = [model.generate(ids, **GENERATE) for ids in inputs]
    counter = CompileCounterWithBackend("aot_eager")
    model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)

    assert torch.equal(model.generate(inputs[0], **GENERATE), eager[0])
    # The prefill, and one graph for every decoding step (the cache length is a tensor, not a guard).
    assert counter.frame_count == 2
    assert torch.equal(model.generate(inputs[1], **GENERATE), eager[1])
    # The shorter prompt compiles its prefill once more (now with a dynamic length); decoding is reused.
    assert counter.frame_count == 3
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(model.generate(inputs[2], **GENERATE), eager[2])
    assert counter.frame_count == 3


@pytest.mark.slow
def test_inductor_compiled_generation_matches_eager():
    """Inductor's kernels on the variant with the most state: token compressor and embedding convolution."""
    model = make_model("ddl-tc")
    ids = prompts()[0]
    eager = model.generate(ids, **GENERATE)
    counter = CompileCounterWithBackend("inductor")
    model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)
    assert torch.equal(model.generate(ids, **GENERATE), eager)
    assert counter.frame_count == 2


def test_generate_compiles_the_decoding_step_and_a_shorter_prompt_does_not_recompile():
    """transformers' own route: with a static cache `generate` compiles the decoding step (`compile_config`;
    on CPU only when forced, as transformers' own test does); the prefill runs eagerly."""
    model = make_model("ddl-tc")
    inputs = prompts()
    eager = [model.generate(ids, **GENERATE) for ids in inputs[:2]]
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True
    graphs = torch._dynamo.utils.counters["stats"]  # (`generate` deep-copies the config, a counting backend too)
    graphs.clear()
    assert torch.equal(model.generate(inputs[0], compile_config=compile_config, **GENERATE), eager[0])
    assert hasattr(model, "_compiled_call") and graphs["unique_graphs"] == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(model.generate(inputs[1], compile_config=compile_config, **GENERATE), eager[1])
    assert graphs["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_fullgraph_training_step_matches_eager(variant):
    eager = make_model(variant).train()
    compiled_copy = copy.deepcopy(eager)
    ids = random_tokens(2, 9, seed=1)
    labels = ids.clone()
    labels[0, :3] = -100
    eager_out = eager(input_ids=ids, labels=labels)
    eager_out.loss.backward()
    counter = CompileCounterWithBackend("aot_eager")
    compiled_out = torch.compile(compiled_copy, fullgraph=True, backend=counter)(input_ids=ids, labels=labels)
    compiled_out.loss.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)
    compiled_parameters = dict(compiled_copy.named_parameters())
    for name, parameter in eager.named_parameters():
        torch.testing.assert_close(compiled_parameters[name].grad, parameter.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_forward_with_labels_and_padding_compiles_as_one_graph():
    """The id and label range checks read values, so they run only eagerly on CPU tensors (where they raise a
    clear ValueError, tests/test_bad_inputs.py); fullgraph compile proves the traced forward holds no such read."""
    model = make_model("ddl-tc")
    ids = random_tokens(2, 6, seed=2)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert counter.frame_count == 1
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-6, atol=1e-6)
