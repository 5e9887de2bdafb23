"""Per-task metrics on (prediction, reference) lists, and the registry that names them.

Every metric in ``METRICS`` has the signature ``metric(predictions, references, sources=None) -> float`` and returns
the mean of a per-example score in ``[0, 1]`` (SARI too: it is *not* scaled to 0–100 as the EASSE / Hugging Face
``evaluate`` packages print it). ``references[i]`` is one string or a list of strings (several references: the best
one counts, except for SARI, which uses all of them as the algorithm defines). ``sources`` is only read by SARI.

Which metric a task uses by default follows ``shared/data/README.md`` (TRACE's choices): see ``DEFAULT_TASK_METRICS``
and ``default_metric``. The forgetting metrics over a score matrix live in ``mora_dist.evaluation.forgetting`` and
are re-exported here.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from mora_dist.evaluation.forgetting import (  # noqa: F401  (re-exported)
    FORGETTING_CONVENTIONS,
    average_performance,
    backward_transfer,
    backward_transfer_trace,
    forgetting,
    forgetting_metrics,
    forward_transfer,
)

Reference = str | Sequence[str]
MetricFn = Callable[..., float]

_PUNCT = string.punctuation + "“”‘’「」。，、：；！？"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _refs(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _check(predictions: Sequence[str], references: Sequence[Reference]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


# ----------------------------------------------------------------------------------------------------- accuracy
def normalize_label(text: str) -> str:
    """First non-empty line, lower-cased, surrounding whitespace and punctuation removed."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip().strip(_PUNCT + " \t").lower()
    return ""


def label_match(prediction: str, reference: str) -> bool:
    """Whether a generated answer names the reference label.

    Rule: both texts go through ``normalize_label`` (first non-empty line, lower case, outer punctuation stripped).
    The prediction is right when it equals the reference or starts with it followed by a non-alphanumeric
    character. So ``"B. declarative"`` matches ``"B"`` and ``"Positive!"`` matches ``"positive"``, but
    ``"Bad"`` does not match ``"B"`` and ``"very positive"`` does not match ``"positive"`` (nor the reverse).
    ScienceQA references carry an explanation after the letter: only their first line counts.
    """
    pred, ref = normalize_label(prediction), normalize_label(reference)
    if not ref:
        return not pred
    if pred == ref:
        return True
    return pred.startswith(ref) and not pred[len(ref)].isalnum()


def accuracy(predictions: Sequence[str], references: Sequence[Reference], sources=None) -> float:
    """Fraction of predictions that name their reference label (see ``label_match``)."""
    _check(predictions, references)
    return _mean([float(any(label_match(p, r) for r in _refs(ref))) for p, ref in zip(predictions, references)])


# ------------------------------------------------------------------------------------------------- exact number
def first_number(text: str) -> float | None:
    """The first number written in ``text`` (thousands commas dropped), or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def number_match(prediction: str, reference: str) -> bool:
    """Same first number (within 1e-6); when the reference holds no number, same normalised label instead."""
    ref = first_number(reference)
    if ref is None:
        return normalize_label(prediction) == normalize_label(reference)
    pred = first_number(prediction)
    return pred is not None and abs(pred - ref) <= 1e-6 * max(1.0, abs(ref))


def exact_number(predictions: Sequence[str], references: Sequence[Reference], sources=None) -> float:
    """Fraction of predictions whose first number equals the reference's (NumGLUE's 'accuracy')."""
    _check(predictions, references)
    return _mean([float(any(number_match(p, r) for r in _refs(ref))) for p, ref in zip(predictions, references)])


# ---------------------------------------------------------------------------------------------------- ROUGE-L
def _lcs_length(a: Sequence, b: Sequence) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = keep
    return row[-1]


def rouge_l_pair(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair: LCS over whitespace tokens (case kept), F = 2PR/(P+R); 1.0 when both are empty."""
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(not pred and not ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[Reference], sources=None) -> float:
    """Mean over examples of the best ROUGE-L F1 against that example's references."""
    _check(predictions, references)
    return _mean([max(rouge_l_pair(p, r) for r in _refs(ref)) for p, ref in zip(predictions, references)])


# -------------------------------------------------------------------------------------------- edit similarity
def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
            prev = keep
    return row[-1]


def edit_similarity_pair(prediction: str, reference: str) -> float:
    """``1 - levenshtein / max(len)`` on the stripped strings; 1.0 when both are empty."""
    pred, ref = prediction.strip(), reference.strip()
    longest = max(len(pred), len(ref))
    return 1.0 if longest == 0 else 1.0 - levenshtein(pred, ref) / longest


