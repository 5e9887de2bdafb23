"""Benchmark: one MoRA training step (forward, backward) and one greedy generation batch with SmolLM2-135M-Instruct in
float32 against bfloat16 (``model.dtype``), on real examples of a standard-CL task.

On a CPU with AMX or AVX512-BF16 the bf16 matrix products are several times faster; on one without them bf16 can
be slower. Both precisions run side by side in this one run, alternating per micro-batch so that machine load hits
both alike. The gate arithmetic stays in float32 in both (``MoRALayer`` promotes it). It also reports the loss
difference between the two precisions on the same batch and weights (the bf16 model is the fp32 one cast). Results
are printed and written to ``bench/results/precision.json``.

Launch: ``python bench/precision.py [--task dbpedia] [--batches 4] [--micro-batch-size 4] [--data-root DIR]``
(``--data-root`` defaults to ``$MORA_DATA_ROOT``, else ``../shared/data/llm-cl-benchmark-500``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> list[str]:
    """The bf16-relevant instruction-set flags of this CPU (Linux), for the record."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dbpedia")
    parser.add_argument("--batches", type=int, default=4, help="micro-batches timed per precision")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--data-root", default=os.environ.get("MORA_DATA_ROOT",
                                                              str(REPO.parent / "shared/data/llm-cl-benchmark-500")))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "precision.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mora_dist.base_model import load_model, load_tokenizer
    from mora_dist.config import TaskConfig
    from mora_dist.data import encode_examples, load_task_examples
    from mora_dist.data.tokenize import collate
    from mora_dist.mora import MoRAConfig, add_block, inject_mora
    from mora_dist.training import answer_loss

    tok = load_tokenizer("smollm2-135m-instruct")
    fp32 = load_model("smollm2-135m-instruct")
    inject_mora(fp32, MoRAConfig(r_task=8, k=8, tau=0.03, delta=0.2, dropout=0.0))
    torch.manual_seed(0)
    add_block(fp32, args.task)
    for name, p in fp32.named_parameters():  # B starts at 0: give it values so the adapter's path is exercised
        if p.requires_grad and "B" in name.split(".")[-1]:
            torch.nn.init.normal_(p, std=0.02)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"float32": fp32.train(), "bfloat16": bf16.train()}

    examples = load_task_examples(TaskConfig(name=args.task), Path(args.data_root), "train")
    encoded, _ = encode_examples(tok, examples, args.max_length, chat_template=True)
    n = args.micro_batch_size
    batches = [collate(encoded[i * n:(i + 1) * n], tok.pad_token_id) for i in range(args.batches + 1)]

    train_s = {k: [] for k in models}
    max_rel = 0.0
    for i, batch in enumerate(batches):
        losses = {}
        for name in (list(models) if i % 2 == 0 else list(reversed(models))):
            start = time.perf_counter()
            loss = answer_loss(models[name], batch)
            loss.backward()
            elapsed = time.perf_counter() - start
            models[name].zero_grad(set_to_none=True)
            losses[name] = float(loss.detach())
            if i > 0:  # the first batch warms up
                train_s[name].append(elapsed)
        max_rel = max(max_rel, abs(losses["bfloat16"] - losses["float32"]) / abs(losses["float32"]))

    gen_s = {k: [] for k in models}
    # the first micro-batch's prompts alone (tokens before the answer), left-padded for generation
    ids = [torch.tensor(e["input_ids"])[torch.tensor(e["labels"]) == -100] for e in encoded[:n]]
    width = max(len(r) for r in ids)
    inp = torch.full((len(ids), width), tok.pad_token_id)
    att = torch.zeros((len(ids), width), dtype=torch.long)
    for j, r in enumerate(ids):
        inp[j, width - len(r):] = r
        att[j, width - len(r):] = 1
    outs = {}
    for rep in range(3):
        for name in (list(models) if rep % 2 == 0 else list(reversed(models))):
            m = models[name].eval()
            start = time.perf_counter()
            with torch.no_grad():
                out = m.generate(input_ids=inp, attention_mask=att, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            if rep > 0:
                gen_s[name].append(time.perf_counter() - start)
            outs[name] = out[:, width:]
    agree = float((outs["float32"] == outs["bfloat16"]).all(dim=1).float().mean())

    med_train = {k: statistics.median(v) for k, v in train_s.items()}
    med_gen = {k: statistics.median(v) for k, v in gen_s.items()}
    tokens = [int(b["attention_mask"].sum()) for b in batches[1:]]
    result = {
        "benchmark": "precision", "model": "smollm2-135m-instruct", "task": args.task,
        "micro_batch_size": n, "batches": args.batches, "threads": torch.get_num_threads(),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_bf16_flags": cpu_flags(),
        "mean_tokens_per_batch": sum(tokens) / len(tokens),
        "train_step_median_seconds": med_train,
        "train_step_speedup_bf16": med_train["float32"] / med_train["bfloat16"],
        "generate_median_seconds": med_gen,
        "generate_speedup_bf16": med_gen["float32"] / med_gen["bfloat16"],
        "max_relative_loss_difference": max_rel,
        "greedy_outputs_identical_share": agree,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
