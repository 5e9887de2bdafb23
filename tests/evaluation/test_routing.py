"""Routing telemetry (``mora-dist routing``): each block's share of the gate weight and of the output mass."""

from __future__ import annotations

import pytest
import torch

from mora_dist.evaluation.routing import block_shares, separation
from mora_dist.mora import MoRAConfig, add_block, freeze_blocks, inject_mora, mora_layers


def _two_blocks(model, seed: int = 0):
    torch.manual_seed(seed)
    inject_mora(model, MoRAConfig(r_task=4, k=4, dropout=0.0))
    add_block(model, "t0")
    freeze_blocks(model)
    add_block(model, "t1")
    with torch.no_grad():
        for layer in mora_layers(model).values():  # B = 0 at creation: give every value a response
            layer.mora_B_frozen.normal_(0, 0.02)
            layer.mora_B.normal_(0, 0.02)
    model.eval()
    return model


def _batch(ids: list[list[int]], pad: int = 0) -> dict:
    width = max(len(r) for r in ids)
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])}


PROMPTS = [[5, 17, 42, 8, 99, 3, 7], [11, 4, 60], [23, 9, 31, 77, 2]]


def test_zero_keys_take_no_share(tiny_llama):
    """A block whose keys are zero scores 0 < delta on every token: it gets no weight and no mass, the other
    block all of it."""
    model = _two_blocks(tiny_llama)
    with torch.no_grad():
        for layer in mora_layers(model).values():
            layer.mora_A_frozen.zero_()
    shares = block_shares(model, [_batch(PROMPTS)])
    assert shares["blocks"] == ["t0", "t1"]
    for key in ("weight", "mass"):
        assert shares[key] == pytest.approx([0.0, 1.0], abs=1e-12)
        for group in shares["groups"].values():
            assert group[key] == pytest.approx([0.0, 1.0], abs=1e-12)
    assert shares["tokens"] == sum(len(p) for p in PROMPTS)  # padding is not counted


def test_zero_values_take_weight_but_no_mass(tiny_llama):
    """Values B = 0 leave the gate (weight) as it is but add nothing to the output (mass)."""
    model = _two_blocks(tiny_llama)
    with torch.no_grad():
        for layer in mora_layers(model).values():
            layer.mora_B.zero_()
    shares = block_shares(model, [_batch(PROMPTS)])
    assert shares["mass"] == pytest.approx([1.0, 0.0], abs=1e-12)
    assert 0.0 < shares["weight"][1] < 1.0
    assert sum(shares["weight"]) == pytest.approx(1.0)


def test_right_padding_equals_one_prompt_at_a_time(tiny_llama):
    """A padded batch gives the sums of unpadded single-prompt forwards: padding is masked out of the sums."""
    model = _two_blocks(tiny_llama, seed=3)
    together = block_shares(model, [_batch(PROMPTS)])
    alone = block_shares(model, [_batch([p]) for p in PROMPTS])
    for key in ("weight", "mass"):
        assert together[key] == pytest.approx(alone[key], rel=1e-6)
        assert 0.05 < together[key][0] < 0.95  # random keys: both blocks take part


def test_separation_ratio_by_hand():
    stages = [
        {"stage": "00-a", "blocks": ["a"], "tasks": {"a": {"mass": [1.0]}}},
        {"stage": "01-b", "blocks": ["a", "b"], "tasks": {"a": {"mass": [0.8, 0.2]}, "b": {"mass": [0.4, 0.6]}}},
        {"stage": "02-c", "blocks": ["a", "b", "c"],
         "tasks": {"a": {"mass": [0.5, 0.3, 0.2]}, "b": {"mass": [0.2, 0.4, 0.4]}, "c": {"mass": [0.1, 0.3, 0.6]}}},
    ]
    rows = separation(stages, "mass")
    assert [r["stage"] for r in rows] == ["01-b", "02-c"]
    assert rows[0]["own"] == 0.6 and rows[0]["earlier"] == pytest.approx(0.2) and rows[0]["ratio"] == pytest.approx(3.0)
    assert rows[1]["earlier"] == pytest.approx(0.3) and rows[1]["ratio"] == pytest.approx(2.0)


def test_run_directories_it_cannot_measure(tiny_model_dir, tmp_path):
    """One clear error each: not a run directory, an ungated method, a run with no stage adapter yet."""
    from mora_dist.config import ConfigError
    from mora_dist.evaluation.routing import measure_run
    from mora_dist.run.state import RunStateError
    from tests.support.runs import write_config

    with pytest.raises(RunStateError, match="not a run directory"):
        measure_run(tmp_path / "nothing")
    for method, error, match in (("seq_lora", ConfigError, "mora.gate is 'none'"),
                                 ("mora", RunStateError, "no stage adapters")):
        run_dir = tmp_path / method
        run_dir.mkdir()
        cfg = write_config(tmp_path, tiny_model_dir, run_dir, method=method)
        (run_dir / "config.yaml").write_text(cfg.read_text())
        with pytest.raises(error, match=match):
            measure_run(run_dir)


def test_last_token_counts_one_token_per_prompt(tiny_llama):
    """``stats_mask`` restricts the sums to the marked tokens: one per prompt, the same shares as a forward of
    each prompt whose other tokens are masked out of the statistics by hand."""
    model = _two_blocks(tiny_llama, seed=5)
    batch = _batch(PROMPTS)
    batch["stats_mask"] = torch.zeros_like(batch["attention_mask"])
    for row, p in enumerate(PROMPTS):
        batch["stats_mask"][row, len(p) - 1] = 1
    last = block_shares(model, [batch])
    assert last["tokens"] == len(PROMPTS)
    alone = []
    for p in PROMPTS:
        b = _batch([p])
        b["stats_mask"] = torch.zeros_like(b["attention_mask"])
        b["stats_mask"][0, -1] = 1
        alone.append(b)
    assert block_shares(model, alone)["mass"] == pytest.approx(last["mass"], rel=1e-6)
    assert block_shares(model, [_batch(PROMPTS)])["mass"] != pytest.approx(last["mass"], rel=1e-3)


def test_prompt_batches_pad_right_and_mark_the_last_token():
    from mora_dist.evaluation.routing import prompt_batches
    from tests.support import tiny_tokenizer

    tok = tiny_tokenizer()
    (batch,) = prompt_batches(tok, ["abc", "abcdef"], chat_template=False, system_prompt=None, max_length=5,
                              last_token=True)
    lengths = [len(tok("abc")["input_ids"]), min(5, len(tok("abcdef")["input_ids"]))]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert batch["stats_mask"][row].nonzero().flatten().tolist() == [n - 1]
    assert batch["input_ids"][1].tolist() == tok("abcdef")["input_ids"][-5:]  # cut from the left
