"""Algebra of the Delta rewrite (spec section 1) on `delta_update_reference`, its fast path `delta_update`,
and the standalone `DeltaShortcut`.

Every property is checked on random inputs against the closed form it states:
X' = X + beta k (v^T - k^T X) = (I - beta k k^T) X + beta k v^T, with k = h / sqrt(|h|^2 + eps^2).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddl_hf import DeltaShortcut, delta_update_reference, flat_state, state_matrix, unit_direction
from ddl_hf.models.ddl.delta_ops import delta_update

EPS = 1e-5
ATOL = 1e-5  # the rewrite runs in fp32


@pytest.fixture(params=[delta_update_reference, delta_update], ids=["reference", "fast"])
def update(request):
    """Each implementation of the rewrite must satisfy every property on its own."""
    return request.param


def random_problem(batch: int = 5, d: int = 16, d_v: int = 4, beta: torch.Tensor | None = None):
    """A random state X (B, d, d_v), sublayer output h (B, d), gate beta (B, 1) in (0, 2), value v (B, d_v)."""
    state = torch.randn(batch, d, d_v)
    h = torch.randn(batch, d) * 3.0
    if beta is None:
        beta = 2.0 * torch.rand(batch, 1)
    v = torch.randn(batch, d_v)
    return state, h, beta, v


def read(k: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """k^T X: (B, d), (B, d, d_v) -> (B, d_v)."""
    return torch.einsum("bd,bdv->bv", k, state)


@pytest.mark.parametrize("d_v", [1, 4])
def test_closed_form_and_write_only(d_v, update):
    state, h, beta, v = random_problem(d_v=d_v)
    k = h / torch.sqrt(h.square().sum(-1, keepdim=True) + EPS**2)
    shortcut_matrix = torch.eye(16) - beta[:, :, None] * k[:, :, None] * k[:, None, :]  # (B, d, d)
    expected = shortcut_matrix @ state + beta[:, :, None] * k[:, :, None] * v[:, None, :]
    torch.testing.assert_close(update(state, h, beta, v, EPS), expected, atol=ATOL, rtol=0)
    write_only = state + beta[:, :, None] * k[:, :, None] * v[:, None, :]
    torch.testing.assert_close(update(state, h, beta, v, EPS, erase=False), write_only, atol=ATOL, rtol=0)


@pytest.mark.parametrize("d_v", [1, 4])
def test_beta_to_zero_is_identity(d_v, update):
    state, h, _, v = random_problem(d_v=d_v)
    assert torch.equal(update(state, h, torch.zeros(5, 1), v, EPS), state)
    for beta in (1e-3, 1e-5, 1e-7):
        change = (update(state, h, torch.full((5, 1), beta), v, EPS) - state).abs().max()
        # |X' - X| = beta |k (v^T - k^T X)|, linear in beta.
        assert change <= beta * 20 + 1e-6


@pytest.mark.parametrize("d_v", [1, 4])
def test_beta_one_overwrites_the_readout(d_v, update):
    state, h, _, v = random_problem(d_v=d_v)
    new_state = update(state, h, torch.ones(5, 1), v, EPS)
    k = unit_direction(h, EPS)
    # |k| = 1 - O(eps^2 / |h|^2): the overwrite is exact to float error.
    torch.testing.assert_close(read(k, new_state), v, atol=ATOL, rtol=0)
    assert (read(k, state) - v).abs().max() > 0.1  # the readout really changed


@pytest.mark.parametrize("d_v", [1, 4])
def test_error_contracts_by_one_minus_beta(d_v, update):
    beta = torch.tensor([[0.0], [0.25], [0.5], [1.0], [1.5], [1.999]])
    state, h, _, v = random_problem(batch=6, d_v=d_v)
    k = unit_direction(h, EPS)
    error = read(k, state) - v
    new_error = read(k, update(state, h, beta, v, EPS)) - v
    torch.testing.assert_close(new_error, (1.0 - beta) * error, atol=ATOL, rtol=0)


def shortcut_operator(update, h: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """A = I - beta k k^T, read off the rewrite itself: with X = I (d_v = d) and v = 0, X' = A."""
    batch, d = h.shape
    identity = torch.eye(d).expand(batch, d, d)
    return update(identity, h, beta, torch.zeros(batch, d), EPS).double()


