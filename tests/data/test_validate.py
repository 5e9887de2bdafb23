"""``mora-dist validate``: the resolved config, and every task's data checked up front without loading a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from tests.support import CL_DATA, REPO

pytestmark = pytest.mark.skipif(not (CL_DATA / "FOMC").is_dir(), reason=f"real data missing: {CL_DATA}")


def _stream(tmp_path, tasks=("FOMC", "NumGLUE-cm"), **model):
    data = tmp_path / "data"
    for task in tasks:
        (data / task).mkdir(parents=True)
        for split in ("train", "test"):
            (data / task / f"{split}.json").write_text((CL_DATA / task / f"{split}.json").read_text())
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"max_length": 96, **model}, "data": {"root": str(data)},
           "tasks": [{"name": t} for t in tasks]}
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, data


def _validate(config, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mora_dist", "validate", str(config), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_malformed_second_task_fails_fast_without_a_model(tmp_path):
    # model.name points nowhere: loading a model (or its tokenizer) would fail with another message
    config, data = _stream(tmp_path, name=str(tmp_path / "no-such-model"))
    bad = data / "NumGLUE-cm" / "train.json"
    bad.write_text(bad.read_text().replace('"answer"', '"answer" "answer"', 1))
    t = time.monotonic()
    proc = _validate(config)
    assert time.monotonic() - t < 30
    assert proc.returncode == 2
    assert f"{bad}: malformed JSON at line" in proc.stderr and "NumGLUE-cm" in proc.stderr
    assert "no-such-model" not in proc.stderr


@pytest.mark.parametrize("defect, message", [
    ("missing", "test.json not found"),
    ("empty", "the test split is empty"),
    ("field", "item 0 has no field 'answer'"),
])
def test_each_defect_names_task_file_and_fix(tmp_path, defect, message):
    config, data = _stream(tmp_path, name=str(tmp_path / "no-such-model"))
    target = data / "NumGLUE-cm" / "test.json"
    if defect == "missing":
        target.unlink()
    else:
        target.write_text("[]" if defect == "empty" else json.dumps([{"prompt": "p", "answr": "a"}]))
    proc = _validate(config, "--no-tokenizer")
    assert proc.returncode == 2 and message in proc.stderr and "NumGLUE-cm" in proc.stderr


def test_answers_that_cannot_fit_max_length(tmp_path, tiny_model_dir):
    config, data = _stream(tmp_path, tasks=("FOMC",), name=str(tiny_model_dir))
    proc = _validate(config)
    assert proc.returncode == 0, proc.stderr
    assert "FOMC [train]: 500 examples" in proc.stderr and "FOMC [test]: 100 examples" in proc.stderr
    rows = [{"prompt": f"q{i}", "answer": "word " * 200} for i in range(3)]
    (data / "FOMC" / "train.json").write_text(json.dumps(rows))
    proc = _validate(config)
    assert proc.returncode == 2 and "task 'FOMC': no training answer fits model.max_length=96" in proc.stderr
