"""Fail-fast checks of a stream's data, before any model is loaded or any task is trained.

A run reads every task's training split and its evaluation split (``eval.split``) only when it reaches that task,
so a malformed file of the last task would otherwise surface hours into a stream. ``check_stream_data`` reads
them all up front (file present, JSON parses, fields present, split not empty) and, given a tokenizer, checks that
answers fit ``model.max_length``. ``mora-dist validate`` and the start of ``mora-dist run`` call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mora_dist.data.sources import DataError, load_task_examples


@dataclass
class SplitCheck:
    """What was found in one task's split."""

    task: str
    split: str
    examples: int
    long_answers: int = 0  # answers that cannot fit model.max_length (skipped in training, counted)


@dataclass
class DataCheck:
    """The outcome of ``check_stream_data``: one entry per (task, split) read."""

    splits: list[SplitCheck] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for s in self.splits:
            extra = f", {s.long_answers} answer(s) longer than model.max_length (skipped)" if s.long_answers else ""
            lines.append(f"  {s.task} [{s.split}]: {s.examples} examples{extra}")
        return "\n".join(lines)


def _splits_used(cfg) -> tuple[str, ...]:
    return ("train",) if cfg.eval.split == "train" else ("train", cfg.eval.split)


def check_stream_data(cfg, load_tokenizer=None) -> DataCheck:
    """Read every split the run will use, for every task, and check it.

    Args:
        cfg: the ``RunConfig``.
        load_tokenizer: a callable returning the run's tokenizer; when given, it is called once every file has
            read cleanly, and the training answers are checked against ``model.max_length`` (an answer needs its
            tokens, the EOS token and at least one prompt token).

    Returns:
        A ``DataCheck`` with the example counts (and the answers too long to train on, which training skips).

    Raises:
        DataError: the first problem found, naming the task, the file and the fix; also when no training answer
            of a task fits ``model.max_length``.
    """
    out = DataCheck()
    answers: dict[str, list[str]] = {}
    for task in cfg.tasks:
        for split in _splits_used(cfg):
            limit = cfg.train.max_examples if split == "train" else None
            try:
                examples = load_task_examples(task, cfg.data.root, split, limit=limit, seed=cfg.train.seed)
            except DataError as err:
                msg = str(err)
                prefix = "" if msg.startswith(f"task {task.name!r}") else f"task {task.name!r} ({split} split): "
                raise DataError(prefix + msg) from err
            out.splits.append(SplitCheck(task.name, split, len(examples)))
            if split == "train":
                answers[task.name] = [e["answer"] for e in examples]
    if load_tokenizer is None:
        return out
    tok = load_tokenizer()
    eos = 0 if tok.eos_token_id is None else 1  # as encode_examples: answer, EOS, >= 1 prompt token
    for check in out.splits:
        if check.split != "train":
            continue
        lengths = [len(ids) + eos + 1 for ids in tok(answers[check.task], add_special_tokens=False)["input_ids"]]
        check.long_answers = sum(n > cfg.model.max_length for n in lengths)
        if check.long_answers == len(lengths):
            raise DataError(f"task {check.task!r}: no training answer fits model.max_length="
                            f"{cfg.model.max_length} (the shortest needs {min(lengths)} tokens); raise model.max_length")
    return out
