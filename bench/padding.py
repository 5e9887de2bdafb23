"""Padding and training throughput with and without ``train.group_by_length`` on the TRACE tasks.

    python bench/padding.py [--config configs/trace.yaml] [--speed-tasks C-STANCE,Py150] [--micro-batches 3]

1. Padding fraction (padding tokens / all tokens of the micro-batches, each padded to its longest example) of
   one epoch of every task of the config, as the orchestrator plans it on 1 worker (the plan does not depend on
   the world size): the config's micro-batch and global batch, its seed, SmolLM2's tokenizer and chat template,
   ``model.max_length``; before (seeded shuffles) and after (grouped by length).
2. Training tokens/s (non-padding tokens per second of forward + backward + AdamW on the MoRA block) of the real
   SmolLM2-135M on CPU, on the first ``--micro-batches`` micro-batches of each plan of ``--speed-tasks``, the two
   plans interleaved micro-batch by micro-batch so that both see the same machine load; ratios are what matter
   (absolute CPU numbers mean little).

Prints a table and writes ``bench/results/padding.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "trace.yaml"))
    p.add_argument("--speed-tasks", default="C-STANCE,Py150")
    p.add_argument("--micro-batches", type=int, default=3)
    return p.parse_args(argv)


def plans(cfg, tok, index: int):
    """(encoded examples, micro-batches before, micro-batches after) of one task, as the orchestrator plans them."""
    from mora_dist.data import encode_examples, load_task_examples
    from mora_dist.data.grouping import task_batch_order
    from mora_dist.schedule import steps_for

    t, task = cfg.train, cfg.tasks[index]
    examples = load_task_examples(task, cfg.data.root, "train", limit=t.max_examples, seed=t.seed)
    encoded, _ = encode_examples(tok, examples, cfg.model.max_length, cfg.model.chat_template)
    gas = t.gradient_accumulation(1)
    global_batch = t.micro_batch_size * gas
    steps = steps_for(len(encoded), global_batch, 1.0, None)  # one epoch
    out = []
    for grouped in (False, True):
        order = task_batch_order(encoded, global_batch, steps, t.seed + index, grouped)
        out.append([idx[j:j + t.micro_batch_size] for idx in order for j in range(0, len(idx), t.micro_batch_size)])
    return encoded, out[0], out[1]


def main() -> None:
    args = parse()
    import torch

    from mora_dist.config import load_config
    from mora_dist.data.grouping import padding_fraction
    from mora_dist.data.tokenize import collate
    from mora_dist.base_model import load_model, load_tokenizer
    from mora_dist.mora import add_block, inject_mora, trainable_parameters

    cfg = load_config(args.config, ["model.name=smollm2-135m-instruct", "train.max_examples=null"])
    tok = load_tokenizer(cfg.model.name)
    rows, planned = {}, {}
    for i, task in enumerate(cfg.tasks):
        encoded, before, after = plans(cfg, tok, i)
        lengths = [len(e["input_ids"]) for e in encoded]
        planned[task.name] = (encoded, before, after)
        rows[task.name] = {"examples": len(encoded), "micro_batches": len(before),
                           "mean_length": round(sum(lengths) / len(lengths), 1),
                           "padding_before": round(padding_fraction(lengths, before), 4),
                           "padding_after": round(padding_fraction(lengths, after), 4)}
    real = sum(sum(len(planned[n][0][i]["input_ids"]) for mb in planned[n][1] for i in mb) for n in planned)

    def padded(k):
        return sum(max(len(planned[n][0][i]["input_ids"]) for i in mb) * len(mb) for n in planned
                   for mb in planned[n][k])

    overall = {"padding_before": round(1 - real / padded(1), 4), "padding_after": round(1 - real / padded(2), 4)}
    for name, r in rows.items():
        print(f"{name}: padding {r['padding_before']:.3f} -> {r['padding_after']:.3f}", flush=True)

    torch.manual_seed(0)
    model = load_model(cfg.model.name)
    inject_mora(model, cfg.mora)
    add_block(model, "t0")
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-5)
    model.train()
    speed = {}
    for name in args.speed_tasks.split(","):
        encoded, before, after = planned[name]
        stats = {"before": [0, 0.0], "after": [0, 0.0]}
        for j in range(args.micro_batches):
            for key, mbs in (("before", before), ("after", after)):
                batch = collate([encoded[i] for i in mbs[j]], tok.pad_token_id)
                t0 = time.perf_counter()
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                stats[key][1] += time.perf_counter() - t0
                stats[key][0] += int(batch["attention_mask"].sum())
                print(f"  {name} micro-batch {j + 1} {key}: {tuple(batch['input_ids'].shape)} "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
        speed[name] = {k: {"tokens": v[0], "seconds": round(v[1], 2), "tokens_per_s": round(v[0] / v[1], 1)}
                       for k, v in stats.items()}
        speed[name]["speedup"] = round(speed[name]["after"]["tokens_per_s"] / speed[name]["before"]["tokens_per_s"], 3)
    summary = {"config": str(Path(args.config).name), "micro_batch_size": cfg.train.micro_batch_size,
               "global_batch_size": cfg.train.global_batch_size, "max_length": cfg.model.max_length,
               "model": "smollm2-135m-instruct (fp32, CPU, MoRA r_task 8 on q/k/v/o)", "tasks": rows,
               "overall": overall, "tokens_per_s": speed, "micro_batches_timed_per_plan": args.micro_batches}
    out = ROOT / "bench" / "results" / "padding.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"{'task':<12} {'examples':>8} {'mean len':>8} {'padding before':>15} {'after':>7}")
    for name, r in rows.items():
        print(f"{name:<12} {r['examples']:>8} {r['mean_length']:>8} {r['padding_before']:>15.3f} "
              f"{r['padding_after']:>7.3f}")
    print(f"{'all':<12} {'':>8} {'':>8} {overall['padding_before']:>15.3f} {overall['padding_after']:>7.3f}")
    for name, s in speed.items():
        print(f"{name}: tokens/s {s['before']['tokens_per_s']} -> {s['after']['tokens_per_s']} "
              f"(x{s['speedup']}, {args.micro_batches} micro-batches each, interleaved)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
