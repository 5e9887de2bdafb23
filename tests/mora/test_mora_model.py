"""Injection into real transformers models, freezing across tasks, adapter files, and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.support import tiny_llama_config
from mora_dist.mora import (
    MoRAConfig, add_block, adapter_state_dict, freeze_blocks, inject_mora, load_adapter, mora_layers,
    save_adapter, trainable_parameters,
)
from mora_dist.mora.adapter import AdapterError
from mora_dist.mora.config import MoRAConfigError


def test_injects_default_targets_and_freezes_base(tiny_llama):
    names = inject_mora(tiny_llama, MoRAConfig())
    assert len(names) == 2 * 4 and all(n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in names)
    assert not any(p.requires_grad for p in tiny_llama.parameters())
    add_block(tiny_llama, "t0")
    trainable = dict(trainable_parameters(tiny_llama))
    assert set(trainable) == {p for n in names for p in (f"{n}.mora_A", f"{n}.mora_B")}
    assert all(p.requires_grad == (n in trainable) for n, p in tiny_llama.named_parameters())


def test_include_mlp_adds_mlp_projections(tiny_llama):
    names = inject_mora(tiny_llama, MoRAConfig(include_mlp=True))
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma"])
def test_default_targets_for_other_architectures(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg)
    names = inject_mora(model, MoRAConfig())
    assert len(names) == 4
    add_block(model, "t0")
    out = model(torch.randint(0, 64, (1, 5))).logits
    assert torch.isfinite(out).all()


def test_unknown_target_lists_candidates(tiny_llama):
    with pytest.raises(MoRAConfigError, match=r"\['qkv'\].*candidates: .*q_proj"):
        inject_mora(tiny_llama, MoRAConfig(target_modules=["q_proj", "qkv"]))


@pytest.mark.parametrize("field,value,match", [
    ("k", 0, r"mora\.k=0 .*>= 1"), ("tau", 0.0, r"mora\.tau=0\.0 .*> 0"), ("tau", -1.0, r"mora\.tau"),
    ("r_task", 0, r"mora\.r_task=0 .*>= 1"), ("delta_mode", "train", r"mora\.delta_mode"),
    ("dropout", 1.0, r"mora\.dropout"), ("grad", "approx", r"mora\.grad='approx' .*exact"),
])
def test_bad_settings_name_the_setting_and_range(field, value, match):
    with pytest.raises(MoRAConfigError, match=match):
        MoRAConfig(**{field: value})


def _train_steps(model, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_only_current_block_changes_across_tasks(tiny_llama):
    inject_mora(tiny_llama, MoRAConfig(k=4, r_task=4, dropout=0.1))
    base_before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    add_block(tiny_llama, "t0")
    _train_steps(tiny_llama)
    after_t0 = adapter_state_dict(tiny_llama)
    for n, p in tiny_llama.named_parameters():
        if "mora_" not in n:
            assert torch.equal(p, base_before[n]), n
    add_block(tiny_llama, "t1")
    _train_steps(tiny_llama, seed=1)
    for name, layer in mora_layers(tiny_llama).items():
        assert layer.block_sizes == [4, 4]
        assert torch.equal(layer.mora_A_frozen, after_t0[f"{name}.A"])  # earlier block bit-identical
        assert torch.equal(layer.mora_B_frozen, after_t0[f"{name}.B"])
        assert not layer.mora_A_frozen.requires_grad
        assert layer.mora_B.abs().sum() > 0  # the current block did train
    for n, p in tiny_llama.named_parameters():
        if "mora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_saved_adapter_after_last_task_has_no_untrained_block(tiny_llama, tmp_path):
    inject_mora(tiny_llama, MoRAConfig(r_task=4, k=4))
    for task in ("a", "b"):
        add_block(tiny_llama, task)  # grow at the start of a task, never after the last one
        _train_steps(tiny_llama, steps=2)
    freeze_blocks(tiny_llama)
    save_adapter(tiny_llama, tmp_path / "adapter")
    desc = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert [b["name"] for b in desc["blocks"]] == ["a", "b"] and desc["active_block"] is False
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    for name in mora_layers(tiny_llama):
        B = state[f"{name}.B"]
        assert B.shape[1] == 8
        assert B[:, :4].abs().sum() > 0 and B[:, 4:].abs().sum() > 0  # both blocks trained


def test_adapter_roundtrip_reproduces_outputs_exactly(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    inject_mora(tiny_llama, MoRAConfig(r_task=4, k=3, tau=0.1, delta=0.1))
    add_block(tiny_llama, "a")
    _train_steps(tiny_llama)
    add_block(tiny_llama, "b")
    _train_steps(tiny_llama, seed=3)
    freeze_blocks(tiny_llama)
    next(iter(mora_layers(tiny_llama).values())).remove_experts(1, [0, 2])  # a pruned layer
    save_adapter(tiny_llama, tmp_path / "ad")
    load_adapter(fresh, tmp_path / "ad")
    ids = torch.randint(0, 128, (3, 10))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, fresh(ids).logits)
    assert [l.block_sizes for l in mora_layers(fresh).values()][0] == [4, 2]
    assert not any(p.requires_grad for p in fresh.parameters())


def test_adapter_without_grad_setting_loads_with_the_exact_gradient(tiny_llama, tmp_path):
    """Adapters written before ``mora.grad`` existed load (the format did not change) and train exactly;
    a saved ``sparse`` policy comes back as saved."""
    fresh, fresh2 = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    inject_mora(tiny_llama, MoRAConfig(r_task=2, grad="sparse"))
    add_block(tiny_llama, "a")
    freeze_blocks(tiny_llama)
    save_adapter(tiny_llama, tmp_path / "ad")
    load_adapter(fresh, tmp_path / "ad")
    assert fresh.mora_config.grad == "sparse" and all(l.grad == "sparse" for l in mora_layers(fresh).values())
    desc = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    del desc["mora"]["grad"]
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(desc))
    load_adapter(fresh2, tmp_path / "ad")
    assert fresh2.mora_config.grad == "exact" and all(l.grad == "exact" for l in mora_layers(fresh2).values())


@pytest.mark.parametrize("gate, legacy", [("none", {"gated": False, "gate": "self"}),
                                           ("self", {"gated": True, "gate": "self"})])
def test_adapter_saved_with_the_former_gated_key_loads_with_the_one_gate(tiny_llama, tmp_path, gate, legacy):
    """Adapters written with the former ``gated`` + ``gate`` pair load with the one ``gate`` setting and compute
    the same outputs; the pair's contradictory form is one error naming the file, the field and the fix."""
    fresh, bad = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    inject_mora(tiny_llama, MoRAConfig(r_task=2, k=1, gate=gate))
    add_block(tiny_llama, "a")
    _train_steps(tiny_llama)
    freeze_blocks(tiny_llama)
    save_adapter(tiny_llama, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter.json"
    desc = json.loads(path.read_text())
    assert desc["mora"]["gate"] == gate and "gated" not in desc["mora"]
    desc["mora"].update(legacy)
    path.write_text(json.dumps(desc))
    load_adapter(fresh, tmp_path / "ad")
    assert fresh.mora_config.gate == gate and all(l.gate == gate for l in mora_layers(fresh).values())
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, fresh(ids).logits)
    desc["mora"].update(gated=False, gate="router")
    path.write_text(json.dumps(desc))
    with pytest.raises(AdapterError, match=r"adapter\.json: field 'mora': mora\.gated=false contradicts "
                                           r"mora\.gate='router': remove mora\.gated"):
        load_adapter(bad, tmp_path / "ad")


