"""``MoRALinear``: a frozen linear layer plus a bank of rank-1 LoRA experts, grown one block per task.

Parameters (all names start with ``mora_``, see ``mora_dist.mora.model.ADAPTER_PREFIX``):

* ``mora_A_frozen`` (R_f × d_in), ``mora_B_frozen`` (d_out × R_f): the experts of all earlier, frozen blocks,
  concatenated in block order; ``requires_grad=False``.
* ``mora_A`` (r × d_in), ``mora_B`` (d_out × r): the active block, trained on the current task.

Either pair is ``None`` when empty. The forward concatenates both pairs once and treats all R experts in one
vectorised pass; blocks differ only by their scale, held per expert in the buffer ``mora_scale``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mora_dist.mora.gate import gate_weights, mora_gate


class MoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with a MoRA rank bank.

    Args:
        base_layer: the linear layer to adapt; it is frozen.
        k, tau, delta, delta_mode, gated, eps: gate settings, see ``MoRAConfig``.
        dropout: dropout probability on the input before the keys.
    """

    def __init__(self, base_layer: nn.Linear, *, k: int = 8, tau: float = 0.03, delta: float | None = 0.2,
                 delta_mode: str = "inference", gated: bool = True, eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.mora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_gate(k=k, tau=tau, delta=delta, delta_mode=delta_mode, gated=gated, eps=eps)
        self.register_parameter("mora_A_frozen", None)
        self.register_parameter("mora_B_frozen", None)
        self.register_parameter("mora_A", None)
        self.register_parameter("mora_B", None)
        self.register_buffer("mora_scale", torch.zeros(0), persistent=False)
        self.block_names: list[str] = []
        self.block_sizes: list[int] = []
        self.block_scales: list[float] = []
        self.stats: dict[str, torch.Tensor] | None = None  # set by start_stats(); see accumulate_stats
        self.stats_token_mask: torch.Tensor | None = None  # optional (batch, seq) mask of real tokens

    # ----------------------------------------------------------------------------------------------- settings
    def set_gate(self, *, k: int, tau: float, delta: float | None, delta_mode: str, gated: bool,
                 eps: float) -> None:
        """Change the gate settings (they hold no parameters)."""
        self.k, self.tau, self.delta, self.delta_mode = int(k), float(tau), delta, delta_mode
        self.gated, self.eps = bool(gated), float(eps)

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

    def delta_active(self) -> bool:
        return self.delta is not None and (self.delta_mode == "always" or not self.training)

    def gate_coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """``scale · w · z`` for key responses ``z`` (..., R), computed in at least float32."""
        gate_dtype = torch.promote_types(z.dtype, torch.float32)
        zg = z.to(gate_dtype)
        if self.mora_scale.dtype != torch.float32:  # a module-wide .to(dtype) cast the buffer: rebuild it exactly
            self._refresh_scale()
        scale = self.mora_scale.to(gate_dtype)
        if not self.gated:
            return zg * scale
        delta = self.delta if self.delta_active() else None
        return mora_gate(zg, scale, self.k, self.tau, delta, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        bank = self.bank()
        if bank is None:
            return y
        A, B = bank
        z = F.linear(self.mora_dropout(x).to(A.dtype), A)
        if self.stats is not None:
            self.accumulate_stats(z.detach(), B.detach())
        c = self.gate_coefficients(z).to(B.dtype)
        return y + F.linear(c, B).to(y.dtype)

    # -------------------------------------------------------------------------------------------- statistics
    def start_stats(self) -> None:
        """Start accumulating per-expert activation statistics on every forward (DESIGN §2)."""
        R = self.num_experts
        device = self._weight_like().device
        self.stats = {"selected": torch.zeros(R, dtype=torch.float64, device=device),
                      "weight_sum": torch.zeros(R, dtype=torch.float64, device=device),
                      "mass": torch.zeros(R, dtype=torch.float64, device=device),
                      "tokens": torch.zeros(1, dtype=torch.float64, device=device)}

    def stop_stats(self) -> dict[str, torch.Tensor] | None:
        """Stop accumulating; return the local (this process's) sums."""
        stats, self.stats = self.stats, None
        return stats

    def accumulate_stats(self, z: torch.Tensor, B: torch.Tensor) -> None:
        """Add one batch: tokens on which each expert was selected (``w_i > 0``), ``Σ w_i`` and the
        contribution mass ``Σ |w_i z_i| · ‖B_i‖``, with the gate as it runs now (mode-dependent threshold)."""
        z = z.reshape(-1, z.shape[-1]).double()
        mask = self.stats_token_mask
        if mask is not None and mask.numel() == z.shape[0]:
            z = z[mask.reshape(-1).to(z.device).bool()]
        if self.gated:
            w = gate_weights(z, self.k, self.tau, self.delta if self.delta_active() else None, self.eps)
        else:
            w = torch.ones_like(z)
        col_norm = torch.linalg.vector_norm(B.double(), dim=0)
        self.stats["selected"] += (w > 0).sum(0).double()
        self.stats["weight_sum"] += w.sum(0)
        self.stats["mass"] += (w * z).abs().sum(0) * col_norm
        self.stats["tokens"] += z.shape[0]

    # ------------------------------------------------------------------------------------------ bank changes
    def _refresh_scale(self) -> None:
        device = self._weight_like().device
        self.mora_scale = torch.repeat_interleave(
            torch.tensor(self.block_scales, dtype=torch.float32),
            torch.tensor(self.block_sizes, dtype=torch.long)).to(device)

    def add_block(self, name: str, r: int, scale: float, dtype: torch.dtype | None = None) -> None:
        """Append a new trainable block of ``r`` experts (A Kaiming-uniform as peft's LoRA, B zero).

        An active block, if any, is frozen first.
        """
        if r < 1:
            raise ValueError(f"a block needs at least one expert, got r={r}")
        self.freeze_active()
        ref = self._weight_like()
        dtype = dtype or ref.dtype
        A = torch.empty(r, self.in_features, dtype=dtype, device=ref.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, r, dtype=dtype, device=ref.device)
        self.mora_A = nn.Parameter(A)
        self.mora_B = nn.Parameter(B)
        self.block_names.append(name)
        self.block_sizes.append(r)
        self.block_scales.append(float(scale))
        self._refresh_scale()

    def freeze_active(self) -> None:
        """Move the active block into the frozen bank (no gradient, never in an optimizer again)."""
        if self.mora_A is None:
            return
        A, B = self.bank()
        self.mora_A_frozen = nn.Parameter(A.detach().clone(), requires_grad=False)
        self.mora_B_frozen = nn.Parameter(B.detach().clone(), requires_grad=False)
        self.mora_A = None
        self.mora_B = None

    def set_bank(self, A: torch.Tensor, B: torch.Tensor, names: list[str], sizes: list[int],
                 scales: list[float], active_last: bool = False) -> None:
        """Replace the whole bank (adapter loading, pruning); the last block stays trainable if ``active_last``."""
        if not (len(names) == len(sizes) == len(scales)):
            raise ValueError("block names, sizes and scales must have the same length")
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
        self.set_bank(A.detach().index_select(0, idx), B.detach().index_select(1, idx), self.block_names, sizes,
                      self.block_scales, active_last=active and sizes[-1] > 0)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"blocks={self.block_sizes}, k={self.k}, tau={self.tau}, delta={self.delta}"
                f"({self.delta_mode}), gated={self.gated}")
