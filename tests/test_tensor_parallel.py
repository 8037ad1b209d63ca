"""Tensor parallelism: `from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun
shards the Llama parts of a DDL model (attention by heads, the SwiGLU MLP by its hidden width, the embedding and
a tied LM head by the vocabulary) and replicates the DDL parts; the sharded model gives the single-process
logits. Runs on CPU with 2 gloo processes."""

import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import offline_env, perturb, random_tokens, tiny_model
from ddl_hf import DDLConfig, DDLForCausalLM, DDLForSequenceClassification

LLAMA_PARTS = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_plan_shards_the_llama_parts_and_keeps_the_lm_head_consistent_with_the_embedding(tied):
    model = DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-tc", tie_word_embeddings=tied))
    # transformers adds `embed_tokens` (vocabulary rows) to a base plan; the LM head splits the same vocabulary,
    # so a tied head, which is the embedding's tensor, is sharded once and consistently.
    assert model.tp_plan == {
        "lm_head": "colwise_gather_output",
        "model.embed_tokens": "embedding_rowwise",
        **LLAMA_PARTS,
    }
    assert model.supports_tp_plan
    classifier = DDLForSequenceClassification(DDLConfig.from_preset("tiny", "ddl-cc", num_labels=2))
    assert classifier.tp_plan == {"model.embed_tokens": "embedding_rowwise", **LLAMA_PARTS}  # `score` replicated


TP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import ddl_hf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DistributedConfig

    root = sys.argv[1]
    inputs = torch.load(os.path.join(root, "inputs.pt"))
    results = {}
    for name, kind in inputs["folders"].items():
        auto = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
        model = auto.from_pretrained(
            os.path.join(root, name), distributed_config=DistributedConfig(tp_plan="auto")
        ).eval()
        sharded = {
            n: (str(p.data.placements), tuple(p.data.to_local().shape))
            for n, p in model.named_parameters()
            if type(p.data).__name__ == "DTensor"
        }
        with torch.no_grad():
            result = {
                "tp_size": model.tp_size,
                "sharded": sharded,
                "replicated": sorted(n for n, p in model.named_parameters() if type(p.data).__name__ != "DTensor"),
                "logits": model(inputs["ids"]).logits,
                "masked": model(inputs["ids"], attention_mask=inputs["mask"]).logits,
            }
        if kind == "lm":
            result["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
            result["generated"] = model.generate(inputs["prompt"], max_new_tokens=5, do_sample=False)
        results[name] = result
    torch.save(results, os.path.join(root, f"results{torch.distributed.get_rank()}.pt"))
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """Three models saved, their single-process outputs, and what 2 tensor-parallel processes computed."""
    root = tmp_path_factory.mktemp("tp")
    generator = torch.Generator().manual_seed(11)
    ids = random_tokens(2, 9, generator=generator, low=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    inputs = {"ids": ids, "mask": mask, "prompt": ids[:, 5:], "folders": {}}
    expected = {}
    models = {
        "baseline-tied": tiny_model("baseline"),
        "ddl-tc-tied": tiny_model("ddl-tc"),
        "ddl-cc-untied": tiny_model("ddl-cc", tie_word_embeddings=False),
        "ddl-cc-classifier": DDLForSequenceClassification(
            DDLConfig.from_preset("tiny", "ddl-cc", num_labels=3, pad_token_id=0)
        ),
    }
    for name, model in models.items():
        model = perturb(model.eval(), 0.1, generator=generator)
        model.save_pretrained(root / name)
        inputs["folders"][name] = "classifier" if "classifier" in name else "lm"
        with torch.no_grad():
            expected[name] = {
                "logits": model(ids).logits,
                "masked": model(ids, attention_mask=mask).logits,
                "model": model,
            }
        if inputs["folders"][name] == "lm":
            expected[name]["generated"] = model.generate(inputs["prompt"], max_new_tokens=5, do_sample=False)
    torch.save(inputs, root / "inputs.pt")
    (root / "tp_script.py").write_text(TP_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(root / "tp_script.py"), str(root),
    ]  # fmt: skip
    completed = subprocess.run(
        command, cwd=root, env=offline_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=400
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = [torch.load(root / f"results{rank}.pt") for rank in range(2)]
    return expected, results


@pytest.mark.slow
def test_tensor_parallel_logits_equal_the_single_process_logits(tensor_parallel_run):
    expected, results = tensor_parallel_run
    for rank_results in results:
        for name, reference in expected.items():
            got = rank_results[name]
            assert got["tp_size"] == 2
            # Sharded matrix products sum in another order: equal up to float32 rounding.
            torch.testing.assert_close(got["logits"], reference["logits"], rtol=0, atol=1e-5, msg=name)
            torch.testing.assert_close(got["masked"], reference["masked"], rtol=0, atol=1e-5, msg=name)
            if "generated" in reference:
                assert torch.equal(got["generated"], reference["generated"]), name


def _shard(size: int, rank: int) -> int:
    """Rows (or columns) that rank 0 or 1 holds of `size`: torch.chunk sizes, so an odd size splits unevenly."""
    return (size + 1) // 2 if rank == 0 else size // 2


@pytest.mark.slow
def test_tensor_parallel_shards_the_llama_parts_and_replicates_the_ddl_parts(tensor_parallel_run):
    expected, results = tensor_parallel_run
    for rank, rank_results in enumerate(results):
        for name, reference in expected.items():
            got = rank_results[name]
            model = reference["model"]
            config = model.config
            d, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
            heads = config.num_attention_heads * config.head_dim
            rows, columns = "(Shard(dim=0),)", "(Shard(dim=1),)"
            want = {"model.embed_tokens.weight": (rows, (_shard(vocab, rank), d))}
            for i in range(config.num_hidden_layers):
                layer = f"model.layers.{i}."
                for proj in ("q_proj", "k_proj", "v_proj"):
                    want[f"{layer}self_attn.{proj}.weight"] = (rows, (_shard(heads, rank), d))
                want[f"{layer}self_attn.o_proj.weight"] = (columns, (d, _shard(heads, rank)))
                for proj in ("gate_proj", "up_proj"):  # intermediate_size 85: 43 + 42
                    want[f"{layer}mlp.{proj}.weight"] = (rows, (_shard(inner, rank), d))
                want[f"{layer}mlp.down_proj.weight"] = (columns, (d, _shard(inner, rank)))
            if name == "ddl-cc-untied":
                want["lm_head.weight"] = (rows, (_shard(vocab, rank), d))
            assert got["sharded"] == want, (name, rank)
            # Everything else, the DDL parts (shortcuts, compressors, embedding convolution), the norms and the
            # classifier's score, is whole on every rank.
            replicated = sorted(set(dict(model.named_parameters())) - set(want))
            assert got["replicated"] == replicated, (name, rank)
            assert name.startswith("baseline") or any(".attn_shortcut." in key for key in replicated)
            if name.endswith("-tied"):
                assert got["tied"] is True  # the LM head is the sharded embedding itself
