"""The gates of a rank bank: MoRA's self-activated gate as one fused autograd function, and the MoE-LoRA router.

See docs/design.md, The method, for the math and the gradient policies.

Given the key responses ``z = A · dropout(x)`` of all R experts of a layer for N tokens, the gate returns the
per-expert coefficients ``c_i = scale_i · w_i · z_i`` that multiply the value columns ``B_i``:

    s = z / max(‖z‖₂, eps)                      signed, L2-normalised over the bank
    K = min(k, R) largest s_i kept             the rest get weight 0
    w = softmax(s_kept / tau)                  over the kept experts
    w_i ← w_i · 1[s_i ≥ delta]                 where the threshold is active; no renormalisation

The backward is written by hand: it saves at most four (N, R) tensors (s, w, the threshold
mask and, for the sparse policy, the kept mask) instead of the dozen an unfused autograd graph
keeps. Top-k and the threshold are hard choices (piecewise constant), so they pass no gradient themselves. Two
gradient policies (``grad``):

* ``"exact"`` (default): the true derivative of the forward, what plain autograd of ``F.normalize(z)`` →
  top-k → ``softmax(·/tau)`` → threshold gives. The kept experts get gradient through the softmax weights and
  ``z``; *every* expert, selected or not, also through the shared norm ``‖z‖`` (``∂s_i/∂z_j = (δ_ij − s_i s_j) /
  ‖z‖``), and so does the input ``x`` behind ``z = A x``.
* ``"sparse"``: a token's gradient reaches only the experts it selected; unselected experts are constants for
  that token (the norm path is cut for them). Measured, this leaves never-selected experts at their initial
  keys and bends ``dL/dx`` (which reaches every earlier layer) by a few percent; an option, not the default.
"""

from __future__ import annotations

import torch

from mora_dist.mora.config import GRAD_MODES


def gate_forward(z: torch.Tensor, k: int, tau: float, delta: float | None, eps: float):
    """The gate's forward quantities: scores ``s``, clamped ``norm``, softmax weights ``w`` (0 off the kept
    set), the kept mask (``None`` when all are kept), the threshold mask (``None`` when off), and where the
    norm was not clamped (``None`` when nowhere)."""
    norm_raw = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    norm = norm_raw.clamp_min(eps)
    s = z / norm
    if k < z.shape[-1]:
        kept_s, idx = s.topk(k, dim=-1, sorted=False)
        w = torch.zeros_like(s).scatter_(-1, idx, torch.softmax(kept_s / tau, dim=-1))
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    else:
        w = torch.softmax(s / tau, dim=-1)
        keep = None
    passed = (s >= delta) if delta is not None else None
    unclamped = norm_raw > eps
    if bool(unclamped.all()):
        unclamped = None
    return s, norm, w, keep, passed, unclamped


def gate_weights(z: torch.Tensor, k: int, tau: float, delta: float | None = None,
                 eps: float = 1e-12) -> torch.Tensor:
    """The mixture weights ``w`` (after the threshold), without gradient: for statistics and telemetry."""
    with torch.no_grad():
        _, _, w, _, passed, _ = gate_forward(z, min(int(k), z.shape[-1]), float(tau), delta, float(eps))
        return w * passed if passed is not None else w


class _MoRAGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, scale, k: int, tau: float, delta: float | None, eps: float, sparse: bool):
        s, norm, w, keep, passed, unclamped = gate_forward(z, k, tau, delta, eps)
        w_eff = w * passed if passed is not None else w
        # the kept mask is only needed by the sparse policy; the exact backward does not read it
        ctx.save_for_backward(s, norm, w, keep if sparse else None, passed, unclamped, scale)
        ctx.tau = tau
        return w_eff * z * scale
    @staticmethod
    def backward(ctx, grad_c):
        s, norm, w, keep, passed, unclamped, scale = ctx.saved_tensors
        z = s * norm
        g = grad_c * scale
        if passed is not None:
            g = g * passed
        grad_z = g * w  # direct path through z_i
        q = g * z  # dL/dw_i
        grad_s = w * (q - (w * q).sum(-1, keepdim=True)) / ctx.tau  # softmax backward; 0 off the kept set
        radial = s * (s * grad_s).sum(-1, keepdim=True)
        if unclamped is not None:  # where the norm is floored at eps it is a constant: no radial term
            radial = radial * unclamped
        grad_from_norm = (grad_s - radial) / norm  # exact: the radial term reaches every expert
        if keep is not None:  # sparse policy: cut the norm path for the unselected experts
            grad_from_norm = grad_from_norm * keep
        return grad_z + grad_from_norm, None, None, None, None, None, None


def mora_gate(z: torch.Tensor, scale: torch.Tensor, k: int, tau: float, delta: float | None = None,
              eps: float = 1e-12, grad: str = "exact") -> torch.Tensor:
    """Coefficients ``c = scale · w · z`` of the MoRA mixture for key responses ``z`` of shape (..., R).

    Args:
        z: key responses of all experts, last dimension R.
        scale: per-expert scale (R,), the scale of each expert's block.
        k: activation budget; ``min(k, R)`` experts are kept per token.
        tau: softmax temperature (> 0).
        delta: threshold on the normalised score, or ``None`` when it does not apply.
        eps: floor of the score norm.
        grad: gradient policy, ``"exact"`` (the true derivative) or ``"sparse"`` (only selected experts).
    """
    if grad not in GRAD_MODES:
        raise ValueError(f"grad={grad!r}: choose one of {GRAD_MODES}")
    return _MoRAGate.apply(z, scale, min(int(k), z.shape[-1]), float(tau), delta, float(eps), grad == "sparse")


def router_gate(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Block weights of the MoE-LoRA router for logits ``l = W_router · x`` (..., n_blocks): the ``top_k`` largest
    kept, weighted by a softmax over the kept logits. Top-1 over several blocks keeps the kept block's softmax
    probability over all blocks (Switch Transformer): a softmax over one kept logit is the constant 1 and would
    leave the router without gradient."""
    nb = logits.shape[-1]
    K = min(int(top_k), nb)
    if K == nb:
        return torch.softmax(logits, dim=-1)
    if K == 1:
        probs = torch.softmax(logits, dim=-1)
        kept, idx = probs.max(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, idx, kept)
    kept, idx = logits.topk(K, dim=-1, sorted=False)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(kept, dim=-1))
