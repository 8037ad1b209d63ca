"""Statistics of how Delta shortcuts use their gate, recorded during ordinary forward passes.

`DeltaStatsRecorder` accumulates, for every `DeltaShortcut` it is attached to, over the
tokens it sees (notation of `delta_ops`, with e the discrepancy of the readout):

    beta            the gate, in (0, 2): mean, std, min, max, quantiles, and the fraction of
                    tokens in each regime of `BETA_REGIMES`
    |e|  = |k^T X  - v^T|   discrepancy before the update (Euclidean norm over the d_v values)
    |e'| = |k^T X' - v^T|   discrepancy after it (X' the new state); DDL gives e' = (1 - beta |k|^2) e
    |v|                     norm of the value target

Means are over tokens; `discrepancy_ratio` is mean |e'| / mean |e| (a ratio of means, stable
when single tokens have |e| near 0). The q-quantile is the inverse empirical CDF (the smallest
recorded beta with a fraction >= q of the tokens at or below it), read from a histogram of beta
over [0, 2] with `histogram_bins` bins, so it is exact to 2 / histogram_bins (1e-3 by default);
everything else is exact. Accumulators stay on the model's device, so recording adds no host syncs:
padded tokens are masked out with `torch.where` (a fixed shape), never removed by a boolean index.

Attach it with `record_delta_stats(model)` (below), which also excludes padded
tokens: it reads the 2-D `attention_mask` (1 = token, 0 = padding) of each model call. Under
activation checkpointing the recomputed forward is recorded again; record in eval mode.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models.ddl.delta_layers import DeltaShortcut, state_matrix
from .models.ddl.delta_ops import unit_direction

# Regime name -> (low, high): low <= beta < high, except "match" which includes 1.1.
BETA_REGIMES = {
    "skip": (0.0, 0.1),
    "partial": (0.1, 0.9),
    "match": (0.9, 1.1),
    "over_relaxed": (1.1, 2.0),
}
DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BETA_RANGE = (0.0, 2.0)


class _ShortcutAccumulator:
    """Running sums for one shortcut. All tensors live on the device of the first batch."""

    def __init__(self, name: str, layer: int | None, sublayer: str | None, bins: int) -> None:
        self.name, self.layer, self.sublayer, self.bins = name, layer, sublayer, bins
        self.sums: dict[str, torch.Tensor] | None = None

    def add(
        self,
        beta: torch.Tensor,
        e_before: torch.Tensor,
        e_after: torch.Tensor,
        v_norm: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Each argument is a flat (N,) fp32 tensor over N tokens; `mask` (N,) bool, or None, picks the tokens to
        record. The masked-out tokens are replaced by neutral values (0 in the sums, +-inf for min and max, -1,
        outside the histogram's range, for `histc`), never removed: a boolean index (`x[mask]`) would make the host
        wait for the device to learn how many tokens remain. What the values at masked positions are (NaN
        included) does not matter."""
        if self.sums is None:
            zeros = torch.zeros((), dtype=torch.float64, device=beta.device)
            self.sums = {key: zeros.clone() for key in ("tokens", "beta", "beta_sq", "e_before", "e_after", "v_norm")}
            self.sums.update({f"regime_{name}": zeros.clone() for name in BETA_REGIMES})
            self.sums["beta_min"] = torch.full((), math.inf, dtype=torch.float64, device=beta.device)
            self.sums["beta_max"] = torch.full((), -math.inf, dtype=torch.float64, device=beta.device)
            self.sums["histogram"] = torch.zeros(self.bins, dtype=torch.float64, device=beta.device)
        if beta.numel() == 0:
            return
        sums = self.sums

        def kept(values: torch.Tensor, neutral: float) -> torch.Tensor:
            return values if mask is None else torch.where(mask, values, neutral)

        beta64 = beta.double()
        sums["tokens"] += beta.numel() if mask is None else mask.sum()
        sums["beta"] += kept(beta64, 0.0).sum()
        sums["beta_sq"] += kept(beta64.square(), 0.0).sum()
        sums["e_before"] += kept(e_before.double(), 0.0).sum()
        sums["e_after"] += kept(e_after.double(), 0.0).sum()
        sums["v_norm"] += kept(v_norm.double(), 0.0).sum()
        sums["beta_min"] = torch.minimum(sums["beta_min"], kept(beta64, math.inf).min())
        sums["beta_max"] = torch.maximum(sums["beta_max"], kept(beta64, -math.inf).max())
        for name, in_regime in _regime_masks(beta).items():
            sums[f"regime_{name}"] += (in_regime if mask is None else in_regime & mask).sum()
        # `histc` ignores values outside [min, max]: -1 puts a masked token in no bin.
        sums["histogram"] += torch.histc(
            kept(beta, -1.0), bins=self.bins, min=BETA_RANGE[0], max=BETA_RANGE[1]
        ).double()

    def summary(self, quantiles: tuple[float, ...]) -> dict:
        report = {"name": self.name, "layer": self.layer, "sublayer": self.sublayer, "tokens": 0}
        if self.sums is None or float(self.sums["tokens"]) == 0:
            return report
        sums = {key: value.cpu() for key, value in self.sums.items()}
        tokens = float(sums["tokens"])
        mean = float(sums["beta"]) / tokens
        variance = max(float(sums["beta_sq"]) / tokens - mean * mean, 0.0)
        e_before = float(sums["e_before"]) / tokens
        e_after = float(sums["e_after"]) / tokens
        report.update(
            tokens=int(tokens),
            beta={
                "mean": mean,
                "std": math.sqrt(variance),
                "min": float(sums["beta_min"]),
                "max": float(sums["beta_max"]),
                "quantiles": {f"{q:g}": _histogram_quantile(sums["histogram"], q) for q in quantiles},
                "regimes": {name: float(sums[f"regime_{name}"]) / tokens for name in BETA_REGIMES},
            },
            discrepancy_before=e_before,
            discrepancy_after=e_after,
            discrepancy_ratio=e_after / e_before if e_before > 0 else None,
            value_norm=float(sums["v_norm"]) / tokens,
        )
        return report


