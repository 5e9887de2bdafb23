"""What removing experts does to a layer's adapter output, measured with the pruned bank itself.

An expert counts in the shared norm ``‖z‖`` of every token even where it is never selected, so removing it
changes every token's scores, the top-k choice and the softmax. The only faithful measure of a removal is
therefore to run the gate again on the bank without the removed experts and compare outputs. This module does
that for a *ladder* of nested removals inside one block: the experts of the block are put in an order that
every worker computes identically from the weights alone (``removal_order``), and rung ``j`` removes the first
``j`` of them. For each rung, ``removal_ladder`` returns the squared Frobenius distance between the pruned and
the full adapter output over a batch of tokens, next to the full output's squared norm, as sums that can be
added over batches and over workers. The decision (the largest rung within a relative bound) is made by the
caller from the summed values.

The adapter output of a token is ``Y = Σ_i c_i B_i`` with ``c = scale · w · z`` (the gate's coefficients); the
output of a pruned bank differs by ``D = d Bᵀ`` with ``d = c_pruned − c_full`` (removed experts: ``c_pruned =
0``), and ``‖D‖² = Σ_tokens dᵀ (BᵀB) d``, which costs ``R²`` per token instead of ``R · d_out``.
"""

from __future__ import annotations

import torch


def removal_order(A_block: torch.Tensor, B_block: torch.Tensor) -> list[int]:
    """Block-local indices from the expert to remove first to the last: increasing ``‖A_i‖ · ‖B_i‖`` (the
    largest output an expert can add per unit input), ties to the lower index.

    Computed in float64 from weights that are identical on every worker, so every worker gets the same order.
    An expert that no token selected during training keeps ``B_i = 0`` and comes first.
    """
    crit = torch.linalg.vector_norm(A_block.detach().double(), dim=1) * \
        torch.linalg.vector_norm(B_block.detach().double(), dim=0)
    values = crit.cpu().tolist()
    return sorted(range(len(values)), key=lambda i: (values[i], i))


@torch.no_grad()
def removal_ladder(z: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, start: int, order: list[int],
                   rungs: int, *, k: int, tau: float, delta: float | None, eps: float,
                   gated: bool = True) -> torch.Tensor:
    """Squared output sums of nested removals for one batch of tokens.

    All rungs are evaluated together: rung ``j`` is the gate of a bank without the experts ``order[:j]`` of the
    block, i.e. their columns leave the norm (``‖z‖`` over the alive experts only) and cannot be selected
    (score ``-inf`` before top-k); everything else is the gate as in ``gate.gate_forward``.

    Args:
        z: key responses (N, R) of the N tokens.
        B: the values (d_out, R) of the whole bank.
        scale: per-expert scale (R,).
        start: index of the block's first expert in the bank.
        order: block-local removal order (``removal_order``).
        rungs: how many rungs past "remove nothing" (rung j removes ``order[:j]``), at most ``len(order)``.
        k, tau, delta, eps: the gate as it runs in this mode (``delta`` ``None`` where the threshold is off).
        gated: ``False`` for plain LoRA (``w ≡ 1``).

    Returns:
        float64 tensor (1 + rungs,): ``[Σ‖Y_full‖², Σ‖Y_1 − Y_full‖², ..., Σ‖Y_rungs − Y_full‖²]``.
    """
    z = z.double()
    B = B.detach().double()
    scale = scale.to(device=z.device, dtype=torch.float64)
    R = z.shape[-1]
    alive = torch.ones(rungs + 1, R, dtype=torch.bool, device=z.device)  # rung 0: the full bank
    for j in range(1, rungs + 1):
        alive[j:, start + order[j - 1]] = False
    if gated:
        norm = (z * z @ alive.double().T).sqrt().clamp_min(eps).T.unsqueeze(-1)  # (J+1, N, 1)
        s = torch.where(alive.unsqueeze(1), z / norm, torch.tensor(-torch.inf, dtype=z.dtype, device=z.device))
        kept, idx = s.topk(min(int(k), R), dim=-1, sorted=False)
        w = torch.zeros_like(s).scatter_(-1, idx, torch.softmax(kept / tau, dim=-1))
        w = torch.nan_to_num(w, nan=0.0)  # a rung with no expert left: softmax of all -inf
        if delta is not None:
            w = w * (s >= delta)
    else:
        w = alive.unsqueeze(1).double().expand(-1, z.shape[0], -1)
    c = w * z * scale  # (J+1, N, R); removed experts have w = 0
    G = B.T @ B
    out = torch.empty(1 + rungs, dtype=torch.float64, device=z.device)
    out[0] = ((c[0] @ G) * c[0]).sum()
    d = c[1:] - c[0]
    out[1:] = ((d @ G) * d).sum(dim=(1, 2)).clamp_min(0.0)  # BᵀB is PSD; clamp float noise below zero
    return out


def relative_changes(sums: list[float]) -> list[float]:
    """Relative output change ``‖Y_j − Y_full‖ / ‖Y_full‖`` per rung (rung 0, nothing removed, is 0) from summed
    ``removal_ladder`` values.

    A rung that changes nothing is 0 even where the full output is 0; a change of a zero output is infinite.
    """
    ref = float(sums[0])
    out = [0.0]
    for v in sums[1:]:
        v = float(v)
        if v <= 0.0:
            out.append(0.0)
        elif ref <= 0.0:
            out.append(float("inf"))
        else:
            out.append((v / ref) ** 0.5)
    return out
