"""`DDLConfig.state_recompute`: backward rebuilds the (d, d_v) states from the first one and the rewrites' h and w
(`delta_ops.recomputed_states`), with the gradients of the plain path bit for bit and only the first state kept."""

import copy

import pytest
import torch

from conftest import perturb, random_tokens, tiny_model
from ddl_hf import DDLConfig
from ddl_hf.models.ddl.delta_ops import StateLedger

DDL_VARIANTS = ["ddl-cc", "ddl-tc", "ddl-scalar", "write-only-cc", "ddl-cc-noec"]


def loss_and_gradients(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


def assert_identical(first, second):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("variant", DDL_VARIANTS)
def test_gradients_equal_the_plain_path_bit_for_bit(variant):
    plain = perturb(tiny_model(variant), 0.1, seed=1, filter_scale=0.3)
    recomputing = copy.deepcopy(plain)
    recomputing.config.state_recompute = True
    ids = random_tokens(2, 16, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding reaches the token convolutions' masks
    assert_identical(loss_and_gradients(plain, ids), loss_and_gradients(recomputing, ids))
    assert_identical(
        loss_and_gradients(plain, ids, attention_mask=mask), loss_and_gradients(recomputing, ids, attention_mask=mask)
    )


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc"])
def test_gradients_equal_under_bf16_autocast(variant):
    """The embedding expansion is rebuilt under the forward's autocast, which decides its dtypes."""
    plain = perturb(tiny_model(variant), 0.1, seed=1, filter_scale=0.3)
    recomputing = copy.deepcopy(plain)
    recomputing.config.state_recompute = True
    ids = random_tokens(2, 16, seed=1)
    results = []
    for model in (plain, recomputing):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_gradients(model, ids))
    assert_identical(*results)


def test_gradients_equal_with_gradient_checkpointing_and_packed_documents():
    plain = perturb(tiny_model("ddl-tc"), 0.1, seed=1, filter_scale=0.3)
    recomputing = copy.deepcopy(plain)
    recomputing.config.state_recompute = True
    recomputing.gradient_checkpointing_enable()
    ids = random_tokens(2, 12, seed=2)
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])  # two documents in row 0
    assert_identical(
        loss_and_gradients(plain, ids, position_ids=positions),
        loss_and_gradients(recomputing, ids, position_ids=positions),
    )


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc", "ddl-scalar"])
def test_no_state_is_kept_but_a_first_one_without_expansion_and_each_is_rebuilt_equal(variant, monkeypatch):
    """Every tensor autograd saves whose storage is a state of the forward is kept as a recipe, except the first
    state of a model without embedding expansion (d_v = 1: the embeddings, which their own backward keeps);
    backward rebuilds each recipe's state (the first from the embeddings), equal to the original."""
    model = perturb(tiny_model(variant), 0.1, seed=1, filter_scale=0.3).train()
    model.config.state_recompute = True
    ids = random_tokens(2, 16, seed=1)
    kept, originals, rebuilt, ledgers = [], {}, [], []
    pack, unpack = StateLedger.pack, StateLedger.unpack

    def watching_pack(ledger, tensor):  # the model's own ledger, watched through its class
        if ledger not in ledgers:
            ledgers.append(ledger)
        packed = pack(ledger, tensor)
        index = ledger._index_of(tensor)
        if index is not None:
            kept.append((index, torch.is_tensor(packed)))
        if not torch.is_tensor(packed):
            originals[id(packed)] = tensor.detach().clone()
        return packed

    def watching_unpack(ledger, packed):
        tensor = unpack(ledger, packed)
        if not torch.is_tensor(packed):
            rebuilt.append((packed.index, torch.equal(tensor, originals[id(packed)])))
        return tensor

    monkeypatch.setattr(StateLedger, "pack", watching_pack)
    monkeypatch.setattr(StateLedger, "unpack", watching_unpack)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    rewrites = 2 * model.config.num_hidden_layers
    (ledger,) = ledgers
    expanded = model.config.value_channels > 1
    assert len(ledger.states) == 1 + rewrites and ledger.states[0][0] == ("rebuilt" if expanded else "kept")
    assert {index for index, as_tensor in kept if as_tensor} == (set() if expanded else {0})
    recipes = {index for index, as_tensor in kept if not as_tensor}
    assert recipes and recipes <= set(range(0 if expanded else 1, 1 + rewrites))
    assert len(rebuilt) == len(originals) and {index for index, _ in rebuilt} == recipes
    assert all(equal for _, equal in rebuilt)


def test_a_freed_state_whose_memory_is_reused_is_not_mistaken_for_it():
    """Two storages over one Python buffer, one after the other: the same address, a different storage."""
    ledger = StateLedger()
    memory = bytearray(6 * 4 * 2 * 4)
    first, h, write = torch.randn(6, 4, 2), torch.randn(6, 4), torch.randn(6, 2)
    new_state = torch.frombuffer(memory, dtype=torch.float32).view(6, 4, 2)
    new_state.copy_(first + h[:, :, None] * write[:, None, :])
    ledger.record(first, h, write, new_state)
    pointer = new_state.untyped_storage().data_ptr()
    assert not torch.is_tensor(ledger.pack(new_state))
    del new_state
    other = torch.frombuffer(memory, dtype=torch.float32).view(6, 4, 2)
    assert other.untyped_storage().data_ptr() == pointer
    assert ledger.pack(other) is other


def test_inference_and_eval_keep_no_ledger():
    model = tiny_model("ddl-cc").eval()
    model.config.state_recompute = True
    ids = random_tokens(1, 8, seed=1)
    with torch.no_grad():
        plain = model(ids).logits
    model.config.state_recompute = False
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_state_recompute_must_be_a_bool():
    with pytest.raises(ValueError, match="state_recompute"):
        DDLConfig.from_preset("tiny", "ddl-cc", state_recompute="yes")
