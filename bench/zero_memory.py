"""ZeRO-3 memory per worker (2 workers vs 1) and the cost of the statistics all-reduce, for MoRA training.

    python bench/zero_memory.py [--hidden 512 --layers 4 --vocab 4096 --steps 8]

Launches itself under torchrun with 1 and then 2 CPU processes (gloo, 127.0.0.1), each building a randomly
initialised Llama under ``deepspeed.zero.Init`` with MoRA on q/k/v/o (one task block), and measures on every
worker:

* parameter bytes held by the worker: the ZeRO-3 partitions (``ds_tensor``) of all parameters, base and adapter
  (``stage3_param_persistence_threshold=0``: nothing is kept whole);
* optimizer-state bytes held by the worker: DeepSpeed's fp32 master partitions of the trainable (adapter)
  parameters plus AdamW's ``exp_avg``/``exp_avg_sq`` for them.

With only the adapter trainable, the base dominates the parameter bytes and the adapter dominates the optimizer
states; both are partitioned, so the per-worker total should be about half with 2 workers (target <= 0.55x).
It also times one task's training (``train_task``) and the one statistics all-reduce of ``collect_statistics``
(target < 1% of the task's training time; the time measured inside the pass includes waiting for the slowest
worker to finish its forwards, so an isolated all-reduce of the same size after a barrier is reported too). Prints and writes ``bench/results/zero_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stat-batches", type=int, default=4)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mora_dist.config import DistributedConfig, RunConfig, TrainConfig
    from mora_dist.distributed import bank
    from mora_dist.distributed import engine as E
    from mora_dist.distributed.trainer import train_task
    from mora_dist.distributed.env import init_distributed, shutdown
    from mora_dist.distributed.stats import collect_statistics
    from mora_dist.mora import MoRAConfig, inject_mora, is_adapter_parameter

    rank, world, _ = init_distributed()
    try:
        cfg = RunConfig(mora=MoRAConfig(r_task=8, k=8, dropout=0.0),
                        train=TrainConfig(micro_batch_size=2, global_batch_size=4, lr=5e-4),
                        distributed=DistributedConfig(zero_stage=3))
        h = args.hidden
        mcfg = LlamaConfig(vocab_size=args.vocab, hidden_size=h, intermediate_size=4 * h,
                           num_hidden_layers=args.layers, num_attention_heads=h // 64, num_key_value_heads=h // 64,
                           max_position_embeddings=args.seq, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = E.build_model(lambda: LlamaForCausalLM(mcfg), cfg, persistence_threshold=0)
        inject_mora(model, cfg.mora)
        bank.grow(model, "task0", seed=0)
        engine = E.build_engine(model, cfg, total_steps=args.steps, persistence_threshold=0)

        base = adapter = full_base = full_adapter = 0
        for name, p in model.named_parameters():
            held = tensor_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else tensor_bytes(p)
            full = p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else tensor_bytes(p)
            if is_adapter_parameter(name):
                adapter, full_adapter = adapter + held, full_adapter + full
            else:
                base, full_base = base + held, full_base + full
        opt = engine.optimizer
        master = sum(tensor_bytes(t) for t in getattr(opt, "fp32_partitioned_groups_flat", []))
        g = torch.Generator().manual_seed(rank)
        gas = engine.gradient_accumulation_steps()
        batches = []
        for _ in range(args.steps * gas):
            ids = torch.randint(0, args.vocab, (2, args.seq), generator=g)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        t0 = time.perf_counter()
        losses = train_task(engine, batches)
        train_s = time.perf_counter() - t0
        moments = sum(tensor_bytes(v) for st in opt.optimizer.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.dim() > 0)
        stats = collect_statistics(engine, batches[:args.stat_batches])
        isolated = []  # the same all-reduce without the wait for the slowest worker's forwards
        flat = torch.zeros(stats["allreduce_bytes"] // 8, dtype=torch.float64)
        for _ in range(5):
            if world > 1:
                torch.distributed.barrier()
            t1 = time.perf_counter()
            if world > 1:
                torch.distributed.all_reduce(flat)
            isolated.append(time.perf_counter() - t1)
        E.destroy_engine(engine)
        row = {"rank": rank, "world_size": world,
               "param_bytes": {"base": base, "adapter": adapter, "total": base + adapter},
               "param_bytes_unpartitioned": {"base": full_base, "adapter": full_adapter},
               "optimizer_bytes": {"fp32_master": master, "adam_moments": moments, "total": master + moments},
               "train_seconds": train_s, "steps": args.steps, "losses": losses,
               "stats_allreduce_seconds": stats["allreduce_seconds"],
               "stats_allreduce_bytes": stats["allreduce_bytes"],
               "isolated_allreduce_seconds_median": sorted(isolated)[2]}
        write_rows(row, world, rank, args.worker_out)
    finally:
        shutdown()


def write_rows(row: dict, world: int, rank: int, path) -> None:
    """Gather every worker's measurements and let rank 0 write them, in rank order, as JSON."""
    import torch

    rows = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if rank == 0:
        Path(path).write_text(json.dumps(rows))