def test_adapter_on_model_with_other_shapes_is_a_clear_error(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    inject_mora(tiny_llama, MoRAConfig(r_task=2))
    add_block(tiny_llama, "a")
    save_adapter(tiny_llama, tmp_path / "ad")
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    with pytest.raises(AdapterError, match=r"q_proj has shape in=32, out=32 in this model but in=64, out=64"):
        load_adapter(other, tmp_path / "ad")


def test_save_is_atomic_and_replaces(tiny_llama, tmp_path):
    inject_mora(tiny_llama, MoRAConfig(r_task=2))
    add_block(tiny_llama, "a")
    save_adapter(tiny_llama, tmp_path / "ad")
    add_block(tiny_llama, "b")
    save_adapter(tiny_llama, tmp_path / "ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert len(json.loads((tmp_path / "ad" / "adapter.json").read_text())["blocks"]) == 2


def test_remove_experts_drops_exactly_those(tiny_llama):
    inject_mora(tiny_llama, MoRAConfig(r_task=4, k=8))
    add_block(tiny_llama, "a")
    add_block(tiny_llama, "b")
    layer = next(iter(mora_layers(tiny_llama).values()))
    A, B = (t.detach().clone() for t in layer.bank())
    layer.remove_experts(1, [1, 3])
    A2, B2 = layer.bank()
    assert layer.block_sizes == [4, 2] and layer.has_active_block
    assert torch.equal(A2, A[[0, 1, 2, 3, 4, 6]]) and torch.equal(B2, B[:, [0, 1, 2, 3, 4, 6]])
    with pytest.raises(IndexError):
        layer.remove_experts(0, [7])


def test_adapter_onto_a_model_with_other_gate_settings_is_explicit(tiny_llama, tmp_path, capsys):
    fresh = copy.deepcopy(tiny_llama)
    inject_mora(tiny_llama, MoRAConfig(r_task=4, k=3, tau=0.1, delta=0.1))
    add_block(tiny_llama, "a")
    _train_steps(tiny_llama)
    freeze_blocks(tiny_llama)
    save_adapter(tiny_llama, tmp_path / "ad")
    inject_mora(fresh, MoRAConfig(r_task=4, k=2, tau=0.1, delta=0.1))
    with pytest.raises(AdapterError, match=r"k: model 2 vs adapter 3.*gate_from='adapter'"):
        load_adapter(fresh, tmp_path / "ad")
    ids = torch.randint(0, 128, (3, 10))
    load_adapter(fresh, tmp_path / "ad", gate_from="adapter")  # the adapter's k wins, and it says so
    assert "replace the model's (k: model 2 vs adapter 3)" in capsys.readouterr().err
    assert fresh.mora_config.k == 3
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, fresh(ids).logits)
    fresh.mora_config = MoRAConfig(r_task=4, k=1, tau=0.1, delta=0.1)  # as injected with k=1
    load_adapter(fresh, tmp_path / "ad", gate_from="model")  # the model's k stays
    assert "keeping the model's gate settings (k: model 1 vs adapter 3)" in capsys.readouterr().err
    assert fresh.mora_config.k == 1 and next(iter(mora_layers(fresh).values())).k == 1
    fresh.mora_config = MoRAConfig(r_task=4, k=3, tau=0.1, delta=0.1, gate="none")
    with pytest.raises(AdapterError, match="gate: model 'none' vs adapter 'self'.*gate mode"):
        load_adapter(fresh, tmp_path / "ad", gate_from="model")