def test_spectrum_of_the_shortcut(update):
    d = 16
    beta = torch.tensor([[0.1], [0.7], [1.0], [1.3], [1.9]])
    h = torch.randn(5, d)
    operator = shortcut_operator(update, h, beta)
    torch.testing.assert_close(operator, operator.transpose(1, 2), atol=1e-7, rtol=0)  # symmetric
    eigenvalues = torch.linalg.eigvalsh(operator)  # ascending
    expected = torch.ones(5, d, dtype=torch.float64)
    expected[:, 0] = 1.0 - beta[:, 0].double()  # 1 - beta < 1 for beta in (0, 2)
    torch.testing.assert_close(eigenvalues, expected, atol=ATOL, rtol=0)
    k = unit_direction(h, EPS).double()
    torch.testing.assert_close(
        (operator @ k.unsqueeze(-1)).squeeze(-1), (1.0 - beta.double()) * k, atol=ATOL, rtol=0
    )  # k is the eigenvector of 1 - beta


def test_beta_two_is_a_householder_reflector(update):
    d = 16
    h = torch.randn(4, d)
    reflector = shortcut_operator(update, h, torch.full((4, 1), 2.0))
    identity = torch.eye(d, dtype=torch.float64).expand(4, d, d)
    torch.testing.assert_close(reflector @ reflector.transpose(1, 2), identity, atol=ATOL, rtol=0)  # orthogonal
    torch.testing.assert_close(reflector @ reflector, identity, atol=ATOL, rtol=0)  # involutive
    torch.testing.assert_close(torch.linalg.det(reflector), -torch.ones(4, dtype=torch.float64), atol=ATOL, rtol=0)
    k = unit_direction(h, EPS).double()
    expected = identity - 2.0 * k.unsqueeze(-1) * k.unsqueeze(-2)
    torch.testing.assert_close(reflector, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("erase", [True, False])
def test_directions_orthogonal_to_k_are_untouched(erase, update):
    state, h, beta, v = random_problem()
    k = unit_direction(h, EPS)
    u = torch.randn(5, 16)
    u = u - (u * k).sum(-1, keepdim=True) * k / k.square().sum(-1, keepdim=True)  # u ⟂ k
    assert (u * k).sum(-1).abs().max() < 1e-5
    new_state = update(state, h, beta, v, EPS, erase=erase)
    torch.testing.assert_close(read(u, new_state), read(u, state), atol=ATOL, rtol=0)


def test_zero_sublayer_output_is_finite_with_finite_gradients(update):
    state, _, beta, v = random_problem()
    h = torch.zeros(5, 16, requires_grad=True)
    state.requires_grad_(True)
    v.requires_grad_(True)
    beta.requires_grad_(True)
    new_state = update(state, h, beta, v, EPS)
    assert torch.equal(new_state, state)  # k = 0: nothing is written
    new_state.square().sum().backward()
    for name, tensor in {"h": h, "state": state, "beta": beta, "v": v}.items():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name


@pytest.mark.parametrize("d_v", [1, 4])
def test_shortcut_zero_sublayer_output_gives_finite_gradients(d_v):
    shortcut = DeltaShortcut(8, value_channels=d_v)
    state = torch.randn(2, 3, 8 * d_v, requires_grad=True)
    context = torch.randn(2, 3, 8, requires_grad=True)
    h = torch.zeros(2, 3, 8, requires_grad=True)
    block_input = torch.randn(2, 3, 8) if d_v > 1 else None
    out = shortcut(state, h, context, block_input)
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [state.grad, context.grad, h.grad] + [p.grad for p in shortcut.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_precision_friendly_direction_equals_guarded_normalization():
    d = 64
    scales = torch.tensor([1e-7, 1e-6, 1e-5, 1e-3, 1.0, 1e3]).double().unsqueeze(-1)
    h = torch.randn(6, d, dtype=torch.float64) * scales  # |h| from below eps to far above
    via_rms_norm = F.rms_norm(h, (d,), eps=EPS**2 / d) / math.sqrt(d)
    guarded = h / torch.sqrt(h.square().sum(-1, keepdim=True) + EPS**2)
    torch.testing.assert_close(via_rms_norm, guarded, rtol=1e-12, atol=0)
    torch.testing.assert_close(unit_direction(h.float(), EPS), guarded.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(unit_direction(h, EPS), guarded, rtol=1e-12, atol=0)  # float64 stays float64
    norms = guarded.norm(dim=-1)
    assert norms[0] < 0.1 and abs(norms[-1] - 1.0) < 1e-12  # the guard bites only below eps


def test_low_precision_state_is_updated_in_fp32_and_cast_back(update):
    state, h, beta, v = random_problem()
    state_bf16, h_bf16 = state.bfloat16(), h.bfloat16()
    out = update(state_bf16, h_bf16, beta, v, EPS)
    assert out.dtype == torch.bfloat16
    in_fp32 = delta_update_reference(state_bf16.float(), h_bf16.float(), beta, v, EPS)
    # one rounding of the fp32 result (half a bf16 ulp, 2^-9 relative), not bf16 arithmetic all along
    torch.testing.assert_close(out.float(), in_fp32, rtol=2**-8, atol=1e-6)
    if update is delta_update_reference:
        assert torch.equal(out, in_fp32.bfloat16())


def manual_shortcut(shortcut: DeltaShortcut, state, h, context, source):
    """DeltaShortcut written out from its documented formulas, for (B, T, ...) inputs."""
    d, d_v = shortcut.hidden_size, shortcut.value_channels
    gate_input = context
    if shortcut.beta_hidden is not None:
        gate_input = torch.tanh(gate_input @ shortcut.beta_hidden.weight.T + shortcut.beta_hidden.bias)
    beta = 2.0 * torch.sigmoid(gate_input @ shortcut.beta_proj.weight.T + shortcut.beta_proj.bias)  # (B, T, 1)
    v = source @ shortcut.value_proj.weight.T + shortcut.value_proj.bias
    if shortcut.value_activation == "sigmoid":
        v = shortcut.value_scale * torch.sigmoid(v)
    k = h / torch.sqrt(h.square().sum(-1, keepdim=True) + shortcut.k_eps**2)
    matrix = state_matrix(state, d, d_v)
    write = v.unsqueeze(-2)
    if shortcut.erase:
        write = write - (k.unsqueeze(-1) * matrix).sum(-2, keepdim=True)
    return flat_state(matrix + beta.unsqueeze(-1) * k.unsqueeze(-1) * write)


@pytest.mark.parametrize(
    "options",
    [
        dict(value_channels=1),
        dict(value_channels=1, mode="write_only"),
        dict(value_channels=4),
        dict(value_channels=4, mode="write_only"),
        dict(value_channels=3, gate_hidden_size=8, value_input="context", value_activation="identity"),
    ],
    ids=["dv1", "dv1-write-only", "dv4", "dv4-write-only", "dv3-tanh-gate-context-identity"],
)
def test_shortcut_module_matches_its_formulas(options):
    d = 12
    shortcut = DeltaShortcut(d, **options)
    with torch.no_grad():
        shortcut.beta_proj.bias.fill_(0.3)  # off the init value, so a dropped bias shows
        shortcut.value_proj.bias.normal_()
    d_v = shortcut.value_channels
    state, h, context = torch.randn(2, 5, d * d_v), torch.randn(2, 5, d), torch.randn(2, 5, d)
    block_input = torch.randn(2, 5, d)
    if options.get("value_input") == "context":
        source = context
    elif d_v == 1:
        source = state  # d_v = 1: the value reads the raw residual by default
        block_input = None
    else:
        source = block_input
    out = shortcut(state, h, context, block_input)
    assert out.shape == state.shape
    torch.testing.assert_close(out, manual_shortcut(shortcut, state, h, context, source), atol=ATOL, rtol=1e-5)


def test_shortcut_needs_block_input_when_expanded_and_rejects_unknown_mode():
    shortcut = DeltaShortcut(8, value_channels=4)
    with pytest.raises(ValueError, match="block_input"):
        shortcut(torch.randn(1, 2, 32), torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="mode must be one of \\['delta', 'write_only'\\]"):
        DeltaShortcut(8, mode="additive")


@pytest.mark.parametrize(("init_scheme", "clamp"), [("authors", 1e-6), ("neutral", 1e-4)])
@pytest.mark.parametrize("beta_init", [0.0, 0.5, 1.0, 1.5, 2.0])
def test_gate_starts_at_beta_init(beta_init, init_scheme, clamp):
    """Gate bias logit(beta_init / 2), with beta_init / 2 clamped to [clamp, 1 - clamp]: 1e-6 in the authors' init,
    1e-4 in the neutral one (documented in DDLConfig)."""
    half = min(max(beta_init / 2, clamp), 1 - clamp)
    shortcut = DeltaShortcut(32, beta_init=beta_init, init_scheme=init_scheme)
    assert shortcut.beta_proj.bias.item() == pytest.approx(math.log(half / (1 - half)), abs=1e-6)
    beta = shortcut.gate(torch.zeros(3, 32))
    assert beta.shape == (3, 1)
    torch.testing.assert_close(beta, torch.full((3, 1), 2 * half), atol=1e-6, rtol=0)
    assert half == beta_init / 2 or half in (clamp, 1 - clamp)  # only the endpoints move, by the clamp
    assert shortcut.value_proj.weight.std().item() == pytest.approx(0.5 / math.sqrt(32), rel=0.3)


def test_gradient_of_the_state_is_the_shortcut_operator():
    """With k, beta and v independent of X, dL/dX = A^T dL/dX' = (I - beta k k^T) dL/dX'."""
    d, d_v = 10, 3
    shortcut = DeltaShortcut(d, value_channels=d_v, value_input="context")
    state = torch.randn(4, d * d_v, requires_grad=True)
    h, context = torch.randn(4, d), torch.randn(4, d)
    upstream = torch.randn(4, d * d_v)
    (shortcut(state, h, context) * upstream).sum().backward()
    beta = shortcut.gate(context).detach()
    k = unit_direction(h, EPS)
    operator = torch.eye(d) - beta[:, :, None] * k[:, :, None] * k[:, None, :]
    expected = flat_state(operator.transpose(1, 2) @ state_matrix(upstream, d, d_v))
    torch.testing.assert_close(state.grad, expected, atol=ATOL, rtol=0)


class TinyDeltaNet(nn.Module):
    """A plain PyTorch MLP stack whose residual additions are Delta rewrites (d_v = 1)."""

    def __init__(self, d: int = 16, depth: int = 3, vocab: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(depth))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d)) for _ in range(depth))
        self.shortcuts = nn.ModuleList(DeltaShortcut(d) for _ in range(depth))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for norm, block, shortcut in zip(self.norms, self.blocks, self.shortcuts):
            context = norm(x)
            x = shortcut(x, h=block(context), context=context)
        return self.head(x)


