"""Benchmark: one training forward and backward with the vocabulary projection at answer positions only
(``training.answer_loss``) vs the model's own ``labels`` loss, on SmolLM2-135M-Instruct with a MoRA block.

Real examples: the quickstart's training slice (``data/quickstart``, chat template, micro-batches of 8 as the
quickstart trains). Both variants run side by side in this one run, alternating per micro-batch so machine load
hits both alike; it also reports the largest loss difference between them. Results are printed and written to
``bench/results/train_step.json``.

Launch: ``python bench/train_step.py [--task dbpedia] [--batches 6] [--micro-batch-size 8] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def timed(fn) -> tuple[float, float]:
    """Seconds taken by ``fn()`` (a loss) plus its backward, and the loss."""
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    return time.perf_counter() - start, float(loss.detach())


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dbpedia")
    parser.add_argument("--batches", type=int, default=6, help="micro-batches timed per variant")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
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
    model = load_model("smollm2-135m-instruct")
    inject_mora(model, MoRAConfig(r_task=8, k=8, tau=0.03, delta=0.2, dropout=0.0))
    torch.manual_seed(0)
    add_block(model, args.task)
    model.train()
    examples = load_task_examples(TaskConfig(name=args.task), REPO / "data" / "quickstart", "train")
    encoded, report = encode_examples(tok, examples, 192, chat_template=True)
    n = args.micro_batch_size
    batches = [collate(encoded[i * n:(i + 1) * n], tok.pad_token_id) for i in range(args.batches + 1)]

    variants = {"labels_loss": lambda b: model(**b).loss, "answer_loss": lambda b: answer_loss(model, b)}
    seconds = {k: [] for k in variants}
    max_diff = 0.0
    for i, batch in enumerate(batches):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        losses = {}
        for name in order:
            torch.manual_seed(i)  # the same dropout masks for both (dropout is 0 here anyway)
            s, losses[name] = timed(lambda: variants[name](batch))
            model.zero_grad(set_to_none=True)
            if i > 0:  # the first batch warms up
                seconds[name].append(s)
        max_diff = max(max_diff, abs(losses["labels_loss"] - losses["answer_loss"]))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    tokens = [int(b["attention_mask"].sum()) for b in batches[1:]]
    answer = [int((b["labels"] != -100).sum()) for b in batches[1:]]
    result = {
        "benchmark": "train_step", "model": "smollm2-135m-instruct", "task": args.task,
        "micro_batch_size": n, "batches": args.batches, "threads": torch.get_num_threads(),
        "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "mean_tokens_per_batch": sum(tokens) / len(tokens), "mean_answer_tokens_per_batch": sum(answer) / len(answer),
        "median_seconds": med, "speedup": med["labels_loss"] / med["answer_loss"],
        "max_abs_loss_difference": max_diff, "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
