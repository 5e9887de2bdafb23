"""Baselines on the same bank and orchestrator: O-LoRA's penalty, the MoE-LoRA router gate, sequential LoRA,
and the ``compare`` command (resumable after a kill)."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.support import CL_DATA, REPO
from mora_dist import methods
from mora_dist.config import ConfigError, MoELoRAConfig, OLoRAConfig, RunConfig, load_config
from mora_dist.mora import (
    MoRAConfig, MoRALinear, add_block, adapter_state_dict, freeze_blocks, inject_mora, load_adapter, mora_layers,
    save_adapter, trainable_parameters,
)
from mora_dist.mora.inject import unfreeze_last_block


# ------------------------------------------------------------------------------------------------- O-LoRA
def _ungated(in_f, out_f, A, B, sizes):
    layer = MoRALinear(nn.Linear(in_f, out_f).double(), gate="none")
    layer.set_bank(torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64),
                   [f"t{i}" for i in range(len(sizes))], sizes, [1.0] * len(sizes), active_last=True)
    return layer


@pytest.fixture
def two_layers():
    # layer 1: frozen keys [1,0,2], [0,1,-1] (one block of 2), new key [1,1,1], new value [3,4]
    l1 = _ungated(3, 2, [[1, 0, 2], [0, 1, -1], [1, 1, 1]], [[1, 0, 3], [0, 1, 4]], [2, 1])
    # layer 2: frozen keys [1,2,0] and [2,0,1] (two blocks of 1), new key [-1,1,0.5], new value [0,2]
    l2 = _ungated(3, 2, [[1, 2, 0], [2, 0, 1], [-1, 1, 0.5]], [[5, 6, 0], [7, 8, 2]], [1, 1, 1])
    return nn.ModuleDict({"a": l1, "b": l2})


def test_olora_penalty_matches_hand_computation(two_layers):
    # |A_new A_old^T| summed: layer 1 |3| + |0| = 3; layer 2 |-1 + 2| + |-2 + 0.5| = 2.5
    orth = methods.orthogonality_penalty(two_layers)
    assert orth.item() == pytest.approx(5.5, abs=1e-12)
    # ||A_new||_F + ||B_new||_F per layer: sqrt(3) + 5, then 1.5 + 2
    l2 = methods.l2_penalty(two_layers)
    assert l2.item() == pytest.approx(math.sqrt(3) + 5 + 1.5 + 2, abs=1e-12)
    cfg = RunConfig(method="olora", olora=OLoRAConfig(lambda_orth=0.5, lambda_l2=0.1))
    loss = methods.extra_loss(two_layers, cfg)
    assert loss.item() == pytest.approx(0.5 * 5.5 + 0.1 * (math.sqrt(3) + 8.5), abs=1e-12)
    loss.backward()
    # d/dA_new of 0.5 * sum|A_new a_j|: 0.5 * sum_j sign(A_new . a_j) a_j (sign(0) = 0), plus 0.1 A_new / ||A_new||
    a = two_layers["a"]
    expected = 0.5 * torch.tensor([[1.0, 0, 2]], dtype=torch.float64) + 0.1 * a.mora_A.detach() / math.sqrt(3)
    assert torch.allclose(a.mora_A.grad, expected, atol=1e-12)
    b = two_layers["b"]
    expected = 0.5 * (torch.tensor([[1.0, 2, 0]]) - torch.tensor([[2.0, 0, 1]])).double() \
        + 0.1 * b.mora_A.detach() / 1.5
    assert torch.allclose(b.mora_A.grad, expected, atol=1e-12)
    assert a.mora_A_frozen.grad is None and not a.mora_A_frozen.requires_grad


def test_olora_penalty_absent_without_frozen_blocks_or_for_other_methods(two_layers):
    fresh = MoRALinear(nn.Linear(3, 2), gate="none")
    fresh.add_block("t0", 2, 1.0)
    assert methods.orthogonality_penalty(nn.ModuleDict({"x": fresh})) is None
    assert methods.extra_loss(nn.ModuleDict({"x": fresh}), RunConfig(method="olora")) is None  # lambda_l2 = 0
    assert methods.extra_loss(two_layers, RunConfig(method="seq_lora")) is None


def test_local_trainer_adds_the_olora_penalty(tiny_llama):
    from mora_dist.run.trainer import LocalTrainer

    inject_mora(tiny_llama, MoRAConfig(r_task=2, gate="none", dropout=0.0))
    add_block(tiny_llama, "t0")
    for layer in mora_layers(tiny_llama).values():
        layer.mora_B.data.normal_(0, 0.1)
    add_block(tiny_llama, "t1")
    batch = {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    after = {}
    for lam in (0.0, 1.0):
        model = copy.deepcopy(tiny_llama)
        cfg = RunConfig(method="olora", olora=OLoRAConfig(lambda_orth=lam))
        trainer = LocalTrainer(model, cfg)
        trainer.begin(1, 1e-2)
        trainer.step(0, [batch])
        after[lam] = {n: p.detach().clone() for n, p in trainable_parameters(model) if n.endswith("mora_A")}
    assert any(not torch.equal(after[0.0][n], after[1.0][n]) for n in after[0.0])


# ----------------------------------------------------------------------------------------------- MoE-LoRA
def _moe_layer(top_k, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = MoRALinear(nn.Linear(6, 5).to(dtype), gate="router", router_top_k=top_k)
    for name, r, scale in (("t0", 2, 2.0), ("t1", 1, 0.5), ("t2", 3, 1.0)):
        layer.add_block(name, r, scale)
        layer.mora_B.data.normal_()
        layer.mora_router.data.normal_()
    return layer


def _moe_reference(layer, x, top_k):
    """Float64 loop over tokens and blocks: y = W0 x + b + sum_kept g_b scale_b B_b A_b x."""
    A, B = (t.detach().double() for t in layer.bank())
    W = layer.router().detach().double()
    W0, b0 = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    out = []
    for tok in x.reshape(-1, x.shape[-1]).double():
        logits = W @ tok
        order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:min(top_k, len(logits))]
        if len(order) == 1 and len(logits) > 1:  # Switch: the kept block's probability over all blocks
            g = {order[0]: float(torch.softmax(logits, 0)[order[0]])}
        else:
            kept = torch.softmax(logits[order], 0)
            g = {blk: float(kept[i]) for i, blk in enumerate(order)}
        y = W0 @ tok + b0
        start = 0
        for blk, (size, scale) in enumerate(zip(layer.block_sizes, layer.block_scales)):
            if blk in g:
                Ab, Bb = A[start:start + size], B[:, start:start + size]
                y = y + g[blk] * scale * (Bb @ (Ab @ tok))
            start += size
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_forward_matches_float64_reference(top_k):
    layer = _moe_layer(top_k)
    layer.eval()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    assert torch.allclose(layer(x), _moe_reference(layer, x, top_k), atol=1e-12, rtol=0)
    layer32 = copy.deepcopy(layer).float()
    assert torch.allclose(layer32(x.float()).double(), _moe_reference(layer, x, top_k), atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_gradients_reach_only_the_current_router_row_and_expert(tiny_llama, top_k):
    inject_mora(tiny_llama, MoRAConfig(r_task=2, gate="router", router_top_k=top_k, dropout=0.0))
    for t in ("t0", "t1", "t2"):
        add_block(tiny_llama, t)
        for layer in mora_layers(tiny_llama).values():
            layer.mora_B.data.normal_(0, 0.5)
    trainable = dict(trainable_parameters(tiny_llama))
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"mora_A", "mora_B", "mora_router"}
    frozen = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if n.endswith("_frozen")}
    assert {n.rsplit(".", 1)[-1] for n in frozen} == {"mora_A_frozen", "mora_B_frozen", "mora_router_frozen"}
    assert all(mora_layers(tiny_llama)[n.rsplit(".", 1)[0]].mora_router_frozen.shape[0] == 2
               for n in frozen if n.endswith("mora_router_frozen"))
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    ids = torch.randint(0, 128, (2, 16))
    tiny_llama.train()
    for _ in range(3):
        tiny_llama(input_ids=ids, labels=ids).loss.backward()
        for n, p in tiny_llama.named_parameters():
            if n in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, n
            else:
                assert p.grad is None, n
        opt.step()
        opt.zero_grad()
    for n, p in tiny_llama.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bit-identical
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())


def test_moe_adapter_roundtrip_is_exact(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    inject_mora(tiny_llama, MoRAConfig(r_task=2, gate="router", router_top_k=1))
    add_block(tiny_llama, "t0")
    freeze_blocks(tiny_llama)
    add_block(tiny_llama, "t1")
    for layer in mora_layers(tiny_llama).values():
        layer.mora_B.data.normal_()
    save_adapter(tiny_llama, tmp_path / "mid")  # active block: a mid-task checkpoint
    freeze_blocks(tiny_llama)
    save_adapter(tiny_llama, tmp_path / "final")
    state = load_file(str(tmp_path / "final" / "adapter.safetensors"))
    assert sum(k.endswith(".router") for k in state) == 8 and all(
        v.shape == (2, 64) for k, v in state.items() if k.endswith(".router"))
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "final")
    ids = torch.randint(0, 128, (2, 9))
    tiny_llama.eval(), loaded.eval()
    assert torch.equal(tiny_llama(ids).logits, loaded(ids).logits)
    a, b = adapter_state_dict(tiny_llama), adapter_state_dict(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(l.gate == "router" and l.router_top_k == 1 for l in mora_layers(loaded).values())
    resumed = load_adapter(copy.deepcopy(base), tmp_path / "mid", trainable_last=True)
    assert {n.rsplit(".", 1)[-1] for n, _ in trainable_parameters(resumed)} == {"mora_A", "mora_B", "mora_router"}


def test_unfreeze_last_makes_the_same_block_trainable_again(tiny_llama):
    inject_mora(tiny_llama, MoRAConfig(r_task=2, gate="none"))
    add_block(tiny_llama, "t0")
    freeze_blocks(tiny_llama)
    bank = {k: v.clone() for k, v in adapter_state_dict(tiny_llama).items()}
    assert not list(trainable_parameters(tiny_llama))
    unfreeze_last_block(tiny_llama)
    assert {n.rsplit(".", 1)[-1] for n, _ in trainable_parameters(tiny_llama)} == {"mora_A", "mora_B"}
    after = adapter_state_dict(tiny_llama)
    assert all(torch.equal(bank[k], after[k]) for k in bank)
    assert all(l.block_names == ["t0"] for l in mora_layers(tiny_llama).values())
    with pytest.raises(ValueError, match="already has an active block"):
        unfreeze_last_block(tiny_llama)


# ------------------------------------------------------------------------------------------------- config
def test_method_settings_are_applied_and_checked():
    assert RunConfig().method == "mora" and RunConfig().prune.enabled
    seq = RunConfig(method="seq_lora")
    assert seq.mora.gate == "none" and not seq.prune.enabled
    moe = RunConfig(method="moe_lora", moe_lora=MoELoRAConfig(top_k=1))
    assert moe.mora.gate == "router" and moe.mora.router_top_k == 1 and not moe.prune.enabled
    assert methods.grows_block(seq, 0) and not methods.grows_block(seq, 1) and methods.grows_block(moe, 3)
    with pytest.raises(ConfigError, match=r"method='olra' is invalid: choose one of mora, seq_lora, olora, "
                                          r"moe_lora \(did you mean olora\?\)"):
        load_config(None, ["method=olra"])
    with pytest.raises(ConfigError, match=r"olora\.lambda_orth=-1\.0"):
        load_config(None, ["method=olora", "olora.lambda_orth=-1.0"])
    with pytest.raises(ConfigError, match=r"mora\.gate='router' with method=mora"):
        load_config(None, ["mora.gate=router"])
    with pytest.raises(ConfigError, match="method=olora runs in one process only"):
        methods.check_world(RunConfig(method="olora"), 2)
    methods.check_world(RunConfig(method="moe_lora"), 2)


# ------------------------------------------------------------------------------------------------ compare
def _compare(config, *args, fault=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MORA_DIST_FAULT", None)
    if fault:
        env["MORA_DIST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mora_dist", "compare", str(config), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")
def test_compare_resumes_after_a_kill_and_reports_both_methods(tiny_model_dir, tmp_path):
    from mora_dist.run.curves import read_metrics
    from tests.support.runs import write_config

    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "run")
    killed = _compare(cfg, "--methods", "mora,seq_lora", fault="train_step:FOMC#3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "run-mora" / "ckpt").is_dir() and not (tmp_path / "run-seq_lora").exists()
    early = _compare(cfg, "--methods", "mora,seq_lora", "--collect-only")  # nothing to collect yet: one clear error
    assert early.returncode == 2 and "run-mora: the run of method mora is not finished" in early.stderr, early.stderr
    assert not (tmp_path / "run-compare").exists() and not (tmp_path / "run-seq_lora").exists()
    proc = _compare(cfg, "--methods", "mora,seq_lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    comp = json.loads((tmp_path / "run-compare" / "compare.json").read_text())
    assert comp["methods"] == ["mora", "seq_lora"] and comp["tasks"] == ["FOMC", "NumGLUE-cm"]
    for name, run in comp["runs"].items():
        report = json.loads((tmp_path / f"run-{name}" / "report" / "report.json").read_text())
        assert run["metrics"]["AP"] == report["metrics"]["AP"] and run["method"] == name
        assert run["final_scores"] == dict(zip(report["tasks"], report["matrix"][-1]))
        assert run["seeds"] == {"train": 42, "eval": 0}
        assert run["samples"]["train_examples"] == {"FOMC": 16, "NumGLUE-cm": 16}
        assert run["samples"]["train_steps"] == {"FOMC": 4, "NumGLUE-cm": 4}
        assert run["samples"]["eval_examples"] == {"FOMC": 4, "NumGLUE-cm": 4}
        # training time: the sum of the steps that count (mora's FOMC was killed at step 3 and resumed)
        steps = [r["seconds"] for r in read_metrics(tmp_path / f"run-{name}")]
        assert len(steps) == 8 and run["time_s"]["train"] == pytest.approx(sum(steps), abs=1e-3)
        assert run["time_s"]["total"] > run["time_s"]["train"] + run["time_s"]["evaluate"]
    # same stream and data: identical base-model rows
    rows = [json.loads((tmp_path / f"run-{m}" / "report" / "report.json").read_text())["matrix"][0]
            for m in comp["methods"]]
    assert rows[0] == rows[1]
    seq, mora = comp["runs"]["seq_lora"]["params"], comp["runs"]["mora"]["params"]
    # tiny model: 2 layers x q,k,v,o with (in + out) = 64 (q, o) or 32 + 16 (k, v); r_task = 4
    assert seq["trainable_params_per_task"] == mora["trainable_params_per_task"] == 4 * 2 * (64 + 64 + 48 + 48)
    assert seq["adapter_params"] == seq["active_params_per_token"] == seq["trainable_params_per_task"]
    assert (tmp_path / "run-compare" / "compare.png").stat().st_size > 0
    md = (tmp_path / "run-compare" / "compare.md").read_text()
    assert "| seq_lora |" in md and "## Differences from mora" in md and "95% percentile intervals" in md
    # learning accuracy beside the other metrics, and paired bootstrap intervals of every metric and difference
    for name, run in comp["runs"].items():
        assert run["metrics"]["LA"] == pytest.approx(sum(run["LA_per_task"].values()) / 2)
        # the constant-answer check covers the label task (FOMC), not the number task, and compare.md names the
        # runs whose score right after training does not beat one answer given to every prompt
        check = run["answers"]["tasks"]
        assert list(check) == ["FOMC"] and check["FOMC"]["score"] == pytest.approx(run["LA_per_task"]["FOMC"])
        flat = check["FOMC"]["score"] <= check["FOMC"]["constant_answer_score"]
        assert (f"{name}: FOMC" in md) == flat
    ints = comp["intervals"]
    assert ints["available"] and ints["reference"] == "mora" and ints["examples"] == {"FOMC": 4, "NumGLUE-cm": 4}
    for key in ("AP", "BWT", "forgetting", "LA", "FWT"):
        lo, hi = ints["methods"]["seq_lora"][key]
        value = comp["runs"]["seq_lora"]["metrics"][key]
        assert lo <= hi and (key not in ("AP", "LA") or lo - 1e-9 <= value <= hi + 1e-9)  # means: inside
        d = ints["differences"]["seq_lora"][key]
        point = comp["runs"]["seq_lora"]["metrics"][key] - comp["runs"]["mora"]["metrics"][key]
        assert d["value"] == pytest.approx(point) and d["resolved"] == (d["interval"][0] > 0 or d["interval"][1] < 0)
    # seq_lora: one block across tasks, and it keeps changing
    descs = [json.loads((tmp_path / "run-seq_lora" / "adapters" / d / "adapter.json").read_text())
             for d in ("00-FOMC", "01-NumGLUE-cm")]
    assert all([b["name"] for b in d["blocks"]] == ["FOMC"] for d in descs)
    assert all(d["mora"]["gate"] == "none" for d in descs)
    w0, w1 = (load_file(str(tmp_path / "run-seq_lora" / "adapters" / d / "adapter.safetensors"))
              for d in ("00-FOMC", "01-NumGLUE-cm"))
    assert w0.keys() == w1.keys() and all(w0[k].shape == w1[k].shape for k in w0)
    assert all(not torch.equal(w0[k], w1[k]) for k in w0 if k.endswith(".B"))
    again = _compare(cfg, "--methods", "mora,seq_lora")  # finished: nothing redone
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 2
    # --collect-only writes the same comparison from the finished runs, running nothing; it refuses a method never
    # run and a run of another config, naming the key
    shutil.rmtree(tmp_path / "run-compare")
    collected = _compare(cfg, "--methods", "mora,seq_lora", "--collect-only")
    assert collected.returncode == 0 and "[mora-dist]" not in collected.stdout, collected.stderr[-2000:]
    assert json.loads((tmp_path / "run-compare" / "compare.json").read_text()) == comp
    # the same from copies without weights or checkpoints (results kept elsewhere): run_dir differs, nothing else
    for name in ("mora", "seq_lora"):
        shutil.copytree(tmp_path / f"run-{name}", tmp_path / f"kept-{name}",
                        ignore=shutil.ignore_patterns("*.safetensors", "ckpt", "lock"))
    kept = _compare(cfg, "--methods", "mora,seq_lora", "--collect-only", f"run_dir={tmp_path / 'kept'}")
    assert kept.returncode == 0, kept.stderr[-2000:]
    moved = json.loads((tmp_path / "kept-compare" / "compare.json").read_text())
    assert {m: r["metrics"] for m, r in moved["runs"].items()} == {m: r["metrics"] for m, r in comp["runs"].items()}
    assert moved["intervals"] == comp["intervals"] and moved["runs"]["mora"]["run_dir"] == str(tmp_path / "kept-mora")
    missing = _compare(cfg, "--methods", "mora,olora", "--collect-only")
    assert missing.returncode == 2 and "no run of method olora" in missing.stderr, missing.stderr
    other = _compare(cfg, "--methods", "mora,seq_lora", "--collect-only", "train.lr=1e-3")
    assert other.returncode == 2 and "used another config (train.lr differ)" in other.stderr, other.stderr
    # a method's own setting is part of its run's config: refused for seq_lora's run, which used the shared lr ...
    own_lr = _compare(cfg, "--methods", "mora,seq_lora", "--collect-only", "--method-override", "seq_lora:train.lr=1e-3")
    assert own_lr.returncode == 2 and "run-seq_lora/config.yaml: this run of method seq_lora used another config " \
        "(train.lr differ)" in own_lr.stderr, own_lr.stderr
    # ... and accepted where it is what the run used, recorded in compare.json and compare.md
    same = _compare(cfg, "--methods", "mora,seq_lora", "--collect-only", "--method-override",
                    "seq_lora:train.lr=0.005", "--method-override", "seq_lora:mora.r_task=4")
    assert same.returncode == 0, same.stderr[-2000:]
    recorded = json.loads((tmp_path / "run-compare" / "compare.json").read_text())
    assert recorded["method_overrides"] == {"seq_lora": ["train.lr=0.005", "mora.r_task=4"]}
    assert "seq_lora: `train.lr=0.005`, `mora.r_task=4`" in (tmp_path / "run-compare" / "compare.md").read_text()
    assert not (tmp_path / "run-olora").exists()

    # an ungated bank without pruning collects no statistics (nothing to decide, every expert always used)
    seq_state = json.loads((tmp_path / "run-seq_lora" / "state.json").read_text())["done"]
    assert all("skipped" in d["info"] for d in seq_state if d["stage"].endswith("/stats"))
    assert not list((tmp_path / "run-seq_lora").glob("stats/*.json")) and list((tmp_path / "run-mora").glob("stats/*"))
    # the base model was evaluated once: seq_lora's base results are mora's, and the premise holds, since an
    # independent base evaluation of the seq_lora run (its own model set-up, no copy) gives the same predictions
    copied = json.loads((tmp_path / "run-seq_lora" / "eval" / "stage_00_base.json").read_text())
    assert copied["config"]["base_results_from"] == str(tmp_path / "run-mora")
    assert "base evaluation copied from" in proc.stdout
    from mora_dist.compare import method_config
    from mora_dist.run.orchestrator import Limits, run

    own = method_config(cfg, [], "seq_lora")
    own.run_dir = str(tmp_path / "own-seq_lora")
    assert run(own, Limits(max_stages=1)) == 0
    for name in ("stage_00_base.json", "stage_00_base.samples.json"):
        a, b = (json.loads((tmp_path / d / "eval" / name).read_text()) for d in ("run-seq_lora", "own-seq_lora"))
        if "config" in a:
            a.pop("config"), b.pop("config"), a.pop("date", None), b.pop("date", None)
        assert a == b, name
    # a method run as its own job (--methods olora) copies the base evaluation from a sibling run that has one
    from mora_dist.compare import run_compare

    assert run_compare(cfg, ["olora"], [], limits=Limits(max_stages=1)) == 0
    alone = json.loads((tmp_path / "run-olora" / "eval" / "stage_00_base.json").read_text())
    assert alone["config"]["base_results_from"] == str(tmp_path / "run-mora")


def test_base_results_are_shared_only_when_every_setting_they_depend_on_is_equal(tmp_path):
    from mora_dist.config import RunConfig, TaskConfig, dump_config, load_config
    from mora_dist.run.shared_base import base_eval_key, reusable_base

    source = tmp_path / "first"
    source.mkdir()
    (source / "config.yaml").write_text(dump_config(
        RunConfig(run_dir=str(source), tasks=[TaskConfig(name="FOMC"), TaskConfig(name="NumGLUE-cm")])))
    cfg = load_config(source / "config.yaml")
    assert reusable_base(source, cfg) is None  # no state yet: the first run has not evaluated its base
    (source / "state.json").write_text(json.dumps({"version": 1, "tasks": ["FOMC", "NumGLUE-cm"], "done": [
        {"stage": "base/evaluate", "seconds": 1.0, "info": {"FOMC": 0.25, "NumGLUE-cm": 0.5}}]}))
    ours = load_config(source / "config.yaml")
    assert base_eval_key(ours) == base_eval_key(cfg)
    # what the base model does not have yet: another method, adapter, training or pruning setting, run dir
    for change in ("method=seq_lora", "mora.r_task=2", "train.lr=0.1", "prune.enabled=false", "run_dir=x"):
        other = load_config(source / "config.yaml", [change])
        assert reusable_base(source, other) == {"FOMC": 0.25, "NumGLUE-cm": 0.5}, change
    other = load_config(source / "config.yaml")
    other.tasks[0].epochs = 3
    assert reusable_base(source, other) == {"FOMC": 0.25, "NumGLUE-cm": 0.5}
    # what decides the base scores: not shared
    for change in ("eval.max_examples=7", "eval.seed=3", "model.max_length=64", "model.dtype=bfloat16",
                   "data.root=/elsewhere", "distributed.zero_stage=3"):
        assert reusable_base(source, load_config(source / "config.yaml", [change])) is None, change
    other = load_config(source / "config.yaml")
    other.tasks[1].max_new_tokens = 2
    assert reusable_base(source, other) is None
    # a method run alone finds that source among its comparison's run directories, not in its own, the
    # comparison's, another prefix's, or one whose base would differ
    from mora_dist.run.shared_base import sibling_with_base

    for name in ("run-compare", "run-seq_lora", "runx-mora", "run-olora"):
        shutil.copytree(source, tmp_path / name)
    (tmp_path / "run-olora" / "config.yaml").write_text(dump_config(load_config(source / "config.yaml", [
        "eval.max_examples=7"])))
    (tmp_path / "run-moe_lora").mkdir()  # started, nothing recorded yet
    (tmp_path / "run-mora").mkdir()
    (tmp_path / "run-mora" / "config.yaml").write_text("not: [valid")  # unreadable: skipped, not an error
    own = load_config(source / "config.yaml", ["method=seq_lora", f"run_dir={tmp_path / 'run-seq_lora'}"])
    assert sibling_with_base(tmp_path / "run", own) is None
    shutil.copytree(source, tmp_path / "run-x-seed1")
    assert sibling_with_base(tmp_path / "run", own) == tmp_path / "run-x-seed1"
    assert sibling_with_base(tmp_path / "nowhere" / "run", own) is None


def test_method_overrides_apply_to_their_method_only_and_are_checked(tmp_path):
    from mora_dist.compare import method_config, parse_method_overrides

    methods_ = ["mora", "seq_lora", "mora_noprune"]
    own = parse_method_overrides(["mora:train.lr=2e-3", "mora_noprune: train.lr=1e-3", "mora:mora.k=4"], methods_)
    assert own == {"mora": ["train.lr=2e-3", "mora.k=4"], "mora_noprune": ["train.lr=1e-3"]}
    shared = ["train.lr=5e-4", f"run_dir={tmp_path / 'run'}"]
    cfgs = {m: method_config(None, shared, m, own=own.get(m, ())) for m in methods_}
    assert {m: c.train.lr for m, c in cfgs.items()} == {"mora": 2e-3, "seq_lora": 5e-4, "mora_noprune": 1e-3}
    assert (cfgs["mora"].mora.k, cfgs["mora_noprune"].mora.k) == (4, load_config(None).mora.k)
    assert cfgs["mora_noprune"].prune.enabled is False and cfgs["mora"].run_dir == str(tmp_path / "run-mora")
    assert method_config(None, shared, "mora", seed=3, own=["train.seed=9"]).train.seed == 3  # --seeds decides
    for bad, says in (("mora", "give METHOD:KEY=VALUE"), ("mora:train.lr", "give METHOD:KEY=VALUE"),
                      (":train.lr=1", "give METHOD:KEY=VALUE"), ("olora:train.lr=1e-3", "'olora' is not among"),
                      ("mora:method=olora", "method cannot differ per method"),
                      ("seq_lora:run_dir=x", "run_dir cannot differ per method")):
        with pytest.raises(ConfigError, match=f"--method-override '{re.escape(bad)}'.*{re.escape(says)}"):
            parse_method_overrides([bad], methods_)
    with pytest.raises(ConfigError, match="train.lrr"):  # keys are checked where the method's config is built
        method_config(None, shared, "mora", own=["train.lrr=1"])


def test_plane_points_are_the_means_over_seeds_with_their_intervals():
    from mora_dist.compare_render import plane_points

    def run(forgetting, la):
        return {"metrics": {"forgetting": forgetting, "LA": la}}

    comp = {"seed_runs": {"mora": {"0": run(0.1, 0.5), "1": run(0.3, 0.7)}, "seq_lora": {"0": run(None, 0.9),
                                                                                         "1": run(None, 0.8)}},
            "intervals": {"available": True, "methods": {"mora": {"forgetting": [0.15, 0.25], "LA": [0.65, 0.7]},
                                                          "seq_lora": {"forgetting": None, "LA": [0.8, 0.9]}}}}
    points = plane_points(comp)
    assert list(points) == ["mora"]  # no forgetting (a one-task stream): not on the plane
    assert points["mora"]["forgetting"] == pytest.approx(0.2) and points["mora"]["LA"] == pytest.approx(0.6)
    assert points["mora"]["forgetting_ci"] == (0.15, 0.25)
    assert points["mora"]["LA_ci"] == pytest.approx((0.6, 0.7))  # widened to contain the mean
    single = {"runs": {"olora": run(0.05, 0.4)}, "intervals": {"available": False}}
    assert plane_points(single) == {"olora": {"forgetting": 0.05, "LA": 0.4, "forgetting_ci": None, "LA_ci": None}}


def test_spread_over_seeds_and_seed_parsing():
    from mora_dist.compare import parse_seeds, spread

    s = spread([0.5, None, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)  # sample std (n - 1)
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.9, 3)
    assert spread([0.4]) == {"mean": 0.4, "std": None, "min": 0.4, "max": 0.4, "n": 1}
    assert spread([None])["mean"] is None
    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_seeds(None) is None
    for bad in ("", "1,1", "a"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


@pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")
def test_compare_over_seeds_reports_per_seed_rows_and_the_aggregate(tiny_model_dir, tmp_path, capsys):
    from tests.support.runs import write_config

    from mora_dist.cli import main

    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "run")
    args = ["compare", str(cfg), "--methods", "mora,seq_lora", "--seeds", "0,1", "--resamples", "200",
            "train.max_steps=2", "eval.max_examples=3"]
    assert main(args) == 0
    comp = json.loads((tmp_path / "run-compare" / "compare.json").read_text())
    assert comp["seeds"] == [0, 1] and "runs" not in comp
    for m in ("mora", "seq_lora"):
        runs = comp["seed_runs"][m]
        assert [runs[s]["seeds"]["train"] for s in ("0", "1")] == [0, 1]
        assert [runs[s]["run_dir"] for s in ("0", "1")] == [str(tmp_path / f"run-{m}-seed{s}") for s in (0, 1)]
        for key in ("AP", "BWT", "forgetting", "LA"):
            values = [runs[s]["metrics"][key] for s in ("0", "1")]
            agg = comp["aggregate"][m][key]
            assert agg["n"] == 2 and agg["mean"] == pytest.approx(sum(values) / 2)
            assert agg["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
            assert (agg["min"], agg["max"]) == (min(values), max(values))
    # the two seeds train differently (train.seed), on the same test examples (eval.seed)
    a0, a1 = (load_file(str(tmp_path / f"run-mora-seed{s}" / "adapters" / "01-NumGLUE-cm" / "adapter.safetensors"))
              for s in (0, 1))
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)
    diff = comp["aggregate_differences"]["seq_lora"]["AP"]
    per_seed = [comp["seed_runs"]["seq_lora"][s]["metrics"]["AP"] - comp["seed_runs"]["mora"][s]["metrics"]["AP"]
                for s in ("0", "1")]
    assert diff["mean"] == pytest.approx(sum(per_seed) / 2)
    ints = comp["intervals"]
    assert ints["resamples"] == 200 and ints["differences"]["seq_lora"]["AP"]["value"] == pytest.approx(diff["mean"])
    md = (tmp_path / "run-compare" / "compare.md").read_text()
    assert "## Per seed" in md and md.count("| mora | 0 |") == 2 and md.count("| seq_lora | 1 |") == 2
    assert "Mean ± standard deviation over the 2 seeds" in md and "of the mean over seeds" in md
    flat = [f"{m} (seed {seed}): FOMC" for m, sr in comp["seed_runs"].items() for seed, r in sr.items()
            if not r["answers"]["tasks"]["FOMC"]["beyond_constant"]]
    assert all(f in md for f in flat) and (bool(flat) == ("Not learned beyond a constant answer" in md))
    assert "## Answers changed by the later tasks" in md
    assert "Mean share (the mean over seeds) with its 95% paired bootstrap interval" in md
    assert "Difference from mora (percentage points): seq_lora " in md
    assert comp["intervals"]["differences"]["seq_lora"]["answers_changed"]["value"] == pytest.approx(
        sum(r["answers"]["changes"]["mean_share"] for r in comp["seed_runs"]["seq_lora"].values()) / 2
        - sum(r["answers"]["changes"]["mean_share"] for r in comp["seed_runs"]["mora"].values()) / 2)
    for m, sr in comp["seed_runs"].items():  # FOMC, the first task, against its answers after NumGLUE-cm
        for seed, r in sr.items():
            c = r["answers"]["changes"]
            row = f"{100 * c['tasks']['FOMC']['share']:.0f}% ({c['tasks']['FOMC']['changed']}/3)"
            assert f"| {m} (seed {seed}) | {row} | {100 * c['mean_share']:.0f}% |" in md
    capsys.readouterr()
    assert main(args) == 0  # every run finished: nothing redone
    assert capsys.readouterr().out.count("nothing to do") == 4
    assert main(["compare", str(cfg), "--seeds", "1,x"]) == 2  # a clear error, no traceback
    assert "--seeds '1,x': give comma-separated integers" in capsys.readouterr().err


@pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")
def test_olora_and_moe_lora_run_the_stream(tiny_model_dir, tmp_path):
    from tests.support.runs import write_config

    from mora_dist.compare import run_compare

    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "run")
    code = run_compare(cfg, ["olora", "moe_lora"], ["moe_lora.top_k=1", "olora.lambda_l2=0.01",
                                                    "eval.max_examples=2"])
    assert code == 0
    comp = json.loads((tmp_path / "run-compare" / "compare.json").read_text())
    olora, moe = comp["runs"]["olora"], comp["runs"]["moe_lora"]
    assert olora["settings"]["olora"] == {"lambda_orth": 0.5, "lambda_l2": 0.01} and olora["settings"]["gate"] == "none"
    assert moe["settings"]["gate"] == "router" and moe["settings"]["router_top_k"] == 1
    per_block = 2 * (64 + 64 + 48 + 48)  # (in + out) over q, k, v, o of 2 layers, per expert
    assert olora["params"] == {"trainable_params_per_task": 4 * per_block, "adapter_params": 8 * per_block,
                               "active_params_per_token": 8 * per_block}
    row = 8 * 32  # a router row of d_in = 32 per layer (8 layers) and block
    assert moe["params"] == {"trainable_params_per_task": 4 * per_block + row,
                             "adapter_params": 8 * per_block + 2 * row,
                             "active_params_per_token": 4 * per_block + 2 * row}  # top-1: one block's experts
    for name in ("olora", "moe_lora"):
        desc = json.loads((tmp_path / f"run-{name}" / "adapters" / "01-NumGLUE-cm" / "adapter.json").read_text())
        assert [b["name"] for b in desc["blocks"]] == ["FOMC", "NumGLUE-cm"]
        assert all(layer["block_sizes"] == [4, 4] for layer in desc["layers"].values())  # no pruning
    w = load_file(str(tmp_path / "run-moe_lora" / "adapters" / "01-NumGLUE-cm" / "adapter.safetensors"))
    w0 = load_file(str(tmp_path / "run-moe_lora" / "adapters" / "00-FOMC" / "adapter.safetensors"))
    routers = [k for k in w if k.endswith(".router")]
    assert len(routers) == 8 and all(w[k].shape == (2, 32) for k in routers)
    assert all(torch.equal(w[k][:1], w0[k]) for k in routers)  # the first task's router row stayed frozen
    stats = json.loads((tmp_path / "run-moe_lora" / "stats" / "01-NumGLUE-cm.json").read_text())
    for layer in stats["layers"].values():  # top-1: every token selects exactly one task expert (4 experts)
        assert sum(sum(b["selected"]) for b in layer["blocks"]) == 4 * layer["tokens"]
