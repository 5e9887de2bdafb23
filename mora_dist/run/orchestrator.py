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
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mora_dist import __version__, methods
from mora_dist.config import ConfigError, RunConfig, dump_config, load_config
from mora_dist.data import encode_examples, load_task_examples
from mora_dist.data.grouping import task_batch_order
from mora_dist.data.tokenize import collate
from mora_dist.faults import fault_point
from mora_dist.io import atomic_write_json, atomic_write_text, read_json
from mora_dist.run.curves import TrainingCurves
from mora_dist.run.state import BASE_STAGE, RunDir, RunLock, RunState, RunStateError, task_key
from mora_dist.training import lr_factor, steps_for

EXIT_INTERRUPTED = 75


class StopRun(Exception):
    """Raised to end this invocation early (limits or a signal); the run is resumable."""

    def __init__(self, reason: str, code: int = 0):
        super().__init__(reason)
        self.code = code


@dataclass
class Limits:
    """Bounds on the work of one invocation.

    Attributes:
        max_stages: run at most this many stages, then exit 0.
        until_task: stop once this task's last stage is done.
        time_budget: seconds; no stage starts, and training checkpoints and stops, when the budget is near.
    """

    max_stages: int | None = None
    until_task: str | None = None
    time_budget: float | None = None


class Orchestrator:
    """One invocation of a run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, limits: Limits | None = None, world: tuple[int, int] = (0, 1)):
        self.cfg = cfg
        self.limits = limits or Limits()
        self.rank, self.world = world
        self.dir = RunDir(Path(cfg.run_dir))
        self.tasks = [t.name for t in cfg.tasks]
        self.t0 = time.monotonic()
        self.stages_run = 0
        self.stop_signal: int | None = None
        self.model = self.tok = self.trainer = None
        self._step_seconds = 0.0
        self._encoded: dict[int, tuple] = {}

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.main:
            print(f"[mora-dist] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _check_limits_before_stage(self, stage: str) -> None:
        lim = self.limits
        if self.stop_signal is not None:
            raise StopRun(f"stopped by signal {self.stop_signal} before {stage}", EXIT_INTERRUPTED)
        if lim.max_stages is not None and self.stages_run >= lim.max_stages:
            raise StopRun(f"did {self.stages_run} stage(s) (max_stages); next: {stage}")
        if lim.time_budget is not None and self.elapsed() > lim.time_budget * 0.9:
            raise StopRun(f"time budget nearly spent ({self.elapsed():.0f}s of {lim.time_budget:.0f}s); next: {stage}")

    def _install_signals(self) -> dict:
        def handler(signum, frame):
            self.stop_signal = signum
            self.log(f"received signal {signum}: will checkpoint and exit")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    # ------------------------------------------------------------------------------------------- run dir
    def _prepare_dir(self) -> None:
        root = self.dir.root
        root.mkdir(parents=True, exist_ok=True)
        resolved = dump_config(self.cfg)
        cfg_file = root / "config.yaml"
        if cfg_file.is_file():
            stored = load_config(cfg_file).to_dict()
            current = self.cfg.to_dict()
            differ = _differences(stored, current)
            if differ:
                raise ConfigError(
                    f"{cfg_file}: this run directory was started with another config ({', '.join(differ[:6])}"
                    f"{' ...' if len(differ) > 6 else ''} differ); rerun with the same config and overrides, "
                    "or use another run_dir")
        else:
            atomic_write_text(cfg_file, resolved)
        import transformers

        atomic_write_json(root / "version.json", {"mora_dist": __version__, "torch": torch.__version__,
                                                  "transformers": transformers.__version__,
                                                  "world_size": self.world})

    # --------------------------------------------------------------------------------------------- model
    def _load(self) -> None:
        if self.model is not None:
            return
        from mora_dist.base_model import load_model, load_tokenizer
        from mora_dist.mora import inject_mora

        m = self.cfg.model
        if self.tok is None:
            self.tok = load_tokenizer(m.name, trust_remote_code=m.trust_remote_code)
        if self.world > 1:
            from mora_dist.distributed import engine as eng
            from mora_dist.run.trainer import DeepSpeedTrainer

            # under ZeRO-3 the base is built inside zero.Init: no worker ever holds it whole
            self.model = eng.build_model(
                lambda: load_model(m.name, dtype=m.dtype, trust_remote_code=m.trust_remote_code), self.cfg)
            inject_mora(self.model, self.cfg.mora)
            self.trainer = DeepSpeedTrainer(self.model, self.cfg, self.dir.root / "ds_config.json")
        else:
            from mora_dist.run.trainer import LocalTrainer

            self.model = load_model(m.name, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
            inject_mora(self.model, self.cfg.mora)
            self.trainer = LocalTrainer(self.model, self.cfg)
        if self.cfg.train.gradient_checkpointing:
            from mora_dist.activation_checkpointing import enable_activation_checkpointing

            enable_activation_checkpointing(self.model)

    def _restore(self, state: RunState, stage: str) -> None:
        """Rebuild the model state that ``stage`` starts from, from the run directory."""
        self._load()
        if stage == BASE_STAGE:
            return
        key, step = stage.split("/")
        index = int(key.split("-", 1)[0])
        name = self.tasks[index]
        if step == "grow":
            if index > 0:
                self.trainer.load_adapter(self.dir.adapter(index - 1, self.tasks[index - 1]))
        elif step == "train":
            pass  # stage_train starts from the newest checkpoint itself
        elif step in ("stats", "prune", "save"):
            self.trainer.load_checkpoint(self.dir.ckpt(index, name))
            if step == "save":  # the recorded decision was applied by the (completed) prune stage
                self.trainer.prune(read_json(self.dir.stats(index, name))["decision"])
        else:  # evaluate, report
            self.trainer.load_adapter(self.dir.adapter(index, name))

    # --------------------------------------------------------------------------------------------- data
    def _task(self, index: int):
        return self.cfg.tasks[index]

    def _train_examples(self, index: int):
        """The task's encoded training examples (tokenised once per invocation: train and stats share them)."""
        if index in self._encoded:
            return self._encoded[index]
        task = self._task(index)
        examples = load_task_examples(task, self.cfg.data.root, "train", limit=self.cfg.train.max_examples,
                                      seed=self.cfg.train.seed)
        encoded, report = encode_examples(self.tok, examples, self.cfg.model.max_length,
                                          self.cfg.model.chat_template)
        if not encoded:
            raise ConfigError(f"task {task.name!r}: every training example is longer than model.max_length="
                              f"{self.cfg.model.max_length}; raise it")
        self._encoded = {index: (encoded, report)}  # keep only the current task's
        return encoded, report

    def _task_plan(self, index: int, n_examples: int) -> tuple[int, float, int]:
        """(optimizer steps, lr, gradient accumulation) of a task."""
        task, t = self._task(index), self.cfg.train
        gas = t.gradient_accumulation(self.world)
        global_batch = t.micro_batch_size * self.world * gas
        steps = steps_for(n_examples, global_batch, task.epochs if task.epochs is not None else t.epochs,
                          task.max_steps if task.max_steps is not None else t.max_steps)
        return steps, (task.lr if task.lr is not None else t.lr), gas

    def _micro_batches(self, encoded, idx: list[int], gas: int) -> list[dict]:
        """This worker's micro-batches of one optimizer step (global indices ``idx``)."""
        mb = self.cfg.train.micro_batch_size
        mine = idx[self.rank * mb * gas:(self.rank + 1) * mb * gas]
        pad = self.tok.pad_token_id
        return [collate([encoded[i] for i in mine[j:j + mb]], pad) for j in range(0, len(mine), mb)]

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
        name = self.tasks[index]
        encoded, report = self._train_examples(index)
        steps, lr, gas = self._task_plan(index, len(encoded))
        ckpt = self.dir.ckpt(index, name)
        start = self.trainer.load_checkpoint(ckpt)
        self.trainer.begin(steps, lr)
        if start > 0:
            self.trainer.restore_optimizer(ckpt)  # optimizer and RNG exactly as at the checkpoint
            self.log(f"{name}: resumed at step {start} of {steps} on {self.world} worker(s)")
        else:
            torch.manual_seed(self.cfg.train.seed + index)  # dropout masks independent of earlier stages
        global_batch = self.cfg.train.micro_batch_size * self.world * gas
        order = task_batch_order(encoded, global_batch, steps, self.cfg.train.seed + index,
                                 self.cfg.train.group_by_length)
        every = self.cfg.train.checkpoint_every
        bar = _progress(self.main, steps, start, f"train {name}")
        curves = TrainingCurves(self.dir.root) if self.main else None
        if curves is not None:  # drop the lines of steps the resumed run trains again (see run/curves.py)
            curves.begin_task(index, name, start)
        t = self.cfg.train
        loss = float("nan")
        tokens_seen, t_start = 0, time.monotonic()
        try:
            for step in range(start, steps):
                t_step = time.monotonic()
                batches = self._micro_batches(encoded, order[step], gas)
                loss = self.trainer.step(step, batches)
                if curves is not None:
                    curves.log_step(step + 1, steps, loss, lr * lr_factor(step, steps, t.schedule, t.warmup_steps),
                                    getattr(self.trainer, "last_grad_norm", None),
                                    sum(len(encoded[i]["input_ids"]) for i in order[step]), time.monotonic() - t_step)
                fault_point(f"train_step:{name}")
                self._step_seconds = max(self._step_seconds, time.monotonic() - t_step)
                tokens_seen += sum(int(b["attention_mask"].sum()) for b in batches) * self.world
                done = step + 1
                if bar is not None:
                    rate = tokens_seen / max(time.monotonic() - t_start, 1e-9)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
                    bar.update(1)
                stop = self._should_stop_training()
                if done == steps:
                    break
                if stop or (every and done % every == 0):
                    self.trainer.save_checkpoint(ckpt, done)
                    self._progress_file(name, done, steps, loss)
                if stop:
                    raise StopRun(stop, EXIT_INTERRUPTED if self.stop_signal is not None else 0)
            self.trainer.save_checkpoint(ckpt, steps)
        finally:
            if bar is not None:
                bar.close()
            if curves is not None:
                curves.close()
            self.trainer.end()
        self._progress_file(name, steps, steps, loss)
        return {"steps": steps, "final_loss": loss, "lr": lr, "data": report.as_dict()}

    def _should_stop_training(self) -> str | None:
        reason = None
        if self.stop_signal is not None:
            reason = f"stopped by signal {self.stop_signal}"
        budget = self.limits.time_budget
        if budget is not None and self.elapsed() + 3 * self._step_seconds + 30 > budget:
            reason = f"time budget nearly spent ({self.elapsed():.0f}s of {budget:.0f}s)"
        if self.world > 1:  # every worker must take the same decision
            flag = torch.tensor([1.0 if reason else 0.0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and reason is None:
                reason = "another worker is stopping"
        return reason

    def stage_stats(self, index: int) -> dict:
        from mora_dist.distributed.stats import check_decision_agrees, collect_statistics, statistics_record
        from mora_dist.mora.pruning import decide_pruning

        name = self.tasks[index]
        encoded, _ = self._train_examples(index)
        limit = self.cfg.prune.max_examples
        encoded = encoded[:limit] if limit else encoded
        mb = self.cfg.train.micro_batch_size
        per_worker = max(1, len(encoded) // (self.world * mb)) * mb  # same batch count on every worker
        mine = encoded[self.rank * per_worker:(self.rank + 1) * per_worker]
        batches = [collate(mine[j:j + mb], self.tok.pad_token_id) for j in range(0, len(mine), mb)]
        for b in batches:
            b.pop("labels")
        t = time.monotonic()
        stats = collect_statistics(self.trainer.forward_model, batches, min_keep=self.cfg.prune.min_keep)
        seconds = time.monotonic() - t
        decision = decide_pruning(stats, self.model, self.cfg.prune)
        check_decision_agrees(decision)
        if self.main:
            record = statistics_record(stats, decision, name)
            record["seconds"] = seconds
            atomic_write_json(self.dir.stats(index, name), record)
        self.trainer.barrier()
        removed = sum(len(v["remove"]) for v in decision["layers"].values())
        return {"pruned": removed, "decision_hash": decision["hash"]}

    def stage_prune(self, index: int) -> dict:
        decision = read_json(self.dir.stats(index, self.tasks[index]))["decision"]
        self.trainer.prune(decision)
        return {"removed": sum(len(v["remove"]) for v in decision["layers"].values())}

    def stage_save(self, index: int) -> dict:
        name = self.tasks[index]
        self.trainer.freeze()
        self.trainer.save_adapter(self.dir.adapter(index, name))
        return {}

    def stage_evaluate(self, index: int | None) -> dict:
        from mora_dist.evaluation.generation import evaluate_task
        from mora_dist.evaluation.results import write_stage_results

        e = self.cfg.eval
        # every seen task, plus the next one (its score before training it is what FWT needs)
        seen = range(len(self.tasks)) if index is None else range(min(index + 2, len(self.tasks)))
        model = self.trainer.forward_model  # under ZeRO-3 an engine whose hooks gather parameters
        model = getattr(model, "module", model)
        model.eval()
        in_domain = {}
        for j in seen:
            task = self._task(j)
            examples = load_task_examples(task, self.cfg.data.root, e.split)
            in_domain[task.name] = evaluate_task(
                model, self.tok, examples, task.metric, task=task.name, max_new_tokens=task.max_new_tokens,
                batch_size=e.batch_size, limit=e.max_examples, seed=e.seed, chat_template=e.chat_template,
                max_prompt_tokens=self.cfg.model.max_length, synced_gpus=self.world > 1)
        general = None
        if e.general:
            from mora_dist.evaluation.suite import run_general_suite

            general = run_general_suite(model, self.tok, e.general, limit=e.general_limit,
                                        batch_size=e.batch_size, synced_gpus=self.world > 1)
        experts = self._expert_summary(index) if index is not None else None
        stage = 0 if index is None else index + 1
        if self.main:
            write_stage_results(self.dir.root, stage, None if index is None else self.tasks[index], in_domain,
                                general, experts, config={"model": self.cfg.model.name, "run_dir": str(self.dir.root)})
        self.trainer.barrier()
        return {name: round(v.score, 4) for name, v in in_domain.items()}

    def _expert_summary(self, index: int) -> dict | None:
        from mora_dist.distributed.stats import expert_summary

        path = self.dir.stats(index, self.tasks[index])
        return expert_summary(read_json(path)) if path.is_file() else None

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
                                                       "elapsed_s": round(self.elapsed(), 1)})

    def run(self) -> int:
        """Do the pending stages within the limits; returns the process exit code."""
        previous_handlers = self._install_signals()
        lock = RunLock(self.dir.root) if self.main else None
        try:
            error = None
            if self.main:  # rank 0 takes the lock and checks the directory; every rank learns the outcome
                try:
                    self.dir.root.mkdir(parents=True, exist_ok=True)
                    lock.acquire()
                    if lock.previous and lock.previous.get("pid"):
                        self.log(f"taking over a stale lock left by pid {lock.previous.get('pid')} on "
                                 f"{lock.previous.get('host')}")
                    self._prepare_dir()
                except (RunStateError, ConfigError) as err:
                    error = err
            self._agree(error)
            state = RunState(self.dir, self.tasks, persist=self.main)
            pending = state.pending()
            if not pending:
                self.log(f"run {self.dir.root} is complete: nothing to do")
                return 0
            self._agree(self._check_data() if self.main else None)
            self.log(f"{len(state.done)} stage(s) done, {len(pending)} to go; next: {pending[0]}")
            restored = False
            for stage in pending:
                self._check_limits_before_stage(stage)
                if not restored:
                    self._restore(state, stage)
                    restored = True
                t = time.monotonic()
                info = self._run_stage(stage)
                fault_point(f"before_mark:{stage}")
                state.mark(stage, time.monotonic() - t, **({"info": info} if info else {}))
                self.stages_run += 1
                self.log(f"done {stage} in {time.monotonic() - t:.1f}s" + (f" {info}" if info else ""))
                if self.limits.until_task and stage == f"{_key_of(self.tasks, self.limits.until_task)}/report":
                    raise StopRun(f"task {self.limits.until_task} is done (until_task)")
            self.log(f"run complete: report in {self.dir.report_dir}")
            return 0
        except StopRun as stop:
            self.log(f"{stop}; rerun the same command to resume")
            return stop.code
        finally:
            if lock is not None:
                lock.release()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

    def _check_data(self) -> Exception | None:
        """Rank 0 reads and checks every split the stream will use before any stage runs (fail fast)."""
        from mora_dist.data import DataError
        from mora_dist.data.check import check_stream_data
        from mora_dist.base_model import ModelSourceError, load_tokenizer

        def loader():
            m = self.cfg.model
            self.tok = load_tokenizer(m.name, trust_remote_code=m.trust_remote_code)
            return self.tok

        try:
            check_stream_data(self.cfg, loader)
        except (DataError, ModelSourceError) as err:
            return err
        return None

    def _agree(self, error: Exception | None) -> None:
        """Raise on every rank if rank 0 failed (so that no rank waits for the others forever)."""
        if self.world > 1:
            flag = torch.tensor([1.0 if error is not None else 0.0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and error is None:
                raise RunStateError("rank 0 could not start the run (see its error); stopping")
        if error is not None:
            raise error

    def _run_stage(self, stage: str) -> dict:
        if stage == BASE_STAGE:
            return self.stage_evaluate(None)
        key, step = stage.split("/")
        index = int(key.split("-", 1)[0])
        return getattr(self, f"stage_{step}")(index)


def _key_of(tasks: list[str], name: str) -> str:
    if name not in tasks:
        raise ConfigError(f"--until-task {name!r} is not a task of this stream ({', '.join(tasks)})")
    return task_key(tasks.index(name), name)


def _differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts/lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _differences(x, y, f"{prefix}.{i}")
        return out
    return [] if a == b else [prefix or "<root>"]


def _progress(enabled: bool, total: int, start: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)


def run(cfg: RunConfig, limits: Limits | None = None) -> int:
    """Run (or resume) ``cfg``'s stream in this process, which may be one worker of a distributed launch."""
    from mora_dist.distributed.env import init_distributed

    rank, size, _ = init_distributed(cfg.distributed.backend)  # checks the launcher's variables first
    world = (rank, size)
    try:
        methods.check_world(cfg, size)
        return Orchestrator(cfg, limits, world).run()
    finally:
        if world[1] > 1:
            from mora_dist.distributed.env import shutdown

            shutdown()
