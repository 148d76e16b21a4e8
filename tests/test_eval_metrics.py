import re
import string
from collections import Counter

import numpy as np
import pytest

from jit_tune.eval import metrics
from jit_tune.eval.metrics import (
    SQUAD, exact_match, normalize, rank_accuracy, rank_choices, rouge_l, score_generation, token_f1,
)


def test_each_normalization_step():
    text = "  The U.S.A.\tdon't-stop,\n an Apple a day  "
    assert normalize(text, ()) == text
    assert normalize(text, ["case"]) == "  the u.s.a.\tdon't-stop,\n an apple a day  "
    assert normalize(text, ["whitespace"]) == "The U.S.A. don't-stop, an Apple a day"
    # Punctuation inside words goes too, joining the pieces.
    assert normalize(text, ["punctuation"]) == "  The USA\tdontstop\n an Apple a day  "
    # Only whole words go, whatever their case: "an" in "banana" or "a" in "day" stay,
    # but the "A" of "U.S.A." is a word of its own while its dots are kept.
    assert normalize(text, ["articles"]) == "    U.S. .\tdon't-stop,\n   Apple   day  "
    assert normalize("banana", ["articles"]) == "banana"


def test_articles_only_at_word_boundaries():
    assert normalize("The an a theater another banana", ["articles", "whitespace"]) == "theater another banana"
    # Punctuation removal runs first, so "the-end" becomes one word, as in SQuAD.
    assert normalize("the-end", SQUAD) == "theend"
    assert normalize("the-end", ["articles", "whitespace"]) == "-end"


def test_squad_combination_and_order():
    assert normalize("  The Cat, a   dog\tand AN owl!\n", SQUAD) == "cat dog and owl"
    assert normalize("State-of-the-art", SQUAD) == "stateoftheart"
    # Steps always run in SQuAD's order, whatever the order they are given in.
    assert normalize("A. b", ["whitespace", "articles", "punctuation"]) == "b"


def test_unknown_step_names_the_valid_ones():
    with pytest.raises(ValueError, match="punctuation"):
        normalize("x", ["lower"])


def test_exact_match_with_and_without_case():
    assert exact_match("Paris", "paris", ["case"]) == 1.0
    assert exact_match("Paris", "paris", ["whitespace"]) == 0.0
    assert exact_match(" the  Paris.", "paris", SQUAD) == 1.0
    assert exact_match("Paris", "Paris", ()) == 1.0


@pytest.mark.parametrize("prediction, target, expected", [
    # "cat sat" vs "cat sat down": common 2, P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8.
    ("the cat sat", "a cat sat down", 0.8),
    # "paris france" vs "paris": common 1, P = 1/2, R = 1, F1 = 2/3.
    ("Paris, France.", "paris", 2 / 3),
    # Multiplicity counts: "cat cat cat" vs "cat dog": common 1, P = 1/3, R = 1/2, F1 = 0.4.
    ("cat cat cat", "cat dog", 0.4),
    # "cat cat dog" vs "cat dog dog": common min(2,1) + min(1,2) = 2, P = R = 2/3.
    ("cat cat dog", "cat dog dog", 2 / 3),
    ("cat", "dog", 0.0),
    ("The.", "a", 1.0),  # both normalize to nothing
    ("the", "cat", 0.0),  # only one does
])
def test_token_f1_hand_computed(prediction, target, expected):
    assert token_f1(prediction, target) == pytest.approx(expected)


def _squad_v11_f1(prediction, ground_truth):
    """The official SQuAD v1.1 evaluate script's normalize_answer and f1_score."""
    def normalize_answer(s):
        def remove_articles(text):
            return re.sub(r'\b(a|an|the)\b', ' ', text)

        def white_space_fix(text):
            return ' '.join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return ''.join(ch for ch in text if ch not in exclude)

        def lower(text):
            return text.lower()

        return white_space_fix(remove_articles(remove_punc(lower(s))))

    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def test_token_f1_matches_squad_v11_script():
    pairs = [
        ("The Eiffel Tower, in Paris", "eiffel tower"),
        ("Denver Broncos", "the Denver Broncos!"),
        ("an apple a day keeps the doctor away", "apple day doctor away away"),
        ("U.S. Navy", "US navy ships"),
        ("no match here", "something else"),
    ]
    for prediction, target in pairs:
        assert token_f1(prediction, target) == pytest.approx(_squad_v11_f1(prediction, target))


