"""`ddl bench` on the tiny preset: the report's structure, its ratios and the measurement harness.

No timing is asserted (speed is only measured by the command itself); what is checked is exact:
the JSON layout, that every ratio is its figure divided by the baseline's, the interleaving
order of the harness, and the argument errors.
"""

import json

import pytest

from ddl_hf import bench
from ddl_hf.cli import main as cli_main

TINY = ["--preset", "tiny", "--seq_len", "16", "--batch_size", "2", "--repeats", "2", "--warmup", "1"]
TINY += ["--decode_prompt_len", "4", "--decode_tokens", "2", "--decode_batch_sizes", "1", "2"]
FIGURES = {
    "train_tokens_per_s": "train_ratio",
    "prefill_tokens_per_s": "prefill_ratio",
    "decode_tokens_per_s": "decode_ratio",
    "decode_batch_1_tokens_per_s": "decode_batch_1_ratio",
    "decode_batch_2_tokens_per_s": "decode_batch_2_ratio",
    "activation_bytes": "activation_ratio",
    "peak_memory_bytes": "memory_ratio",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One run of `ddl bench` with its memory subprocesses; `baseline` is added to the variants."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert cli_main(["bench", *TINY, "--variants", "write-only-cc", "ddl-cc", "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.slow
def test_report_structure(report):
    config, results = report["config"], report["results"]
    assert config["variants"] == ["baseline", "write-only-cc", "ddl-cc"]
    assert list(results) == config["variants"]
    for key, value in dict(preset="tiny", seq_len=16, batch_size=2, dtype="float32", device="cpu", repeats=2).items():
        assert config[key] == value
    assert config["ops"] == "fast" and config["timer"] == "wall" and config["decode_batch_sizes"] == [1, 2]
    assert "live CPU tensors" in config["memory"]
    for entry in results.values():
        assert set(entry) == set(FIGURES) | set(FIGURES.values())
        assert all(isinstance(value, float | int) and value > 0 for value in entry.values())
        assert entry["decode_tokens_per_s"] == entry["decode_batch_2_tokens_per_s"]  # the largest decode batch


@pytest.mark.slow
def test_ratios_are_figures_over_the_baseline(report):
    results = report["results"]
    baseline = results["baseline"]
    for entry in results.values():
        for figure, ratio in FIGURES.items():
            assert entry[ratio] == pytest.approx(entry[figure] / baseline[figure], rel=1e-12)
    assert all(baseline[ratio] == 1.0 for ratio in FIGURES.values())


@pytest.mark.slow
def test_activation_bytes_follow_what_each_variant_keeps(report):
    """Counted exactly: the d_v = 4 state is larger than the vector stream, and the write-only update
    does not keep its state for backward (it never reads it), so it saves less than DDL."""
    results = report["results"]
    assert results["ddl-cc"]["activation_bytes"] > results["write-only-cc"]["activation_bytes"]
    assert results["write-only-cc"]["activation_bytes"] > results["baseline"]["activation_bytes"]


@pytest.mark.slow
def test_table_lists_every_variant_with_its_ratios(report):
    table = bench.format_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("| variant | train tok/s | prefill tok/s | decode b1 tok/s | decode b2 tok/s")
    assert len(lines) == 2 + len(report["results"])
    for line, (name, entry) in zip(lines[2:], report["results"].items()):
        assert line.startswith(f"| {name} |")
        assert f"({entry['train_ratio']:.2f}x)" in line and f"({entry['memory_ratio']:.2f}x)" in line


def test_interleaving_rotates_the_order_and_takes_medians():
    calls = []
    values = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 5.0, 7.0, 6.0]), "c": iter([9.0, 4.0, 4.0, 8.0])}

    def measure(name):
        calls.append(name)
        return next(values[name])

    medians = bench.interleaved_medians(["a", "b", "c"], measure, repeats=3, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert medians == {"a": 2.0, "b": 6.0, "c": 4.0}  # warm-up values (9.0) are dropped


def test_ratio_keys():
    assert bench._ratio_key("train_tokens_per_s") == "train_ratio"
    assert bench._ratio_key("decode_batch_8_tokens_per_s") == "decode_batch_8_ratio"
    assert bench._ratio_key("peak_memory_bytes") == "memory_ratio"
    assert bench._ratio_key("activation_bytes") == "activation_ratio"


@pytest.mark.slow
def test_state_recompute_variants_are_measured_beside_their_plain_variant(tmp_path):
    """`--state_recompute`: each DDL variant also as VARIANT+recompute, with its figures over the plain variant's;
    it keeps fewer activation bytes (no (d, d_v) state). (Peak memory is
    not compared: at this size the weights and the rebuilt states' transients outweigh the activations.)"""
    path = tmp_path / "bench.json"
    arguments = [*TINY, "--variants", "ddl-scalar", "ddl-cc", "--state_recompute", "--json", str(path)]
    assert cli_main(["bench", *arguments]) == 0
    report = json.loads(path.read_text())
    names = ["baseline", "ddl-scalar", "ddl-cc", "ddl-scalar+recompute", "ddl-cc+recompute"]
    assert report["config"]["variants"] == names and list(report["results"]) == names
    results = report["results"]
    for plain in ("ddl-scalar", "ddl-cc"):
        recomputing = results[plain + "+recompute"]
        for figure, ratio in FIGURES.items():
            assert recomputing[ratio + "_to_plain"] == pytest.approx(recomputing[figure] / results[plain][figure])
        assert recomputing["activation_bytes"] < results[plain]["activation_bytes"]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--variants", "ddl-xx"], "--variants: unknown variant"),
        (["--variants", "ddl-cc", "ddl-cc"], "twice"),
        (["--preset", "huge"], "--preset 'huge' is unknown"),
        (["--dtype", "float8"], "--dtype 'float8' is unknown"),
        (["--repeats", "0"], "--repeats must be an integer >= 1"),
        (["--warmup", "-1"], "--warmup must be an integer >= 0"),
        (["--decode_batch_sizes", "0"], "--decode_batch_sizes must be integers >= 1"),
        (["--timer", "gpu"], "--timer must be one of"),
        (["--device", "tpu"], "--device must be cpu, cuda"),
    ],
)
def test_bad_arguments_are_reported(arguments, message, capsys):
    assert bench.main(arguments) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_bench_reports_compile_time_apart_and_decodes_the_eager_tokens(tmp_path):
    """`--compile`: the same figures and ratios, plus each workload's compile time; compiled decoding with the static
    cache gives the eager greedy tokens, and later runs reuse the graphs (no recompilation while timing). The
    aot_eager backend traces as inductor does; inductor's kernels are checked against eager in test_compile.py."""
    import torch

    path = tmp_path / "compiled.json"
    compiling = ["--compile", "--compile_backend", "aot_eager"]  # tracing as inductor sees it, without codegen
    argv = ["bench", *TINY, "--variants", "ddl-tc", "--skip_memory", *compiling, "--json", str(path)]
    assert cli_main(argv) == 0
    report = json.loads(path.read_text())
    assert report["config"]["compile"] == "aot_eager"
    for entry in report["results"].values():
        assert set(entry["compile_s"]) == {"train", "prefill", "decode_batch_1", "decode_batch_2"}
        assert all(seconds > 0 for seconds in entry["compile_s"].values())
        figures = {key for key in FIGURES if key != "peak_memory_bytes"}
        assert figures | {FIGURES[key] for key in figures} | {"compile_s"} == set(entry)

    arguments = bench.build_parser().parse_args([*TINY, *compiling, "--device", "cpu"])
    eager_arguments = bench.build_parser().parse_args([*TINY, "--device", "cpu"])
    compiled, eager = bench.Workload(arguments, "ddl-tc"), bench.Workload(eager_arguments, "ddl-tc")
    for batch_size in (1, 2):
        compiled.decode(batch_size)
        eager.decode(batch_size)
        assert torch.equal(compiled.last_decoded, eager.last_decoded)
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled.decode(batch_size)
        assert torch.equal(compiled.last_decoded, eager.last_decoded)


