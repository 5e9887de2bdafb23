"""``train.gradient_checkpointing``: the same losses and adapters as without it, in one process (dropout on: the
recomputation must replay its masks) and under 2-worker ZeRO-2/3 runs of the orchestrator."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from tests.support import CL_DATA, tiny_llama_config
from mora_dist.activation_checkpointing import checkpointed_blocks, enable_activation_checkpointing
from mora_dist.memprobe import saved_tensor_bytes
from mora_dist.mora import MoRAConfig, add_block, adapter_state_dict, inject_mora, trainable_parameters
from mora_dist.run.curves import read_metrics
from mora_dist.training import train_task_local


def _examples(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def test_one_process_same_losses_adapters_and_less_saved_memory():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    inject_mora(base, MoRAConfig(r_task=4, k=4, dropout=0.1))
    add_block(base, "t0")
    results = {}
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        if ckpt:
            enable_activation_checkpointing(model)
            assert len(checkpointed_blocks(model)) == 2
        losses = train_task_local(model, _examples(), 0, steps=4, lr=1e-2, batch_size=4, seed=3)
        model.train()
        batch = {"input_ids": torch.randint(1, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
        batch["labels"] = batch["input_ids"]
        with saved_tensor_bytes(model) as saved:
            model(**batch).loss.backward()
        results[ckpt] = losses, adapter_state_dict(model), saved["bytes"]
    (l0, a0, m0), (l1, a1, m1) = results[False], results[True]
    assert l1 == pytest.approx(l0, rel=1e-5) and l0[0] != l0[-1]
    for key in a0:
        torch.testing.assert_close(a1[key], a0[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(a0[next(k for k in a0 if k.endswith(".B"))], torch.zeros(1))  # trained
    assert m1 < m0 / 3


def test_gradients_reach_the_adapters_under_recomputation():
    """Every adapter gradient equals the one without recomputation (bank with frozen and active blocks)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    inject_mora(base, MoRAConfig(r_task=4, k=2, dropout=0.0))
    add_block(base, "t0")
    add_block(base, "t1")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "mora_B" in name:
                p.normal_()
    ids = torch.randint(1, 128, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        if ckpt:
            enable_activation_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in trainable_parameters(model)})
    assert len(grads[1]) == 2 * 2 * 4  # A and B of q/k/v/o in 2 layers
    for name, g in grads[0].items():
        assert grads[1][name] is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")
def test_two_workers_zero2_and_zero3_match_one_process_without_it(tiny_model_dir, tmp_path):
    """The orchestrator with checkpointing under 2-worker ZeRO-2 and ZeRO-3 (torchrun, gloo) gives the per-step
    losses, gradient norms and adapter of a one-process run without it (dropout off: its masks depend on how
    examples are spread); the training curves have one line per step on every path."""
    from tests.support.runs import run_cli, write_config

    results = {}
    for name, launcher, stage, ckpt in [("single", "single", 0, "false"), ("zero2", "torchrun", 2, "true"),
                                        ("zero3", "torchrun", 3, "true")]:
        run_dir = tmp_path / name
        cfg = write_config(tmp_path, tiny_model_dir, run_dir, tasks=[{"name": "FOMC", "max_new_tokens": 2}],
                           eval={"max_examples": 2, "batch_size": 2})
        proc = run_cli(cfg, launcher, "train.global_batch_size=4", "prune.enabled=false", "mora.dropout=0.0",
                       f"distributed.zero_stage={stage}", f"train.gradient_checkpointing={ckpt}", "train.max_steps=3")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        curve = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]
        assert [c[0] for c in curve] == [1, 2, 3] and all(c[2] is not None and c[2] > 0 for c in curve), curve
        results[name] = (curve, load_file(str(run_dir / "adapters" / "00-FOMC" / "adapter.safetensors")))
    ref_curve, ref_adapter = results["single"]
    for name in ("zero2", "zero3"):  # per-step losses and gradient norms (curves written by rank 0)
        curve, adapter = results[name]
        assert [v for c in curve for v in c[1:]] == pytest.approx([v for c in ref_curve for v in c[1:]],
                                                                  rel=1e-4), name
        for key, tensor in ref_adapter.items():
            torch.testing.assert_close(adapter[key], tensor, atol=1e-4, rtol=1e-3, msg=f"{name} {key}")
