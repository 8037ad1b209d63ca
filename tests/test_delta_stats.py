"""`DeltaStatsRecorder` under a padding mask: the same statistics as the unpadded tokens alone, recorded
without any op whose result the host must wait for (a boolean index, `nonzero`, `.item()`), so that recording
on a GPU adds no host sync. (test_audit.py checks the statistics against the spec's formulas.)"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_model
from ddl_hf import DeltaShortcut
from ddl_hf.delta_stats import DeltaStatsRecorder, record_delta_stats


class NoHostSyncOps(TorchDispatchMode):
    """Fails on every aten op that makes the host wait for a device result: an op whose output shape depends
    on the data (`Tag.dynamic_output_shape`: `nonzero`, `masked_select`, a boolean `index`, ...) or whose
    output is a Python value read from the data (`Tag.data_dependent_output`: `.item()`, `equal`, ...).
    An integer `index` has a static shape and is allowed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.index.Tensor:
            indices = args[1] if len(args) > 1 else kwargs["indices"]
            if any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices):
                raise AssertionError(f"host sync: {func} with a boolean index")
        elif torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
            raise AssertionError(f"host sync: {func}")
        elif func is torch.ops.aten.is_nonzero.default:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **kwargs)


def test_the_guard_catches_what_it_claims():
    values, mask = torch.arange(4.0), torch.tensor([True, False, True, True])
    for sync in (lambda: values[mask], lambda: values.nonzero(), lambda: values.sum().item(), lambda: bool(values[0])):
        with pytest.raises(AssertionError, match="host sync"), NoHostSyncOps():
            sync()
    with NoHostSyncOps():
        values[torch.tensor([0, 2])]  # an integer index: static shape


class GuardedRecorder(DeltaStatsRecorder):
    """Runs each `record` call (everything recording adds to a forward) under `NoHostSyncOps`."""

    def record(self, *args, **kwargs):
        with NoHostSyncOps():
            return super().record(*args, **kwargs)


@pytest.mark.parametrize("variant", ["ddl-scalar", "ddl-cc"])
def test_recording_a_padded_batch_makes_no_host_sync(variant):
    model = tiny_model(variant).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (3, 10))
    attention_mask = torch.ones(3, 10, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, :7] = 0
    with torch.no_grad(), record_delta_stats(model, GuardedRecorder()) as stats:
        model(input_ids, attention_mask=attention_mask)
    summary = stats.summary()
    assert [entry["tokens"] for entry in summary] == [int(attention_mask.sum())] * len(summary)


def random_call(batch: int, length: int, d: int, d_v: int):
    """A shortcut's recorded arguments: state, h, beta (spanning every regime), v, new state."""
    state = torch.randn(batch, length, d_v * d)
    h = torch.randn(batch, length, d)
    beta = torch.rand(batch, length, 1) * 2.0
    v = torch.randn(batch, length, d_v)
    new_state = torch.randn(batch, length, d_v * d)
    return state, h, beta, v, new_state


@pytest.mark.parametrize("d_v", [1, 3])
def test_padded_statistics_equal_those_of_the_unpadded_rows(d_v):
    """A padded batch records what its rows record alone, without padding: counts, min, max, regimes and the
    quantiles' histogram exactly, the means up to float64 summation order. Padded positions hold the extremes
    (a gate of 0 or 2, huge discrepancies) and NaN, which would show if any of them leaked in."""
    shortcut = DeltaShortcut(8, value_channels=d_v)
    starts = [0, 3, 5, 9]  # row b holds tokens from starts[b] on (row 3 is all padding)
    batch, length = len(starts), 9
    arguments = random_call(batch, length, 8, d_v)
    mask = torch.arange(length).expand(batch, length) >= torch.tensor(starts).unsqueeze(1)
    state, h, beta, v, new_state = (tensor.clone() for tensor in arguments)
    padding = ~mask
    beta[padding] = torch.where(torch.rand(int(padding.sum()), 1) < 0.5, 0.0, 2.0)
    state[padding] = 1e30
    v[padding] = float("nan")

    padded = DeltaStatsRecorder(histogram_bins=64)
    padded.token_mask = mask.long()
    padded.record(shortcut, state, h, beta, v, new_state)
    padded.token_mask = None
    padded.record(shortcut, *(tensor[:1] for tensor in arguments))  # and an unmasked call after it

    rows = DeltaStatsRecorder(histogram_bins=64)
    for row, start in enumerate(starts):
        rows.record(shortcut, *(tensor[row : row + 1, start:] for tensor in arguments))
    rows.record(shortcut, *(tensor[:1] for tensor in arguments))

    (got,), (expected,) = padded.summary(), rows.summary()
    assert got["tokens"] == expected["tokens"] == int(mask.sum()) + length
    assert got["beta"]["min"] == expected["beta"]["min"] and got["beta"]["max"] == expected["beta"]["max"]
    assert got["beta"]["regimes"] == expected["beta"]["regimes"]
    assert got["beta"]["quantiles"] == expected["beta"]["quantiles"]
    accumulated = padded._accumulators[id(shortcut)].sums
    assert torch.equal(accumulated["histogram"], rows._accumulators[id(shortcut)].sums["histogram"])
    for key in ("discrepancy_before", "discrepancy_after", "discrepancy_ratio", "value_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    for key in ("mean", "std"):
        assert got["beta"][key] == pytest.approx(expected["beta"][key], rel=1e-12), key
