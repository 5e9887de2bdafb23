"""Walk a task stream: the recipe behind ``mora-dist run``.

Reads top to bottom: set up the run directory (lock, config, versions) → evaluate the base model → for each task
grow → train (mid-task checkpoints) → statistics (one all-reduce) → prune → freeze and save → evaluate → report.

* Every completed stage is recorded atomically in ``state.json``; a rerun resumes at the first incomplete
  stage and never redoes a completed one; on a finished run it does nothing and says so.
* Model state between stages is rebuilt from the run directory (the last saved adapter, the newest mid-task
  checkpoint, the recorded pruning decision), so a crash at any moment loses at most the steps since the last
  checkpoint, and a resumed run ends with the same adapter and scores as an uninterrupted one.
* ``Limits`` bound the work of one invocation (stages, a task, a wall-clock budget) for cron or Slurm chains.
* SIGTERM/SIGINT: checkpoint at the next step, exit with code 75 (resumable).
* One process uses plain PyTorch; under a distributed launcher the DeepSpeed engine trains (any ZeRO stage).

The orchestrator only sequences: the trainer is built by ``run/build.py`` (``training.Trainer``), the steps and
each worker's batches come from ``mora_dist.schedule``, the limits from ``run/limits.py``, the run directory
from ``run/state.py``, evaluation from ``evaluation/tasks.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from mora_dist import methods
from mora_dist.config import ConfigError, RunConfig
from mora_dist.data.grouping import task_batch_order
from mora_dist.distributed.collectives import any_rank
from mora_dist.faults import fault_point
from mora_dist.io import atomic_write_json, read_json
from mora_dist.run.build import build_trainer, check_data, encode_train_examples, load_run_tokenizer
from mora_dist.run.curves import TrainProgress
from mora_dist.run.limits import EXIT_INTERRUPTED, Guard, Limits, StopRun
from mora_dist.run.state import (
    RunDir, RunLock, RunState, RunStateError, last_stage_of, parse_stage, prepare_run_dir,
)
from mora_dist.schedule import lr_factor, plan_task, rank_micro_batches, rank_stats_batches

__all__ = ["EXIT_INTERRUPTED", "Limits", "Orchestrator", "StopRun", "run"]


class Orchestrator:
    """One invocation of a run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, limits: Limits | None = None, world: tuple[int, int] = (0, 1),
                 base_from: Path | None = None):
        self.cfg = cfg
        self.base_from = base_from  # a run whose base evaluation this one may copy (run/shared_base.py)
        self.limits = limits or Limits()
        self.rank, self.world = world
        self.dir = RunDir(Path(cfg.run_dir))
        self.tasks = [t.name for t in cfg.tasks]
        self.guard = Guard(self.limits, self.log)
        self.tok = self.trainer = None
        self._encoded: dict[int, tuple] = {}

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.main:
            print(f"[mora-dist] {msg}", flush=True)

    def _restore(self, stage: str) -> None:
        """Build the trainer and rebuild the model state that ``stage`` starts from, from the run directory."""
        if self.tok is None:
            self.tok = load_run_tokenizer(self.cfg)
        if self.trainer is None:
            from mora_dist.device import model_device

            self.trainer = build_trainer(self.cfg, self.world, self.dir.root)
            self.log(f"model on {model_device(self.trainer.model)} ({self.cfg.model.dtype}, {self.world} worker(s))")
        key = parse_stage(stage)
        index, step = key.index, key.step
        if index is None:
            return
        name = self.tasks[index]
        if step == "grow":
            if index > 0:
                self.trainer.load_adapter(self.dir.adapter(index - 1, self.tasks[index - 1]))
        elif step in ("stats", "prune", "save"):  # stage_train starts from the newest checkpoint itself
            self.trainer.load_checkpoint(self.dir.ckpt(index, name))
            if step == "save" and methods.collects_statistics(self.cfg):  # the prune stage applied the decision
                self.trainer.prune(read_json(self.dir.stats(index, name))["decision"])
        elif step in ("evaluate", "report"):
            self.trainer.load_adapter(self.dir.adapter(index, name))

    def _train_examples(self, index: int):
        """The task's encoded training examples (tokenised once per invocation: train and stats share them)."""
        if index not in self._encoded:
            self._encoded = {index: encode_train_examples(self.cfg, index, self.tok)}  # only the current task's
        return self._encoded[index]

    # ---------------------------------------------------------------------------------------------- stages
    def stage_grow(self, index: int) -> dict:
        name = self.tasks[index]
        if methods.grows_block(self.cfg, index):
            self.trainer.grow(name, seed=self.cfg.train.seed * 1000 + index)
        else:  # seq_lora: the one block is trained again
            self.trainer.unfreeze_last()
        self.trainer.save_checkpoint(self.dir.ckpt(index, name), 0)
        return {}

    def stage_train(self, index: int) -> dict:
        name, t = self.tasks[index], self.cfg.train
        encoded, report = self._train_examples(index)
        plan = plan_task(self.cfg, index, len(encoded), self.world)
        steps, lr = plan.steps, plan.lr
        ckpt = self.dir.ckpt(index, name)
        start = self.trainer.load_checkpoint(ckpt)
        self.trainer.begin(steps, lr)
        if start > 0:
            self.trainer.restore_optimizer(ckpt)  # optimizer and RNG exactly as at the checkpoint
            self.log(f"{name}: resumed at step {start} of {steps} on {self.world} worker(s)")
        else:
            torch.manual_seed(t.seed + index)  # dropout masks independent of earlier stages
        order = task_batch_order(encoded, plan.global_batch, steps, t.seed + index, t.group_by_length)
        progress = TrainProgress(self.dir.root, self.main, index, name, steps, start)
        loss = float("nan")
        try:
            for step in range(start, steps):
                t_step = time.monotonic()
                batches = rank_micro_batches(encoded, order[step], self.rank, t.micro_batch_size, plan.gas,
                                             self.tok.pad_token_id)
                loss = self.trainer.step(step, batches)
                progress.step(step, loss, lr * lr_factor(step, steps, t.schedule, t.warmup_steps),
                              self.trainer.last_grad_norm, sum(len(encoded[i]["input_ids"]) for i in order[step]),
                              sum(int(b["attention_mask"].sum()) for b in batches) * self.world,
                              time.monotonic() - t_step)
                fault_point(f"train_step:{name}")
                self.guard.step_seconds = max(self.guard.step_seconds, time.monotonic() - t_step)
                stop = self.guard.training_stop()
                if step + 1 == steps:
                    break
                if stop or (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0):
                    self.trainer.save_checkpoint(ckpt, step + 1)
                    self._progress_file(name, step + 1, steps, loss)
                if stop:
                    raise self.guard.stop_training(stop)
            self.trainer.save_checkpoint(ckpt, steps)
        finally:
            progress.close()
            self.trainer.end()
        self._progress_file(name, steps, steps, loss)
        return {"steps": steps, "final_loss": loss, "lr": lr, "data": report.as_dict()}

    def stage_stats(self, index: int) -> dict:
        from mora_dist.distributed.stats import check_decision_agrees, collect_statistics, statistics_record
        from mora_dist.mora.pruning import decide_pruning

        name = self.tasks[index]
        if not methods.collects_statistics(self.cfg):
            return {"skipped": "ungated bank with pruning off: nothing to measure"}
        encoded, _ = self._train_examples(index)
        batches = rank_stats_batches(encoded, self.rank, self.world, self.cfg.train.micro_batch_size,
                                     self.tok.pad_token_id, self.cfg.prune.max_examples)
        t = time.monotonic()
        stats = collect_statistics(self.trainer.forward_model, batches, min_keep=self.cfg.prune.min_keep)
        seconds = time.monotonic() - t
        decision = decide_pruning(stats, self.trainer.model, self.cfg.prune)
        check_decision_agrees(decision)
        if self.main:
            record = statistics_record(stats, decision, name)
            record["seconds"] = seconds
            atomic_write_json(self.dir.stats(index, name), record)
        self.trainer.barrier()
        removed = sum(len(v["remove"]) for v in decision["layers"].values())
        return {"pruned": removed, "decision_hash": decision["hash"]}

    def stage_prune(self, index: int) -> dict:
        if not methods.collects_statistics(self.cfg):
            return {"removed": 0}
        decision = read_json(self.dir.stats(index, self.tasks[index]))["decision"]
        self.trainer.prune(decision)
        return {"removed": sum(len(v["remove"]) for v in decision["layers"].values())}

    def stage_save(self, index: int) -> dict:
        self.trainer.freeze()
        self.trainer.save_adapter(self.dir.adapter(index, self.tasks[index]))
        return {}

    def stage_evaluate(self, index: int | None) -> dict:
        from mora_dist.evaluation.results import experts_from_stats, write_stage_results
        from mora_dist.evaluation.tasks import evaluate_tasks

        if index is None:  # rank 0 alone decides whether to copy another run's base results (the source
            # another rank found may differ), and every rank takes part in the decision
            from mora_dist.run.shared_base import copy_base, reusable_base

            info = reusable_base(self.base_from, self.cfg) if self.main and self.base_from is not None else None
            if any_rank(info is not None):
                if self.main:
                    copy_base(self.base_from, self.dir.root)
                    self.log(f"base evaluation copied from {self.base_from} (same model, data and settings)")
                self.trainer.barrier()
                return info or {}
        e = self.cfg.eval
        # every seen task, plus the next one (its score before training it is what FWT needs) unless turned off
        seen = self.cfg.tasks if index is None else self.cfg.tasks[:index + (2 if e.next_task else 1)]
        model = self.trainer.forward_model  # under ZeRO-3 an engine whose hooks gather parameters
        model = getattr(model, "module", model)
        model.eval()
        in_domain = evaluate_tasks(model, self.tok, self.cfg, seen, synced_gpus=self.world > 1)
        general = None
        if e.general:
            from mora_dist.evaluation.suite import run_general_suite

            general = run_general_suite(model, self.tok, e.general, limit=e.general_limit,
                                        batch_size=e.batch_size, synced_gpus=self.world > 1, log_samples=True)
        experts = experts_from_stats(self.dir.stats(index, self.tasks[index])) if index is not None else None
        if self.main:
            write_stage_results(self.dir.root, 0 if index is None else index + 1,
                                None if index is None else self.tasks[index], in_domain, general, experts,
                                config={"model": self.cfg.model.name, "run_dir": str(self.dir.root)})
        self.trainer.barrier()
        return {name: round(v.score, 4) for name, v in in_domain.items()}

    def stage_report(self, index: int) -> dict:
        from mora_dist.evaluation.report import rebuild_report

        if self.main:
            rep = rebuild_report(self.dir.root)
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rep["metrics"].items()
                    if k != "conventions"}
        return {}

    # ------------------------------------------------------------------------------------------------ run
    def _progress_file(self, task: str, step: int, steps: int, loss: float) -> None:
        if self.main:
            atomic_write_json(self.dir.progress_file, {"task": task, "step": step, "steps": steps,
                                                       "loss": None if math.isnan(loss) else loss,
                                                       "elapsed_s": round(self.guard.elapsed(), 1)})

    def run(self) -> int:
        """Do the pending stages within the limits; returns the process exit code."""
        previous_handlers = self.guard.install_signals()
        lock = RunLock(self.dir.root) if self.main else None
        try:
            error = None
            if self.main:  # rank 0 takes the lock and checks the directory; every rank learns the outcome
                try:
                    if self.world > 1:  # the DeepSpeed settings for this many workers, before the directory
                        from mora_dist.distributed.ds_config import ds_config

                        ds_config(self.cfg.train, self.cfg.distributed, self.cfg.model.dtype, self.world)
                    self.dir.root.mkdir(parents=True, exist_ok=True)
                    lock.acquire()
                    if lock.previous and lock.previous.get("pid"):
                        self.log(f"taking over a stale lock left by pid {lock.previous.get('pid')} on "
                                 f"{lock.previous.get('host')}")
                    prepare_run_dir(self.dir, self.cfg, self.world)
                except (RunStateError, ConfigError) as err:
                    error = err
            self._agree(error)
            state = RunState(self.dir, self.tasks, persist=self.main)
            pending = state.pending()
            if not pending:
                self.log(f"run {self.dir.root} is complete: nothing to do")
                return 0
            if self.main:  # every split the stream uses is read and checked before any stage runs
                self.tok, error = check_data(self.cfg)
            self._agree(error)
            self.log(f"{len(state.done)} stage(s) done, {len(pending)} to go; next: {pending[0]}")
            for i, stage in enumerate(pending):
                self.guard.before_stage(stage)
                if i == 0:
                    self._restore(stage)
                t = time.monotonic()
                info = self._run_stage(stage)
                fault_point(f"before_mark:{stage}")
                state.mark(stage, time.monotonic() - t, **({"info": info} if info else {}))
                self.guard.stages_run += 1
                self.log(f"done {stage} in {time.monotonic() - t:.1f}s" + (f" {info}" if info else ""))
                if self.limits.until_task and stage == last_stage_of(self.tasks, self.limits.until_task):
                    raise StopRun(f"task {self.limits.until_task} is done (until_task)")
            self.log(f"run complete: report in {self.dir.report_dir}")
            return 0
        except StopRun as stop:
            self.log(f"{stop}; rerun the same command to resume")
            return stop.code
        finally:
            if lock is not None:
                lock.release()
            self.guard.restore_signals(previous_handlers)

    def _agree(self, error: Exception | None) -> None:
        """Raise on every rank if rank 0 failed (so that no rank waits for the others forever)."""
        if any_rank(error is not None) and error is None:
            raise RunStateError("rank 0 could not start the run (see its error); stopping")
        if error is not None:
            raise error

    def _run_stage(self, stage: str) -> dict:
        key = parse_stage(stage)
        if key.index is None:
            return self.stage_evaluate(None)
        return getattr(self, f"stage_{key.step}")(key.index)


def run(cfg: RunConfig, limits: Limits | None = None, base_from: Path | None = None) -> int:
    """Run (or resume) ``cfg``'s stream in this process, which may be one worker of a distributed launch.

    ``base_from``: another run directory whose base evaluation to copy when it would be the same (``compare``).
    """
    from mora_dist.distributed.env import init_distributed, shutdown

    rank, size, _ = init_distributed(cfg.distributed.backend)  # checks the launcher's variables first
    try:
        methods.check_world(cfg, size)
        return Orchestrator(cfg, limits, (rank, size), base_from).run()
    finally:
        if size > 1:
            shutdown()
