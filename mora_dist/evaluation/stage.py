"""One call per checkpoint for the orchestrator: in-domain tasks + general suite -> stage results file.

``evaluate_stage`` runs ``evaluate_task`` on every in-domain task, ``run_general_suite`` on the general tasks,
writes ``<run_dir>/eval/stage_XX_<name>.json`` (rank 0 only; see ``results``) and returns the path. Call it on
every rank under torch.distributed: the work is split across ranks and all ranks get the same scores.
``load_task_examples`` reads a task split of ``shared/data/llm-cl-benchmark-500``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mora_dist.evaluation.distributed import rank_and_world
from mora_dist.evaluation.generation import TaskEval, evaluate_task
from mora_dist.evaluation.results import stage_filename, write_stage_results
from mora_dist.evaluation.suite import LOCAL_TASKS, run_general_suite

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "llm-cl-benchmark-500"


def load_task_examples(task: str, split: str = "eval", data_root: str | os.PathLike | None = None) -> list[dict]:
    """``{"prompt", "answer"}`` examples of ``<data_root>/<task>/<split>.json``.

    ``data_root`` defaults to ``$MORA_DATA_ROOT/llm-cl-benchmark-500`` or ``../shared/data/llm-cl-benchmark-500``
    beside the repository. Raises ``FileNotFoundError`` naming the missing file.
    """
    if data_root is None:
        env = os.environ.get("MORA_DATA_ROOT")
        data_root = Path(env) / "llm-cl-benchmark-500" if env else DEFAULT_DATA_ROOT
    path = Path(data_root) / task / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"task data not found: {path} (set MORA_DATA_ROOT or pass data_root)")
    data = json.loads(path.read_text(encoding="utf-8"))
    bad = [i for i, ex in enumerate(data[:5]) if not {"prompt", "answer"} <= set(ex)]
    if bad:
        raise ValueError(f"{path}: examples need 'prompt' and 'answer' fields (entry {bad[0]})")
    return data


def evaluate_stage(model, tok, run_dir: str | os.PathLike, stage: int, after_task: str | None,
                   tasks: Mapping[str, Sequence[dict]], *, general_tasks: Sequence[str] = LOCAL_TASKS,
                   general_limit: int | float | None = 100, limit: int | None = None, batch_size: int = 8,
                   seed: int = 0, chat_template: bool = False, synced_gpus: bool = False,
                   metrics: Mapping[str, str] | None = None, experts: Mapping[str, Any] | None = None,
                   config: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, TaskEval], dict | None]:
    """Evaluate one checkpoint and write its stage results file.

    Args:
        model, tok: the model to evaluate (plain HF module; under DeepSpeed pass ``engine.module``) and tokenizer.
        run_dir: run directory; the file goes to ``<run_dir>/eval/stage_XX_<name>.json``.
        stage: 0 for the base model, ``i + 1`` after training task ``i``.
        after_task: the task just trained, ``None`` for the base model.
        tasks: in-domain task name -> examples (every task of the stream, so the full matrix row is filled).
        general_tasks: lm-eval task names for the general suite (empty: skip it).
        general_limit: documents per general task (lm-eval ``limit``).
        limit: examples per in-domain task (seeded sample, see ``sample_examples``).
        batch_size: per-rank batch size for generation and scoring.
        seed: in-domain sampling seed.
        chat_template: wrap in-domain prompts in the tokenizer's chat template.
        synced_gpus: set under ZeRO-3.
        metrics: task -> metric name overrides (default: ``default_metric(task)``).
        experts: JSON-able expert statistics (``{"summary": {...}, "usage": {group: [...]}}``) for the report.
        config: run settings recorded in the file's ``config`` section.

    Returns:
        ``(path, in-domain results, lm-eval general results or None)``; identical on every rank.
    """
    in_domain = {
        name: evaluate_task(model, tok, examples, (metrics or {}).get(name), task=name, batch_size=batch_size,
                            limit=limit, seed=seed, chat_template=chat_template, synced_gpus=synced_gpus)
        for name, examples in tasks.items()
    }
    general = None
    if general_tasks:
        general = run_general_suite(model, tok, general_tasks, limit=general_limit, batch_size=batch_size,
                                    synced_gpus=synced_gpus)
    rank, world = rank_and_world()
    path = Path(run_dir) / "eval" / stage_filename(stage, after_task)
    if rank == 0:
        path = write_stage_results(run_dir, stage, after_task, in_domain, general, experts, config)
    if world > 1:
        dist.barrier()
    return path, in_domain, general
