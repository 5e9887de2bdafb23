"""Per-task metrics and forgetting metrics against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from mora_dist.evaluation import metrics as M
from mora_dist.evaluation.forgetting import (average_performance, backward_transfer, backward_transfer_trace,
                                             batch_metrics, forgetting, forgetting_metrics, forward_transfer,
                                             learning_accuracy, learning_accuracy_per_task)


def test_accuracy_label_rule():
    preds = ["B. declarative", "Bad", "very positive", "Positive!", " A\nmore text", "positive"]
    refs = ["B\nThere are four kinds of sentences.", "B", "positive", "positive", "A", "very positive"]
    # right, wrong (B then a letter), wrong (extra word before), right, right (first line), wrong (missing word)
    assert [M.label_match(p, r) for p, r in zip(preds, refs)] == [True, False, False, True, True, False]
    assert M.accuracy(preds, refs) == pytest.approx(3 / 6)
    assert M.accuracy(["Sports"], [["World", "Sports"]]) == 1.0


def test_exact_number():
    preds = ["The answer is 8.", "1,200 apples", "-3", "June", "nothing", "8.5 or 9"]
    refs = ["8", "1200", "-3.0", "June", "5", "9"]
    assert M.first_number("x = 1,200.50 then 3") == 1200.5
    assert M.exact_number(preds, refs) == pytest.approx(4 / 6)


def test_rouge_l_hand_worked():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 tokens; P = R = 5/6.
    assert M.rouge_l_pair("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c e") = 2 ("a c"); P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    assert M.rouge_l_pair("a b c d", "a c e") == pytest.approx(4 / 7)
    assert M.rouge_l_pair("x y", "a b") == 0.0
    assert M.rouge_l(["a b c d", "x y"], ["a c e", ["q", "x y"]]) == pytest.approx((4 / 7 + 1.0) / 2)


def test_edit_similarity_hand_worked():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.edit_similarity_pair("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert M.edit_similarity_pair("", "") == 1.0
    # only the first line of the prediction counts: "abc" vs "abd" -> 1 - 1/3
    assert M.edit_similarity(["abc\nprint(1)", "abcd"], ["abd", "abcd"]) == pytest.approx((2 / 3 + 1.0) / 2)


def test_sari_hand_worked():
    """source "a b c", prediction "a b d", reference "a d".

    n=1: keep {a,b}, good {a}: P=(1+0)/2=.5, R=1/1 -> F=2/3; delete {c} (not in ref) -> P=1; add {d} in ref,
         ref additions {d} -> F=1.
    n=2: keep {"a b"} not in ref -> P=0, R=1 (nothing keepable) -> F=0; delete {"b c"} -> P=1; add {"b d"} not in
         ref -> P=0, R=0 ({"a d"} missed) -> F=0.
    n=3: nothing kept/keepable -> F=1; delete {"a b c"} -> P=1; add {"a b d"} wrong -> P=0, R=1 -> F=0.
    n=4: all empty -> 1, 1, 1.
    keep = (2/3+0+1+1)/4 = 2/3, del = 1, add = (1+0+0+1)/4 = 1/2 -> SARI = (2/3 + 1 + 1/2)/3 = 13/18.
    """
    assert M.sari_sentence("a b c", "a b d", ["a d"]) == pytest.approx(13 / 18)
    assert M.sari(["a b d"], ["a d"], sources=["a b c"]) == pytest.approx(13 / 18)
    # Copying the source keeps everything but deletes and adds nothing it should.
    assert M.sari_sentence("a b c", "a b c", ["a d"]) < 13 / 18
    with pytest.raises(ValueError):
        M.sari(["a"], ["a"])


def test_registry_and_defaults():
    assert set(M.METRICS) == {"accuracy", "exact_number", "rouge_l", "edit_similarity", "sari"}
    assert M.default_metric("FOMC") == "accuracy"
    assert M.default_metric("numglue-cm") == "exact_number"
    assert M.default_metric("Py150") == "edit_similarity"
    assert M.default_metric("20Minuten") == "sari"
    assert M.get_metric("rouge_l") is M.rouge_l
    with pytest.raises(KeyError):
        M.get_metric("bleu")
    prompt = "Provide a simplified version of the following paragraph in German.\n\nParagraph:\nDer Hund.\n\nSimplification:"
    assert M.simplification_source(prompt) == "Der Hund."


# Rows: base, after t0, after t1, after t2.
R = [[0.2, 0.1, 0.3],
     [0.8, 0.2, 0.3],
     [0.6, 0.9, 0.4],
     [0.5, 0.7, 0.9]]


def test_forgetting_metrics_hand_worked():
    assert average_performance(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)            # -0.25
    assert backward_transfer_trace(R) == pytest.approx((0.3 + 0.2 + 0.0) / 3)                 # 1/6
    assert forward_transfer(R) == pytest.approx(((0.2 - 0.1) + (0.4 - 0.3)) / 2)               # 0.1
    assert forgetting(R) == pytest.approx((max(0.8 - 0.5, 0.6 - 0.5) + max(0.2 - 0.7, 0.9 - 0.7)) / 2)  # 0.25


def test_bwt_trace_clips_gains_but_lopez_paz_does_not():
    R2 = [row[:] for row in R]
    R2[3][1] = 1.0  # task 1 improved after training task 2
    assert backward_transfer(R2) == pytest.approx((-0.3 + 0.1) / 2)
    assert backward_transfer_trace(R2) == pytest.approx(0.3 / 3)
    assert forgetting(R2) == pytest.approx((0.3 + max(0.2 - 1.0, 0.9 - 1.0)) / 2)


def test_forgetting_metrics_with_nulls():
    R3 = [row[:] for row in R]
    R3[3][0] = None  # task 0 not evaluated at the end
    R3[1][1] = None  # task 1 not evaluated before training it
    m = forgetting_metrics(R3)
    assert m["AP"] == pytest.approx((0.7 + 0.9) / 2)
    assert m["BWT"] == pytest.approx(0.7 - 0.9)
    assert m["BWT_trace"] == pytest.approx(0.2 / 2)  # two computable terms: j=1 (-0.2) and j=2 (0)
    assert m["FWT"] == pytest.approx(0.4 - 0.3)
    assert m["forgetting"] == pytest.approx(0.9 - 0.7)


def test_forgetting_starts_at_the_row_where_the_task_was_learned():
    R4 = [row[:] for row in R]
    R4[1][1] = 0.95  # task 1 scored higher zero-shot (after task 0) than right after training on it (0.9)
    # task 0: rows 1, 2 -> max(0.8 - 0.5, 0.6 - 0.5) = 0.3; task 1: row 2 only -> 0.9 - 0.7 = 0.2 (not 0.95 - 0.7)
    assert forgetting(R4) == pytest.approx((0.3 + 0.2) / 2)
    # the learned row's own score counts even when it is the maximum: a task that only dropped
    R5 = [[0.0, 0.0, 0.0, 0.0],
          [0.9, 0.8, 0.0, 0.0],
          [0.4, 0.3, 0.0, 0.0],
          [0.5, 0.6, 0.7, 0.9],
          [0.2, 0.1, 0.6, 0.5]]
    # j=0: rows 1..3 -> max(0.7, 0.2, 0.3) = 0.7; j=1: rows 2..3 -> max(0.2, 0.5) = 0.5; j=2: row 3 -> 0.1
    assert forgetting(R5) == pytest.approx((0.7 + 0.5 + 0.1) / 3)
    assert backward_transfer(R5) == pytest.approx(((0.2 - 0.9) + (0.1 - 0.3) + (0.6 - 0.7)) / 3)


def test_learning_accuracy_hand_worked():
    assert learning_accuracy(R) == pytest.approx((0.8 + 0.9 + 0.9) / 3)
    assert learning_accuracy_per_task(R) == pytest.approx([0.8, 0.9, 0.9])
    R6 = [row[:] for row in R]
    R6[2][1] = None  # task 1 not evaluated right after learning it
    assert learning_accuracy(R6) == pytest.approx((0.8 + 0.9) / 2)
    assert learning_accuracy_per_task(R6)[1] is None
    assert forgetting_metrics(R6)["LA"] == pytest.approx(0.85)


def test_batch_metrics_equal_the_per_matrix_values():
    rng = np.random.default_rng(3)
    stack = rng.random((6, 5, 4))
    stack[rng.random(stack.shape) < 0.15] = np.nan
    batched = batch_metrics(stack)
    for b in range(len(stack)):
        one = forgetting_metrics([[None if np.isnan(v) else v for v in row] for row in stack[b]])
        for key, value in one.items():
            assert (value is None and np.isnan(batched[key][b])) or batched[key][b] == pytest.approx(value)
    assert batched["LA_per_task"].shape == (6, 4)


def test_single_task_and_bad_shapes():
    m = forgetting_metrics([[0.3], [0.6]])
    assert m == {"AP": 0.6, "BWT": None, "BWT_trace": None, "FWT": None, "forgetting": None, "LA": 0.6}
    assert average_performance([[0.3], [None]]) is None
    with pytest.raises(ValueError):
        forgetting_metrics([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError):
        forgetting_metrics([[0.1]])
