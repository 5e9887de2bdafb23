"""The one training step, the declared trainer interface, the bank's gathering context off ZeRO-3, the schedule's
per-worker batches and the stage-name parser."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from tests.support import REPO
from mora_dist.config import RunConfig, TaskConfig, TrainConfig
from mora_dist.mora import MoRAConfig, add_block, inject_mora, trainable_parameters
from mora_dist.run.state import BASE_STAGE, RunStateError, StageKey, all_stages, last_stage_of, parse_stage
from mora_dist.schedule import lr_factor, plan_task, rank_micro_batches, rank_stats_batches
from mora_dist.training import StepBackend, TorchStep, Trainer, train_step


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 128, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _model(tiny_llama):
    inject_mora(tiny_llama, MoRAConfig(r_task=4, k=2, dropout=0.1))
    torch.manual_seed(1)
    add_block(tiny_llama, "t0")
    return tiny_llama


def test_train_step_is_the_plain_pytorch_loop(tiny_llama):
    """An independent reference: micro-batch losses over their number, AdamW, clipping, the schedule by hand."""
    import copy

    model = _model(tiny_llama)
    ref = copy.deepcopy(model)
    steps, gas, lr = 3, 2, 1e-2
    batches = _batches(steps * gas)
    backend = TorchStep(model, [p for _, p in trainable_parameters(model)], lr=lr, steps=steps, warmup=1,
                        grad_clip=0.5)
    assert isinstance(backend, StepBackend)
    torch.manual_seed(5)
    got = [train_step(backend, s, batches[s * gas:(s + 1) * gas])[0] for s in range(steps)]

    params = [p for _, p in trainable_parameters(ref)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(5)
    want = []
    for s in range(steps):
        ref.train()
        total = 0.0
        for batch in batches[s * gas:(s + 1) * gas]:
            loss = ref(**batch).loss / gas
            loss.backward()
            total += loss.item()
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(s, steps, "cosine", 1)
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append(total)
    assert got == want  # bit-identical
    for (n, a), (_, b) in zip(trainable_parameters(model), trainable_parameters(ref)):
        assert torch.equal(a, b), n


def test_both_trainers_implement_the_declared_interface():
    from mora_dist.distributed.trainer import DeepSpeedTrainer
    from mora_dist.run.trainer import LocalTrainer

    abstract = Trainer.__abstractmethods__
    assert {"begin", "step", "save_checkpoint", "load_checkpoint", "restore_optimizer", "end", "barrier",
            "forward_model"} <= abstract
    for cls in (LocalTrainer, DeepSpeedTrainer):
        assert issubclass(cls, Trainer) and not cls.__abstractmethods__, cls
        for name in abstract - {"forward_model"}:
            declared = list(inspect.signature(getattr(Trainer, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == declared, (cls.__name__, name)

    class Partial(Trainer):
        def begin(self, steps, lr):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_one_process_bank_changes_never_load_deepspeed(tmp_path):
    """The gathering context is a no-op off ZeRO-3: grow, prune, freeze, save and load in one process run without
    the engine module (and so without deepspeed)."""
    code = f"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from mora_dist.config import RunConfig, TaskConfig
from mora_dist.mora import MoRAConfig, inject_mora, adapter_state_dict
from mora_dist.run.trainer import LocalTrainer
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2))
inject_mora(m, MoRAConfig(r_task=3, k=2))
t = LocalTrainer(m, RunConfig(tasks=[TaskConfig(name="a")]))
t.grow("a", seed=1)
t.freeze()
t.save_adapter(r"{tmp_path}/ad")
before = {{k: v.clone() for k, v in adapter_state_dict(m).items()}}
t.grow("b", seed=2)
t.load_adapter(r"{tmp_path}/ad")
after = adapter_state_dict(m)
assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
assert "mora_dist.distributed.engine" not in sys.modules and "deepspeed" not in sys.modules
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_plan_and_per_worker_batches():
    cfg = RunConfig(train=TrainConfig(micro_batch_size=2, global_batch_size=8, max_steps=None, epochs=2.0),
                    tasks=[TaskConfig(name="a"), TaskConfig(name="b", max_steps=3, lr=1e-3)])
    assert plan_task(cfg, 0, 20, 2) == plan_task(cfg, 0, 20, 2)
    p = plan_task(cfg, 0, 20, 2)
    assert (p.steps, p.gas, p.global_batch, p.lr) == (5, 2, 8, cfg.train.lr)
    assert (plan_task(cfg, 1, 20, 4).steps, plan_task(cfg, 1, 20, 4).lr) == (3, 1e-3)
    encoded = [{"input_ids": [i + 1] * (i % 5 + 1), "labels": [i + 1] * (i % 5 + 1)} for i in range(20)]
    idx = list(range(8))
    one = rank_micro_batches(encoded, idx, 0, 2, 4, 0)  # one worker, accumulation 4
    four = [b for r in range(4) for b in rank_micro_batches(encoded, idx, r, 2, 1, 0)]  # four workers, none
    assert len(one) == len(four) == 4 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, four))
    stats = [rank_stats_batches(encoded, r, 3, 2, 0, limit=15) for r in range(3)]
    assert [len(s) for s in stats] == [2, 2, 2] and all("labels" not in b for s in stats for b in s)


def test_stage_names_parse_back():
    tasks = ["FOMC", "NumGLUE-cm"]
    for stage in all_stages(tasks):
        key = parse_stage(stage)
        assert stage == (BASE_STAGE if key.index is None else f"{key.index:02d}-{key.task}/{key.step}")
    assert parse_stage("01-NumGLUE-cm/train") == StageKey(1, "NumGLUE-cm", "train")
    assert last_stage_of(tasks, "NumGLUE-cm") == "01-NumGLUE-cm/report"
    with pytest.raises(RunStateError, match="not a task"):
        last_stage_of(tasks, "ScienceQA")


def test_answer_loss_is_the_models_labels_loss_with_its_gradients(tiny_llama):
    """Projecting only the positions that predict an answer token changes neither the loss nor the gradients."""
    from mora_dist.data.tokenize import IGNORE, collate
    from mora_dist.training import answer_loss

    model = _model(tiny_llama)
    model.eval()  # no dropout: both forwards see the same function
    g = torch.Generator().manual_seed(3)
    items = []
    for n_prompt, n_answer in [(9, 2), (4, 3), (12, 1)]:  # answers end at different positions (right padding)
        ids = torch.randint(1, 128, (n_prompt + n_answer,), generator=g).tolist()
        items.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]})
    batch = collate(items, pad_id=0)
    params = [p for _, p in trainable_parameters(model)]

    want = model(**batch).loss
    want_grads = torch.autograd.grad(want, params)
    got = answer_loss(model, batch)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_answer_loss_falls_back_to_the_labels_loss_without_logits_to_keep(tiny_llama):
    from mora_dist.training import answer_loss

    class NoKeep(torch.nn.Module):  # a causal LM whose forward takes no logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    batch = _batches(1)[0]
    wrapped = NoKeep(tiny_llama)
    assert torch.equal(answer_loss(wrapped, batch), tiny_llama(**batch).loss)
