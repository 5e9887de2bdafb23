"""Batched greedy generation on the real SmolLM2 model equals batch-size-1 generation; sampling and scoring."""

from __future__ import annotations

import json

import pytest

from tests.support import CL_DATA

FILES = ["FOMC", "NumGLUE-ds", "agnews", "ScienceQA", "Py150", "C-STANCE"]


def _prompts() -> list[str]:
    prompts = []
    for task in FILES:
        path = CL_DATA / task / "eval.json"
        if not path.is_file():
            pytest.skip(f"task data missing: {path}")
        prompts.append(json.loads(path.read_text(encoding="utf-8"))[0]["prompt"][-240:])
    return prompts


def test_batched_generation_equals_batch_size_one(smollm2):
    from mora_dist.evaluation.generation import generate_texts

    model, tok = smollm2
    prompts = _prompts()  # lengths differ a lot: left padding is exercised
    side = tok.padding_side
    batched = generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=6)
    single = generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=1)
    assert batched == single
    assert tok.padding_side == side
    assert all(isinstance(t, str) for t in batched) and len(set(batched)) > 1


def test_chat_template_prompts_differ_and_stop_strings(smollm2):
    from mora_dist.evaluation.generation import format_prompt, generate_texts, truncate_at_stops

    model, tok = smollm2
    chat = format_prompt(tok, "What is 2+2?", chat_template=True)
    assert "What is 2+2?" in chat and chat != "What is 2+2?" and chat.rstrip().endswith("assistant")
    # model.system_prompt: None keeps the template's default system turn, "" an empty one, text replaces it
    default = chat.split("<|im_start|>user")[0]
    assert "SmolLM" in default
    empty = format_prompt(tok, "What is 2+2?", chat_template=True, system_prompt="")
    assert empty.startswith("<|im_start|>system\n<|im_end|>") and "SmolLM" not in empty
    assert len(tok(empty)["input_ids"]) < len(tok(chat)["input_ids"]) - 10
    own = format_prompt(tok, "What is 2+2?", chat_template=True, system_prompt="Answer with the label only.")
    assert "Answer with the label only." in own and "SmolLM" not in own
    out = generate_texts(model, tok, ["The capital of France is"], max_new_tokens=6, stop=["."])
    assert "Paris" in out[0] and "." not in out[0]
    assert truncate_at_stops("a\nb.c", ["\n", "."]) == "a"


def test_sample_examples_is_fixed_by_seed():
    from mora_dist.evaluation.generation import sample_examples, task_max_new_tokens

    data = [{"prompt": str(i), "answer": str(i)} for i in range(50)]
    a, b = sample_examples(data, 10, seed=3), sample_examples(data, 10, seed=3)
    assert a == b and len(a) == 10
    assert [int(x["prompt"]) for x in a] == sorted(int(x["prompt"]) for x in a)
    assert sample_examples(data, 10, seed=4) != a
    assert sample_examples(data, None) == data and sample_examples(data, 99) == data
    assert task_max_new_tokens("fomc") == 4 and task_max_new_tokens("unknown-task") == 16


def test_evaluate_task_scores_predictions(tiny_llama):
    """evaluate_task scores exactly what it generated, with the task's default metric."""
    from mora_dist.evaluation import metrics as M
    from mora_dist.evaluation.generation import evaluate_task

    import torch
    from transformers import LlamaForCausalLM

    from tests.support import tiny_llama_config, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    examples = [{"prompt": f"Question {i}: ", "answer": a} for i, a in enumerate(["12", "7", "x", "3.0", "5"])]
    res = evaluate_task(model, tok, examples, task="NumGLUE-ds", limit=4, seed=1, batch_size=3)
    assert res.metric == "exact_number" and res.n == 4
    preds = [r["prediction"] for r in res.predictions]
    refs = [r["reference"] for r in res.predictions]
    assert res.score == pytest.approx(M.exact_number(preds, refs))
    assert [r["score"] for r in res.predictions] == [M.exact_number([p], [r]) for p, r in zip(preds, refs)]
    assert all(len(tok.encode(p)) <= 8 for p in preds)  # NumGLUE-ds budget: 8 new tokens


def test_live_lm_generate_until_cuts_at_stop_strings():
    """LiveLM.generate_until: greedy, per-request budgets and stop strings, outputs in request order."""
    import torch
    from lm_eval.api.instance import Instance
    from transformers import LlamaForCausalLM

    from mora_dist.evaluation.generation import generate_texts
    from mora_dist.evaluation.lm_eval_adapter import LiveLM
    from tests.support import tiny_llama_config, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    prompts = ["Hello", "abc def", "Q: 1+1?"]
    free = generate_texts(model, tok, prompts, max_new_tokens=8, batch_size=1)
    stop = free[1][2]  # a character that the second continuation produces at position 2
    reqs = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": m}), i)
            for i, (p, m) in enumerate(zip(prompts, [8, 8, 3]))]
    out = LiveLM(model, tok, batch_size=2).generate_until(reqs)
    assert out[1] == free[1][:free[1].index(stop)]
    assert out[0] == free[0].split(stop)[0]
    assert out[2] == free[2][:3].split(stop)[0]
