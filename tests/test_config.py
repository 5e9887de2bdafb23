"""The typed run config: YAML, overrides, unknown keys, checked fields, and the validate command."""

from __future__ import annotations

from pathlib import Path

import pytest

from mora_dist.cli import main
from mora_dist.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "mora:\n  k: 4\ntrain:\n  lr: 1e-3\ntasks:\n  - {name: FOMC}\n  - {name: boolq, source: olmo}\n")
    cfg = load_config(p, ["mora.tau=0.1", "tasks.1.lr=2e-4"])
    assert cfg.mora.k == 4 and cfg.mora.tau == 0.1 and cfg.train.lr == 1e-3
    assert [t.name for t in cfg.tasks] == ["FOMC", "boolq"] and cfg.tasks[1].lr == 2e-4


def test_unknown_key_suggests(tmp_path):
    p = write(tmp_path, "train:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key train\.learning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"did you mean mora\.tau\?"):
        load_config(None, ["mora.tua=1"])


@pytest.mark.parametrize("override,match", [
    ("distributed.zero_stage=4", r"zero_stage=4: must be 0, 1, 2 or 3"),
    ("mora.k=0", r"mora\.k=0"),
    ("mora.tau=-1", r"mora\.tau=-1"),
    ("train.micro_batch_size=abc", r"train\.micro_batch_size='abc': expected int"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_duplicate_task_names():
    with pytest.raises(ConfigError, match="duplicate task names"):
        load_config(None, ["tasks=[{name: a}, {name: a}]"])


def test_global_batch_must_divide():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=12"])
    assert cfg.train.gradient_accumulation(1) == 3
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not a multiple of .* = 8"):
        cfg.train.gradient_accumulation(2)


def test_validate_command_prints_resolved_config(tmp_path, capsys):
    p = write(tmp_path, "mora:\n  k: 2\n")
    assert main(["validate", str(p), "train.seed=7"]) == 0
    out = capsys.readouterr().out
    assert "k: 2" in out and "seed: 7" in out
    assert main(["validate", str(p), "mora.kk=1"]) == 2
    assert "did you mean mora.k" in capsys.readouterr().err


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_their_data_exists(path):
    from mora_dist.config import load_config
    from mora_dist.data import load_task_examples

    cfg = load_config(path)
    assert cfg.tasks, path
    cfg.train.gradient_accumulation(1)
    for task in cfg.tasks:
        if task.source == "trace" and not Path(cfg.data.root).is_dir():
            pytest.skip(f"data root missing: {cfg.data.root}")
        assert load_task_examples(task, cfg.data.root, "train", limit=2)
        assert load_task_examples(task, cfg.data.root, cfg.eval.split, limit=2)


def test_all_three_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {"quickstart.yaml", "trace.yaml", "standard_cl.yaml"}


@pytest.mark.parametrize("text, gate", [("mora:\n  gated: false\n", "none"),
                                        ("mora:\n  gated: true\n  gate: self\n", "self"),
                                        ("method: moe_lora\nmora:\n  gated: true\n  gate: router\n", "router"),
                                        ("method: seq_lora\nmora:\n  gated: true\n", "none")])
def test_former_gated_key_maps_onto_the_one_gate(tmp_path, text, gate):
    """Configs (and the resolved ``config.yaml`` of run directories) written with ``mora.gated`` still load."""
    cfg = load_config(write(tmp_path, text))
    assert cfg.mora.gate == gate and "gated" not in cfg.to_dict()["mora"]


@pytest.mark.parametrize("text, match", [
    ("mora:\n  gated: false\n  gate: router\n", r"run\.yaml: mora\.gated=false contradicts mora\.gate='router': "
                                                  r"remove mora\.gated and set mora\.gate: none"),
    ("mora:\n  gated: true\n  gate: none\n", r"run\.yaml: mora\.gated=true contradicts mora\.gate='none'"),
    ("mora:\n  gated: maybe\n", r"run\.yaml: mora\.gated='maybe' is invalid .*set mora\.gate to self, router or none"),
    ("mora:\n  gate: topk\n", r"run\.yaml: mora\.gate='topk' is invalid: choose one of \('self', 'router', 'none'\)"),
    ("mora:\n  gate: router\n", r"mora\.gate='router' with method=mora: .*set method: moe_lora"),
])
def test_gate_errors_name_the_file_the_field_and_the_fix(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))

