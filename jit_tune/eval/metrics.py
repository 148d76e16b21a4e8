"""Evaluation metrics, computed with the conventions published results use.

Generation metrics compare a decoded prediction with a target string: exact match and
token F1 after SQuAD's answer normalization, and ROUGE-L from Google's `rouge_score`.
Rank-classification metrics pick one option of a multiple-choice example from the
model's log-likelihood of each option, as T0 and lm-evaluation-harness do.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

# SQuAD v1.1 normalize_answer's steps, in its order: lower, remove punctuation, remove
# articles, fix whitespace. Any subset may be chosen; it always runs in this order.
NORMALIZATIONS = ("case", "whitespace", "punctuation", "articles")
SQUAD = NORMALIZATIONS
_ORDER = ("case", "punctuation", "articles", "whitespace")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Case-insensitive so that "articles" alone also drops "The"; with "case" chosen too
# (SQuAD) the text is already lower-case and this is SQuAD's own regex.
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)

GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l")
RANK_METRICS = ("acc", "acc_token_mean", "acc_norm")
METRICS = GENERATION_METRICS + RANK_METRICS


def normalize(text: str, steps: Sequence[str]) -> str:
    """`text` with the chosen normalization steps applied, in SQuAD's order.

    "case" lower-cases; "punctuation" deletes the characters of `string.punctuation`
    (so "don't" becomes "dont"); "articles" replaces the whole words a/an/the by a space;
    "whitespace" strips and collapses every run of whitespace to one space.
    """
    unknown = set(steps) - set(NORMALIZATIONS)
    if unknown:
        raise ValueError(f"unknown normalization {sorted(unknown)}; valid ones: {NORMALIZATIONS}")
    for step in _ORDER:
        if step not in steps:
            continue
        if step == "case":
            text = text.lower()
        elif step == "punctuation":
            text = text.translate(_PUNCTUATION)
        elif step == "articles":
            text = _ARTICLES.sub(" ", text)
        else:
            text = " ".join(text.split())
    return text


def exact_match(prediction: str, target: str, steps: Sequence[str]) -> float:
    """1.0 when prediction and target are equal after normalization, else 0.0."""
    return float(normalize(prediction, steps) == normalize(target, steps))


def token_f1(prediction: str, target: str, steps: Sequence[str] = SQUAD) -> float:
    """SQuAD's F1 between the bags of whitespace tokens of the normalized strings.

    precision = common / len(prediction tokens), recall = common / len(target tokens),
    where common counts tokens with multiplicity (Counter intersection). Equal to the
    official SQuAD v1.1 script whenever either side has a token; when both normalize to
    nothing this returns 1.0 (SQuAD v2.0's rule, v1.1 returns 0), and 0.0 when only one does.
    """
    pred_tokens = normalize(prediction, steps).split()
    target_tokens = normalize(target, steps).split()
    if not pred_tokens or not target_tokens:
        return float(pred_tokens == target_tokens)
    common = sum((Counter(pred_tokens) & Counter(target_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


_rouge_scorer = None


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F-measure, as T0 and FLAN report it.

    This is `rouge_score`'s "rougeL" (the longest common subsequence over the whole
    text, not the per-sentence "rougeLsum") F1, with Porter stemming of tokens longer
    than 3 characters. `rouge_score` lower-cases and keeps only [a-z0-9] runs as tokens,
    so other scripts score nothing; two empty strings score 0.0 (its convention).
    """
    global _rouge_scorer
    if _rouge_scorer is None:
        # Imported and built on first use: loading nltk's stemmer is not free.
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_rouge_scorer.score(target, prediction)["rougeL"].fmeasure)


def rank_choices(
    logliks: Sequence[float], token_counts: Sequence[int], char_lengths: Sequence[int]
) -> dict[str, int]:
    """The option each rank-classification rule picks, given every option's summed
    log-likelihood ll_i (of the option's tokens given the prompt), its token count and
    the character length of its text.

    - "acc": argmax_i ll_i, T0's rank classification and lm-evaluation-harness's `acc`.
    - "acc_token_mean": argmax_i ll_i / token_count_i, the mean per-token log-likelihood.
    - "acc_norm": argmax_i ll_i / char_length_i, lm-evaluation-harness's `acc_norm`
      (`np.argmax(lls / completion_len)`, completion_len = len(choice) in characters,
      of the choice text without the space that joins it to the prompt).

    Ties go to the first index (numpy argmax), as in lm-evaluation-harness.
    """
    lls = np.asarray(logliks, dtype=np.float64)
    tokens = np.asarray(token_counts, dtype=np.float64)
    chars = np.asarray(char_lengths, dtype=np.float64)
    if not (lls.ndim == 1 and lls.size > 0 and lls.shape == tokens.shape == chars.shape):
        raise ValueError("logliks, token_counts and char_lengths must be equally long and non-empty")
    if (tokens <= 0).any() or (chars <= 0).any():
        raise ValueError("token counts and character lengths must be positive")
    return {
        "acc": int(np.argmax(lls)),
        "acc_token_mean": int(np.argmax(lls / tokens)),
        "acc_norm": int(np.argmax(lls / chars)),
    }


def rank_accuracy(
    logliks: Sequence[float], token_counts: Sequence[int], char_lengths: Sequence[int], gold: int
) -> dict[str, float]:
    """1.0 or 0.0 per rule of `rank_choices`: whether it picks the `gold` option."""
    picks = rank_choices(logliks, token_counts, char_lengths)
    return {rule: float(pick == gold) for rule, pick in picks.items()}


def score_generation(metric: str, prediction: str, target: str, steps: Sequence[str] = SQUAD) -> float:
    """One generation metric of a prediction; `steps` is the normalization of exact
    match and token F1 (ROUGE-L has its own tokenization and ignores it)."""
    if metric == "exact_match":
        return exact_match(prediction, target, steps)
    if metric == "token_f1":
        return token_f1(prediction, target, steps)
    if metric == "rouge_l":
        return rouge_l(prediction, target)
    if metric in RANK_METRICS:
        raise ValueError(f"{metric!r} scores options' log-likelihoods: use rank_accuracy")
    raise ValueError(f"unknown metric {metric!r}; valid ones: {METRICS}")