def _regime_masks(beta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks of `beta` per regime; every value falls in exactly one."""
    skip_high, partial_high, match_high = BETA_REGIMES["skip"][1], BETA_REGIMES["partial"][1], BETA_REGIMES["match"][1]
    return {
        "skip": beta < skip_high,
        "partial": (beta >= skip_high) & (beta < partial_high),
        "match": (beta >= partial_high) & (beta <= match_high),
        "over_relaxed": beta > match_high,
    }


def _histogram_quantile(histogram: torch.Tensor, q: float) -> float:
    """The q-quantile of values binned uniformly over `BETA_RANGE`, linear inside the bin."""
    low, high = BETA_RANGE
    width = (high - low) / histogram.numel()
    cumulative = torch.cumsum(histogram, 0)
    target = q * float(cumulative[-1])
    searched = torch.searchsorted(cumulative, torch.tensor(target, dtype=cumulative.dtype))
    index = int(searched.clamp(max=len(cumulative) - 1))
    before = float(cumulative[index - 1]) if index > 0 else 0.0
    in_bin = float(histogram[index])
    fraction = (target - before) / in_bin if in_bin > 0 else 0.0
    return low + width * (index + min(max(fraction, 0.0), 1.0))


class DeltaStatsRecorder:
    """Accumulates gate and discrepancy statistics of Delta shortcuts (see the module docstring).

    Usually obtained from `record_delta_stats(model)`. `token_mask` ((B, T) bool or 0/1, or None)
    restricts recording to its true positions; `record_delta_stats` sets it from each call's
    `attention_mask`. A mask wider than T (a cache holds earlier tokens) is read on its last T
    columns.
    """

    def __init__(self, quantiles: tuple[float, ...] = DEFAULT_QUANTILES, histogram_bins: int = 2000) -> None:
        if not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
        if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, int) or histogram_bins < 1:
            raise ValueError(f"histogram_bins must be an integer >= 1, got {histogram_bins!r}")
        self.quantiles = tuple(quantiles)
        self.histogram_bins = histogram_bins
        self.token_mask: torch.Tensor | None = None
        self._accumulators: dict[int, _ShortcutAccumulator] = {}

    def register(self, shortcut, name: str) -> None:
        """Reserve a report entry for `shortcut` (entries keep registration order)."""
        layer, sublayer = getattr(shortcut, "layer_idx", None), getattr(shortcut, "sublayer", None)
        self._accumulators[id(shortcut)] = _ShortcutAccumulator(name, layer, sublayer, self.histogram_bins)

    def reset(self) -> None:
        """Forget everything recorded so far (registrations are kept)."""
        for accumulator in self._accumulators.values():
            accumulator.sums = None

    @torch.no_grad()
    def record(
        self,
        shortcut,
        state: torch.Tensor,
        h: torch.Tensor,
        beta: torch.Tensor,
        v: torch.Tensor,
        new_state: torch.Tensor,
    ) -> None:
        """Add one call of `shortcut`.

        Args:
            shortcut: the `DeltaShortcut` (gives `hidden_size` d, `value_channels` d_v, `k_eps`).
            state, new_state: (..., d_v * d) the state before and after the update, value major (`state_matrix`).
            h: (..., d) sublayer output. beta: (..., 1) gate. v: (..., d_v) value target.
        """
        if id(shortcut) not in self._accumulators:
            self.register(shortcut, name=f"shortcut{len(self._accumulators)}")
        d, d_v = shortcut.hidden_size, shortcut.value_channels
        k = unit_direction(h, shortcut.k_eps).unsqueeze(-1)  # (..., d, 1)
        target = v.float()
        e_before = (k * state_matrix(state.float(), d, d_v)).sum(-2) - target  # (..., d_v)
        e_after = (k * state_matrix(new_state.float(), d, d_v)).sum(-2) - target
        values = (beta.float().squeeze(-1), e_before.norm(dim=-1), e_after.norm(dim=-1), target.norm(dim=-1))
        mask = self._mask_for(beta.shape[:-1])
        values = tuple(value.reshape(-1) for value in values)
        self._accumulators[id(shortcut)].add(*values, mask=None if mask is None else mask.reshape(-1))

    def _mask_for(self, leading_shape: torch.Size) -> torch.Tensor | None:
        if self.token_mask is None:
            return None
        mask = self.token_mask
        if mask.dim() != 2 or len(leading_shape) != 2 or mask.shape[0] != leading_shape[0]:
            raise ValueError(
                f"DeltaStatsRecorder.token_mask must have shape (batch, >= seq_len) matching the recorded tokens "
                f"{tuple(leading_shape)}, got {tuple(mask.shape)}"
            )
        length = leading_shape[1]
        if mask.shape[1] < length:
            raise ValueError(
                f"DeltaStatsRecorder.token_mask covers {mask.shape[1]} positions but the shortcut saw {length}"
            )
        return mask[:, -length:].bool()

    def summary(self) -> list[dict]:
        """One dict per registered shortcut, in registration order: `name`, `layer`, `sublayer`,
        `tokens`, and when tokens > 0 `beta` (`mean`, `std`, `min`, `max`, `quantiles`,
        `regimes` fractions), `discrepancy_before`, `discrepancy_after`, `discrepancy_ratio`
        (None when the mean |e| is 0) and `value_norm`."""
        return [accumulator.summary(self.quantiles) for accumulator in self._accumulators.values()]


@contextmanager
def record_delta_stats(model: nn.Module, recorder: DeltaStatsRecorder | None = None) -> Iterator[DeltaStatsRecorder]:
    """Record gate and discrepancy statistics of every `DeltaShortcut` in `model`.

    Inside the block each shortcut reports its calls to one `DeltaStatsRecorder` (see
    `delta_stats`); `recorder.summary()` lists per shortcut, by `layer_idx` and `sublayer`, the
    beta distribution and regimes, the mean discrepancy before and after the update and the mean
    value norm. Padded tokens are excluded: the 2-D `attention_mask` of each call of `model`
    becomes the recorder's `token_mask`. Leaving the block detaches everything, so forward passes
    pay nothing when not recording; the recorder keeps its statistics.

    Example::

        with record_delta_stats(model) as stats:
            for batch in batches:
                model(**batch)
        for entry in stats.summary():
            print(entry["layer"], entry["sublayer"], entry["beta"]["regimes"])
    """
    shortcuts = [(name, module) for name, module in model.named_modules() if isinstance(module, DeltaShortcut)]
    if not shortcuts:
        raise ValueError(
            "record_delta_stats: the model has no DeltaShortcut to record (an additive baseline, "
            "residual_mode='additive', has no gates)"
        )
    busy = [name for name, shortcut in shortcuts if shortcut._recorder is not None]
    if busy:
        raise ValueError(f"record_delta_stats: already recording {busy[0]}; nested recording is not supported")
    recorder = DeltaStatsRecorder() if recorder is None else recorder
    for name, shortcut in shortcuts:
        recorder.register(shortcut, name)
    forward_signature = inspect.signature(model.forward)

    def take_attention_mask(module, args, kwargs):
        try:
            mask = forward_signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        except TypeError:
            mask = kwargs.get("attention_mask")
        recorder.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    handle = model.register_forward_pre_hook(take_attention_mask, with_kwargs=True)
    for _, shortcut in shortcuts:
        shortcut._recorder = recorder
    try:
        yield recorder
    finally:
        handle.remove()
        recorder.token_mask = None
        for _, shortcut in shortcuts:
            shortcut._recorder = None


__all__ = ["BETA_REGIMES", "DEFAULT_QUANTILES", "DeltaStatsRecorder", "record_delta_stats"]
