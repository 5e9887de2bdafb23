"""An independent float64 NumPy re-derivation of the MoRA layer (docs/design.md, The method), token by token."""

from __future__ import annotations

import numpy as np


def mora_reference(x, W0, A, B, scales, *, k, tau, delta=None, eps=1e-12, gated=True, bias=None):
    """``y = W0 x + Σ_i scale_i · w_i · z_i · B_i`` for each row of ``x``, in float64.

    Args:
        x: (N, d_in); W0: (d_out, d_in); A: (R, d_in); B: (d_out, R); scales: (R,) per-expert block scale.
        delta: threshold applied to the normalised scores, or None when it does not apply.
    """
    x, W0, A, B, scales = (np.asarray(t, dtype=np.float64) for t in (x, W0, A, B, scales))
    out = x @ W0.T
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64)
    R = A.shape[0]
    for t in range(x.shape[0]):
        z = A @ x[t]
        if not gated:
            w = np.ones(R)
        else:
            s = z / max(np.sqrt(np.sum(z * z)), eps)
            kk = min(k, R)
            kept = np.argsort(-s, kind="stable")[:kk]
            logits = s[kept] / tau
            e = np.exp(logits - logits.max())
            w = np.zeros(R)
            w[kept] = e / e.sum()
            if delta is not None:
                w = w * (s >= delta)
        for i in range(R):
            out[t] += scales[i] * w[i] * z[i] * B[:, i]
    return out
