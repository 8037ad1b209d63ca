"""Rounding-error bounds for a whole low-precision forward pass, derived from the unit roundoff.

A low-precision run (bf16 weights, or fp32 weights under bf16 autocast) rounds every floating-point result it
stores: each stored result is y (1 + delta) with |delta| <= u, u = 2^-8 for bf16 (8 significand bits, round to
nearest) and 2^-24 for fp32; casting the weights rounds each of them once. To first order in u, an output o
moves by

    Delta o = sum over rounding points p and their elements i of c_{p,i} delta_{p,i},
    c_{p,i} = (d o / d y_{p,i}) y_{p,i}.

Worst case, |Delta o| <= sum u |c|, which on these networks is about 100 times the error seen. The standard
probabilistic model of rounding (Higham and Mary, SIAM J. Sci. Comput. 2019: the delta are independent,
mean-zero and bounded by u) gives, by Hoeffding's inequality,

    P(|Delta o| >= lam * u * sqrt(sum c^2)) <= 2 exp(-lam^2 / 2)

per output: `LAMBDA` = 6 makes that 3e-8, so a check on a few thousand logits fails by chance with probability
below 1e-4 (and, the inputs being fixed, fails the same way every time).

`rounding_spread` evaluates u sqrt(sum c^2) per output element in float64: it records the low-precision run's
sequence of torch calls and the dtype of each result, replays the same code in float64 with every result that
the low-precision run stored in bf16 (or fp32) multiplied by (1 + z), z a zero tensor that requires grad, and
reads c = d o / d z from autograd. View-like calls (reshapes, transposes, indexing, embedding lookups) move
values without rounding and are not counted; a call that rounds internally and once at its end (a matmul
summing in fp32, the fused DDL ops) is one rounding point. Neglected: second-order terms (relative size about
n u^2 for n roundings on a path) and the fp32 accumulation inside matmuls (k 2^-24 of the absolute sum for k
terms). The replay runs the plain references of the fused ops (`reference_paths`), which round at the same
points: once, at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from ddl_hf.models.ddl.delta_ops import reference_paths

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
LAMBDA = 6.0

# Calls that move or select values without computing new ones (no rounding).
_NOT_ROUNDING = (
    "view", "reshape", "transpose", "permute", "expand", "expand_as", "contiguous", "unsqueeze", "squeeze",
    "flatten", "unflatten", "__getitem__", "narrow", "select", "chunk", "split", "unbind", "cat", "stack",
    "embedding", "clone", "detach", "movedim", "repeat", "repeat_interleave", "index_select", "gather", "t",
    "as_strided", "diagonal", "roll", "pad", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
)  # fmt: skip
_CONVERSIONS = ("float", "double", "to", "type", "type_as")


def _call_name(func) -> str:
    name = resolve_name(func) or getattr(func, "__name__", repr(func))
    return name.rsplit(".", 1)[-1]


def _is_rounding(name: str) -> bool:
    in_place = name.endswith("_") and not name.endswith("__")
    return (name[:-1] if in_place else name) not in _NOT_ROUNDING


class _RecordCalls(TorchFunctionMode):
    """Records (call name, dtype of the tensor result or None, dtypes of the positional arguments) for every
    torch call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype | None, tuple]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        dtype = result.dtype if isinstance(result, torch.Tensor) else None
        self.calls.append((_call_name(func), dtype, tuple(a.dtype if torch.is_tensor(a) else None for a in args)))
        return result


