"""Benchmark: examples/s of batched greedy generation vs batch size 1 on SmolLM2-135M-Instruct (CPU or GPU).

Real prompts from the eval splits of ``shared/data/llm-cl-benchmark-500``. Three settings, each measured side by
side in this one run (same prompts, same model; per chunk of batch-size prompts, batch size 1 and batched run
back to back in alternating order, so machine load hits both alike):

* ``in_domain``: FOMC with its in-domain budget (``TASK_MAX_NEW_TOKENS["FOMC"]`` = 4 new tokens): prefill dominates.
* ``long_answers``: FOMC with 48 new tokens per prompt (a free-form answer budget).
* ``decode_bound``: NumGLUE-ds (short prompts) with 96 new tokens: decoding dominates.

On a CPU, batching only saves the per-step overhead of decoding one sequence at a time; prefill costs the same
FLOPs either way, so the speedup grows with the share of decoding in the work.

It also reports whether batched and batch-size-1 outputs agree. Results are printed and written to
``bench/results/generation_batch.json``.

Launch: ``python bench/generation_batch.py [--n 32] [--batch-size 16] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MORA_DATA_ROOT", REPO.parent / "shared" / "data" / "llm-cl-benchmark-500"))


def measure(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> tuple[float, list[str]]:
    """Seconds taken and outputs of ``generate_texts`` on ``prompts``."""
    from mora_dist.evaluation.generation import generate_texts

    start = time.perf_counter()
    out = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return time.perf_counter() - start, out


def main() -> dict:
    """Run both settings and write the JSON; returns the results dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="prompts for the in_domain setting")
    parser.add_argument("--n-long", type=int, default=16, help="prompts for the long_answers setting")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generation_batch.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mora_dist.evaluation.generation import task_max_new_tokens
    from mora_dist.base_model import load_model, load_tokenizer

    examples = {}
    for task in ("FOMC", "NumGLUE-ds"):
        path = DATA / task / "eval.json"
        if not path.is_file():
            raise SystemExit(f"benchmark data missing: {path}")
        examples[task] = json.loads(path.read_text(encoding="utf-8"))
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct").eval()
    measure(model, tok, [examples["FOMC"][0]["prompt"]], 2, 1)  # warm-up

    settings = {"in_domain": ("FOMC", args.n, task_max_new_tokens("FOMC")),
                "long_answers": ("FOMC", args.n_long, 48),
                "decode_bound": ("NumGLUE-ds", args.n_long, 96)}
    results: dict = {"model": "smollm2-135m-instruct", "batch_size": args.batch_size,
                     "device": str(next(model.parameters()).device), "torch_threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
                     "settings": {}}
    for name, (task, n, max_new) in settings.items():
        prompts = [ex["prompt"] for ex in examples[task][:n]]
        # Interleaved: per chunk of batch_size prompts, batch size 1 and batched back to back (alternating which
        # goes first), so that load from other processes hits both modes alike.
        t1 = tb = 0.0
        out1, outb = [], []
        for c, start in enumerate(range(0, len(prompts), args.batch_size)):
            chunk = prompts[start:start + args.batch_size]
            runs = [(1, out1), (args.batch_size, outb)]
            for bs, sink in (runs if c % 2 == 0 else runs[::-1]):
                seconds, out = measure(model, tok, chunk, max_new, bs)
                sink += out
                if bs == 1:
                    t1 += seconds
                else:
                    tb += seconds
        row = {"task": task, "n_examples": len(prompts), "max_new_tokens": max_new,
               "prompt_tokens_mean": sum(len(tok(p)["input_ids"]) for p in prompts) / len(prompts),
               "bs1_seconds": t1, "batched_seconds": tb,
               "bs1_examples_per_s": len(prompts) / t1, "batched_examples_per_s": len(prompts) / tb,
               "speedup": t1 / tb, "outputs_identical": sum(a == b for a, b in zip(out1, outb)) / len(prompts)}
        results["settings"][name] = row
        print(f"{name:>13}: n={row['n_examples']} new_tokens={max_new} prompt_tokens~{row['prompt_tokens_mean']:.0f} "
              f"| bs=1 {row['bs1_examples_per_s']:.2f} ex/s | bs={args.batch_size} "
              f"{row['batched_examples_per_s']:.2f} ex/s | speedup {row['speedup']:.2f}x "
              f"| identical outputs {row['outputs_identical']:.0%}", flush=True)

    from mora_dist.evaluation.results import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