def test_rouge_l_hand_computed():
    # LCS of "the cat on the mat" (5 tokens) and "the black cat sat on the mat" (7) is the
    # whole prediction: P = 5/5, R = 5/7, F = 2PR/(P+R) = (10/7)/(12/7) = 5/6.
    assert rouge_l("the cat on the mat", "the black cat sat on the mat") == pytest.approx(5 / 6)
    # Porter stemming (tokens over 3 characters), lower-casing, punctuation dropped.
    assert rouge_l("Cats running!", "cat runs") == pytest.approx(1.0)
    assert rouge_l("sat cat", "cat sat") == pytest.approx(0.5)  # LCS 1 of 2 and 2
    assert rouge_l("", "") == 0.0


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [
        ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the fox"),
        ("reverse these words: moon sun", "sun moon"),
        ("Houses were built", "the house was building"),
    ]
    for prediction, target in pairs:
        assert rouge_l(prediction, target) == pytest.approx(scorer.score(target, prediction)["rougeL"].fmeasure)


def test_rank_rules_pick_different_options():
    logliks, tokens, chars = [-4.0, -5.0, -6.1], [2, 4, 3], [3, 12, 40]
    # acc:            -4.0,        -5.0,        -6.1         -> 0
    # acc_token_mean: -4.0/2=-2.0, -5.0/4=-1.25, -6.1/3≈-2.033 -> 1
    # acc_norm:       -4.0/3≈-1.333, -5.0/12≈-0.417, -6.1/40≈-0.153 -> 2
    assert rank_choices(logliks, tokens, chars) == {"acc": 0, "acc_token_mean": 1, "acc_norm": 2}
    assert rank_accuracy(logliks, tokens, chars, gold=1) == {"acc": 0.0, "acc_token_mean": 1.0, "acc_norm": 0.0}


def test_rank_ties_go_to_the_first_index():
    assert rank_choices([-2.0, -1.0, -1.0], [1, 1, 1], [5, 5, 5]) == {"acc": 1, "acc_token_mean": 1, "acc_norm": 1}
    # Per token -3/1, -1/1, -2/2: options 1 and 2 tie. Per character -3/6, -1/2, -2/4: all tie.
    assert rank_choices([-3.0, -1.0, -2.0], [1, 1, 2], [6, 2, 4]) == {"acc": 1, "acc_token_mean": 1, "acc_norm": 0}


def test_rank_rejects_bad_lengths():
    with pytest.raises(ValueError):
        rank_choices([-1.0, -2.0], [1], [1, 2])
    with pytest.raises(ValueError):
        rank_choices([-1.0], [0], [1])


def test_rank_matches_lm_evaluation_harness():
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = int(rng.integers(2, 6))
        choices = ["x" * int(rng.integers(1, 40)) for _ in range(k)]
        lls = tuple(float(x) for x in -rng.exponential(10.0, size=k))
        token_counts = [int(rng.integers(1, 10)) for _ in range(k)]
        # lm-evaluation-harness's ConfigurableTask.process_results, multiple_choice:
        completion_len = np.array([float(len(i)) for i in choices])
        pred = np.argmax(lls)
        pred_norm = np.argmax(lls / completion_len)
        picks = rank_choices(lls, token_counts, [len(c) for c in choices])
        assert (picks["acc"], picks["acc_norm"]) == (pred, pred_norm)


def test_score_generation_dispatch():
    assert metrics.METRICS == ("exact_match", "token_f1", "rouge_l", "acc", "acc_token_mean", "acc_norm")
    assert score_generation("exact_match", "The cat", "cat", SQUAD) == 1.0
    assert score_generation("exact_match", "The cat", "cat", ["case"]) == 0.0
    assert score_generation("token_f1", "the cat sat", "a cat sat down", SQUAD) == pytest.approx(0.8)
    assert score_generation("rouge_l", "the cat on the mat", "the black cat sat on the mat", SQUAD) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="rank_accuracy"):
        score_generation("acc", "a", "b", SQUAD)
    with pytest.raises(ValueError, match="unknown metric"):
        score_generation("bleu", "a", "b", SQUAD)
