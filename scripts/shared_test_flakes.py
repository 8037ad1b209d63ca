"""How often one of transformers' shared generation tests fails, per test class, over seeded inputs.

The shared tests draw their token ids from an unseeded generator (`ids_tensor`'s module-level `random.Random()`), so
each run of the suite tries new inputs. For `--trials` seeded runs per class (trial i: seed i) this script runs:

- `test_generate_with_static_cache` (the default) as its own steps: the tester's config and inputs,
  `set_config_for_less_flaky_test`, greedy generation with a static and a dynamic cache in fp32 and fp16. It counts,
  in fp16, the runs whose tokens differ and those the test's mismatch check fails at its tolerance (1e-5) and at
  transformers' later one (5e-5, huggingface/transformers#48815).
- any other test method named by `--test` (e.g. `test_sdpa_padding_matches_padding_free_with_position_ids`) as
  the harness defines it, counting the runs that fail.

It runs inside the scratch folder that `../shared/hfsuite/assemble.sh` builds (transformers' test code is never
part of this repository), with that folder's python:

    /tmp/hfsuite/venv/bin/python scripts/shared_test_flakes.py --harness /tmp/hfsuite --trials 100 cc scalar llama

`--head_scale S` multiplies the LM head's weights by S (static-cache test only), to ask whether a model's logit size
alone makes it fail.
"""

import argparse
import copy
import sys
import unittest

CLASSES = {
    "llama": ("tests.models.llama.test_modeling_llama", "LlamaModelTest"),
    "default": ("tests.models.ddl.test_modeling_ddl", "DDLModelTest"),
    "cc": ("tests.models.ddl.test_modeling_ddl", "DDLCCModelTest"),
    "ccnoec": ("tests.models.ddl.test_modeling_ddl", "DDLCCNoECModelTest"),
    "tc": ("tests.models.ddl.test_modeling_ddl", "DDLTCModelTest"),
    "tcnoec": ("tests.models.ddl.test_modeling_ddl", "DDLTCNoECModelTest"),
    "scalar": ("tests.models.ddl.test_modeling_ddl", "DDLScalarModelTest"),
    "writeonly": ("tests.models.ddl.test_modeling_ddl", "DDLWriteOnlyCCModelTest"),
    "baseline": ("tests.models.ddl.test_modeling_ddl", "DDLBaselineModelTest"),
}
TOLERANCES = (1e-5, 5e-5)
STATIC_CACHE_TEST = "test_generate_with_static_cache"


def count_failures(test_class: type, test_name: str, trials: int) -> int:
    """How many of `trials` seeded runs of the harness's own `test_name` on `test_class` fail."""
    import tests.test_modeling_common as common
    from transformers import set_seed

    failures = 0
    for trial in range(trials):
        common.global_rng.seed(trial)
        set_seed(trial)  # the weights too: unlike the static-cache test, these tests leave torch's generator as it is
        test_case = test_class(test_name)
        test_case.setUp()
        try:
            getattr(test_case, test_name)()
        except AssertionError:
            failures += 1
    return failures


def count_flakes(test_case: unittest.TestCase, trials: int, head_scale: float) -> dict:
    """Counts over `trials` seeded inputs: "flips" (fp16 runs whose tokens differ), "fail@TOL" (runs the test fails
    at TOL) and "max_logit" (the largest |logit| seen)."""
    import tests.test_modeling_common as common
    import torch
    from tests.generation.test_utils import _get_generate_outputs_mismatch_message
    from transformers import set_seed
    from transformers.testing_utils import set_config_for_less_flaky_test, set_model_for_less_flaky_test

    model_class = test_case.all_generative_model_classes[0]
    counts = {"flips": 0, **{f"fail@{tol:g}": 0 for tol in TOLERANCES}, "max_logit": 0.0}
    for trial in range(trials):
        common.global_rng.seed(trial)  # the generator behind ids_tensor, which the test leaves unseeded
        set_seed(42)  # as the test does
        config, inputs = test_case.prepare_config_and_inputs_for_generate()
        set_config_for_less_flaky_test(config)
        config.is_decoder = True
        for dtype in (torch.float32, torch.float16):
            model = model_class(copy.deepcopy(config)).to(dtype).eval()
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(head_scale)
            inputs = {
                key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                for key, value in inputs.items()
            }
            set_model_for_less_flaky_test(model)
            options = dict(max_new_tokens=20, return_dict_in_generate=True, output_scores=True, use_cache=True)
            static = model.generate(**options, **inputs, cache_implementation="static")
            dynamic = model.generate(**options, **inputs)
            largest = max(scores.abs().max().item() for scores in dynamic.scores)
            counts["max_logit"] = max(counts["max_logit"], largest)
            if dtype == torch.float16:
                counts["flips"] += int(not torch.equal(static.sequences, dynamic.sequences))
                for tol in TOLERANCES:
                    counts[f"fail@{tol:g}"] += int(
                        bool(_get_generate_outputs_mismatch_message(dynamic, static, tol, tol))
                    )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("classes", nargs="+", choices=sorted(CLASSES))
    parser.add_argument("--harness", required=True, help="the folder ../shared/hfsuite/assemble.sh built")
    parser.add_argument("--test", default=STATIC_CACHE_TEST, help="the shared test method to repeat")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--head_scale", type=float, default=1.0)
    args = parser.parse_args()
    sys.path.insert(0, args.harness)
    import importlib

    static_cache = args.test == STATIC_CACHE_TEST
    if static_cache:
        fails_header = " | ".join(f"fails at {tol:g}" for tol in TOLERANCES)
        print(f"| class | trials | fp16 token flips | {fails_header} | max abs logit |")
        print("|---|---|---|" + "---|" * len(TOLERANCES) + "---|")
    else:
        print(f"| class | trials | `{args.test}` fails |")
        print("|---|---|---|")
    for name in args.classes:
        module, class_name = CLASSES[name]
        test_class = getattr(importlib.import_module(module), class_name)
        if not static_cache:
            print(f"| {name} | {args.trials} | {count_failures(test_class, args.test, args.trials)} |", flush=True)
            continue
        test_case = test_class(STATIC_CACHE_TEST)
        test_case.setUp()
        counts = count_flakes(test_case, args.trials, args.head_scale)
        fails = " | ".join(str(counts[f"fail@{tol:g}"]) for tol in TOLERANCES)
        label = name if args.head_scale == 1.0 else f"{name} (head x{args.head_scale:g})"
        print(f"| {label} | {args.trials} | {counts['flips']} | {fails} | {counts['max_logit']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
