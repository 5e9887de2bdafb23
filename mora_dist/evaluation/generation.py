"""Batched greedy generation for in-domain evaluation, on any Hugging Face causal LM and tokenizer.

Features: left padding (the tokenizer's side is restored afterwards), KV cache, prompts sorted by length so a
batch wastes little padding, per-task ``max_new_tokens`` (``TASK_MAX_NEW_TOKENS``), an optional chat template,
stop strings, a ``synced_gpus`` flag handed to ``generate`` (under ZeRO-3 it keeps ranks stepping together until
every rank's batch is finished), and a per-task sample limit drawn with a fixed seed.

Under torch.distributed with several ranks, ``generate_texts`` deals length-sorted batches round-robin over
ranks, pads with dummy batches so every rank makes the same number of ``generate`` calls, and all-gathers the
outputs, so every rank returns the same list (and ``evaluate_task`` the same score).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mora_dist.data.tokenize import format_prompt  # one prompt format for training and evaluation

from mora_dist.evaluation.distributed import batches, deal_batches, gather_indexed, rank_and_world
from mora_dist.evaluation.metrics import default_metric, get_metric, simplification_source

# Generation budget per task (tokens): labels need a few, a line of code or a simplification more.
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "C-STANCE": 4, "FOMC": 4, "ScienceQA": 4, "NumGLUE-cm": 8, "NumGLUE-ds": 8,
    "Py150": 48, "20Minuten": 128, "MeetingBank": 128,
    "agnews": 8, "amazon": 8, "yelp": 8, "dbpedia": 8, "yahoo": 8,
}
DEFAULT_MAX_NEW_TOKENS = 16


def task_max_new_tokens(task: str | None) -> int:
    """``TASK_MAX_NEW_TOKENS[task]`` (case-insensitive), ``DEFAULT_MAX_NEW_TOKENS`` for other tasks."""
    for name, n in TASK_MAX_NEW_TOKENS.items():
        if task is not None and name.lower() == task.lower():
            return n
    return DEFAULT_MAX_NEW_TOKENS


def sample_examples(examples: Sequence[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """At most ``limit`` examples drawn without replacement with ``random.Random(seed)``, in their original order.

    The same ``(len(examples), limit, seed)`` always selects the same items, on every rank and every stage.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def truncate_at_stops(text: str, stops: Sequence[str] | None) -> str:
    """``text`` cut before the first occurrence of any stop string."""
    for stop in stops or ():
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


@torch.no_grad()
def _generate_batch(model, tok, texts: list[str], max_new_tokens: int, synced_gpus: bool,
                    add_special_tokens: bool, max_prompt_tokens: int | None) -> list[str]:
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tok.padding_side = old_side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_prompt_tokens is not None and ids.shape[1] > max_prompt_tokens:
        ids, mask = ids[:, -max_prompt_tokens:], mask[:, -max_prompt_tokens:]
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, use_cache=True,
        pad_token_id=pad_id, synced_gpus=synced_gpus,
    )
    return tok.batch_decode(out[:, ids.shape[1]:].cpu(), skip_special_tokens=True)


