"""The rounding-spread analysis behind the whole-network bf16 bounds (tests/rounding_bounds.py), on a network
small enough to write its spread by hand."""

import copy

import torch

from rounding_bounds import UNIT_ROUNDOFF, rounding_spread


def test_spread_of_one_bf16_linear_counts_the_input_weight_and_output_roundings_and_no_views():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 8)

    def forward(network, parameters):
        dtype = parameters["weight"].dtype
        return torch.func.functional_call(network, parameters, (x.to(dtype),)).reshape(3, 5, 1).transpose(0, 1)

    spread = rounding_spread(forward, copy.deepcopy(layer).to(torch.bfloat16), copy.deepcopy(layer).double(), 2.0**-8)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    x64, w64 = x.double(), layer.weight.detach().double()
    terms = x64[:, None, :] * w64[None, :, :]  # (3, 5, 8): x_i W_ji, each moved by the rounding of x_i and of W_ji
    output = terms.sum(-1)
    expected_weights = u * terms.square().sum(-1).sqrt()
    expected_computation = u * (terms.square().sum(-1) + output.square()).sqrt()  # rounding x, then y, once each
    assert spread.weights.shape == (5, 3, 1)
    torch.testing.assert_close(spread.weights, expected_weights.t().unsqueeze(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(spread.computation, expected_computation.t().unsqueeze(-1), rtol=1e-12, atol=0)
    expected_total = (expected_weights.square() + expected_computation.square()).sqrt()
    torch.testing.assert_close(spread.total(), expected_total.t().unsqueeze(-1), rtol=1e-12, atol=0)


def test_spread_under_autocast_counts_the_roundings_of_the_fp32_arguments_inside_the_call():
    """fp32 weights and input, bf16 autocast: the call rounds x and W to bf16 itself (no call to see), then its
    result; the weights are not rounded outside it (unit 0)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 8)

    def forward(network, parameters):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=parameters["weight"].dtype == torch.float32):
            return torch.func.functional_call(network, parameters, (x.to(parameters["weight"].dtype),))

    spread = rounding_spread(forward, copy.deepcopy(layer), copy.deepcopy(layer).double(), unit_of_weights=0.0)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    terms = x.double()[:, None, :] * layer.weight.detach().double()[None, :, :]
    u32 = UNIT_ROUNDOFF[torch.float32]  # x.to(float32) is a call with an fp32 result: counted, at 2^-24
    expected = (u**2 * (2 * terms.square().sum(-1) + terms.sum(-1).square()) + u32**2 * terms.square().sum(-1)).sqrt()
    torch.testing.assert_close(spread.computation, expected, rtol=1e-12, atol=0)
    assert torch.equal(spread.weights, torch.zeros_like(expected))
