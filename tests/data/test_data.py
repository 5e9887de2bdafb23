"""Task sources and tokenisation: real data, bad data, truncation."""

from __future__ import annotations

import json

import pytest

from tests.support import CL_DATA
from mora_dist.config import ConfigError, TaskConfig
from mora_dist.data import DataError, encode_examples, load_task_examples
from mora_dist.data.tokenize import IGNORE


class CharTokenizer:
    """A real (if simple) tokenizer: one id per character, EOS = 0; enough to test truncation exactly."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_trace_task_from_shared_data():
    if not (CL_DATA / "NumGLUE-cm").is_dir():
        pytest.skip(f"real data missing: {CL_DATA}")
    ex = load_task_examples(TaskConfig(name="NumGLUE-cm"), CL_DATA, "train")
    assert len(ex) == 500 and all(set(e) == {"prompt", "answer"} for e in ex)
    sub = load_task_examples(TaskConfig(name="NumGLUE-cm"), CL_DATA, "train", limit=10, seed=3)
    assert sub == load_task_examples(TaskConfig(name="NumGLUE-cm"), CL_DATA, "train", limit=10, seed=3)
    assert len(sub) == 10 and all(e in ex for e in sub)


def test_olmo_train_split():
    ex = load_task_examples(TaskConfig(name="boolq", source="olmo"), "/nonexistent", "train", limit=20)
    assert len(ex) == 20 and all(e["answer"] in ("A", "B") for e in ex)
    assert all("Answer:" in e["prompt"] for e in ex)


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text('[\n  {"prompt": "a", "answer": "b"},\n  {"prompt": "c" "answer": 1}\n]')
    with pytest.raises(DataError, match=r"train\.json: malformed JSON at line 3, column"):
        load_task_examples(TaskConfig(name="t"), tmp_path)


def test_malformed_jsonl_names_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"q": "a", "a": "b"}\n{"q": \n')
    with pytest.raises(DataError, match=r"d\.jsonl: malformed JSON on line 2"):
        load_task_examples(TaskConfig(name="t", source="jsonl", path=str(f), prompt_field="q",
                                      answer_field="a"), tmp_path)


def test_missing_field_and_empty_task(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text(json.dumps([{"prompt": "a"}]))
    with pytest.raises(DataError, match=r"item 0 has no field 'answer'"):
        load_task_examples(TaskConfig(name="t"), tmp_path)
    (tmp_path / "t" / "train.json").write_text("[]")
    with pytest.raises(DataError, match=r"task 't': the train split is empty"):
        load_task_examples(TaskConfig(name="t"), tmp_path)


def test_unknown_source_is_a_config_error():
    with pytest.raises(ConfigError, match=r"source='csv'.*choose trace, jsonl, datasets or olmo"):
        TaskConfig(name="t", source="csv")


def test_datasets_source_parquet(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"x": ["p1", "p2"], "y": ["a1", "a2"]}).to_parquet(str(tmp_path / "d.parquet"))
    ex = load_task_examples(TaskConfig(name="t", source="datasets", path="d.parquet", prompt_field="x",
                                       answer_field="y"), tmp_path)
    assert ex == [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "a2"}]


def test_truncation_cuts_prompt_from_the_left_and_counts_long_answers():
    tok = CharTokenizer()
    examples = [{"prompt": "abcdefghij", "answer": "XY"},  # 10 + 3 > 8: prompt cut to its last 5 chars
                {"prompt": "ab", "answer": "XYZ"},  # fits
                {"prompt": "ab", "answer": "0123456789"}]  # the answer alone does not fit: skipped
    enc, report = encode_examples(tok, examples, max_length=8, chat_template=False)
    assert report.truncated_prompts == 1 and report.skipped_long_answers == 1 and report.examples == 2
    first = enc[0]
    assert first["input_ids"] == [ord(c) for c in "fghij"] + [ord("X"), ord("Y"), 0]
    assert first["labels"] == [IGNORE] * 5 + [ord("X"), ord("Y"), 0]  # loss on the answer (and EOS) only