def edit_similarity(predictions: Sequence[str], references: Sequence[Reference], sources=None) -> float:
    """Mean edit similarity (TRACE's Py150 metric, in [0, 1]); the first line of a prediction is used.

    Py150 asks for the next line of code, so only the prediction's first non-empty line is compared.
    """
    _check(predictions, references)
    scores = []
    for p, ref in zip(predictions, references):
        line = next((ln for ln in p.strip().splitlines() if ln.strip()), "")
        scores.append(max(edit_similarity_pair(line, r) for r in _refs(ref)))
    return _mean(scores)


# ------------------------------------------------------------------------------------------------------- SARI
def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _sari_ngram(sgrams: list[str], cgrams: list[str], rgramslist: list[list[str]], numref: int):
    """Keep F1, deletion precision and addition F1 for one n-gram order (Xu et al. 2016, as in HF ``evaluate``)."""
    rgramcounter = Counter(g for rgrams in rgramslist for g in rgrams)
    s_rep = Counter({k: v * numref for k, v in Counter(sgrams).items()})
    c_rep = Counter({k: v * numref for k, v in Counter(cgrams).items()})

    keep = s_rep & c_rep
    keep_good = keep & rgramcounter
    keep_all = s_rep & rgramcounter
    keep_p = sum(keep_good[g] / keep[g] for g in keep) / len(keep) if keep else 1.0
    keep_r = sum(keep_good[g] for g in keep) / sum(keep_all.values()) if keep_all else 1.0
    keep_f = 2 * keep_p * keep_r / (keep_p + keep_r) if keep_p + keep_r > 0 else 0.0

    delete = s_rep - c_rep
    delete_good = delete - rgramcounter
    del_p = sum(delete_good[g] / delete[g] for g in delete) / len(delete) if delete else 1.0

    added = set(cgrams) - set(sgrams)
    added_good = added & set(rgramcounter)
    added_all = set(rgramcounter) - set(sgrams)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(added_all) if added_all else 1.0
    add_f = 2 * add_p * add_r / (add_p + add_r) if add_p + add_r > 0 else 0.0
    return keep_f, del_p, add_f


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI of one sentence in [0, 1]: mean of keep-F1, deletion precision and addition F1 over n = 1..4.

    Tokens are the lower-cased whitespace tokens (no 13a tokenisation). Follows Xu et al. (2016) with the keep-recall
    fix used by Hugging Face ``evaluate``'s ``sari`` (recall normalised by the total count, 0/0 defined as 1).
    """
    refs = [r.lower().split() for r in references]
    src, pred = source.lower().split(), prediction.lower().split()
    keeps, dels, adds = [], [], []
    for n in range(1, 5):
        k, d, a = _sari_ngram(_ngrams(src, n), _ngrams(pred, n), [_ngrams(r, n) for r in refs], len(refs))
        keeps.append(k), dels.append(d), adds.append(a)
    return (sum(keeps) / 4 + sum(dels) / 4 + sum(adds) / 4) / 3


def sari(predictions: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None) -> float:
    """Mean sentence SARI in [0, 1]; ``sources`` (the texts to simplify) are required."""
    _check(predictions, references)
    if sources is None or len(sources) != len(predictions):
        raise ValueError("SARI needs one source text per prediction (pass sources=...)")
    return _mean([sari_sentence(s, p, _refs(r)) for s, p, r in zip(sources, predictions, references)])


_SIMPLIFY_SOURCE = re.compile(r"Paragraph:\s*\n(.*?)\n\s*Simplification:\s*$", re.S)


def simplification_source(prompt: str) -> str:
    """The paragraph to simplify inside a 20Minuten prompt (the whole prompt when the layout is not recognised)."""
    match = _SIMPLIFY_SOURCE.search(prompt)
    return match.group(1).strip() if match else prompt


# --------------------------------------------------------------------------------------------------- registry
METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "exact_number": exact_number,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
}

DEFAULT_TASK_METRICS: dict[str, str] = {
    "C-STANCE": "accuracy", "FOMC": "accuracy", "ScienceQA": "accuracy",
    "NumGLUE-cm": "exact_number", "NumGLUE-ds": "exact_number",
    "Py150": "edit_similarity", "20Minuten": "sari", "MeetingBank": "rouge_l",
    "agnews": "accuracy", "amazon": "accuracy", "yelp": "accuracy", "dbpedia": "accuracy", "yahoo": "accuracy",
}


def default_metric(task: str) -> str:
    """The metric name TRACE uses for ``task`` (case-insensitive); ``accuracy`` for unknown tasks."""
    for name, metric in DEFAULT_TASK_METRICS.items():
        if name.lower() == task.lower():
            return metric
    return "accuracy"


def get_metric(metric: str | MetricFn) -> MetricFn:
    """A metric function from its registry name (or the function itself)."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return METRICS[metric]
