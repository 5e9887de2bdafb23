"""Rebuild the quickstart's data slice from the standard CL benchmark folders (llm-cl-benchmark-500).

    python data/quickstart/make_slice.py ../shared/data/llm-cl-benchmark-500

Per task: the first TRAIN training examples and the first TEST test examples, in file order, with the passage cut
to its first WORDS words (the instruction, the options and the answer are kept whole), written as TRACE-style
``train.json`` / ``test.json`` lists of ``{"prompt", "answer"}`` plus ``labels.json``. Cutting the passage keeps
the slice small and training fast on 2 CPU cores; nothing else is changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ("dbpedia", "agnews", "yahoo")
TRAIN, TEST, WORDS = 200, 60, 12
HERE = Path(__file__).resolve().parent


def shorten(prompt: str, words: int = WORDS) -> str:
    """Cut the passage ("Text:" or "Question:" part, the last field of the prompt) to ``words`` words."""
    for marker in ("\nText:", "\nQuestion:"):
        head, sep, body = prompt.partition(marker)
        if sep:
            cut = body.split()
            return head + sep + " " + " ".join(cut[:words]) + (" ..." if len(cut) > words else "")
    return prompt


def main(source: str) -> None:
    for task in TASKS:
        out = HERE / task
        out.mkdir(exist_ok=True)
        for split, n in (("train", TRAIN), ("test", TEST)):
            rows = json.loads((Path(source) / task / f"{split}.json").read_text())[:n]
            rows = [{"prompt": shorten(r["prompt"]), "answer": r["answer"]} for r in rows]
            (out / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0) + "\n")
        (out / "labels.json").write_text((Path(source) / task / "labels.json").read_text())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE.parents[2] / "shared/data/llm-cl-benchmark-500"))
