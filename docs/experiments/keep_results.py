"""Keep a finished run's results in this folder: everything ``mora-dist compare --collect-only`` and
``mora-dist report`` read, without the adapters' weights, the checkpoints, the statistics or the figures, and
without the test data's text.

The test prompts in ``eval/*.samples.json`` are replaced by ``sha256:<hex>`` of the prompt. The paired bootstrap
identifies an example by its prompt and reference, so runs kept this way still pair with each other (not with a
run that kept its prompts); references, predictions and scores stay as they are. The shared data's terms apply to
the text, which is therefore not copied here.

    python docs/experiments/keep_results.py RUN_DIR [RUN_DIR ...] --into docs/experiments/standard_cl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

SKIPPED = ("*.safetensors", "ckpt", "stats", "lock", "*.png", "progress.json")


def hashed(prompt: str) -> str:
    return "sha256:" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def keep(run_dir: Path, into: Path) -> Path:
    if not (run_dir / "state.json").is_file() or not (run_dir / "report" / "report.json").is_file():
        sys.exit(f"{run_dir}: not a run directory with a report (no state.json or report/report.json); "
                 "--collect-only checks later that the run is finished")
    dest = into / run_dir.name
    tmp = into / f".{run_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns(*SKIPPED))
    for path in sorted((tmp / "eval").glob("*.samples.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # in-domain samples: {task: [{prompt, reference, prediction, score}, ...]}
            for rows in data.values():
                for row in rows if isinstance(rows, list) else []:
                    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                        row["prompt"] = hashed(row["prompt"])
        path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--into", type=Path, required=True)
    args = parser.parse_args()
    args.into.mkdir(parents=True, exist_ok=True)
    for run_dir in args.run_dirs:
        print(keep(run_dir, args.into))


if __name__ == "__main__":
    main()
