"""Ungated MoRA (w = 1) is LoRA of rank R: compare with peft's LoRA for the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from mora_dist.mora import MoRAConfig, add_block, inject_mora, mora_layers

peft = pytest.importorskip("peft")


def mora_and_peft(base, r_task, n_blocks, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=0):
    """The same base with ungated MoRA (``n_blocks`` blocks of ``r_task``) and with peft LoRA of rank
    ``n_blocks * r_task`` holding the same A and B."""
    from peft import LoraConfig, get_peft_model

    alpha = 2.0 * r_task  # MoRA's scale alpha / r_task; peft's alpha / r must equal it
    mora_model = copy.deepcopy(base)
    inject_mora(mora_model, MoRAConfig(r_task=r_task, alpha=alpha, gate="none", dropout=0.0,
                                       target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    for b in range(n_blocks):
        add_block(mora_model, f"t{b}")
        for layer in mora_layers(mora_model).values():
            with torch.no_grad():
                layer.mora_B.copy_(torch.randn(layer.mora_B.shape, generator=gen) * 0.05)
    R = r_task * n_blocks
    lora_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=alpha * n_blocks,
                                                                 target_modules=list(targets), lora_dropout=0.0))
    modules = dict(lora_model.named_modules())
    for name, layer in mora_layers(mora_model).items():
        A, B = layer.bank()
        peft_layer = modules[f"base_model.model.{name}"]
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(A)
            peft_layer.lora_B["default"].weight.copy_(B)
    return mora_model.eval(), lora_model.eval()


@pytest.mark.parametrize("n_blocks", [1, 3])
def test_ungated_equals_peft_lora_tiny_llama(tiny_llama, n_blocks):
    mora_model, lora_model = mora_and_peft(tiny_llama, r_task=4, n_blocks=n_blocks)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = mora_model(ids).logits, lora_model(ids).logits
    base = tiny_llama(ids).logits
    assert (a - base).abs().max() > 1e-3  # the adapters really change the output
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ungated_equals_peft_lora_smollm2(smollm2):
    model, tok = smollm2
    mora_model, lora_model = mora_and_peft(model, r_task=8, n_blocks=2)
    ids = tok(["The capital of France is", "Continual learning means"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        a = mora_model(**ids).logits
        b = lora_model(**ids).logits
        base = model(**ids).logits
    assert (a - base).abs().max() > 1e-2
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