def torchrun_workers(script: Path, nproc: int, argv: list[str], out: Path, timeout: float = 900) -> list[dict]:
    """Run ``script argv --worker-out OUT`` under torchrun with ``nproc`` CPU processes on 127.0.0.1; return the
    JSON list rank 0 wrote to ``out`` (the scripts' workers gather one row per rank there)."""
    from mora_dist.distributed.env import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env["PYTHONPATH"] = str(ROOT)
    cmd = ["torchrun", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), str(Path(script).resolve()), *argv, "--worker-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out.read_text())


def launch(nproc: int, args, out: Path) -> list[dict]:
    argv = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab), "--seq",
            str(args.seq), "--steps", str(args.steps), "--stat-batches", str(args.stat_batches)]
    return torchrun_workers(Path(__file__), nproc, argv, out)


def main() -> None:
    args = parse()
    if args.worker_out:
        worker(args)
        return
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    one = launch(1, args, results / ".zero_memory_w1.json")
    two = launch(2, args, results / ".zero_memory_w2.json")
    per1 = one[0]["param_bytes"]["total"] + one[0]["optimizer_bytes"]["total"]
    per2 = max(r["param_bytes"]["total"] + r["optimizer_bytes"]["total"] for r in two)
    task_s = max(r["train_seconds"] for r in two)
    ar_s = max(r["stats_allreduce_seconds"] for r in two)
    summary = {
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "seq": args.seq,
                  "mora": "r_task=8 on q/k/v/o", "dtype": "float32"},
        "per_worker_bytes_1": per1, "per_worker_bytes_2_max": per2, "ratio": per2 / per1, "target_ratio": 0.55,
        "param_ratio": max(r["param_bytes"]["total"] for r in two) / one[0]["param_bytes"]["total"],
        "optimizer_ratio": max(r["optimizer_bytes"]["total"] for r in two) / one[0]["optimizer_bytes"]["total"],
        "task_train_seconds_2": task_s, "stats_allreduce_seconds_2": ar_s, "allreduce_fraction": ar_s / task_s,
        "isolated_allreduce_seconds_2": max(r["isolated_allreduce_seconds_median"] for r in two),
        "target_fraction": 0.01, "workers_1": one, "workers_2": two,
    }
    for f in (results / ".zero_memory_w1.json", results / ".zero_memory_w2.json"):
        f.unlink(missing_ok=True)
    (results / "zero_memory.json").write_text(json.dumps(summary, indent=1))
    print(f"per-worker params+optimizer bytes: 1 worker {per1 / 2**20:.2f} MiB, 2 workers {per2 / 2**20:.2f} MiB "
          f"-> ratio {summary['ratio']:.3f} (target <= 0.55; params {summary['param_ratio']:.3f}, "
          f"optimizer {summary['optimizer_ratio']:.3f})")
    print(f"stats all-reduce {ar_s * 1e3:.2f} ms ({two[0]['stats_allreduce_bytes']} bytes) vs task training "
          f"{task_s:.2f} s ({args.steps} steps) -> {100 * summary['allreduce_fraction']:.3f}% (target < 1%)")
    print(f"  (the in-pass time includes waiting for the slowest worker; the all-reduce alone: "
          f"{summary['isolated_allreduce_seconds_2'] * 1e3:.3f} ms)")
    print(f"wrote {results / 'zero_memory.json'}")


if __name__ == "__main__":
    main()