def test_shortcut_trains_inside_a_plain_network():
    net = TinyDeltaNet()
    tokens = torch.randint(0, 10, (32,))
    targets = (tokens * 3 + 1) % 10
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(tokens), targets)
        loss.backward()
        if not losses:
            for name, param in net.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
                assert param.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


def test_an_unknown_init_scheme_is_refused_by_name():
    from ddl_hf import StateCompressor

    with pytest.raises(ValueError, match=r"DeltaShortcut init_scheme must be one of \['authors', 'neutral'\], got 'x'"):
        DeltaShortcut(8, init_scheme="x")
    with pytest.raises(ValueError, match=r"StateCompressor init_scheme must be one of \['authors', 'neutral'\]"):
        StateCompressor(8, 2, init_scheme="x")


# The standalone modules check their arguments as `DDLConfig` checks its fields (one helper,
# `configuration_ddl.check_choice` / `check_int` / `check_float`): an unknown choice or a bad size
# raises a ValueError naming the argument and what is allowed, instead of running as something else.
BAD_MODULE_ARGUMENTS = [
    ("DeltaShortcut", dict(value_activation="tanh"), r"DeltaShortcut value_activation must be one of \['sigmoid', "),
    ("DeltaShortcut", dict(value_input="bogus"), r"DeltaShortcut value_input must be one of \['state', 'context'\]"),
    ("DeltaShortcut", dict(mode="additive"), r"DeltaShortcut mode must be one of \['delta', 'write_only'\]"),
    ("DeltaShortcut", dict(hidden_size=0), r"DeltaShortcut hidden_size must be an integer >= 1, got 0"),
    ("DeltaShortcut", dict(hidden_size=8.0), r"DeltaShortcut hidden_size must be an integer >= 1, got 8.0"),
    ("DeltaShortcut", dict(value_channels=0), r"DeltaShortcut value_channels must be an integer >= 1"),
    ("DeltaShortcut", dict(gate_hidden_size=-1), r"DeltaShortcut gate_hidden_size must be an integer >= 0"),
    ("DeltaShortcut", dict(beta_init=2.5), r"DeltaShortcut beta_init must be a finite number in \[0.0, 2.0\]"),
    ("DeltaShortcut", dict(k_eps=0.0), r"DeltaShortcut k_eps must be a finite number in \(0.0, inf\)"),
    ("DeltaShortcut", dict(value_scale=float("nan")), r"DeltaShortcut value_scale must be a finite number"),
    ("StateCompressor", dict(kind="pool"), r"StateCompressor kind must be one of \['channel', 'token'\], got 'pool'"),
    ("StateCompressor", dict(form="dense"), r"StateCompressor form must be one of \['factored', 'free'\]"),
    ("StateCompressor", dict(hidden_size=-4), r"StateCompressor hidden_size must be an integer >= 1"),
    ("StateCompressor", dict(value_channels=True), r"StateCompressor value_channels must be an integer >= 1"),
    ("StateCompressor", dict(kind="token", conv_size=0), r"StateCompressor conv_size must be an integer >= 1"),
    ("StateCompressor", dict(channel_kernel_size=0), r"StateCompressor channel_kernel_size must be an integer >= 1"),
    ("StateCompressor", dict(cache_layer_idx=-1), r"StateCompressor cache_layer_idx must be an integer >= 0"),
    ("EmbedExpansion", dict(kind="convolution"), r"EmbedExpansion kind must be one of \['conv', 'repeat'\]"),
    ("EmbedExpansion", dict(hidden_size=0), r"EmbedExpansion hidden_size must be an integer >= 1"),
    ("EmbedExpansion", dict(value_channels=0), r"EmbedExpansion value_channels must be an integer >= 1"),
    ("EmbedExpansion", dict(conv_size=0), r"EmbedExpansion conv_size must be an integer >= 1, got 0"),
    ("EmbedExpansion", dict(state_idx=-1), r"EmbedExpansion state_idx must be an integer >= 0"),
]


@pytest.mark.parametrize(
    "module,overrides,message", BAD_MODULE_ARGUMENTS, ids=[f"{m}-{'-'.join(o)}" for m, o, _ in BAD_MODULE_ARGUMENTS]
)
def test_standalone_modules_refuse_what_they_cannot_do(module, overrides, message):
    import ddl_hf

    arguments = {"hidden_size": 8, "value_channels": 2, **overrides}
    with pytest.raises(ValueError, match=message):
        getattr(ddl_hf, module)(**arguments)


def test_modules_and_config_share_one_message():
    """The config and the modules word a refusal alike: the text comes from one helper."""
    from ddl_hf import DDLConfig, StateCompressor

    with pytest.raises(ValueError) as config_error:
        DDLConfig.from_preset("tiny", "ddl-cc", state_compressor="pool")
    with pytest.raises(ValueError) as module_error:
        StateCompressor(8, 2, kind="pool")
    assert str(config_error.value).split(" must ")[1] == str(module_error.value).split(" must ")[1]
