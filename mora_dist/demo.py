"""A short real continual-learning stream in one process: MoRA on SmolLM2 over two real tasks.

For each task: grow a block, train it, freeze it; then save the adapter, load it onto a fresh base, and check
answers on held-out examples of every task plus a general question. This is what ``mora-dist demo`` runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mora_dist.config import TaskConfig, expand_vars
from mora_dist.data import encode_examples, load_task_examples
from mora_dist.device import compute_device
from mora_dist.inference import generate, load_for_inference
from mora_dist.base_model import load_model, load_tokenizer
from mora_dist.mora import MoRAConfig, add_block, freeze_blocks, inject_mora, mora_layers, save_adapter
from mora_dist.training import mean_answer_loss, train_task_local

DEFAULT_ROOT = "${MORA_DATA_ROOT:-../shared/data/llm-cl-benchmark-500}"


def run_demo(model: str, data_root: str | None, tasks: list[str], steps: int, out: str, examples: int = 200,
             lr: float = 2e-3, max_length: int = 256, seed: int = 0) -> dict:
    root = Path(expand_vars(data_root or DEFAULT_ROOT))
    tok = load_tokenizer(model)
    lm = load_model(model).to(compute_device())
    inject_mora(lm, MoRAConfig())
    task_cfgs = [TaskConfig(name=t) for t in tasks]
    held = {t.name: load_task_examples(t, root, "test", limit=8, seed=seed) for t in task_cfgs}
    summary: dict = {"model": model, "tasks": tasks, "steps_per_task": steps, "per_task": {}}
    for task in task_cfgs:
        train, report = encode_examples(tok, load_task_examples(task, root, "train", limit=examples, seed=seed),
                                        max_length)
        held_enc, _ = encode_examples(tok, held[task.name], max_length)
        add_block(lm, task.name)
        before = mean_answer_loss(lm, held_enc, tok.pad_token_id)
        t0 = time.time()

        def log(step, loss, tokens, secs, name=task.name):
            if step % 5 == 0 or step == steps - 1:
                print(f"[{name}] step {step + 1}/{steps} loss {loss:.3f} {tokens / secs:.0f} tok/s", flush=True)

        train_task_local(lm, train, tok.pad_token_id, steps=steps, lr=lr, batch_size=4, seed=seed, on_step=log)
        after = mean_answer_loss(lm, held_enc, tok.pad_token_id)
        freeze_blocks(lm)
        summary["per_task"][task.name] = {"held_out_answer_loss_before": before, "after": after,
                                          "train_seconds": time.time() - t0, **report.as_dict()}
        print(f"[{task.name}] held-out answer loss {before:.3f} -> {after:.3f}", flush=True)
    adapter_dir = Path(out) / "adapter"
    save_adapter(lm, adapter_dir)
    print(f"adapter saved to {adapter_dir} (blocks: {mora_layers(lm)[next(iter(mora_layers(lm)))].block_sizes})")

    fresh, tok2 = load_for_inference(model, adapter_dir)
    for task in task_cfgs:
        exs = held[task.name][:3]
        preds = generate(fresh, tok2, [e["prompt"] for e in exs], max_new_tokens=8)
        summary["per_task"][task.name]["samples"] = [
            {"answer": e["answer"], "prediction": p} for e, p in zip(exs, preds)]
        for e, p in zip(exs, preds):
            print(f"[{task.name}] expected {e['answer'][:40]!r:>8}  generated {p[:40]!r}")
    question = "What is the capital of France?"
    summary["general"] = {question: generate(fresh, tok2, [question], max_new_tokens=16)[0]}
    print(f">>> {question}\n{summary['general'][question]}")
    os.makedirs(out, exist_ok=True)
    (Path(out) / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
