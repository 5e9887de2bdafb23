"""The MoRA layer against an independent float64 re-derivation of the method (docs/design.md, The method),
forward and backward, and on a CUDA device (``gpu`` marker, skipped cleanly without CUDA)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mora_dist.mora import MoRALinear
from mora_dist.mora.gate import mora_gate
from tests.support.reference import mora_reference

D_IN, D_OUT = 24, 20
BLOCKS = [("t0", 4, 2.0), ("t1", 6, 0.5), ("t2", 5, 1.25)]  # different sizes and scales
R = sum(b[1] for b in BLOCKS)


def make_layer(k, tau, delta, delta_mode="inference", gated=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(D_IN, D_OUT, bias=True).to(dtype)
    layer = MoRALinear(base, k=k, tau=tau, delta=delta, delta_mode=delta_mode, gate="self" if gated else "none")
    for name, r, scale in BLOCKS:
        layer.add_block(name, r, scale, dtype=dtype)
    A, B = layer.bank()
    # B starts at zero; give every expert a value so the mixture is visible. Keep the last block trainable.
    layer.set_bank(A.detach(), torch.randn_like(B), layer.block_names, layer.block_sizes, layer.block_scales,
                   active_last=True)
    return layer


def reference_for(layer, x, delta_applies):
    A, B = layer.bank()
    return mora_reference(
        x.detach().numpy(), layer.base_layer.weight.detach().numpy(), A.detach().numpy(), B.detach().numpy(),
        layer.mora_scale.numpy(), k=layer.k, tau=layer.tau, delta=layer.delta if delta_applies else None,
        gated=layer.gate != "none", bias=layer.base_layer.bias.detach().numpy())


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


CASES = list(itertools.product(
    [1, 3, R, R + 7],  # k = 1, 1 < k < R, k = R, k > R
    [0.03, 0.3, 2.0],  # tau
    [None, 0.05],  # delta off / on
    ["inference", "always"],
    [False, True],  # training mode
))


@pytest.mark.parametrize("k,tau,delta,mode,training", CASES)
def test_forward_matches_float64_reference(k, tau, delta, mode, training):
    layer = make_layer(k, tau, delta, mode)
    layer.train(training)
    x = torch.randn(3, 5, D_IN, dtype=torch.float64)
    y = layer(x).reshape(-1, D_OUT).detach().numpy()
    delta_applies = delta is not None and (mode == "always" or not training)
    ref = reference_for(layer, x.reshape(-1, D_IN), delta_applies)
    assert rel_err(y, ref) < 1e-10


def test_threshold_changes_output_and_mode_matters():
    """Guards the test above against a threshold that never bites: delta must zero some kept experts."""
    layer = make_layer(k=R, tau=0.3, delta=0.05)
    x = torch.randn(16, D_IN, dtype=torch.float64)
    layer.eval()
    with_delta = layer(x)
    layer.train()
    without = layer(x)  # inference-only threshold: not applied in training
    assert not torch.allclose(with_delta, without)


def test_ungated_is_plain_lora_of_rank_R():
    layer = make_layer(k=2, tau=0.03, delta=0.2, gated=False)
    x = torch.randn(9, D_IN, dtype=torch.float64)
    A, B = layer.bank()
    expected = layer.base_layer(x) + (x @ A.T * layer.mora_scale) @ B.T
    assert rel_err(layer(x).detach().numpy(), expected.detach().numpy()) < 1e-12
    assert rel_err(layer.eval()(x).detach().numpy(), reference_for(layer, x, True)) < 1e-10


def test_block_scale_is_kept_after_freezing():
    """A frozen block keeps the scale it was trained with (a defect of the authors' code)."""
    layer = make_layer(k=4, tau=0.1, delta=None)
    layer.freeze_active()
    assert layer.block_scales == [2.0, 0.5, 1.25]
    assert torch.equal(layer.mora_scale, torch.tensor([2.0] * 4 + [0.5] * 6 + [1.25] * 5))
    x = torch.randn(4, D_IN, dtype=torch.float64)
    assert rel_err(layer(x).detach().numpy(), reference_for(layer, x, False)) < 1e-10


def torch_reference_gate(z, scale, k, tau, delta):
    """Autograd float64 reference of the sparse policy: the exact derivative for the kept experts, with
    unselected experts treated as constants for the token (their share of the norm detached)."""
    K = min(k, z.shape[-1])
    idx = z.detach().topk(K, dim=-1).indices
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
    z_for_norm = torch.where(keep, z, z.detach())
    s = z_for_norm / z_for_norm.norm(dim=-1, keepdim=True)
    logits = torch.where(keep, s / tau, torch.full_like(s, -torch.inf))
    w = torch.softmax(logits, dim=-1)
    if delta is not None:
        w = w * (s.detach() >= delta)
    return scale * w * z


def plain_mora_output(x, A, B, scale, k, tau, delta):
    """The adapter's output written the straightforward way, for plain autograd: F.normalize(A x) -> top-k ->
    softmax(. / tau) over the kept scores -> threshold -> sum of scale * w * z * B (no hand-written backward)."""
    z = x @ A.T
    s = torch.nn.functional.normalize(z, dim=-1, eps=1e-12)
    kept, idx = s.topk(min(k, s.shape[-1]), dim=-1)
    w = torch.zeros_like(s).scatter(-1, idx, torch.softmax(kept / tau, dim=-1))
    if delta is not None:
        w = w * (s >= delta).to(w.dtype)
    return (scale * w * z) @ B.T


GRAD_CASES = list(itertools.product([1, 3, R, R + 7], [0.03, 0.3, 2.0], [None, 0.05], ["inference", "always"],
                                    [False, True]))


@pytest.mark.parametrize("k,tau,delta,mode,training", GRAD_CASES)
def test_exact_gradient_equals_plain_autograd(k, tau, delta, mode, training):
    """The default policy is the true derivative: x, every key and every value against plain autograd."""
    layer = make_layer(k, tau, delta, mode, seed=k)
    layer.train(training)
    layer.mora_A_frozen.requires_grad_(True)  # let every block's experts receive (and show) their gradient
    layer.mora_B_frozen.requires_grad_(True)
    assert layer.grad == "exact"
    torch.manual_seed(3)
    x = torch.randn(2, 7, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, D_OUT, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    A, B = layer.bank()
    A_ref = A.detach().clone().requires_grad_(True)
    B_ref = B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    applies = delta is not None and (mode == "always" or not training)
    W0, b0 = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    y_ref = x_ref @ W0.T + b0 + plain_mora_output(x_ref, A_ref, B_ref, layer.mora_scale.double(), k, tau,
                                                  delta if applies else None)
    (y_ref * g).sum().backward()
    n_f = layer.mora_A_frozen.shape[0]
    got_A = torch.cat([layer.mora_A_frozen.grad, layer.mora_A.grad])
    got_B = torch.cat([layer.mora_B_frozen.grad, layer.mora_B.grad], 1)
    assert n_f == R - BLOCKS[-1][1]
    for got, ref in ((x.grad, x_ref.grad), (got_A, A_ref.grad), (got_B, B_ref.grad)):
        assert rel_err(got.numpy(), ref.numpy()) <= 1e-10
    if 1 < k < R:  # the norm path is real (with k = 1 the weight is constantly 1): unselected keys move too
        z = x.detach().reshape(-1, D_IN) @ A.detach().T
        never = torch.ones(R, dtype=torch.bool)
        never[z.div(z.norm(dim=-1, keepdim=True)).topk(k, dim=-1).indices.unique()] = False
        if never.any():
            assert got_A[never].abs().sum() > 0


@pytest.mark.parametrize("k,tau,delta", [(1, 0.03, None), (3, 0.1, None), (5, 0.5, 0.1), (R, 0.3, None),
                                         (R + 2, 1.0, 0.05)])
def test_sparse_gate_backward_matches_autograd_reference(k, tau, delta):
    torch.manual_seed(1)
    z = torch.randn(11, R, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(R, dtype=torch.float64) + 0.5
    g = torch.randn(11, R, dtype=torch.float64)
    (gz,) = torch.autograd.grad((mora_gate(z, scale, k, tau, delta, grad="sparse") * g).sum(), z)
    z2 = z.detach().clone().requires_grad_(True)
    (gz_ref,) = torch.autograd.grad((torch_reference_gate(z2, scale, k, tau, delta) * g).sum(), z2)
    assert rel_err(gz.numpy(), gz_ref.numpy()) < 1e-10


@pytest.mark.parametrize("k", [3, 6])
def test_exact_gate_gradcheck(k):
    """Finite differences agree with the default backward, with and without unselected experts."""
    torch.manual_seed(2)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(6, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: mora_gate(t, scale, k, 0.7, None), (z,))


def test_policies_differ_only_off_the_selected_set():
    """Guards the tests above: with k < R the two policies give different gradients, and only on columns of
    experts the token did not select."""
    torch.manual_seed(4)
    z = torch.randn(1, R, dtype=torch.float64, requires_grad=True)
    scale = torch.ones(R, dtype=torch.float64)
    g = torch.randn(1, R, dtype=torch.float64)
    exact, = torch.autograd.grad((mora_gate(z, scale, 3, 0.1) * g).sum(), z)
    sparse, = torch.autograd.grad((mora_gate(z, scale, 3, 0.1, grad="sparse") * g).sum(), z)
    kept = torch.zeros(R, dtype=torch.bool)
    kept[z.detach().topk(3).indices[0]] = True
    assert torch.equal(exact[0, kept], sparse[0, kept])
    assert torch.all(sparse[0, ~kept] == 0) and torch.all(exact[0, ~kept] != 0)
    with pytest.raises(ValueError, match="grad"):
        mora_gate(z, scale, 3, 0.1, grad="approx")


def test_sparse_policy_gives_unselected_experts_no_gradient():
    layer = make_layer(k=2, tau=0.1, delta=None)
    layer.set_gate(k=2, tau=0.1, delta=None, delta_mode="inference", eps=1e-12, grad="sparse")
    layer.train()
    x = torch.randn(1, D_IN, dtype=torch.float64)
    A, _ = layer.bank()
    s = (x @ A.T).squeeze(0)
    selected = set(s.topk(2).indices.tolist())
    layer(x).pow(2).sum().backward()
    offset = sum(layer.block_sizes[:-1])  # only the last (active) block has parameters with grads
    seen_unselected = 0
    for j in range(layer.block_sizes[-1]):
        gA, gB = layer.mora_A.grad[j], layer.mora_B.grad[:, j]
        if offset + j in selected:
            assert gA.abs().sum() > 0 and gB.abs().sum() > 0
        else:
            seen_unselected += 1
            assert torch.all(gA == 0) and torch.all(gB == 0)
    assert seen_unselected > 0


def test_zero_input_is_finite():
    layer = make_layer(k=3, tau=0.03, delta=0.2, delta_mode="always")
    layer.train()
    x = torch.zeros(2, D_IN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    layer64 = make_layer(k=4, tau=0.1, delta=None)
    layer = make_layer(k=4, tau=0.1, delta=None)
    layer.to(dtype)
    x = torch.randn(32, D_IN, dtype=torch.float64)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    ref = layer64(x)
    tol = 1e-5 if dtype == torch.float32 else 6e-2
    # top-k choices can flip on near-ties in low precision; compare the bulk of tokens
    close = ((y.double() - ref).abs().amax(-1) <= tol * ref.abs().amax()).double().mean()
    assert close >= 0.9


@pytest.mark.parametrize("k,delta,gated", [(3, None, True), (3, 0.05, True), (R + 2, 0.05, True),
                                           (12, None, True), (3, None, False)])
def test_removal_ladder_equals_the_pruned_banks(k, delta, gated):
    """Every rung of the ladder is the output change of a real pruned bank (norm, top-k and threshold rerun),
    down to an empty block; including rungs where fewer than k experts are left."""
    from mora_dist.mora.removal import relative_changes, removal_ladder, removal_order

    layer = make_layer(k, 0.1, delta, gated=gated)
    layer.eval()
    A, B = (t.detach() for t in layer.bank())
    scale = layer.mora_scale.double()
    x = torch.randn(40, D_IN, dtype=torch.float64)
    start, size = R - BLOCKS[-1][1], BLOCKS[-1][1]
    order = removal_order(A[start:], B[:, start:])
    assert sorted(order) == list(range(size))
    sums = removal_ladder(x @ A.T, B, scale, start, order, size, k=k, tau=0.1, delta=delta, eps=1e-12, gated=gated)
    full = plain_mora_output(x, A, B, scale, k, 0.1, delta) if gated else (x @ A.T * scale) @ B.T
    assert float(sums[0]) == pytest.approx(float((full ** 2).sum()), rel=1e-12)
    for j in range(1, size + 1):
        keep = torch.ones(R, dtype=torch.bool)
        keep[[start + i for i in order[:j]]] = False
        if gated:
            pruned = plain_mora_output(x, A[keep], B[:, keep], scale[keep], k, 0.1, delta)
        else:
            pruned = (x @ A[keep].T * scale[keep]) @ B[:, keep].T
        assert float(sums[j]) == pytest.approx(float(((pruned - full) ** 2).sum()), rel=1e-10)
    changes = relative_changes(sums.tolist())
    assert changes[0] == 0.0 and all(c > 0 for c in changes[1:])  # every removal changes the output


# GPU checks (skipped cleanly without CUDA): the layer on a CUDA device in bf16 and fp32.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_layer_on_cuda_matches_float64_reference(dtype, tol):
    layer = make_layer(k=4, tau=0.1, delta=None)
    x = torch.randn(64, layer.in_features, dtype=torch.float64)
    ref = reference_for(layer, x, delta_applies=False)
    gpu = layer.to(device="cuda", dtype=dtype)
    y = gpu(x.to(device="cuda", dtype=dtype)).double().cpu().detach().numpy()
    close = (abs(y - ref).max(-1) <= tol * abs(ref).max()).mean()
    assert close >= 0.9  # top-k may flip on near-ties in low precision


@pytest.mark.gpu
@needs_cuda
def test_backward_on_cuda_reaches_only_the_active_block():
    layer = make_layer(k=3, tau=0.1, delta=None).to("cuda", torch.bfloat16)
    layer.train()
    layer(torch.randn(8, layer.in_features, device="cuda", dtype=torch.bfloat16)).float().pow(2).sum().backward()
    assert layer.mora_A.grad is not None and layer.mora_A.grad.abs().sum() > 0
    assert layer.mora_A_frozen.grad is None and layer.num_experts == R
