"""End-to-end check of the distributed path on a tiny Llama: ``python -m mora_dist.distributed.selftest``.

Runs under any launcher (deepspeed, torchrun, mpiexec, or one plain process)::

    deepspeed --num_gpus 2 --master_addr 127.0.0.1 -m mora_dist.distributed.selftest --model DIR --out OUT
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 -m mora_dist.distributed.selftest --model DIR --out OUT
    mpiexec -n 2 python -m mora_dist.distributed.selftest --model DIR --out OUT

For each task: grow → build engine → train (collectives recorded per phase) → statistics (one all-reduce) →
decide (hash compared across workers) → destroy engine → prune → freeze → save (gathered, rank 0 writes). Then
a final statistics pass and probe logits on the saved bank. Rank 0 prints ``SELFTEST_RESULT {json}`` and writes
``OUT/result.json``, ``OUT/final.pt`` (gathered bank and probe logits), ``OUT/stats-*.json``, ``OUT/adapter-*``.
``--engine torch`` is the independent one-process reference: plain PyTorch, no DeepSpeed.

The data is deterministic: task ``t`` has ``steps × global_batch`` examples of random tokens (lengths 6-16, right
padded to 16); optimizer step ``s`` uses examples ``[s·G, (s+1)·G)`` cut into micro-batches, micro-batch ``j``
going to worker ``j mod world``, so any world size sees the same global batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from mora_dist.distributed import commlog
from mora_dist.io import atomic_write_json

SEQ = 16
VOCAB = 128


def task_examples(task: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + task)
    lengths = torch.randint(6, SEQ + 1, (n,), generator=g)
    return [torch.randint(1, VOCAB, (int(L),), generator=g) for L in lengths]


def collate(examples: list[torch.Tensor]) -> dict:
    ids = torch.zeros(len(examples), SEQ, dtype=torch.long)
    mask = torch.zeros(len(examples), SEQ, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = e
        mask[i, :len(e)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batches(examples: list, micro: int, rank: int, world: int) -> list[dict]:
    """Micro-batch ``j`` of the example sequence goes to worker ``j mod world``."""
    chunks = [examples[i:i + micro] for i in range(0, len(examples), micro)]
    return [collate(c) for j, c in enumerate(chunks) if j % world == rank]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face folder with the tiny base model")
    p.add_argument("--out", required=True, help="output folder (rank 0 writes)")
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage 0-3")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per task")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stat-examples", type=int, default=8)
    p.add_argument("--instrument", action="store_true", help="record collectives per phase")
    p.add_argument("--check-frozen", action="store_true", help="compare base and frozen blocks before/after")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--resume", help="an adapter folder (saved at any world size) to load before training")
    p.add_argument("--first-task", type=int, default=0, help="index of the first task to train (with --resume)")
    return p.parse_args(argv)


def run_config(args):
    from mora_dist.config import DistributedConfig, ModelConfig, PruneConfig, RunConfig, TrainConfig
    from mora_dist.mora import MoRAConfig

    return RunConfig(
        model=ModelConfig(dtype=args.dtype),
        mora=MoRAConfig(r_task=4, k=3, dropout=0.0, tau=0.3, delta=0.2),
        train=TrainConfig(lr=args.lr, micro_batch_size=args.micro, global_batch_size=args.global_batch,
                          grad_clip=1.0, schedule="cosine", seed=args.seed),
        distributed=DistributedConfig(zero_stage=args.stage, offload_optimizer=args.offload_optimizer),
        # a loose bound: on this tiny random model any removal changes a layer's output by 9-90 %, and the
        # runs must really prune for their decisions to be compared
        prune=PruneConfig(enabled=True, max_output_change=0.3, min_keep=1))


def main(argv=None) -> int:
    args = parse(argv)
    if args.instrument:
        commlog.install()  # before DeepSpeed keeps references to the torch collectives
    from mora_dist.distributed.env import discover, finish, init_distributed, shutdown

    launcher = discover().launcher
    rank, world, local_rank = init_distributed()
    try:
        result = run(args, rank, world, launcher)
        if rank == 0:
            print("SELFTEST_RESULT " + json.dumps(result), flush=True)
    finally:
        shutdown()
    return finish(0)


def run(args, rank: int, world: int, launcher: str) -> dict:
    from transformers import LlamaForCausalLM

    from mora_dist.distributed import bank as B
    from mora_dist.distributed import stats as S
    from mora_dist.device import compute_device, model_device, to_device
    from mora_dist.distributed.collectives import all_gather_objects
    from mora_dist.mora.pruning import decide_pruning
    from mora_dist.mora import inject_mora, is_adapter_parameter, trainable_parameters

    cfg = run_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = commlog.LOG
    ds = args.engine == "deepspeed"
    if ds:
        from mora_dist.distributed import engine as E
        from mora_dist.distributed.trainer import train_task

        model = E.build_model(lambda: LlamaForCausalLM.from_pretrained(args.model), cfg, persistence_threshold=0)
    else:
        if world != 1:
            raise SystemExit("--engine torch is the one-process reference")
        model = LlamaForCausalLM.from_pretrained(args.model)
    if not (ds and cfg.distributed.zero_stage == 3):  # ZeRO-3's partitions are placed by zero.Init
        model.to(compute_device())
    inject_mora(model, cfg.mora)
    if args.resume:
        B.load_adapter(model, args.resume)
    label = {"now": "setup"}
    model.register_forward_pre_hook(lambda m, a: setattr(log, "current", label["now"] + "_forward"), prepend=True)
    model.register_forward_hook(lambda m, a, o: setattr(log, "current", label["now"]), always_call=True)

    tasks = []
    G = args.global_batch
    for t in range(args.first_task, args.tasks):
        name = f"task{t}"
        examples = task_examples(t, args.steps * G, args.seed)
        mine = micro_batches(examples, args.micro, rank, world)
        info: dict = {"name": name}
        B.grow(model, name, seed=args.seed + t)
        trainable = {n for n, _ in trainable_parameters(model)}
        snap = lambda pred: B.gathered_state(model, pred)  # noqa: E731
        frozen_pred = lambda n: n not in trainable  # noqa: E731
        before = snap(frozen_pred) if args.check_frozen else None
        before_active = snap(lambda n: n in trainable) if args.check_frozen else None
        label["now"] = "train"
        if ds:
            engine = E.build_engine(model, cfg, total_steps=args.steps, persistence_threshold=0)
            with log.phase("train"):
                info["losses"] = train_task(engine, mine)
            forward = engine
        else:
            info["losses"] = reference_train(model, mine, cfg, args.steps)
            forward = model
        if args.check_frozen:
            after = snap(frozen_pred)
            after_active = snap(lambda n: n in trainable)
            info["frozen_compared"] = sum(1 for n in before if ".mora_" in n)
            info["base_compared"] = sum(1 for n in before if not is_adapter_parameter(n))
            info["frozen_and_base_identical"] = all(torch.equal(before[n], after[n]) for n in before)
            info["active_changed"] = all(not torch.equal(before_active[n], after_active[n]) for n in before_active)
        label["now"] = "stats"
        stat_batches = micro_batches(examples[:args.stat_examples], args.micro, rank, world)
        with log.phase("stats"):
            stats = S.collect_statistics(forward, stat_batches, min_keep=cfg.prune.min_keep)
        decision = decide_pruning(stats, model, cfg.prune)
        info["decision_hashes"] = S.check_decision_agrees(decision)
        info["decision_hash"] = decision["hash"]
        _write_stats(out, name, S.statistics_record(stats, decision, name), rank)
        label["now"] = "other"
        if ds:
            E.destroy_engine(engine)
        B.prune(model, decision)
        B.freeze(model)
        B.save_adapter(model, out / f"adapter-{name}")
        info["removed"] = sum(len(v["remove"]) for v in decision["layers"].values())
        tasks.append(info)

    # final pass on the saved bank: statistics over a probe set, probe logits (every worker the same input)
    label["now"] = "final"
    probe = task_examples(99, 2 * world * args.micro, args.seed)
    final_batches = micro_batches(probe, args.micro, rank, world)
    forward = E.build_inference_engine(model, cfg, persistence_threshold=0) if ds else model
    final_stats = S.collect_statistics(forward, final_batches, min_keep=cfg.prune.min_keep)
    final_decision = decide_pruning(final_stats, model, cfg.prune)
    _write_stats(out, "final", S.statistics_record(final_stats, final_decision, "final"), rank)
    with torch.no_grad():
        batch = to_device(collate(probe[:4]), getattr(forward, "device", None) or model_device(model))
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().cpu()
    state = {k: v.cpu() for k, v in B.gathered_adapter_state(model).items()}
    if ds:
        E.destroy_engine(forward)
    ranks = [None] * world
    if world > 1:
        ranks = all_gather_objects({"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                                    "master_addr": os.environ.get("MASTER_ADDR")})
    if rank == 0:
        torch.save({"logits": logits, "state": state, "probe": [p.tolist() for p in probe]}, out / "final.pt")
    result = {"world_size": world, "stage": args.stage, "engine": args.engine, "launcher": launcher,
              "ranks": ranks, "tasks": tasks, "final_decision_hash": final_decision["hash"],
              "comm": log.summary() if args.instrument else None,
              "adapter": str(out / f"adapter-task{args.tasks - 1}")}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _write_stats(out: Path, name: str, record: dict, rank: int) -> None:
    """``OUT/stats-NAME.json``: the all-reduced statistics and the decision (rank 0 writes, atomically)."""
    if rank == 0:
        atomic_write_json(out / f"stats-{name}.json", record)


def reference_train(model, batches: list[dict], cfg, steps: int) -> list[float]:
    """The one-process loop a distributed run must reproduce: ``train_step`` over plain PyTorch AdamW, with the
    same clipping and schedule, ``len(batches) // steps`` micro-batches per step."""
    from mora_dist.mora import trainable_parameters
    from mora_dist.training import TorchStep, train_step

    t = cfg.train
    backend = TorchStep(model, [p for _, p in trainable_parameters(model)], lr=t.lr, steps=steps,
                        weight_decay=t.weight_decay, schedule=t.schedule, warmup=t.warmup_steps, grad_clip=t.grad_clip)
    gas = len(batches) // steps
    return [train_step(backend, s, batches[s * gas:(s + 1) * gas])[0] for s in range(steps)]


if __name__ == "__main__":
    sys.exit(main())