def generate_texts(model, tok, prompts: Sequence[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = 8, chat_template: bool = False, system_prompt: str | None = None,
                   stop: Sequence[str] | None = None, synced_gpus: bool = False,
                   max_prompt_tokens: int | None = None, distributed: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (the new text only), in the order of ``prompts``.

    Args:
        model: a Hugging Face causal LM (a DeepSpeed-wrapped module's ``.module`` works too).
        tok: its tokenizer; a missing pad token falls back to the EOS token.
        prompts: raw prompts.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per ``generate`` call (per rank).
        chat_template: wrap every prompt as one user turn of the tokenizer's chat template.
        system_prompt: optional system turn when ``chat_template`` is on.
        stop: strings at which a continuation is cut (applied after decoding).
        synced_gpus: passed to ``generate``; set it under ZeRO-3 so ranks whose batches finish early keep
            running forward passes until all ranks are done.
        max_prompt_tokens: keep only the last this-many prompt tokens.
        distributed: split the work over the ranks of the default process group when there are several.

    Returns:
        One decoded continuation per prompt; identical on every rank.
    """
    texts = [format_prompt(tok, p, chat_template, system_prompt) for p in prompts]
    if not texts:
        return []
    lengths = [len(tok(t, add_special_tokens=not chat_template)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    rank, world = rank_and_world() if distributed else (0, 1)
    was_training = model.training
    model.eval()
    local: list[tuple[int, str]] = []
    try:
        for batch in deal_batches(batches(order, batch_size), rank, world):
            chunk = batch if batch is not None else [order[-1]]  # dummy: the shortest prompt, output dropped
            outs = _generate_batch(model, tok, [texts[i] for i in chunk], max_new_tokens, synced_gpus,
                                   not chat_template, max_prompt_tokens)
            if batch is not None:
                local += [(i, truncate_at_stops(o, stop)) for i, o in zip(chunk, outs)]
    finally:
        model.train(was_training)
    return gather_indexed(local, len(texts)) if world > 1 else [o for _, o in sorted(local)]


@dataclass
class TaskEval:
    """Result of ``evaluate_task``: the score and what produced it."""

    task: str | None
    metric: str
    score: float
    n: int
    predictions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"task": self.task, "metric": self.metric, "score": self.score, "n": self.n,
                "predictions": self.predictions}


def evaluate_task(model, tok, examples: Sequence[dict], metric: str | Callable | None = None, *,
                  task: str | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
                  limit: int | None = None, seed: int = 0, chat_template: bool = False,
                  system_prompt: str | None = None, synced_gpus: bool = False, stop: Sequence[str] | None = None,
                  max_prompt_tokens: int | None = None) -> TaskEval:
    """Generate answers to ``examples`` and score them.

    Args:
        model: a Hugging Face causal LM.
        tok: its tokenizer.
        examples: ``{"prompt": str, "answer": str}`` dicts (the files of ``llm-cl-benchmark-500``).
        metric: a name in ``METRICS`` or a metric function; ``None`` picks ``default_metric(task)``.
        task: task name, used for the default metric and ``max_new_tokens``.
        max_new_tokens: generation budget; ``None`` picks ``task_max_new_tokens(task)``.
        batch_size: prompts per ``generate`` call (per rank).
        limit: evaluate at most this many examples, drawn with ``seed`` (see ``sample_examples``).
        seed: sampling seed for ``limit``.
        chat_template, system_prompt, synced_gpus, stop, max_prompt_tokens: see ``generate_texts``.

    Returns:
        ``TaskEval`` with the mean metric and, per example, prompt, reference, prediction and score. Under
        torch.distributed every rank returns the same result.
    """
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    if metric is None:
        metric_name = default_metric(task or "")
    fn = get_metric(metric if callable(metric) else metric_name)
    chosen = sample_examples(examples, limit, seed)
    prompts = [ex["prompt"] for ex in chosen]
    refs = [ex["answer"] for ex in chosen]
    preds = generate_texts(model, tok, prompts, max_new_tokens=max_new_tokens or task_max_new_tokens(task),
                           batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt,
                           stop=stop, synced_gpus=synced_gpus, max_prompt_tokens=max_prompt_tokens)
    sources = [simplification_source(p) for p in prompts]
    per_example = [fn([p], [r], [s]) for p, r, s in zip(preds, refs, sources)]
    score = fn(preds, refs, sources) if chosen else 0.0
    rows = [{"prompt": p, "reference": r, "prediction": q, "score": s}
            for p, r, q, s in zip(prompts, refs, preds, per_example)]
    return TaskEval(task=task, metric=metric_name, score=score, n=len(chosen), predictions=rows)