class _PerturbRoundedResults(TorchFunctionMode):
    """Replays `calls` in float64; each result the recorded run rounded becomes y * (1 + z), z a zero leaf."""

    def __init__(self, calls):
        super().__init__()
        self.calls, self.position, self.points = calls, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _call_name(func)
        # Code that upcasts only what is not float64 already (`delta_ops.upcast`) converts in the recorded run and
        # not in the replay: skip such conversions, which are exact or round at fp32 (u = 2^-24).
        while self._at_skippable_conversion(name):
            self.position += 1
        assert self.position < len(self.calls), "the float64 replay made more torch calls than the recorded run"
        recorded_name, recorded_dtype, argument_dtypes = self.calls[self.position]
        self.position += 1
        assert name == recorded_name, f"call {self.position}: replay {name}, recorded {recorded_name}"
        unit = UNIT_ROUNDOFF.get(recorded_dtype)
        if recorded_dtype in (torch.bfloat16, torch.float16) and _is_rounding(name) and name not in _CONVERSIONS:
            # fp32 arguments of a call with a half-precision result were rounded to it first (autocast does that
            # inside the call, out of this mode's sight).
            args = tuple(
                self._perturbed(a, unit) if dtype == torch.float32 and torch.is_tensor(a) else a
                for a, dtype in zip(args, argument_dtypes + (None,) * len(args))
            )
        result = func(*args, **(kwargs or {}))
        if (
            unit is None
            or not _is_rounding(name)
            or not isinstance(result, torch.Tensor)
            or result.dtype != torch.float64
            or not bool(torch.isfinite(result).all())  # masks (-inf) carry no rounding
        ):
            return result
        if name.endswith("_"):
            return result.mul_(1 + self._new_point(result, unit))
        return self._perturbed(result, unit)

    def _new_point(self, tensor: torch.Tensor, unit: float) -> torch.Tensor:
        z = torch.zeros_like(tensor, requires_grad=True)
        self.points.append((z, unit))
        return z

    def _perturbed(self, tensor: torch.Tensor, unit: float) -> torch.Tensor:
        return tensor * (1 + self._new_point(tensor, unit))

    def _at_skippable_conversion(self, name: str) -> bool:
        if self.position >= len(self.calls):
            return False
        recorded_name, recorded_dtype, _ = self.calls[self.position]
        exact_or_fp32 = recorded_dtype in (torch.float32, torch.float64)
        return recorded_name != name and recorded_name in _CONVERSIONS and exact_or_fp32


class RoundingSpread(NamedTuple):
    """u sqrt(sum c^2) per output element, float64, of the output's shape: from rounding the weights, and from
    rounding the results of the computation."""

    weights: torch.Tensor
    computation: torch.Tensor

    def total(self) -> torch.Tensor:
        return (self.weights.square() + self.computation.square()).sqrt()


def rounding_spread(forward, low_precision_model, exact_model, unit_of_weights: float, chunk: int = 256):
    """The rounding spread of `forward(low_precision_model, ...)`'s output, per element (`RoundingSpread`).

    `forward(model, parameters)` runs the computation as tested and returns its output o (any shape), calling the
    model with `parameters` (`torch.func.functional_call`). `exact_model`: the same network in float64, holding
    the weights the low-precision model was made from, rounded to it with unit roundoff `unit_of_weights`.
    """
    with reference_paths():
        recorder = _RecordCalls()
        with torch.enable_grad(), recorder:
            forward(low_precision_model, dict(low_precision_model.named_parameters()))
        weight_leaves, perturbed = [], {}
        for name, weight in exact_model.named_parameters():
            z = torch.zeros_like(weight, requires_grad=True)
            weight_leaves.append(z)
            perturbed[name] = weight.detach() * (1 + z)
        replay = _PerturbRoundedResults(recorder.calls)
        with torch.enable_grad(), replay:
            output = forward(exact_model, perturbed)
        assert replay.position == len(recorder.calls), "the float64 replay made fewer torch calls than recorded"
    points = [(z, unit_of_weights, "weights") for z in weight_leaves]
    points += [(z, unit, "computation") for z, unit in replay.points]
    flat = output.reshape(-1)
    sums = {"weights": torch.zeros(flat.numel(), dtype=torch.float64)}
    sums["computation"] = torch.zeros_like(sums["weights"])
    for start in range(0, flat.numel(), chunk):
        rows = torch.arange(start, min(start + chunk, flat.numel()))
        one_hot = torch.zeros(len(rows), flat.numel(), dtype=flat.dtype)
        one_hot[torch.arange(len(rows)), rows] = 1.0
        leaves = [z for z, _, _ in points]
        grads = torch.autograd.grad(flat, leaves, one_hot, retain_graph=True, allow_unused=True, is_grads_batched=True)
        for (_, unit, kind), grad in zip(points, grads):
            if grad is not None:
                sums[kind][rows] += unit**2 * grad.reshape(len(rows), -1).square().sum(1)
    return RoundingSpread(*(sums[kind].sqrt().reshape(output.shape) for kind in ("weights", "computation")))
