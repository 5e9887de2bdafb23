"""``MoRALinear``: a frozen linear layer plus a bank of rank-1 LoRA experts, grown one block per task.

Parameters (all names start with ``mora_``, see ``mora_dist.mora.inject.ADAPTER_PREFIX``):

* ``mora_A_frozen`` (R_f × d_in), ``mora_B_frozen`` (d_out × R_f): the experts of all earlier, frozen blocks,
  concatenated in block order; ``requires_grad=False``.
* ``mora_A`` (r × d_in), ``mora_B`` (d_out × r): the active block, trained on the current task.

Either pair is ``None`` when empty. The forward concatenates both pairs once and treats all R experts in one
vectorised pass; blocks differ only by their scale, held per expert in the buffer ``mora_scale``.

Gate modes (``gate``, computed in ``gate.py``): ``"self"`` is MoRA's self-activated gate over experts;
``"router"`` is the MoE-LoRA baseline: a learned router with one row per block, ``mora_router_frozen`` (earlier
blocks) and ``mora_router`` (1 × d_in, the active block), and every expert of a block is weighted by its block's
gate: ``y = W0 x + Σ_b g_b · scale_b · B_b A_b dropout(x)``; ``"none"`` is plain LoRA of rank R (``w ≡ 1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mora_dist.mora.config import GATE_MODES, GRAD_MODES
from mora_dist.mora.gate import gate_weights, mora_gate, router_gate
from mora_dist.mora.removal import removal_ladder, removal_order


class MoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a MoRA rank bank.

    Args:
        base_layer: the linear layer to adapt; it is frozen.
        k, tau, delta, delta_mode, eps, gate, router_top_k, grad: gate settings, see ``MoRAConfig``.
        dropout: dropout probability on the input before the keys.
    """

    def __init__(self, base_layer: nn.Linear, *, k: int = 8, tau: float = 0.03, delta: float | None = 0.2,
                 delta_mode: str = "inference", eps: float = 1e-12, dropout: float = 0.0,
                 gate: str = "self", router_top_k: int = 2, grad: str = "exact"):
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.mora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_gate(k=k, tau=tau, delta=delta, delta_mode=delta_mode, eps=eps, gate=gate,
                      router_top_k=router_top_k, grad=grad)
        self.register_parameter("mora_A_frozen", None)
        self.register_parameter("mora_B_frozen", None)
        self.register_parameter("mora_A", None)
        self.register_parameter("mora_B", None)
        self.register_parameter("mora_router_frozen", None)  # gate "router" only: one row per frozen block
        self.register_parameter("mora_router", None)  # gate "router" only: the active block's row
        self.register_buffer("mora_scale", torch.zeros(0), persistent=False)
        self.register_buffer("mora_expert_block", torch.zeros(0, dtype=torch.long), persistent=False)
        self.block_names: list[str] = []
        self.block_sizes: list[int] = []
        self.block_scales: list[float] = []
        self.stats: dict[str, torch.Tensor] | None = None  # set by start_stats(); see accumulate_stats
        self.stats_token_mask: torch.Tensor | None = None  # optional (batch, seq) mask of real tokens

    # ----------------------------------------------------------------------------------------------- settings
    def set_gate(self, *, k: int, tau: float, delta: float | None, delta_mode: str, eps: float,
                 gate: str = "self", router_top_k: int = 2, grad: str = "exact") -> None:
        """Change the gate settings. Whether blocks carry router rows (gate ``"router"``) can only change while
        the bank is empty; ``"self"`` and ``"none"`` hold the same parameters and switch freely."""
        if gate not in GATE_MODES:
            raise ValueError(f"gate={gate!r}: choose one of {GATE_MODES}")
        if grad not in GRAD_MODES:
            raise ValueError(f"grad={grad!r}: choose one of {GRAD_MODES}")
        if (getattr(self, "gate", gate) == "router") != (gate == "router") and self.block_sizes:
            raise ValueError(f"cannot switch the gate from {self.gate!r} to {gate!r} on a layer with blocks")
        self.k, self.tau, self.delta, self.delta_mode = int(k), float(tau), delta, delta_mode
        self.eps = float(eps)
        self.gate, self.router_top_k, self.grad = gate, int(router_top_k), grad

    @property
    def num_experts(self) -> int:
        """R: the alive experts of all blocks."""
        return sum(self.block_sizes)

    @property
    def has_active_block(self) -> bool:
        return self.mora_A is not None

    def _weight_like(self) -> torch.Tensor:
        return self.base_layer.weight

    # ------------------------------------------------------------------------------------------------ forward
    def bank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All keys (R × d_in) and values (d_out × R) in block order, or ``None`` when the bank is empty."""
        if self.mora_A is None and self.mora_A_frozen is None:
            return None
        if self.mora_A is None:
            return self.mora_A_frozen, self.mora_B_frozen
        if self.mora_A_frozen is None:
            return self.mora_A, self.mora_B
        return torch.cat([self.mora_A_frozen, self.mora_A], 0), torch.cat([self.mora_B_frozen, self.mora_B], 1)

    def router(self) -> torch.Tensor | None:
        """The router rows of all blocks (n_blocks × d_in) in block order; ``None`` outside gate mode "router"."""
        if self.mora_router is None:
            return self.mora_router_frozen
        if self.mora_router_frozen is None:
            return self.mora_router
        return torch.cat([self.mora_router_frozen, self.mora_router], 0)

    def delta_active(self) -> bool:
        return self.delta is not None and (self.delta_mode == "always" or not self.training)

    def gate_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """``scale · w · z`` for key responses ``z`` (..., R), computed in at least float32."""
        gate_dtype = torch.promote_types(z.dtype, torch.float32)
        zg = z.to(gate_dtype)
        if self.mora_scale.dtype != torch.float32:  # a module-wide .to(dtype) cast the buffer: rebuild it exactly
            self._refresh_scale()
        scale = self.mora_scale.to(gate_dtype)
        if self.gate == "none":
            return zg * scale
        delta = self.delta if self.delta_active() else None
        return mora_gate(zg, scale, self.k, self.tau, delta, self.eps, self.grad)

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert router weights (..., R): each expert gets its block's gate ``g_b`` (gate mode "router"),
        computed in at least float32 from the undropped input."""
        W = self.router()
        gate_dtype = torch.promote_types(W.dtype, torch.float32)
        logits = F.linear(x.to(W.dtype), W).to(gate_dtype)
        g = router_gate(logits, self.router_top_k)
        if self.mora_scale.dtype != torch.float32 or self.mora_expert_block.device != g.device:
            self._refresh_scale()  # a module-wide .to(dtype) cast the scale buffer: rebuild it exactly
        return g.index_select(-1, self.mora_expert_block.to(g.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        bank = self.bank()
        if bank is None:
            return y
        A, B = bank
        z = F.linear(self.mora_dropout(x).to(A.dtype), A)
        if self.gate == "router":
            w = self.router_weights(x)
            if self.stats is not None:
                self.accumulate_stats(z.detach(), B.detach(), w.detach())
            c = (z.to(w.dtype) * self.mora_scale.to(w.dtype) * w).to(B.dtype)
            return y + F.linear(c, B).to(y.dtype)
        if self.stats is not None:
            self.accumulate_stats(z.detach(), B.detach(), x=x.detach(), A=A.detach())
        c = self.gate_coefficients(z).to(B.dtype)
        return y + F.linear(c, B).to(y.dtype)

    # -------------------------------------------------------------------------------------------- statistics
    def start_stats(self, ladder_min_keep: int | None = None) -> None:
        """Start accumulating per-expert activation statistics on every forward.

        ``ladder_min_keep`` (self-activated gate only) also measures nested removals from the last block, down
        to that many experts (``mora.removal``): ``stats["ladder"]`` sums the full adapter output's squared norm
        and, per rung, the squared change; ``stats["ladder_order"]`` is the block-local removal order."""
        R = self.num_experts
        device = self._weight_like().device
        self.stats = {"selected": torch.zeros(R, dtype=torch.float64, device=device),
                      "weight_sum": torch.zeros(R, dtype=torch.float64, device=device),
                      "mass": torch.zeros(R, dtype=torch.float64, device=device),
                      "tokens": torch.zeros(1, dtype=torch.float64, device=device)}
        if ladder_min_keep is not None and self.gate != "router" and self.block_sizes:
            rungs = max(0, self.block_sizes[-1] - int(ladder_min_keep))
            self.stats["ladder"] = torch.zeros(1 + rungs, dtype=torch.float64, device=device)
            self.stats["ladder_order"] = None

    def stop_stats(self) -> dict[str, torch.Tensor] | None:
        """Stop accumulating; return the local (this process's) sums."""
        stats, self.stats = self.stats, None
        return stats

    def accumulate_stats(self, z: torch.Tensor, B: torch.Tensor, w: torch.Tensor | None = None,
                         x: torch.Tensor | None = None, A: torch.Tensor | None = None) -> None:
        """Add one batch: tokens on which each expert was selected (``w_i > 0``), ``Σ w_i`` and the
        contribution mass ``Σ |w_i z_i| · ‖B_i‖``, with the gate as it runs now (mode-dependent threshold);
        ``w`` gives the weights when the gate is not computed from ``z`` (the router). Given the input ``x``
        and keys ``A``, ``z`` is recomputed in float64 from them, so the statistics (and the removal ladder)
        are the layer's function in exact arithmetic, not its rounding."""
        if x is not None and A is not None:
            z = F.linear(x.double(), A.double())
        z = z.reshape(-1, z.shape[-1]).double()
        if w is not None:
            w = w.reshape(-1, w.shape[-1]).double()
        mask = self.stats_token_mask
        if mask is not None and mask.numel() == z.shape[0]:
            keep = mask.reshape(-1).to(z.device).bool()
            z = z[keep]
            w = w[keep] if w is not None else None
        if w is None and self.gate != "none":
            w = gate_weights(z, self.k, self.tau, self.delta if self.delta_active() else None, self.eps)
        elif w is None:
            w = torch.ones_like(z)
        col_norm = torch.linalg.vector_norm(B.double(), dim=0)
        self.stats["selected"] += (w > 0).sum(0).double()
        self.stats["weight_sum"] += w.sum(0)
        self.stats["mass"] += (w * z).abs().sum(0) * col_norm
        self.stats["tokens"] += z.shape[0]
        if "ladder" in self.stats and A is not None:
            start = self.num_experts - self.block_sizes[-1]
            order = removal_order(A[start:], B[:, start:])
            self.stats["ladder_order"] = order
            self.stats["ladder"] += removal_ladder(
                z, B, self.mora_scale, start, order, self.stats["ladder"].numel() - 1, k=self.k, tau=self.tau,
                delta=self.delta if self.delta_active() else None, eps=self.eps, gated=self.gate != "none")

    # ------------------------------------------------------------------------------------------ bank changes
    def _refresh_scale(self) -> None:
        device = self._weight_like().device
        sizes = torch.tensor(self.block_sizes, dtype=torch.long)
        self.mora_scale = torch.repeat_interleave(
            torch.tensor(self.block_scales, dtype=torch.float32), sizes).to(device)
        self.mora_expert_block = torch.repeat_interleave(torch.arange(len(self.block_sizes)), sizes).to(device)

    def add_block(self, name: str, r: int, scale: float, dtype: torch.dtype | None = None) -> None:
        """Append a new trainable block of ``r`` experts (A Kaiming-uniform as peft's LoRA, B zero).

        An active block, if any, is frozen first.
        """
        if r < 1:
            raise ValueError(f"a block needs at least one expert, got r={r}")
        self.freeze_active()
        ref = self._weight_like()
        dtype = dtype or ref.dtype
        # drawn on the CPU from its generator, then moved: a run on a GPU starts from the same keys as on a CPU
        A = torch.empty(r, self.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, r, dtype=dtype, device=ref.device)
        self.mora_A = nn.Parameter(A.to(ref.device))
        self.mora_B = nn.Parameter(B)
        if self.gate == "router":  # initialised like an nn.Linear router row
            W = torch.empty(1, self.in_features, dtype=dtype)
            nn.init.kaiming_uniform_(W, a=math.sqrt(5))
            self.mora_router = nn.Parameter(W.to(ref.device))
        self.block_names.append(name)
        self.block_sizes.append(r)
        self.block_scales.append(float(scale))
        self._refresh_scale()

    def freeze_active(self) -> None:
        """Move the active block into the frozen bank (no gradient, never in an optimizer again)."""
        if self.mora_A is None:
            return
        A, B = self.bank()
        W = self.router()
        self.mora_A_frozen = nn.Parameter(A.detach().clone(), requires_grad=False)
        self.mora_B_frozen = nn.Parameter(B.detach().clone(), requires_grad=False)
        self.mora_A = None
        self.mora_B = None
        if W is not None:
            self.mora_router_frozen = nn.Parameter(W.detach().clone(), requires_grad=False)
            self.mora_router = None

    def unfreeze_last(self) -> None:
        """Make the last frozen block trainable again (sequential LoRA trains one block on every task).

        Raises:
            ValueError: the bank is empty, a block is already active, or the last block has no experts left.
        """
        if self.has_active_block:
            raise ValueError("the layer already has an active block")
        if not self.block_sizes or not self.block_sizes[-1]:
            raise ValueError("the layer has no non-empty last block to unfreeze")
        A, B = self.bank()
        W = self.router()
        self.set_bank(A.detach(), B.detach(), self.block_names, self.block_sizes, self.block_scales,
                      active_last=True, router=None if W is None else W.detach())

    def clear_bank(self) -> None:
        """Remove every block (and router row): the layer is its frozen base again."""
        self.mora_A_frozen = self.mora_B_frozen = self.mora_A = self.mora_B = None
        self.mora_router_frozen = self.mora_router = None
        self.block_names, self.block_sizes, self.block_scales = [], [], []
        self._refresh_scale()

    def set_bank(self, A: torch.Tensor, B: torch.Tensor, names: list[str], sizes: list[int],
                 scales: list[float], active_last: bool = False, router: torch.Tensor | None = None) -> None:
        """Replace the whole bank (adapter loading, pruning); the last block stays trainable if ``active_last``.

        ``router`` (n_blocks × d_in) is required in gate mode "router" and refused otherwise."""
        if not (len(names) == len(sizes) == len(scales)):
            raise ValueError("block names, sizes and scales must have the same length")
        if self.gate == "router":
            if router is None or tuple(router.shape) != (len(names), self.in_features):
                got = None if router is None else tuple(router.shape)
                raise ValueError(f"gate 'router' needs router rows of shape ({len(names)}, {self.in_features}), "
                                 f"got {got}")
        elif router is not None:
            raise ValueError(f"router rows given to a layer whose gate is {self.gate!r} (load it with gate 'router')")
        total = sum(sizes)
        if A.shape != (total, self.in_features) or B.shape != (self.out_features, total):
            raise ValueError(
                f"adapter shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit this layer: expected "
                f"A({total}, {self.in_features}) and B({self.out_features}, {total})")
        ref = self._weight_like()
        A = A.to(device=ref.device)
        B = B.to(device=ref.device)
        n_active = sizes[-1] if (active_last and sizes) else 0
        n_frozen = total - n_active
        self.mora_A_frozen = nn.Parameter(A[:n_frozen].clone(), requires_grad=False) if n_frozen else None
        self.mora_B_frozen = nn.Parameter(B[:, :n_frozen].clone(), requires_grad=False) if n_frozen else None
        self.mora_A = nn.Parameter(A[n_frozen:].clone()) if n_active else None
        self.mora_B = nn.Parameter(B[:, n_frozen:].clone()) if n_active else None
        if router is not None:
            router = router.to(device=ref.device)
            nb_frozen = len(names) - (1 if n_active else 0)
            self.mora_router_frozen = (nn.Parameter(router[:nb_frozen].clone(), requires_grad=False)
                                       if nb_frozen else None)
            self.mora_router = nn.Parameter(router[nb_frozen:].clone()) if n_active else None
        else:
            self.mora_router_frozen = self.mora_router = None
        self.block_names, self.block_sizes, self.block_scales = list(names), list(sizes), list(scales)
        self._refresh_scale()

    def remove_experts(self, block: int, local_indices: list[int]) -> None:
        """Remove experts (indices within ``block``) from the bank; the block keeps its scale.

        A block may become empty (size 0); it stays listed so block indices remain stable.
        """
        if not 0 <= block < len(self.block_sizes):
            raise IndexError(f"block {block} does not exist (this layer has {len(self.block_sizes)})")
        size = self.block_sizes[block]
        drop = sorted(set(int(i) for i in local_indices))
        if drop and not (0 <= drop[0] and drop[-1] < size):
            raise IndexError(f"expert indices {drop} out of range for block {block} of size {size}")
        if not drop:
            return
        offset = sum(self.block_sizes[:block])
        keep = torch.ones(self.num_experts, dtype=torch.bool)
        keep[[offset + i for i in drop]] = False
        A, B = self.bank()
        active = self.has_active_block
        sizes = list(self.block_sizes)
        sizes[block] -= len(drop)
        idx = keep.nonzero().squeeze(1).to(A.device)
        W = self.router()
        self.set_bank(A.detach().index_select(0, idx), B.detach().index_select(1, idx), self.block_names, sizes,
                      self.block_scales, active_last=active and sizes[-1] > 0,
                      router=None if W is None else W.detach())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"blocks={self.block_sizes}, k={self.k}, tau={self.tau}, delta={self.delta}"
                f"({self.delta_mode}), gate={self.gate}, grad={self.grad}"
                + (f"(top{self.router_top_k})" if self.gate == "router" else ""))
