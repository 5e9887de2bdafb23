"""Rebuild the quickstart's data slice from the LLM-CL-Benchmark_500 folders (standard CL benchmark and TRACE).

    python data/quickstart/make_slice.py ../shared/data/llm-cl-benchmark-500

Per task: the first TRAIN training examples and the first TEST test examples, in file order, written as
TRACE-style ``train.json`` / ``test.json`` lists of ``{"prompt", "answer"}`` (plus ``labels.json`` where the
source has one). The topic tasks' passages are cut to their first WORDS words (the instruction, the options and
the answer are kept whole), which keeps the slice small and training fast on 2 CPU cores; FOMC's sentences are
short already and kept whole. Nothing else is changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TRAIN, TEST, WORDS = 200, 60, 12
TASKS = {"dbpedia": WORDS, "agnews": WORDS, "yahoo": WORDS, "FOMC": None}  # task: passage words kept (None: all)
HERE = Path(__file__).resolve().parent


def shorten(prompt: str, words: int | None = WORDS) -> str:
    """Cut the passage ("Text:" or "Question:" part, the last field of the prompt) to ``words`` words."""
    if words is None:
        return prompt
    for marker in ("\nText:", "\nQuestion:"):
        head, sep, body = prompt.partition(marker)
        if sep:
            cut = body.split()
            return head + sep + " " + " ".join(cut[:words]) + (" ..." if len(cut) > words else "")
    return prompt


def main(source: str) -> None:
    for task, words in TASKS.items():
        out = HERE / task
        out.mkdir(exist_ok=True)
        for split, n in (("train", TRAIN), ("test", TEST)):
            rows = json.loads((Path(source) / task / f"{split}.json").read_text())[:n]
            rows = [{"prompt": shorten(r["prompt"], words), "answer": r["answer"]} for r in rows]
            (out / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0) + "\n")
        labels = Path(source) / task / "labels.json"
        if labels.is_file():
            (out / "labels.json").write_text(labels.read_text())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE.parents[2] / "shared/data/llm-cl-benchmark-500"))
