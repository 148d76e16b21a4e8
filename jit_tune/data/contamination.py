"""Contamination check: does an evaluation example's text appear in the training mixture?

Two tests per evaluation text, after lower-casing, deleting punctuation and collapsing
whitespace: an exact match of a whole training text, and a shared run of NGRAM words
with any training text. GPT-3 (Brown et al., 2020, appendix C) used 13-grams: long
enough that common phrases do not collide, short enough to catch a copied passage
inside a longer document. Texts shorter than NGRAM words can only match exactly.

An n-gram found in more than COMMON training texts is a template's fixed wording
("Read the following article and answer the question ..."), which every example of
that template shares, not a copied passage: it is left out of the index (GPT-3 also
dropped frequent n-grams). Without this, every held-in task of a templated mixture is
flagged at 100%.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from jit_tune.eval.metrics import normalize

NGRAM = 13
THRESHOLD = 0.01  # warn when more than this share of a task's examples overlap
COMMON = 50  # n-grams in more training texts than this are fixed wording, not passages
_STEPS = ("case", "whitespace", "punctuation")


def _hash(text: str) -> int:
    # 64-bit and signed, to fit int64 arrays; a false match needs a 2**-64 collision.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _words(text: str) -> list[str]:
    return normalize(text, _STEPS).split()


def _ngram_hashes(words: list[str], n: int) -> np.ndarray:
    return np.array([_hash(" ".join(words[i: i + n])) for i in range(len(words) - n + 1)], np.int64)


def _contains(sorted_unique: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Membership of each value, by binary search: O(len(values) log len(index)),
    where np.isin would sort the whole index again on every query."""
    at = np.searchsorted(sorted_unique, values)
    found = at < len(sorted_unique)
    found[found] = sorted_unique[at[found]] == values[found]
    return found


class TrainingIndex:
    """Hashes of every normalized training text and of every n-gram of its words.

    Both are sorted, unique int64 arrays (`exact`, `ngrams`): 8 bytes per distinct text
    and per distinct n-gram, so 1B training words take about 8 GB at most. While
    building, all n-grams are held once more with their repeats before np.unique.
    """

    def __init__(self, texts: Iterable[str], n: int = NGRAM, common: int = COMMON):
        self.n = n
        exact, ngrams = [], [np.zeros(0, np.int64)]
        for text in texts:
            words = _words(text)
            if not words:  # nothing to match: an empty text would only match empty ones
                continue
            exact.append(_hash(" ".join(words)))
            if len(words) >= n:
                ngrams.append(np.unique(_ngram_hashes(words, n)))  # once per text: counts are texts
        self.exact = np.unique(np.array(exact, np.int64))
        unique, texts_with = np.unique(np.concatenate(ngrams), return_counts=True)
        self.ngrams = unique[texts_with <= common]

    def overlaps(self, text: str) -> tuple[bool, bool]:
        """(whole text matches a training text exactly, shares at least one n-gram)."""
        words = _words(text)
        if not words:
            return False, False
        exact = bool(_contains(self.exact, np.array([_hash(" ".join(words))], np.int64))[0])
        ngram = len(words) >= self.n and bool(_contains(self.ngrams, _ngram_hashes(words, self.n)).any())
        return exact, ngram


def contamination(index: TrainingIndex, eval_texts: dict[str, list[str]],
                  generated: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Per task: {"examples", "exact", "ngram", "flagged", "n"}, where exact and ngram are
    the shares of the task's texts with an exact match or a shared n-gram, flagged says
    whether either share is above THRESHOLD, and n is the index's n-gram length.

    For `generated` tasks (built-in: training and evaluation drawn from one generator
    over a small vocabulary) a shared n-gram is chance, not a copied passage: only exact
    matches flag them."""
    results = {}
    for task, texts in eval_texts.items():
        hits = np.array([index.overlaps(t) for t in texts], bool).reshape(-1, 2)
        exact, ngram = (float(hits[:, 0].mean()), float(hits[:, 1].mean())) if len(texts) else (0.0, 0.0)
        results[task] = {
            "examples": len(texts),
            "exact": exact,
            "ngram": ngram,
            "flagged": exact > THRESHOLD or (ngram > THRESHOLD and task not in generated),
            "n": index.n,
        }
    return results


def report_lines(results: dict) -> list[str]:
    """One line per task, then one WARNING line per flagged task."""
    lines = [
        f"{task}: {r['examples']} examples, {r['exact']:.1%} exact matches, "
        f"{r['ngram']:.1%} share a {r.get('n', NGRAM)}-gram with training data"
        for task, r in results.items()
    ]
    for task, r in results.items():
        if r["flagged"]:
            lines.append(
                f"WARNING: {task} may be contaminated: {r['exact']:.1%} of its examples match a "
                f"training text exactly and {r['ngram']:.1%} share a {r.get('n', NGRAM)}-gram "
                f"(threshold {THRESHOLD:.0%})"
            )
    return lines
