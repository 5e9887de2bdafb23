"""Evaluate a model on a list of a run config's tasks: what the evaluate stage of a run and ``mora-dist eval``
share (each task's ``eval.split``, metric, generation length, and the config's batch size, limit and seed)."""

from __future__ import annotations

from mora_dist.data import load_task_examples
from mora_dist.evaluation.generation import evaluate_task


def evaluate_tasks(model, tok, cfg, tasks, *, synced_gpus: bool = False) -> dict:
    """``{task name: result}`` of ``evaluate_task`` for each of ``tasks`` (``TaskConfig`` entries of ``cfg``).

    Args:
        synced_gpus: every worker runs the same number of forwards (needed under ZeRO-3 with several workers).
    """
    e = cfg.eval
    out = {}
    for task in tasks:
        examples = load_task_examples(task, cfg.data.root, e.split)
        out[task.name] = evaluate_task(
            model, tok, examples, task.metric, task=task.name, max_new_tokens=task.max_new_tokens,
            batch_size=e.batch_size, limit=e.max_examples, seed=e.seed, chat_template=e.chat_template,
            system_prompt=cfg.model.system_prompt,
            max_prompt_tokens=cfg.model.max_length, synced_gpus=synced_gpus)
    return out
