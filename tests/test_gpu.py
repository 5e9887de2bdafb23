"""GPU checks (skipped cleanly without CUDA): the MoRA layer on a CUDA device in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch

from test_mora_math import R, make_layer, reference_for, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_layer_on_cuda_matches_float64_reference(dtype, tol):
    layer = make_layer(k=4, tau=0.1, delta=None)
    x = torch.randn(64, layer.in_features, dtype=torch.float64)
    ref = reference_for(layer, x, delta_applies=False)
    gpu = layer.to(device="cuda", dtype=dtype)
    y = gpu(x.to(device="cuda", dtype=dtype)).double().cpu().detach().numpy()
    close = (abs(y - ref).max(-1) <= tol * abs(ref).max()).mean()
    assert close >= 0.9  # top-k may flip on near-ties in low precision


def test_backward_on_cuda_reaches_only_the_active_block():
    layer = make_layer(k=3, tau=0.1, delta=None).to("cuda", torch.bfloat16)
    layer.train()
    layer(torch.randn(8, layer.in_features, device="cuda", dtype=torch.bfloat16)).float().pow(2).sum().backward()
    assert layer.mora_A.grad is not None and layer.mora_A.grad.abs().sum() > 0
    assert layer.mora_A_frozen.grad is None and layer.num_experts == R