@pytest.mark.slow
def test_compiled_activation_bytes_are_what_the_compiled_graph_saves():
    """With `--compile` the activation figure is the compiled model's: the tensors its backward graph receives as
    saved inputs (what AOTAutograd's partitioner chose to keep), not what eager autograd would keep. A backend with
    the partitioner that inductor uses hands each backward call's inputs to this test, which counts their distinct
    non-parameter storages the way `activation_bytes` does."""
    import torch
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved_storages: dict[int, int] = {}

    def backward_compiler(graph, example_inputs):
        placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
        tangents = sum(node.name.startswith("tangents") for node in placeholders)
        boxed = make_boxed_func(graph)

        def run(inputs):
            for tensor in inputs[: len(inputs) - tangents]:  # the saved tensors, then the incoming gradients
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in parameters:
                    saved_storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return boxed(inputs)

        run._boxed_call = True
        return run

    def forward_compiler(graph, example_inputs):
        return make_boxed_func(graph)

    backend = aot_autograd(
        fw_compiler=forward_compiler, bw_compiler=backward_compiler, partition_fn=min_cut_rematerialization_partition
    )
    arguments = bench.build_parser().parse_args([*TINY, "--compile", "--device", "cpu"])
    arguments.compile_backend = backend
    compiled = bench.Workload(arguments, "ddl-cc")
    parameters = {p.untyped_storage().data_ptr() for p in compiled.model.parameters()}
    eager = bench.Workload(bench.build_parser().parse_args([*TINY, "--device", "cpu"]), "ddl-cc")

    figure = compiled.activation_bytes()
    compiled.model.train()
    compiled.forward(input_ids=compiled.input_ids, labels=compiled.input_ids).loss.backward()
    assert saved_storages, "the compiled graph's backward never ran"
    assert figure == sum(saved_storages.values())
    # The partitioner recomputes cheap intermediates instead of saving them: the compiled model keeps less.
    assert figure < eager.activation_bytes()
